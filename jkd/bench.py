"""`jkd bench`: times a job's train step on synthetic data on the available accelerator.

  jkd bench --config configs/bench/vit_b16.py --workdir /tmp/bench_vit_b16

The step is the job's own (`build_task` of the command's trainer, `JOBS`), jitted exactly as
`jkd.loop.run` jits it (same shardings, donated state). It is fed one fixed batch that stays on
the device, so the figures measure the step alone, not the host input pipeline. After
`config.bench.warmup_steps` untimed steps, `config.bench.steps` steps are timed
`config.bench.repeats` times; the median repeat is reported.

Writes `WORKDIR/bench.json` (see `run`) and prints a short table.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jkd import data, loop, parallel, storage, trainers
from jkd.errors import UserError
from jkd.models import param_count
from jkd.teacher import Teacher

# bench job -> (the command whose trainer's step is timed, config fields the job sets).
# Adding a job is one line here once its trainer's task can be built without a prior workdir.
JOBS: dict[str, tuple[str, dict[str, Any]]] = {
    'supervised': ('train', {}),
    'mae': ('pretrain', {'method': 'mae'}),
    'simmim': ('pretrain', {'method': 'simmim'}),
    # A frozen teacher from config.teacher.workdir, or config.teacher.model with zero weights
    # (a benchmark needs its cost, not its knowledge).
    'distill': ('distill', {}),
    # `jkd compress`'s step (config.quant QAT, config.prune) from random weights, not from
    # config.init_from: the same reasoning.
    'compress': ('compress', {}),
}

# Dense (no sparsity) bf16 tensor-core peak per device, from the vendors' spec sheets.
# Matched as substrings of `device.device_kind`, first match wins (so 'H100 PCIe' precedes
# 'H100'). The lent H100 measures ~798 TFLOP/s on a large bf16 matmul, ~81% of its spec: MFU
# here is against the spec, as papers report it.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ('H100 PCIe', 756e12, 'NVIDIA H100 PCIe spec sheet, dense bf16'),
    ('H100', 989e12, 'NVIDIA H100 SXM spec sheet, dense bf16'),
    ('H200', 989e12, 'NVIDIA H200 spec sheet, dense bf16 (same chip as H100 SXM)'),
    ('A100', 312e12, 'NVIDIA A100 spec sheet, dense bf16'),
    ('TPU v4', 275e12, 'Google TPU v4 spec, bf16'),
    ('TPU v5 lite', 197e12, 'Google TPU v5e spec, bf16'),
    ('TPU v5e', 197e12, 'Google TPU v5e spec, bf16'),
    ('TPU v5', 459e12, 'Google TPU v5p spec, bf16'),
    ('TPU v6 lite', 918e12, 'Google TPU v6e (Trillium) spec, bf16'),
    ('TPU v6e', 918e12, 'Google TPU v6e (Trillium) spec, bf16'),
)

MEASURED_CPU = 'measured fp32 matmul'
INPUT_NOTE = ('one fixed synthetic batch resident on the device: host input pipeline not '
              'measured')


def default_bench_config() -> ml_collections.ConfigDict:
  """The `config.bench` group: job, warmup_steps, steps, repeats, peak_flops (0 = look up)."""
  return ml_collections.ConfigDict(dict(
      job='supervised', warmup_steps=3, steps=10, repeats=3, peak_flops=0.0))


def imagenet_bench_config(model: dict, arg: str | None) -> ml_collections.ConfigDict:
  """The shared bench recipe of `configs/bench/*.py`: ImageNet-size synthetic data (224×224×3,
  1000 classes), global batch 256, AdamW without clipping or label smoothing (as the timm
  reference). `arg` 'cpu' or 'tiny' shrinks it to a CPU check: 32×32, batch 8, float32 (XLA's
  CPU bf16 is emulated, and a jitted bf16 ResNet gives NaN there in jax 0.12)."""
  from jkd.data import default_data_config
  from jkd.defaults import base_config
  c = base_config()
  c.bench = default_bench_config()
  c.data = default_data_config('synthetic')
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.model = ml_collections.ConfigDict(model)
  c.batch_size = 256
  c.total_steps = 10_000      # Sizes the lr schedule only.
  c.optim.name = 'adamw'
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  if arg in ('cpu', 'tiny'):
    _shrink_for_cpu(c)
  elif arg not in (None, '', 'gpu', 'tpu'):
    raise ValueError(f'unknown config arg {arg!r}; use gpu, tpu, cpu or tiny')
  return c


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Benchmarks the train step of `config.bench.job`; returns and writes `bench.json`.

  Args:
    config: a run config (model, data, optim, batch_size...) with an optional `bench` group
      (see `default_bench_config`). The data is replaced by synthetic data of the same image
      shape and number of classes, so nothing is read from disk.
    workdir: where `bench.json` goes.

  Returns:
    A dict with `examples_per_sec` and `step_ms` (median repeat), `step_ms_all` (every repeat),
    `mfu` (the step's FLOP/s over `peak_flops` × `num_devices`; a measured CPU peak is for the
    whole host), `peak_flops` (per device) and `peak_source`,
    `flops_per_example` and `flops_source`, `peak_memory_bytes` (per device) and
    `memory_source`, `device`, `num_devices`, `jax_version`, `batch_size`, `model`, `dtype`,
    `job`, `params`, `compile_s`, `final_loss` and `input`; job 'compress' adds its `quant`
    and `prune` groups.
  """
  settings = default_bench_config()
  settings.update(config.get('bench', {}))
  if settings.job not in JOBS:
    raise UserError(f'config.bench.job={settings.job!r} is unknown; benchmarkable jobs: '
                    f'{", ".join(sorted(JOBS))}.')
  for name in ('steps', 'repeats'):
    if int(settings[name]) < 1:
      raise UserError(f'config.bench.{name}={settings[name]} must be at least 1.')
  command, job_fields = JOBS[settings.job]
  config = _bench_run_config(config, job_fields)
  storage.makedirs(workdir)
  inputs = {}
  if settings.job == 'distill':
    from jkd import memory  # pylint: disable=g-import-not-at-top
    config = memory.distill_config(config)
    if not config.teacher.get('workdir'):
      if not config.teacher.get('model'):
        raise UserError('config.bench.job=distill needs a teacher: --config.teacher.model=NAME '
                        '(zero weights, for timing) or --config.teacher.workdir=DIR.')
      inputs['teacher'] = Teacher.named(config)
  if settings.job == 'compress' and not ('quant' in config and 'prune' in config):
    raise UserError('config.bench.job=compress needs the config.quant and config.prune groups '
                    'of `jkd compress` (as in configs/bench/qat_vit_s16.py).')
  with parallel.use_rules(parallel.merge_rules(config.get('sharding_rules'))):
    return _time_job(config, settings, trainers.get(command, config), inputs, workdir)


