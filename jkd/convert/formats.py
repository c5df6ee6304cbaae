"""Reading a checkpoint file into named numpy arrays, whatever format the hub shipped it in.

  tensors, fmt = read_tensors('deit_small_patch16_224.safetensors')   # {'blocks.0.attn...': ...}

Formats, detected from the file's bytes (not its name):
  safetensors   timm and Hugging Face hub files (header checked here, then numpy views copied).
  pytorch       a `torch.save` zip (`.pth`, `.pt`, `.bin`), read by jkd's own weights-only
                reader (below), with or without torch installed.
  npz           numpy's `.npz`: big_vision checkpoints, keys joined with '/'.

Every file is untrusted (users import files from public hubs), so every reader checks what the
file claims against what it holds before it reads a byte on that claim:
  - only a regular file is read (a directory, a FIFO, /dev/zero or a symlink loop is refused
    before it is opened), at most its stat size, and at most `MAX_FILE_BYTES`;
  - a zip (`.pth`, `.npz`) is refused if its members declare more uncompressed bytes than a
    cap tied to the file's size (a deflate bomb), an unknown compression or encryption; each
    member read yields exactly its declared size;
  - the pickle of a `.pth` is run by `_unpickle`, a small interpreter of the pickle opcodes a
    state dict uses, which builds only dicts, lists, tuples, strings, numbers and tensors: no
    Python object of the file's choosing is ever created or called;
  - a tensor is rebuilt from its storage only after proving that every element it reaches
    (offset + sum((size_i - 1) * stride_i)) lies inside that storage, with non-negative
    integer sizes, strides and offset and no more elements than the storage holds (a stride-0
    tensor cannot expand 4 bytes into gigabytes);
  - all the tensors of a `.pth` together hold at most twice its archive's bytes (a storage
    viewed thousands of times is refused), and safetensors tensors may not share bytes;
  - safetensors offsets and npy headers must describe exactly the bytes that are there, with
    numeric dtypes only (no object arrays, no pickles).
So file bytes can never turn into an out-of-bounds read, and memory stays a small multiple of
the file's size. Every refusal is a `UserError` naming the file and the field.

Why jkd's reader before `torch.load`: it is the one whose bounds are checked here and tested by
tests/test_fuzz_checkpoints.py on mutated files. `torch.load(weights_only=True)` is used only
when torch is installed and the file uses a pickle construct jkd's reader does not know (a
tensor subclass, a newer rebuild function), after the same archive limits.

A state dict nested under 'model', 'state_dict', 'module' or 'params' (MAE, DeiT and SimMIM
checkpoints keep theirs under 'model') is unwrapped, and DistributedDataParallel's 'module.'
prefix is dropped. Everything else a checkpoint holds beside the tensors (epoch, optimizer
state) is ignored.

This module imports numpy and the standard library only (no jax): the fuzz test runs it in
small child processes under memory limits.
"""
from __future__ import annotations

import collections
import errno
import io
import json
import math
import os
import pickletools
import re
import stat
import struct
import zipfile
from typing import Any

import numpy as np

from jkd import storage
from jkd.errors import UserError

NESTED_KEYS = ('model', 'state_dict', 'module', 'params', 'model_state')
# torch storage class name -> numpy dtype name (bfloat16 through ml_dtypes, which jax ships).
_STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'LongStorage': 'int64', 'IntStorage': 'int32', 'ShortStorage': 'int16',
    'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'BFloat16Storage': 'bfloat16',
}
# safetensors dtype -> numpy dtype name.
_SAFETENSORS_DTYPES = {
    'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
    'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8',
    'U64': 'uint64', 'U32': 'uint32', 'U16': 'uint16', 'U8': 'uint8', 'BOOL': 'bool',
}

