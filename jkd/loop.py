"""The one training loop every trainer shares.

A trainer supplies a `Task`: how to build the state, a pure train step
`step(state, batch, key) -> (state, metrics)`, an eval step and its data. The loop does the rest
once for all jobs: sharded init, one jit with explicit shardings and donated state, resume from
`WORKDIR/checkpoints` (state + data-iterator position), progress lines, JSONL/TensorBoard
metrics, periodic eval, async checkpoints, a clean save on SIGTERM/SIGINT, `summary.json`.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import parallel
from jkd import storage
from jkd.checkpoint import RunCheckpointer, model_params
from jkd.errors import UserError
from jkd.metrics import MetricWriter, Throughput, format_duration
from jkd import models
from jkd.models import param_count


class TrainState(flax.struct.PyTreeNode):
  """Everything a step updates. `model_state` holds non-param collections (BatchNorm stats)."""
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any

  def apply_gradients(self, grads, tx: optax.GradientTransformation, **changes) -> 'TrainState':
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


@dataclasses.dataclass
class Task:
  """What a trainer hands to `run`.

  Attributes:
    kind: 'train', 'pretrain', 'distill', 'compress' — stored with checkpoints so a workdir is
      never resumed by a different kind of run.
    init_state: key -> TrainState whose params may be `nn.Partitioned` boxes (logical names).
    train_step: (state, batch, key) -> (state, metrics dict of scalars); `loss` is required.
    eval_step: (state, batch) -> dict of per-batch sums, including `correct` and `count` for
      classification (accuracy = correct / count); None if the task has no eval.
    train_iterator: yields local batches (dicts of numpy arrays); has get_state/set_state.
    eval_batches: () -> one pass of local eval batches (with a `mask` key), or None.
    global_batch_size, total_steps: the run's size.
    meta: written beside every checkpoint (model name, config...).
    place_extra_args: mesh -> (args, shardings): extra non-donated arguments of train_step and
      eval_step after their usual ones (e.g. the frozen teacher's variables, sharded by the same
      rules as the student), placed on the mesh, with their shardings.
  """
  kind: str
  init_state: Callable[[jax.Array], TrainState]
  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[..., dict] | None
  train_iterator: Iterator[Mapping[str, np.ndarray]]
  eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None
  global_batch_size: int
  total_steps: int
  meta: dict
  place_extra_args: Callable[[Any], tuple[tuple, tuple]] | None = None
  on_init: Callable[[TrainState], TrainState] | None = None  # e.g. load pretrained weights.
  # Extra summary items / figures, from the final state and the final eval's results.
  on_finish: Callable[[TrainState, dict], dict] | None = None


def run_keys(config) -> tuple[jax.Array, jax.Array]:
  """(init key, step key) of a run, from `config.seed` and `config.rng_impl`.

  The init key makes the state; the step key is what every train step receives (each step folds
  in its step number). Anything that must redraw a step's randomness outside the loop (the
  teacher cache redraws mixup) takes the step key from here.
  """
  # rbg: XLA's RngBitGenerator. Its init compiles ~8x faster than threefry on CPU (30 s -> 4 s
  # for a small ResNet) and gives the same parameters on every mesh we test; 'threefry2x32' is
  # the portable choice when bit-identical randomness across backends matters.
  base_key = jax.random.key(config.seed, impl=config.get('rng_impl', 'rbg'))
  init_key, step_key = jax.random.split(base_key)
  return init_key, step_key


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag so the loop can checkpoint and exit cleanly."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. some test runners): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    if self.received is not None:  # Second signal: stop now.
      raise KeyboardInterrupt
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int, every: int) -> bool:
    """Whether every process stops after `step`.

    One process: as soon as a signal arrived. Several: a checkpoint save is collective, so all
    must stop at the same step, and a signal may reach one host only, or the hosts at different
    steps (a TPU maintenance event, `scancel` of one task). Every `every` steps (the same steps
    on all processes) the flags are all-gathered; any one set stops them all. That costs one
    small collective and a host sync per check, hence not every step.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    return bool(np.any(np.asarray(flags)))


def abstract_sharded_state(init_state: Callable, key: jax.Array, mesh) -> tuple[Any, Any]:
  """The state's (unboxed) `jax.ShapeDtypeStruct`s, each with its sharding under the active
  logical-axis rules, and those shardings; nothing is allocated. What a restore or a
  compile-only memory plan needs."""
  abstract = jax.eval_shape(init_state, key)
  shardings = parallel.tree_shardings(abstract, mesh)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         nn.meta.unbox(abstract), shardings)
  return structs, shardings


