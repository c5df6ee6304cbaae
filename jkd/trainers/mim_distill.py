"""MIM-teacher distillation: a masked student against a SimMIM / MAE teacher (`jkd distill`
with `config.method='mim'`).

The teacher is a `jkd pretrain` workdir (or an earlier stage of this trainer): its encoder and
decoder are loaded frozen (`Teacher.mim_from_config`), run in inference mode, sharded by the
student's rules and passed to the step, never checkpointed. The student is a smaller ViT with its
own decoder of the teacher's method and patch size, trained with masking (the mask drawn in the
step, as `jkd pretrain`). The loss is a weighted sum of named terms (`config.losses`): `pixel`,
`teacher_pixel`, `masked_feature` and `tinymim_relation`, described in
`jkd.trainers.mim_terms`, whose `MimDistillation` owns both models' masks, forward passes and
losses.

The workdir is a MIM checkpoint like `jkd pretrain`'s: `params['student']` (meta `params_prefix`)
holds the SimMIM / MAE student under the pretraining names, so `jkd train --config
configs/fashion_mnist/finetune.py --config.init_from=W` fine-tunes its encoder, and W can teach
a next stage. Eval reports the student's and the teacher's reconstruction loss on fixed masks;
`reconstructions.png` shows both.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jkd import data, figures, loop, storage
from jkd.mim import MimObjective
from jkd.optim import make_optimizer
from jkd.teacher import Teacher
from jkd.trainers import common
from jkd.trainers.distill_terms import STUDENT
from jkd.trainers.mim_terms import MimDistillation
from jkd.trainers.pretrain import EVAL_MASK_SEED, figure_inputs, first_eval_images


def mim_distill_step(d: MimDistillation, tx, schedule, *, mean, std):
  """Returns `step(state, batch, key, teacher_vars) -> (state, metrics)`: draw the student's
  mask, the teacher's targets under it, then the terms' gradient step."""
  def step(state: loop.TrainState, batch, key, teacher_vars):
    key = jax.random.fold_in(key, state.step)
    mask_key, dropout_key = jax.random.split(key)
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = d.student.draw_mask(mask_key, target.shape[0])
    t_out = d.teacher_targets(teacher_vars['params'], target, mask)
    loss_fn = functools.partial(d.loss, target=target, mask=mask, t_out=t_out, key=dropout_key)
    (loss, values), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, tx)
    return new_state, {'loss': loss, **{f'loss_{k}': v for k, v in values.items()},
                       'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  return step


def mim_distill_eval_step(d: MimDistillation, *, mean, std):
  """Returns `eval_step(state, batch, teacher_vars)`: sums over valid rows of the student's and
  the teacher's reconstruction loss on the fixed eval masks (`loss` is comparable with a
  `jkd pretrain` run's eval loss)."""
  def eval_step(state, batch, teacher_vars):
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = d.student.draw_mask(jax.random.key(EVAL_MASK_SEED), target.shape[0])
    s_pred = d.student.forward(state.params[STUDENT], target.astype(d.dtype), mask, train=False)
    t_pred = d.teacher_prediction(teacher_vars['params'], target, mask)
    valid = batch['mask'].astype(jnp.float32)
    count = jnp.sum(valid)
    weigh = lambda v: jnp.where(count > 0, v * count, 0.0)  # noqa: E731
    return {'loss': weigh(d.student.loss(s_pred, target, mask, valid)),
            'teacher_loss': weigh(d.student.loss(t_pred, target, mask, valid)),
            'student_teacher_loss': weigh(d.soft_loss(s_pred, t_pred, mask, valid)),
            'count': count}
  return eval_step


def build_task(config, workdir: str, *, teacher: Teacher | None = None) -> loop.Task:
  """The MIM distillation Task for `jkd.loop.run`.

  Args:
    teacher: the frozen SimMIM / MAE teacher; default `config.teacher.workdir`'s.
  """
  run = common.RunData.from_config(config, square_for='MIM distillation')
  teacher = teacher or Teacher.mim_from_config(config, run.shape)
  d = MimDistillation.from_config(config, run.shape, teacher)
  tx, schedule = make_optimizer(config.optim, config.batch_size, run.steps)
  mean, std = run.info.mean, run.info.std
  return common.make_task(
      config, 'distill', run,
      meta={'method': d.method, 'params_prefix': [STUDENT], 'teacher': teacher.description,
            'mim': d.student.settings,
            'model_fields': {'posemb': d.student.model.posemb}},
      init_state=functools.partial(d.init_state, tx, run.shape),
      train_step=mim_distill_step(d, tx, schedule, mean=mean, std=std),
      eval_step=mim_distill_eval_step(d, mean=mean, std=std),
      place_extra_args=teacher.step_args,
      on_finish=functools.partial(write_figure, config, workdir, d, teacher, mean=mean, std=std))


def write_figure(config, workdir: str, d: MimDistillation, teacher: Teacher, state,
                 eval_results: dict, *, mean, std) -> dict:
  """`on_finish`: the final eval losses, the teacher, and `reconstructions.png` (process 0)."""
  out = {'eval_loss': eval_results.get('loss'),
         'teacher_eval_loss': eval_results.get('teacher_loss'),
         'teacher': teacher.description}
  if jax.process_index() != 0:
    return out
  images = first_eval_images(common.eval_batches(config)(),
                             int(config.get('num_figure_images', 8)))
  path = storage.join(workdir, 'reconstructions.png')
  title = (f'{d.method.upper() if d.method == "mae" else "SimMIM"} distillation: student '
           f'{config.model.name} vs teacher {teacher.description["model"]}, step '
           f'{int(state.step)}')
  write_comparison(path, d.student, jax.device_get(state.params[STUDENT]), d.teacher,
                   teacher.variables['params'], images, mean=mean, std=std, dtype=d.dtype,
                   t_dtype=d.teacher_dtype, title=title)
  return {**out, 'reconstructions': path}


def write_comparison(path: str, s_obj: MimObjective, s_params, t_obj: MimObjective, t_params,
                     images_uint8, *, mean, std, dtype, t_dtype, title: str) -> str:
  """Originals, masked inputs, the student's and the teacher's reconstructions (same masks)."""
  target = data.normalize(images_uint8, mean, std, jnp.float32)
  mask = s_obj.draw_mask(jax.random.key(EVAL_MASK_SEED), target.shape[0])
  recons = []
  for obj, params, dt in ((s_obj, s_params, dtype), (t_obj, t_params, t_dtype)):
    pred = jax.jit(lambda p, x, m, o=obj: o.forward(p, x, m, train=False))(
        params, target.astype(dt), mask)
    recons.append(obj.reconstruct(pred, target, mask)[1])
  originals, masked, to_pixels = figure_inputs(s_obj, target, mask, mean, std)
  return figures.save_reconstructions(
      path, originals, masked, to_pixels(recons[1]), title=title,
      predictions=to_pixels(recons[0]), row_labels=('original', 'masked', 'student', 'teacher'))

