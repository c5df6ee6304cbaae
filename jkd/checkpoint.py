"""Orbax checkpoints of a run: train state, data-iterator position and run metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames), so a run killed mid-save leaves the
previous checkpoints intact. The workdir may be a bucket URL (`gs://...`): Orbax and TensorStore
write there directly (on GCS Orbax marks a finished step with a commit file instead of a rename).
Restores take a tree of `jax.ShapeDtypeStruct`s with shardings, so a
checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jkd import storage
from jkd.errors import UserError

CHECKPOINT_DIR = 'checkpoints'
FORMAT_VERSION = 1
# Entries of a run's `model_state` that belong to its trainer, not to the model's variables: the
# EMA of the weights (`jkd.ema`) and the state of stateful loss terms (CRD's memory banks).
# They are checkpointed and resumed with the run; `load_model` sets them apart.
RUN_STATE_KEYS = ('ema', 'distill')


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.resolve(workdir), CHECKPOINT_DIR)


class RunCheckpointer:
  """Keeps the last `keep` checkpoints of one run; `save` is async, `wait` blocks."""

  def __init__(self, workdir: str, *, keep: int = 3, create: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    # Handlers named up front, so item metadata (shapes, dtypes) is readable before a restore.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, *, expect_kind: str | None = None,
              step: int | None = None) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) onto the shardings in `abstract_state`."""
    step = self.latest_step() if step is None else step
    meta = self.read_meta(step)
    if expect_kind and meta.get('kind') != expect_kind:
      raise UserError(
          f'The checkpoint in {self.directory} was written by a {meta.get("kind")!r} run, but '
          f'this is a {expect_kind!r} run. Use a fresh --workdir for this run (the existing '
          'checkpoints were left untouched), or run the command that wrote them.')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for structure/shape mismatches.
      raise UserError(
          f'Could not restore checkpoint step {step} from {self.directory}: it does not match '
          f'this config\'s model or optimizer ({type(e).__name__}: {str(e)[:300]}). Use the '
          'config the run was started with, or a fresh --workdir; the existing checkpoints were '
          'left untouched.') from e
    return restored['state'], dict(restored['data'] or {}), meta

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f'No checkpoint found in {self.directory}.')
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored['meta'])
    except Exception as e:
      raise UserError(f'The checkpoint step {step} in {self.directory} is unreadable or not a jkd '
                      f'checkpoint ({type(e).__name__}: {str(e)[:200]}). Point to a jkd workdir, '
                      'or remove the damaged step directory.') from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def load_arrays(workdir: str, step: int | None = None) -> tuple[dict, dict]:
  """Loads a workdir's saved state as host numpy arrays (no target tree needed).

  Used to initialise from another run (fine-tuning, a teacher): returns (state_tree, meta), where
  state_tree has keys `params`, `model_state`, `opt_state`, `step`.
  """
  if not storage.isdir(checkpoint_dir(workdir)):
    raise UserError(f'{workdir!r} has no checkpoints/ directory: it is not a jkd workdir, or its '
                    'run has not saved yet. Point to the --workdir of a finished jkd run.')
  ckpt = RunCheckpointer(workdir, create=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise UserError(f'{checkpoint_dir(workdir)} holds no complete checkpoint.')
  meta = ckpt.read_meta(step)
  try:
    item_meta = ckpt.manager.item_metadata(step)['state']
    tree = getattr(item_meta, 'tree', item_meta)
    # Read every array whole onto one host (CPU) device: this works whatever mesh and number of
    # devices saved it (a pod's teacher read on one GPU), and keeps accelerator memory free.
    host = jax.sharding.SingleDeviceSharding(_host_device())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), tree)
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
  except Exception as e:
    raise UserError(f'Could not read the weights of {checkpoint_dir(workdir)} step {step} '
                    f'({type(e).__name__}: {str(e)[:200]}).') from e
  ckpt.close()
  return jax.tree.map(np.asarray, restored['state']), meta


def model_params(params: Any, prefix: Sequence[str] = ()) -> Any:
  """The model's own parameters inside a run's `params`: `prefix` is the run's
  `meta['params_prefix']` (a distilled student sits under ('student',) beside its projectors)."""
  for key in prefix or ():
    params = params[key]
  return params


@dataclasses.dataclass(frozen=True)
class SavedModel:
  """The model a workdir's checkpoint holds, as host numpy arrays.

  Attributes:
    params: the model's parameters, `params_prefix` already removed (a distilled student without
      its projectors, a MIM model without the trainer's wrapping).
    model_state: its other collections (BatchNorm statistics), possibly empty.
    meta: the run metadata saved with the checkpoint (kind, model, config, ...).
    step: the checkpoint's step.
    ema: the exponential moving average of the model's variables ({'params': ..., other
      collections}) when the run kept one (`config.ema.decay` > 0), else None.
  """
  params: Any
  model_state: dict
  meta: dict
  step: int
  ema: dict | None = None

  @property
  def model_config(self) -> dict:
    """The run's `config.model` ({name, dtype, ...overrides}), with the values of fields whose
    default changed since it was saved (`jkd.models.legacy_fields`); {} if it saved none."""
    from jkd import models  # pylint: disable=g-import-not-at-top  (flax only when needed)
    model = (self.meta.get('config') or {}).get('model') or {}
    return models.with_legacy_fields(model, self.meta) if model else {}

  @property
  def variables(self) -> dict:
    """{'params': ..., **model_state}: what the Flax module's `apply` takes."""
    return {'params': self.params, **self.model_state}


def load_model(workdir: str, *, prefix: Sequence[str] | None = None,
               step: int | None = None) -> SavedModel:
  """Reads the model of a workdir's latest (or `step`) checkpoint: the one way jkd loads a saved
  model (teachers, `init_from`, stored sizes).

  Args:
    prefix: path inside the saved params to take instead of the run's own `params_prefix`
      (e.g. ('encoder',)).
  """
  arrays, meta = load_arrays(workdir, step)
  prefix = tuple(prefix) if prefix else tuple(meta.get('params_prefix') or ())
  model_state = dict(arrays.get('model_state') or {})
  run_state = {k: model_state.pop(k) for k in RUN_STATE_KEYS if k in model_state}
  return SavedModel(params=model_params(arrays['params'], prefix), model_state=model_state,
                    meta=meta, step=int(meta.get('step', step or 0)), ema=run_state.get('ema'))


def read_latest_meta(workdir: str) -> tuple[int, dict]:
  """(step, metadata) of a workdir's latest checkpoint, without reading any array."""
  if not storage.isdir(checkpoint_dir(workdir)):
    raise UserError(f'{workdir!r} has no checkpoints/ directory: it is not a jkd workdir. Point '
                    'to the workdir of a trained model.')
  ckpt = RunCheckpointer(workdir, create=False)
  try:
    step = ckpt.latest_step()
    return int(step) if step is not None else None, ckpt.read_meta(step)
  finally:
    ckpt.close()


def _host_device() -> jax.Device:
  """A CPU device of this process if JAX has the CPU backend, else its first local device."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # e.g. JAX_PLATFORMS=cuda leaves no CPU backend
    return jax.local_devices()[0]