# Limits. A checkpoint file jkd reads whole into memory: 64 GiB is above every public vision
# model (ViT-22B's bf16 weights are 44 GB).
MAX_FILE_BYTES = 64 << 30
# A zip's members may declare at most this many uncompressed bytes per byte of file, plus a
# constant: torch writes its members stored (ratio 1) and np.savez too; np.savez_compressed of
# float weights compresses about 1.1x. Deflate reaches 1000x, so a bomb is refused.
MAX_ZIP_RATIO = 16
ZIP_SLACK_BYTES = 64 << 20
MAX_ZIP_MEMBERS = 1 << 20
MAX_HEADER_BYTES = 100 << 20    # a safetensors JSON header, a .pth's data.pkl
MAX_DIMS = 32


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
    archive = _open_zip(data, path)
    names = archive.namelist()
    if any(n.endswith('data.pkl') for n in names):
      tensors, fmt = _read_pytorch(archive, data, path), 'pytorch'
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


# ---------------------------------------------------------------- zip archives (.pth, .npz)


def _open_zip(data: bytes, path: str) -> zipfile.ZipFile:
  """The archive, after checking every member's declared sizes, compression and flags."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = archive.infolist()
  except Exception as e:  # pylint: disable=broad-except  (BadZipFile, struct.error, ...)
    raise _damaged(path, 'its zip directory', e) from None
  if len(infos) > MAX_ZIP_MEMBERS:
    raise UserError(f'{path!r} is a zip of {len(infos)} members, more than a checkpoint has '
                    f'({MAX_ZIP_MEMBERS}).')
  total = 0
  for info in infos:
    if info.flag_bits & 0x1:
      raise UserError(f'{path!r}: zip member {info.filename!r} is encrypted; a checkpoint is '
                      'not.')
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
      raise UserError(f'{path!r}: zip member {info.filename!r} uses compression method '
                      f'{info.compress_type}; torch and numpy write stored or deflated members '
                      'only.')
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
      raise UserError(f'{path!r}: stored zip member {info.filename!r} declares {info.file_size} '
                      f'bytes but holds {info.compress_size}: the file is damaged.')
    total += info.file_size
  cap = min(MAX_FILE_BYTES, MAX_ZIP_RATIO * len(data) + ZIP_SLACK_BYTES)
  if total > cap:
    raise UserError(f'{path!r}: its zip members declare {total:,} uncompressed bytes from a '
                    f'file of {len(data):,} bytes (at most {cap:,} are read): a decompression '
                    'bomb, or a damaged file. Nothing was decompressed.')
  return archive


def _member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
  """Exactly the declared bytes of one member (CRC checked by zipfile), or a UserError."""
  try:
    info = archive.getinfo(name)
    with archive.open(info) as f:
      raw = f.read(info.file_size + 1)
  except KeyError:
    raise UserError(f'{path!r} lacks the zip member {name!r} that its index names: the file is '
                    'incomplete or damaged.') from None
  except Exception as e:  # pylint: disable=broad-except  (BadZipFile CRC, zlib.error, EOF)
    raise _damaged(path, f'zip member {name!r}', e) from None
  if len(raw) != info.file_size:
    raise UserError(f'{path!r}: zip member {name!r} holds {len(raw)} bytes, not the '
                    f'{info.file_size} it declares: the file is damaged.')
  return raw


def _damaged(path: str, where: str, e: BaseException) -> UserError:
  detail = str(e).splitlines()[0][:200] if str(e) else ''
  return UserError(f'{path!r} is damaged or truncated ({where}: {type(e).__name__}'
                   f'{": " + detail if detail else ""}). Download it again.')


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
    raise _damaged(path, 'its safetensors header', e) from None
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
    shape = _dims(entry.get('shape'), f'{where}: shape')
    offsets = entry.get('data_offsets')
    if not (isinstance(offsets, list) and len(offsets) == 2):
      raise UserError(f'{where}: data_offsets {offsets!r} is not a [begin, end] pair.')
    begin, end = (_index(v, f'{where}: data_offsets') for v in offsets)
    dt = _dtype(dtype)
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


def _dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _index(value: Any, where: str) -> int:
  """A non-negative int (not a bool, float or a number beyond int64) or a UserError."""
  if type(value) is not int or not 0 <= value < 2**62:  # pylint: disable=unidiomatic-typecheck
    raise UserError(f'{where} holds {value!r}, not a non-negative integer: the file is damaged.')
  return value


def _dims(value: Any, where: str) -> list[int]:
  if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS:
    raise UserError(f'{where} {value!r} is not a list of at most {MAX_DIMS} sizes: the file is '
                    'damaged.')
  dims = [_index(v, where) for v in value]
  if math.prod(dims) > MAX_FILE_BYTES:
    raise UserError(f'{where} {tuple(dims)} claims more elements than a file holds: the file '
                    'is damaged.')
  return dims


# ---------------------------------------------------------------- npz


def _read_npz(archive: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
  """Every array of an .npz: each member's npy header checked (numeric dtype, shape, exactly
  the bytes it needs) before its data is viewed; never np.load (which allocates what the
  header claims before reading)."""
  out = {}
  for name in archive.namelist():
    raw = _member(archive, name, path)
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
  shape = _dims(list(shape), f'{where}: shape')
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


# ---------------------------------------------------------------- PyTorch


class _Unsupported(UserError):
  """A pickle construct jkd's reader does not know (torch.load may, when installed)."""


