"""`jkd eval`: evaluate a workdir's latest checkpoint on a split, writing `eval.json`."""
from __future__ import annotations

import time

import jax
import ml_collections

from jkd import figures, interrupt, loop, parallel, storage, tasks, trainers, xla_cpu
from jkd.checkpoint import RunCheckpointer, checkpoint_dir
from jkd.errors import UserError
from jkd.tasks.classification import per_class  # noqa: F401 (API: jkd.evaluate.per_class)


def _config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The run's stored config, with the model fields whose default changed since it was saved
  (`jkd.models.legacy_fields`): an older run is evaluated as it was trained."""
  from jkd import models  # pylint: disable=g-import-not-at-top
  if not isinstance(meta.get('config'), dict):
    raise UserError('This checkpoint stores no config; pass --config FILE.py (the one the run '
                    'used).')
  config = ml_collections.ConfigDict(meta['config'])
  for field, value in models.legacy_fields(meta).items():
    if field not in config.model:
      config.model[field] = value
  # Run settings added since the checkpoint was written (e.g. resume_from_step), so that they
  # can be overridden like the others.
  from jkd.defaults import base_config  # pylint: disable=g-import-not-at-top
  for key, value in base_config().items():
    if key not in config:
      config[key] = value
  return config


def evaluate_workdir(workdir: str, *, config_spec: str | None = None, overrides=(),
                     split: str | None = None, export: bool = False) -> dict:
  """Restores the latest checkpoint of `workdir` (or `config.resume_from_step`'s) and evaluates
  it on `split` (default: the config's eval split). Returns and writes `workdir/eval.json`.

  With `export=True` it evaluates the integer model in `workdir/export/` (`jkd compress`)
  through its `jax.export` program instead of the checkpoint."""
  from jkd import validate
  from jkd.config import apply_override, load_config
  workdir = storage.resolve(workdir)
  if not storage.isdir(workdir):
    raise UserError(f'--workdir {workdir!r} is not a directory: pass the workdir of a jkd run.')
  if export and not storage.isfile(storage.join(workdir, 'export', 'manifest.json')):
    raise UserError(f'{workdir!r} has no export/manifest.json: run `jkd compress` on it first, '
                    'or drop --export to evaluate the checkpoint.')
  if not storage.isdir(checkpoint_dir(workdir)):
    raise UserError(f'{workdir!r} has no checkpoints/: not a jkd workdir, or nothing saved yet.')
  xla_cpu.prepare(xla_cpu.peek_config(checkpoint_dir(workdir)))  # Orbax starts the backend.
  ckpt = RunCheckpointer(workdir, create=False)
  meta = ckpt.read_meta()
  if config_spec:
    config = load_config(config_spec, overrides)
  else:
    config = _config_from_meta(meta)
    for o in overrides:
      apply_override(config, o)
  if split:
    config.data.eval_split = split
  validate.check(config, 'eval')
  step = int(config.get('resume_from_step', 0) or 0) or None
  if step is not None:
    meta = ckpt.read_meta(step)
  kind = meta.get('kind')
  if config.data.get('name') == 'folder' and kind in trainers.COMMANDS:
    from jkd.data import folder  # pylint: disable=g-import-not-at-top
    folder.check_model_classes(config.data, meta, workdir)
  if export:
    return _evaluate_export(workdir, config, meta)
  with interrupt.deferred():  # A signal stops it between steps, never inside a restore.
    return _evaluate_checkpoint(workdir, ckpt, config, meta, kind, step)


def _evaluate_checkpoint(workdir, ckpt, config, meta, kind, step) -> dict:
  if kind not in trainers.COMMANDS:
    raise UserError(f'jkd eval does not know checkpoints of kind {kind!r} yet.')
  task = trainers.get(kind, config).build_task(config, workdir)
  if task.eval_step is None:
    raise UserError(f'A {kind!r} run has no evaluation.')

  mesh = parallel.make_mesh(config.get('mesh'))
  key, _ = loop.run_keys(config)
  abstract, _ = loop.abstract_sharded_state(task.init_state, key, mesh)
  single = jax.process_count() == 1  # Several processes evaluate together: no early stop.
  if single:
    interrupt.check('before the checkpoint was read; nothing was written')
  state, _, _ = ckpt.restore(abstract, expect_kind=kind, step=step)
  ckpt.close()
  t0 = time.perf_counter()
  eval_fn = jax.jit(task.eval_step, out_shardings=parallel.replicated(mesh))
  extra_args = task.place_extra_args(mesh)[0] if task.place_extra_args else ()
  results = loop.evaluate(eval_fn, state, task.eval_batches(), mesh, extra_args,
                          should_stop=(lambda: interrupt.received() is not None) if single
                          else None, keep_arrays=True, task_type=task.task_type)
  if single:
    interrupt.check('during the evaluation; eval.json was not written')
  confusion = results.get('confusion')
  task_kind = task.task_type or tasks.get(config)
  report = task_kind.report(results, meta.get('class_names'))
  out = {'split': config.data.eval_split, 'step': int(state.step), 'kind': kind,
         'model': meta.get('model'), **results,
         'wall_s': round(time.perf_counter() - t0, 2)}
  out.update(task_kind.summary(results))
  out.update(report)
  if jax.process_index() == 0:
    if confusion is not None:
      out['confusion_png'] = figures.save_confusion_matrix(
          storage.join(workdir, 'confusion.png'), confusion, out['class_names'],
          title=f'{meta.get("model")} on {config.data.eval_split}: '
                f'{100 * out.get("accuracy", 0):.1f}% ({out["examples"]} images)')
    storage.write_json(storage.join(workdir, 'eval.json'), out)
  return out


def _evaluate_export(workdir: str, config, meta: dict) -> dict:
  from jkd import data
  from jkd.compress.export import evaluate_export, export_size_bytes
  export_dir = storage.join(workdir, 'export')
  t0 = time.perf_counter()
  batches = data.make_eval_iterator(
      config.data, config.data.eval_split,
      global_batch_size=config.get('eval_batch_size', config.batch_size))
  results = evaluate_export(export_dir, batches)
  if not results['examples']:
    raise UserError(f'config.data.eval_split={config.data.eval_split!r} holds no examples: pass '
                    "a non-empty split, e.g. --split 'test'.")
  out = {'split': config.data.eval_split, 'export': export_dir, 'kind': meta.get('kind'),
         'model': meta.get('model'), **results, 'test_accuracy': results['accuracy'],
         'export_bytes': export_size_bytes(export_dir),
         'wall_s': round(time.perf_counter() - t0, 2)}
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, 'eval.json'), out)
  return out
