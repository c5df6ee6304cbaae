"""Reading a checkpoint file into named numpy arrays, whatever format the hub shipped it in.

  tensors, fmt = read_tensors('deit_small_patch16_224.safetensors')   # {'blocks.0.attn...': ...}

Formats, detected from the file's bytes (not its name):
  safetensors   `safetensors.numpy` (no torch needed): timm and Hugging Face hub files.
  pytorch       a `torch.save` zip (`.pth`, `.pt`, `.bin`): read with
                `torch.load(weights_only=True)` when torch is installed, else with jkd's own
                reader of the same zip layout, which like weights_only accepts only tensors,
                storages and plain containers, and never runs any other pickled object.
  npz           numpy's `.npz`: big_vision checkpoints, keys joined with '/'.

A state dict nested under 'model', 'state_dict', 'module' or 'params' (MAE, DeiT and SimMIM
checkpoints keep theirs under 'model') is unwrapped, and DistributedDataParallel's 'module.'
prefix is dropped. Everything else a checkpoint holds beside the tensors (epoch, optimizer
state) is ignored.
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from jkd import storage
from jkd.errors import UserError

NESTED_KEYS = ('model', 'state_dict', 'module', 'params', 'model_state')
# torch storage class name -> numpy dtype (bfloat16 through ml_dtypes, which jax ships).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'BFloat16Storage': 'bfloat16',
}


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Returns ({name: array}, format) of a checkpoint file; arrays as stored (fp16 stays fp16).

  Raises:
    UserError: a missing file, a format that is none of the above, a pickle with Python
      objects a weights-only load refuses, or a file without any tensor.
  """
  if not storage.isfile(path):
    raise UserError(f'--checkpoint {path!r} does not exist.')
  data = storage.read_bytes(path)
  if _is_safetensors(data):
    tensors, fmt = _read_safetensors(data, path), 'safetensors'
  elif data[:4] == b'PK\x03\x04':
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    if any(n.endswith('data.pkl') for n in names):
      tensors, fmt = _read_pytorch(data, path), 'pytorch'
    elif names and all(n.endswith('.npy') for n in names):
      with np.load(io.BytesIO(data), allow_pickle=False) as f:
        tensors, fmt = {k: f[k] for k in f.files}, 'npz'
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


def _is_safetensors(data: bytes) -> bool:
  if len(data) < 10:
    return False
  (n,) = struct.unpack('<Q', data[:8])
  return 2 <= n <= len(data) - 8 and data[8:9] == b'{'


def _read_safetensors(data: bytes, path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    return dict(load(data))
  except Exception as e:  # pylint: disable=broad-except  (a corrupt header, an odd dtype)
    raise UserError(f'{path!r} looks like safetensors but cannot be read: '
                    f'{type(e).__name__}: {e}') from e


def _read_pytorch(data: bytes, path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _read_pytorch_zip(data, path)
  try:
    obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise _refused(path, str(e).splitlines()[0]) from e
  return _to_numpy(obj)


def _to_numpy(obj):
  """torch tensors -> numpy, through containers; other leaves kept."""
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


def _refused(path: str, what: str) -> UserError:
  return UserError(
      f'{path!r} holds Python objects besides tensors ({what}), which a weights-only load does '
      'not execute: jkd never unpickles arbitrary objects. If you trust the file, keep only its '
      'state dict, e.g. torch.save(torch.load(f, weights_only=False)["model"], "model.pth"), '
      'or convert it to safetensors.')


class _WeightsOnlyUnpickler(pickle.Unpickler):
  """The subset of pickle a PyTorch state dict needs: tensors rebuilt from the archive's
  storages, OrderedDicts, plain containers and numbers. Any other global is refused."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, *_: data
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    raise _refused(self._path, f'{module}.{name}')

  def persistent_load(self, pid):
    kind, storage_type, key, _location, _numel = pid
    if kind != 'storage' or storage_type not in _STORAGE_DTYPES:
      raise _refused(self._path, f'a {kind} of {storage_type}')
    if key not in self._storages:
      dtype = _STORAGE_DTYPES[storage_type]
      if dtype == 'bfloat16':
        import ml_dtypes  # pylint: disable=g-import-not-at-top
        dtype = ml_dtypes.bfloat16
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._storages[key] = np.frombuffer(raw, dtype=dtype)
    return self._storages[key]


def _rebuild_tensor(flat: np.ndarray, offset: int, size, stride, *_):
  """torch._utils._rebuild_tensor_v2 on a numpy storage: a strided view, then a copy."""
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _read_pytorch_zip(data: bytes, path: str) -> dict:
  archive = zipfile.ZipFile(io.BytesIO(data))
  pkl = next(n for n in archive.namelist() if n.endswith('data.pkl'))
  prefix = pkl[:-len('data.pkl')]
  try:
    return _WeightsOnlyUnpickler(io.BytesIO(archive.read(pkl)), archive, prefix, path).load()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (truncated or corrupt archive)
    raise UserError(f'{path!r} is a damaged PyTorch checkpoint: {type(e).__name__}: {e}') from e


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
      out[name[len('module.'):] if name.startswith('module.') else name] = value
  return out


def describe(tensors: dict[str, np.ndarray], limit: int = 12) -> str:
  """'name (shape), ...' of the first `limit` tensors, for error messages."""
  names = sorted(tensors)
  shown = ', '.join(f'{n} {tuple(tensors[n].shape)}' for n in names[:limit])
  return shown + (f', ... ({len(names)} tensors)' if len(names) > limit else '')


def safetensors_metadata(path: str) -> dict:
  """The free-form `__metadata__` of a safetensors header ({} for other formats)."""
  data = storage.read_bytes(path)
  if not _is_safetensors(data):
    return {}
  (n,) = struct.unpack('<Q', data[:8])
  return dict(json.loads(data[8:8 + n]).get('__metadata__') or {})
