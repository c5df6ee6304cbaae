"""Distillation loss terms named in `config.losses`, and the feature taps they read.

A term is `{kind, weight, ...options}`; `config.losses` is a list of terms or a dict
`{name: term}` (the dict form can be overridden from the command line, e.g.
`--config.losses.kd.weight=0.5`). Terms read the student's and the teacher's logits or named
intermediate features ("taps": 'stage2', 'block3', 'pre_logits', or a full path such as
'encoder/block3/out'), so no model code changes to distill from a new layer.

A student with DeiT's distillation token (`ViT(distill_token=True)`) has two heads: 'ce' reads
its class head and every term against the teacher (kd, dkd, dist, kd_logit_std, deit_hard,
deit_soft) its distillation head, as in DeiT. Without the token those terms read the one head
(DeiT's "hard distillation without token" baseline).
"""
from __future__ import annotations

import types
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jkd import losses
from jkd.errors import UserError
from jkd.trainers import distill_heads

# A distillation run's params: {'student': the model that is kept, 'projectors': the trainable
# maps from student features to teacher widths, dropped after training} (meta `params_prefix`).
STUDENT = 'student'
PROJECTORS = 'projectors'

# kind -> (needs feature taps, default options). Options not listed here are rejected.
TERMS: dict[str, dict[str, Any]] = {
    'ce': {'label_smoothing': 0.0},
    'kd': {'temperature': 4.0},
    'dkd': {'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0, 'warmup_steps': 0},
    'dist': {'beta': 1.0, 'gamma': 1.0, 'temperature': 1.0},
    'kd_logit_std': {'temperature': 2.0},
    'deit_hard': {},
    'deit_soft': {'temperature': 1.0},
    'fitnet': {'student': 'stage2', 'teacher': 'stage2', 'projector': 'auto'},
    'at': {'student': ('stage1', 'stage2', 'stage3'), 'teacher': ('stage1', 'stage2', 'stage3'),
           'p': 2, 'mode': 'code'},
    'rkd': {'student': 'pre_logits', 'teacher': 'pre_logits', 'distance_weight': 25.0,
            'angle_weight': 50.0},
    'pkt': {'student': 'pre_logits', 'teacher': 'pre_logits'},
    'sp': {'student': 'pre_logits', 'teacher': 'pre_logits'},
    # Teacher-free KD (Tf-KD_reg, Yuan et al. 2020): a virtual teacher from the labels.
    'tf_kd': {'correct_prob': 0.99, 'temperature': 20.0},
    # With trainable heads (and CRD's memory banks): jkd.trainers.distill_heads.
    **distill_heads.TERMS,
}
_NONE: Mapping = types.MappingProxyType({})  # No feature taps (a logits-only trainer).
LOGIT_TERMS = ('ce', 'kd', 'dkd', 'dist', 'kd_logit_std', 'deit_hard', 'deit_soft', 'tf_kd')
# Terms that read no teacher: a run of only these needs none (teacher-free distillation).
TEACHER_FREE = ('ce', 'tf_kd')


def parse_terms(spec: Any, kinds: Mapping[str, Mapping[str, Any]] | None = None,
                example: str = "[dict(kind='ce', weight=0.1), dict(kind='kd', weight=0.9)]",
                what: str = '') -> list[dict]:
  """Normalises `config.losses` to a list of complete term dicts with `name`, `kind`, `weight`.

  Args:
    spec: a list of terms or a dict {name: term}; a term is {kind, weight, ...options}.
    kinds: kind -> default options (default `TERMS`); options not listed are rejected.
    example, what: for the error messages (e.g. what='MIM distillation ').
  """
  kinds = TERMS if kinds is None else kinds
  if isinstance(spec, ml_collections.ConfigDict):
    spec = spec.to_dict()
  items = list(spec.items()) if isinstance(spec, Mapping) else [
      (dict(t).get('kind', ''), t) for t in (spec or [])]
  if not items:
    raise UserError(f'config.losses is empty: name at least one term, e.g. {example}.')
  terms = []
  for name, term in items:
    term = dict(term)
    kind = term.pop('kind', name)
    if kind not in kinds:
      raise UserError(f'config.losses: unknown {what}kind {kind!r} (term {name!r}). Known '
                      f'kinds: {", ".join(kinds)}.')
    weight = float(term.pop('weight', 1.0))
    unknown = set(term) - set(kinds[kind])
    if unknown:
      raise UserError(f'config.losses term {name!r} ({kind}): unknown options {sorted(unknown)}; '
                      f'it takes {sorted(kinds[kind]) or "none"} besides weight.')
    terms.append({'name': name, 'kind': kind, 'weight': weight, **kinds[kind], **term})
  return terms


def needs_features(terms: list[dict]) -> bool:
  return any(t['kind'] not in LOGIT_TERMS for t in terms)


def needs_teacher(terms: list[dict]) -> bool:
  """Whether any term reads the teacher (else the run is teacher-free: 'ce', 'tf_kd')."""
  return any(t['kind'] not in TEACHER_FREE for t in terms)


ATTENTION_TAPS = ('attn', 'q', 'k', 'v')  # What `vit.Attention` sows on its explicit path.


def reads_attention(terms: list[dict]) -> bool:
  """Whether any term taps an attention map or q/k/v ('encoder/block3/attn/attn', 'attn')
  rather than block or stage outputs: only those need a ViT's explicit attention path."""
  for term in terms:
    for who in ('student', 'teacher'):
      taps = term.get(who) or ()
      for tap in (taps,) if isinstance(taps, str) else taps:
        if str(tap).split('/')[-1] in ATTENTION_TAPS:
          return True
  return False


def find_tap(intermediates: Mapping, name: str, who: str) -> jax.Array:
  """Finds a sown feature by name: an exact path ('encoder/block3/out'), a last component
  ('stage2', 'pre_logits'), or a ViT block ('block3' -> its output)."""
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(
              intermediates, is_leaf=lambda x: isinstance(x, tuple))[0]}
  flat = {k: (v[0] if isinstance(v, tuple) else v) for k, v in flat.items()}
  for candidate in (name, f'encoder/{name}/out'):
    if candidate in flat:
      return flat[candidate]
  ends = [k for k in flat if k.endswith('/' + name) or k == name]
  if len(ends) == 1:
    return flat[ends[0]]
  raise UserError(f'The {who} has no feature {name!r}. Its taps are: '
                  f'{", ".join(sorted(flat)[:40])}.')


