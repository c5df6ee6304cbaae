"""Fuzzing the checkpoint readers (`jkd.convert.formats`, issue 29) with a seeded mutator.

Valid small files of each format (a `.pth` written here without torch by tests/pth_writer.py,
the real torch.save file tests/fixtures/import/mae_pretrain.pth, safetensors through
safetensors.numpy, `.npz` through numpy) are mutated case by case, from the case's seed:
  - raw: truncations, byte flips, inserted and deleted bytes, the zip directory's fields (sizes,
    offsets, compression method, flags) set to edge values;
  - structured, re-zipped with valid CRCs so the reader's own checks are reached: every integer
    of a `.pth` pickle (offsets, sizes, strides, element counts) replaced by edge values
    (negative, 0, huge, beyond int64, bools), its storage types and keys swapped, its bytes
    flipped, storages cut or extended; safetensors header fields (dtype, shape, data_offsets,
    the header length) rewritten; npy headers (descr, shape, fortran_order) rewritten and
    their data cut.

Each batch runs in a child process (`python -c`, importing only jkd.convert.formats: it must
not import jax) under RLIMIT_AS = 3 GiB and a per-case time limit. Every case ends as one of:
  ok        read, and every tensor equals what an independent reference computes from the
            file's bytes (for `.pth`: the stdlib unpickler with the storages' raw bytes and
            explicit index arithmetic offset + sum(i_k * stride_k), each index checked inside
            its storage; for safetensors: the header's byte ranges; for npz: np.load of the
            member);
  refused   a UserError (the CLI's exit 2);
and the test asserts none of: crash (the child died of a signal), hang (over the time limit),
traceback (any other exception, MemoryError included), outside (a tensor the reader returned
whose reference index lies outside its storage, or whose values differ from the reference).

Counts: a few hundred cases per reader in the normal tier, thousands in the slow tier. With
torch installed (not in CI), the torch.load fallback is fuzzed too.
"""
import io
import json
import os
import random
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAE_PTH = os.path.join(HERE, 'fixtures', 'import', 'mae_pretrain.pth')
MEMORY_LIMIT = 3 << 30
CASE_SECONDS = 20
OUTCOMES = ('ok', 'refused', 'crash', 'hang', 'traceback', 'outside')

INTERESTING = (-2**63, -2**31, -65536, -2, -1, 0, 1, 2, 3, 4, 7, 8, 48, 255, 256, 65535, 65536,
               2**31 - 1, 2**31, 2**32, 2**40, 2**62 - 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30)


# ---------------------------------------------------------------- seed files


def seed_files(kind: str) -> list[bytes]:
  """Valid files of one format, the mutator's starting points."""
  sys.path.insert(0, HERE)
  from pth_writer import TensorSpec, write_pth  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  if kind == 'pth':
    a = rng.standard_normal((6, 4)).astype(np.float32)
    view = TensorSpec.of(a, key='0')
    view.size, view.stride, view.offset = (4, 5), (1, 4), 2  # transposed, offset into '0'
    files = []
    for nest in ('model', None):
      specs = {'a': TensorSpec.of(a, key='0'), 'view': view,
               'h': TensorSpec.of(rng.standard_normal(7).astype(np.float16), key='1'),
               'i': TensorSpec.of(np.arange(6, dtype=np.int64).reshape(2, 3), key='2'),
               'b': TensorSpec.of(np.array([True, False, True]), key='3'),
               'u': TensorSpec.of(np.arange(5, dtype=np.uint8), key='4'),
               's': TensorSpec(**dict(TensorSpec.of(np.float32([3.5]), key='5').__dict__,
                                      size=(), stride=())),
               'e': TensorSpec(**dict(TensorSpec.of(np.float32([1]), key='6').__dict__,
                                      size=(0, 3), stride=(3, 1)))}
      path = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'fuzz_seed_{os.getpid()}.pth')
      write_pth(path, specs, nest=nest)
      with open(path, 'rb') as f:
        files.append(f.read())
      os.remove(path)
    with open(MAE_PTH, 'rb') as f:
      files.append(f.read())
    return files
  if kind == 'safetensors':
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    return [save({'a': rng.standard_normal((6, 4)).astype(np.float32),
                  'h': rng.standard_normal(7).astype(np.float16),
                  'i': np.arange(6, dtype=np.int64).reshape(2, 3),
                  'b': np.array([True, False, True]), 'z': np.zeros((0, 2), np.float32)},
                 metadata={'format': 'pt'}),
            save({'w': rng.standard_normal((3, 3)).astype(np.float64)})]
  if kind == 'npz':
    files = []
    arrays = {'a': rng.standard_normal((6, 4)).astype(np.float32),
              'f': np.asfortranarray(rng.standard_normal((3, 5))),
              'i': np.arange(6, dtype=np.int32), 'b': np.array([True, False]),
              'x/y': np.float16(2.5)}
    for saver in (np.savez, np.savez_compressed):
      buf = io.BytesIO()
      saver(buf, **arrays)
      files.append(buf.getvalue())
    return files
  raise ValueError(kind)