def init_sharded(init_state: Callable, key: jax.Array, mesh) -> tuple[TrainState, Any]:
  """Creates the state already sharded by the logical-axis rules (never whole on one device)."""
  abstract = jax.eval_shape(init_state, key)
  shardings = parallel.tree_shardings(abstract, mesh)
  state = jax.jit(lambda k: nn.meta.unbox(init_state(k)), out_shardings=shardings)(key)
  return state, shardings


def jit_train_step(task: Task, mesh, state_shardings) -> tuple[Callable, tuple]:
  """The jitted train step every job runs (and `jkd bench` times): explicit in/out shardings,
  donated state. Returns (step_fn, extra_args placed on the mesh)."""
  extra_args, extra_shardings = (task.place_extra_args(mesh) if task.place_extra_args
                                 else ((), ()))
  step_fn = jax.jit(
      task.train_step,
      in_shardings=(state_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh))
      + tuple(extra_shardings),
      out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return step_fn, extra_args


def evaluate(eval_fn, state, batches: Iterable, mesh, extra_args=(), *,
             keep_arrays: bool = False) -> dict[str, Any]:
  """Sums the per-batch sums of `eval_fn` over one pass and derives accuracy / mean loss.

  Scalar sums become means over the examples; array sums (the [K, K] `confusion` counts) are
  returned as numpy totals with `keep_arrays=True` (`jkd eval`), else dropped (metrics lines)."""
  totals: dict[str, Any] = {}
  for local in batches:
    sums = eval_fn(state, parallel.global_batch(local, mesh), *extra_args)
    totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  arrays = {k: np.asarray(v) for k, v in totals.items() if np.ndim(v)}
  totals = {k: float(v) for k, v in totals.items() if not np.ndim(v)}
  count = max(totals.get('count', 0.0), 1.0)
  out = {k: v / count for k, v in totals.items() if k != 'count'}
  if 'correct' in out:
    out['accuracy'] = out.pop('correct')
  out['examples'] = int(totals.get('count', 0))
  if keep_arrays:
    out.update(arrays)
  return out


def run(task: Task, config, workdir: str, *, label: str | None = None) -> dict:
  """Trains `task` to `task.total_steps`, resuming from `workdir/checkpoints` if present.

  Returns the summary dict, also written to `workdir/summary.json`.
  """
  start_wall = time.time()
  workdir = storage.resolve(workdir)
  mesh = parallel.make_mesh(config.get('mesh'))
  parallel.check_batch_divisible(task.global_batch_size, mesh)
  ckpt = RunCheckpointer(workdir, keep=config.get('keep_checkpoints', 3))
  writer = MetricWriter(workdir, total_steps=task.total_steps, label=label or task.kind)
  try:
    with parallel.use_rules(parallel.merge_rules(config.get('sharding_rules'))):
      return _run(task, config, workdir, mesh, ckpt, writer, start_wall)
  finally:
    ckpt.close()
    writer.close()
    close = getattr(task.train_iterator, 'close', None)
    if close is not None:  # stops reader workers; frees the batches they buffered ahead
      close()


def _check_same_model(ckpt: RunCheckpointer, task: Task) -> None:
  meta = ckpt.read_meta()
  saved, now = meta.get('model'), task.meta.get('model')
  if saved and now and saved != now:
    raise UserError(
        f'{ckpt.directory} holds checkpoints of model {saved!r}, but the config asks for {now!r}. '
        'Use a fresh --workdir for the new model, or the config the run was started with; the '
        'existing checkpoints were left untouched.')
  # A run saved before a default changed keeps the old value (jkd.models.LEGACY_DEFAULTS).
  saved_model = (meta.get('config') or {}).get('model') or {}
  for field, old in models.legacy_fields(meta).items():
    current = (task.meta.get('model_fields') or {}).get(field)
    if field not in saved_model and current is not None and current != old:
      raise UserError(
          f'{ckpt.directory} was started with model.{field}={old!r} (the default before '
          f'2026-12), but this config gives {current!r}: resuming would change what the run '
          f'computes. Resume with --config.model.{field}={old}; the existing checkpoints were '
          'left untouched.')


