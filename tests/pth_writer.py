"""torch.save's zip layout written without torch, with every field under the test's control.

  write_pth(path, {'w': TensorSpec.of(np.ones((2, 3), np.float32))})

A file as torch.save (protocol 2, `_use_new_zipfile_serialization`) writes it: ARCHIVE/data.pkl
holds the state dict pickled with persistent ids ('storage', torch.FloatStorage, key, 'cpu',
numel) for the storages, each tensor a `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, backward_hooks)` call; ARCHIVE/data/KEY holds each storage's raw
little-endian bytes; ARCHIVE/version and ARCHIVE/byteorder as torch writes them. The pickle is
emitted opcode by opcode, so a test can claim any offset, size, stride or element count
(negative, huge, inconsistent) over any storage bytes.
"""
from __future__ import annotations

import dataclasses
import struct
import zipfile

import numpy as np

STORAGE_TYPES = {'float32': 'FloatStorage', 'float64': 'DoubleStorage', 'float16': 'HalfStorage',
                 'int64': 'LongStorage', 'int32': 'IntStorage', 'int16': 'ShortStorage',
                 'int8': 'CharStorage', 'uint8': 'ByteStorage', 'bool': 'BoolStorage',
                 'bfloat16': 'BFloat16Storage'}


@dataclasses.dataclass
class TensorSpec:
  """One tensor of the state dict: storage `key` holding `data` (raw bytes) of `dtype`; the
  pickle claims `numel` storage elements and the view (offset, size, stride)."""
  key: str
  dtype: str
  data: bytes
  numel: int
  offset: int
  size: tuple
  stride: tuple

  @classmethod
  def of(cls, array: np.ndarray, key: str | None = None) -> 'TensorSpec':
    """A contiguous tensor as torch.save writes it."""
    array = np.ascontiguousarray(array)
    size = tuple(array.shape)
    stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return cls(key or '0', str(array.dtype), array.tobytes(), array.size, 0, size, stride)


def _int(v: int) -> bytes:
  if 0 <= v < 256:
    return b'K' + bytes([v])
  if 0 <= v < 65536:
    return b'M' + struct.pack('<H', v)
  if -2**31 <= v < 2**31:
    return b'J' + struct.pack('<i', v)
  n = (v.bit_length() + 8) // 8
  return b'\x8a' + bytes([n]) + v.to_bytes(n, 'little', signed=True)  # LONG1


def _str(s: str) -> bytes:
  b = s.encode('utf-8')
  return b'X' + struct.pack('<I', len(b)) + b


def _tuple(values) -> bytes:
  return b'(' + b''.join(_int(v) for v in values) + b't'


def _global(module: str, name: str) -> bytes:
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def pickle_state_dict(tensors: dict, nest: str | None = 'model') -> bytes:
  """The data.pkl of {name: TensorSpec} (under {nest: ...} as MAE and DeiT files are)."""
  od = _global('collections', 'OrderedDict') + b')R'
  out = [b'\x80\x02']
  if nest:
    out.append(b'}' + _str(nest))
  out.append(od + b'(')
  for name, t in tensors.items():
    pid = (b'(' + _str('storage') + _global('torch', STORAGE_TYPES[t.dtype]) + _str(t.key)
           + _str('cpu') + _int(t.numel) + b't')
    out.append(_str(name) + _global('torch._utils', '_rebuild_tensor_v2') + b'(' + pid + b'Q'
               + _int(t.offset) + _tuple(t.size) + _tuple(t.stride) + b'\x89' + od + b'tR')
  out.append(b'u')  # SETITEMS
  if nest:
    out.append(b's')  # SETITEM
  out.append(b'.')
  return b''.join(out)


def write_pth(path: str, tensors: dict, *, nest: str | None = 'model',
              archive: str = 'archive', compression: int = zipfile.ZIP_STORED) -> None:
  """A torch.save zip of {name: TensorSpec} at `path`."""
  with zipfile.ZipFile(path, 'w', compression) as z:
    z.writestr(f'{archive}/data.pkl', pickle_state_dict(tensors, nest))
    z.writestr(f'{archive}/byteorder', 'little')
    written = set()
    for t in tensors.values():
      if t.key not in written:
        z.writestr(f'{archive}/data/{t.key}', t.data)
        written.add(t.key)
    z.writestr(f'{archive}/version', '3\n')