def _refused(path: str, what: str, cls=UserError) -> UserError:
  return cls(
      f'{path!r} holds Python objects besides tensors ({what}), which a weights-only load does '
      'not execute: jkd never unpickles arbitrary objects. If you trust the file, keep only its '
      'state dict, e.g. torch.save(torch.load(f, weights_only=False)["model"], "model.pth"), '
      'or convert it to safetensors.')


def _read_pytorch(archive: zipfile.ZipFile, data: bytes, path: str) -> dict:
  """A torch.save zip by jkd's reader; torch.load(weights_only=True) for what it does not
  know, when torch is installed."""
  try:
    return _read_pytorch_zip(archive, path)
  except _Unsupported as e:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(str(e)) from None
    unsupported = e
  try:
    obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (UnpicklingError, RuntimeError ...)
    if 'weights_only' in str(e) or 'Unsupported' in str(e):
      raise UserError(str(unsupported)) from None
    raise _damaged(path, 'torch.load', e) from None
  return _to_numpy(obj)


def _to_numpy(obj):
  """torch tensors -> numpy, through containers; other leaves kept (torch.load's output)."""
  if hasattr(obj, 'detach') and hasattr(obj, 'numpy'):
    t = obj.detach().cpu()
    if str(t.dtype) == 'torch.bfloat16':
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      return t.view(dtype=__import__('torch').int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  if isinstance(obj, dict):
    return {k: _to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v) for v in obj)
  return obj


def _read_pytorch_zip(archive: zipfile.ZipFile, path: str) -> dict:
  pkls = [n for n in archive.namelist() if n.endswith('data.pkl')]
  pkl = pkls[0]
  prefix = pkl[:-len('data.pkl')]
  order = f'{prefix}byteorder'
  if order in archive.namelist():
    byteorder = _member(archive, order, path).strip()
    if byteorder not in (b'little', b''):
      raise UserError(f'{path!r} was saved on a {byteorder[:10].decode("latin-1")!r}-endian '
                      'machine; jkd reads little-endian checkpoints. Re-save it on x86 or ARM.')
  info = archive.getinfo(pkl)
  if info.file_size > MAX_HEADER_BYTES:
    raise UserError(f'{path!r}: its data.pkl declares {info.file_size:,} bytes, more than a state '
                    f'dict\'s pickle ({MAX_HEADER_BYTES:,}).')
  storages = _Storages(archive, prefix, path)
  return _unpickle(_member(archive, pkl, path), storages, path)