def _time_job(config, settings, trainer: trainers.Trainer, inputs: dict, workdir: str) -> dict:
  """Builds the job's task, compiles its step, times it and writes `bench.json`."""
  task = trainer.build_task(config, workdir, **inputs)
  mesh = parallel.make_mesh(config.get('mesh'))
  parallel.check_batch_divisible(task.global_batch_size, mesh)
  init_key, step_key = loop.run_keys(config)
  state, state_shardings = loop.init_sharded(task.init_state, init_key, mesh)
  n_params = param_count(state.params)

  # Exactly the step `jkd.loop.run` trains with: explicit shardings, donated state.
  step_fn, extra_args = loop.jit_train_step(task, mesh, state_shardings)
  rep = parallel.replicated(mesh)
  # One batch from the job's own (synthetic) pipeline, so its keys are what the step expects;
  # it is placed once and reused, which keeps host-side input out of the timing.
  batch = parallel.global_batch(next(task.train_iterator), mesh)
  _close(task.train_iterator)
  # A compiled executable checks argument shardings instead of moving arrays: place the key.
  step_key = jax.device_put(step_key, rep)
  args = (batch, step_key, *extra_args)

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, *args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  times, final_loss = _time_steps(compiled, state, args, settings)

  step_s = statistics.median(times)
  batch_size = task.global_batch_size
  flops_step, flops_source = _step_flops(lowered, compiled)
  device = jax.devices()[0]
  num_devices = jax.device_count()
  peak, peak_source = _peak_flops(device, settings.peak_flops)
  # A measured CPU peak already used every core of the host, which simulated CPU devices share.
  peak_devices = 1 if peak_source == MEASURED_CPU else num_devices
  memory, memory_source = _peak_memory(compiled, device)
  result = {
      'job': settings.job,
      'model': config.model.name,
      'dtype': config.model.get('dtype', 'float32'),
      'batch_size': batch_size,
      'image_shape': task.meta.get('image_shape'),
      'params': n_params,
      'examples_per_sec': round(batch_size / step_s, 2),
      'step_ms': round(step_s * 1e3, 3),
      'step_ms_all': [round(t * 1e3, 3) for t in times],
      'mfu': (round(flops_step / step_s / (peak * peak_devices), 5)
              if flops_step and peak else None),
      'peak_flops': peak,
      'peak_source': peak_source,
      'flops_per_example': flops_step / batch_size if flops_step else None,
      'flops_source': flops_source,
      'peak_memory_bytes': memory,
      'memory_source': memory_source,
      'device': device.device_kind,
      'platform': device.platform,
      'num_devices': num_devices,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      'jax_version': jax.__version__,
      'python_version': platform.python_version(),
      'warmup_steps': int(settings.warmup_steps),
      'steps': int(settings.steps),
      'repeats': int(settings.repeats),
      'compile_s': round(compile_s, 2),
      'final_loss': final_loss if np.isfinite(final_loss) else str(final_loss),
      'input': INPUT_NOTE,
  }
  if settings.job == 'compress':  # `dtype` alone would hide the int8 fake quantization.
    result['quant'] = config.quant.to_dict()
    result['prune'] = config.prune.to_dict()
  if jax.process_index() == 0:
    _report(result, final_loss, workdir)
  return result


