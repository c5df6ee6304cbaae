"""Pruning and/or quantization of a trained classifier, then integer export: `jkd compress`.

Starts from a trained workdir (`config.init_from`, supervised or distilled), fine-tunes with
magnitude pruning (`config.prune`, `jkd.compress.pruning`) and/or Qwix QAT (`config.quant`,
mode 'qat'), optionally distilling from a frozen teacher (`config.teacher.workdir`,
`config.kd_weight`, `config.kd_temperature`). Mode 'ptq' does no training: the steps only
report the loss, and the weights are quantized at export. Evaluation runs the fake-quant model;
`on_finish` writes `WORKDIR/export/` and evaluates the exported integer program.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import data, loop, losses, storage
from jkd.compress import export as export_lib
from jkd.compress import pruning, quant
from jkd.errors import UserError
from jkd.optim import make_optimizer
from jkd.trainers import common, distill


def _make_tx(config, steps):
  tx, schedule = make_optimizer(config.optim, config.batch_size, steps)
  p = config.prune
  if p.get('enabled', False):
    n_m = tuple(p.n_m) if p.get('n_m') else None
    tx = pruning.magnitude_pruning(
        tx, target_sparsity=p.target_sparsity, schedule=p.get('schedule', 'cubic'),
        begin_step=p.get('begin_step', 0), end_step=p.get('end_step', 0) or steps // 2,
        update_every=p.get('update_every', 10), scope=p.get('scope', 'global'), n_m=n_m)
  return tx, schedule


def build_task(config, workdir: str) -> loop.Task:
  """The compress Task for `jkd.loop.run`.

  Its `on_init` loads `config.init_from`; without one the model keeps its random
  initialisation, which `jkd bench` (job 'compress') times: the step costs the same. `train`,
  the `jkd compress` command, requires `init_from`.
  """
  info = data.get_info(config.data)
  shape = common.input_shape(info, config.data)
  float_model = common.create_model(config.model, info.num_classes)
  qcfg = config.quant
  qat = qcfg.get('enabled', False) and qcfg.get('mode', 'qat') == 'qat'
  ptq = qcfg.get('enabled', False) and qcfg.get('mode', 'qat') == 'ptq'
  if qcfg.get('enabled', False) and not (qat or ptq):
    raise UserError(f'config.quant.mode={qcfg.mode!r}: use qat or ptq.')
  # PTQ evaluates the quantized model too: weights quantized on the fly, as in the export.
  model = quant.qat_model(float_model, qcfg) if qcfg.get('enabled', False) else float_model
  steps = common.total_steps(config, info.num_examples[config.data.train_split])
  tx, schedule = _make_tx(config, steps)
  use_teacher = bool(config.get('teacher') and config.teacher.get('workdir'))
  kd_weight = float(config.get('kd_weight', 0.0)) if use_teacher else 0.0
  kd_temperature = float(config.get('kd_temperature', 4.0))
  if use_teacher:
    teacher, teacher_np, teacher_desc = distill.load_teacher(config, info.num_classes)

  def init_state(key):
    params, model_state = common.init_variables(float_model, key, shape)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           model_state=model_state, opt_state=tx.init(params))

  def step(state, batch, key, *teacher_vars):
    key = jax.random.fold_in(key, state.step)
    images = data.normalize(batch['image'], info.mean, info.std, jnp.float32)
    labels = batch['label']
    t_logits = None
    if teacher_vars:
      t_logits = jax.lax.stop_gradient(
          teacher.apply(teacher_vars[0], images, train=False).astype(jnp.float32))

    def loss_fn(params):
      logits, model_state, _ = common.apply_model(model, params, state.model_state, images,
                                                  train=not ptq, key=key)
      logits = logits.astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      loss = ce
      if t_logits is not None:
        loss = (1.0 - kd_weight) * ce + kd_weight * losses.kd(logits, t_logits, kd_temperature)
      return loss, (logits, model_state)

    if ptq:  # No training: report the loss of the quantized model, keep the weights.
      loss, (logits, _) = loss_fn(state.params)
      new_state, grad_norm = state.replace(step=state.step + 1), jnp.zeros(())
    else:
      (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      new_state = state.apply_gradients(grads, tx, model_state=model_state)
      grad_norm = optax.tree.norm(grads)
    return new_state, {'loss': loss, 'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
                       'grad_norm': grad_norm, 'lr': schedule(state.step)}

  base_eval = common.classification_eval_step(model, info.mean, info.std, jnp.float32,
                                              info.num_classes)

  def eval_step(state, batch, *unused_teacher):
    return base_eval(state, batch)

  def place_teacher(mesh):
    placed, shardings = distill.place_teacher(teacher, teacher_np, shape, mesh)
    return (placed,), (shardings,)

  eval_batches = lambda: data.make_eval_iterator(  # noqa: E731
      config.data, config.data.eval_split,
      global_batch_size=config.get('eval_batch_size', config.batch_size))

  def on_init(state):
    return common.load_init_from(config.init_from,
                                 state, params_prefix=tuple(config.get('init_prefix', ()) or ()),
                                 skip=())

  def on_finish(state, eval_results: dict) -> dict:  # pylint: disable=unused-argument
    export_dir = storage.join(workdir, 'export')
    manifest = export_lib.export_model(
        export_dir, float_model, qcfg, state.params, state.model_state, image_shape=shape,
        mean=info.mean, std=info.std,
        info={'model': config.model.name, 'num_classes': info.num_classes})
    report = pruning.sparsity_report(jax.device_get(state.params))
    n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.model_state))
    fp32_bytes = 4 * (report['params'] + n_state)
    exported = export_lib.evaluate_export(export_dir, eval_batches())
    size = export_lib.export_size_bytes(export_dir)
    return {'nonzero_params': report['nonzero_params'], 'sparsity': report['global'],
            'sparsity_layers': report['layers'], 'export_bytes': size,
            'export_bytes_zlib': manifest['weights_bytes_zlib'], 'fp32_bytes': fp32_bytes,
            'compression_ratio': round(fp32_bytes / size, 3),
            'export_accuracy': exported['accuracy'],
            'quant': {k: v for k, v in qcfg.to_dict().items()},
            **({'teacher': teacher_desc} if use_teacher else {})}

  return loop.Task(
      kind='compress', init_state=init_state, train_step=step, eval_step=eval_step,
      train_iterator=data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                              seed=config.seed),
      eval_batches=eval_batches, global_batch_size=config.batch_size, total_steps=steps,
      meta={'model': config.model.name, 'dataset': config.data.name,
            'num_classes': info.num_classes, 'image_shape': list(shape)},
      place_extra_args=place_teacher if use_teacher else None,
      on_init=on_init if config.get('init_from') else None, on_finish=on_finish)


def train(config, workdir: str) -> dict:
  """Runs `jkd compress`: returns the summary (also in `workdir/summary.json`)."""
  # Checked here, not in `build_task`, so that `jkd bench` can time the step from random weights.
  if not config.get('init_from'):
    raise UserError('jkd compress needs a trained model: set --config.init_from=DIR to the '
                    'workdir of `jkd train` or `jkd distill`.')
  return loop.run(build_task(config, workdir), config, workdir, label='compress')