# ---------------------------------------------------------------- the mutator


def _value(rnd: random.Random, old=None):
  choice = rnd.random()
  if old is not None and isinstance(old, int) and choice < 0.3:
    return old + rnd.choice((-2, -1, 1, 2, old, -old))
  if choice < 0.9:
    return rnd.choice(INTERESTING)
  return rnd.choice((True, False, 1.5, None, 'x', [], [1]))


def _raw(rnd: random.Random, data: bytes) -> bytes:
  """A byte-level mutation: truncate, flip, insert, delete, or a zip header field."""
  data = bytearray(data)
  how = rnd.randrange(5)
  if how == 0:
    return bytes(data[:rnd.randrange(len(data))])
  if how == 1:
    for _ in range(rnd.randint(1, 8)):
      i = rnd.randrange(len(data))
      data[i] ^= 1 << rnd.randrange(8)
    return bytes(data)
  if how == 2:
    i = rnd.randrange(len(data) + 1)
    return bytes(data[:i] + bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
                 + data[i:])
  if how == 3:
    i = rnd.randrange(len(data))
    return bytes(data[:i] + data[i + rnd.randint(1, 64):])
  # A field of a zip local header (PK\3\4) or central directory entry (PK\1\2).
  heads = [i for i in range(len(data) - 4) if data[i:i + 4] in (b'PK\x03\x04', b'PK\x01\x02',
                                                                 b'PK\x05\x06')]
  if not heads:
    return bytes(data[:rnd.randrange(len(data))])
  i = rnd.choice(heads)
  sig = bytes(data[i:i + 4])
  fields = {b'PK\x03\x04': [(6, 'H'), (8, 'H'), (18, 'I'), (22, 'I'), (26, 'H'), (28, 'H')],
            b'PK\x01\x02': [(8, 'H'), (10, 'H'), (20, 'I'), (24, 'I'), (28, 'H'), (30, 'H'),
                            (42, 'I')],
            b'PK\x05\x06': [(8, 'H'), (10, 'H'), (12, 'I'), (16, 'I')]}[sig]
  off, fmt = rnd.choice(fields)
  limit = 1 << (8 * struct.calcsize(fmt))
  value = rnd.choice((0, 1, limit - 1, limit // 2, rnd.randrange(limit)))
  if i + off + struct.calcsize(fmt) <= len(data):
    data[i + off:i + off + struct.calcsize(fmt)] = struct.pack('<' + fmt, value)
  return bytes(data)


def _members(data: bytes) -> list[tuple[str, bytes, int]]:
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    return [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]


def _rezip(members) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    for name, payload, compression in members:
      z.writestr(zipfile.ZipInfo(name), payload, compress_type=compression)
  return buf.getvalue()


def _encode_int(v) -> bytes:
  if v is True:
    return b'\x88'
  if v is False:
    return b'\x89'
  if isinstance(v, float):
    return b'G' + struct.pack('>d', v)
  if v is None:
    return b'N'
  if isinstance(v, str):
    return b'X' + struct.pack('<I', len(v)) + v.encode()
  if isinstance(v, list):
    return b']' + (b'K\x01a' if v else b'')
  if 0 <= v < 256:
    return b'K' + bytes([v])
  if -2**31 <= v < 2**31:
    return b'J' + struct.pack('<i', v)
  n = (v.bit_length() + 8) // 8
  return b'\x8a' + bytes([n]) + v.to_bytes(n, 'little', signed=True)


def _mutate_pickle(rnd: random.Random, pkl: bytes) -> bytes:
  """Rewrites ints (offsets, sizes, strides, numels), storage types or keys, or flips bytes."""
  import pickletools  # pylint: disable=g-import-not-at-top
  ops = list(pickletools.genops(io.BytesIO(pkl)))
  ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
  how = rnd.randrange(4)
  if how == 3:  # byte flips inside the pickle
    data = bytearray(pkl)
    for _ in range(rnd.randint(1, 4)):
      i = rnd.randrange(len(data))
      data[i] ^= 1 << rnd.randrange(8)
    return bytes(data)
  edits = []
  if how == 0:  # 1-3 ints: offsets, sizes, strides, element counts
    where = [k for k, (op, _, _) in enumerate(ops)
             if op.name in ('BININT1', 'BININT2', 'BININT', 'LONG1')]
    for k in rnd.sample(where, min(len(where), rnd.randint(1, 3))):
      edits.append((ops[k][2], ends[k], _encode_int(_value(rnd, ops[k][1]))))
  elif how == 1:  # a storage type
    where = [k for k, (op, arg, _) in enumerate(ops) if op.name == 'GLOBAL'
             and arg.startswith('torch ')]
    for k in rnd.sample(where, min(len(where), 1)):
      new = rnd.choice(('FloatStorage', 'HalfStorage', 'BoolStorage', 'LongStorage',
                        'ByteStorage', 'DoubleStorage', 'BFloat16Storage', 'NopeStorage'))
      edits.append((ops[k][2], ends[k], b'ctorch\n' + new.encode() + b'\n'))
  else:  # a storage key (another storage, a missing one, a path)
    where = [k for k, (op, arg, _) in enumerate(ops) if op.name == 'BINUNICODE'
             and len(arg) <= 2]
    for k in rnd.sample(where, min(len(where), 1)):
      edits.append((ops[k][2], ends[k],
                    _encode_int(rnd.choice(('0', '1', '2', '3', '9', '../x', '')))))
  if not edits and ops:
    op, arg, pos = rnd.choice(ops[1:-1] or ops)
    k = [p for _, _, p in ops].index(pos)
    edits.append((pos, ends[k], _encode_int(_value(rnd))))
  out = bytearray(pkl)
  for start, end, new in sorted(edits, reverse=True):
    out[start:end] = new
  return bytes(out)


def _npy_header(rnd: random.Random, payload: bytes) -> bytes:
  """An npy member with a rewritten header (descr, shape, fortran_order) and/or cut data."""
  f = io.BytesIO(payload)
  version = np.lib.format.read_magic(f)
  reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = reader(f)
  body = payload[f.tell():]
  descr = np.lib.format.dtype_to_descr(dtype)
  how = rnd.randrange(4)
  if how == 0:
    descr = rnd.choice(('<f4', '<f8', '|b1', '|O', '<U4', '|V8', '>f4', '<c8', '<f2', '<i8',
                        '|u1', "[('a', '<f4')]", '<M8[s]', 'bogus'))
  elif how == 1:
    shape = tuple(_value(rnd) if rnd.random() < 0.5 else s for s in shape) or (_value(rnd),)
    if rnd.random() < 0.2:
      shape = shape + (rnd.choice((0, 1, 2, 2**40)),)
  elif how == 2:
    fortran = not fortran
  else:
    body = body[:rnd.randrange(len(body) + 1)] if body and rnd.random() < 0.7 else body + b'\0' * 8
  text = (f"{{'descr': {descr if descr.startswith('[') else repr(descr)}, "
          f"'fortran_order': {fortran}, 'shape': {shape!r}, }}")
  header = text.encode('latin-1')
  pad = 64 - (10 + len(header) + 1) % 64
  header = header + b' ' * pad + b'\n'
  return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(header)) + header + body


def _safetensors_header(rnd: random.Random, data: bytes) -> bytes:
  (n,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + n])
  body = data[8 + n:]
  names = [k for k in header if k != '__metadata__']
  how = rnd.randrange(6)
  if how == 5:  # the length field itself
    return struct.pack('<Q', rnd.choice((0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1,
                                         rnd.randrange(2**64)))) + data[8:]
  name = rnd.choice(names)
  entry = header[name]
  if how == 0:
    entry['dtype'] = rnd.choice(('F32', 'F16', 'BF16', 'F64', 'I64', 'I8', 'U8', 'BOOL', 'U64',
                                 'F8_E4M3', 'F99', '', 5, None))
  elif how == 1:
    entry['shape'] = [(_value(rnd) if rnd.random() < 0.6 else s) for s in entry['shape']]
    if rnd.random() < 0.3:
      entry['shape'].append(_value(rnd))
  elif how == 2:
    i = rnd.randrange(2)
    entry['data_offsets'][i] = _value(rnd, entry['data_offsets'][i])
  elif how == 3:
    entry['data_offsets'] = rnd.choice(([0], [5, 1], 'x', None, [0, 0, 0],
                                        [entry['data_offsets'][0], len(body) + 1]))
  else:
    header[name] = rnd.choice(([], 'x', None, {'dtype': 'F32'}, {**entry, 'extra': 1}))
  text = json.dumps(header).encode()
  if rnd.random() < 0.2:
    body = body[:rnd.randrange(len(body) + 1)]
  return struct.pack('<Q', len(text)) + text + body


