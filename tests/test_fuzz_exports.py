"""Fuzzing the readers of exported files (issue 29): `jkd eval --export FILE` and `jkd bench
--export FILE` open FILE and FILE.json with `jkd.deploy.runtime.open_file`, which must refuse a
damaged or hostile pair with a UserError (exit 2) and never crash, hang or raise anything else.

The mutator is our own and seeded (`random.Random(f'{reader}-{seed}-{i}')`: case i of a reader
is the same on every run). It starts from the valid small files committed in
tests/fixtures/deploy (tiny.onnx, tiny.tflite, tiny_int8.tflite, tiny.stablehlo and their
FILE.json, written by make.py) and applies one to three of:
- bytes: truncation, bit flips, bytes set to 0x00/0xff/0x7f/0x80, an aligned 32-bit field
  set to 0, 1, -1, 2**31, the file size or a random value (flatbuffer offsets, vector lengths,
  shapes), a 10-byte varint inserted (protobuf lengths), chunks deleted, repeated or inserted,
  the header of another format spliced in;
- ONNX structure (through the onnx protobuf classes): input and initializer dims set to 0,
  -1 or 2**40, data types changed, raw data cut, an initializer moved to an external file
  ('/dev/zero', '../../etc/passwd'), op types and attributes changed, ir_version / opset huge;
- FILE.json: fields deleted or given wrong types, huge, negative, non-finite (NaN, 1e400) or
  other-shaped values, other image shapes and channel counts, a list or deep nesting instead of
  an object, its text cut, flipped or made invalid UTF-8.
FILE.json's sha256 and bytes are then set to the mutated FILE's (so the parser is reached) in
most cases, and left stale in the others (so the checksum check is exercised).

Each reader's cases run in a child process under RLIMIT_AS (4 GiB) and a per-case time limit
(`CASE_TIMEOUT_S`); a case is 'ok' (opened and ran on 2 images), 'refused' (a UserError whose
message names FILE or FILE.json), 'traceback' (any other exception), 'crash' (the child died)
or 'hang' (no answer in time; the child is killed and the run goes on from the next case).
Every 10th case also goes through `jkd.cli.main(['bench', '--export', ...])`: exit 0 or 2, no
traceback. The test asserts 0 crashes, 0 hangs, 0 tracebacks. Normal tier: `CI_CASES` per
reader; slow tier: `SLOW_CASES`.
"""
import json
import os
import random
import resource
import select
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, 'fixtures', 'deploy')
READERS = {'onnx': 'tiny.onnx', 'tflite': 'tiny.tflite', 'tflite_int8': 'tiny_int8.tflite',
           'stablehlo': 'tiny.stablehlo', 'json': 'tiny_int8.tflite'}
CI_CASES = {'onnx': 200, 'tflite': 120, 'tflite_int8': 120, 'stablehlo': 50, 'json': 400}
SLOW_CASES = {'onnx': 2000, 'tflite': 1500, 'tflite_int8': 1500, 'stablehlo': 1000,
              'json': 3000}
CASE_TIMEOUT_S = 60
MEMORY_LIMIT = 4 << 30
INTERESTING32 = (0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fffffff, 0x80000000, 0xffffffff)


# ---------------------------------------------------------------- the mutator


def _flip_bits(data: bytearray, rng) -> None:
  for _ in range(rng.randint(1, 16)):
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)


def _set_bytes(data: bytearray, rng) -> None:
  for _ in range(rng.randint(1, 8)):
    data[rng.randrange(len(data))] = rng.choice((0, 0xff, 0x7f, 0x80))


def _set_field32(data: bytearray, rng) -> None:
  """An aligned little-endian 32-bit word (a flatbuffer offset, length or shape) changed."""
  if len(data) < 8:
    return
  i = rng.randrange(0, len(data) - 4, 4) if rng.random() < 0.5 else rng.randrange(
      0, min(len(data) - 4, 64), 4)  # The header's offsets, often.
  value = rng.choice(INTERESTING32 + (len(data), len(data) + 4, rng.getrandbits(32)))
  data[i:i + 4] = value.to_bytes(4, 'little')


def _insert_varint(data: bytearray, rng) -> None:
  i = rng.randrange(len(data))
  data[i:i] = bytes([0xff] * 9 + [0x01])  # 2**64 - 1 as a protobuf varint


