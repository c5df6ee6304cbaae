"""Loss terms with trainable heads and state: CRD, ReviewKD and OFA-KD (`config.losses` kinds
'crd', 'reviewkd', 'ofa').

A projector (FitNet's) maps one student feature to the teacher's width; these terms need more:

  crd       two embedding heads (Linear + L2 norm) on the student's and the teacher's features
            and two momentum memory banks of N x feat_dim (N training examples), whose rows are
            the negatives of an NCE loss (Tian et al. 2020; RepDistiller `crd/`).
  reviewkd  attention-based fusion (ABF) of the student's features from the deepest up, each
            fused map compared with the teacher's map of that level by the HCL loss (Chen et
            al. 2021; mdistiller `ReviewKD.py`).
  ofa       a branch per student stage, down to the teacher's classes, each trained with OFA's
            loss against the teacher's logits (Hao et al. 2023; OFAKD `distillers/ofa.py`): a
            ViT teacher teaches a CNN student (and the other way round) in logit space.

The heads are one Flax module (`Heads`) whose parameters sit in `params['heads']` beside
`params['student']` and are optimised with it, then dropped (the checkpoint's `params_prefix`
is the student's). CRD's banks and normalisation constants are state: `model_state['distill']`
(`jkd.checkpoint.RUN_STATE_KEYS`), checkpointed and resumed with the run, updated by the step
after the gradient (no gradient flows into them). CRD needs each example's index in the
training set, which the train iterator then adds to every batch (`index`).

Maps are NHWC; a (B, C) feature is a 1x1 map and ViT tokens (B, L, D) become their grid (the
class token dropped) wherever a term needs maps.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd import losses
from jkd.errors import UserError

HEAD_KINDS = ('crd', 'reviewkd', 'ofa')
HEADS = 'heads'          # params[HEADS]: the heads' parameters
STATE = 'distill'        # model_state[STATE]: the terms' state (jkd.checkpoint.RUN_STATE_KEYS)

# Default options of each kind (merged into distill_terms.TERMS).
TERMS: dict[str, dict[str, Any]] = {
    # RepDistiller's defaults: 128-d embeddings, 16384 negatives, T 0.07, momentum 0.5.
    'crd': {'student': 'pre_logits', 'teacher': 'pre_logits', 'feat_dim': 128,
            'nce_k': 16384, 'temperature': 0.07, 'momentum': 0.5},
    # mdistiller: the student's stage outputs and pooled feature against the teacher's
    # (pre-activation maps where a model has them: stage1_preact, ...); 20-epoch warmup.
    'reviewkd': {'student': ('stage1', 'stage2', 'stage3', 'pre_logits'),
                 'teacher': ('stage1', 'stage2', 'stage3', 'pre_logits'),
                 'max_mid_channel': 512, 'warmup_steps': 0},
    # OFAKD's defaults: every stage, eps 1 (CIFAR), T 1, and the loss on the logits too. The
    # teacher's tap only sizes the branches (max of its and the student's last width).
    'ofa': {'student': ('stage1', 'stage2', 'stage3'), 'teacher': 'pre_logits', 'eps': 1.0,
            'temperature': 1.0, 'logits': True},
}

_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')  # kaiming, fan_out
# ReviewKD's kaiming_uniform_(a=1) of the ABF convs, and torch's default conv init.
_ABF_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
_TORCH_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def map_shape(shape) -> tuple[int, int, int, int]:
  """The NHWC shape `as_map` gives a feature of this shape."""
  if len(shape) == 4:
    return tuple(shape)
  if len(shape) == 2:
    return (shape[0], 1, 1, shape[1])
  b, length, d = shape
  side = math.isqrt(length - _leading_tokens(length))
  return (b, side, side, d)


def _leading_tokens(length: int) -> int:
  for extra in (0, 1, 2):
    side = math.isqrt(length - extra)
    if side * side == length - extra:
      return extra
  raise UserError(f'A token feature of {length} tokens is not a square grid: tap a feature map.')


def as_map(x: jax.Array) -> jax.Array:
  """A feature as an NHWC map: (B, C) -> (B, 1, 1, C); ViT tokens (B, L, D) -> their square
  grid (a leading class / distillation token dropped); maps unchanged."""
  if x.ndim == 3:
    x = x[:, _leading_tokens(x.shape[1]):]
  return x.reshape(map_shape(x.shape))


def _nearest(x: jax.Array, size: int) -> jax.Array:
  """torch `F.interpolate(x, (size, size), mode='nearest')` of an NHWC map."""
  h, w = x.shape[1:3]
  rows = (jnp.arange(size) * h) // size
  cols = (jnp.arange(size) * w) // size
  return x[:, rows][:, :, cols]


class _TrainBN(nn.Module):
  """BatchNorm in training mode (batch statistics, torch eps): the heads run only in training,
  so running averages would never be read."""
  @nn.compact
  def __call__(self, x):
    mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(x, axis=(0, 1, 2), keepdims=True)
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _conv(features, kernel, stride=1, groups=1, bias=False, name=None, init=_CONV_INIT):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=bias, kernel_init=init, name=name)


class ABF(nn.Module):
  """ReviewKD's attention-based fusion of one level: 1x1 conv + BN to `mid` channels, fused with
  the deeper level's `residual` (nearest-upsampled) through two sigmoid attention maps, resized
  to the teacher's size, then 3x3 conv + BN to the teacher's channels. Returns (out, residual)."""
  mid: int
  out: int
  fuse: bool

  @nn.compact
  def __call__(self, x, residual, out_size: int):
    x = _TrainBN(name='bn1')(_conv(self.mid, 1, name='conv1', init=_ABF_INIT)(x))
    if self.fuse:
      residual = _nearest(residual, x.shape[1])
      att = nn.sigmoid(_conv(2, 1, bias=True, name='att_conv', init=_TORCH_INIT)(
          jnp.concatenate([x, residual], -1)))
      x = x * att[..., 0:1] + residual * att[..., 1:2]
    if x.shape[1] != out_size:
      x = _nearest(x, out_size)
    return _TrainBN(name='bn2')(_conv(self.out, 3, name='conv2', init=_ABF_INIT)(x)), x


class _SepConv(nn.Module):
  """OFA's depthwise-separable block, stride 2: dw3x3/2, 1x1, BN, ReLU, dw3x3, 1x1, BN, ReLU."""
  out: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = _conv(c, 3, 2, groups=c, name='dw1')(x)
    x = nn.relu(_TrainBN(name='bn1')(_conv(c, 1, name='pw1')(x)))
    x = _conv(c, 3, 1, groups=c, name='dw2')(x)
    return nn.relu(_TrainBN(name='bn2')(_conv(self.out, 1, name='pw2')(x)))