def mutate(kind: str, seeds: list[bytes], seed: int) -> bytes:
  """One mutated file, a function of (kind, seed)."""
  rnd = random.Random(f'{kind}-{seed}')
  data = rnd.choice(seeds)
  for _ in range(rnd.choice((1, 1, 1, 2, 3))):
    try:
      structured = rnd.random() < 0.7
      if structured and kind == 'safetensors':
        data = _safetensors_header(rnd, data)
      elif structured and kind in ('pth', 'npz'):
        members = _members(data)
        if kind == 'pth':
          i = rnd.randrange(len(members))
          name, payload, comp = members[i]
          if name.endswith('data.pkl') or rnd.random() < 0.6:
            i = next(k for k, m in enumerate(members) if m[0].endswith('data.pkl'))
            name, payload, comp = members[i]
            payload = _mutate_pickle(rnd, payload)
          else:
            payload = payload[:rnd.randrange(len(payload) + 1)] if rnd.random() < 0.6 \
                else payload + bytes(rnd.randint(1, 64))
        else:
          i = rnd.randrange(len(members))
          name, payload, comp = members[i]
          payload = _npy_header(rnd, payload)
        members[i] = (name, payload, comp)
        data = _rezip(members)
      else:
        data = _raw(rnd, data)
    except Exception:  # pylint: disable=broad-except  (a seed already broken by a mutation)
      data = _raw(rnd, data) if data else data
  return data


