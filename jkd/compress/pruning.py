"""Magnitude pruning as an optax wrapper: gradual (Zhu & Gupta 2017) or N:M structured.

  tx = magnitude_pruning(optax.adamw(1e-3), target_sparsity=0.5, begin_step=0, end_step=1000)

The wrapper's state holds one mask per parameter (float32 0/1, same tree as the params) and a
step count. At every update step the masks are recomputed from the current weights; the returned
updates make `params + updates` exactly 0.0 where the mask is 0 (`updates = mask · inner(mask ·
grads) - (1 - mask) · params`, and `p + (-p) == 0` exactly in floating point), so pruned weights
stay zero through any number of steps, checkpoints and the int8 export.

Own code rather than jaxpruner: jaxpruner is unmaintained and breaks on current jax.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Prunable = Callable[[str, Any], bool]


def path_name(path) -> str:
  """'stage1_block0/conv1/kernel' from a tree path (ignores `nn.Partitioned.value` hops)."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def default_prunable(name: str, leaf) -> bool:
  """Conv/Dense kernels (ndim >= 2) except the classifier `head`.

  The head is left dense: it holds < 1% of a small ResNet's weights but every class logit
  depends on it, so pruning it costs accuracy for almost no size (common practice since
  Han et al. 2015 and Zhu & Gupta 2017).
  """
  return name.endswith('kernel') and getattr(leaf, 'ndim', 0) >= 2 and 'head' not in name


def cubic_sparsity(step, *, target_sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0):
  """Zhu & Gupta (2017) gradual schedule, "To prune, or not to prune", eq. 1.

  `s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))^3` for `t0 <= t <= t0 + n·Δt`, with
  `t0 = begin_step`, `n·Δt = end_step - begin_step`; `s_i` before, `s_f` after.
  """
  span = max(end_step - begin_step, 1)
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / span, 0.0, 1.0)
  s = target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - frac) ** 3
  return jnp.where(step < begin_step, initial_sparsity, s)


def _keep_top(scores: jax.Array, sparsity) -> jax.Array:
  """1.0 for the largest `(1 - sparsity)` fraction of a 1-D array (exact count, ties by index)."""
  n = scores.shape[0]
  k = jnp.floor(sparsity * n).astype(jnp.int32)  # How many to drop.
  ranks = jnp.argsort(jnp.argsort(scores))        # 0 = smallest magnitude.
  return (ranks >= k).astype(jnp.float32)


def nm_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  """N:M mask: keeps the `n` largest |w| in every group of `m` along the input axis (-2).

  w: (..., in, out) kernel (Conv HWIO or Dense (in, out)); `in % m` must be 0.
  Returns a 0/1 float32 array of w's shape with exactly n ones per group.
  """
  x = jnp.moveaxis(jnp.abs(w), -2, -1)           # (..., out, in)
  groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
  ranks = jnp.argsort(jnp.argsort(-groups, axis=-1), axis=-1)  # 0 = largest.
  keep = (ranks < n).astype(jnp.float32).reshape(x.shape)
  return jnp.moveaxis(keep, -1, -2)


class PruningState(NamedTuple):
  count: jax.Array   # Updates done so far.
  masks: Any         # 0/1 float32 tree like params.
  inner_state: Any


