"""Resizing a learned position embedding to another patch grid, as timm does.

`resample(pos, new_grid)` equals timm's `resample_abs_pos_embed` (the default
`interpolation='bicubic', antialias=True`): PyTorch's antialiased bicubic `F.interpolate`
(align_corners=False), which is PIL's separable filter with the cubic kernel a = -0.5, widened
by the scale when shrinking, and its weights normalised to sum 1.
"""
from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _weights(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) interpolation matrix of one axis (torch's `_compute_indices_weights_aa`)."""
  scale = n_in / n_out
  support = 2.0 * max(scale, 1.0)
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) * invscale)
    total = w.sum()
    m[i, lo:hi] = w / total if total else w
  return m


def resample(pos: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int]) -> np.ndarray:
  """(1, gh*gw, D) patch position table -> (1, new_h*new_w, D), rows in raster order."""
  d = pos.shape[-1]
  grid = np.asarray(pos, np.float64).reshape(old_grid[0], old_grid[1], d)
  wh, ww = _weights(old_grid[0], new_grid[0]), _weights(old_grid[1], new_grid[1])
  out = np.einsum('ij,jkd->ikd', wh, grid)
  out = np.einsum('lk,ikd->ild', ww, out)
  return out.reshape(1, new_grid[0] * new_grid[1], d).astype(pos.dtype)