def _run(task, config, workdir, mesh, ckpt, writer, start_wall) -> dict:
  init_key, step_key = run_keys(config)
  state, state_shardings = init_sharded(task.init_state, init_key, mesh)
  # The kept model's size: a distilled student's, without its projectors.
  n_params = param_count(model_params(state.params, task.meta.get('params_prefix', ())))
  latest = ckpt.latest_step()
  if latest is not None:
    _check_same_model(ckpt, task)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_shardings)
    state, data_state, _ = ckpt.restore(abstract, expect_kind=task.kind)
    if data_state:
      task.train_iterator.set_state(data_state)
    writer.info(f'resumed from {ckpt.directory} at step {int(state.step)}')
  elif task.on_init is not None:
    state = task.on_init(state)
  writer.info(f'{n_params:,} parameters; mesh {dict(mesh.shape)}; {jax.device_count()} '
              f'{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); '
              f'global batch {task.global_batch_size}')

  step_fn, extra_args = jit_train_step(task, mesh, state_shardings)
  eval_fn = (jax.jit(task.eval_step, out_shardings=parallel.replicated(mesh))
             if task.eval_step is not None else None)

  log_every = max(int(config.get('log_every', 50)), 1)
  eval_every = int(config.get('eval_every', 0))
  ckpt_every = int(config.get('checkpoint_every', 0))
  # Multi-process runs agree on stopping every this many steps (see `_StopSignal.agreed`).
  stop_check_every = max(int(config.get('stop_check_every', 10)), 1)
  meta = dict(task.meta, kind=task.kind, params=n_params, config=config.to_dict(),
              model_defaults=models.MODEL_DEFAULTS_VERSION)
  step = int(state.step)
  throughput, pending, last_loss = Throughput(), [], float('nan')
  eval_results: dict[str, float] = {}

  def save(at_step: int) -> None:
    ckpt.save(at_step, state, task.train_iterator.get_state(), meta)

  def run_eval(at_step: int) -> dict[str, float]:
    if eval_fn is None or task.eval_batches is None:
      return {}
    t0 = time.perf_counter()
    results = evaluate(eval_fn, state, task.eval_batches(), mesh, extra_args)
    writer.write(at_step, {'split': config.get('eval_split_name', 'test'), **results})
    shown = '  '.join(f'{k} {v:.4f}' for k, v in results.items() if k != 'examples')
    writer.info(f'eval at step {at_step}: {shown}  ({time.perf_counter() - t0:.1f}s)')
    return results

  with _StopSignal() as stop:
    throughput.start()
    first = True
    while step < task.total_steps:
      batch = parallel.global_batch(next(task.train_iterator), mesh)
      state, metrics = step_fn(state, batch, step_key, *extra_args)
      step += 1
      pending.append(metrics)
      throughput.add(task.global_batch_size)
      if first:  # Exclude compilation from the throughput figures.
        jax.block_until_ready(metrics)
        throughput.start()
        first = False
      if step % log_every == 0 or step == task.total_steps:
        host = jax.device_get(pending)
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        pending = []
        rate = throughput.rate()
        last_loss = avg['loss']
        eta = (task.total_steps - step) * task.global_batch_size / rate if rate else 0.0
        writer.write(step, {**avg, 'examples_per_sec': rate})
        writer.progress(step, avg['loss'], rate, eta)
        if not np.isfinite(last_loss):
          writer.info('loss is not finite; stopping. Lower config.optim.lr or enable '
                      'config.optim.grad_clip. The last checkpoints are kept.')
          break
      if ckpt_every and step % ckpt_every == 0 and step < task.total_steps:
        save(step)
      if eval_every and step % eval_every == 0 and step < task.total_steps:
        eval_results = run_eval(step)
      if stop.agreed(step, stop_check_every):
        save(step)
        ckpt.wait()
        signum = stop.received or signal.SIGTERM  # Another process's signal stopped this one.
        writer.info(f'stopped by signal {int(signum)} at step {step}; checkpoint saved. Run '
                    'the same command again to resume.')
        raise SystemExit(128 + int(signum))

  if ckpt.latest_step() != step:
    save(step)
  eval_results = run_eval(step) or eval_results
  ckpt.wait()
  summary = {
      'kind': task.kind,
      'steps': step,
      'wall_s': round(time.time() - start_wall, 2),
      'params': n_params,
      'examples_per_sec': round(throughput.overall(), 1),
      'final_train_loss': last_loss,
      **({'test_accuracy': eval_results['accuracy']} if 'accuracy' in eval_results else {}),
      'eval': eval_results,
      'model': task.meta.get('model'),
  }
  if task.on_finish is not None:
    summary.update(task.on_finish(state, eval_results) or {})
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'summary.json'), summary)
  writer.info(f'done in {format_duration(summary["wall_s"])}: ' + ', '.join(
      f'{k}={v}' for k, v in summary.items() if k in ('test_accuracy', 'steps', 'examples_per_sec')))
  return summary