def _chunks(data: bytearray, rng) -> None:
  i = rng.randrange(len(data))
  n = rng.randint(1, max(1, min(4096, len(data) - i)))
  kind = rng.randrange(3)
  if kind == 0:
    del data[i:i + n]
  elif kind == 1:
    data[i:i] = data[i:i + n]
  else:
    data[i:i] = rng.randbytes(n)


def _splice_header(data: bytearray, rng) -> None:
  other = rng.choice(('tiny.onnx', 'tiny.tflite', 'tiny.stablehlo'))
  with open(os.path.join(FIXTURES, other), 'rb') as f:
    head = f.read(rng.choice((8, 16, 64, 256)))
  data[:len(head)] = head


def _truncate(data: bytearray, rng) -> None:
  del data[rng.randrange(len(data)):]


BYTE_OPS = (_truncate, _flip_bits, _set_bytes, _set_field32, _set_field32, _insert_varint,
            _chunks, _splice_header)


def _onnx_structure(data: bytes, rng) -> bytes:
  """One edit of the ONNX model's fields through the protobuf classes."""
  import onnx
  m = onnx.load_model_from_string(data)
  g = m.graph
  kind = rng.randrange(8)
  big = rng.choice((0, -1, 2**40, 2**31, 7))
  if kind == 0:
    dims = g.input[0].type.tensor_type.shape.dim
    dims[rng.randrange(len(dims))].dim_value = big
  elif kind == 1:
    t = rng.choice(g.initializer)
    if t.dims:
      t.dims[rng.randrange(len(t.dims))] = big
  elif kind == 2:
    rng.choice(g.initializer).data_type = rng.randrange(0, 30)
  elif kind == 3:
    t = rng.choice(g.initializer)
    t.raw_data = t.raw_data[:len(t.raw_data) // 2]
  elif kind == 4:
    t = rng.choice(g.initializer)
    t.ClearField('raw_data')
    t.data_location = onnx.TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = 'location', rng.choice(('/dev/zero', '../../etc/passwd', 'w.bin'))
  elif kind == 5:
    rng.choice(g.node).op_type = rng.choice(('Conv', 'Reshape', 'Nope', 'Loop', 'Gemm', ''))
  elif kind == 6:
    node = rng.choice([n for n in g.node if n.attribute] or list(g.node))
    if node.attribute:
      a = rng.choice(node.attribute)
      if a.ints:
        a.ints[rng.randrange(len(a.ints))] = big
      else:
        a.i = big
  else:
    if rng.random() < 0.5:
      m.ir_version = rng.choice((0, 99, 2**40))
    else:
      m.opset_import[0].version = rng.choice((0, 1, 99, 2**40))
  return m.SerializeToString()


JSON_VALUES = (None, True, False, 0, -1, 1, 2**63, 10**400, 1.5, -0.0, 'x', '', '\x1b[31mred',
               [], {}, [28, 28], [28, 28, 1, 1], [0, 28, 1], [28, 28, 3], [32, 32, 1],
               [100000, 100000, 1], [28.0, 28, 1], ['28', 28, 1], [-28, 28, 1], [28, 28, 999],
               'NaN', 'Infinity')


def _mutate_info(info: dict, rng) -> str:
  """FILE.json's text after one to three field edits (or the whole object replaced)."""
  info = json.loads(json.dumps(info))
  kind = rng.randrange(10)
  if kind == 0:
    return json.dumps(rng.choice(([info], [], 'text', 3, None, [[[[[]]]]] * 2)))
  if kind == 1:
    return '[' * 100000 + ']' * 100000  # deeper than the JSON parser's recursion limit
  for _ in range(rng.randint(1, 3)):
    key = rng.choice(sorted(info) + ['image_shape', 'num_classes', 'sha256', 'bytes', 'format'])
    op = rng.randrange(4)
    if op == 0:
      info.pop(key, None)
    elif op == 1:
      info[key] = rng.choice(JSON_VALUES)
    elif op == 2 and isinstance(info.get(key), list) and info[key]:
      info[key][rng.randrange(len(info[key]))] = rng.choice(JSON_VALUES)
    elif op == 3 and isinstance(info.get(key), dict) and info[key]:
      sub = rng.choice(sorted(info[key]))
      info[key][sub] = rng.choice(JSON_VALUES)
    else:
      info[key] = rng.choice(JSON_VALUES)
  text = json.dumps(info, default=str)
  for raw in ('NaN', 'Infinity'):  # As bare JSON constants, which Python's parser accepts.
    text = text.replace(f'"{raw}"', raw)
  return text


def make_case(reader: str, seed: int, i: int) -> tuple[bytes, bytes]:
  """(FILE bytes, FILE.json bytes) of case i: the fixture pair, mutated."""
  import hashlib
  rng = random.Random(f'{reader}-{seed}-{i}')
  name = READERS[reader]
  with open(os.path.join(FIXTURES, name), 'rb') as f:
    data = f.read()
  with open(os.path.join(FIXTURES, name + '.json')) as f:
    info = json.load(f)
  if reader == 'json':
    text = _mutate_info(info, rng).encode()
    if rng.random() < 0.2:
      text = bytearray(text)
      rng.choice((_truncate, _flip_bits, _set_bytes))(text, rng)
      text = bytes(text)
    return data, text
  if reader == 'onnx' and rng.random() < 0.3:
    try:
      data = _onnx_structure(data, rng)
    except Exception:  # pylint: disable=broad-except  (an edit protobuf itself refuses)
      pass
  else:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
      if buf:
        rng.choice(BYTE_OPS)(buf, rng)
    data = bytes(buf)
  if rng.random() < 0.9:  # Most cases get a matching checksum: the parser must hold by itself.
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
  if rng.random() < 0.05:  # Both files damaged at once.
    return data, _mutate_info(info, rng).encode()
  return data, json.dumps(info).encode()


# ---------------------------------------------------------------- the child process


def worker(reader: str, seed: int, start: int, stop: int, cli_every: int) -> None:
  """Runs cases [start, stop) of `reader`, printing 'start i' before and 'end i STATUS detail'
  after each (flushed), so that the parent knows which case a crash or hang belongs to."""
  import contextlib
  import io
  import numpy as np
  from jkd import cli
  from jkd.deploy import runtime
  from jkd.errors import UserError
  suffix = os.path.splitext(READERS[reader])[1]
  tmp = tempfile.mkdtemp(prefix='fuzz_exports_')
  for i in range(start, stop):
    print(f'start {i}', flush=True)
    data, text = make_case(reader, seed, i)
    path = os.path.join(tmp, f'case{i}{suffix}')
    with open(path, 'wb') as f:
      f.write(data)
    with open(path + '.json', 'wb') as f:
      f.write(text)
    status, detail = 'ok', ''
    try:
      runner = runtime.open_file(path)
      runner(np.zeros((2, *runner.image_shape), np.float32))
    except UserError as e:
      status, detail = 'refused', str(e)
      if os.path.basename(path) not in detail:
        status = 'traceback'
        detail = f'message does not name the file: {detail}'
    except BaseException as e:  # pylint: disable=broad-except
      status, detail = 'traceback', f'{type(e).__name__}: {e}'
    if status != 'traceback' and cli_every and i % cli_every == 0:
      err = io.StringIO()
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
          code = cli.main(['bench', '--export', path, '--batch-sizes', '1', '--repeats', '1'])
        except BaseException as e:  # pylint: disable=broad-except
          code = f'raised {type(e).__name__}: {e}'
      if code not in (0, 2) or 'Traceback' in err.getvalue() or (code == 2) != (
          status == 'refused'):
        status, detail = 'traceback', f'cli exit {code} for a case that was {status}: ' + (
            err.getvalue()[-500:])
    for p in (path, path + '.json', path + '.bench.json'):
      if os.path.exists(p):
        os.remove(p)
    print(f'end {i} {status} {" ".join(detail.split())[:300]!r}', flush=True)
  os.rmdir(tmp)
  print('done', flush=True)


def _limit():
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_reader(reader: str, cases: int, seed: int = 0, cli_every: int = 10) -> dict:
  """Runs `cases` cases of `reader` in child processes; returns {status: [case ids]} and
  'details': {case: text} for everything but ok / refused."""
  results = {'ok': [], 'refused': [], 'traceback': [], 'crash': [], 'hang': [], 'details': {}}
  env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  i = 0
  while i < cases:
    code = (f'import sys; sys.path.insert(0, {HERE!r}); import test_fuzz_exports as t; '
            f't.worker({reader!r}, {seed}, {i}, {cases}, {cli_every})')
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, preexec_fn=_limit)
    current, deadline = None, time.monotonic() + 120  # start-up: imports
    try:
      while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
          if current is None:
            raise RuntimeError(f'the {reader} fuzz worker did not start')
          results['hang'].append(current)
          results['details'][current] = f'no answer in {CASE_TIMEOUT_S} s'
          proc.kill()
          i = current + 1
          break
        line = proc.stdout.readline()
        if not line:  # The child died.
          proc.wait()
          if current is None:
            raise RuntimeError(f'the {reader} fuzz worker died at start-up ({proc.returncode})')
          results['crash'].append(current)
          results['details'][current] = f'child exit {proc.returncode}'
          i = current + 1
          break
        word, *rest = line.split(' ', 3)
        if word == 'start':
          current = int(rest[0])
          deadline = time.monotonic() + CASE_TIMEOUT_S
        elif word == 'end':
          status = rest[1]
          results[status].append(int(rest[0]))
          if status not in ('ok', 'refused'):
            results['details'][int(rest[0])] = rest[2].strip()
          current = None
        elif word.strip() == 'done':
          i = cases
          break
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  return results


