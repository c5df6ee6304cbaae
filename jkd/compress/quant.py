"""Quantization: Qwix QAT/PTQ models, plus a small fake-quant for what Qwix does not serve.

What Qwix (0.1.8) serves here, on Flax Linen modules (nn.Conv, nn.Dense, nn.DenseGeneral):
- QAT: `qwix.QtProvider` intercepts every conv/dot_general inside the model and fake-quantizes
  the weights (symmetric, per output channel, absmax, int8 or int4) and the input activations
  (int8, symmetric) with straight-through gradients.
- Serving: `qwix.PtqProvider` + `qwix.quantize_params` turn the trained float weights into real
  integer `QArray`s (int8/int4 values + float32 scales); its forward pass is bit-identical to
  the QAT model's (checked in tests/test_compress.py). `jkd.compress.export` stores those.
What it does not serve, and what we do instead:
- Static (calibrated) activation scales (`act_static_scale=True`) leak tracers under `jax.jit`
  with Linen convs in 0.1.8 (the 'quant_stats' variable is created inside the custom_vjp's
  forward trace: UnexpectedTracerError). So activations use Qwix's XLA default, dynamic-range
  quantization: each example's int8 scale is its absmax, computed at run time (also in the
  export). PTQ therefore needs no activation calibration: it quantizes the weights only.
- `fake_quant` below is the plain-jax reference of the same numerics (per-channel weights,
  per-tensor activations, STE), for tests and for code that wants quantization without
  intercepting a whole model.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

QTYPES = {8: 'int8', 4: 'int4'}


def _qtype(bits: int | None):
  if bits is None or bits == 0 or bits >= 32:
    return None
  if bits not in QTYPES:
    raise ValueError(f'{bits}-bit quantization is not supported; use 8 or 4 (or 32 for float).')
  return QTYPES[bits]


def bound(bits: int) -> float:
  """Qwix's symmetric bound for `bits`-bit integers: qmax + 0.5 (127.5 for int8).

  The extra half step makes the top bucket as wide as the others; values are clipped to
  [-2^(b-1), 2^(b-1) - 1] after rounding.
  """
  return 2.0 ** (bits - 1) - 0.5


def fake_quant(x: jax.Array, bits: int = 8, axis: int | Sequence[int] | None = None,
               scale: jax.Array | None = None) -> jax.Array:
  """Symmetric fake quantization with a straight-through estimator.

  `s = max|x| / (2^(b-1) - 0.5)` over all axes except `axis` (per-channel when `axis` is the
  output-channel axis of a kernel, per-tensor when None), `q = clip(round(x / s), -2^(b-1),
  2^(b-1) - 1)`, returns `q · s`. Gradient: identity (STE, Bengio et al. 2013) — `x + sg(q·s
  - x)` — so d out / d x = 1 everywhere (values beyond the absmax range cannot occur when the
  scale is the absmax; with a given smaller `scale` they are clipped but still pass gradient).

  Args:
    x: any shape.
    bits: 8 or 4 (any 2..16 works numerically).
    axis: axes that keep their own scale (e.g. -1 for a (..., in, out) kernel), or None.
    scale: optional precomputed scale broadcastable to x (static activation ranges).
  """
  if scale is None:
    keep = () if axis is None else tuple(a % x.ndim for a in (
        (axis,) if isinstance(axis, int) else axis))
    reduce = tuple(a for a in range(x.ndim) if a not in keep)
    absmax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / bound(bits), 1.0)
  qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  q = jnp.clip(jnp.round(x / scale), qmin, qmax)
  return x + jax.lax.stop_gradient(q * scale - x)


def _rule(quant_cfg, rule_cls):
  act_qtype = _qtype(quant_cfg.get('act_bits', 8))
  # Dynamic-range activations (see the module docstring). Qwix rejects the flag when nothing
  # quantizes the activations (weights-only, act_bits=32), so it is set only with an act type.
  act = {'act_qtype': act_qtype, 'act_static_scale': False} if act_qtype is not None else {}
  return rule_cls(module_path=quant_cfg.get('module_path', '.*'),
                  weight_qtype=_qtype(quant_cfg.get('weight_bits', 8)), **act)


def qat_model(model: nn.Module, quant_cfg) -> nn.Module:
  """The model with Qwix fake-quant (QAT) on every conv/dense matching `module_path`.

  Same params tree as `model`; gradients reach the float weights through Qwix's STE.
  """
  return qwix.quantize_model(model, qwix.QtProvider([_rule(quant_cfg, qwix.QtRule)]))


def weights_only(quant_cfg) -> bool:
  """True when only the weights are quantized (act_bits 32 or 0: W8A32 / W4A32)."""
  return _qtype(quant_cfg.get('act_bits', 8)) is None


def serving_model(model: nn.Module, quant_cfg) -> nn.Module:
  """The model that runs on real integer weights (`QArray` params from `quantize_weights`).

  Weights-only quantization is served by the float model on dequantized weights
  (`dequantize_weights`): Qwix's PTQ convolution needs int activations as well.
  """
  if weights_only(quant_cfg):
    return model
  return qwix.quantize_model(model, qwix.PtqProvider([_rule(quant_cfg, qwix.QuantizationRule)]))


def dequantize_weights(variables):
  """Every `QArray` leaf (int values and scales) -> its float32 value, qvalue * scale; the rest
  unchanged. With weights-only QAT these are exactly the weights its forward pass used."""
  # Qwix's PTQ params wrap each QArray with how it was quantized (`.array` holds the QArray).
  quantized = lambda x: isinstance(getattr(x, 'array', x), qwix.QArray)  # noqa: E731
  return jax.tree.map(lambda x: qwix.dequantize(getattr(x, 'array', x)) if quantized(x) else x,
                      variables, is_leaf=quantized)


def quantize_weights(model: nn.Module, quant_cfg, params, image_shape) -> dict:
  """Float params -> the serving model's params: integer `QArray` kernels, float the rest.

  This is the PTQ of the weights (absmax per output channel); applied to QAT-trained params it
  gives exactly the weights the QAT forward pass used.
  """
  if weights_only(quant_cfg):
    # The integer weights do not depend on the activation type; the int8-activation serving
    # model only provides their QArray layout (see `serving_model`).
    quant_cfg = {**dict(quant_cfg), 'act_bits': 8}
  serving = serving_model(model, quant_cfg)
  abstract = jax.eval_shape(
      lambda: serving.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  params = jax.tree.map(jnp.asarray, params)  # Qwix accepts jax.Arrays only.
  return qwix.quantize_params(params, nn.meta.unbox(abstract['params']))
