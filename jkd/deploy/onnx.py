"""ONNX export: jax2onnx for the float graph, ONNX Runtime's static quantizer for int8.

Why these converters: jax2onnx (maintained, converts Flax Linen `apply` primitive by primitive)
writes the graph ONNX Runtime fuses best (NCHW `Conv` with its `BatchNormalization`, `Gemm`,
`MatMul`, `Softmax`); its outputs equal jax's to 1e-7. For int8, ONNX Runtime's own
`quantize_static` inserts QuantizeLinear/DequantizeLinear pairs (QDQ) with per-channel int8
weights and per-tensor uint8 activations whose ranges it measures on jkd's calibration batches;
ORT's graph optimizer fuses them into integer kernels (`QLinearConv`, `QGemm`, `QLinearAdd`,
`MatMulInteger`...), which is what makes the file faster, not just smaller. uint8 activations
with int8 weights (U8S8) is ORT's fast path on x86 (VNNI / AVX2).
"""
from __future__ import annotations

import os
import re
import tempfile

import numpy as np

from jkd.deploy import calibration
from jkd.errors import UserError

INPUT, OUTPUT = 'pixels', 'logits'


def require() -> None:
  """UserError unless the ONNX extra (jax2onnx, onnx, onnxruntime) is installed."""
  try:
    import jax2onnx  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
  except ImportError as e:
    raise UserError(f'ONNX export needs the deploy extra ({e.name} is missing): '
                    "pip install 'jkd[deploy]'.") from None


def _unsupported(error: Exception) -> UserError:
  text = str(error)
  m = re.search(r"primitive[ '\"`:]+([A-Za-z_][\w.]*)", text)
  what = f"the jax primitive '{m.group(1)}'" if m else 'an operation'
  return UserError(f'jax2onnx cannot express {what} of this model in ONNX '
                   f'({type(error).__name__}: {text.splitlines()[0][:200]}). Export the model '
                   'as --format stablehlo, or replace that operation in the model.')


def float_model(clf):
  """The float32 ONNX ModelProto of `clf.apply`: input 'pixels' (B, H, W, C), output 'logits'."""
  require()
  from jax2onnx import to_onnx
  import jax
  import jax.numpy as jnp
  variables = jax.tree.map(jnp.asarray, clf.variables)
  fn = lambda pixels: clf.apply(pixels, variables)  # noqa: E731
  try:
    # Native LayerNormalization (one fused ORT kernel instead of ~8 elementwise ops): 20% faster
    # on vit_micro_p7, outputs within 3e-6 of jax's.
    proto = to_onnx(fn, [('B', *clf.image_shape)], model_name=clf.description['model'],
                    input_names=[INPUT], output_names=[OUTPUT],
                    normalization_mode='prefer_native')
  except (NotImplementedError, ValueError, TypeError, KeyError) as e:
    raise _unsupported(e) from None
  # jax2onnx annotates some NCHW intermediates with their NHWC jax shapes; ORT warns about each
  # and re-infers them anyway, so the annotations are dropped.
  del proto.graph.value_info[:]
  return proto


class _Reader:
  """ORT's CalibrationDataReader over calibration pixels, `batch` images per feed."""

  def __init__(self, pixels: np.ndarray, batch: int):
    self._feeds = iter([{INPUT: pixels[i:i + batch]} for i in range(0, len(pixels), batch)])

  def get_next(self):
    return next(self._feeds, None)


def quantize(float_proto, pixels: np.ndarray, *, method: str = 'minmax',
             percentile: float = 99.999, batch: int = 32):
  """Static int8 QDQ ModelProto of `float_proto`, ranges from `pixels` (N, H, W, C).

  Weights: int8, symmetric, per output channel. Activations: uint8, asymmetric, per tensor,
  `scale = (max - min) / 255` over the calibration data (minmax) or over the `percentile` of
  its histogram (percentile). Deterministic for the same pixels.
  """
  require()
  import onnx
  from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                        quantize_static)
  from onnxruntime.quantization.shape_inference import quant_pre_process
  calibration.check_method(method)
  if pixels is None or len(pixels) == 0:
    raise UserError('Static int8 needs calibration data and none was given: pass '
                    '--calibration-batches N (N >= 1) of a dataset with a training split.')
  with tempfile.TemporaryDirectory() as tmp:
    src, pre, out = (os.path.join(tmp, n) for n in ('f.onnx', 'pre.onnx', 'q.onnx'))
    onnx.save(float_proto, src)
    # Shape inference and ORT's float fusions (BatchNorm into Conv) before choosing the QDQ
    # points, as ORT's quantization guide prescribes.
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    quantize_static(
        pre, out, _Reader(pixels.astype(np.float32), batch), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=(CalibrationMethod.MinMax if method == 'minmax'
                          else CalibrationMethod.Percentile),
        extra_options={'CalibPercentile': float(percentile)})
    return onnx.load(out)


def compact(proto) -> None:
  """Drops what a runtime does not read, in place: shape annotations (ORT infers them), doc
  strings, node names, and long tensor names (ORT's quantizer names each scale
  '..._quantized_scale'; on a 78k-parameter model the names weigh 10% of the int8 file).
  Graph inputs and outputs keep their names."""
  graph = proto.graph
  del graph.value_info[:]
  keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {''}
  names = {}

  def short(name):
    if name in keep:
      return name
    return names.setdefault(name, f't{len(names)}')

  for t in graph.initializer:
    t.name = short(t.name)
    t.doc_string = ''
  for node in graph.node:
    node.name = ''
    node.doc_string = ''
    node.input[:] = [short(n) for n in node.input]
    node.output[:] = [short(n) for n in node.output]
  proto.doc_string = ''


def save(proto, path: str, metadata: dict | None = None) -> int:
  """Writes `proto` (one self-contained file, `compact`ed) with `metadata` as ONNX
  metadata_props; returns its size in bytes."""
  import onnx
  compact(proto)
  for k, v in (metadata or {}).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = str(k), str(v)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  onnx.save(proto, path)
  return os.path.getsize(path)
