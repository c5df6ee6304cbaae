"""Orbax checkpoints of a run: train state, data-iterator position and run metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous and atomic
(Orbax writes to a temporary directory and renames), so a run killed mid-save leaves the
previous checkpoints intact. The workdir may be a bucket URL (`gs://...`): Orbax and TensorStore
write there directly (on GCS Orbax marks a finished step with a commit file instead of a rename).
Restores take a tree of `jax.ShapeDtypeStruct`s with shardings, so a
checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jkd import storage
from jkd.errors import UserError

CHECKPOINT_DIR = 'checkpoints'
# Where `discard_after` moves the steps newer than the one a run resumes from.
DISCARDED_DIR = 'discarded_checkpoints'
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
    """`create=True` is the run's own (writing) checkpointer: it also removes the temporary
    directories of a save that was killed. Readers (teachers, `init_from`, `jkd eval`) pass
    `create=False` and touch nothing: a run may be saving there."""
    self.workdir = storage.resolve(workdir)
    self.directory = checkpoint_dir(workdir)
    if create and not storage.is_remote(self.directory):
      storage.ensure_dir(self.directory, 'the checkpoint directory')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True,
                                           cleanup_tmp_directories=create)
    # Handlers named up front, so item metadata (shapes, dtypes) is readable before a restore.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)
    if create and not any(isinstance(f, _DropWriteRefusals) for f in _ABSL.filters):
      _ABSL.addFilter(_DropWriteRefusals())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step))
    with self._writing():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _writing(self):
    """A save (or the wait for an async one) that the file system refuses — full, too large a
    file, read-only, no permission — is a UserError naming the directory: the steps saved before
    are intact, and the next run removes the unfinished step's temporary directory."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (TensorStore raises ValueError)
      text = read_error(e) + ' ' + str(e)[:4000]
      if not any(m in text for m in _WRITE_REFUSALS):
        raise
      raise UserError(f'A checkpoint could not be written in {self.directory} ({_refusal(text)}): '
                      'the disk is full, a file size limit was hit, or the directory is '
                      'read-only. The checkpoints saved before are intact; free space or fix '
                      'the permissions, then run the same command again.') from None

  def restore(self, abstract_state: Any, *, expect_kind: str | None = None,
              step: int | None = None) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) onto the shardings in `abstract_state`.

    Raises UserError, leaving the checkpoint untouched, when it was written by another kind of
    run, holds other shapes than `abstract_state` (another model or optimizer: the first
    differing tensors are named) or cannot be read (damaged files: the step is named, and the
    older steps one could resume from instead).
    """
    step = self.latest_step() if step is None else step
    meta = self.read_meta(step)
    if expect_kind and meta.get('kind') != expect_kind:
      raise UserError(
          f'The checkpoint in {self.directory} was written by a {meta.get("kind")!r} run, but '
          f'this is a {expect_kind!r} run. Use a fresh --workdir for this run (the existing '
          'checkpoints were left untouched), or run the command that wrote them.')
    self._check_shapes(step, abstract_state)
    try:
      with quiet_failed_reads():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (TensorStore / Orbax read errors)
      raise self.damaged(step, e) from None
    return restored['state'], dict(restored['data'] or {}), meta

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """UserError naming the first tensors whose saved shape or dtype differs from this run's."""
    try:
      item_meta = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise self.damaged(step, e) from None
    saved = leaf_specs(getattr(item_meta, 'tree', item_meta))
    wanted = leaf_specs(abstract_state)
    if saved is None:
      raise self.damaged(step, ValueError('its array metadata is unreadable'))
    problems = []
    for path in sorted(set(saved) | set(wanted)):
      if path not in saved:
        problems.append(f'{path} is missing from the checkpoint')
      elif path not in wanted:
        problems.append(f'{path} is in the checkpoint but not in this run')
      elif saved[path] != wanted[path]:
        problems.append(f'{path} is {_spec(saved[path])} in the checkpoint but '
                        f'{_spec(wanted[path])} in this run')
    if problems:
      more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
      raise UserError(
          f'Checkpoint step {step} in {self.directory} does not match this config\'s model or '
          f'optimizer: {"; ".join(problems[:3])}{more}. Use the config the run was started with '
          '(same model fields and optimizer), or a fresh --workdir; the existing checkpoints '
          'were left untouched.')

  def damaged(self, step: int, error: BaseException) -> UserError:
    """The UserError for a checkpoint step whose files cannot be read."""
    older = [s for s in self.manager.all_steps() if s < step]
    hint = (f' Older steps are there ({", ".join(map(str, sorted(older)))}): resume from one with '
            f'--config.resume_from_step={max(older)} (the newer steps are then moved to '
            f'{DISCARDED_DIR}/), or' if older else ' No older step is there to fall back to:')
    return UserError(
        f'Checkpoint step {step} in {self.directory} is damaged or not a jkd checkpoint: '
        f'{read_error(error)}. jkd does not fall back to another step on its own.{hint} remove '
        f'{storage.join(self.directory, str(step))} if it cannot be repaired (e.g. restored from '
        'a backup). Nothing was changed.')

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f'No checkpoint found in {self.directory}.')
    if step not in self.manager.all_steps():
      raise UserError(f'{self.directory} has no checkpoint step {step}; its steps are '
                      f'{", ".join(map(str, self.manager.all_steps())) or "none"}. Pass one of '
                      'them (--config.resume_from_step), or 0 for the latest.')
    try:
      with quiet_failed_reads():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
      meta = restored['meta']
      if not isinstance(meta, dict):
        raise ValueError(f'its metadata is {type(meta).__name__}, not a dict')
      return dict(meta)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'The checkpoint step {step} in {self.directory} is unreadable or not a jkd '
                      f'checkpoint ({read_error(e)}). Point to a jkd workdir, or remove the '
                      'damaged step directory.') from None

  def discard_after(self, step: int, log=print) -> None:
    """Moves every step newer than `step` to WORKDIR/discarded_checkpoints/ (kept, not deleted):
    a run resumed from an older step (`config.resume_from_step`) saves those steps again."""
    newer = sorted(s for s in self.manager.all_steps() if s > step)
    if not newer:
      return
    self.wait()
    if storage.is_remote(self.directory):
      raise UserError(f'resume_from_step={step}: {self.directory} has newer steps '
                      f'({", ".join(map(str, newer))}), which jkd moves aside only in a local '
                      'workdir. Delete them yourself (gsutil rm -r), then run again.')
    aside = storage.join(self.workdir, DISCARDED_DIR, time.strftime('%Y%m%d-%H%M%S'))
    os.makedirs(aside, exist_ok=True)
    for s in newer:
      os.rename(storage.join(self.directory, str(s)), storage.join(aside, str(s)))
    self.manager.reload()
    log(f'resume_from_step={step}: moved the newer steps {", ".join(map(str, newer))} to {aside}')

  def wait(self) -> None:
    with self._writing():
      self.manager.wait_until_finished()

  def close(self) -> None:
    if self.manager is not None:
      manager, self.manager = self.manager, None
      with self._writing():
        try:
          manager.wait_until_finished()
        finally:
          manager.close()


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
    with quiet_failed_reads():
      restored = ckpt.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
  except Exception as e:  # pylint: disable=broad-except
    raise ckpt.damaged(step, e) from None
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