# ---------------------------------------------------------------- the independent reference


class _Dict(dict):
  pass


class _Rec:
  def __init__(self, *args):
    self.args = args


def _reference_pth(data: bytes) -> dict:
  """{name: array} of a .pth by the stdlib unpickler, with each element taken from the storage
  bytes at offset + sum(i_k * stride_k); raises _Outside if an index leaves its storage."""
  import pickle  # pylint: disable=g-import-not-at-top
  archive = zipfile.ZipFile(io.BytesIO(data))
  pkl = next(n for n in archive.namelist() if n.endswith('data.pkl'))
  prefix = pkl[:-len('data.pkl')]
  dtypes = {'FloatStorage': '<f4', 'DoubleStorage': '<f8', 'HalfStorage': '<f2',
            'LongStorage': '<i8', 'IntStorage': '<i4', 'ShortStorage': '<i2',
            'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': 'u1',
            'BFloat16Storage': '<u2'}

  # The stdlib's pure-Python unpickler (its memo is a dict: the C one allocates a table as
  # large as a flipped LONG_BINPUT index).
  class Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
    def find_class(self, module, name):
      if name in dtypes:
        return name
      if name == 'OrderedDict':
        return _Dict
      return lambda *args: _Rec(*args)

    def persistent_load(self, pid):
      return pid

  obj = Unpickler(io.BytesIO(archive.read(pkl))).load()
  if isinstance(obj, dict) and isinstance(obj.get('model'), dict) and any(
      isinstance(v, _Rec) for v in obj['model'].values()):
    obj = obj['model']
  out = {}
  for name, rec in obj.items():
    if not isinstance(rec, _Rec):
      continue
    (_, storage_type, key, _, numel), offset, size, stride = rec.args[:4]
    raw = archive.read(f'{prefix}data/{key}')
    flat = np.frombuffer(raw, dtypes[storage_type])
    assert flat.size == numel
    if 0 in size:  # No element read: nothing to check but the shape.
      out[name] = np.zeros(tuple(size), flat.dtype)
      continue
    index = np.full(tuple(size), offset, dtype=object)
    for k, (n, s) in enumerate(zip(size, stride)):
      shape = [1] * len(size)
      shape[k] = n
      index = index + (np.arange(n, dtype=object) * s).reshape(shape)
    index = np.asarray(index, dtype=object).reshape(-1)
    if index.size and not all(0 <= int(i) < flat.size for i in index):
      raise _Outside(f'{name}: an element index outside its storage of {flat.size}')
    values = flat[np.asarray(index, dtype=np.int64)].reshape(tuple(size))
    out[name] = (values != 0) if storage_type == 'BoolStorage' else values
  return out


