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
from jkd import tasks
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
    eval_step: (state, batch) -> dict of per-batch sums, with `count` (valid examples) and the
      sums its `task_type` turns into a metric; None if the run has no eval.
    train_iterator: yields local batches (dicts of numpy arrays); has get_state/set_state.
    eval_batches: () -> one pass of local eval batches (with a `mask` key), or None.
    global_batch_size, total_steps: the run's size.
    meta: written beside every checkpoint (model name, config...).
    place_extra_args: mesh -> (args, shardings): extra non-donated arguments of train_step and
      eval_step after their usual ones (e.g. the frozen teacher's variables, sharded by the same
      rules as the student), placed on the mesh, with their shardings.
    task_type: what the model predicts (a `jkd.tasks` object; None: the default task): it
      turns eval sums into the metric and says what summary.json reports.
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
  task_type: Any = None


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
             keep_arrays: bool = False, task_type=None) -> dict[str, Any] | None:
  """Sums the per-batch sums of `eval_fn` over one pass; `task_type` (`jkd.tasks`, default
  classification) makes its metric of them (accuracy), the other scalars are means.

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
  out = (task_type or tasks.get()).results(out)
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
  run = _Run(task, config, workdir, mesh, ckpt, writer, start_wall)
  try:
    run.start()
    run.train_steps()
    run.last_save_and_eval()
  except _Diverged as e:
    run.fail(e)
  return run.finish()


class _Run:
  """One call of `run` once its mesh, checkpointer and writer exist: the state, the step
  reached, the last step saved, the metrics not yet logged or checked for finiteness, and what
  saves, stops, evaluates and trains it. Every process calls `_stop_agreed` at the same points
  (`start`, every `stop_check_every` steps of `train_steps`, `last_save_and_eval`, `finish`)."""

  def __init__(self, task: Task, config, workdir: str, mesh, ckpt: RunCheckpointer,
               writer: MetricWriter, start_wall: float):
    self.task, self.config, self.workdir, self.mesh = task, config, workdir, mesh
    self.ckpt, self.writer, self.start_wall = ckpt, writer, start_wall
    self.task_type = task.task_type or tasks.get(config)
    self.single = jax.process_count() == 1
    init_key, self.step_key = run_keys(config)
    state, state_shardings = init_sharded(task.init_state, init_key, mesh)
    # The kept model's size: a distilled student's, without its projectors.
    self.n_params = param_count(model_params(state.params, task.meta.get('params_prefix', ())))
    self.state = self._restore_or_init(state, state_shardings)
    writer.resume(int(self.state.step))
    writer.info(f'{self.n_params:,} parameters; mesh {dict(mesh.shape)}; {jax.device_count()} '
                f'{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es); '
                f'global batch {task.global_batch_size}')

    patience = int(config.get('nan_patience', 0) or 0)
    step_task = dataclasses.replace(task, train_step=_skip_nonfinite(task.train_step)
                                    ) if patience else task
    self.step_fn, self.extra_args = jit_train_step(step_task, mesh, state_shardings)
    self.eval_fn = (jax.jit(task.eval_step, out_shardings=parallel.replicated(mesh))
                    if task.eval_step is not None else None)

    self.log_every = max(int(config.get('log_every', 50)), 1)
    self.eval_every = int(config.get('eval_every', 0))
    self.ckpt_every = int(config.get('checkpoint_every', 0))
    # Multi-process runs agree on stopping every this many steps (see `_stop_agreed`).
    self.stop_check_every = max(int(config.get('stop_check_every', 10)), 1)
    self.meta = dict(task.meta, kind=task.kind, params=self.n_params, config=config.to_dict(),
                     model_defaults=models.MODEL_DEFAULTS_VERSION)
    self.step = self.start_step = int(self.state.step)
    self.last_saved = ckpt.latest_step()
    self.throughput, self.last_loss = Throughput(), float('nan')
    self.pending: list = []  # Metrics of the steps since the last log line.
    self.unchecked: list[tuple[int, Any]] = []  # (step, metrics) not yet checked finite.
    self.divergence = _Divergence(patience, writer.info)
    self.eval_results: dict[str, float] = {}

  def _restore_or_init(self, state: TrainState, state_shardings) -> TrainState:
    """The state of the checkpoint to resume from (the data iterator goes to its position), or
    the fresh `state` after `task.on_init` when there is none."""
    task, ckpt, config = self.task, self.ckpt, self.config
    restore_step = _restore_step(ckpt, config)
    if restore_step is not None:
      _check_same_model(ckpt, task, restore_step)
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              state, state_shardings)
      state, data_state, _ = ckpt.restore(abstract, expect_kind=task.kind, step=restore_step)
      if config.get('resume_from_step'):
        ckpt.discard_after(restore_step, log=self.writer.info)
      if data_state:
        task.train_iterator.set_state(data_state)
      self.writer.info(f'resumed from {ckpt.directory} at step {int(state.step)}')
    elif task.on_init is not None:
      state = task.on_init(state)
    return state

  def save(self, at_step: int) -> None:
    if self.last_saved == at_step:  # Already saved (a signal on a checkpoint step).
      return
    self.divergence.check(self.unchecked)
    self.unchecked.clear()
    if not bool(_all_finite(self.state)):  # Finite metrics, but the update overflowed.
      raise _Diverged(at_step, ['params'], {'params': np.float32('nan')}, 1)
    self.ckpt.save(at_step, self.state, self.task.train_iterator.get_state(), self.meta)
    self.last_saved = at_step

  def stop(self, at_step: int, where: str = '') -> None:
    """Saves the step reached (if any step ran) and raises Interrupted."""
    signum = interrupt.received() or signal.SIGTERM  # Another process's signal stopped this one.
    if at_step > self.start_step:
      self.save(at_step)
    self.ckpt.wait()
    if self.last_saved is None:
      text = (f'stopped by signal {int(signum)} {where or "during start-up"}, before step 1; '
              'nothing to save. Run the same command again to start.')
    else:
      text = (f'stopped by signal {int(signum)} at step {at_step}{" " + where if where else ""};'
              f' checkpoint saved (step {self.last_saved}). Run the same command again to '
              'resume.')
    self.writer.info(text)
    raise interrupt.Interrupted(signum, text)

  def run_eval(self, at_step: int) -> dict[str, float] | None:
    """The eval's results (also logged), {} without an eval, None if a signal stopped it."""
    if self.eval_fn is None or self.task.eval_batches is None:
      return {}
    t0 = time.perf_counter()
    results = evaluate(self.eval_fn, self.state, self.task.eval_batches(), self.mesh,
                       self.extra_args, should_stop=(lambda: interrupt.received() is not None)
                       if self.single else None, task_type=self.task_type)
    if results is None:
      return None
    self.writer.write(at_step, {'split': self.config.get('eval_split_name', 'test'), **results})
    shown = '  '.join(f'{k} {v:.4f}' for k, v in results.items() if k != 'examples')
    self.writer.info(f'eval at step {at_step}: {shown}  ({time.perf_counter() - t0:.1f}s)')
    return results

  def _periodic_eval(self, at_step: int) -> None:
    results = self.run_eval(at_step)
    if results is None:
      self.stop(at_step, 'during an evaluation')
    self.eval_results = results

  def start(self) -> None:
    """Stops on a signal received during set-up; runs the resumed step's eval if a stop
    interrupted it."""
    step = self.step
    if _stop_agreed():
      self.stop(step, 'during start-up')
    if (self.eval_every and step % self.eval_every == 0 and 0 < step < self.task.total_steps
        and _eval_owed(self.writer, step, self.config.get('eval_split_name', 'test'))):
      # The run was stopped during this step's eval: run it now, as an uninterrupted run did.
      self._periodic_eval(step)

  def train_steps(self) -> None:
    """Steps to `task.total_steps`, logging, saving, evaluating and stopping on the way."""
    task = self.task
    self.throughput.start()
    first = True
    while self.step < task.total_steps:
      batch = parallel.global_batch(next(task.train_iterator), self.mesh)
      self.state, metrics = self.step_fn(self.state, batch, self.step_key, *self.extra_args)
      self.step += 1
      step = self.step
      self.pending.append(metrics)
      self.unchecked.append((step, metrics))
      self.throughput.add(task.global_batch_size)
      if first:  # Exclude compilation from the throughput figures.
        jax.block_until_ready(metrics)
        self.throughput.start()
        first = False
      # The previous step is (almost always) done by now: checking it costs no pipeline stall.
      self.divergence.check(self.unchecked[:-1])
      del self.unchecked[:-1]
      if step % self.log_every == 0 or step == task.total_steps:
        self._log(step)
      if self.ckpt_every and step % self.ckpt_every == 0 and step < task.total_steps:
        self.save(step)
      if self.eval_every and step % self.eval_every == 0 and step < task.total_steps:
        self._periodic_eval(step)
      if _stop_agreed(step, self.stop_check_every):
        self.stop(step)

  def _log(self, step: int) -> None:
    """Checks, averages and writes the metrics of the steps since the last log line."""
    self.divergence.check(self.unchecked)
    self.unchecked.clear()
    host = jax.device_get(self.pending)
    avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    self.pending = []
    rate = self.throughput.rate()
    self.last_loss = avg['loss']
    eta = (self.task.total_steps - step) * self.task.global_batch_size / rate if rate else 0.0
    self.writer.write(step, {**avg, 'examples_per_sec': rate})
    self.writer.progress(step, avg['loss'], rate, eta)

  def last_save_and_eval(self) -> None:
    step = self.step
    self.save(step)
    self.ckpt.wait()
    if _stop_agreed():
      self.stop(step, 'after the last step (the final evaluation runs when the command is run '
                'again)')
    results = self.run_eval(step)
    if results is None or _stop_agreed():
      self.stop(step, 'during the final evaluation (it runs again when the command is run '
                'again)')
    self.eval_results = results or self.eval_results

  def fail(self, e: _Diverged) -> None:
    """Marks the run failed in summary.json and raises TrainingDiverged."""
    self.ckpt.wait()
    message = _diverged_message(e, self.config, self.last_saved)
    self.writer.info(message)
    if jax.process_index() == 0:
      storage.write_json(storage.join(self.workdir, 'summary.json'), {
          'kind': self.task.kind, 'status': 'failed', 'error': message, 'failed_at_step': e.step,
          'nonfinite': e.bad, 'steps': self.last_saved or 0, 'checkpoint_step': self.last_saved,
          'wall_s': round(time.time() - self.start_wall, 2), 'params': self.n_params,
          'model': self.task.meta.get('model')})
    raise TrainingDiverged(message) from None

  def finish(self) -> dict:
    """The summary of a completed run (with `task.on_finish`'s items), written to
    summary.json."""
    eval_results = self.eval_results
    summary = {
        'kind': self.task.kind,
        'status': 'ok',
        'steps': self.step,
        'wall_s': round(time.time() - self.start_wall, 2),
        'params': self.n_params,
        'examples_per_sec': round(self.throughput.overall(), 1),
        'final_train_loss': self.last_loss,
        **self.task_type.summary(eval_results),
        'eval': eval_results,
        'model': self.task.meta.get('model'),
    }
    if self.task.on_finish is not None:
      summary.update(self.task.on_finish(self.state, eval_results) or {})
    if _stop_agreed():
      self.stop(self.step, 'while finishing (export, figures); they are redone when the command '
                'is run again')
    if jax.process_index() == 0:
      storage.write_json(storage.join(self.workdir, 'summary.json'), summary)
    self.writer.info(f'done in {format_duration(summary["wall_s"])}: ' + ', '.join(
        f'{k}={v}' for k, v in summary.items()
        if k in (self.task_type.summary_metric, 'steps', 'examples_per_sec')))
    return summary
