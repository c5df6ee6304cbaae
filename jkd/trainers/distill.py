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

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jkd import data, loop, teachers
from jkd.data import randaugment
from jkd.optim import accumulate_steps, make_optimizer
from jkd.teacher import Teacher
from jkd.teachers import Ensemble
from jkd.trainers import common, ema, teacher_cache
from jkd.trainers import distill_heads as H
from jkd.trainers import distill_terms as T
from jkd.trainers.distill_terms import PROJECTORS, STUDENT


def has_distill_head(model) -> bool:
  return bool(getattr(model, 'distill_token', False))


def apply_student(student, params, model_state, images, *, train: bool, key=None,
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


@dataclasses.dataclass(frozen=True)
class Distillation:
  """The student, the frozen teacher and the loss terms of a run: what its steps compute with,
  besides the state and the teacher's placed variables.

  Attributes:
    student: the student module (DeiT's two heads when it has a distillation token).
    teacher: the frozen teacher (a `jkd.teachers.Ensemble` of `config.teachers`), or None when
      its logits come from a cache.
    terms: `config.losses` parsed (`distill_terms.parse_terms`).
    projectors: student feature -> teacher width maps, for the FitNet terms that need one.
    info: the dataset (classes, normalisation).
    dtype: the student's compute dtype.
    capture: whether any term reads intermediate features (taps).
    cache_rest: the cache's `rest` mode when the teacher is cached, else None.
    expanded: the terms as computed: `terms` itself for one teacher; with an ensemble, a copy
      per teacher of each term that reads them (`Ensemble.expand_terms`).
    heads: the trainable heads of CRD / ReviewKD / OFA terms (`distill_heads.Heads`), or None.
    num_data: training examples (the size of CRD's memory banks).
  """
  student: nn.Module
  teacher: Teacher | Ensemble | None
  terms: list[dict]
  projectors: T.Projectors
  info: data.DatasetInfo
  dtype: Any
  capture: bool
  cache_rest: str | None = None
  expanded: list[dict] | None = None
  heads: H.Heads | None = None
  num_data: int = 0

  @classmethod
  def from_config(cls, config, run: common.RunData,
                  teacher: Teacher | Ensemble | None) -> 'Distillation':
    """Student and terms from `config`; projector widths and heads from both models' feature
    shapes. `teacher` None: the logits come from a cache, or no term reads a teacher."""
    student = common.create_model(config.model, run.info.num_classes)
    terms = T.parse_terms(config.losses)
    capture = T.needs_features(terms)
    cached = teacher is None and T.needs_teacher(terms)
    if cached:  # The teacher is never loaded: its top-k logits come with each batch.
      teacher_cache.check_terms(terms)
    if capture and not T.reads_attention(terms):
      # Block and stage taps only: ViTs keep the fused attention kernel (cuDNN on GPU) instead
      # of the explicit path that sowing the maps needs.
      student = common.without_attention_maps(student)
      teacher = teacher and teacher.without_attention_maps()
    expanded = (teacher.expand_terms(terms, T.LOGIT_TERMS, T.TEACHER_FREE)
                if isinstance(teacher, Ensemble) else terms)
    d = cls(student, teacher, terms, T.Projectors({}), run.info,
            common.compute_dtype(config.model.get('dtype', 'float32')), capture,
            teacher_cache.settings(config)['rest'] if cached else None, expanded,
            num_data=run.info.num_examples[config.data.train_split])
    s_feats, t_feats = d.student_features(run.shape), d.teacher_features(run.shape)
    specs = H.head_specs(expanded, s_feats, t_feats, run.info.num_classes)
    return dataclasses.replace(d, projectors=T.Projectors(T.projector_widths(expanded, s_feats,
                                                                             t_feats)),
                               heads=H.Heads(specs) if specs else None)

  @property
  def stateful(self) -> bool:
    """Whether a term keeps state across steps (CRD's memory banks)."""
    return any(t['kind'] == 'crd' for t in self.expanded)

  @property
  def ensemble(self) -> Ensemble | None:
    return self.teacher if isinstance(self.teacher, Ensemble) else None

  def teacher_features(self, shape) -> dict:
    """term name -> the abstract teacher feature it reads (eval_shape: no compute)."""
    if not self.capture:
      return {}
    t_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                              self.teacher.variables)
    _, t_inter = jax.eval_shape(lambda v, x: self.teacher.apply(v, x, capture=True),
                                t_abstract, jax.ShapeDtypeStruct((2, *shape), jnp.float32))
    return self.gather_teacher_taps(t_inter)

  def gather_teacher_taps(self, t_inter) -> dict:
    """term name -> the teacher feature it reads; with an ensemble, each copy its teacher's."""
    if self.ensemble is None:
      return T.gather_taps(self.terms, t_inter, 'teacher')
    out = {}
    for name in self.ensemble.names:
      copies = [t for t in self.expanded if t.get('member') == name]
      out.update(T.gather_taps(copies, t_inter[name], 'teacher'))
    return out

  def student_features(self, shape) -> dict:
    """term name -> the abstract student feature it reads (eval_shape: no compute)."""
    s_params, s_state = jax.eval_shape(
        lambda k: common.init_variables(self.student, k, shape), jax.random.key(0))
    _, _, _, s_inter = jax.eval_shape(
        lambda p, ms, x: apply_student(self.student, p, ms, x, train=False,
                                       capture=self.capture),
        nn.meta.unbox(s_params), s_state, jax.ShapeDtypeStruct((2, *shape), jnp.float32))
    return T.gather_taps(self.expanded, s_inter, STUDENT)

  def init_state(self, tx, shape, key) -> loop.TrainState:
    """params = {student, projectors[, heads]}; model_state = the student's (BatchNorm
    statistics)[, the terms' state under 'distill']."""
    s_key, p_key = jax.random.split(key)
    s_params, model_state = common.init_variables(self.student, s_key, shape)
    widths = self.projectors.widths
    s_feats = self.student_features(shape)
    feats = {name: jnp.zeros((1, *s.shape[1:]), jnp.float32)
             for name, s in s_feats.items() if name in widths}
    params = {STUDENT: s_params,
              PROJECTORS: self.projectors.init(p_key, feats).get('params', {})}
    if self.heads is not None:  # Fresh keys: the projectors' init stays what it was.
      zeros = lambda tree: jax.tree.map(lambda f: jnp.zeros((2, *f.shape[1:]), jnp.float32), tree)
      params[H.HEADS] = self.heads.init(jax.random.fold_in(p_key, 1), zeros(s_feats),
                                        zeros(self.teacher_features(shape)))['params']
    if self.stateful:
      model_state = {**model_state, H.STATE: H.init_state(
          self.expanded, jax.random.fold_in(p_key, 2), self.num_data)}
    return common.new_state(params, model_state, tx)

  def teacher_outputs(self, teacher_vars, batch, images):
    """(teacher logits (B, C) fp32, tapped teacher features, each teacher's logits {name:
    (B, C)} or None), constants for the student. An ensemble's logits are combined."""
    if self.teacher is None:  # Cached (or no teacher at all: teacher-free terms only).
      return ((teacher_cache.teacher_logits(batch, self.info.num_classes, self.cache_rest)
               if self.cache_rest else None), {}, None)
    if self.ensemble is not None:
      members, t_inter = self.ensemble.apply_members(teacher_vars[0], images,
                                                     capture=self.capture)
      members = jax.lax.stop_gradient(members)
      return (self.ensemble.combined(members),
              jax.lax.stop_gradient(self.gather_teacher_taps(t_inter)), members)
    t_logits, t_inter = self.teacher.apply(teacher_vars[0], images, capture=self.capture)
    return (jax.lax.stop_gradient(t_logits.astype(jnp.float32)),
            jax.lax.stop_gradient(T.gather_taps(self.terms, t_inter, 'teacher')), None)

  def loss(self, params, model_state, images, *, labels, targets, t_logits, t_feats, key,
           step, t_members=None, index=None):
    """The weighted sum of the terms; aux = (student prediction, model_state, term values).

    The prediction is DeiT's mean of both heads where the student has two. `model_state`
    comes back with the student's new statistics and the terms' new state (CRD's banks).
    `index`: the batch's positions in the training set (CRD).
    """
    student_state, run_state = common.split_run_state(model_state)
    s_logits, s_dist, student_state, s_inter = apply_student(
        self.student, params[STUDENT], student_state, images.astype(self.dtype), train=True,
        key=key, capture=self.capture)
    s_logits = s_logits.astype(jnp.float32)
    s_feats = T.gather_taps(self.expanded, s_inter, STUDENT)
    widths = self.projectors.widths
    projected = (self.projectors.apply({'params': params[PROJECTORS]},
                                       {n: s_feats[n] for n in widths}) if widths else {})
    inputs = dict(s_logits=s_logits, labels=labels, targets=targets, s_feats=s_feats,
                  t_feats=t_feats, projected=projected, step=step, s_dist_logits=s_dist)
    if self.ensemble is None and self.heads is None:
      values = T.term_values(self.terms, t_logits=t_logits, **inputs)
    else:
      values, new_terms_state = self._expanded_values(
          params, run_state.get(H.STATE, {}), t_logits, t_members, index, key, inputs)
      if self.stateful:
        run_state = {**run_state, H.STATE: new_terms_state}
    output = s_logits if s_dist is None else (s_logits + s_dist) / 2
    return T.total(self.terms, values), (output, {**student_state, **run_state}, values)

  def _expanded_values(self, params, terms_state, t_logits, t_members, index, key, inputs):
    """Every (expanded) term's value, each copy against its own teacher's logits and the rest
    against the combined ones, the head terms through their heads; (values, new terms state)."""
    heads = (self.heads.apply({'params': params[H.HEADS]}, inputs['s_feats'],
                              inputs['t_feats']) if self.heads is not None else {})
    values, new_state = {}, dict(terms_state)
    for i, term in enumerate(self.expanded):
      member = term.get('member')
      logits = t_logits if member is None else t_members[member]
      if term['kind'] in H.HEAD_KINDS:
        values[term['name']], new = H.term_value(
            term, heads, state=terms_state, index=index, key=jax.random.fold_in(key, 1000 + i),
            labels=inputs['labels'], s_logits=inputs['s_logits'], t_logits=logits,
            t_feats=inputs['t_feats'], step=inputs['step'], num_data=self.num_data)
        if new is not None:
          new_state[term['name']] = new
      else:
        values[term['name']] = T.term_value(term, t_logits=logits, **inputs)
    if self.ensemble is not None:
      values = self.ensemble.combine_values(self.terms, values)
    return values, jax.lax.stop_gradient(new_state)