class OFABranch(nn.Module):
  """OFA's projector of a CNN stage: `blocks` stride-2 separable blocks (doubling the channels,
  the last to `width`), or one 1x1 conv when `blocks` is 0; global average pool; a linear
  layer to the classes (trunc-normal std 0.02, as OFA's `init_weights`)."""
  blocks: int
  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if not self.blocks:
      x = _conv(self.width, 1, bias=True, name='conv')(x)
    for i in range(self.blocks):
      c = self.width if i == self.blocks - 1 else 2 * c
      x = _SepConv(c, name=f'sep{i}')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.02),
                    name='fc')(x)


class Heads(nn.Module):
  """Every head of a run, by (expanded) term name; computed in fp32.

  Attributes:
    specs: term name -> {'kind', ...shapes} (`head_specs`).
  """
  specs: Mapping[str, Mapping[str, Any]]

  @nn.compact
  def __call__(self, s_feats: Mapping, t_feats: Mapping) -> dict[str, Any]:
    """Returns term name -> crd: (student embedding, teacher embedding) (B, feat_dim);
    reviewkd: the fused maps, shallowest first; ofa: each stage branch's logits."""
    out = {}
    for name, spec in self.specs.items():
      if spec['kind'] == 'crd':
        out[name] = tuple(_embed(spec['feat_dim'], f'{name}_{who}', feats[name])
                          for who, feats in (('student', s_feats), ('teacher', t_feats)))
      elif spec['kind'] == 'reviewkd':
        out[name] = self._review(name, spec, [as_map(f.astype(jnp.float32))
                                              for f in s_feats[name]])
      else:
        out[name] = [OFABranch(b, spec['width'], spec['num_classes'], name=f'{name}_{i}')(
            as_map(f.astype(jnp.float32))) for i, (f, b) in enumerate(zip(s_feats[name],
                                                                         spec['blocks']))]
    return out

  def _review(self, name, spec, feats):
    results, residual = [], None
    for level in reversed(range(len(feats))):  # the deepest (the pooled feature) first
      fused, residual = ABF(spec['mid'], spec['out_channels'][level],
                            level < len(feats) - 1, name=f'{name}_abf{level}')(
                                feats[level], residual, spec['out_sizes'][level])
      results.insert(0, fused)
    return results


def _embed(dim: int, name: str, x: jax.Array) -> jax.Array:
  """CRD's `Embed`: flatten, Linear, L2-normalise (no epsilon, as the reference)."""
  x = nn.Dense(dim, name=name)(x.reshape(x.shape[0], -1).astype(jnp.float32))
  return x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


