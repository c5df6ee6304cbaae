"""The limits every checkpoint reader enforces, and the checked primitives the readers share.

A zip (`.pth`, `.npz`) is refused before anything is decompressed if its members declare more
uncompressed bytes than a cap tied to the file's size (a deflate bomb), an unknown compression
or encryption; each member read yields exactly its declared size. Integers and shapes taken
from a file are non-negative ints (no bools, floats or numbers beyond int64) with at most
`MAX_DIMS` dims and no more elements than a file can hold. Every refusal is a `UserError`
naming the file and the field.

Its own module so that `formats` (which dispatches) and `pth` (the PyTorch reader) share these
without importing each other. numpy and the standard library only (no jax).
"""
from __future__ import annotations

import io
import math
import zipfile
from typing import Any

import numpy as np

from jkd.errors import UserError

# A checkpoint file jkd reads whole into memory: 64 GiB is above every public vision
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


# ---------------------------------------------------------------- zip archives (.pth, .npz)


def open_zip(data: bytes, path: str) -> zipfile.ZipFile:
  """The archive, after checking every member's declared sizes, compression and flags."""
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = archive.infolist()
  except Exception as e:  # pylint: disable=broad-except  (BadZipFile, struct.error, ...)
    raise damaged(path, 'its zip directory', e) from None
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


def member(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
  """Exactly the declared bytes of one member (CRC checked by zipfile), or a UserError."""
  try:
    info = archive.getinfo(name)
    with archive.open(info) as f:
      raw = f.read(info.file_size + 1)
  except KeyError:
    raise UserError(f'{path!r} lacks the zip member {name!r} that its index names: the file is '
                    'incomplete or damaged.') from None
  except Exception as e:  # pylint: disable=broad-except  (BadZipFile CRC, zlib.error, EOF)
    raise damaged(path, f'zip member {name!r}', e) from None
  if len(raw) != info.file_size:
    raise UserError(f'{path!r}: zip member {name!r} holds {len(raw)} bytes, not the '
                    f'{info.file_size} it declares: the file is damaged.')
  return raw


def damaged(path: str, where: str, e: BaseException) -> UserError:
  """The UserError for a file a parser choked on (`e`, its first line), at `where`."""
  detail = str(e).splitlines()[0][:200] if str(e) else ''
  return UserError(f'{path!r} is damaged or truncated ({where}: {type(e).__name__}'
                   f'{": " + detail if detail else ""}). Download it again.')


# ---------------------------------------------------------------- values from a file


def numpy_dtype(name: str) -> np.dtype:
  """np.dtype of a name; bfloat16 through ml_dtypes (which jax ships)."""
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def index(value: Any, where: str) -> int:
  """A non-negative int (not a bool, float or a number beyond int64) or a UserError."""
  if type(value) is not int or not 0 <= value < 2**62:  # pylint: disable=unidiomatic-typecheck
    raise UserError(f'{where} holds {value!r}, not a non-negative integer: the file is damaged.')
  return value


def dims(value: Any, where: str) -> list[int]:
  """A shape: at most `MAX_DIMS` `index` sizes, no more elements than a file can hold."""
  if not isinstance(value, (list, tuple)) or len(value) > MAX_DIMS:
    raise UserError(f'{where} {value!r} is not a list of at most {MAX_DIMS} sizes: the file is '
                    'damaged.')
  sizes = [index(v, where) for v in value]
  if math.prod(sizes) > MAX_FILE_BYTES:
    raise UserError(f'{where} {tuple(sizes)} claims more elements than a file holds: the file '
                    'is damaged.')
  return sizes