def distill_step(d: Distillation, tx, schedule, *, mixup_alpha: float, ema_decay: float = 0.0,
                 ema_every: int = 1, augment: dict | None = None):
  """Returns `step(state, batch, key, *teacher_vars) -> (state, metrics)`: both models see the
  same (mixed) images; the teacher's variables are an argument, never updated. `ema_decay` > 0
  moves the EMA of the student's weights (`jkd.trainers.ema`)."""
  def step(state: loop.TrainState, batch, key, *teacher_vars):
    labels = batch['label']
    images, targets, dropout_key = common.step_inputs(batch, key, state.step, d.info,
                                                      mixup_alpha, augment)
    t_logits, t_feats, t_members = d.teacher_outputs(teacher_vars, batch, images)
    loss_fn = functools.partial(d.loss, model_state=state.model_state, images=images,
                                labels=labels, targets=targets, t_logits=t_logits,
                                t_feats=t_feats, key=dropout_key, step=state.step,
                                t_members=t_members, index=batch.get('index'))
    (loss, (s_logits, model_state, values)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, tx, model_state=model_state)
    new_state = ema.after_step(state, new_state, ema_decay, ema_every, into=STUDENT)
    s_pred = jnp.argmax(s_logits, -1)
    agreement = ({} if t_logits is None else  # teacher-free terms: no teacher to agree with
                 {'agreement': jnp.mean(s_pred == jnp.argmax(t_logits, -1))})
    return new_state, {
        'loss': loss, **{f'loss_{k}': v for k, v in values.items()},
        'train_accuracy': jnp.mean(s_pred == labels), **agreement,
        'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  return step


def distill_eval_step(d: Distillation):
  """Returns `eval_step(state, batch, *teacher_vars)`: sums of the student's correct
  predictions and loss, each DeiT head's accuracy, and the teacher's accuracy and agreement
  (from its forward, or from the cache's stored predictions)."""
  def eval_step(state, batch, *teacher_vars):
    images = data.normalize(batch['image'], d.info.mean, d.info.std, jnp.float32)
    student_state, _ = common.split_run_state(state.model_state)
    s_logits, s_dist, _, _ = apply_student(d.student, state.params[STUDENT], student_state,
                                           images.astype(d.dtype), train=False)
    mask, labels = batch['mask'], batch['label']
    out = s_logits if s_dist is None else (s_logits + s_dist) / 2
    s_pred = jnp.argmax(out, -1)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), labels)
    sums = {'correct': jnp.sum((s_pred == labels) * mask), 'loss': jnp.sum(ce * mask),
            'count': jnp.sum(mask),
            'confusion': common.confusion_counts(labels, s_pred, mask, d.info.num_classes),
            **ema.eval_sums(state, lambda p, v: _prediction(d, p, v, images), labels, mask)}
    if s_dist is not None:  # Each DeiT head alone, beside their mean.
      sums['cls_head_accuracy'] = jnp.sum((jnp.argmax(s_logits, -1) == labels) * mask)
      sums['dist_head_accuracy'] = jnp.sum((jnp.argmax(s_dist, -1) == labels) * mask)
    if d.ensemble is not None:  # The ensemble's accuracy, and each teacher's.
      members, _ = d.ensemble.apply_members(teacher_vars[0], images)
      for name, logits in members.items():
        sums[f'teacher_accuracy_{name}'] = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
      t_pred = jnp.argmax(d.ensemble.combined(members), -1)
    elif teacher_vars:
      t_pred = jnp.argmax(d.teacher.apply(teacher_vars[0], images)[0], -1)
    else:  # Cached teacher: its test predictions were stored with the cache (if at all).
      t_pred = batch.get('teacher_pred')
    if t_pred is not None:
      sums['teacher_accuracy'] = jnp.sum((t_pred == labels) * mask)
      sums['agreement'] = jnp.sum((s_pred == t_pred) * mask)
    return sums
  return eval_step


