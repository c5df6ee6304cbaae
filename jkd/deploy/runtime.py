"""Running an exported file in its own runtime: ONNX Runtime, the LiteRT interpreter, jax.export.

  runner = open_file('student.onnx', threads=1)
  logits = runner(pixels)                    # float32 (B, H, W, C) in [0, 255] -> (B, classes)
  evaluate(runner, batches)                  # accuracy over jkd eval batches
  latency(runner, batch_sizes=(1, 32))       # median ms per call, threads stated

Only the runtime of the file's format is imported, so a benchmark process holds one framework.

An exported file is untrusted input (files are shared and downloaded), so `open_file` reads it
as such, and every failure is a `UserError` naming the file and the field (exit 2):
- FILE and FILE.json must be regular files (not a directory, FIFO or device) of bounded size
  (`MAX_FILE_BYTES`, `MAX_SIDECAR_BYTES`), checked before reading and again on the open
  descriptor; each is read once, into memory, and the runtime is built from those bytes (no
  second open of a path that may have changed meanwhile).
- The format comes from the bytes (TFLite's 'TFL3' identifier, ONNX's protobuf start, else a
  jax.export flatbuffer) and must agree with the suffix.
- FILE.json (`read_info`) is strict JSON (no NaN), an object whose fields have the types and
  ranges `jkd export` writes; its `sha256` and `bytes` must be FILE's: `jkd export` writes FILE
  first and FILE.json last, so FILE.json is the commit record of a complete export, and a FILE
  replaced after it (or a kill between the two writes) is refused here, never run with the
  wrong facts.
- The model's one input must be float32 (B, H, W, C) of FILE.json's `image_shape` and its one
  output (B, num_classes); an ONNX file may not reference external data files (it would make
  the runtime read paths the file names).
- ONNX Runtime and the LiteRT interpreter are not hardened against hostile files (a fuzzed
  .tflite made LiteRT's `allocate_tensors` abort the process). So an .onnx or .tflite file is
  first loaded and run on zero images in a forked child process (`_probe`: under an address
  space limit and a time limit); only if that child ends cleanly is it opened here. A crash,
  hang or memory blow-up there is a UserError (exit 2). What remains: a file crafted to crash
  only at other batch sizes or on particular pixel values can still crash the runtime here.
  StableHLO files are checked without a child (jax cannot run in a forked process): the
  flatbuffer is walked with a node budget before jax's deserializer recurses over it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import select
import signal
import stat
import statistics
import sys
import time
import warnings

import numpy as np

from jkd.errors import UserError

FORMATS = {'.onnx': 'onnx', '.tflite': 'tflite', '.stablehlo': 'stablehlo',
           '.jaxexport': 'stablehlo'}
NAMES = {'onnx': 'an ONNX model', 'tflite': 'a TFLite flatbuffer',
         'stablehlo': 'a jax.export (StableHLO) program'}
# Protobuf and flatbuffers both address at most 2 GiB: no valid file is larger.
MAX_FILE_BYTES = 2 << 30
MAX_SIDECAR_BYTES = 1 << 20
MAX_SIDE, MAX_CHANNELS, MAX_CLASSES = 16384, 64, 1_000_000
MAX_THREADS = 1024
MAX_TREE_NODES = 10_000  # a jax.export program's argument / result trees (ours have 3 and 1)
PROBE_TIMEOUT_S = 120
PROBE_MEMORY = 4 << 30  # address space the probe may add to what the process had


def show(text) -> str:
  """`text` quoted, with control characters escaped (repr): safe to print in a terminal."""
  return repr(str(text))


def format_of(path: str) -> str:
  """'onnx', 'tflite' or 'stablehlo' from the file name; UserError for anything else."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise UserError(f'{show(path)}: jkd runs .onnx, .tflite and .stablehlo files (as written by '
                    '`jkd export`); name the file by its format.')
  return FORMATS[ext]


def sidecar(path: str) -> str:
  """The JSON that `jkd export` writes beside FILE: FILE.json."""
  return path + '.json'


# ---------------------------------------------------------------- reading files safely