def magnitude_pruning(inner: optax.GradientTransformation, *, target_sparsity: float = 0.5,
                      schedule: str = 'cubic', begin_step: int = 0, end_step: int = 1000,
                      update_every: int = 10, scope: str = 'global',
                      n_m: tuple[int, int] | None = None,
                      prunable: Prunable = default_prunable) -> optax.GradientTransformation:
  """Wraps `inner` so that the prunable weights are magnitude-pruned while training.

  Args:
    inner: the optimizer (updates of pruned weights are masked before and after it, so its
      moments never see them).
    target_sparsity: final fraction of zeros among the prunable weights (ignored with n_m).
    schedule: 'cubic' (Zhu & Gupta gradual) or 'constant' (target from begin_step on).
    begin_step, end_step, update_every: masks are recomputed at steps `begin_step + k ·
      update_every <= end_step`; in between and afterwards they are kept.
    scope: 'global' (one magnitude threshold over all prunable weights) or 'layer' (each
      kernel pruned to the same sparsity).
    n_m: (N, M), e.g. (2, 4): semi-structured N:M sparsity along the input axis instead of
      unstructured; kernels whose input size is not a multiple of M stay dense.
    prunable: (name 'a/b/kernel', leaf) -> bool.
  """
  if scope not in ('global', 'layer'):
    raise ValueError(f'scope={scope!r}: use global or layer')
  if schedule not in ('cubic', 'constant'):
    raise ValueError(f'schedule={schedule!r}: use cubic or constant')

  def sparsity_at(count):
    if schedule == 'constant':
      return jnp.asarray(target_sparsity, jnp.float32)
    return cubic_sparsity(count, target_sparsity=target_sparsity, begin_step=begin_step,
                          end_step=end_step)

  def flags(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: prunable(path_name(p), x), params)

  def compute_masks(params, old_masks, count):
    which = flags(params)
    leaves, treedef = jax.tree.flatten(params)
    olds, chosen = treedef.flatten_up_to(old_masks), treedef.flatten_up_to(which)
    if n_m is not None:
      n, m = n_m
      new = [nm_mask(w, n, m) if c and w.shape[-2] % m == 0 else old
             for w, old, c in zip(leaves, olds, chosen)]
      return treedef.unflatten(new)
    s = sparsity_at(count)
    if scope == 'layer':
      new = [_keep_top(jnp.abs(w).ravel(), s).reshape(w.shape) if c else old
             for w, old, c in zip(leaves, olds, chosen)]
      return treedef.unflatten(new)
    picked = [jnp.abs(w).ravel() for w, c in zip(leaves, chosen) if c]
    if not picked:
      return old_masks
    keep = _keep_top(jnp.concatenate(picked), s)
    new, offset = [], 0
    for w, old, c in zip(leaves, olds, chosen):
      if c:
        new.append(keep[offset:offset + w.size].reshape(w.shape))
        offset += w.size
      else:
        new.append(old)
    return treedef.unflatten(new)

  return masked_optimizer(inner, compute_masks, begin_step=begin_step, end_step=end_step,
                          update_every=update_every, name='magnitude_pruning')


def masked_optimizer(inner: optax.GradientTransformation, compute_masks, *, begin_step: int,
                     end_step: int, update_every: int, name: str,
                     recompute_at_end: bool = False) -> optax.GradientTransformation:
  """`inner` with masks: updates of masked weights are zeroed before and after `inner` (its
  moments never see them) and the weights themselves set to exactly 0.

  `compute_masks(params, old_masks, count)` -> new 0/1 masks (params-shaped) runs at steps
  `begin_step + k * update_every <= end_step`, and also at `end_step` with `recompute_at_end`
  (so a schedule whose length is not a multiple of `update_every` still reaches its target);
  in between and afterwards the masks are kept. State: `PruningState`.
  """

  def init_fn(params):
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
    return PruningState(jnp.zeros((), jnp.int32), masks, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(f'{name} needs params in update(grads, state, params).')
    count = state.count
    on_grid = (count - begin_step) % max(update_every, 1) == 0
    if recompute_at_end:
      on_grid = on_grid | (count == end_step)
    due = (count >= begin_step) & (count <= end_step) & on_grid
    masks = jax.lax.cond(due, lambda: compute_masks(params, state.masks, count),
                         lambda: state.masks)
    masked = jax.tree.map(lambda g, k: g * k.astype(g.dtype), updates, masks)
    inner_updates, inner_state = inner.update(masked, state.inner_state, params)
    out = jax.tree.map(lambda u, k, p: u * k.astype(u.dtype) - p * (1 - k).astype(p.dtype),
                       inner_updates, masks, params)
    return out, PruningState(count + 1, masks, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def apply_masks(params, masks):
  """params · masks (exact zeros where masked)."""
  return jax.tree.map(lambda p, k: p * k.astype(p.dtype), params, masks)


def find_masks(opt_state) -> Any | None:
  """The masks inside an optimizer state that contains a `PruningState`, else None."""
  for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState)):
    if isinstance(s, PruningState):
      return s.masks
  return None


def sparsity_report(params, prunable: Prunable = default_prunable) -> dict:
  """Fraction of exact zeros per prunable kernel and over all of them, plus nonzero counts.

  Returns {'layers': {name: sparsity}, 'global': sparsity of the prunable weights,
  'nonzero_params': nonzeros over all params, 'params': all params}. Counts the weights
  themselves (not masks), so it also checks that masked weights really are zero.
  """
  layers, zeros, total = {}, 0, 0
  nonzero, count = 0, 0
  for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
    w = np.asarray(w)
    name = path_name(path)
    nz = int(np.count_nonzero(w))
    nonzero, count = nonzero + nz, count + w.size
    if prunable(name, w):
      layers[name] = round(1.0 - nz / w.size, 4)
      zeros, total = zeros + w.size - nz, total + w.size
  return {'layers': layers, 'global': round(zeros / max(total, 1), 4),
          'nonzero_params': nonzero, 'params': count}