def _time_steps(compiled, state, args: tuple, settings) -> tuple[list[float], float]:
  """Runs `settings.warmup_steps` untimed steps, then times `settings.repeats` runs of
  `settings.steps` steps: (seconds per step of each repeat, the last step's loss)."""
  for _ in range(int(settings.warmup_steps)):
    state, metrics = compiled(state, *args)
  jax.block_until_ready((state, metrics) if settings.warmup_steps else state)
  times = []
  for _ in range(int(settings.repeats)):
    t0 = time.perf_counter()
    for _ in range(int(settings.steps)):
      state, metrics = compiled(state, *args)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / int(settings.steps))
  return times, float(jax.device_get(metrics['loss']))


def _report(result: dict, final_loss: float, workdir: str) -> None:
  """Writes `bench.json` and prints the table (process 0)."""
  storage.write_json(storage.join(workdir, 'bench.json'), result)
  print(format_table(result))
  if not np.isfinite(final_loss):
    print(f'warning: the loss is {final_loss} after the timed steps; the timing stands but '
          'the step is numerically broken at these settings (on CPU use dtype float32).')


def _shrink_for_cpu(c: ml_collections.ConfigDict) -> None:
  """The ':cpu'/':tiny' size of a bench config: 32×32, batch 8, float32, a few timed steps."""
  c.data.image_size = 32
  c.batch_size = 8
  c.model.dtype = 'float32'
  c.bench.warmup_steps, c.bench.steps, c.bench.repeats = 1, 3, 3


def mim_bench_config(recipe: str, arg: str | None) -> ml_collections.ConfigDict:
  """A SimMIM/MAE pretraining recipe (a `configs/imagenet/*.py` path) made a bench config:
  synthetic data at the recipe's image size, global batch 256 (as the supervised bench, so the
  two compare per example), `bench.job` = the recipe's method. `arg` 'cpu'/'tiny' shrink it as
  `imagenet_bench_config` does (32×32, batch 8, float32, XLA attention; 'tiny': 2 blocks)."""
  from jkd.config import load_config  # pylint: disable=g-import-not-at-top
  c = load_config(recipe)
  c.bench = default_bench_config()
  c.bench.job = c.method
  size = c.data.image_size
  c.data = data.default_data_config('synthetic')
  c.data.image_size = size
  c.data.num_classes = 1000
  c.batch_size = 256
  c.total_steps = 10_000      # Sizes the lr schedule only.
  c.optim.warmup_steps = 0
  c.optim.lr_batch_base = 0
  if arg in ('cpu', 'tiny'):
    _shrink_for_cpu(c)
    c.model.attention = 'xla'
    if c.get('mask_patch_size'):
      c.mask_patch_size = 16   # a multiple of the 16-pixel patches that divides 32
    if arg == 'tiny':
      c.model.depth = 2
      if 'decoder_depth' in c.model:
        c.model.decoder_depth = 1
  elif arg == 'tpu':
    c.model.attention = 'xla'   # cuDNN is NVIDIA-only.
  elif arg not in (None, '', 'gpu'):
    raise ValueError(f'unknown config arg {arg!r}; use gpu, tpu, cpu or tiny')
  return c