def read_regular(path: str, limit: int, what: str = 'file', fix: str = '') -> bytes:
  """The bytes of `path`, a regular file of at most `limit` bytes; UserError otherwise.

  Checked with stat before opening (a FIFO would block `open`, /dev/zero never ends), opened
  with O_NONBLOCK and checked again on the descriptor (a file swapped in between), and read up
  to `limit` + 1 bytes whatever the size claims (a file growing meanwhile).
  """
  name = show(path)
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise UserError(f'{what} {name} does not exist. {fix}'.strip()) from None
  except OSError as e:
    raise UserError(f'{what} {name} cannot be read ({e.strerror}). {fix}'.strip()) from None
  _check_stat(st, name, limit, what)
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    raise UserError(f'{what} {name} cannot be opened ({e.strerror}).') from None
  try:
    _check_stat(os.fstat(fd), name, limit, what)
    chunks, total = [], 0
    while total <= limit:
      chunk = os.read(fd, min(1 << 24, limit + 1 - total))
      if not chunk:
        break
      chunks.append(chunk)
      total += len(chunk)
  except OSError as e:
    raise UserError(f'{what} {name} cannot be read ({e.strerror}).') from None
  finally:
    os.close(fd)
  if total > limit:
    raise UserError(f'{what} {name} grew past {limit:,} bytes while being read.')
  return b''.join(chunks)


def _check_stat(st, name: str, limit: int, what: str) -> None:
  if stat.S_ISDIR(st.st_mode):
    raise UserError(f'{what} {name} is a directory, not a file.')
  if not stat.S_ISREG(st.st_mode):
    raise UserError(f'{what} {name} is not a regular file (a FIFO, socket or device): jkd reads '
                    'exported files from disk only.')
  if st.st_size > limit:
    raise UserError(f'{what} {name} is {st.st_size:,} bytes, more than the {limit:,} a file of '
                    'its kind can be: it is not one.')


def _no_constant(name: str):
  raise ValueError(f'{name} is not a JSON number')


def read_info(path: str) -> dict:
  """FILE.json: the export's facts (format, bytes, sha256, model, image shape, classes, data
  config...), every field `check_info` checks, or UserError naming the field."""
  side = sidecar(path)
  data = read_regular(side, MAX_SIDECAR_BYTES, 'export description',
                      fix=f'`jkd export` writes it beside {show(path)}; jkd reads the image '
                      'shape, classes and checksum there. Export the file again with `jkd '
                      'export`, or copy FILE.json with it.')
  try:
    info = json.loads(data.decode('utf-8'), parse_constant=_no_constant)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise _bad_info(side, None, f'is not valid JSON ({type(e).__name__}: '
                    f'{show(str(e)[:120])})') from None
  if not isinstance(info, dict):
    raise _bad_info(side, None, f'holds a {type(info).__name__}, not a JSON object')
  check_info(info, side)
  return info


def _bad_info(side: str, field: str | None, what: str) -> UserError:
  where = f'field {field!r} ' if field else ''
  return UserError(f'{show(side)}: {where}{what}. It is not the description `jkd export` '
                   'writes: export the file again (or restore FILE.json beside it).')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _field(info: dict, side: str, key: str, ok, want: str, *, required: bool = True):
  if key not in info:
    if required:
      raise _bad_info(side, key, f'is missing ({want} expected)')
    return None
  value = info[key]
  if not ok(value):
    raise _bad_info(side, key, f'is {show(_short(value))}, not {want}')
  return value


def _short(value) -> str:
  text = json.dumps(value, default=str) if not isinstance(value, str) else value
  return text if len(text) <= 80 else text[:77] + '...'


def _finite_list(n: int, positive: bool = False):
  def ok(v):
    return (isinstance(v, list) and len(v) == n and all(
        (_is_int(x) or (isinstance(x, float) and math.isfinite(x))) and abs(x) <= 1e6
        and (x > 0 or not positive) for x in v))
  return ok


