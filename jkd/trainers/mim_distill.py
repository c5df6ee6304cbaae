"""MIM-teacher distillation: a masked student against a SimMIM / MAE teacher (`jkd distill`
with `config.method='mim'`).

The teacher is a `jkd pretrain` workdir (or an earlier stage of this trainer): its encoder and
decoder are loaded frozen, run in inference mode, sharded by the student's rules and passed to
the step, never checkpointed. The student is a smaller ViT with its own decoder of the teacher's
method and patch size, trained with masking (the mask drawn in the step, as `jkd pretrain`). The
loss is a weighted sum of named terms (`config.losses`, a dict `{name: {kind, weight, ...}}` or a
list, as `jkd.trainers.distill_terms`):

  pixel            hard target: the true pixels at masked positions, the method's own loss
                   (SimMIM L1 / MAE MSE with `config.norm_pix_loss`).
  teacher_pixel    soft target: the teacher's predicted pixels at masked positions, same loss.
                   The teacher reconstructs from the student's own mask: MAE's encoder sees the
                   same kept patches, SimMIM's the same masked image. An MAE teacher's output is
                   mapped into the student's target space when their norm_pix settings differ.
  masked_feature   `losses.masked_feature_distill` between student tokens (through a linear
                   projector, dropped after training) and the teacher's encoder tokens of the
                   FULL image. tokens='masked' (MaskDistill): the student's tokens at masked
                   positions -- its encoder's last block for SimMIM (mask tokens go through the
                   encoder), its decoder's last block for MAE (the encoder never sees them).
                   tokens='visible' (DMAE): the student encoder's visible tokens.
  tinymim_relation `losses.tinymim_relation`: Q-K and V-V relations of one student block (the
                   last by default; its heads regrouped to the teacher's head count, as TinyMIM)
                   against the teacher's full-image relations among the tokens the student sees
                   (MAE: its kept tokens; SimMIM: all). The ViT sows q/k/v per block.

Class tokens (MAE's `cls_token`) are left out of feature and relation targets. The workdir is a
MIM checkpoint like `jkd pretrain`'s: `params['student']` (meta `params_prefix`) holds the
SimMIM / MAE student under the pretraining names, so `jkd train --config
configs/fashion_mnist/finetune.py --config.init_from=W` fine-tunes its encoder, and W can teach
a next stage. Eval reports the student's and the teacher's reconstruction loss on fixed masks;
`reconstructions.png` shows both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jkd import data, figures, loop, losses, masking, parallel, storage
from jkd.checkpoint import load_arrays
from jkd.errors import UserError
from jkd.models.mim import METHODS, create_mim
from jkd.models.vit import ViT
from jkd.optim import make_optimizer
from jkd.trainers import common, distill, distill_terms
from jkd.trainers.pretrain import (EVAL_MASK_SEED, MimObjective, figure_inputs,
                                  first_eval_images)

STUDENT = 'student'        # params['student']: the SimMIM / MAE student that is kept.
PROJECTORS = 'projectors'  # params['projectors']: feature heads, dropped after training.

# kind -> default options; options not listed are rejected.
TERMS: dict[str, dict[str, Any]] = {
    'pixel': {},
    'teacher_pixel': {},
    'masked_feature': {'tokens': 'masked', 'teacher_block': -1, 'distance': 'smooth_l1',
                       'normalize_target': True, 'projector': 'auto'},
    'tinymim_relation': {'student_block': -1, 'teacher_block': -1, 'temperature': 1.0},
}
_CHOICES = {'tokens': ('masked', 'visible'), 'distance': ('smooth_l1', 'cosine'),
            'projector': ('auto', 'always', 'none')}
# Fields one MIM class has and the other lacks (decoder_*, posemb...): a student model config
# may carry them for either method; they are used by the method that has them.
_OWN_FIELDS = {m: {f.name for f in dataclasses.fields(c)} for m, c in METHODS.items()}
_METHOD_ONLY = set.union(*_OWN_FIELDS.values()) - set.intersection(*_OWN_FIELDS.values())


def parse_terms(spec: Any) -> list[dict]:
  """`config.losses` -> a list of complete terms `{name, kind, weight, ...options}`."""
  terms = distill_terms.parse_terms(
      spec, TERMS, example="{'pixel': dict(weight=1.0), 'teacher_pixel': dict(weight=1.0)}",
      what='MIM distillation ')
  for term in terms:
    name = term['name']
    for option, allowed in _CHOICES.items():
      if option in term and term[option] not in allowed:
        raise UserError(f'config.losses term {name!r}: {option}={term[option]!r}; use one of '
                        f'{", ".join(allowed)}.')
  return terms


def create_student_or_teacher(method: str, model_cfg: Mapping, channels: int,
                              dtype: str | None = None) -> nn.Module:
  """{name, dtype, ...MIM fields} -> SimMIM / MAE; fields only the other method has are ignored."""
  kwargs = {k: v for k, v in dict(model_cfg).items()
            if k != 'name' and (k in _OWN_FIELDS[method] or k not in _METHOD_ONLY)}
  if dtype:
    kwargs['dtype'] = dtype
  if 'dtype' in kwargs:
    kwargs['dtype'] = common.compute_dtype(kwargs['dtype'])
  kwargs.setdefault('channels', channels)
  return create_mim(method, model_cfg['name'], **kwargs)


def encoder_view(mim: nn.Module) -> ViT:
  """A head-less ViT that runs a MIM model's encoder on whole images with the same params
  (the names match: 'patch_embed', 'pos_embedding', 'cls', 'encoder'); no decoder is run."""
  return ViT(num_classes=0, patch_size=mim.patch_size, width=mim.width, depth=mim.depth,
             num_heads=mim.num_heads, mlp_dim=mim.mlp_dim, dtype=mim.dtype,
             attention=mim.attention, posemb=getattr(mim, 'posemb', 'sincos2d'),
             pool='token' if getattr(mim, 'cls_token', False) else 'gap')


def load_teacher(config, shape) -> tuple[dict, Any, dict]:
  """Reads `config.teacher.workdir`: returns (settings, params as numpy, description).

  settings = {method, model (config dict), mask_ratio, mask_patch_size, norm_pix_loss}.
  """
  workdir = config.teacher.get('workdir')
  if not workdir:
    raise UserError('No teacher: set --config.teacher.workdir=DIR to a `jkd pretrain` workdir '
                    '(MAE or SimMIM), e.g. the output of `jkd pretrain --config '
                    'configs/fashion_mnist/mae.py --workdir DIR`.')
  arrays, meta = load_arrays(workdir)
  saved = meta.get('config') or {}
  method = meta.get('method')
  if method not in METHODS or not (saved.get('model') or {}).get('name'):
    raise UserError(
        f'The teacher {workdir!r} holds a {meta.get("kind")!r} run of {meta.get("model")!r}, '
        'not a masked-image-modeling model: MIM distillation needs a teacher with a pixel '
        'decoder, i.e. the workdir of `jkd pretrain` (config.method mae or simmim) or of an '
        'earlier MIM distillation. Pretrain one with `jkd pretrain --config '
        'configs/fashion_mnist/mae.py --workdir T` and pass --config.teacher.workdir=T, or '
        'distill from this classifier with configs/fashion_mnist/distill.py instead.')
  if list(meta.get('image_shape') or shape) != list(shape):
    raise UserError(f'The teacher {workdir!r} was trained on images of shape '
                    f'{meta.get("image_shape")}, the student gets {list(shape)}: use the '
                    "teacher's dataset and config.data.image_size.")
  params = arrays['params']
  for key in meta.get('params_prefix', ()):
    params = params[key]
  settings = meta.get('mim') or {
      'method': method, 'mask_ratio': saved.get('mask_ratio', 0.75),
      'mask_patch_size': saved.get('mask_patch_size', 0) or 0,
      'norm_pix_loss': saved.get('norm_pix_loss', True)}
  settings = dict(settings, model=saved['model'])
  return settings, params, {'workdir': workdir, 'model': saved['model']['name'],
                            'method': method}


def _drop_cls(x: jax.Array, has_cls: bool, axis: int) -> jax.Array:
  return jax.lax.slice_in_dim(x, 1, None, axis=axis) if has_cls else x


def _block(inter: Mapping, index: int, who: str) -> Mapping:
  depth = sum(1 for k in inter if k.startswith('block'))
  if not -depth <= index < depth:
    raise UserError(f'{who} block {index} does not exist: the {who} has {depth} blocks.')
  return inter[f'block{index % depth}']


def _regroup_heads(x: jax.Array, heads: int) -> jax.Array:
  """(B, H, L, d) -> (B, heads, L, H*d/heads): the same channels split into other heads."""
  b, h, length, d = x.shape
  x = x.transpose(0, 2, 1, 3).reshape(b, length, heads, h * d // heads)
  return x.transpose(0, 2, 1, 3)


def build_task(config, workdir: str) -> loop.Task:
  """The MIM distillation Task for `jkd.loop.run`."""
  info = data.get_info(config.data)
  shape = common.input_shape(info, config.data)
  if shape[0] != shape[1]:
    raise UserError(f'MIM distillation needs square images, got {shape[:2]}: set '
                    '--config.data.image_size.')
  t_set, teacher_np, teacher_desc = load_teacher(config, shape)
  method = t_set['method']
  teacher = create_student_or_teacher(method, t_set['model'], shape[2],
                                      config.teacher.get('dtype') or None)
  student = create_student_or_teacher(method, config.model.to_dict(), shape[2])
  if student.patch_size != teacher.patch_size:
    raise UserError(f'The student patch size {student.patch_size} differs from the teacher '
                    f"{teacher_desc['model']!r}'s {teacher.patch_size}: masks, pixel targets and "
                    'tokens must line up; pick a student ViT with the same patch size.')
  t_view = encoder_view(teacher)
  s_cfg = ml_collections.ConfigDict({
      'method': method, 'mask_ratio': float(config.mask_ratio or t_set['mask_ratio']),
      'mask_patch_size': int(config.mask_patch_size or t_set['mask_patch_size'] or 0),
      'norm_pix_loss': bool(config.norm_pix_loss)})
  s_obj = MimObjective(student, s_cfg, shape[0])
  t_obj = MimObjective(teacher, ml_collections.ConfigDict(
      {k: t_set[k] for k in ('method', 'mask_ratio', 'mask_patch_size', 'norm_pix_loss')}),
                       shape[0])
  dtype = common.compute_dtype(config.model.get('dtype', 'float32'))
  t_dtype = teacher.dtype
  terms = parse_terms(config.losses)
  kinds = {t['kind'] for t in terms}
  needs_view = bool(kinds & {'masked_feature', 'tinymim_relation'})
  if 'tinymim_relation' not in kinds:  # Block outputs only: keep the fused attention kernel.
    t_view = common.without_attention_maps(t_view)
  s_cls, t_cls = getattr(student, 'cls_token', False), getattr(teacher, 'cls_token', False)
  for t in terms:
    if t['kind'] == 'tinymim_relation' and student.width % teacher.num_heads:
      raise UserError(f"config.losses term {t['name']!r}: the student width {student.width} "
                      f'cannot be split into the teacher\'s {teacher.num_heads} heads.')
  # Student feature width per masked_feature term -> a projector where it differs.
  widths = {}
  for t in terms:
    if t['kind'] != 'masked_feature':
      continue
    s_width = (student.decoder_width if method == 'mae' and t['tokens'] == 'masked'
               else student.width)
    if t['projector'] == 'none' and s_width != teacher.width:
      raise UserError(f"config.losses term {t['name']!r}: student width {s_width} != teacher "
                      f"width {teacher.width}; set projector='auto'.")
    if t['projector'] == 'always' or (t['projector'] == 'auto' and s_width != teacher.width):
      widths[t['name']] = (s_width, teacher.width)
  projectors = Projectors({n: w[1] for n, w in widths.items()})
  steps = common.total_steps(config, info.num_examples[config.data.train_split])
  tx, schedule = make_optimizer(config.optim, config.batch_size, steps)
  mean, std = info.mean, info.std

  def init_state(key):
    s_key, p_key, m_key = jax.random.split(key, 3)
    s_params = student.init({'params': s_key}, jnp.zeros((1, *shape), jnp.float32),
                            s_obj.draw_mask(m_key, 1), train=False)['params']
    feats = {n: jnp.zeros((1, 1, w[0]), jnp.float32) for n, w in widths.items()}
    params = {STUDENT: s_params, PROJECTORS: projectors.init(p_key, feats).get('params', {})}
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                           opt_state=tx.init(params))

  def place_teacher(mesh):
    abstract = jax.eval_shape(lambda k: teacher.init(
        {'params': k}, jnp.zeros((1, *shape), jnp.float32), t_obj.draw_mask(k, 1),
        train=False)['params'], jax.random.key(0))
    placed, shardings = parallel.place_frozen(teacher_np, abstract, mesh,
                                              distill.teacher_storage_dtype(teacher))
    return (placed,), (shardings,)

  def to_student_space(t_pred, target):
    """An MAE teacher's patches in the student's target space (norm_pix or raw pixels)."""
    if method != 'mae' or t_obj.norm_pix == s_obj.norm_pix:
      return t_pred
    t = masking.patchify(target, s_obj.patch)
    mu, sd = t.mean(-1, keepdims=True), jnp.sqrt(t.var(-1, keepdims=True, ddof=1) + 1e-6)
    return t_pred * sd + mu if t_obj.norm_pix else (t_pred - mu) / sd

  def soft_loss(s_pred, t_pred, mask, row_weight=None):
    """The method's loss with the teacher's prediction (already in target space) as target."""
    if method == 'simmim':
      return s_obj.loss(s_pred, t_pred, mask, row_weight)
    m = mask.mask if row_weight is None else mask.mask * row_weight[:, None]
    return losses.mae_mse(s_pred, t_pred, m, norm_pix=False)

  def teacher_targets(t_params, target, mask) -> dict:
    """Everything the terms need from the teacher, without gradients."""
    out = {}
    if 'teacher_pixel' in kinds:
      t_pred = t_obj.forward(t_params, target.astype(t_dtype), mask, train=False)
      out['pixel'] = to_student_space(t_pred, target)
    if needs_view:
      _, inter = t_view.apply({'params': t_params}, target.astype(t_dtype), train=False,
                              mutable=['intermediates'])
      out['encoder'] = inter['intermediates']['encoder']
    return jax.lax.stop_gradient(out)

  def term_value(term, params, s_pred, s_inter, target, mask, t_out):
    kind = term['kind']
    if kind == 'pixel':
      return s_obj.loss(s_pred, target, mask)
    if kind == 'teacher_pixel':
      return soft_loss(s_pred, t_out['pixel'], mask)
    if kind == 'masked_feature':
      t_tok = _drop_cls(_block(t_out['encoder'], term['teacher_block'], 'teacher')['out'][0],
                        t_cls, 1)
      if method == 'mae' and term['tokens'] == 'masked':  # The decoder holds masked positions.
        s_tok = _drop_cls(_block(s_inter['decoder']['blocks'], -1, 'student')['out'][0], s_cls, 1)
        s_tok, token_mask = s_tok[:, :t_tok.shape[1]], mask.mask
      elif method == 'mae':                               # DMAE: the visible tokens.
        s_tok = _drop_cls(_block(s_inter['encoder'], -1, 'student')['out'][0], s_cls, 1)
        keep = mask.ids_keep.shape[1]
        s_tok, t_tok = s_tok[:, :keep], masking.gather_tokens(t_tok, mask.ids_keep)
        token_mask = jnp.ones(s_tok.shape[:2], jnp.float32)
      else:
        s_tok = _block(s_inter['encoder'], -1, 'student')['out'][0]
        m = s_obj.patch_mask(mask)
        token_mask = m if term['tokens'] == 'masked' else 1 - m
      if term['name'] in widths:
        s_tok = projectors.apply({'params': params[PROJECTORS]}, {term['name']: s_tok})[
            term['name']]
      return losses.masked_feature_distill(s_tok, t_tok, token_mask, kind=term['distance'],
                                           normalize_target=term['normalize_target'])
    if kind == 'tinymim_relation':
      s_att = _block(s_inter['encoder'], term['student_block'], 'student')['attn']
      t_att = _block(t_out['encoder'], term['teacher_block'], 'teacher')['attn']
      t_qkv = [_drop_cls(t_att[n][0], t_cls, 2) for n in 'qkv']
      s_qkv = [_regroup_heads(_drop_cls(s_att[n][0], s_cls, 2), teacher.num_heads)
               for n in 'qkv']
      if method == 'mae':  # The student saw its kept tokens only (padding sliced off).
        keep = mask.ids_keep
        s_qkv = [x[:, :, :keep.shape[1]] for x in s_qkv]
        t_qkv = [jnp.take_along_axis(x, keep[:, None, :, None], axis=2) for x in t_qkv]
      return losses.tinymim_relation(s_qkv, t_qkv, term['temperature'])
    raise AssertionError(kind)

  def student_forward(params, images, mask, key):
    """(prediction, intermediates); the intermediates only when a term reads tokens."""
    rngs = {'dropout': key}
    if not needs_view:
      return student.apply({'params': params}, images, mask, train=True, rngs=rngs), {}
    pred, inter = student.apply({'params': params}, images, mask, train=True, rngs=rngs,
                                mutable=['intermediates'])
    return pred, inter['intermediates']

  def step(state, batch, key, teacher_params):
    key = jax.random.fold_in(key, state.step)
    mask_key, dropout_key = jax.random.split(key)
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = s_obj.draw_mask(mask_key, target.shape[0])
    t_out = teacher_targets(teacher_params, target, mask)

    def loss_fn(params):
      s_pred, s_inter = student_forward(params[STUDENT], target.astype(dtype), mask, dropout_key)
      values = {t['name']: term_value(t, params, s_pred, s_inter, target, mask, t_out)
                for t in terms}
      return sum(t['weight'] * values[t['name']] for t in terms), values

    (loss, values), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, tx)
    return new_state, {'loss': loss, **{f'loss_{k}': v for k, v in values.items()},
                       'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}

  def eval_step(state, batch, teacher_params):
    """Sums over valid rows of the student's and the teacher's reconstruction loss on the fixed
    eval masks (`loss` is comparable with a `jkd pretrain` run's eval loss)."""
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = s_obj.draw_mask(jax.random.key(EVAL_MASK_SEED), target.shape[0])
    s_pred = s_obj.forward(state.params[STUDENT], target.astype(dtype), mask, train=False)
    t_pred = to_student_space(
        t_obj.forward(teacher_params, target.astype(t_dtype), mask, train=False), target)
    valid = batch['mask'].astype(jnp.float32)
    count = jnp.sum(valid)
    weigh = lambda v: jnp.where(count > 0, v * count, 0.0)  # noqa: E731
    return {'loss': weigh(s_obj.loss(s_pred, target, mask, valid)),
            'teacher_loss': weigh(s_obj.loss(t_pred, target, mask, valid)),
            'student_teacher_loss': weigh(soft_loss(s_pred, t_pred, mask, valid)),
            'count': count}

  def eval_batches():
    return data.make_eval_iterator(config.data, config.data.eval_split,
                                   global_batch_size=config.get('eval_batch_size',
                                                                config.batch_size))

  def on_finish(state, eval_results: dict) -> dict:
    out = {'eval_loss': eval_results.get('loss'),
           'teacher_eval_loss': eval_results.get('teacher_loss'),
           'teacher': teacher_desc}
    if jax.process_index() != 0:
      return out
    images = first_eval_images(eval_batches(), int(config.get('num_figure_images', 8)))
    path = storage.join(workdir, 'reconstructions.png')
    title = (f'{method.upper() if method == "mae" else "SimMIM"} distillation: student '
             f'{config.model.name} vs teacher {teacher_desc["model"]}, step {int(state.step)}')
    write_comparison(path, s_obj, jax.device_get(state.params[STUDENT]), t_obj, teacher_np,
                     images, mean=mean, std=std, dtype=dtype,
                     t_dtype=t_dtype, title=title)
    return {**out, 'reconstructions': path}

  return loop.Task(
      kind='distill', init_state=init_state, train_step=step, eval_step=eval_step,
      train_iterator=data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                              seed=config.seed),
      eval_batches=eval_batches, global_batch_size=config.batch_size, total_steps=steps,
      meta={'model': config.model.name, 'method': method, 'dataset': config.data.name,
            'image_shape': list(shape), 'params_prefix': [STUDENT], 'teacher': teacher_desc,
            'mim': s_cfg.to_dict()},
      place_extra_args=place_teacher, on_finish=on_finish)


class Projectors(nn.Module):
  """Linear heads from student token widths to the teacher's (MaskDistill's head); one Dense per
  masked_feature term that needs one. Trained with the student, dropped after training."""
  widths: Mapping[str, int]  # term name -> teacher width

  @nn.compact
  def __call__(self, tokens: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {n: nn.Dense(self.widths[n], name=n)(x.astype(jnp.float32))
            for n, x in tokens.items() if n in self.widths}


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


def train(config, workdir: str) -> dict:
  """Runs MIM distillation: returns the summary (also in `workdir/summary.json`)."""
  return loop.run(build_task(config, workdir), config, workdir, label='distill')