def _bench_run_config(config: ml_collections.ConfigDict,
                      job_fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with synthetic data of the same shape and the job's fields set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for k, v in job_fields.items():
    config[k] = v
  if config.data.name != 'synthetic':
    info = data.get_info(config.data)  # Shape and classes only; UserError if it is missing.
    synthetic = data.default_data_config('synthetic')
    synthetic.image_size = info.image_shape[0]
    synthetic.channels = info.image_shape[2]
    synthetic.num_classes = info.num_classes
    config.data = synthetic
  # One batch is read, in the calling thread: reader threads would only sit idle.
  config.data.num_workers = 0
  config.data.prefetch = 1
  # The task asks for no more steps than the bench runs (it sizes the lr schedule from this).
  if not config.get('total_steps', 0):
    config.total_steps = 10_000
  return config


def _close(iterator) -> None:
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()


def _step_flops(lowered, compiled) -> tuple[float | None, str]:
  """FLOPs of one global step from XLA's cost analysis.

  The lowered (global, not yet partitioned) module counts every op of the step once, whatever
  the mesh. The compiled module counts per device, including work each device repeats (the
  optimizer update of replicated parameters: +65% for a 2-block ViT-S on 8 CPU devices), so it
  is only the fallback. Custom calls such as cuDNN fused attention count zero in both, which
  makes MFU a slight underestimate for ViTs with attention='cudnn' (the attention matmuls are
  ~4% of ViT-B/16's FLOPs at 196 tokens).
  """
  flops = _flops_of(_cost(lowered))
  if flops:
    return flops, 'xla cost_analysis of the lowered (global) step'
  flops = _flops_of(_cost(compiled))
  if flops:
    return flops * jax.device_count(), 'xla cost_analysis of the compiled step x devices'
  return None, 'unavailable'


def _cost(stage) -> Any:
  try:
    return stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None


def _flops_of(cost: Any) -> float | None:
  # jax returned a list of per-computation dicts before 0.4.30 and one dict since.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get('flops')
  return float(value) if value and value > 0 else None


def _peak_flops(device, override: float) -> tuple[float | None, str]:
  """Peak bf16 FLOP/s of one device: the override, the spec table, or a CPU measurement."""
  if override:
    return float(override), 'config.bench.peak_flops'
  for pattern, flops, source in PEAK_BF16_FLOPS:
    if pattern.lower() in device.device_kind.lower():
      return flops, source
  if device.platform == 'cpu':
    return measure_matmul_flops(device), MEASURED_CPU
  return None, (f'unknown device {device.device_kind!r}: set --config.bench.peak_flops '
                'to get an MFU')


def measure_matmul_flops(device=None, n: int = 2048, repeats: int = 3) -> float:
  """FLOP/s of the best of `repeats` fp32 n×n matmuls on `device`.

  CPUs have no meaningful published bf16 peak (and XLA's CPU bf16 is emulated), so the CPU
  "peak" is what XLA's own fp32 matmul reaches on this machine, with all its threads.
  """
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def _peak_memory(compiled, device) -> tuple[int | None, str]:
  """Peak bytes per device: the allocator's high-water mark, else XLA's static estimate."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU has none)
    pass
  if stats and stats.get('peak_bytes_in_use'):
    return int(stats['peak_bytes_in_use']), 'device.memory_stats peak_bytes_in_use'
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return None, 'unavailable'
  # Donated inputs are aliased to outputs and counted once.
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return int(total), 'compiled.memory_analysis: arguments + outputs - aliased + temp'


def _compression(r: dict) -> str:
  """A compress result's quantization and pruning for the table (', QAT w8/a8'); else ''."""
  notes = []
  q = r.get('quant') or {}
  if q.get('enabled'):
    notes.append(f'{q.get("mode", "qat").upper()} w{q.get("weight_bits")}/a{q.get("act_bits")}')
  p = r.get('prune') or {}
  if p.get('enabled'):
    notes.append(f'pruned {p.get("n_m") or p.get("target_sparsity")}')
  return ''.join(f', {n}' for n in notes)


def format_table(r: dict) -> str:
  """A short human-readable summary of a bench result."""
  def num(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else 'n/a'
  rows = [
      ('job / model', f'{r["job"]} / {r["model"]} ({r["dtype"]}{_compression(r)}, batch '
                      f'{r["batch_size"]}, image {tuple(r["image_shape"] or ())})'),
      ('device', f'{r["num_devices"]} x {r["device"]} (jax {r["jax_version"]})'),
      ('examples/s', num(r['examples_per_sec'], ',.1f')),
      ('step ms (median)', f'{num(r["step_ms"], ".2f")}  (repeats: '
                           f'{", ".join(f"{t:.2f}" for t in r["step_ms_all"])})'),
      ('GFLOP/example', num((r['flops_per_example'] or 0) / 1e9, '.3f')),
      ('MFU', f'{num(r["mfu"] * 100 if r["mfu"] is not None else None, ".2f")}% of '
              f'{num((r["peak_flops"] or 0) / 1e12, ".2f")} TFLOP/s/device ({r["peak_source"]})'),
      ('peak memory', f'{num((r["peak_memory_bytes"] or 0) / 2**20, ",.1f")} MiB/device '
                      f'({r["memory_source"]})'),
      ('compile s', num(r['compile_s'], '.1f')),
      ('input', r['input']),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k.ljust(width)}  {v}' for k, v in rows)
