"""Structured (channel / filter) pruning that physically removes channels.

  tx = channel_pruning(optax.adamw(1e-3), params, ratio=0.5, criterion='bn',
                       begin_step=0, end_step=1000)
  ...train (with KD)...
  model_cfg, variables = shrink(model_cfg, variables)   # the narrower dense model

A *channel group* is a set of layer outputs that must keep the same channels (a ResNet stage's
residual stream: the stem or projection, every block's last conv; a block's inner conv; a ViT
block's MLP hidden units; a ViT block's attention heads), with the inputs that read them (the next
convs, the head, fc2, the attention's output projection). Every group keeps the same fraction:
the ResNet becomes the same architecture at `width * (1 - ratio)` (Li et al. 2017, "Pruning
Filters for Efficient ConvNets", per-layer uniform ratios), the ViT gets `mlp_dim * (1 - ratio)`
hidden units and `num_heads * (1 - ratio)` heads of unchanged size `head_dim` (head pruning,
Michel et al. 2019, "Are Sixteen Heads Really Better than One?"). The ViT's token width stays:
its LayerNorms average over every channel, so removing one would change every output.

Ranking (per group, summed over its layers): 'bn' = |gamma| of the BatchNorm scales (Liu et al.
2017, "Network Slimming"); 'l1' = the L1 norm of each output filter (Li et al. 2017): a ViT's
fc1 column, or a head's value projection (a ViT has no BatchNorm: 'bn' ranks it by 'l1').
Gradual: the number of channels removed from each group follows Zhu & Gupta's cubic schedule
(`pruning.cubic_sparsity`) between `begin_step` and `end_step`, re-ranked every `update_every`
steps. A removed channel's BatchNorm scale and bias (ResNet) or fc1 column and bias (ViT) are
held at exactly 0, so the channel's output is exactly 0 after the ReLU / GELU and everything
reading it sees zeros: removing it (`shrink`) changes no output. A removed head's value kernel
and bias are held at 0: its attention output is 0 whatever its query and key, and the output
projection reads zeros; its scale 1/sqrt(head_dim) is the kept heads' too.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd.compress.pruning import cubic_sparsity, masked_optimizer, path_name
from jkd.errors import UserError

CRITERIA = ('bn', 'l1')


@dataclasses.dataclass(frozen=True)
class Group:
  """Channels that are kept or removed together.

  Attributes:
    name: e.g. 'stream2' or 'stage1_block0/inner1'.
    size: channels in the group.
    outputs: (path, axis) of every params / batch_stats array whose `axis` indexes the channels
      produced (conv kernels axis 3, BatchNorm vectors axis 0, fc1 kernel axis 1...).
    inputs: (path, axis) of every array that reads them (next conv kernels axis 2, head rows).
    masked: paths of the params held at 0 for a removed channel (BN scale/bias, fc1 kernel/bias).
    scored: paths whose values rank the channels (BN scales for 'bn', kernels for 'l1').
  """
  name: str
  size: int
  outputs: tuple
  inputs: tuple
  masked: tuple
  bn_scores: tuple
  l1_scores: tuple


def _flat(tree) -> dict[str, Any]:
  return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def resnet_groups(params) -> list[Group]:
  """The channel groups of a jkd `ResNet` params tree (basic or bottleneck blocks)."""
  flat = _flat(params)
  blocks = sorted({k.split('/')[0] for k in flat if k.startswith('stage')},
                  key=lambda b: tuple(int(t) for t in b.replace('stage', '').split('_block')))
  groups = []
  bn = lambda name: (f'{name}/scale', f'{name}/bias')  # noqa: E731

  def outs(conv, norm):
    return ((f'{conv}/kernel', 3), (f'{norm}/scale', 0), (f'{norm}/bias', 0),
            (f'batch_stats:{norm}/mean', 0), (f'batch_stats:{norm}/var', 0))

  stream = {'name': 'stream0', 'outputs': list(outs('stem_conv', 'stem_bn')), 'inputs': [],
            'masked': list(bn('stem_bn')), 'bn': ['stem_bn/scale'], 'l1': ['stem_conv/kernel']}
  n_stream = 0
  for b in blocks:
    last = 3 if f'{b}/conv3/kernel' in flat else 2
    if f'{b}/proj_conv/kernel' in flat:  # A new residual stream starts here.
      stream['inputs'] += [(f'{b}/conv1/kernel', 2), (f'{b}/proj_conv/kernel', 2)]
      groups.append(stream)
      n_stream += 1
      stream = {'name': f'stream{n_stream}', 'outputs': list(outs(f'{b}/proj_conv', f'{b}/proj_bn')),
                'inputs': [], 'masked': list(bn(f'{b}/proj_bn')), 'bn': [f'{b}/proj_bn/scale'],
                'l1': [f'{b}/proj_conv/kernel']}
    else:
      stream['inputs'].append((f'{b}/conv1/kernel', 2))
    for i in range(1, last):  # The block's inner convs: each its own group.
      groups.append({'name': f'{b}/inner{i}', 'outputs': list(outs(f'{b}/conv{i}', f'{b}/bn{i}')),
                     'inputs': [(f'{b}/conv{i + 1}/kernel', 2)], 'masked': list(bn(f'{b}/bn{i}')),
                     'bn': [f'{b}/bn{i}/scale'], 'l1': [f'{b}/conv{i}/kernel']})
    stream['outputs'] += outs(f'{b}/conv{last}', f'{b}/bn{last}')
    stream['masked'] += bn(f'{b}/bn{last}')
    stream['bn'].append(f'{b}/bn{last}/scale')
    stream['l1'].append(f'{b}/conv{last}/kernel')
  stream['inputs'].append(('head/kernel', 0))
  groups.append(stream)
  return [_group(g, flat) for g in groups]


def vit_groups(params) -> list[Group]:
  """The MLP hidden units ('.../mlp/hidden') and the attention heads ('.../attn/heads') of
  each block of a jkd `ViT` params tree. Heads are left whole when the blocks share one
  relative position bias table (rel_pos_bias='shared'): a head removed in one block would
  have to go in all."""
  flat = _flat(params)
  shared_bias = any(k.startswith('encoder/rel_pos_bias/') for k in flat)
  groups = []
  for k in sorted(flat):
    if k.endswith('mlp/fc1/kernel'):
      p = k[:-len('fc1/kernel')]
      groups.append(_group({
          'name': f'{p}hidden', 'outputs': [(k, 1), (f'{p}fc1/bias', 0)],
          'inputs': [(f'{p}fc2/kernel', 0)], 'masked': [k, f'{p}fc1/bias'], 'bn': [],
          'l1': [k]}, flat))
    if k.endswith('attn/value/kernel') and not shared_bias:
      p, block = k[:-len('value/kernel')], k[:-len('attn/value/kernel')]
      outputs = [(f'{p}{n}/{w}', 1 if w == 'kernel' else 0)
                 for n in ('query', 'key', 'value') for w in ('kernel', 'bias')]
      table = f'{block}rel_pos_bias/relative_position_bias_table'
      if table in flat:
        outputs.append((table, 1))
      groups.append(_group({
          'name': f'{p}heads', 'outputs': outputs, 'inputs': [(f'{p}out/kernel', 0)],
          'masked': [k, f'{p}value/bias'], 'bn': [], 'l1': [k]}, flat))
  return groups


def _group(g: dict, flat: dict) -> Group:
  first, axis = g['outputs'][0]
  size = flat[first].shape[axis]
  return Group(g['name'], int(size), tuple(g['outputs']), tuple(g['inputs']),
               tuple(g['masked']), tuple(g['bn']), tuple(g['l1']))


def groups_for(params) -> list[Group]:
  """ResNet or ViT channel groups; UserError for other models."""
  flat = _flat(params)
  if 'stem_conv/kernel' in flat:
    return resnet_groups(params)
  if any(k.endswith('mlp/fc1/kernel') for k in flat):
    return vit_groups(params)
  raise UserError('Channel pruning knows jkd ResNets (residual streams and block convs) and '
                  'ViTs (MLP hidden units, attention heads); this model is neither. Use '
                  "--config.prune.method=magnitude (unstructured or N:M) instead.")


def keep_count(size: int, ratio: float) -> int:
  """Channels a group of `size` keeps at `ratio` removed: round(size * (1 - ratio)), >= 1."""
  return max(1, int(round(size * (1.0 - ratio))))


def scores(group: Group, flat: dict, criterion: str) -> jax.Array:
  """(size,) importance of each channel: BN |gamma| summed ('bn'), or filter L1 ('l1')."""
  if criterion == 'bn' and group.bn_scores:
    return sum(jnp.abs(flat[p]) for p in group.bn_scores)
  total = 0.0
  for p in group.l1_scores:
    w = jnp.abs(flat[p])
    axis = dict(group.outputs)[p]
    total = total + jnp.sum(jnp.moveaxis(w, axis, -1).reshape(-1, w.shape[axis]), axis=0)
  return total


def channel_masks(params, groups: list[Group], removed_fraction, criterion: str):
  """{group name: (size,) float32 0/1}: the lowest-scoring `removed_fraction` of each group
  (exact count: size - keep_count(size, fraction); ties by index) get 0."""
  flat = _flat(params)
  out = {}
  for g in groups:
    s = scores(g, flat, criterion)
    drop = g.size - jnp.maximum(1, jnp.round(g.size * (1.0 - removed_fraction)).astype(jnp.int32))
    ranks = jnp.argsort(jnp.argsort(s))  # 0 = least important
    out[g.name] = (ranks >= drop).astype(jnp.float32)
  return out


def _param_masks(params, groups: list[Group], masks: dict):
  """A params-shaped tree of 0/1 masks: the group channel masks on the `masked` arrays."""
  where = {}
  for g in groups:
    axes = dict(g.outputs)
    for p in g.masked:
      where[p] = (masks[g.name], axes[p])

  def leaf_mask(path, x):
    name = path_name(path)
    if name not in where:
      return jnp.ones(x.shape, jnp.float32)
    m, axis = where[name]
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return jnp.broadcast_to(m.reshape(shape), x.shape)
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def channel_pruning(inner: optax.GradientTransformation, params, *, ratio: float = 0.5,
                    criterion: str = 'bn', begin_step: int = 0, end_step: int = 1000,
                    update_every: int = 10) -> optax.GradientTransformation:
  """Wraps `inner` so that a fraction `ratio` of every channel group is pruned, gradually.

  Same contract as `pruning.magnitude_pruning` (state `PruningState`, masked weights exactly 0
  after every update, so `pruning.find_masks` and the sparsity report work), with masks that
  are whole channels. `params` (or their shapes) fixes the groups.
  """
  if criterion not in CRITERIA:
    raise UserError(f'config.prune.criterion={criterion!r}: use {" or ".join(CRITERIA)}.')
  if not 0.0 <= ratio < 1.0:
    raise UserError(f'config.prune.target_sparsity={ratio} for channel pruning: the fraction '
                    'of channels removed must be in [0, 1).')
  groups = groups_for(params)

  def compute_masks(p, old_masks, count):
    del old_masks  # every group is ranked afresh
    frac = cubic_sparsity(count, target_sparsity=ratio, begin_step=begin_step,
                          end_step=end_step)
    return _param_masks(p, groups, channel_masks(p, groups, frac, criterion))

  # Recomputed at end_step too: otherwise a schedule whose length is not a multiple of
  # `update_every` would stop short of `ratio` (e.g. 17 of 32 kept) and could not be shrunk.
  return masked_optimizer(inner, compute_masks, begin_step=begin_step, end_step=end_step,
                          update_every=update_every, name='channel_pruning',
                          recompute_at_end=True)


def kept_channels(params, groups: list[Group]) -> dict[str, np.ndarray]:
  """{group: sorted indices of the channels whose masked params are not all exactly 0}."""
  flat = _flat(params)
  out = {}
  for g in groups:
    axes = dict(g.outputs)
    alive = np.zeros(g.size, bool)
    for p in g.masked:
      x = np.moveaxis(np.asarray(flat[p]), axes[p], -1).reshape(-1, g.size)
      alive |= np.any(x != 0, axis=0)
    out[g.name] = np.flatnonzero(alive)
  return out


def shrink(model_cfg: dict, variables: dict) -> tuple[dict, dict]:
  """The physically narrower model: (its config.model, its variables).

  Removes every channel whose masked params are exactly 0. All groups of a ResNet must keep
  the same fraction (then it is the same ResNet at a smaller `width`); a ViT's blocks the same
  hidden size (a smaller `mlp_dim`) and the same number of heads (a smaller `num_heads`, with
  `head_dim` set to the heads' unchanged size). Outputs are unchanged (see the module
  docstring).
  """
  from flax.traverse_util import flatten_dict, unflatten_dict
  params = variables['params']
  named = _flat(params)
  groups = groups_for(params)
  kept = kept_channels(params, groups)
  flat = {('params',) + k: np.asarray(v) for k, v in flatten_dict(params).items()}
  for col, tree in variables.items():
    if col != 'params':
      flat.update({(col,) + k: np.asarray(v) for k, v in flatten_dict(tree).items()})

  def key(path):
    col, _, rest = path.rpartition(':')
    return (col or 'params',) + tuple(rest.split('/'))

  for g in groups:
    idx = kept[g.name]
    for path, axis in g.outputs + g.inputs:
      k = key(path)
      if k in flat:
        flat[k] = np.take(flat[k], idx, axis=axis)
  new_cfg = dict(model_cfg)
  if 'stem_conv/kernel' in named:
    from jkd import models
    width = model_cfg.get('width') or models.field_default(model_cfg['name'], 'width')
    new_width = len(kept[groups[0].name]) * width // groups[0].size
    for g in groups:
      if len(kept[g.name]) * width != new_width * g.size:
        raise UserError(f'Channel group {g.name} keeps {len(kept[g.name])} of {g.size} channels, '
                        f'not the {new_width}/{width} of the others: a jkd ResNet has one width. '
                        'Prune with config.prune.method=channel (equal fraction per group).')
    new_cfg['width'] = int(new_width)
  else:
    for kind, field in (('hidden', 'mlp_dim'), ('heads', 'num_heads')):
      sizes = {len(kept[g.name]) for g in groups if g.name.endswith(kind)}
      if len(sizes) > 1:
        raise UserError(f'ViT blocks keep different {field} {sorted(sizes)}; a jkd ViT has one '
                        f'{field}. Prune with config.prune.method=channel.')
      if sizes:
        new_cfg[field] = int(sizes.pop())
    head = next((g for g in groups if g.name.endswith('heads')), None)
    if head is not None:  # The kept heads keep their size: q/k/v kernels are (D, H, head_dim).
      new_cfg['head_dim'] = int(named[head.outputs[0][0]].shape[2])
  tree = unflatten_dict(flat)
  return new_cfg, {col: tree[col] for col in tree}