def _prediction(d: Distillation, params, model_vars, images):
  """The student's eval output (DeiT: the mean of its heads) for given variables."""
  logits, dist, _, _ = apply_student(d.student, params, model_vars, images.astype(d.dtype),
                                     train=False)
  return logits if dist is None else (logits + dist) / 2


def build_task(config, workdir: str, *, teacher: Teacher | None = None) -> loop.Task:
  """The distillation Task for `jkd.loop.run`.

  Args:
    teacher: the frozen teacher; default `config.teachers` (an ensemble) or
      `config.teacher.workdir` (none with a teacher cache).
  """
  del workdir  # Everything is written by the loop.
  run = common.RunData.from_config(config)
  cached = teacher_cache.enabled(config)
  online = not cached and T.needs_teacher(T.parse_terms(config.losses))  # else Tf-KD / cache
  if online:
    teacher = teacher or teachers.from_config(config, run.info.num_classes, run.shape)
  d = Distillation.from_config(config, run, teacher if online else None)
  description = (teacher_cache.describe(config) if cached else
                 d.teacher.description if online else {'teacher_free': True})
  tx, schedule = make_optimizer(config.optim, config.batch_size, run.steps)
  decay = ema.decay_of(config)
  train_iterator = data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                            seed=config.seed, with_index=d.stateful)
  eval_batches = common.eval_batches(config)
  if cached:
    train_iterator = teacher_cache.CachedTeacherIterator(train_iterator, config)
    eval_batches = functools.partial(teacher_cache.eval_batches, config, eval_batches)
  return common.make_task(
      config, 'distill', run,
      meta={'num_classes': run.info.num_classes, 'params_prefix': [STUDENT],
            'teacher': description},
      init_state=lambda key: ema.attach(d.init_state(tx, run.shape, key), decay, STUDENT),
      train_step=distill_step(d, tx, schedule, mixup_alpha=config.get('mixup_alpha', 0.0),
                              ema_decay=decay, ema_every=accumulate_steps(config.optim),
                              augment=randaugment.augment_settings(config.data)),
      eval_step=distill_eval_step(d), train_iterator=train_iterator, eval_batches=eval_batches,
      place_extra_args=d.teacher.step_args if online else None,
      # A student warm-started from any workdir whose model fits (a hint stage, a supervised
      # run, a previous distillation), head included; projectors start fresh.
      on_init=common.init_from(config, skip=(), into=STUDENT),
      on_finish=functools.partial(teacher_summary, config, description))


def teacher_summary(config, description: dict, state, eval_results: dict) -> dict:
  """`on_finish`: the teacher in the run's summary, and the cache's facts when it was cached."""
  del state, eval_results
  return {'teacher': description, **({'teacher_cache': teacher_cache.summary(config)}
                                     if teacher_cache.enabled(config) else {})}


def before_run(config) -> None:
  """What `jkd distill` does before its loop: builds (or completes) the teacher cache, if set;
  resumable."""
  if teacher_cache.enabled(config):
    teacher_cache.ensure(config)