class _Outside(Exception):
  pass


def _reference_safetensors(data: bytes) -> dict:
  (n,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + n])
  sizes = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
           'U64': 8, 'U32': 4, 'U16': 2, 'U8': 1, 'BOOL': 1}
  out = {}
  for name, e in header.items():
    if name == '__metadata__':
      continue
    begin, end = e['data_offsets']
    if not 0 <= begin <= end <= len(data) - 8 - n:
      raise _Outside(f'{name}: bytes [{begin}, {end}) outside the data section')
    raw = data[8 + n + begin:8 + n + end]
    assert len(raw) == int(np.prod(e['shape'], dtype=object)) * sizes[e['dtype']]
    out[name] = raw
  return out


def _same(ours: np.ndarray, ref) -> bool:
  ours = np.array(ours, order='C')
  if isinstance(ref, bytes):
    if ours.dtype == np.bool_:
      return ours.tobytes() == bytes(b != 0 for b in ref)
    return ours.tobytes() == ref
  ref = np.asarray(ref)
  if ours.shape != ref.shape:
    return False
  if ours.dtype == np.bool_ or ref.dtype == np.bool_:
    return np.array_equal(ours.astype(bool), ref.astype(bool))
  if ours.dtype.itemsize == ref.dtype.itemsize:  # The same bytes (bfloat16 vs its uint16 bits)
    ref = np.array(ref, order='C')
    if ref.dtype.byteorder == '>':
      ref = ref.astype(ref.dtype.newbyteorder('<'))
    return ours.tobytes() == ref.tobytes()
  return False


def _verify(kind: str, data: bytes, tensors: dict) -> str | None:
  """None if every tensor equals the reference's; else what differs."""
  if kind == 'pth':
    ref = _reference_pth(data)
  elif kind == 'safetensors':
    ref = _reference_safetensors(data)
  else:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
      ref = {n[:-4]: np.load(io.BytesIO(z.read(n)), allow_pickle=False) for n in z.namelist()}
  names = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ref.items()}
  if set(names) != set(tensors):
    return f'names {sorted(tensors)} != reference {sorted(names)}'
  for name, value in tensors.items():
    if not _same(value, names[name]):
      return f'{name}: values differ from the reference'
  return None


# ---------------------------------------------------------------- the child process


def child(kind: str, start: int, stop: int, torch_path: bool) -> None:
  """Runs cases [start, stop) of `kind`, printing 'CASE i outcome [detail]' after each."""
  import resource  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
  from jkd.convert import formats  # pylint: disable=g-import-not-at-top
  from jkd.errors import UserError  # pylint: disable=g-import-not-at-top
  if not torch_path:
    sys.modules['torch'] = None  # The torch fallback stays off: jkd's reader alone.
  seeds = seed_files(kind)

  class Hang(BaseException):
    pass

  def alarm(*_):
    raise Hang()

  signal.signal(signal.SIGALRM, alarm)
  directory = tempfile.mkdtemp(prefix='jkd_fuzz_')
  path = os.path.join(directory, f'case.{kind}')
  for i in range(start, stop):
    data = mutate(kind, seeds, i)
    with open(path, 'wb') as f:
      f.write(data)
    signal.alarm(CASE_SECONDS)
    try:
      tensors, _ = formats.read_tensors(path)
      outcome, detail = 'ok', ''
    except UserError as e:
      outcome, detail = 'refused', str(e)[:80]
    except Hang:
      outcome, detail = 'hang', ''
    except BaseException:  # pylint: disable=broad-except
      outcome, detail = 'traceback', traceback.format_exc()[-600:]
    signal.alarm(0)
    if outcome == 'ok':
      try:
        problem = _verify(kind, data, tensors)
      except _Outside as e:
        problem = f'read outside a storage: {e}'
      except Exception as e:  # pylint: disable=broad-except
        problem = f'the reference cannot read what jkd read: {type(e).__name__}: {e}'
      if problem:
        outcome, detail = 'outside', problem[:300]
    print(f'CASE {i} {outcome} {json.dumps(detail)}', flush=True)
  os.remove(path) if os.path.exists(path) else None
  os.rmdir(directory)
  print(f'JAX_IMPORTED {"jax" in sys.modules}', flush=True)


