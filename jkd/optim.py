"""Optimizers and schedules from config (optax only; nothing hand-written).

`config.optim` fields: name ('adamw' | 'sgd' | 'lamb'), lr (peak, already scaled), warmup_steps,
schedule ('cosine' | 'constant' | 'linear' | 'step'), min_lr_ratio, weight_decay, b1, b2,
momentum, nesterov, grad_clip (global norm; 0 = off), lr_batch_base (if > 0 the peak lr is
`lr * batch_size / lr_batch_base`, the linear scaling rule of MAE (/256) and SimMIM (/512)),
accumulate_steps (gradient accumulation, `optax.MultiSteps`: one update per k steps; 1 = off),
and for schedule 'step' decay_at (fractions of the run where the lr is multiplied by
decay_rate: mdistiller's epochs 150, 180, 210 of 240 are (0.625, 0.75, 0.875)).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jkd.errors import UserError


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw', lr=1e-3, lr_batch_base=0, warmup_steps=0, schedule='cosine',
      min_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.999, momentum=0.9, nesterov=True,
      grad_clip=1.0, accumulate_steps=1))


def accumulate_steps(cfg: ml_collections.ConfigDict) -> int:
  """`cfg.accumulate_steps` (1 when unset), checked: train steps per optimizer update."""
  k = int(cfg.get('accumulate_steps', 1) or 1)
  if k < 1:
    raise UserError(f'config.optim.accumulate_steps={k}: use 1 (no accumulation) or more.')
  return k


def peak_lr(cfg: ml_collections.ConfigDict, batch_size: int) -> float:
  scale = batch_size / cfg.lr_batch_base if cfg.get('lr_batch_base', 0) else 1.0
  return cfg.lr * scale


def make_schedule(cfg: ml_collections.ConfigDict, batch_size: int,
                  total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine/linear decay to `min_lr_ratio · peak`, or constant."""
  peak = peak_lr(cfg, batch_size)
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(total_steps, warmup + 1), end_value=peak * cfg.min_lr_ratio)
  if cfg.schedule == 'linear':
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak, warmup),
        optax.linear_schedule(peak, peak * cfg.min_lr_ratio, max(total_steps - warmup, 1))],
        [warmup])
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  if cfg.schedule == 'step':  # mdistiller / RepDistiller: x decay_rate at each boundary.
    fractions = tuple(cfg.get('decay_at', (0.625, 0.75, 0.875)))
    if any(not 0 < f < 1 for f in fractions):
      raise UserError(f'config.optim.decay_at={fractions}: give fractions of the run in (0, 1).')
    rate = float(cfg.get('decay_rate', 0.1))
    steps = optax.piecewise_constant_schedule(
        peak, {max(int(round(f * total_steps)), 1): rate for f in fractions})
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), steps], [warmup]) \
        if warmup else steps
  raise UserError(f'config.optim.schedule={cfg.schedule!r} is unknown; use cosine, linear, '
                  'constant or step.')


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and conv kernels, not biases, norms, embeddings.

  Follows timm/MAE: no decay on 1-D parameters (biases, LayerNorm/BatchNorm scales) nor on
  position embeddings, class and mask tokens.
  """
  no_decay_names = ('pos_embedding', 'cls', 'mask_token', 'dist_token')

  def keep(path, leaf):
    names = [getattr(p, 'key', getattr(p, 'name', '')) for p in path]
    return leaf.ndim > 1 and not any(n in no_decay_names for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int,
                   lr_scale_fn=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, schedule).

  Args:
    lr_scale_fn: optional `params -> tree of floats` multiplying each parameter's update
      (layer-wise lr decay for fine-tuning).

  With `cfg.accumulate_steps = k` > 1 the optimizer is `optax.MultiSteps`: gradients of k
  consecutive steps are averaged into one update (an effective batch of k x batch_size, which
  `lr_batch_base` scales by); the schedule stays a function of the train step (warmup_steps
  and the run length count train steps) and update u uses its value at step u k.
  """
  k = accumulate_steps(cfg)
  schedule = make_schedule(cfg, batch_size * k, total_steps)
  if k > 1:
    train_schedule, schedule = schedule, lambda update: train_schedule(update * k)
  if cfg.name == 'adamw':
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mask=decay_mask)
  elif cfg.name == 'lamb':
    core = optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  elif cfg.name == 'sgd':
    core = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  else:
    raise UserError(f'config.optim.name={cfg.name!r} is unknown; use adamw, sgd or lamb.')
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(core)
  if lr_scale_fn is not None:
    parts.append(_scale_by_tree(lr_scale_fn))
  if k > 1:
    return optax.MultiSteps(optax.chain(*parts), every_k_schedule=k), train_schedule
  return optax.chain(*parts), schedule


def _scale_by_tree(scale_fn) -> optax.GradientTransformation:
  """Multiplies updates leaf-wise by `scale_fn(params)` (a tree of constants)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    scales = scale_fn(updates)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(init, update)


def layerwise_lr_scales(params: Any, decay: float, depth: int | None = None) -> Any:
  """Layer-wise learning-rate decay for fine-tuning a ViT (BEiT, MAE, SimMIM fine-tuning).

  With `n = depth + 1` layers, a parameter of layer `i` gets `scale = decay^(n - i)`:
  'patch_embed', 'pos_embedding' and 'cls' are layer 0 (`decay^(depth + 1)`), encoder block
  `j` ('encoder/block{j}') is layer `j + 1` (`decay^(depth - j)`), and everything after the
  blocks ('encoder_norm', 'head') is layer `n` (scale 1). MAE's `param_groups_lrd`.

  Args:
    params: a ViT's parameter tree (or its updates: only the paths are read).
    decay: the per-layer factor, e.g. 0.65 (MAE ViT-B) or 0.75 (MAE ViT-L).
    depth: number of blocks; None counts the 'block{j}' entries under 'encoder'.

  Returns:
    A tree like `params` of Python floats, for `make_optimizer(..., lr_scale_fn=...)`.
  """
  if depth is None:
    encoder = params.get('encoder', {}) if hasattr(params, 'get') else {}
    depth = sum(1 for k in encoder if str(k).startswith('block'))
  first = ('patch_embed', 'pos_embedding', 'cls')

  def scale(path, leaf):
    del leaf
    names = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
    if names and names[0] in first:
      layer = 0
    elif len(names) > 1 and names[0] == 'encoder' and names[1].startswith('block'):
      layer = int(names[1][len('block'):]) + 1
    else:
      layer = depth + 1
    return float(decay)**(depth + 1 - layer)
  return jax.tree_util.tree_map_with_path(scale, params)
