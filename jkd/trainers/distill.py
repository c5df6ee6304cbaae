"""Teacher -> student distillation: `jkd distill`.

The teacher is frozen: it comes from a jkd workdir (`config.teacher.workdir`), runs in inference
mode in its own compute dtype, is sharded by the same logical-axis rules as the student, and is
passed to the step as an argument, never stored in the student's state or checkpoints. Teacher
and student see the same (augmented, mixed) images: big_vision's consistent teaching. The loss is
the weighted sum of the terms in `config.losses` (see `jkd.trainers.distill_terms`).

A DeiT student (`config.model.distill_token=True`) trains its class head with 'ce' and its
distillation head with the teacher terms; it is evaluated on the mean of both heads, and each
head's accuracy is reported too. With `config.teacher.cache.dir` set, the teacher runs once over
the run's exact batches and the step reads its stored top-k logits instead (FKD / ReLabel; see
`jkd.trainers.teacher_cache`): no teacher forward and no teacher in memory while distilling.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jkd import data, loop, parallel
from jkd.checkpoint import load_arrays
from jkd.errors import UserError
from jkd.optim import make_optimizer
from jkd.trainers import common
from jkd.trainers import distill_terms as T
from jkd.trainers import teacher_cache

STUDENT = 'student'        # params['student']: the model that is kept.
PROJECTORS = 'projectors'  # params['projectors']: FitNet regressors, dropped after training.


def load_teacher(config, num_classes: int):
  """Returns (teacher module, teacher variables as numpy, description) from the config."""
  tcfg = config.teacher
  if not tcfg.get('workdir'):
    raise UserError('No teacher: set --config.teacher.workdir=DIR to the workdir of a trained '
                    'model (e.g. the output of `jkd train`).')
  arrays, meta = load_arrays(tcfg.workdir)
  params = arrays['params']
  for key in meta.get('params_prefix', ()):
    params = params[key]
  saved_model = ml_collections.ConfigDict((meta.get('config') or {}).get('model') or {})
  if not saved_model.get('name'):
    raise UserError(f'The checkpoint in {tcfg.workdir} does not say which model it holds.')
  if tcfg.get('dtype'):
    saved_model.dtype = tcfg.dtype
  teacher = common.create_model(saved_model, num_classes)
  variables = {'params': params, **(arrays.get('model_state') or {})}
  return teacher, variables, {'workdir': tcfg.workdir, 'model': saved_model.name}


def _teacher_apply(teacher, variables, images, capture: bool):
  if capture:
    logits, inter = teacher.apply(variables, images, train=False, mutable=['intermediates'])
    return logits, inter['intermediates']
  return teacher.apply(variables, images, train=False), {}


def teacher_storage_dtype(teacher) -> np.dtype:
  """The dtype the frozen teacher's weights are kept in: its compute dtype when that is a
  16-bit float (it is never trained, so fp32 masters buy nothing and cost 2x the memory: a
  ViT-H teacher is 2.4 GiB in fp32), else fp32."""
  dtype = np.dtype(getattr(teacher, 'dtype', None) or np.float32)
  return dtype if dtype.name in ('bfloat16', 'float16') else np.dtype(np.float32)


def place_teacher(teacher, teacher_np, shape, mesh):
  """Puts the teacher's numpy variables on `mesh`, sharded by the student's logical-axis rules:
  parameters in `teacher_storage_dtype`, other collections (BatchNorm statistics) in fp32.
  Returns (variables, shardings)."""
  params, state = jax.eval_shape(lambda k: common.init_variables(teacher, k, shape),
                                 jax.random.key(0))
  abstract = {'params': params, **state}
  storage = teacher_storage_dtype(teacher)
  placed, shardings = {}, {}
  for name, tree in teacher_np.items():
    placed[name], shardings[name] = parallel.place_frozen(
        tree, abstract[name], mesh, storage if name == 'params' else np.float32)
  return placed, shardings


def run_step_key(config) -> jax.Array:
  """The key `jkd.loop.run` passes to every train step (derived the same way from config.seed),
  so the teacher cache can redraw each step's mixup exactly."""
  base_key = jax.random.key(config.seed, impl=config.get('rng_impl', 'rbg'))
  return jax.random.split(base_key)[1]


def step_inputs(batch, key, step, info, mixup_alpha: float):
  """What both models see at `step`: (normalized, mixed images (B, H, W, C) fp32, mixed one-hot
  targets (B, C), dropout key). Mixup is drawn from (key, step) only, so the teacher cache
  reproduces it."""
  key = jax.random.fold_in(key, step)
  mix_key, dropout_key = jax.random.split(key)
  images = data.normalize(batch['image'], info.mean, info.std, jnp.float32)
  targets = jax.nn.one_hot(batch['label'], info.num_classes)
  if mixup_alpha > 0:  # Mixed once, seen by both models: consistent teaching.
    images, targets = data.mixup(mix_key, images, targets, mixup_alpha)
  return images, targets, dropout_key


