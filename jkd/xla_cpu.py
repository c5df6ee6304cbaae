"""Half-precision runs on a CPU: one XLA workaround and one warning, set before the backend starts.

XLA's CPU compiler (jax 0.12) miscompiles some bfloat16 graphs in its YNNPACK element-wise and
reduction fusions: a bf16 ResNet's jitted inference returned NaN logits for every image of a
batch of 8 or more (the same graph un-jitted, or with those fusions off, is finite), so a bf16
run reported eval `loss nan` while it trained well. Keeping YNNPACK for the dots and
convolutions alone avoids it. The flag is read when the backend starts, so `prepare` must run
before the first computation; it touches nothing in float32 runs (their numerics and speed stay
as they are) and nothing where the user set the flag.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
YNN_SAFE = 'individual_dot,individual_convolution'
HALF = ('bfloat16', 'float16')


def half_precision(config) -> bool:
  """Whether the run computes anything (model or teacher) in bfloat16 / float16."""
  dtypes = [config.get('model', {}).get('dtype'), config.get('teacher', {}).get('dtype')]
  return any(d in HALF for d in dtypes)


def prepare(config, log: Callable[[str], None] | None = None) -> None:
  """For a half-precision run: sets the YNNPACK workaround in XLA_FLAGS if the backend has not
  started and the user has not set the flag, and warns when the run will compute on a CPU."""
  if not half_precision(config):
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  flags = os.environ.get('XLA_FLAGS', '')
  if YNN_FLAG not in flags and not xla_bridge.backends_are_initialized():
    os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}={YNN_SAFE}'.strip()
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'cpu':
    (log or (lambda m: print(m, file=sys.stderr)))(
        'warning: this run computes in bfloat16/float16 on a CPU, which has no half-precision '
        'kernels: XLA emulates them, often slower than float32 (a ResNet-18 at 224x224 trains at '
        'well under 1 image/s on 2 cores). Use --config.model.dtype=float32 (and '
        '--config.teacher.dtype=float32) on a CPU; keep bfloat16 for GPUs and TPUs.')


def peek_config(checkpoints: str) -> dict:
  """The config saved with the newest step under a local `checkpoints/` directory, read as plain
  JSON before Orbax (which starts the backend) opens it; {} where there is none to read. Only
  for `prepare`: the checkpoint itself is validated when it is restored."""
  try:
    steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
    with open(os.path.join(checkpoints, str(max(steps)), 'meta', 'metadata'), 'rb') as f:
      config = json.loads(f.read(1 << 20)).get('config')
    return config if isinstance(config, dict) else {}
  except (OSError, ValueError, AttributeError):  # remote, absent, damaged: nothing to prepare
    return {}