def leaf_specs(tree: Any) -> dict[str, tuple] | None:
  """{'params/stage1/kernel': (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or
  Orbax array metadata (None if a leaf has no shape): paths spelled the same for a TrainState
  and for what Orbax read back (attribute names, dict keys and indices alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    dtype = getattr(leaf, 'dtype', None)
    if shape is None:
      if leaf is None:
        continue
      return None
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
    out[name] = (tuple(shape), np.dtype(dtype).name if dtype is not None else None)
  return out


def _spec(spec: tuple) -> str:
  shape, dtype = spec
  return f'{dtype}{list(shape)}'


# How the OS's write refusals read in Orbax / TensorStore errors (ENOSPC, EFBIG, EROFS, EACCES).
_WRITE_REFUSALS = ('No space left', 'File too large', 'Read-only file system', 'Permission denied',
                   "os_error_code='28'", "os_error_code='27'", "os_error_code='30'",
                   "os_error_code='13'")


def _refusal(text: str) -> str:
  """The OS's words in a write failure ('Failed to write 52944 bytes to file 14: File too large')."""
  match = re.search(r"Failed to write [^\[\]\"]*|No space left on device|Read-only file system|"
                    r"Permission denied", text)
  return match.group(0).strip() if match else text.splitlines()[0][:200]


class _DropWriteRefusals(logging.Filter):
  """Drops absl's copy of a refused checkpoint write (Orbax's save thread logs it with a
  traceback): `RunCheckpointer._writing` reports it as one paragraph."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage() + str(record.exc_info and record.exc_info[1])
    return not any(m in text for m in _WRITE_REFUSALS)


def read_error(error: BaseException) -> str:
  """The first line of the root cause of an Orbax / TensorStore read failure, shortened."""
  cause = error
  while cause.__cause__ is not None or (cause.__context__ is not None
                                        and not cause.__suppress_context__):
    cause = cause.__cause__ or cause.__context__
  for candidate in (cause, error):
    lines = str(candidate).strip().splitlines()
    if lines:
      return f'{type(candidate).__name__}: {lines[0][:300]}'
  return type(error).__name__


class _DropFailedReads(logging.Filter):
  """Drops asyncio's 'exception was never retrieved' records of reads Orbax abandoned after the
  first error (one per pending array): the UserError already says what is wrong."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not _is_read_noise(record.getMessage() + str(record.exc_info and record.exc_info[1]))


def _is_read_noise(text: str) -> bool:
  return any(m in text for m in ('Event loop is closed', 'Error reading', 'error while reading',
                                 '_read_array_index', 'async_deserialize', 'OUT_OF_RANGE',
                                 'DATA_LOSS', 'tensorstore', 'TensorStore'))


_QUIET = {'installed': False}
_ABSL = logging.getLogger('absl')


class quiet_failed_reads:  # pylint: disable=invalid-name  (used as a context manager)
  """Keeps a failed restore from printing dozens of asyncio / TensorStore tracebacks (tasks that
  fail after Orbax gave up, and callbacks onto its closed event loop), now and at exit. Installed
  once per process; only those messages are dropped."""

  def __enter__(self):
    if not _QUIET['installed']:
      _QUIET['installed'] = True
      logging.getLogger('asyncio').addFilter(_DropFailedReads())
      previous = sys.unraisablehook

      def hook(unraisable):
        text = f'{unraisable.exc_value!r} {unraisable.object!r}'
        if not _is_read_noise(text):
          previous(unraisable)
      sys.unraisablehook = hook
    return self

  def __exit__(self, *exc):
    return False


def _host_device() -> jax.Device:
  """A CPU device of this process if JAX has the CPU backend, else its first local device."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # e.g. JAX_PLATFORMS=cuda leaves no CPU backend
    return jax.local_devices()[0]