def has_distill_head(model) -> bool:
  return bool(getattr(model, 'distill_token', False))


def _apply_student(student, params, model_state, images, *, train: bool, key=None,
                   capture: bool = False):
  """`common.apply_model` that also returns the distillation head's logits (None without one).

  Returns (class logits, distillation logits or None, new model_state, intermediates).
  """
  if not has_distill_head(student):
    logits, model_state, inter = common.apply_model(student, params, model_state, images,
                                                    train=train, key=key, capture=capture)
    return logits, None, model_state, inter
  mutable = (list(model_state) if train else []) + (['intermediates'] if capture else [])
  rngs = {'dropout': key} if (train and key is not None) else {}
  out = student.apply({'params': params, **model_state}, images, train=train, rngs=rngs,
                      mutable=mutable or False, method='heads')
  if not mutable:
    return *out, model_state, {}
  (cls_logits, dist_logits), updated = out
  updated = dict(updated)
  inter = updated.pop('intermediates', {})
  return cls_logits, dist_logits, {**model_state, **updated}, inter


def build_task(config, workdir: str) -> loop.Task:
  if config.get('method') == 'mim':  # A SimMIM / MAE teacher: jkd/trainers/mim_distill.py.
    from jkd.trainers import mim_distill
    return mim_distill.build_task(config, workdir)
  info = data.get_info(config.data)
  shape = common.input_shape(info, config.data)
  student = common.create_model(config.model, info.num_classes)
  dtype = common.compute_dtype(config.model.get('dtype', 'float32'))
  terms = T.parse_terms(config.losses)
  capture = T.needs_features(terms)
  cached = teacher_cache.enabled(config)
  if cached:  # The teacher is never loaded: its top-k logits come with each batch.
    teacher_cache.check_terms(terms)
    teacher = teacher_np = None
    teacher_desc = teacher_cache.describe(config)
  else:
    teacher, teacher_np, teacher_desc = load_teacher(config, info.num_classes)
  if capture and not T.reads_attention(terms):
    # Block and stage taps only: ViTs keep the fused attention kernel (cuDNN on GPU) instead
    # of the explicit path that sowing the maps needs.
    student = common.without_attention_maps(student)
    teacher = teacher and common.without_attention_maps(teacher)
  teacher_dtype = common.compute_dtype(config.teacher.get('dtype') or 'float32')
  steps = common.total_steps(config, info.num_examples[config.data.train_split])
  tx, schedule = make_optimizer(config.optim, config.batch_size, steps)
  mixup_alpha = config.get('mixup_alpha', 0.0)
  rest_mode = teacher_cache.settings(config)['rest'] if cached else None

  # Feature shapes of both models decide the projectors (no compute: eval_shape only).
  dummy = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  t_inter = {}
  if capture:
    t_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher_np)
    _, t_inter = jax.eval_shape(lambda v, x: _teacher_apply(teacher, v, x, capture),
                                t_abstract, dummy)
  s_abstract = jax.eval_shape(lambda k: common.init_variables(student, k, shape),
                              jax.random.key(0))
  _, _, _, s_inter = jax.eval_shape(
      lambda p, ms, x: _apply_student(student, p, ms, x, train=False, capture=capture),
      nn.meta.unbox(s_abstract[0]), s_abstract[1], dummy)
  widths = T.projector_widths(terms, T.gather_taps(terms, s_inter, STUDENT),
                              T.gather_taps(terms, t_inter, 'teacher'))
  projectors = T.Projectors(widths)

  def init_state(key):
    s_key, p_key = jax.random.split(key)
    s_params, model_state = common.init_variables(student, s_key, shape)
    feats = {name: jnp.zeros((1, *s.shape[1:]), jnp.float32) for name, s in
             T.gather_taps(terms, s_inter, STUDENT).items() if name in widths}
    params = {STUDENT: s_params, PROJECTORS: projectors.init(p_key, feats).get('params', {})}
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           model_state=model_state, opt_state=tx.init(params))

  def place_extra_args(mesh):
    placed, shardings = place_teacher(teacher, teacher_np, shape, mesh)
    return (placed,), (shardings,)

  def step(state, batch, key, *teacher_vars):
    labels = batch['label']
    images, targets, dropout_key = step_inputs(batch, key, state.step, info, mixup_alpha)
    if cached:
      t_logits, t_feats = teacher_cache.teacher_logits(batch, info.num_classes, rest_mode), {}
    else:
      t_logits, t_inter = _teacher_apply(teacher, teacher_vars[0],
                                         images.astype(teacher_dtype), capture)
      t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
      t_feats = jax.lax.stop_gradient(T.gather_taps(terms, t_inter, 'teacher'))

    def loss_fn(params):
      s_logits, s_dist, model_state, s_inter = _apply_student(
          student, params[STUDENT], state.model_state, images.astype(dtype), train=True,
          key=dropout_key, capture=capture)
      s_logits = s_logits.astype(jnp.float32)
      s_feats = T.gather_taps(terms, s_inter, STUDENT)
      projected = (projectors.apply({'params': params[PROJECTORS]},
                                    {n: s_feats[n] for n in widths}) if widths else {})
      values = {t['name']: T.term_value(
          t, s_logits=s_logits, t_logits=t_logits, labels=labels, targets=targets,
          s_feats=s_feats, t_feats=t_feats, projected=projected, step=state.step,
          s_dist_logits=s_dist)
          for t in terms}
      total = sum(t['weight'] * values[t['name']] for t in terms)
      # What the student predicts: DeiT's mean of both heads where it has two.
      output = s_logits if s_dist is None else (s_logits + s_dist) / 2
      return total, (output, model_state, values)

    (loss, (s_logits, model_state, values)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, tx, model_state=model_state)
    s_pred, t_pred = jnp.argmax(s_logits, -1), jnp.argmax(t_logits, -1)
    return new_state, {
        'loss': loss, **{f'loss_{k}': v for k, v in values.items()},
        'train_accuracy': jnp.mean(s_pred == labels), 'agreement': jnp.mean(s_pred == t_pred),
        'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}

  def eval_step(state, batch, *teacher_vars):
    images = data.normalize(batch['image'], info.mean, info.std, jnp.float32)
    s_logits, s_dist, _, _ = _apply_student(student, state.params[STUDENT], state.model_state,
                                            images.astype(dtype), train=False)
    mask, labels = batch['mask'], batch['label']
    out = s_logits if s_dist is None else (s_logits + s_dist) / 2
    s_pred = jnp.argmax(out, -1)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), labels)
    sums = {'correct': jnp.sum((s_pred == labels) * mask), 'loss': jnp.sum(ce * mask),
            'count': jnp.sum(mask)}
    if s_dist is not None:  # Each DeiT head alone, beside their mean.
      sums['cls_head_accuracy'] = jnp.sum((jnp.argmax(s_logits, -1) == labels) * mask)
      sums['dist_head_accuracy'] = jnp.sum((jnp.argmax(s_dist, -1) == labels) * mask)
    if teacher_vars:
      t_pred = jnp.argmax(teacher.apply(teacher_vars[0], images.astype(teacher_dtype),
                                        train=False), -1)
    else:  # Cached teacher: its test predictions were stored with the cache (if at all).
      t_pred = batch.get('teacher_pred')
    if t_pred is not None:
      sums['teacher_accuracy'] = jnp.sum((t_pred == labels) * mask)
      sums['agreement'] = jnp.sum((s_pred == t_pred) * mask)
    return sums

  def eval_batches():
    batches = data.make_eval_iterator(
        config.data, config.data.eval_split,
        global_batch_size=config.get('eval_batch_size', config.batch_size))
    return teacher_cache.with_eval_predictions(config, batches) if cached else batches

  def on_init(state):
    # A student warm-started from any workdir whose model fits (a hint stage, a supervised
    # run, a previous distillation), head included; projectors start fresh.
    return common.load_init_from(config.init_from, state, skip=(), into=STUDENT)

  def on_finish(state, eval_results: dict) -> dict:  # pylint: disable=unused-argument
    return {'teacher': teacher_desc,
            **({'teacher_cache': teacher_cache.summary(config)} if cached else {})}

  train_iterator = data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                            seed=config.seed)
  if cached:
    train_iterator = teacher_cache.CachedTeacherIterator(train_iterator, config)
  return loop.Task(
      kind='distill', init_state=init_state, train_step=step, eval_step=eval_step,
      train_iterator=train_iterator, eval_batches=eval_batches,
      global_batch_size=config.batch_size, total_steps=steps,
      meta={'model': config.model.name, 'dataset': config.data.name,
            'num_classes': info.num_classes, 'image_shape': list(shape),
            'params_prefix': [STUDENT], 'teacher': teacher_desc},
      place_extra_args=None if cached else place_extra_args,
      on_init=on_init if config.get('init_from') else None, on_finish=on_finish)


def train(config, workdir: str) -> dict:
  """Runs `jkd distill`: returns the summary (also in `workdir/summary.json`)."""
  if teacher_cache.enabled(config):  # Builds (or completes) the cache first; resumable.
    teacher_cache.ensure(config)
  summary = loop.run(build_task(config, workdir), config, workdir, label='distill')
  return summary