def _summary(reader, results):
  counts = {k: len(v) for k, v in results.items() if k != 'details'}
  return f'{reader}: {counts} {dict(list(results["details"].items())[:5])}'


def _check(reader, cases):
  t0 = time.time()
  results = run_reader(reader, cases)
  print(_summary(reader, results), f'{time.time() - t0:.1f}s')
  assert not results['crash'] and not results['hang'] and not results['traceback'], _summary(
      reader, results)
  assert len(results['ok']) + len(results['refused']) == cases
  assert results['refused'], 'the mutator must produce files the reader refuses'
  if reader != 'json':  # (Every FILE.json edit breaks a checked field.)
    assert results['ok'], 'some mutations are harmless (e.g. a changed weight): they must run'
  return results


@pytest.mark.parametrize('reader', sorted(CI_CASES))
def test_fuzz_export_reader(reader):
  _check(reader, CI_CASES[reader])


@pytest.mark.slow
@pytest.mark.parametrize('reader', sorted(SLOW_CASES))
def test_fuzz_export_reader_thousands(reader):
  _check(reader, SLOW_CASES[reader])


def test_mutator_is_seeded():
  """The same (reader, seed, case) gives the same bytes: a failure can be replayed."""
  for reader in READERS:
    assert make_case(reader, 0, 7) == make_case(reader, 0, 7)
  assert make_case('onnx', 0, 7) != make_case('onnx', 1, 7)


