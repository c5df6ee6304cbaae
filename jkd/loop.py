"""The one training loop every trainer shares.

A trainer supplies a `Task`: how to build the state, a pure train step
`step(state, batch, key) -> (state, metrics)`, an eval step and its data. The loop does the rest
once for all jobs: sharded init, one jit with explicit shardings and donated state, resume from
`WORKDIR/checkpoints` (state + data-iterator position), progress lines, JSONL/TensorBoard
metrics, periodic eval, async checkpoints, a clean save on SIGTERM/SIGINT, `summary.json`.

What it promises (docs/reliability.md): a signal at any moment stops the run at the next safe
point with a checkpoint of the step reached (exit 128 + signal); a step whose loss, metrics or
resulting state is not finite is never saved, and stops the run (after `config.nan_patience`
skipped updates) with `summary.json` marking it failed; `metrics.jsonl` keeps one line per
logged step across resumes; a damaged or foreign checkpoint is a UserError, and an older step is
used only when `config.resume_from_step` names it.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import interrupt
from jkd import parallel
from jkd import storage
from jkd.checkpoint import RunCheckpointer, model_params
from jkd.errors import TrainingDiverged, UserError
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


def _stop_agreed(step: int | None = None, every: int = 1) -> bool:
  """Whether every process stops here because of SIGTERM/SIGINT (`jkd.interrupt`).

  One process: as soon as a signal arrived. Several: a checkpoint save is collective, so all
  must stop at the same step, and a signal may reach one host only, or the hosts at different
  steps (a TPU maintenance event, `scancel` of one task). At the same points on every process
  (every `every` steps in the loop; `step=None` at the fixed points before and after it) the
  flags are all-gathered; any one set stops them all. That costs one small collective and a
  host sync per check, hence not every step.
  """
  if jax.process_count() == 1:
    return interrupt.received() is not None
  if step is not None and step % every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(interrupt.received() or 0))
  return bool(np.any(np.asarray(flags)))


def _finite(tree) -> jax.Array:
  """True iff every float leaf of `tree` is finite (no NaN or inf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_all_finite = jax.jit(_finite)  # Checked on the state before each save.


def _skip_nonfinite(train_step: Callable) -> Callable:
  """`train_step` that keeps the previous params and optimizer state when the step's metrics or
  new state are not finite (`config.nan_patience` > 0); the step counter still advances, so the
  data and the step keys stay those of an uninterrupted run."""
  def step(state, batch, key, *extra):
    new_state, metrics = train_step(state, batch, key, *extra)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    ok = ok & _finite(new_state)
    kept = state.replace(step=new_state.step)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, kept)
    return new_state, metrics
  return step


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


