"""Run outputs: `metrics.jsonl`, TensorBoard event files, and a progress line on stdout.

Only process 0 writes; the workdir may be local or a bucket URL (see `jkd.storage.LineLog`). Every JSONL line has `step`; train lines have `loss` and
`examples_per_sec`; eval lines have `split` and `accuracy`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping

import jax

from jkd import storage


def _scalar(v: Any) -> Any:
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN; keep it visible.
  return v


def _tensorboard(logdir: str):
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # tensorboardX writes gs:// and s3:// logdirs itself (google-cloud-storage, boto3).
    return SummaryWriter(logdir)
  except ImportError:  # TensorBoard files are a convenience, JSONL is the record.
    return None


def _kind(record: Mapping[str, Any]) -> tuple[str, int]:
  """What a metrics line is: ('train', step) or ('eval:SPLIT', step)."""
  return ('eval:' + str(record['split']) if 'split' in record else 'train', int(record['step']))


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class MetricWriter:
  """Appends metrics to JSONL and TensorBoard, prints progress lines."""

  def __init__(self, workdir: str, *, total_steps: int, label: str = 'train',
               tensorboard: bool = True, stream=None):
    self.is_main = jax.process_index() == 0
    self.total_steps = total_steps
    self.label = label
    self.stream = stream or sys.stdout
    self._tb = self._tb_dir = None
    self._keys: set[tuple[str, int]] = set()  # (kind, step) of the lines in metrics.jsonl
    if self.is_main:
      storage.makedirs(workdir)
      self._jsonl = storage.LineLog(storage.join(workdir, 'metrics.jsonl'))
      # Opened at the first line written: a run refused before training leaves no event file.
      self._tb_dir = storage.join(workdir, 'tensorboard') if tensorboard else None

  def resume(self, step: int) -> None:
    """Drops the lines an earlier attempt wrote after checkpoint `step` (the run redoes those
    steps) and any line cut off by a kill, so `metrics.jsonl` keeps exactly one line per logged
    step and eval whatever the number of resumes. Call it before the first `write`."""
    if not self.is_main:
      return
    kept = self._jsonl.rewrite(lambda record: record['step'] <= step)
    self._keys = {_kind(record) for record in kept}

  def logged(self, step: int, split: str | None = None) -> bool:
    """Whether metrics.jsonl has the train line (or the eval line of `split`) of `step`
    (process 0 only knows; others answer False)."""
    return (('eval:' + split) if split else 'train', int(step)) in self._keys

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
    if not self.is_main:
      return
    record = {'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    key = _kind(record)
    if key in self._keys:  # e.g. the final eval again, after a stop during the final phase
      self._jsonl.rewrite(lambda r: _kind(r) != key)
    self._keys.add(key)
    self._jsonl.write(json.dumps(record))
    if self._tb is None and self._tb_dir is not None:
      self._tb_dir, self._tb = None, _tensorboard(self._tb_dir)
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f'{prefix}{k}', v, step)

  def progress(self, step: int, loss: float, examples_per_sec: float, eta_s: float,
               extra: str = '') -> None:
    if not self.is_main:
      return
    width = len(str(self.total_steps))
    line = (f'[{self.label}] step {step:>{width}}/{self.total_steps}  loss {loss:.4f}  '
            f'{examples_per_sec:,.0f} ex/s  ETA {format_duration(eta_s)}')
    print(line + (f'  {extra}' if extra else ''), file=self.stream, flush=True)

  def info(self, text: str) -> None:
    if self.is_main:
      print(f'[{self.label}] {text}', file=self.stream, flush=True)

  def flush(self) -> None:
    """Makes every line written so far readable in metrics.jsonl (a bucket's is uploaded)."""
    if self.is_main and self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self.is_main and self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
      if self._tb is not None:
        self._tb.close()


class Throughput:
  """Examples/s over the interval since the last call, excluding the first (compile) step."""

  def __init__(self):
    self.t0 = None
    self.n = 0
    self.total_time = 0.0
    self.total_examples = 0

  def start(self) -> None:
    self.t0, self.n = time.perf_counter(), 0

  def add(self, examples: int) -> None:
    self.n += examples

  def rate(self) -> float:
    """Examples/s since start(); restarts the interval."""
    now = time.perf_counter()
    dt = now - self.t0 if self.t0 is not None else 0.0
    rate = self.n / dt if dt > 0 else 0.0
    self.total_time += dt
    self.total_examples += self.n
    self.t0, self.n = now, 0
    return rate

  def overall(self) -> float:
    return self.total_examples / self.total_time if self.total_time > 0 else 0.0
