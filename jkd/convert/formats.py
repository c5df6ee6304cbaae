"""Reading a checkpoint file into named numpy arrays, whatever format the hub shipped it in.

  tensors, fmt = read_tensors('deit_small_patch16_224.safetensors')   # {'blocks.0.attn...': ...}

Formats, detected from the file's bytes (not its name):
  safetensors   timm and Hugging Face hub files (header checked here, then numpy views copied).
  pytorch       a `torch.save` zip (`.pth`, `.pt`, `.bin`), read by jkd's own weights-only
                reader (`jkd.convert.pth`), with or without torch installed.
  npz           numpy's `.npz`: big_vision checkpoints, keys joined with '/'.

Every file is untrusted (users import files from public hubs), so every reader checks what the
file claims against what it holds before it reads a byte on that claim:
  - only a regular file is read (a directory, a FIFO, /dev/zero or a symlink loop is refused
    before it is opened), at most its stat size, and at most `MAX_FILE_BYTES`;
  - a zip's declared sizes, compression and flags are checked before anything is decompressed
    (`checked.open_zip`: a deflate bomb is refused);
  - safetensors offsets and npy headers must describe exactly the bytes that are there, with
    numeric dtypes only (no object arrays, no pickles), and safetensors tensors may not share
    bytes;
  - a `.pth`'s pickle and tensors are checked by `jkd.convert.pth` (no Python object of the
    file's choosing is created; every tensor proven inside its storage).
So file bytes can never turn into an out-of-bounds read, and memory stays a small multiple of
the file's size. Every refusal is a `UserError` naming the file and the field.

A state dict nested under 'model', 'state_dict', 'module' or 'params' (MAE, DeiT and SimMIM
checkpoints keep theirs under 'model') is unwrapped, and DistributedDataParallel's 'module.'
prefix is dropped. Everything else a checkpoint holds beside the tensors (epoch, optimizer
state) is ignored.

This module (and `checked`, `pth`) imports numpy and the standard library only (no jax): the
fuzz test runs it in small child processes under memory limits.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import stat
import struct
import zipfile
from typing import Any

import numpy as np

from jkd import storage
from jkd.convert import checked, pth
from jkd.convert.checked import MAX_FILE_BYTES, MAX_HEADER_BYTES
from jkd.errors import UserError

NESTED_KEYS = ('model', 'state_dict', 'module', 'params', 'model_state')
# safetensors dtype -> numpy dtype name.
_SAFETENSORS_DTYPES = {
    'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
    'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8',
    'U64': 'uint64', 'U32': 'uint32', 'U16': 'uint16', 'U8': 'uint8', 'BOOL': 'bool',
}


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Returns ({name: array}, format) of a checkpoint file; arrays as stored (fp16 stays fp16).

  Raises:
    UserError: a missing or non-regular file, a format that is none of the above, a damaged or
      inconsistent file (named, with the field), a pickle with Python objects a weights-only
      load refuses, or a file without any tensor.
  """
  data = read_file(path)
  if _is_safetensors(data):
    tensors, fmt = _read_safetensors(data, path), 'safetensors'
  elif data[:4] == b'PK\x03\x04':
    archive = checked.open_zip(data, path)
    names = archive.namelist()
    if any(n.endswith('data.pkl') for n in names):
      tensors, fmt = pth.read(archive, data, path), 'pytorch'
    elif names and all(n.endswith('.npy') for n in names):
      tensors, fmt = _read_npz(archive, path), 'npz'
    else:
      raise UserError(f'{path!r} is a zip archive but neither a PyTorch checkpoint (no '
                      f'data.pkl) nor a numpy .npz; it holds {", ".join(names[:5])}...')
  elif data[:2] == b'\x80\x02' or data[:1] == b'\x80':
    raise UserError(f'{path!r} is a legacy (pre-1.6, non-zip) PyTorch pickle, which jkd does not '
                    'unpickle. Re-save it with a current torch: torch.save(torch.load(f, '
                    'weights_only=True), "model.pth"), or as safetensors.')
  else:
    raise UserError(f'{path!r} is not a checkpoint jkd can read: expected a safetensors file, a '
                    'PyTorch .pth/.bin (torch.save zip) or a big_vision .npz.')
  tensors = _unwrap(tensors, path)
  if not tensors:
    raise UserError(f'{path!r} holds no tensors.')
  return tensors, fmt


# ---------------------------------------------------------------- the file itself