if __name__ == '__main__':  # python tests/test_fuzz_exports.py READER CASES [SEED]
  print(_summary(sys.argv[1], run_reader(sys.argv[1], int(sys.argv[2]),
                                         int(sys.argv[3]) if len(sys.argv) > 3 else 0)))


def test_a_file_that_aborts_the_runtime_is_refused(tmp_path):
  """Case 134 of seed 1 (tflite_int8: a quantized tensor without scales, found by this fuzzer)
  makes LiteRT's `allocate_tensors` abort the process. Opened without the probe it kills a
  child process (SIGABRT); through `open_file` the probe's child dies instead and jkd refuses
  the file with a UserError."""
  pytest.importorskip('ai_edge_litert')
  from jkd.deploy import runtime
  from jkd.errors import UserError
  data, text = make_case('tflite_int8', 1, 134)
  path = str(tmp_path / 'abort.tflite')
  with open(path, 'wb') as f:
    f.write(data)
  with open(path + '.json', 'wb') as f:
    f.write(text)
  code = ('import sys, numpy as np; from jkd.deploy import runtime; '
          'r = runtime.open_file(sys.argv[1], probe_batches=()); '
          'r(np.zeros((2, 28, 28, 1), np.float32))')
  p = subprocess.run([sys.executable, '-c', code, path], capture_output=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert p.returncode == -6, (p.returncode, p.stderr[-2000:])
  with pytest.raises(UserError, match=r'crashed \(SIGABRT\)'):
    runtime.open_file(path)