class _Storages:
  """The archive's storages as flat numpy arrays, each read once, its byte size checked against
  the element count the pickle claims."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
    self.archive, self.prefix, self.path = archive, prefix, path
    self.cache: dict[str, np.ndarray] = {}
    # Tensors may view a storage more than once (tied weights, q/k/v views of one fused
    # parameter), but a pickle that rebuilds one storage thousands of times would multiply
    # memory: all tensors together may hold at most twice the archive's bytes (+ 64 MiB).
    self.budget = 2 * sum(i.file_size for i in archive.infolist()) + (64 << 20)

  def spend(self, nbytes: int, where: str) -> None:
    """Counts a rebuilt tensor's bytes against the budget."""
    self.budget -= nbytes
    if self.budget < 0:
      raise UserError(f'{where}: the pickle rebuilds more tensor bytes than twice the archive '
                      'holds (a storage viewed over and over): the file is damaged or made to '
                      'exhaust memory.')

  def load(self, pid) -> np.ndarray:
    where = f'{self.path!r}: storage reference {str(pid)[:120]}'
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise _refused(self.path, f'a persistent id {str(pid)[:80]}', _Unsupported)
    _, storage_type, key, _location, numel = pid
    if not (isinstance(storage_type, _Global) and storage_type.module == 'torch'
            and storage_type.name in _STORAGE_DTYPES):
      raise _refused(self.path, f'a storage of {str(storage_type)[:80]}', _Unsupported)
    if not (isinstance(key, str) and re.fullmatch(r'[0-9A-Za-z_.-]{1,64}', key)):
      raise UserError(f'{where}: the key {str(key)[:80]!r} is not a storage name.')
    numel = _index(numel, f'{where}: element count')
    dt = _dtype(_STORAGE_DTYPES[storage_type.name])
    if key in self.cache:
      flat = self.cache[key]
      if flat.dtype != dt or flat.size != numel:
        raise UserError(f'{where}: storage {key!r} is referenced as {dt} of {numel} elements '
                        f'and as {flat.dtype} of {flat.size}: the file is damaged.')
      return flat
    raw = _member(self.archive, f'{self.prefix}data/{key}', self.path)
    if len(raw) != numel * dt.itemsize:
      raise UserError(f'{where}: storage {key!r} claims {numel} elements of {dt} '
                      f'({numel * dt.itemsize} bytes) but holds {len(raw)} bytes: the file is '
                      'damaged.')
    flat = np.frombuffer(raw, dtype=np.uint8)
    flat = (flat != 0) if dt == np.bool_ else flat.view(dt)
    self.cache[key] = flat
    return flat


