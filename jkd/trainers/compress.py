"""Pruning and/or quantization of a trained classifier, then integer export: `jkd compress`.

Starts from a trained workdir (`config.init_from`, supervised or distilled), fine-tunes with
magnitude pruning (`config.prune`, `jkd.compress.pruning`) and/or Qwix QAT (`config.quant`,
mode 'qat'), optionally distilling from a frozen teacher (`config.teacher.workdir`): the loss is
the weighted sum of `config.losses`, the logit terms of `jkd distill` (`distill_terms`: ce, kd,
dkd, dist, kd_logit_std). `config.kd_weight` / `config.kd_temperature` are shorthands that
still work: w and T give `ce` weight 1 - w and `kd` weight w at temperature T. Mode 'ptq' does
no training: the steps only report the loss, and the weights are quantized at export.
Evaluation runs the fake-quant model; `on_finish` writes `WORKDIR/export/` and evaluates the
exported integer program.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import data, loop, storage, teachers
from jkd.compress import export as export_lib
from jkd.compress import channel_pruning, pruning, quant
from jkd.errors import UserError
from jkd.optim import make_optimizer
from jkd.teacher import Teacher
from jkd.trainers import common
from jkd.trainers import distill_terms as T

# The distillation terms a compress step can use: they read logits only (no taps, no DeiT head).
TERMS = {k: v for k, v in T.TERMS.items() if k in ('ce', 'kd', 'dkd', 'dist', 'kd_logit_std')}


def loss_terms(config) -> list[dict]:
  """The run's loss terms: `config.losses` (default CE alone), or the `kd_weight` shorthand.

  `config.kd_weight = w` (when set and not None) replaces them by `ce` with weight 1 - w plus,
  for w > 0, `kd` with weight w at `config.kd_temperature` (else the losses' kd temperature,
  else 4) — the loss `jkd compress` had before it read `config.losses`.
  """
  spec = config.get('losses') or {'ce': {'weight': 1.0}}
  spec = spec.to_dict() if hasattr(spec, 'to_dict') else dict(spec)
  if config.get('kd_weight') is not None:
    weight = float(config.kd_weight)
    temperature = config.get('kd_temperature')
    if temperature is None:
      temperature = dict(spec.get('kd') or {}).get('temperature', 4.0)
    spec = {'ce': {'weight': 1.0 - weight}}
    if weight:
      spec['kd'] = {'weight': weight, 'temperature': float(temperature)}
  return T.parse_terms(spec, TERMS, what='compress ')


def teacher_for(config, terms: list[dict], run: common.RunData) -> Teacher | None:
  """`config.teacher.workdir`'s teacher when a term distils from one, else None."""
  taught = [f"{t['name']} ({t['kind']})" for t in terms if t['kind'] != 'ce']
  if not taught:
    return None
  if not (config.get('teacher') or {}).get('workdir') and not teachers.configured(config):
    raise UserError(f'config.losses terms {", ".join(taught)} distil from a teacher, and none '
                    'is set: pass --config.teacher.workdir=DIR (a trained jkd workdir), or '
                    'train with cross-entropy alone (--config.kd_weight=0).')
  # Several teachers (config.teachers) are one averaged target here: `apply` combines them.
  return teachers.from_config(config, run.info.num_classes, run.shape)


def _make_tx(config, steps, params_shape=None):
  tx, schedule = make_optimizer(config.optim, config.batch_size, steps)
  p = config.prune
  method = p.get('method', 'magnitude')
  if method not in ('magnitude', 'channel'):
    raise UserError(f'config.prune.method={method!r}: use magnitude (unstructured or N:M) or '
                    'channel (structured: whole channels, physically removed at export).')
  if p.get('enabled', False) and method == 'channel':
    tx = channel_pruning.channel_pruning(
        tx, params_shape, ratio=p.target_sparsity, criterion=p.get('criterion', 'bn'),
        begin_step=p.get('begin_step', 0), end_step=p.get('end_step', 0) or steps // 2,
        update_every=p.get('update_every', 10))
  elif p.get('enabled', False):
    n_m = tuple(p.n_m) if p.get('n_m') else None
    tx = pruning.magnitude_pruning(
        tx, target_sparsity=p.target_sparsity, schedule=p.get('schedule', 'cubic'),
        begin_step=p.get('begin_step', 0), end_step=p.get('end_step', 0) or steps // 2,
        update_every=p.get('update_every', 10), scope=p.get('scope', 'global'), n_m=n_m)
  return tx, schedule


