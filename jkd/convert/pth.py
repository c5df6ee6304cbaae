"""PyTorch `torch.save` zips (`.pth`, `.pt`, `.bin`) read weights-only, with or without torch.

A torch.save zip holds `<prefix>/data.pkl` (the pickled state dict), `<prefix>/data/<key>` (one
member per storage: its raw little-endian bytes) and optionally `<prefix>/byteorder`. The
pickle names tensors as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
with each storage a persistent id ('storage', type, key, location, numel).

The file is untrusted, so:
  - the pickle is run by `_unpickle`, a small interpreter over `pickletools.genops` of the
    opcodes a state dict uses, which builds only dicts, lists, tuples, strings, numbers and
    tensors: no Python object of the file's choosing is ever imported, created or called;
  - each storage's byte size must match the element count the pickle claims;
  - a tensor is rebuilt (`rebuild_tensor`) only after proving that every element it reaches
    (offset + sum((size_i - 1) * stride_i)) lies inside its storage, with non-negative integer
    sizes, strides and offset and no more elements than the storage holds (a stride-0 tensor
    cannot expand 4 bytes into gigabytes);
  - all the tensors together hold at most twice the archive's bytes (a storage viewed
    thousands of times is refused).

Why jkd's reader before `torch.load`: its bounds are checked here and tested by
tests/test_fuzz_checkpoints.py on mutated files. `torch.load(weights_only=True)` is used only
when torch is installed and the file uses a pickle construct this reader does not know (a
tensor subclass, a newer rebuild function), after the same archive limits (`formats` opened
the zip through `checked.open_zip`). numpy and the standard library only (no jax).
"""
from __future__ import annotations

import collections
import io
import math
import pickletools
import re
import zipfile
from typing import Any

import numpy as np

from jkd.convert import checked
from jkd.convert.checked import MAX_HEADER_BYTES
from jkd.errors import UserError

# torch storage class name -> numpy dtype name (bfloat16 through ml_dtypes, which jax ships).
_STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'LongStorage': 'int64', 'IntStorage': 'int32', 'ShortStorage': 'int16',
    'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'BFloat16Storage': 'bfloat16',
}


class _Unsupported(UserError):
  """A pickle construct jkd's reader does not know (torch.load may, when installed)."""


def _refused(path: str, what: str, cls=UserError) -> UserError:
  return cls(
      f'{path!r} holds Python objects besides tensors ({what}), which a weights-only load does '
      'not execute: jkd never unpickles arbitrary objects. If you trust the file, keep only its '
      'state dict, e.g. torch.save(torch.load(f, weights_only=False)["model"], "model.pth"), '
      'or convert it to safetensors.')