def run_cases(kind: str, count: int, *, batch: int = 400, torch_path: bool = False,
              first: int = 0) -> dict:
  """Runs `count` cases in child processes; returns {outcome: n, 'examples': {...}}.

  A child that dies (a signal: a crash) or runs out of time (a hang) is restarted after the
  case it was on, which is counted as such."""
  counts = {k: 0 for k in OUTCOMES}
  examples, jax_imported = {}, False
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO, HERE] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  i = first
  stop = first + count
  while i < stop:
    end = min(i + batch, stop)
    code = (f'import sys; sys.path.insert(0, {HERE!r}); import test_fuzz_checkpoints as t; '
            f't.child({kind!r}, {i}, {end}, {torch_path!r})')
    try:
      proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            env=env, timeout=CASE_SECONDS * 3 + 2 * (end - i))
      out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
      err, rc = '', 'timeout'
    done = i
    for line in out.splitlines():
      if line.startswith('CASE '):
        _, n, outcome, detail = line.split(' ', 3)
        counts[outcome] += 1
        if outcome not in ('ok', 'refused'):
          examples.setdefault(outcome, []).append((kind, int(n), json.loads(detail)))
        done = int(n) + 1
      elif line.startswith('JAX_IMPORTED True'):
        jax_imported = True
    if done < end:  # The child died on case `done` (or hung there).
      outcome = 'hang' if rc == 'timeout' else 'crash'
      counts[outcome] += 1
      examples.setdefault(outcome, []).append((kind, done, f'rc {rc}: {err[-500:]}'))
      done += 1
    elif rc not in (0,):
      counts['crash'] += 1
      examples.setdefault('crash', []).append((kind, end, f'rc {rc}: {err[-500:]}'))
    i = done
  counts['examples'] = examples
  counts['jax_imported'] = jax_imported
  return counts


def _check(counts: dict, kind: str, count: int) -> None:
  bad = {k: counts[k] for k in ('crash', 'hang', 'traceback', 'outside') if counts[k]}
  assert not bad, (kind, bad, {k: v[:3] for k, v in counts['examples'].items()})
  assert not counts['jax_imported'], 'jkd.convert.formats imported jax'
  assert counts['ok'] + counts['refused'] == count, counts
  # The mutator reaches both sides: some files still read (and are verified), most are refused.
  assert counts['ok'] > 0 and counts['refused'] > count // 4, (kind, counts)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize('kind', ['pth', 'safetensors', 'npz'])
def test_fuzz_readers(kind):
  """300 mutated files per reader: 0 crashes, hangs, tracebacks, reads outside a storage."""
  _check(run_cases(kind, 300), kind, 300)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['pth', 'safetensors', 'npz'])
def test_fuzz_readers_thousands(kind):
  _check(run_cases(kind, 4000, first=100_000), kind, 4000)


def test_fuzz_torch_fallback():
  """With torch installed, the same cases with torch.load as the fallback for constructs jkd's
  reader does not know (never in CI: torch is not a dependency)."""
  pytest.importorskip('torch')
  _check(run_cases('pth', 300, torch_path=True, first=500_000), 'pth', 300)


def test_seed_files_read_and_match_the_reference():
  """The mutator's starting points themselves read and verify (the verifier can pass), and a
  tensor beyond its storage is caught by it (the verifier can fail)."""
  from jkd.convert import formats  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  for kind in ('pth', 'safetensors', 'npz'):
    for data in seed_files(kind):
      with tempfile.NamedTemporaryFile(suffix=f'.{kind}') as f:
        f.write(data)
        f.flush()
        tensors, _ = formats.read_tensors(f.name)
      assert _verify(kind, data, tensors) is None, kind
  sys.path.insert(0, HERE)
  from pth_writer import TensorSpec, write_pth  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    spec = TensorSpec.of(np.ones(1, np.float32))
    spec.size, spec.stride = (4,), (1,)
    write_pth(os.path.join(d, 'x.pth'), {'w': spec})
    with open(os.path.join(d, 'x.pth'), 'rb') as f:
      data = f.read()
  with pytest.raises(_Outside):
    _reference_pth(data)
