"""The JAX model of a static int8 export: what `jkd eval` of the fake-quant model computes.

Every conv / dense layer sees its input quantized to uint8 with a static per-tensor range and
its kernel to int8 per output channel, as the exported QDQ graph does:

  activations  lo = min(0, min x), hi = max(0, max x) over the calibration data,
               s = (hi - lo) / 255, z = round(-lo / s), x_q = (clip(round(x / s) + z, 0, 255) - z) s
  weights      s_c = max |w_c| / 127, w_q = clip(round(w / s_c), -127, 127) s_c  (c: out channel)

(ONNX Runtime's QDQ formulas, round half to even.) The converters also quantize some
tensors between layers (residual sums, the pooled features); those extra 8-bit roundings are
what separates the file's outputs from this model's (tests/test_deploy.py states the bound).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYERS = (nn.Conv, nn.Dense, nn.DenseGeneral)


def _is_layer(context) -> bool:
  return isinstance(context.module, LAYERS) and context.method_name == '__call__'


def _path(context) -> str:
  return '/'.join(context.module.path)


def calibrate(clf, pixels: np.ndarray, batch: int = 32) -> dict[str, tuple[float, float]]:
  """{layer path: (lo, hi)} of every conv/dense input over `pixels` (min/max, 0 included)."""
  seen: dict[str, list] = {}

  def record(next_fun, args, kwargs, context):
    if _is_layer(context):
      seen.setdefault(_path(context), []).append(args[0])
    return next_fun(*args, **kwargs)

  ranges: dict[str, tuple[float, float]] = {}
  for i in range(0, len(pixels), batch):
    seen.clear()
    with nn.intercept_methods(record):
      clf.apply(jnp.asarray(pixels[i:i + batch]))
    for path, xs in seen.items():
      lo = min(float(jnp.min(x)) for x in xs)
      hi = max(float(jnp.max(x)) for x in xs)
      old = ranges.get(path, (0.0, 0.0))
      ranges[path] = (min(old[0], lo), max(old[1], hi))
  return ranges


def quantize_activation(x, lo: float, hi: float):
  """uint8 asymmetric fake quantization of x with the static range [lo, hi] (0 included)."""
  lo, hi = min(lo, 0.0), max(hi, 0.0)
  scale = (hi - lo) / 255.0 if hi > lo else 1.0
  zero = float(np.clip(np.round(-lo / scale), 0, 255))
  q = jnp.clip(jnp.round(x / scale) + zero, 0, 255)
  return (q - zero) * scale


def quantize_kernel(w, out_axes: int = 1):
  """int8 symmetric fake quantization of a kernel per output channel (its last `out_axes`)."""
  reduce = tuple(range(w.ndim - out_axes))
  scale = jnp.max(jnp.abs(w), axis=reduce, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(w / scale), -127, 127) * scale


def _quantized_params(params, float_layer: str | None = None):
  def leaf(path, w):
    names = [getattr(k, 'key', '') for k in path]
    if names[-1] != 'kernel' or '/'.join(names[:-1]) == float_layer:
      return w
    # A DenseGeneral kernel (D, H, d) is one (D, H*d) matrix in the file: per (h, d) column;
    # the attention output (H, d, D): per D. Convs (kh, kw, in, out) and Dense (in, out): out.
    out_axes = 2 if (w.ndim == 3 and names[-2] in ('query', 'key', 'value')) else 1
    return quantize_kernel(w, out_axes)
  return jax.tree_util.tree_map_with_path(leaf, params)


def apply(clf, ranges: dict, pixels, *, float_stem: bool = False) -> jax.Array:
  """Logits of the static-int8 fake-quant model (`ranges` from `calibrate`). `float_stem`:
  the first layer (the first in `ranges`, which are in call order) keeps its float input and
  kernel, as `jkd export --float-stem` does."""
  stem = next(iter(ranges)) if float_stem else None

  def fake(next_fun, args, kwargs, context):
    if _is_layer(context) and _path(context) in ranges and _path(context) != stem:
      args = (quantize_activation(args[0], *ranges[_path(context)]), *args[1:])
    return next_fun(*args, **kwargs)

  variables = {**clf.variables, 'params': _quantized_params(clf.variables['params'], stem)}
  with nn.intercept_methods(fake):
    return clf.apply(jnp.asarray(pixels, jnp.float32), variables)