def check_info(info: dict, side: str) -> None:
  """Checks the fields of FILE.json that jkd reads (types and sane ranges)."""
  _field(info, side, 'format', lambda v: isinstance(v, str) and v in NAMES,
         f'one of {sorted(NAMES)}')
  # Optional only for files exported before FILE.json recorded them (the reader warns).
  _field(info, side, 'bytes', lambda v: _is_int(v) and 0 < v <= MAX_FILE_BYTES,
         'the size of FILE in bytes', required=False)
  _field(info, side, 'sha256', lambda v: isinstance(v, str) and re.fullmatch(
      '[0-9a-f]{64}', v) is not None, "FILE's sha256 as 64 hex digits (`jkd export` writes it)",
      required=False)
  shape = _field(info, side, 'image_shape', lambda v: isinstance(v, list) and len(v) == 3 and all(
      _is_int(d) for d in v) and 1 <= v[0] <= MAX_SIDE and 1 <= v[1] <= MAX_SIDE
      and 1 <= v[2] <= MAX_CHANNELS,
      f'[H, W, C] with sides 1..{MAX_SIDE} and 1..{MAX_CHANNELS} channels')
  _field(info, side, 'num_classes', lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES,
         f'a class count in 1..{MAX_CLASSES}')
  _field(info, side, 'int8', lambda v: isinstance(v, bool), 'true or false')
  _field(info, side, 'model', lambda v: isinstance(v, str) and 0 < len(v) <= 200,
         'a model name')
  _field(info, side, 'params', lambda v: _is_int(v) and 0 <= v < 1 << 40, 'a parameter count',
         required=False)
  _field(info, side, 'mean', _finite_list(shape[2]),
         f'{shape[2]} finite per-channel means', required=False)
  _field(info, side, 'std', _finite_list(shape[2], positive=True),
         f'{shape[2]} positive finite per-channel deviations', required=False)
  _field(info, side, 'data', lambda v: isinstance(v, dict), 'a data config object',
         required=False)
  _field(info, side, 'batch', lambda v: _is_int(v) and 1 <= v <= 65536,
         "the TFLite signature's batch (1..65536)", required=False)


# ---------------------------------------------------------------- the format of the bytes


def sniff(data: bytes) -> str | None:
  """The format the bytes hold: 'tflite' (flatbuffer identifier 'TFL3'), 'onnx' (a protobuf
  whose first field is ModelProto.ir_version, tag 0x08), 'stablehlo' (a flatbuffer whose root
  offset lies inside the file), or None."""
  if len(data) >= 8 and data[4:8] == b'TFL3':
    return 'tflite'
  if len(data) >= 2 and data[0] == 0x08:
    return 'onnx'
  if len(data) >= 8 and 8 <= int.from_bytes(data[:4], 'little') < len(data):
    return 'stablehlo'
  return None


def check_format(path: str, data: bytes) -> str:
  """The file's format from its suffix, checked against its bytes; UserError on a mismatch."""
  fmt = format_of(path)
  if not data:
    raise UserError(f'{show(path)} is empty (0 bytes): an interrupted copy or export? Export '
                    'it again with `jkd export`.')
  found = sniff(data)
  if found != fmt:
    holds = NAMES[found] if found else 'none of the formats jkd runs'
    fix = (f' (rename it to {next(e for e, f in FORMATS.items() if f == found)})'
           if found and found != 'stablehlo' else '')
    raise UserError(f'{show(path)} is named as {NAMES[fmt]}, but its bytes hold {holds}'
                    f'{fix}. jkd runs files that `jkd export` wrote, under their own suffix.')
  return fmt


# ---------------------------------------------------------------- the runner


def _bad_file(path: str, fmt: str, error: BaseException | str) -> UserError:
  detail = error if isinstance(error, str) else f'{type(error).__name__}: {str(error)[:200]}'
  return UserError(f'{show(path)} is damaged: it is not {NAMES[fmt]} that jkd can run '
                   f'({show(detail)}). Export it again with `jkd export`.')


def check_threads(threads) -> int:
  if not _is_int(threads) or not 1 <= threads <= MAX_THREADS:
    raise UserError(f'--threads {threads}: the runtime needs 1 to {MAX_THREADS} threads, e.g. '
                    '--threads 1 (what jkd bench reports by default).')
  return threads


