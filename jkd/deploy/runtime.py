"""Running an exported file in its own runtime: ONNX Runtime, the LiteRT interpreter, jax.export.

  runner = open_file('student.onnx', threads=1)
  logits = runner(pixels)                    # float32 (B, H, W, C) in [0, 255] -> (B, classes)
  evaluate(runner, batches)                  # accuracy over jkd eval batches
  latency(runner, batch_sizes=(1, 32))       # median ms per call, threads stated

Only the runtime of the file's format is imported, so a benchmark process holds one framework.

An exported file is untrusted input: `open_file` gets FILE's bytes and FILE.json from
`exported_file.read` (regular files of bounded size, format from the bytes, FILE.json's fields
and checksum checked), runs an .onnx or .tflite file first in a forked child (`probe`), and
checks the model itself here: its one input must be float32 (B, H, W, C) of FILE.json's
`image_shape` and its one output (B, num_classes); an ONNX file may not reference external data
files (it would make the runtime read paths the file names); a .tflite file's tensors are
bounded before `allocate_tensors`. Every failure is a `UserError` naming the file (exit 2).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from jkd.deploy import exported_file, probe
from jkd.deploy.exported_file import (MAX_FILE_BYTES, bad_file, check_jax_trees, is_int,
                                      show, sidecar)
from jkd.errors import UserError

MAX_THREADS = 1024


def check_threads(threads) -> int:
  if not is_int(threads) or not 1 <= threads <= MAX_THREADS:
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
    self.format, data, self.info = exported_file.read(path)
    self.bytes = len(data)
    self.image_shape = tuple(self.info['image_shape'])
    self.num_classes = self.info['num_classes']
    self._data = data
    if self.format != 'stablehlo' and probe_batches:
      probe.run_in_child(self.path, self.format, lambda: self._open_and_run(probe_batches))
    getattr(self, f'_open_{self.format}')()
    del self._data

  def _open_and_run(self, batches) -> None:
    """The probe's attempt: opens the file and runs it on zero images of each batch size."""
    getattr(self, f'_open_{self.format}')()
    for b in batches:
      self(np.zeros((int(b), *self.image_shape), np.float32))

  def _check_signature(self, inputs: list, outputs: list) -> None:
    """inputs / outputs: [(shape with None for a dynamic size, numpy dtype)] of the model."""
    want = (None, *self.image_shape)
    if len(inputs) != 1 or len(outputs) != 1:
      raise bad_file(self.path, self.format, f'{len(inputs)} inputs and {len(outputs)} outputs; '
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
      raise bad_file(self.path, 'onnx', e) from None
    if external:
      raise bad_file(self.path, 'onnx', f'tensor {external[0]!r} is stored in an external '
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
      raise bad_file(self.path, 'onnx', e) from None
    types = {'tensor(float)': np.float32}

    def sig(values):
      return [([d if is_int(d) else None for d in (v.shape or [])],
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
      raise bad_file(self.path, 'tflite', e) from None
    # The arena the interpreter allocates is the sum of its tensors: bounded here, before
    # `allocate_tensors`, so an edited shape cannot ask for terabytes.
    total = sum(int(np.prod(np.maximum(t['shape'], 1), dtype=np.float64)) * 4 for t in tensors)
    if total > 4 * MAX_FILE_BYTES:
      raise bad_file(self.path, 'tflite', f'its tensors claim {total:,.0f} bytes')

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
    check_jax_trees(self.path, self._data)
    try:
      exported = jax.export.deserialize(bytearray(self._data))
      inputs = [([d if is_int(d) else None for d in a.shape], np.dtype(a.dtype))
                for a in exported.in_avals]
      outputs = [([d if is_int(d) else None for d in a.shape], np.dtype(a.dtype))
                 for a in exported.out_avals]
      platforms = tuple(exported.platforms)
    except Exception as e:  # pylint: disable=broad-except  (flatbuffer, version errors)
      raise bad_file(self.path, 'stablehlo', e) from None
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
      raise bad_file(self.path, 'stablehlo', e) from None
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
      raise bad_file(self.path, self.format, f'running it failed: {type(e).__name__}: '
                     f'{str(e)[:200]}') from None
    if out.shape != (len(pixels), self.num_classes):
      raise bad_file(self.path, self.format, f'it returned {list(out.shape)} for '
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
