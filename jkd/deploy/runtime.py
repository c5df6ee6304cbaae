"""Running an exported file in its own runtime: ONNX Runtime, the LiteRT interpreter, jax.export.

  runner = open_file('student.onnx', threads=1)
  logits = runner(pixels)                    # float32 (B, H, W, C) in [0, 255] -> (B, classes)
  evaluate(runner, batches)                  # accuracy over jkd eval batches
  latency(runner, batch_sizes=(1, 32))       # median ms per call, threads stated

Only the runtime of the file's format is imported, so a benchmark process holds one framework.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np

from jkd.errors import UserError

FORMATS = {'.onnx': 'onnx', '.tflite': 'tflite', '.stablehlo': 'stablehlo',
           '.jaxexport': 'stablehlo'}


def format_of(path: str) -> str:
  """'onnx', 'tflite' or 'stablehlo' from the file name; UserError for anything else."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise UserError(f'{path!r}: jkd runs .onnx, .tflite and .stablehlo files (as written by '
                    '`jkd export`); name the file by its format.')
  return FORMATS[ext]


def sidecar(path: str) -> str:
  """The JSON that `jkd export` writes beside FILE: FILE.json."""
  return path + '.json'


def read_info(path: str) -> dict:
  """The export's facts (model, image shape, classes, data config, calibration...) or {}."""
  if os.path.isfile(sidecar(path)):
    with open(sidecar(path)) as f:
      return json.load(f)
  return {}


class Runner:
  """A loaded file: `runner(pixels) -> logits`; `name` says which runtime and version."""

  def __init__(self, path: str, threads: int = 1):
    if not os.path.isfile(path):
      raise UserError(f'{path!r} does not exist: write it with `jkd export --out {path}`.')
    self.path, self.threads, self.format = path, int(threads), format_of(path)
    getattr(self, f'_open_{self.format}')()

  def _open_onnx(self):
    try:
      import onnxruntime as ort
    except ImportError:
      raise UserError("Running .onnx needs ONNX Runtime: pip install 'jkd[deploy]'.") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = self.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    self._session = ort.InferenceSession(self.path, options, providers=['CPUExecutionProvider'])
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
    self._interpreter = Interpreter(model_path=self.path, num_threads=self.threads)
    self._in = self._interpreter.get_input_details()[0]['index']
    self._out = self._interpreter.get_output_details()[0]['index']
    self._batch = None
    self.fixed_batch = None  # Set when the graph cannot be resized (then it runs in chunks).
    self.name = f'ai-edge-litert {version} interpreter (XNNPACK)'.replace('  ', ' ')

  def _open_stablehlo(self):
    import jax
    with open(self.path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    self._call = jax.jit(exported.call)
    self.name = f'jax {jax.__version__} ({jax.devices()[0].platform})'

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    pixels = np.ascontiguousarray(pixels, np.float32)
    if self.format == 'onnx':
      return self._session.run(None, {self._input: pixels})[0]
    if self.format == 'tflite':
      return self._run_tflite(pixels)
    return np.asarray(self._call(pixels))


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
        self._open_tflite()
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


def open_file(path: str, threads: int = 1) -> Runner:
  """Loads an exported file in its runtime with `threads` intra-op threads."""
  return Runner(path, threads)


def evaluate(runner: Runner, batches) -> dict:
  """Accuracy of the file over eval batches ({image uint8, label, mask}); `examples` counted."""
  correct = count = 0.0
  for batch in batches:
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
         'file_bytes': os.path.getsize(runner.path), 'cpu': _cpu(), 'batches': {}}
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