def read_file(path: str, what: str = 'The checkpoint file') -> bytes:
  """The bytes of a regular file (local or a bucket object), refused before it is opened if it
  is a directory, a symlink loop, a FIFO, a device or a socket, or larger than
  `MAX_FILE_BYTES`. At most its stat size is read: a file that grows or shrinks meanwhile
  (/proc files, a download in progress) is refused."""
  if storage.is_remote(path):
    if not storage.isfile(path):
      raise UserError(f'{what} {path!r} does not exist.')
    if storage.size(path) > MAX_FILE_BYTES:
      raise UserError(f'{what} {path!r} is larger than {MAX_FILE_BYTES >> 30} GiB, the most jkd '
                      'reads as one checkpoint.')
    return storage.read_bytes(path)
  st = _stat_regular(path, what)
  # O_NONBLOCK: should the path have become a FIFO since the stat, opening it cannot hang.
  flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_NOCTTY', 0) | getattr(
      os, 'O_CLOEXEC', 0)
  try:
    fd = os.open(path, flags)
  except OSError as e:
    raise UserError(f'{what} {path!r} cannot be opened ({e.strerror}).') from None
  try:
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
      raise UserError(f'{what} {path!r} was replaced while it was opened; run again.')
    size = now.st_size
    if size > MAX_FILE_BYTES:
      raise UserError(f'{what} {path!r} is larger than {MAX_FILE_BYTES >> 30} GiB, the most jkd '
                      'reads as one checkpoint.')
    chunks, left = [], size + 1  # One byte more than the stat size: growth is seen.
    while left > 0:
      chunk = os.read(fd, min(left, 64 << 20))
      if not chunk:
        break
      chunks.append(chunk)
      left -= len(chunk)
  except OSError as e:
    raise UserError(f'{what} {path!r} cannot be read ({e.strerror}).') from None
  finally:
    os.close(fd)
  data = b''.join(chunks)
  if len(data) != size:
    raise UserError(f'{what} {path!r} changed size while it was read ({size} bytes by its stat, '
                    f'{len(data)} read): it is being written, or is not a regular file. Run '
                    'again once it is complete.')
  return data


def _stat_regular(path: str, what: str) -> os.stat_result:
  """os.stat of a regular file, or a UserError saying what the path is instead."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    if os.path.islink(path):
      raise UserError(f'{what} {path!r} is a symlink to a file that does not exist '
                      f'({os.readlink(path)!r}).') from None
    raise UserError(f'{what} {path!r} does not exist.') from None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(f'{what} {path!r} is a symlink loop (a link that leads back to itself): '
                      'point it at a checkpoint file.') from None
    if e.errno == errno.ENOTDIR:
      raise UserError(f'{what} {path!r} does not exist: a part of that path is a file, not a '
                      'directory.') from None
    raise UserError(f'{what} {path!r} cannot be read ({e.strerror}).') from None
  if stat.S_ISDIR(st.st_mode):
    raise UserError(f'{what} {path!r} is a directory, not a checkpoint file: pass the '
                    '.safetensors, .pth/.bin or .npz file inside it.')
  if not stat.S_ISREG(st.st_mode):
    kind = ('a FIFO' if stat.S_ISFIFO(st.st_mode) else 'a character device'
            if stat.S_ISCHR(st.st_mode) else 'a block device' if stat.S_ISBLK(st.st_mode)
            else 'a socket' if stat.S_ISSOCK(st.st_mode) else 'a special file')
    raise UserError(f'{what} {path!r} is not a regular file ({kind}): jkd reads checkpoints '
                    'from regular files only. Save it to a file first.')
  return st


# ---------------------------------------------------------------- safetensors


def _is_safetensors(data: bytes) -> bool:
  if len(data) < 10:
    return False
  (n,) = struct.unpack('<Q', data[:8])
  return 2 <= n <= len(data) - 8 and data[8:9] == b'{'


def _safetensors_header(data: bytes, path: str) -> tuple[dict, int]:
  """(header dict, start of the data section)."""
  (n,) = struct.unpack('<Q', data[:8])
  if n > MAX_HEADER_BYTES:
    raise UserError(f'{path!r}: its safetensors header claims {n:,} bytes, more than '
                    f'{MAX_HEADER_BYTES:,}: the file is damaged.')
  try:
    header = json.loads(data[8:8 + n].decode('utf-8'))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise checked.damaged(path, 'its safetensors header', e) from None
  if not isinstance(header, dict):
    raise UserError(f'{path!r}: its safetensors header is a {type(header).__name__}, not an '
                    'object: the file is damaged.')
  return header, 8 + n


def _read_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, after checking its dtype, shape and byte range."""
  header, start = _safetensors_header(data, path)
  body = len(data) - start
  out, total = {}, 0
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    where = f'{path!r}: tensor {name!r}'
    if not isinstance(entry, dict):
      raise UserError(f'{where} has a header entry that is not an object.')
    dtype = _SAFETENSORS_DTYPES.get(entry.get('dtype')) if isinstance(entry.get('dtype'),
                                                                      str) else None
    if dtype is None:
      raise UserError(f'{where} has dtype {entry.get("dtype")!r}; jkd reads '
                      f'{", ".join(_SAFETENSORS_DTYPES)}.')
    shape = checked.dims(entry.get('shape'), f'{where}: shape')
    offsets = entry.get('data_offsets')
    if not (isinstance(offsets, list) and len(offsets) == 2):
      raise UserError(f'{where}: data_offsets {offsets!r} is not a [begin, end] pair.')
    begin, end = (checked.index(v, f'{where}: data_offsets') for v in offsets)
    dt = checked.numpy_dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if not begin <= end <= body or end - begin != nbytes:
      raise UserError(f'{where}: data_offsets [{begin}, {end}] do not hold a {dtype} tensor of '
                      f'shape {tuple(shape)} ({nbytes} bytes) inside the {body} data bytes: the '
                      'file is damaged.')
    total += nbytes
    if total > body:  # Tensors may not share bytes: entries over one range multiply memory.
      raise UserError(f'{path!r}: its tensors claim {total:,} bytes in all, more than its '
                      f'{body:,} data bytes (overlapping data_offsets): the file is damaged.')
    out[name] = _copy_out(data, start + begin, dt, shape)
  return out