def read(archive: zipfile.ZipFile, data: bytes, path: str) -> dict:
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
    raise checked.damaged(path, 'torch.load', e) from None
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
    byteorder = checked.member(archive, order, path).strip()
    if byteorder not in (b'little', b''):
      raise UserError(f'{path!r} was saved on a {byteorder[:10].decode("latin-1")!r}-endian '
                      'machine; jkd reads little-endian checkpoints. Re-save it on x86 or ARM.')
  info = archive.getinfo(pkl)
  if info.file_size > MAX_HEADER_BYTES:
    raise UserError(f'{path!r}: its data.pkl declares {info.file_size:,} bytes, more than a state '
                    f'dict\'s pickle ({MAX_HEADER_BYTES:,}).')
  storages = _Storages(archive, prefix, path)
  return _unpickle(checked.member(archive, pkl, path), storages, path)


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
    numel = checked.index(numel, f'{where}: element count')
    dt = checked.numpy_dtype(_STORAGE_DTYPES[storage_type.name])
    if key in self.cache:
      flat = self.cache[key]
      if flat.dtype != dt or flat.size != numel:
        raise UserError(f'{where}: storage {key!r} is referenced as {dt} of {numel} elements '
                        f'and as {flat.dtype} of {flat.size}: the file is damaged.')
      return flat
    raw = checked.member(self.archive, f'{self.prefix}data/{key}', self.path)
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
  offset = checked.index(offset, f'{where}: storage offset')
  size = checked.dims(size, f'{where}: size')
  if not isinstance(stride, (list, tuple)) or len(stride) != len(size):
    raise UserError(f'{where}: stride {str(stride)[:80]} does not match its size {tuple(size)}: '
                    'the file is damaged.')
  stride = [checked.index(s, f'{where}: stride') for s in stride]
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
  never a claimed length allocated); `_Machine` executes the subset a torch state dict uses
  (`_OPCODES`). Globals are `_Global` records, never imported; REDUCE builds only an
  OrderedDict or a tensor (`rebuild_tensor`); BINPERSID loads a storage. Every object it makes
  is a dict, list, tuple, str, bytes, number or ndarray; the work is linear in the pickle's size.
  """
  machine = _Machine(storages, path)
  try:
    for op, arg, _ in pickletools.genops(io.BytesIO(pkl)):
      if op.name == 'STOP':
        return machine.stop()
      run = _OPCODES.get(op.name)
      if run is None:
        raise _refused(path, f'the pickle opcode {op.name}', _Unsupported)
      run(machine, op.name, arg)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a malformed pickle, in any way)
    raise checked.damaged(path, 'its data.pkl', e) from None
  raise UserError(f'{path!r}: its data.pkl ends without STOP: the file is truncated.')


class _Machine:
  """The pickle machine of `_unpickle`: its stack, the stacks saved by each MARK, the memo, and
  one handler per opcode group, each called as handler(opcode name, argument). A stack or memo
  that lacks what an opcode takes raises IndexError/KeyError (a damaged file)."""

  def __init__(self, storages: _Storages, path: str):
    self.stack: list = []
    self.marks: list = []
    self.memo: dict = {}
    self.storages, self.path = storages, path

  def _pop_mark(self) -> list:
    """The items pushed since the last MARK; the stack that MARK saved is current again."""
    items, self.stack = self.stack, self.marks.pop()
    return items

  def constant(self, name, arg):  # NONE, NEWTRUE, EMPTY_DICT...
    self.stack.append(_PUSH[name](arg))

  def value(self, name, arg):  # ints, floats, strings, bytes
    self.stack.append(arg)

  def skip(self, name, arg):  # PROTO, FRAME
    pass

  def mark(self, name, arg):
    self.marks.append(self.stack)
    self.stack = []

  def pop_mark(self, name, arg):
    self.stack = self.marks.pop()

  def collection(self, name, arg):  # TUPLE, LIST, DICT of the items since MARK
    items = self._pop_mark()
    if name == 'DICT':
      self.stack.append(dict(zip(items[::2], items[1::2])) if len(items) % 2 == 0 else _bad())
    else:
      self.stack.append(tuple(items) if name == 'TUPLE' else items)

  def small_tuple(self, name, arg):  # TUPLE1, TUPLE2, TUPLE3
    n = int(name[-1])
    if len(self.stack) < n:
      _bad()
    items = tuple(self.stack[-n:])
    del self.stack[-n:]
    self.stack.append(items)

  def append(self, name, arg):
    value = self.stack.pop()
    _container(self.stack[-1], list).append(value)

  def appends(self, name, arg):
    items = self._pop_mark()
    _container(self.stack[-1], list).extend(items)

  def setitem(self, name, arg):
    value, key = self.stack.pop(), self.stack.pop()
    _container(self.stack[-1], dict)[key] = value

  def setitems(self, name, arg):
    items = self._pop_mark()
    if len(items) % 2:
      _bad()
    target = _container(self.stack[-1], dict)
    for k, v in zip(items[::2], items[1::2]):
      target[k] = v

  def put(self, name, arg):  # BINPUT, LONG_BINPUT, PUT
    self.memo[arg] = self.stack[-1]

  def memoize(self, name, arg):
    self.memo[len(self.memo)] = self.stack[-1]

  def get(self, name, arg):  # BINGET, LONG_BINGET, GET
    self.stack.append(self.memo[arg])

  def global_(self, name, arg):  # GLOBAL 'module name'
    module, _, attr = arg.partition(' ')
    self.stack.append(_global(module, attr, self.path))

  def stack_global(self, name, arg):
    attr, module = self.stack.pop(), self.stack.pop()
    self.stack.append(_global(module, attr, self.path))

  def reduce(self, name, arg):
    args, fn = self.stack.pop(), self.stack.pop()
    self.stack.append(_reduce(fn, args, self.storages, self.path,
                              self.stack[-1] if self.stack else None))

  def build(self, name, arg):
    state = self.stack.pop()
    # An OrderedDict's attributes (torch's `_metadata` of a state dict): not needed.
    if not isinstance(self.stack[-1], collections.OrderedDict):
      raise _refused(self.path, f'state set on a {type(self.stack[-1]).__name__}', _Unsupported)
    del state

  def persistent_load(self, name, arg):  # BINPERSID
    self.stack.append(self.storages.load(self.stack.pop()))

  def pop(self, name, arg):
    self.stack.pop()

  def dup(self, name, arg):
    self.stack.append(self.stack[-1])

  def stop(self) -> Any:
    """STOP: the one object left on the stack, with no MARK open."""
    if len(self.stack) != 1 or self.marks:
      _bad()
    return self.stack[0]


# Opcode name -> its `_Machine` handler: the only opcodes `_unpickle` runs (STOP aside).
_OPCODES = {
    **dict.fromkeys(_PUSH, _Machine.constant),
    **dict.fromkeys(_VALUES, _Machine.value),
    **dict.fromkeys(('PROTO', 'FRAME'), _Machine.skip),
    'MARK': _Machine.mark, 'POP_MARK': _Machine.pop_mark,
    **dict.fromkeys(('TUPLE', 'LIST', 'DICT'), _Machine.collection),
    **dict.fromkeys(('TUPLE1', 'TUPLE2', 'TUPLE3'), _Machine.small_tuple),
    'APPEND': _Machine.append, 'APPENDS': _Machine.appends,
    'SETITEM': _Machine.setitem, 'SETITEMS': _Machine.setitems,
    **dict.fromkeys(('BINPUT', 'LONG_BINPUT', 'PUT'), _Machine.put),
    'MEMOIZE': _Machine.memoize,
    **dict.fromkeys(('BINGET', 'LONG_BINGET', 'GET'), _Machine.get),
    'GLOBAL': _Machine.global_, 'STACK_GLOBAL': _Machine.stack_global,
    'REDUCE': _Machine.reduce, 'BUILD': _Machine.build, 'BINPERSID': _Machine.persistent_load,
    'POP': _Machine.pop, 'DUP': _Machine.dup,
}


def _bad():
  raise ValueError('malformed pickle (stack or mark mismatch)')


def _container(obj, kind):
  if not isinstance(obj, kind):
    raise ValueError(f'an item added to a {type(obj).__name__}, not a {kind.__name__}')
  return obj