def term_values(terms: list[dict], **inputs) -> dict[str, jax.Array]:
  """term name -> `term_value(term, **inputs)`, for every term."""
  return {t['name']: term_value(t, **inputs) for t in terms}


def total(terms: list[dict], values: Mapping[str, jax.Array]) -> jax.Array:
  """The loss: sum over terms of weight × value (`values` keyed by term name)."""
  return sum(t['weight'] * values[t['name']] for t in terms)


class Projectors(nn.Module):
  """Trainable maps from student features to teacher widths, dropped after training: FitNet's
  regressors (a Dense on the channels is a 1×1 conv of an NHWC map) and MaskDistill's token
  heads. One Dense per term that needs one, computed in fp32."""
  widths: Mapping[str, int]  # term name -> teacher feature width

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: nn.Dense(self.widths[name], name=name)(x.astype(jnp.float32))
            for name, x in features.items() if name in self.widths}


def _pool_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Average-pools an NHWC map down to `hw` (integer factors), e.g. a stride mismatch."""
  fh, fw = x.shape[1] // hw[0], x.shape[2] // hw[1]
  if (fh, fw) == (1, 1):
    return x
  return nn.avg_pool(x, (fh, fw), strides=(fh, fw))


def _embedding(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B, D): tokens and maps are mean-pooled, vectors kept."""
  return x if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)