def _copy_out(data: bytes, start: int, dt: np.dtype, shape) -> np.ndarray:
  """A writable copy of the C-order array of `shape` at data[start:...] (range checked)."""
  numel = math.prod(shape)
  flat = np.frombuffer(data, dtype=np.uint8, count=numel * dt.itemsize, offset=start)
  if dt == np.bool_:
    return (flat != 0).reshape(shape)
  return flat.view(dt).reshape(shape).copy()


# ---------------------------------------------------------------- npz


def _read_npz(archive: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz: each member's npy header checked (numeric dtype, shape, exactly
  the bytes it needs) before its data is viewed; never np.load (which allocates what the
  header claims before reading)."""
  out = {}
  for name in archive.namelist():
    raw = checked.member(archive, name, path)
    out[name[:-len('.npy')]] = _npy(raw, f'{path!r}: array {name[:-4]!r}')
  return out


def _npy(raw: bytes, where: str) -> np.ndarray:
  f = io.BytesIO(raw)
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
    elif version in ((2, 0), (3, 0)):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
    else:
      raise ValueError(f'npy format version {version}')
  except Exception as e:  # pylint: disable=broad-except  (ValueError, SyntaxError, EOF ...)
    raise UserError(f'{where} has a damaged npy header ({type(e).__name__}: '
                    f'{str(e)[:200]}). Download the file again.') from None
  if dtype.hasobject or dtype.kind not in 'biuf' or dtype.fields is not None or dtype.subdtype:
    raise UserError(f'{where} has dtype {dtype}: jkd reads numeric arrays only (no object or '
                    'structured arrays, which could hold pickled Python objects).')
  if dtype.byteorder == '>':
    dtype = dtype.newbyteorder('<')
    swap = True
  else:
    swap = False
  shape = checked.dims(list(shape), f'{where}: shape')
  start = f.tell()
  need = math.prod(shape) * dtype.itemsize
  if len(raw) - start != need:
    raise UserError(f'{where} claims shape {tuple(shape)} of {dtype} ({need} bytes) but holds '
                    f'{len(raw) - start} bytes: the file is damaged.')
  if fortran:
    arr = _copy_out(raw, start, dtype.newbyteorder('>') if swap else dtype,
                    shape[::-1]).transpose()
  else:
    arr = _copy_out(raw, start, dtype.newbyteorder('>') if swap else dtype, shape)
  arr = arr.astype(dtype) if swap else arr
  return np.array(arr, order='C')  # (np.ascontiguousarray would make a 0-d array 1-d)


# ---------------------------------------------------------------- the state dict


def _unwrap(obj: Any, path: str) -> dict[str, np.ndarray]:
  """The flat {name: array} state dict inside a loaded checkpoint."""
  if isinstance(obj, dict):
    for key in NESTED_KEYS:  # {'model': state_dict, 'epoch': ..., 'optimizer': ...}
      inner = obj.get(key)
      if isinstance(inner, dict) and any(isinstance(v, np.ndarray) for v in inner.values()):
        obj = inner
        break
  if not isinstance(obj, dict):
    raise UserError(f'{path!r} holds a {type(obj).__name__}, not a state dict of tensors.')
  out = {}
  for name, value in obj.items():
    if isinstance(value, np.ndarray):
      if not isinstance(name, str):
        raise UserError(f'{path!r} names a tensor {str(name)[:80]}, not a string: the file is '
                        'damaged.')
      out[name[len('module.'):] if name.startswith('module.') else name] = value
  return out


def describe(tensors: dict[str, np.ndarray], limit: int = 12) -> str:
  """'name (shape), ...' of the first `limit` tensors, for error messages."""
  names = sorted(tensors)
  shown = ', '.join(f'{n} {tuple(tensors[n].shape)}' for n in names[:limit])
  return shown + (f', ... ({len(names)} tensors)' if len(names) > limit else '')


def safetensors_metadata(path: str) -> dict:
  """The free-form `__metadata__` of a safetensors header ({} for other formats)."""
  data = read_file(path)
  if not _is_safetensors(data):
    return {}
  header, _ = _safetensors_header(data, path)
  meta = header.get('__metadata__')
  return dict(meta) if isinstance(meta, dict) else {}