def head_specs(terms: list[dict], s_feats: Mapping, t_feats: Mapping,
               num_classes: int) -> dict[str, dict]:
  """The heads the terms need, sized from both models' abstract features (term name ->
  spec); {} when no term has a head."""
  specs = {}
  for term in terms:
    name, kind = term['name'], term['kind']
    if kind == 'crd':
      specs[name] = {'kind': kind, 'feat_dim': int(term['feat_dim'])}
    elif kind == 'reviewkd':
      s = [map_shape(f.shape) for f in s_feats[name]]
      t = [map_shape(f.shape) for f in t_feats[name]]
      if len(s) != len(t):
        raise UserError(f'config.losses term {name!r} (reviewkd): {len(s)} student taps and '
                        f'{len(t)} teacher taps; give one teacher tap per student tap.')
      specs[name] = {'kind': kind, 'out_channels': tuple(x[-1] for x in t),
                     'out_sizes': tuple(x[1] for x in t),
                     'mid': min(int(term['max_mid_channel']), s[-1][-1])}
    elif kind == 'ofa':
      s = [map_shape(f.shape) for f in s_feats[name]]
      smallest = min(x[1] for x in s)
      width = max(max(x[-1] for x in s), t_feats[name].shape[-1])
      specs[name] = {'kind': kind, 'num_classes': num_classes, 'width': int(width),
                     'blocks': tuple(round(math.log2(x[1] / smallest)) for x in s)}
  return specs


def init_state(terms: list[dict], key: jax.Array, num_data: int) -> dict:
  """CRD's memory banks (uniform in +-1/sqrt(feat_dim / 3), as RepDistiller) and unset
  normalisation constants (-1), per CRD term; {} without one."""
  state = {}
  for i, term in enumerate(t for t in terms if t['kind'] == 'crd'):
    dim = int(term['feat_dim'])
    stdv = 1.0 / math.sqrt(dim / 3)
    k_s, k_t = jax.random.split(jax.random.fold_in(key, i))
    state[term['name']] = {
        'student_bank': jax.random.uniform(k_s, (num_data, dim), jnp.float32, -stdv, stdv),
        'teacher_bank': jax.random.uniform(k_t, (num_data, dim), jnp.float32, -stdv, stdv),
        'z': -jnp.ones((2,), jnp.float32)}
  return state


def term_value(term: dict, heads: Mapping, *, state: Mapping, index, key, labels, s_logits,
               t_logits, t_feats, step, num_data: int):
  """(value, new state of the term or None) of a head term (see the module docstring)."""
  kind, name = term['kind'], term['name']
  if kind == 'crd':
    return _crd(term, heads[name], state[name], index, key, num_data)
  if kind == 'reviewkd':
    value = losses.hcl(heads[name], [as_map(f) for f in t_feats[name]])
    if term['warmup_steps']:  # mdistiller: min(epoch / warmup, 1) ramps the loss in.
      value = value * jnp.minimum(step.astype(jnp.float32) / term['warmup_steps'], 1.0)
    return value, None
  value = sum(losses.ofa(logits, t_logits, labels, term['eps'], term['temperature'])
              for logits in heads[name])
  if term['logits']:
    value = value + losses.ofa(s_logits, t_logits, labels, term['eps'], term['temperature'])
  return value, None


def _crd(term, embeddings, state, index, key, num_data):
  if index is None:
    raise UserError('The crd term needs the dataset index of each example; the train iterator '
                    'adds it when a crd term is configured (this batch has none).')
  emb_s, emb_t = embeddings
  k, temperature = int(term['nce_k']), term['temperature']
  # Negatives drawn uniformly from the whole set, the positive (the example itself) first:
  # ContrastMemory's own sampler (RepDistiller's loader 'exact' mode draws other classes only).
  negatives = jax.random.randint(key, (index.shape[0], k), 0, num_data)
  idx = jnp.concatenate([index[:, None].astype(negatives.dtype), negatives], 1)
  z_now = jnp.stack([
      losses.crd_normalizer(losses.crd_scores(emb_s, state['teacher_bank'], idx, temperature),
                            num_data),
      losses.crd_normalizer(losses.crd_scores(emb_t, state['student_bank'], idx, temperature),
                            num_data)])
  z = jnp.where(state['z'] < 0, z_now, state['z'])  # set once, at the first step
  value = losses.crd(emb_s, emb_t, state['student_bank'], state['teacher_bank'], idx, z[0],
                     z[1], num_data, temperature)
  new = {'student_bank': losses.crd_memory_update(state['student_bank'], index, emb_s,
                                                  term['momentum']),
         'teacher_bank': losses.crd_memory_update(state['teacher_bank'], index, emb_t,
                                                  term['momentum']),
         'z': z}
  return value, new