class _Global:
  """A global the pickle names (`module.name`): only data, never imported or called."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __repr__(self):
    return f'{self.module}.{self.name}'


_TENSOR_REBUILDS = {('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_tensor')}
_PARAMETER_REBUILDS = {('torch._utils', '_rebuild_parameter'),
                       ('torch._utils', '_rebuild_parameter_with_state')}


def _global(module: Any, name: Any, path: str) -> _Global:
  """The globals a state dict names: tensor and parameter rebuilds, storage types,
  OrderedDict. Any other is refused (never imported)."""
  if not (isinstance(module, str) and isinstance(name, str)):
    raise UserError(f'{path!r}: its pickle names a global that is not a string: damaged.')
  key = (module, name)
  if (key in _TENSOR_REBUILDS or key in _PARAMETER_REBUILDS
      or key == ('collections', 'OrderedDict')
      or (module == 'torch' and name in _STORAGE_DTYPES)):
    return _Global(module, name)
  raise _refused(path, f'{module[:80]}.{name[:80]}', _Unsupported)


def _reduce(fn: Any, args: Any, storages: _Storages, path: str, name: Any = None):
  """REDUCE (fn(*args)) for the few callables a state dict uses."""
  if not isinstance(fn, _Global) or not isinstance(args, tuple):
    raise UserError(f'{path!r}: its pickle calls {str(fn)[:80]}, not a known rebuild '
                    'function: the file is damaged.')
  key = (fn.module, fn.name)
  if key == ('collections', 'OrderedDict'):
    if args:
      raise _refused(path, 'an OrderedDict built from arguments', _Unsupported)
    return collections.OrderedDict()
  if key in _TENSOR_REBUILDS:
    if len(args) < 4:
      raise UserError(f'{path!r}: a tensor rebuild has {len(args)} arguments, not 4 or more: '
                      'the file is damaged.')
    tensor = rebuild_tensor(args[0], args[1], args[2], args[3], path,
                            name if isinstance(name, str) else None)
    storages.spend(tensor.nbytes, f'{path!r}: tensor {str(name)[:100]!r}')
    return tensor
  if key in _PARAMETER_REBUILDS:
    if not args or not isinstance(args[0], np.ndarray):
      raise UserError(f'{path!r}: a parameter rebuild is not given a tensor: the file is '
                      'damaged.')
    return args[0]
  raise _refused(path, f'a call of {fn}', _Unsupported)


def rebuild_tensor(flat: Any, offset: Any, size: Any, stride: Any, path: str,
                   name: str | None = None) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 on a flat numpy storage, bounds proven first.

  The tensor of `size` reads flat[offset + sum(i_k * stride_k)] for every index i. It is built
  only if offset, sizes and strides are non-negative ints of one length, it has no more
  elements than the storage (a stride-0 claim cannot multiply memory), and its largest index
  offset + sum((size_k - 1) * stride_k) is inside the storage: then every element it reads
  lies in `flat`, and the strided view below (on exactly that range) is a copy of them.
  `name` (the state-dict key the pickle pushed just before, when there is one) is for messages.
  """
  where = f'{path!r}: tensor {name[:100]!r}' if name else f'{path!r}: a tensor'
  if not isinstance(flat, np.ndarray) or flat.ndim != 1:
    raise UserError(f'{where} is rebuilt from {type(flat).__name__}, not a storage: the file is '
                    'damaged.')
  offset = _index(offset, f'{where}: storage offset')
  size = _dims(size, f'{where}: size')
  if not isinstance(stride, (list, tuple)) or len(stride) != len(size):
    raise UserError(f'{where}: stride {str(stride)[:80]} does not match its size {tuple(size)}: '
                    'the file is damaged.')
  stride = [_index(s, f'{where}: stride') for s in stride]
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, flat.dtype)
  if numel > flat.size:
    raise UserError(f'{where} of size {tuple(size)} ({numel} elements) is larger than its '
                    f'storage ({flat.size} elements): the file is damaged.')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise UserError(f'{where} of size {tuple(size)}, stride {tuple(stride)} at offset {offset} '
                    f'reaches element {last} of a storage of {flat.size}: the file is damaged '
                    '(jkd never reads outside a storage).')
  # Proven: 0 <= offset + sum(i_k * stride_k) <= last < flat.size for every index. A dim of
  # size 1 contributes nothing, so its stride (arbitrary in the file) is set to 0.
  window = flat[offset:last + 1]
  contiguous = all(s == math.prod(size[k + 1:]) for k, (n, s) in enumerate(zip(size, stride))
                   if n > 1)
  if contiguous:
    return window[:numel].reshape(size).copy()
  strides = tuple((s if n > 1 else 0) * flat.itemsize for n, s in zip(size, stride))
  view = np.lib.stride_tricks.as_strided(window, shape=tuple(size), strides=strides,
                                         writeable=False)
  return np.array(view)


# Pickle opcodes (pickletools names) of a state dict and what they push.
_PUSH = {'NONE': lambda a: None, 'NEWTRUE': lambda a: True, 'NEWFALSE': lambda a: False,
         'EMPTY_DICT': lambda a: {}, 'EMPTY_LIST': lambda a: [], 'EMPTY_TUPLE': lambda a: ()}
_VALUES = {'BININT', 'BININT1', 'BININT2', 'INT', 'LONG', 'LONG1', 'LONG4', 'BINFLOAT', 'FLOAT',
           'BINUNICODE', 'SHORT_BINUNICODE', 'BINUNICODE8', 'UNICODE', 'BINSTRING',
           'SHORT_BINSTRING', 'STRING', 'BINBYTES', 'SHORT_BINBYTES', 'BINBYTES8'}


