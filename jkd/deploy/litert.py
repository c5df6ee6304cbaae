"""LiteRT (.tflite) export: jax2tf, then the TFLite converter with full-integer quantization.

Why this route: Qwix's own LiteRT path (`OdmlConversionProvider`) hands its graph to
`ai_edge_jax.convert`, which is not on PyPI; TensorFlow's `TFLiteConverter` is the maintained
converter that is. jax2tf wraps the jitted model as a TF function (its StableHLO inside an
`XlaCallModule`), and the converter legalizes that StableHLO into TFLite builtins. With
`--int8` the converter runs jkd's calibration images through the float model, fixes every
tensor's int8 scale and zero point (per-channel int8 weights, per-tensor int8 activations) and
keeps only `TFLITE_BUILTINS_INT8` kernels: a full-integer model (float in and out, one QUANTIZE
and one DEQUANTIZE at the ends), run by XNNPACK's QS8 kernels.

A ViT's exact (erf) GELU reaches the converter as a `chlo.erf` composite that TensorFlow 2.21's
StableHLO reader (v1.13) does not know; the export therefore uses the tanh form, which the
converter turns into TFLite's builtin GELU (|difference| < 3.6e-4 per activation; FILE.json
records it under `approximations`, and the file's accuracy is measured in its runtime).

The signature has a fixed batch (`batch`, default 1): jax2tf's shape-polymorphic modules carry
a shape-assertion custom call that TF 2.21 cannot read. The LiteRT interpreter resizes a ResNet
to any batch at run time; a ViT's reshapes keep the exported batch (its file runs other batch
sizes in chunks of it: export with --batch 32 to time batch 32).
"""
from __future__ import annotations

import os
import re

import numpy as np

from jkd.errors import UserError


def require() -> None:
  """UserError unless TensorFlow (the converter) is installed."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise UserError("LiteRT export needs TensorFlow's converter: pip install 'jkd[litert]' "
                    '(tensorflow-cpu and ai-edge-litert).') from None


def _unsupported(error: Exception) -> UserError:
  text = str(error)
  ops = sorted(set(re.findall(r'/(\w+)"\(callsite', text)))  # the failing jax ops' names
  custom = re.search(r'Custom ops: ([\w, .]+)', text)
  what = ', '.join(ops[:5]) or (custom.group(1) if custom else 'an operation')
  return UserError(
      f'The TFLite converter cannot express {what} of this model as a LiteRT builtin '
      '(TensorFlow 2.21 reads StableHLO up to v1.13; this jax writes newer ops for it). Export '
      'it as --format onnx (ONNX Runtime runs it), or replace that operation in the model '
      '(e.g. model.gelu_approximate=True for a ViT).')


def approximations(clf) -> tuple[object, list[str]]:
  """(the classifier LiteRT converts, what it changes): exact GELU -> tanh GELU."""
  import dataclasses
  if getattr(clf.module, 'gelu_approximate', None) is False:
    return (dataclasses.replace(clf, module=clf.module.clone(gelu_approximate=True)),
            ['GELU: tanh approximation (TFLite builtin GELU) for the exact erf form'])
  return clf, []


def convert(clf, *, int8: bool = False, pixels: np.ndarray | None = None,
            batch: int = 1) -> bytes:
  """The .tflite flatbuffer of `clf.apply` (float, or full-integer int8 from `pixels`)."""
  require()
  clf, _ = approximations(clf)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  import jax.numpy as jnp
  import tensorflow as tf
  from jax.experimental import jax2tf
  if int8 and (pixels is None or len(pixels) == 0):
    raise UserError('Full-integer LiteRT export needs calibration data and none was given: '
                    'pass --calibration-batches N (N >= 1).')
  variables = jax.tree.map(jnp.asarray, clf.variables)
  shape = [int(batch), *clf.image_shape]
  fn = tf.function(jax2tf.convert(lambda x: clf.apply(x, variables), with_gradient=False),
                   autograph=False, input_signature=[tf.TensorSpec(shape, tf.float32,
                                                                   name='pixels')])
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
  if int8:
    images = pixels.astype(np.float32)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    b = int(batch)
    converter.representative_dataset = lambda: (
        [images[i:i + b]] for i in range(0, len(images) - b + 1, b))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  try:
    return converter.convert()
  except Exception as e:  # tf.lite's ConverterError lives in a private module.
    if 'Converter' in type(e).__name__ or 'convert' in str(e).lower():
      raise _unsupported(e) from None
    raise


def save(flatbuffer: bytes, path: str) -> int:
  """Writes the flatbuffer atomically (`jkd.storage.write_bytes`); returns its size in bytes."""
  from jkd import storage
  storage.write_bytes(path, flatbuffer)
  return len(flatbuffer)