def compress_step(model, tx, schedule, info, terms: list[dict], *, teacher: Teacher | None,
                  train: bool = True):
  """Returns `step(state, batch, key, *teacher_vars) -> (state, metrics)`: the terms' loss of
  the (fake-quantized, pruned) model. `train=False` (PTQ) reports the loss and keeps the
  weights."""
  def step(state: loop.TrainState, batch, key, *teacher_vars):
    key = jax.random.fold_in(key, state.step)
    images = data.normalize(batch['image'], info.mean, info.std, jnp.float32)
    labels = batch['label']
    t_logits = None
    if teacher_vars:
      t_logits = jax.lax.stop_gradient(
          teacher.apply(teacher_vars[0], images)[0].astype(jnp.float32))

    def loss_fn(params):
      logits, model_state, _ = common.apply_model(model, params, state.model_state, images,
                                                  train=train, key=key)
      logits = logits.astype(jnp.float32)
      values = T.term_values(terms, s_logits=logits, t_logits=t_logits, labels=labels,
                             targets=None, step=state.step)
      return T.total(terms, values), (logits, model_state, values)

    if not train:  # No training: report the loss of the quantized model, keep the weights.
      loss, (logits, _, values) = loss_fn(state.params)
      new_state, grad_norm = state.replace(step=state.step + 1), jnp.zeros(())
    else:
      (loss, (logits, model_state, values)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      new_state = state.apply_gradients(grads, tx, model_state=model_state)
      grad_norm = optax.tree.norm(grads)
    return new_state, {'loss': loss, **{f'loss_{k}': v for k, v in values.items()},
                       'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
                       'grad_norm': grad_norm, 'lr': schedule(state.step)}
  return step


def build_task(config, workdir: str, *, teacher: Teacher | None = None) -> loop.Task:
  """The compress Task for `jkd.loop.run`.

  Its `on_init` loads `config.init_from`; without one the model keeps its random
  initialisation, which `jkd bench` (job 'compress') times: the step costs the same. `train`,
  the `jkd compress` command, requires `init_from`.

  Args:
    teacher: the frozen teacher of the KD terms; default `config.teacher.workdir`'s.
  """
  run = common.RunData.from_config(config)
  info = run.info
  float_model = common.create_model(config.model, info.num_classes)
  qcfg = config.quant
  mode = qcfg.get('mode', 'qat') if qcfg.get('enabled', False) else None
  if mode not in (None, 'qat', 'ptq'):
    raise UserError(f'config.quant.mode={qcfg.mode!r}: use qat or ptq.')
  # PTQ evaluates the quantized model too: weights quantized on the fly, as in the export.
  model = quant.qat_model(float_model, qcfg) if mode else float_model
  terms = loss_terms(config)
  teacher = teacher_for(config, terms, run) if teacher is None else teacher
  params_shape = jax.eval_shape(
      lambda: common.init_variables(float_model, jax.random.key(0), run.shape)[0])
  tx, schedule = _make_tx(config, run.steps, params_shape)
  return common.make_task(
      config, 'compress', run, meta={'num_classes': info.num_classes},
      init_state=functools.partial(common.init_state, float_model, tx, run.shape),
      train_step=compress_step(model, tx, schedule, info, terms, teacher=teacher,
                               train=mode != 'ptq'),
      eval_step=common.classification_eval_step(model, info.mean, info.std, jnp.float32,
                                                info.num_classes),
      place_extra_args=teacher.step_args if teacher else None, on_init=common.init_from(config, skip=()),
      on_finish=functools.partial(export_and_report, config, workdir, float_model, run,
                                  teacher.description if teacher else None))


def export_and_report(config, workdir: str, float_model, run: common.RunData,
                      teacher_description: dict | None, state, eval_results: dict) -> dict:
  """`on_finish`: writes `WORKDIR/export/` (the integer model), evaluates it, and returns the
  summary's compression facts (sizes, ratio, sparsity, the export's accuracy)."""
  del eval_results
  qcfg = config.quant
  export_dir = storage.join(workdir, 'export')
  manifest = export_lib.export_model(
      export_dir, float_model, qcfg, state.params, state.model_state, image_shape=run.shape,
      mean=run.info.mean, std=run.info.std,
      info={'model': config.model.name, 'num_classes': run.info.num_classes})
  report = pruning.sparsity_report(jax.device_get(state.params))
  n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.model_state))
  fp32_bytes = 4 * (report['params'] + n_state)
  exported = export_lib.evaluate_export(export_dir, common.eval_batches(config)())
  size = export_lib.export_size_bytes(export_dir)
  # Deployable files (config.deploy.formats: ONNX / LiteRT / StableHLO), each evaluated in its
  # own runtime; a channel-pruned model is written physically narrower.
  from jkd.deploy.export import export_run
  files = export_run(config, workdir, state.params, state.model_state,
                     num_classes=run.info.num_classes)
  return {'nonzero_params': report['nonzero_params'], 'sparsity': report['global'],
          'sparsity_layers': report['layers'], 'export_bytes': size,
          'export_bytes_zlib': manifest['weights_bytes_zlib'], 'fp32_bytes': fp32_bytes,
          'compression_ratio': round(fp32_bytes / size, 3),
          'export_accuracy': exported['accuracy'],
          'quant': {k: v for k, v in qcfg.to_dict().items()},
          **({'deploy': files} if files else {}),
          **({'teacher': teacher_description} if teacher_description else {})}


def before_run(config) -> None:
  """What `jkd compress` checks before its loop: a trained model to start from. Not in
  `build_task`, so that `jkd bench` can time the step from random weights."""
  if not config.get('init_from'):
    raise UserError('jkd compress needs a trained model: set --config.init_from=DIR to the '
                    'workdir of `jkd train` or `jkd distill`.')