def evaluate(eval_fn, state, batches: Iterable, mesh, extra_args=(),
             should_stop: Callable[[], bool] | None = None, *,
             keep_arrays: bool = False) -> dict[str, Any] | None:
  """Sums the per-batch sums of `eval_fn` over one pass and derives accuracy / mean loss.

  Scalar sums become means over the examples; array sums (the [K, K] `confusion` counts) are
  returned as numpy totals with `keep_arrays=True` (`jkd eval`), else dropped (metrics lines).
  Returns None if `should_stop()` turned true between batches (a signal: the run stops)."""
  totals: dict[str, Any] = {}
  for local in batches:
    if should_stop is not None and should_stop():
      return None
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

  Raises:
    interrupt.Interrupted: SIGTERM/SIGINT; the step reached is saved first.
    TrainingDiverged: a non-finite step (nothing of it saved; summary.json says so).
    UserError: a checkpoint that does not fit or cannot be read, a step that does not fit in
      memory.
  """
  start_wall = time.time()
  workdir = storage.resolve(workdir)
  mesh = parallel.make_mesh(config.get('mesh'))
  parallel.check_batch_divisible(task.global_batch_size, mesh)
  ckpt = RunCheckpointer(workdir, keep=config.get('keep_checkpoints', 3))
  writer = MetricWriter(workdir, total_steps=task.total_steps, label=label or task.kind)
  try:
    with interrupt.deferred(), parallel.use_rules(parallel.merge_rules(
        config.get('sharding_rules'))):
      return _run(task, config, workdir, mesh, ckpt, writer, start_wall)
  except (jax.errors.JaxRuntimeError, MemoryError) as e:
    if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(
        e).lower():
      raise UserError(
          f'The step does not fit in memory at config.batch_size={config.batch_size} '
          f'({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}). Lower '
          '--config.batch_size, use --config.model.remat=full (ViTs), or shard over more '
          'devices; `jkd plan --config ...` shows what fits. Existing checkpoints are '
          'untouched.') from None
    raise
  finally:
    ckpt.close()
    writer.close()
    close = getattr(task.train_iterator, 'close', None)
    if close is not None:  # stops reader workers; frees the batches they buffered ahead
      close()


def _check_same_model(ckpt: RunCheckpointer, task: Task, step: int) -> None:
  meta = ckpt.read_meta(step)
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


def _restore_step(ckpt: RunCheckpointer, config) -> int | None:
  """The step to resume from: `config.resume_from_step` when set (it must exist), else the
  latest; None for a fresh run."""
  wanted = int(config.get('resume_from_step', 0) or 0)
  if not wanted:
    return ckpt.latest_step()
  steps = ckpt.manager.all_steps()
  if wanted not in steps:
    raise UserError(f'config.resume_from_step={wanted}: {ckpt.directory} has no such step (it '
                    f'has {", ".join(map(str, steps)) or "none"}). Pass one of them, or 0 for the '
                    'latest.')
  return wanted


def _eval_owed(writer: MetricWriter, step: int, split: str) -> bool:
  """Whether the eval of `step` is missing from metrics.jsonl (process 0 decides for all)."""
  owed = not writer.logged(step, split)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    owed = bool(multihost_utils.broadcast_one_to_all(np.int32(owed)))
  return owed


def _nonfinite(metrics: Mapping[str, Any]) -> list[str]:
  """The metrics of a step that are not finite, loss terms first."""
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  return sorted(bad, key=lambda k: (not k.startswith('loss'), k != 'loss', k))


class _Divergence:
  """Counts consecutive non-finite steps against `config.nan_patience` (updates of such steps
  are skipped when the patience is > 0; with 0 the run stops at the first)."""

  def __init__(self, patience: int, info):
    self.patience, self.info, self.streak = patience, info, 0

  def check(self, entries: list[tuple[int, Any]]) -> None:
    """`entries`: (step, metrics on device) in order. Raises _Diverged past the patience."""
    for at_step, metrics in entries:
      host = jax.device_get(metrics)
      bad = _nonfinite(host)
      if not bad:
        self.streak = 0
        continue
      self.streak += 1
      if self.streak > self.patience:
        raise _Diverged(at_step, bad, host, self.streak)
      self.info(f'step {at_step}: {", ".join(bad)} not finite; update skipped '
                f'({self.streak} of config.nan_patience={self.patience} in a row)')


class _Diverged(Exception):

  def __init__(self, step: int, bad: list[str], metrics: Mapping[str, Any], streak: int):
    super().__init__(step)
    self.step, self.bad, self.metrics, self.streak = step, bad, metrics, streak


def _diverged_message(e: _Diverged, config, last_saved: int | None) -> str:
  values = ', '.join(f'{k}={float(np.asarray(e.metrics[k]).ravel()[0])}' for k in e.bad[:4])
  terms = [k for k in e.bad if k.startswith('loss_')]
  what = (f'the loss term{"s" if len(terms) > 1 else ""} {", ".join(terms)}' if terms else
          'the loss' if 'loss' in e.bad else f'{", ".join(e.bad[:3])}')
  lr = config.optim.get('lr') if config.get('optim') else None
  suggestion = (f'Lower the learning rate (config.optim.lr={lr:g}; try '
                f'--config.optim.lr={lr / 10:g} or less)' if isinstance(lr, (int, float))
                and math.isfinite(lr) and lr > 0 else 'Lower config.optim.lr')
  kept = (f'the last good checkpoint (step {last_saved}) is kept' if last_saved is not None
          else 'no checkpoint was saved')
  streak = f' ({e.streak} steps in a row)' if e.streak > 1 else ''
  return (f'Training diverged: {what} went non-finite at step {e.step}{streak} ({values}). The '
          f'run stopped without saving that step; {kept}, and summary.json marks the run '
          f'failed. {suggestion}, keep config.optim.grad_clip on, or let a few bad steps be '
          'skipped with --config.nan_patience=N; then run the same command again to resume.')


def _run(task, config, workdir, mesh, ckpt, writer, start_wall) -> dict:
  single = jax.process_count() == 1
  init_key, step_key = run_keys(config)
  state, state_shardings = init_sharded(task.init_state, init_key, mesh)
  # The kept model's size: a distilled student's, without its projectors.
  n_params = param_count(model_params(state.params, task.meta.get('params_prefix', ())))
  restore_step = _restore_step(ckpt, config)
  if restore_step is not None:
    _check_same_model(ckpt, task, restore_step)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, state_shardings)
    state, data_state, _ = ckpt.restore(abstract, expect_kind=task.kind, step=restore_step)
    if config.get('resume_from_step'):
      ckpt.discard_after(restore_step, log=writer.info)
    if data_state:
      task.train_iterator.set_state(data_state)
    writer.info(f'resumed from {ckpt.directory} at step {int(state.step)}')
  elif task.on_init is not None:
    state = task.on_init(state)
  writer.resume(int(state.step))
  writer.info(f'{n_params:,} parameters; mesh {dict(mesh.shape)}; {jax.device_count()} '
              f'{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); '
              f'global batch {task.global_batch_size}')

  patience = int(config.get('nan_patience', 0) or 0)
  step_task = dataclasses.replace(task, train_step=_skip_nonfinite(task.train_step)
                                  ) if patience else task
  step_fn, extra_args = jit_train_step(step_task, mesh, state_shardings)
  eval_fn = (jax.jit(task.eval_step, out_shardings=parallel.replicated(mesh))
             if task.eval_step is not None else None)

  log_every = max(int(config.get('log_every', 50)), 1)
  eval_every = int(config.get('eval_every', 0))
  ckpt_every = int(config.get('checkpoint_every', 0))
  # Multi-process runs agree on stopping every this many steps (see `_stop_agreed`).
  stop_check_every = max(int(config.get('stop_check_every', 10)), 1)
  meta = dict(task.meta, kind=task.kind, params=n_params, config=config.to_dict(),
              model_defaults=models.MODEL_DEFAULTS_VERSION)
  step = start_step = int(state.step)
  last_saved = ckpt.latest_step()
  throughput, pending, unchecked, last_loss = Throughput(), [], [], float('nan')
  divergence = _Divergence(patience, writer.info)
  eval_results: dict[str, float] = {}

  def save(at_step: int) -> None:
    nonlocal last_saved
    if last_saved == at_step:  # Already saved (a signal on a checkpoint step).
      return
    divergence.check(unchecked)
    unchecked.clear()
    if not bool(_all_finite(state)):  # Finite metrics, but the update overflowed.
      raise _Diverged(at_step, ['params'], {'params': np.float32('nan')}, 1)
    ckpt.save(at_step, state, task.train_iterator.get_state(), meta)
    last_saved = at_step

  def stop(at_step: int, where: str = '') -> None:
    """Saves the step reached (if any step ran) and raises Interrupted."""
    signum = interrupt.received() or signal.SIGTERM  # Another process's signal stopped this one.
    if at_step > start_step:
      save(at_step)
    ckpt.wait()
    if last_saved is None:
      text = (f'stopped by signal {int(signum)} {where or "during start-up"}, before step 1; '
              'nothing to save. Run the same command again to start.')
    else:
      text = (f'stopped by signal {int(signum)} at step {at_step}{" " + where if where else ""};'
              f' checkpoint saved (step {last_saved}). Run the same command again to resume.')
    writer.info(text)
    raise interrupt.Interrupted(signum, text)

  def run_eval(at_step: int) -> dict[str, float] | None:
    if eval_fn is None or task.eval_batches is None:
      return {}
    t0 = time.perf_counter()
    results = evaluate(eval_fn, state, task.eval_batches(), mesh, extra_args,
                       should_stop=(lambda: interrupt.received() is not None) if single else None)
    if results is None:
      return None
    writer.write(at_step, {'split': config.get('eval_split_name', 'test'), **results})
    shown = '  '.join(f'{k} {v:.4f}' for k, v in results.items() if k != 'examples')
    writer.info(f'eval at step {at_step}: {shown}  ({time.perf_counter() - t0:.1f}s)')
    return results

  try:
    if _stop_agreed():
      stop(step, 'during start-up')
    if (eval_every and step % eval_every == 0 and 0 < step < task.total_steps
        and _eval_owed(writer, step, config.get('eval_split_name', 'test'))):
      # The run was stopped during this step's eval: run it now, as an uninterrupted run did.
      results = run_eval(step)
      if results is None:
        stop(step, 'during an evaluation')
      eval_results = results
    throughput.start()
    first = True
    while step < task.total_steps:
      batch = parallel.global_batch(next(task.train_iterator), mesh)
      state, metrics = step_fn(state, batch, step_key, *extra_args)
      step += 1
      pending.append(metrics)
      unchecked.append((step, metrics))
      throughput.add(task.global_batch_size)
      if first:  # Exclude compilation from the throughput figures.
        jax.block_until_ready(metrics)
        throughput.start()
        first = False
      # The previous step is (almost always) done by now: checking it costs no pipeline stall.
      divergence.check(unchecked[:-1])
      del unchecked[:-1]
      if step % log_every == 0 or step == task.total_steps:
        divergence.check(unchecked)
        unchecked.clear()
        host = jax.device_get(pending)
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        pending = []
        rate = throughput.rate()
        last_loss = avg['loss']
        eta = (task.total_steps - step) * task.global_batch_size / rate if rate else 0.0
        writer.write(step, {**avg, 'examples_per_sec': rate})
        writer.progress(step, avg['loss'], rate, eta)
      if ckpt_every and step % ckpt_every == 0 and step < task.total_steps:
        save(step)
      if eval_every and step % eval_every == 0 and step < task.total_steps:
        results = run_eval(step)
        if results is None:
          stop(step, 'during an evaluation')
        eval_results = results
      if _stop_agreed(step, stop_check_every):
        stop(step)

    save(step)
    ckpt.wait()
    if _stop_agreed():
      stop(step, 'after the last step (the final evaluation runs when the command is run again)')
    results = run_eval(step)
    if results is None or _stop_agreed():
      stop(step, 'during the final evaluation (it runs again when the command is run again)')
    eval_results = results or eval_results
  except _Diverged as e:
    ckpt.wait()
    message = _diverged_message(e, config, last_saved)
    writer.info(message)
    if jax.process_index() == 0:
      storage.write_json(storage.join(workdir, 'summary.json'), {
          'kind': task.kind, 'status': 'failed', 'error': message, 'failed_at_step': e.step,
          'nonfinite': e.bad, 'steps': last_saved or 0, 'checkpoint_step': last_saved,
          'wall_s': round(time.time() - start_wall, 2), 'params': n_params,
          'model': task.meta.get('model')})
    raise TrainingDiverged(message) from None

  summary = {
      'kind': task.kind,
      'status': 'ok',
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
  if _stop_agreed():
    stop(step, 'while finishing (export, figures); they are redone when the command is run '
         'again')
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'summary.json'), summary)
  writer.info(f'done in {format_duration(summary["wall_s"])}: ' + ', '.join(
      f'{k}={v}' for k, v in summary.items() if k in ('test_accuracy', 'steps', 'examples_per_sec')))
  return summary