class Runner:
  """A loaded file: `runner(pixels) -> logits`; `name` says which runtime and version.

  Attributes: path, format, threads, info (FILE.json), bytes (FILE's size), image_shape (H, W,
  C) and num_classes as the model's input and output say (checked against FILE.json).
  """

  def __init__(self, path: str, threads: int = 1, probe_batches=(1, 2)):
    self.path, self.threads = path, check_threads(threads)
    self.format = format_of(path)
    data = read_regular(path, MAX_FILE_BYTES, 'exported file',
                        fix=f'Write it with `jkd export --out {path}`.')
    check_format(path, data)
    self.info = read_info(path)
    side = sidecar(path)
    if self.info['format'] != self.format:
      raise _bad_info(side, 'format', f'says {self.info["format"]!r} for a {self.format} file')
    if 'sha256' not in self.info:
      print(f'warning: {show(side)} has no "sha256" (written by a jkd from before 2026-12): '
            f'nothing checks that it describes this {show(path)}. Export again to record it.',
            file=sys.stderr)
    elif self.info.get('bytes') != len(data) or self.info['sha256'] != hashlib.sha256(
        data).hexdigest():
      raise UserError(f'{show(side)} describes another file than {show(path)} (field '
                      f'"sha256"/"bytes": {self.info.get("bytes", 0):,} bytes recorded, {len(data):,} '
                      'found, checksums differ): FILE was replaced or changed after `jkd export` '
                      'wrote it, or an export was cut off between its two files. Export again.')
    self.bytes = len(data)
    self.image_shape = tuple(self.info['image_shape'])
    self.num_classes = self.info['num_classes']
    self._data = data
    if self.format != 'stablehlo' and probe_batches:
      self._probe(probe_batches)
    getattr(self, f'_open_{self.format}')()
    del self._data

  def _probe(self, batches) -> None:
    """Opens the file and runs it on zero images of each batch size in a forked child (the
    runtimes are not hardened against hostile files); UserError if that child fails, crashes,
    or takes more than PROBE_TIMEOUT_S. The child inherits the bytes already read."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python's and jax's warnings about fork and threads
      warnings.simplefilter('ignore')
      pid = os.fork()
    if pid == 0:  # The child: never returns into the caller's code.
      code = 3
      try:
        os.close(read)
        for sig in (signal.SIGTERM, signal.SIGINT):
          signal.signal(sig, signal.SIG_DFL)
        _limit_memory(PROBE_MEMORY)
        getattr(self, f'_open_{self.format}')()
        for b in batches:
          self(np.zeros((int(b), *self.image_shape), np.float32))
        code = 0
      except UserError as e:
        os.write(write, str(e).encode('utf-8', 'replace')[:4000])
        code = 2
      except BaseException as e:  # pylint: disable=broad-except
        os.write(write, f'{type(e).__name__}: {e}'.encode('utf-8', 'replace')[:4000])
      finally:
        os._exit(code)  # pylint: disable=protected-access
    os.close(write)
    try:
      message, status = _wait_probe(pid, read)
    finally:
      os.close(read)
    if status == 0:
      return
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2 and message:
      raise UserError(message)
    if os.WIFSIGNALED(status):
      sig = os.WTERMSIG(status)
      what = ('took more than %d s' % PROBE_TIMEOUT_S if sig == signal.SIGKILL and message is None
              else f'crashed ({signal.Signals(sig).name})')
      raise UserError(f'{show(self.path)}: its runtime {what} while loading it and running it on '
                      'blank images (in a separate process, so jkd itself is unharmed). The file '
                      'is damaged or hostile; export it again with `jkd export`.')
    raise _bad_file(self.path, self.format, message or f'loading it failed (status {status})')

  def _check_signature(self, inputs: list, outputs: list) -> None:
    """inputs / outputs: [(shape with None for a dynamic size, numpy dtype)] of the model."""
    want = (None, *self.image_shape)
    if len(inputs) != 1 or len(outputs) != 1:
      raise _bad_file(self.path, self.format, f'{len(inputs)} inputs and {len(outputs)} outputs; '
                      'jkd files take pixels and return logits')
    (shape, dtype), (out_shape, out_dtype) = inputs[0], outputs[0]
    if dtype != np.float32 or len(shape) != 4 or any(
        s is not None and s != w for s, w in zip(shape, want)):
      raise UserError(f'{show(self.path)} takes {np.dtype(dtype).name} '
                      f'{[s if s is not None else "B" for s in shape]}, but '
                      f'{show(sidecar(self.path))} (field "image_shape") says float32 images '
                      f'[B, {", ".join(map(str, self.image_shape))}]: the file and its '
                      'description do not belong together. Export again.')
    if out_dtype != np.float32 or len(out_shape) != 2 or out_shape[1] not in (
        None, self.num_classes):
      raise UserError(f'{show(self.path)} returns {np.dtype(out_dtype).name} '
                      f'{[s if s is not None else "B" for s in out_shape]}, but '
                      f'{show(sidecar(self.path))} (field "num_classes") says '
                      f'{self.num_classes} classes. Export again.')

  def _open_onnx(self):
    try:
      import onnx
      import onnxruntime as ort
    except ImportError:
      raise UserError("Running .onnx needs ONNX Runtime: pip install 'jkd[deploy]'.") from None
    from onnx import external_data_helper
    try:
      proto = onnx.load_model_from_string(self._data)
      tensors = external_data_helper._get_all_tensors(proto)  # pylint: disable=protected-access
      external = [t.name for t in tensors
                  if t.HasField('data_location') and t.data_location == onnx.TensorProto.EXTERNAL]
      onnx.checker.check_model(proto)
    except Exception as e:  # pylint: disable=broad-except  (protobuf and checker errors)
      raise _bad_file(self.path, 'onnx', e) from None
    if external:
      raise _bad_file(self.path, 'onnx', f'tensor {external[0]!r} is stored in an external '
                      'file; jkd files are self-contained and jkd reads no other file')
    options = ort.SessionOptions()
    options.intra_op_num_threads = self.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    options.add_session_config_entry('session.load_model_format', 'ONNX')
    try:
      self._session = ort.InferenceSession(self._data, options,
                                           providers=['CPUExecutionProvider'])
    except Exception as e:  # pylint: disable=broad-except  (ORT's pybind error classes)
      raise _bad_file(self.path, 'onnx', e) from None
    types = {'tensor(float)': np.float32}

    def sig(values):
      return [([d if _is_int(d) else None for d in (v.shape or [])],
               types.get(v.type, np.dtype('O'))) for v in values]
    self._check_signature(sig(self._session.get_inputs()), sig(self._session.get_outputs()))
    self._input = self._session.get_inputs()[0].name
    self.name = f'onnxruntime {ort.__version__} (CPUExecutionProvider)'

  def _open_tflite(self):
    try:
      from ai_edge_litert.interpreter import Interpreter
      import ai_edge_litert
      version = getattr(ai_edge_litert, '__version__', '')
    except ImportError:
      raise UserError("Running .tflite needs the LiteRT interpreter: pip install "
                      "'jkd[litert]' (ai-edge-litert).") from None
    self._model = bytes(self._data)  # The interpreter keeps a pointer into it: keep it alive.
    try:
      self._interpreter = Interpreter(model_content=self._model, num_threads=self.threads)
      ins = self._interpreter.get_input_details()
      outs = self._interpreter.get_output_details()
      tensors = self._interpreter.get_tensor_details()
    except Exception as e:  # pylint: disable=broad-except  (ValueError, RuntimeError)
      raise _bad_file(self.path, 'tflite', e) from None
    # The arena the interpreter allocates is the sum of its tensors: bounded here, before
    # `allocate_tensors`, so an edited shape cannot ask for terabytes.
    total = sum(int(np.prod(np.maximum(t['shape'], 1), dtype=np.float64)) * 4 for t in tensors)
    if total > 4 * MAX_FILE_BYTES:
      raise _bad_file(self.path, 'tflite', f'its tensors claim {total:,.0f} bytes')

    def sig(details):
      return [([None if i == 0 else int(d) for i, d in enumerate(x['shape'])],
               np.dtype(x['dtype'])) for x in details]
    self._check_signature(sig(ins), sig(outs))
    self._in, self._out = ins[0]['index'], outs[0]['index']
    self._batch = None
    self.fixed_batch = None  # Set when the graph cannot be resized (then it runs in chunks).
    self.name = f'ai-edge-litert {version} interpreter (XNNPACK)'.replace('  ', ' ')

  def _open_stablehlo(self):
    import jax
    _check_jax_trees(self.path, self._data)
    try:
      exported = jax.export.deserialize(bytearray(self._data))
      inputs = [([d if _is_int(d) else None for d in a.shape], np.dtype(a.dtype))
                for a in exported.in_avals]
      outputs = [([d if _is_int(d) else None for d in a.shape], np.dtype(a.dtype))
                 for a in exported.out_avals]
      platforms = tuple(exported.platforms)
    except Exception as e:  # pylint: disable=broad-except  (flatbuffer, version errors)
      raise _bad_file(self.path, 'stablehlo', e) from None
    self._check_signature(inputs, outputs)
    backend = jax.default_backend()
    if backend not in platforms:
      raise UserError(f'{show(self.path)} was exported for {", ".join(map(show, platforms))}, '
                      f'and jax runs on {backend} here: run it on that platform (e.g. '
                      'JAX_PLATFORMS=cpu), or export it on this one.')
    self._call = jax.jit(exported.call)
    try:  # Parses the program's StableHLO now: a damaged module fails here, not mid-run.
      self._call.lower(jax.ShapeDtypeStruct((1, *self.image_shape), np.float32))
    except Exception as e:  # pylint: disable=broad-except  (MLIR / XLA errors)
      raise _bad_file(self.path, 'stablehlo', e) from None
    self.name = f'jax {jax.__version__} ({jax.devices()[0].platform})'

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    pixels = np.ascontiguousarray(pixels, np.float32)
    if tuple(pixels.shape[1:]) != self.image_shape:
      raise UserError(f'{show(self.path)} takes images of shape {list(self.image_shape)} (its '
                      f'FILE.json), the data has {list(pixels.shape[1:])}: evaluate it on the '
                      'dataset and image size it was exported for.')
    try:
      if self.format == 'onnx':
        out = self._session.run(None, {self._input: pixels})[0]
      elif self.format == 'tflite':
        out = self._run_tflite(pixels)
      else:
        out = np.asarray(self._call(pixels))
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (the runtime's own error classes)
      raise _bad_file(self.path, self.format, f'running it failed: {type(e).__name__}: '
                      f'{str(e)[:200]}') from None
    if out.shape != (len(pixels), self.num_classes):
      raise _bad_file(self.path, self.format, f'it returned {list(out.shape)} for '
                      f'{len(pixels)} images of {self.num_classes} classes')
    return out

  def _run_tflite(self, pixels: np.ndarray) -> np.ndarray:
    it = self._interpreter
    if self._batch != len(pixels) and self.fixed_batch is None:
      try:
        it.resize_tensor_input(self._in, list(pixels.shape))
        it.allocate_tensors()
        self._batch = len(pixels)
      except RuntimeError:
        # The graph keeps its exported batch (a ViT's reshapes): a fresh interpreter (the
        # failed resize leaves this one unusable) runs in chunks of it.
        self._data = self._model
        self._open_tflite()
        del self._data
        it = self._interpreter
        it.allocate_tensors()
        self.fixed_batch = self._batch = int(it.get_input_details()[0]['shape'][0])
    if self.fixed_batch is not None and len(pixels) != self.fixed_batch:
      b, n = self.fixed_batch, len(pixels)
      padded = np.concatenate([pixels, np.zeros(((-n) % b, *pixels.shape[1:]), np.float32)])
      return np.concatenate([self._run_tflite(padded[i:i + b]) for i in range(0, n, b)])[:n]
    it.set_tensor(self._in, pixels)
    it.invoke()
    return it.get_tensor(self._out).copy()


def _limit_memory(extra: int) -> None:
  """RLIMIT_AS of this (child) process: what it maps now plus `extra` bytes."""
  import resource
  try:
    with open('/proc/self/status') as f:
      size = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
  except (OSError, StopIteration, ValueError):
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  limit = size + extra
  for bound in (soft, hard):  # Never above a limit the process already has.
    if bound != resource.RLIM_INFINITY:
      limit = min(limit, bound)
  resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _wait_probe(pid: int, read: int) -> tuple[str | None, int]:
  """(the child's message, its wait status); kills it after PROBE_TIMEOUT_S (message None)."""
  deadline = time.monotonic() + PROBE_TIMEOUT_S
  chunks = []
  while True:
    left = deadline - time.monotonic()
    ready = select.select([read], [], [], max(0.0, left))[0] if left > 0 else []
    if not ready:
      os.kill(pid, signal.SIGKILL)
      return None, os.waitpid(pid, 0)[1]
    chunk = os.read(read, 4096)
    if not chunk:  # The child closed the pipe: it has exited (or is exiting).
      break
    chunks.append(chunk)
  return b''.join(chunks).decode('utf-8', 'replace'), os.waitpid(pid, 0)[1]


def _check_jax_trees(path: str, data: bytes) -> None:
  """Counts the nodes of a jax.export program's argument and result trees (with a budget)
  before jax rebuilds them: its deserializer recurses over them without a limit, so an edited
  child offset could make a tree that takes forever to walk."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from jax._src.export import serialization_generated as ser
    exp = ser.Exported.GetRootAsExported(bytearray(data), 0)
    budget = [MAX_TREE_NODES]
    for tree in (exp.InTree(), exp.OutTree()):
      stack = [tree] if tree is not None else []
      while stack:
        node = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
          raise ValueError(f'its argument trees have more than {MAX_TREE_NODES} nodes')
        stack.extend(node.Children(i) for i in range(node.ChildrenLength()))
  except ImportError:
    return  # Another jax layout: its own deserializer's checks apply.
  except Exception as e:  # pylint: disable=broad-except  (struct / index errors of a bad buffer)
    raise _bad_file(path, 'stablehlo', e) from None


def open_file(path: str, threads: int = 1, probe_batches=(1, 2)) -> Runner:
  """Loads an exported file (with its FILE.json, both checked) in its runtime, after a probe
  in a child process that runs it at `probe_batches` (onnx, tflite)."""
  return Runner(path, threads, probe_batches)


def evaluate(runner: Runner, batches, check=None) -> dict:
  """Accuracy of the file over eval batches ({image uint8, label, mask}); `examples` counted.
  `check(where)` (e.g. `interrupt.check`) is called between batches."""
  correct = count = 0.0
  for batch in batches:
    if check is not None:
      check('during the evaluation of the file; nothing was written')
    logits = runner(np.asarray(batch['image'], np.float32))
    mask = np.asarray(batch['mask'], np.float64)
    correct += float(np.sum((logits.argmax(-1) == np.asarray(batch['label'])) * mask))
    count += float(np.sum(mask))
  return {'accuracy': correct / max(count, 1.0), 'examples': int(count)}


def latency(runner: Runner, image_shape, *, batch_sizes=(1, 32), repeats: int = 7,
            calls: int = 20, warmup: int = 10, seed: int = 0) -> dict:
  """Median latency of one call per batch size.

  Each repeat times `calls` back-to-back calls on one fixed random batch and keeps the mean;
  the reported `ms` is the median of `repeats` repeats (`ms_all` lists them), after `warmup`
  untimed calls. Also `images_per_s` at that median, the threads, runtime, CPU and load.
  """
  rng = np.random.default_rng(seed)
  out = {'runtime': runner.name, 'threads': runner.threads, 'file': runner.path,
         'file_bytes': runner.bytes, 'cpu': _cpu(), 'batches': {}}
  out['loadavg_before'] = [round(x, 2) for x in os.getloadavg()]
  for b in batch_sizes:
    x = rng.uniform(0, 255, (int(b), *image_shape)).astype(np.float32)
    for _ in range(warmup):
      runner(x)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(calls):
        runner(x)
      times.append((time.perf_counter() - t0) / calls * 1e3)
    ms = statistics.median(times)
    out['batches'][str(b)] = {'ms': round(ms, 4), 'ms_all': [round(t, 4) for t in times],
                              'images_per_s': round(b / ms * 1e3, 1)}
    if getattr(runner, 'fixed_batch', None) not in (None, b):
      out['batches'][str(b)]['note'] = (f'the file keeps batch {runner.fixed_batch}: '
                                        f'{-(-b // runner.fixed_batch)} calls')
  out['loadavg_after'] = [round(x, 2) for x in os.getloadavg()]
  return out


def _cpu() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return f'{line.split(":", 1)[1].strip()} ({os.cpu_count()} cores)'
  except OSError:
    pass
  return f'{platform.processor() or platform.machine()} ({os.cpu_count()} cores)'