def _unpickle(pkl: bytes, storages: _Storages, path: str) -> Any:
  """Runs a pickle over plain data only.

  `pickletools.genops` parses the opcodes (each argument read from the bytes that are there,
  never a claimed length allocated); this loop executes the subset a torch state dict uses.
  Globals are `_Global` records, never imported; REDUCE builds only an OrderedDict or a
  tensor (`rebuild_tensor`); BINPERSID loads a storage. Every object it makes is a dict, list,
  tuple, str, bytes, number or ndarray; the work is linear in the pickle's size.
  """
  stack: list = []
  marks: list = []
  memo: dict = {}
  try:
    for op, arg, _ in pickletools.genops(io.BytesIO(pkl)):
      name = op.name
      if name in _PUSH:
        stack.append(_PUSH[name](arg))
      elif name in _VALUES:
        stack.append(arg)
      elif name in ('PROTO', 'FRAME'):
        pass
      elif name == 'MARK':
        marks.append(stack)
        stack = []
      elif name in ('TUPLE', 'LIST', 'DICT'):
        items, stack = stack, marks.pop()
        if name == 'DICT':
          stack.append(dict(zip(items[::2], items[1::2])) if len(items) % 2 == 0 else _bad())
        else:
          stack.append(tuple(items) if name == 'TUPLE' else items)
      elif name in ('TUPLE1', 'TUPLE2', 'TUPLE3'):
        n = int(name[-1])
        if len(stack) < n:
          _bad()
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)
      elif name == 'APPEND':
        value = stack.pop()
        _container(stack[-1], list).append(value)
      elif name == 'APPENDS':
        items, stack = stack, marks.pop()
        _container(stack[-1], list).extend(items)
      elif name == 'SETITEM':
        value, key = stack.pop(), stack.pop()
        _container(stack[-1], dict)[key] = value
      elif name == 'SETITEMS':
        items, stack = stack, marks.pop()
        if len(items) % 2:
          _bad()
        target = _container(stack[-1], dict)
        for k, v in zip(items[::2], items[1::2]):
          target[k] = v
      elif name in ('BINPUT', 'LONG_BINPUT', 'PUT'):
        memo[arg] = stack[-1]
      elif name == 'MEMOIZE':
        memo[len(memo)] = stack[-1]
      elif name in ('BINGET', 'LONG_BINGET', 'GET'):
        stack.append(memo[arg])
      elif name == 'GLOBAL':
        module, _, attr = arg.partition(' ')
        stack.append(_global(module, attr, path))
      elif name == 'STACK_GLOBAL':
        attr, module = stack.pop(), stack.pop()
        stack.append(_global(module, attr, path))
      elif name == 'REDUCE':
        args, fn = stack.pop(), stack.pop()
        stack.append(_reduce(fn, args, storages, path, stack[-1] if stack else None))
      elif name == 'BUILD':
        state = stack.pop()
        # An OrderedDict's attributes (torch's `_metadata` of a state dict): not needed.
        if not isinstance(stack[-1], collections.OrderedDict):
          raise _refused(path, f'state set on a {type(stack[-1]).__name__}', _Unsupported)
        del state
      elif name == 'BINPERSID':
        stack.append(storages.load(stack.pop()))
      elif name == 'POP':
        stack.pop()
      elif name == 'POP_MARK':
        stack = marks.pop()
      elif name == 'DUP':
        stack.append(stack[-1])
      elif name == 'STOP':
        if len(stack) != 1 or marks:
          _bad()
        return stack[0]
      else:
        raise _refused(path, f'the pickle opcode {name}', _Unsupported)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a malformed pickle, in any way)
    raise _damaged(path, 'its data.pkl', e) from None
  raise UserError(f'{path!r}: its data.pkl ends without STOP: the file is truncated.')


def _bad():
  raise ValueError('malformed pickle (stack or mark mismatch)')


def _container(obj, kind):
  if not isinstance(obj, kind):
    raise ValueError(f'an item added to a {type(obj).__name__}, not a {kind.__name__}')
  return obj


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
