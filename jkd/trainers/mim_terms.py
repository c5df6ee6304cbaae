"""MIM-distillation loss terms named in `config.losses`, and the object that evaluates them.

A term is `{kind, weight, ...options}` as in `jkd.trainers.distill_terms` (a dict `{name: term}`
or a list). The kinds:

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

Class tokens (MAE's `cls_token`) are left out of feature and relation targets.
`MimDistillation` owns both models' objectives (masks, forward passes, losses), the teacher's
encoder view and the projectors, as `jkd.mim.MimObjective` does for one model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jkd import losses, masking
from jkd.errors import UserError
from jkd.mim import MimObjective
from jkd.models.vit import ViT
from jkd.teacher import Teacher
from jkd.trainers import common
from jkd.trainers import distill_terms as T
from jkd.trainers.distill_terms import PROJECTORS, STUDENT

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


def parse_terms(spec: Any) -> list[dict]:
  """`config.losses` -> a list of complete terms `{name, kind, weight, ...options}`."""
  terms = T.parse_terms(
      spec, TERMS, example="{'pixel': dict(weight=1.0), 'teacher_pixel': dict(weight=1.0)}",
      what='MIM distillation ')
  for term in terms:
    name = term['name']
    for option, allowed in _CHOICES.items():
      if option in term and term[option] not in allowed:
        raise UserError(f'config.losses term {name!r}: {option}={term[option]!r}; use one of '
                        f'{", ".join(allowed)}.')
  return terms


def encoder_view(mim: nn.Module) -> ViT:
  """A head-less ViT that runs a MIM model's encoder on whole images with the same params
  (the names match: 'patch_embed', 'pos_embedding', 'cls', 'encoder'); no decoder is run."""
  return ViT(num_classes=0, patch_size=mim.patch_size, width=mim.width, depth=mim.depth,
             num_heads=mim.num_heads, mlp_dim=mim.mlp_dim, dtype=mim.dtype,
             attention=mim.attention, posemb=getattr(mim, 'posemb', 'sincos2d'),
             pool='token' if getattr(mim, 'cls_token', False) else 'gap')


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


@dataclasses.dataclass(frozen=True)
class MimDistillation:
  """A masked student, its SimMIM / MAE teacher and the terms between them.

  Attributes:
    student, teacher: the objectives (mask, forward, loss) of both models; one method.
    teacher_view: the teacher's encoder as a ViT on whole images (feature and relation terms).
    terms: `config.losses` parsed (`parse_terms`).
    widths: masked_feature term name -> (student token width, teacher width), where a
      projector maps one to the other.
    dtype, teacher_dtype: compute dtypes the images are cast to.
  """
  student: MimObjective
  teacher: MimObjective
  teacher_view: ViT
  terms: list[dict]
  widths: dict[str, tuple[int, int]]
  dtype: Any
  teacher_dtype: Any

  @classmethod
  def from_config(cls, config, shape, teacher: Teacher) -> 'MimDistillation':
    """The student of `config.model` (the teacher's method and patch size), its mask settings
    (the teacher's unless `config.mask_ratio` / `mask_patch_size` say otherwise) and terms."""
    t_obj, t_mim = teacher.objective, teacher.module
    method = t_obj.method
    s_mim = common.create_mim_model(method, config.model, shape[2], either_method=True)
    if s_mim.patch_size != t_mim.patch_size:
      raise UserError(f'The student patch size {s_mim.patch_size} differs from the teacher '
                      f"{teacher.description['model']!r}'s {t_mim.patch_size}: masks, pixel "
                      'targets and tokens must line up; pick a student ViT with the same patch '
                      'size.')
    s_obj = MimObjective(s_mim, ml_collections.ConfigDict({
        'method': method, 'mask_ratio': float(config.mask_ratio or t_obj.settings['mask_ratio']),
        'mask_patch_size': int(config.mask_patch_size or t_obj.settings['mask_patch_size'] or 0),
        'norm_pix_loss': bool(config.norm_pix_loss)}), shape[0])
    terms = parse_terms(config.losses)
    view = encoder_view(t_mim)
    if 'tinymim_relation' not in {t['kind'] for t in terms}:
      view = common.without_attention_maps(view)  # Block outputs only: the fused kernel.
    widths = {}
    for t in terms:
      if t['kind'] == 'tinymim_relation' and s_mim.width % t_mim.num_heads:
        raise UserError(f"config.losses term {t['name']!r}: the student width {s_mim.width} "
                        f"cannot be split into the teacher's {t_mim.num_heads} heads.")
      if t['kind'] != 'masked_feature':
        continue
      s_width = (s_mim.decoder_width if method == 'mae' and t['tokens'] == 'masked'
                 else s_mim.width)
      if t['projector'] == 'none' and s_width != t_mim.width:
        raise UserError(f"config.losses term {t['name']!r}: student width {s_width} != teacher "
                        f"width {t_mim.width}; set projector='auto'.")
      if t['projector'] == 'always' or (t['projector'] == 'auto' and s_width != t_mim.width):
        widths[t['name']] = (s_width, t_mim.width)
    return cls(s_obj, t_obj, view, terms, widths,
               common.compute_dtype(config.model.get('dtype', 'float32')), t_mim.dtype)

  @property
  def method(self) -> str:
    return self.student.method

  @property
  def projectors(self) -> T.Projectors:
    return T.Projectors({n: w[1] for n, w in self.widths.items()})

  @property
  def kinds(self) -> set[str]:
    return {t['kind'] for t in self.terms}

  @property
  def needs_tokens(self) -> bool:
    """Whether a term reads tokens (the teacher's encoder view, the student's intermediates)."""
    return bool(self.kinds & {'masked_feature', 'tinymim_relation'})

  def init_state(self, tx, shape, key):
    """params = {'student': the SimMIM / MAE student's params, 'projectors': ...}."""
    s_key, p_key, m_key = jax.random.split(key, 3)
    s_params = self.student.model.init(
        {'params': s_key}, jnp.zeros((1, *shape), jnp.float32),
        self.student.draw_mask(m_key, 1), train=False)['params']
    feats = {n: jnp.zeros((1, 1, w[0]), jnp.float32) for n, w in self.widths.items()}
    params = {STUDENT: s_params, PROJECTORS: self.projectors.init(p_key, feats).get('params', {})}
    return common.new_state(params, {}, tx)

  def to_student_space(self, t_pred, target):
    """An MAE teacher's patches in the student's target space (norm_pix or raw pixels)."""
    if self.method != 'mae' or self.teacher.norm_pix == self.student.norm_pix:
      return t_pred
    t = masking.patchify(target, self.student.patch)
    mu, sd = t.mean(-1, keepdims=True), jnp.sqrt(t.var(-1, keepdims=True, ddof=1) + 1e-6)
    return t_pred * sd + mu if self.teacher.norm_pix else (t_pred - mu) / sd

  def soft_loss(self, s_pred, t_pred, mask, row_weight=None):
    """The method's loss with the teacher's prediction (already in target space) as target."""
    if self.method == 'simmim':
      return self.student.loss(s_pred, t_pred, mask, row_weight)
    m = mask.mask if row_weight is None else mask.mask * row_weight[:, None]
    return losses.mae_mse(s_pred, t_pred, m, norm_pix=False)

  def teacher_prediction(self, t_params, target, mask):
    """The teacher's reconstruction under `mask`, in the student's target space."""
    t_pred = self.teacher.forward(t_params, target.astype(self.teacher_dtype), mask, train=False)
    return self.to_student_space(t_pred, target)

  def teacher_targets(self, t_params, target, mask) -> dict:
    """Everything the terms need from the teacher, without gradients."""
    out = {}
    if 'teacher_pixel' in self.kinds:
      out['pixel'] = self.teacher_prediction(t_params, target, mask)
    if self.needs_tokens:
      _, inter = self.teacher_view.apply({'params': t_params}, target.astype(self.teacher_dtype),
                                         train=False, mutable=['intermediates'])
      out['encoder'] = inter['intermediates']['encoder']
    return jax.lax.stop_gradient(out)

  def student_forward(self, params, images, mask, key):
    """(prediction, intermediates); the intermediates only when a term reads tokens."""
    rngs = {'dropout': key}
    if not self.needs_tokens:
      return self.student.model.apply({'params': params}, images, mask, train=True,
                                      rngs=rngs), {}
    pred, inter = self.student.model.apply({'params': params}, images, mask, train=True,
                                           rngs=rngs, mutable=['intermediates'])
    return pred, inter['intermediates']

  def loss(self, params, target, mask, t_out, key):
    """The weighted sum of the terms, and each term's value."""
    s_pred, s_inter = self.student_forward(params[STUDENT], target.astype(self.dtype), mask, key)
    values = {t['name']: self.term_value(t, params, s_pred, s_inter, target, mask, t_out)
              for t in self.terms}
    return T.total(self.terms, values), values

  def term_value(self, term, params, s_pred, s_inter, target, mask, t_out):
    """The (unweighted) value of one term."""
    kind = term['kind']
    if kind == 'pixel':
      return self.student.loss(s_pred, target, mask)
    if kind == 'teacher_pixel':
      return self.soft_loss(s_pred, t_out['pixel'], mask)
    if kind == 'masked_feature':
      return self._masked_feature(term, params, s_inter, mask, t_out)
    if kind == 'tinymim_relation':
      return self._relation(term, s_inter, mask, t_out)
    raise AssertionError(kind)

  def _masked_feature(self, term, params, s_inter, mask, t_out):
    s_cls = getattr(self.student.model, 'cls_token', False)
    t_tok = _drop_cls(_block(t_out['encoder'], term['teacher_block'], 'teacher')['out'][0],
                      getattr(self.teacher.model, 'cls_token', False), 1)
    if self.method == 'mae' and term['tokens'] == 'masked':  # The decoder holds masked tokens.
      s_tok = _drop_cls(_block(s_inter['decoder']['blocks'], -1, 'student')['out'][0], s_cls, 1)
      s_tok, token_mask = s_tok[:, :t_tok.shape[1]], mask.mask
    elif self.method == 'mae':                               # DMAE: the visible tokens.
      s_tok = _drop_cls(_block(s_inter['encoder'], -1, 'student')['out'][0], s_cls, 1)
      keep = mask.ids_keep.shape[1]
      s_tok, t_tok = s_tok[:, :keep], masking.gather_tokens(t_tok, mask.ids_keep)
      token_mask = jnp.ones(s_tok.shape[:2], jnp.float32)
    else:
      s_tok = _block(s_inter['encoder'], -1, 'student')['out'][0]
      m = self.student.patch_mask(mask)
      token_mask = m if term['tokens'] == 'masked' else 1 - m
    if term['name'] in self.widths:
      s_tok = self.projectors.apply({'params': params[PROJECTORS]}, {term['name']: s_tok})[
          term['name']]
    return losses.masked_feature_distill(s_tok, t_tok, token_mask, kind=term['distance'],
                                         normalize_target=term['normalize_target'])

  def _relation(self, term, s_inter, mask, t_out):
    heads = self.teacher.model.num_heads
    s_cls = getattr(self.student.model, 'cls_token', False)
    t_cls = getattr(self.teacher.model, 'cls_token', False)
    s_att = _block(s_inter['encoder'], term['student_block'], 'student')['attn']
    t_att = _block(t_out['encoder'], term['teacher_block'], 'teacher')['attn']
    t_qkv = [_drop_cls(t_att[n][0], t_cls, 2) for n in 'qkv']
    s_qkv = [_regroup_heads(_drop_cls(s_att[n][0], s_cls, 2), heads) for n in 'qkv']
    if self.method == 'mae':  # The student saw its kept tokens only (padding sliced off).
      keep = mask.ids_keep
      s_qkv = [x[:, :, :keep.shape[1]] for x in s_qkv]
      t_qkv = [jnp.take_along_axis(x, keep[:, None, :, None], axis=2) for x in t_qkv]
    return losses.tinymim_relation(s_qkv, t_qkv, term['temperature'])