def term_value(term: dict, *, s_logits, t_logits, labels, targets, step, s_feats=_NONE,
               t_feats=_NONE, projected=_NONE, s_dist_logits=None) -> jax.Array:
  """The (unweighted) value of one term. Teacher inputs are constants inside `jkd.losses`.

  `s_logits` (B, C) are the student's (class-head) logits, `s_dist_logits` (B, C) its
  distillation head's or None; `labels` are the hard labels (B,), `targets` the (possibly
  mixed) one-hot targets (B, C), or None where a trainer has only hard labels (then 'ce' is
  the integer-label cross-entropy, `jkd compress`'s).
  """
  kind = term['kind']
  if kind == 'ce' and targets is None and not term['label_smoothing']:
    return optax.softmax_cross_entropy_with_integer_labels(s_logits, labels).mean()
  if kind == 'ce':
    if targets is None:
      targets = jax.nn.one_hot(labels, s_logits.shape[-1])
    return optax.softmax_cross_entropy(
        s_logits, optax.smooth_labels(targets, term['label_smoothing'])).mean()
  # Terms against the teacher's logits read the distillation head where there is one (DeiT).
  s_dist = s_logits if s_dist_logits is None else s_dist_logits
  if kind == 'kd':
    return losses.kd(s_dist, t_logits, term['temperature'])
  if kind == 'dkd':
    value = losses.dkd(s_dist, t_logits, labels, term['alpha'], term['beta'],
                       term['temperature'])
    if term['warmup_steps']:  # mdistiller: min(epoch / warmup, 1) ramps the DKD weight.
      value = value * jnp.minimum(step.astype(jnp.float32) / term['warmup_steps'], 1.0)
    return value
  if kind == 'dist':
    return losses.dist(s_dist, t_logits, term['beta'], term['gamma'], term['temperature'])
  if kind == 'kd_logit_std':
    return losses.kd_logit_std(s_dist, t_logits, term['temperature'])
  if kind == 'deit_hard':
    return losses.deit_hard(s_dist, t_logits)
  if kind == 'deit_soft':
    return losses.deit_soft(s_dist, t_logits, term['temperature'])
  if kind == 'tf_kd':
    return losses.tf_kd_reg(s_logits, labels, term['correct_prob'], term['temperature'])
  if kind == 'fitnet':
    s, t = projected.get(term['name'], s_feats[term['name']]), t_feats[term['name']]
    if s.ndim == 4 and s.shape[1:3] != t.shape[1:3]:
      s = _pool_to(s, t.shape[1:3])
    return losses.fitnet(s, t)
  if kind == 'at':
    return losses.attention_transfer(s_feats[term['name']], t_feats[term['name']],
                                     p=term['p'], mode=term['mode'])
  s, t = _embedding(s_feats[term['name']]), _embedding(t_feats[term['name']])
  if kind == 'rkd':
    return losses.rkd(s, t, term['distance_weight'], term['angle_weight'])
  if kind == 'pkt':
    return losses.pkt(s, t)
  if kind == 'sp':
    return losses.similarity_preserving(s, t)
  raise AssertionError(kind)


def gather_taps(terms: list[dict], inter: Mapping, who: str) -> dict[str, Any]:
  """term name -> the feature (or list of features, for AT and for a tuple of taps) the term
  reads from one model; terms that read nothing from it are left out."""
  out = {}
  for term in terms:
    if term['kind'] in LOGIT_TERMS or who not in term:
      continue
    names = term[who]
    if term['kind'] == 'at' or isinstance(names, (tuple, list)):
      names = (names,) if isinstance(names, str) else tuple(names)
      out[term['name']] = [find_tap(inter, n, who) for n in names]
    else:
      out[term['name']] = find_tap(inter, names, who)
  return out


def projector_widths(terms: list[dict], s_feats: Mapping, t_feats: Mapping) -> dict[str, int]:
  """Which FitNet terms need a projector (widths differ, or projector='always')."""
  widths = {}
  for term in terms:
    if term['kind'] != 'fitnet':
      continue
    s_width, t_width = s_feats[term['name']].shape[-1], t_feats[term['name']].shape[-1]
    mode = term['projector']
    if mode in ('none', None, '') and s_width != t_width:
      raise UserError(f"config.losses term {term['name']!r}: student width {s_width} != "
                      f"teacher width {t_width}; set projector='auto'.")
    if mode == 'always' or (mode not in ('none', None, '') and s_width != t_width):
      widths[term['name']] = t_width
  return widths

