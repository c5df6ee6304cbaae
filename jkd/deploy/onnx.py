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
  return full_rank_constants(proto)


ELEMENTWISE = ('Add', 'Sub', 'Mul', 'Div')


def full_rank_constants(proto):
  """`proto` with every constant operand of an elementwise op (Add, Sub, Mul, Div) reshaped to
  the rank of the other operand (a scalar 255 beside (B, H, W, C) pixels becomes (1, 1, 1, 1)).

  Why: ONNX Runtime's CPU kernels take a slow general broadcast when the ranks differ: dividing
  (32, 28, 28, 1) pixels by a scalar took 245 us, by a (1, 1, 1, 1) constant 10 us (onnxruntime
  1.32, one thread), 8% of resnet8_s's whole int8 file at batch 32. Values are unchanged.
  """
  import onnx
  from onnx import numpy_helper
  inferred = onnx.shape_inference.infer_shapes(proto)
  rank = {v.name: len(v.type.tensor_type.shape.dim)
          for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
          if v.type.tensor_type.HasField('shape')}
  inits = {i.name: i for i in proto.graph.initializer}
  for node in proto.graph.node:
    if node.op_type not in ELEMENTWISE or len(node.input) != 2:
      continue
    for j in range(2):
      const, other = node.input[j], node.input[1 - j]
      if const not in inits or other not in rank:
        continue
      value = numpy_helper.to_array(inits[const])
      if value.ndim >= rank[other]:
        continue
      name = f'{const}_rank{rank[other]}'
      if name not in inits:  # one reshaped copy, shared by every node that needs this rank
        shaped = value.reshape((1,) * (rank[other] - value.ndim) + value.shape)
        inits[name] = numpy_helper.from_array(shaped, name)
        proto.graph.initializer.append(inits[name])
      node.input[j] = name
  used = {i for node in proto.graph.node for i in node.input}
  unused = [i for i in proto.graph.initializer if i.name not in used]
  for i in unused:
    proto.graph.initializer.remove(i)
  return proto


class _Reader:
  """ORT's CalibrationDataReader over calibration pixels, `batch` images per feed. Between
  feeds it is a safe point for SIGTERM / SIGINT (`interrupt.check`): nothing is written yet."""

  def __init__(self, pixels: np.ndarray, batch: int):
    self._feeds = iter([{INPUT: pixels[i:i + batch]} for i in range(0, len(pixels), batch)])

  def get_next(self):
    from jkd import interrupt
    interrupt.check('during int8 calibration; nothing was written')
    return next(self._feeds, None)


def quantize(float_proto, pixels: np.ndarray, *, method: str = 'minmax',
             percentile: float = 99.999, batch: int = 32, float_stem: bool = False):
  """Static int8 QDQ ModelProto of `float_proto`, ranges from `pixels` (N, H, W, C).

  Weights: int8, symmetric, per output channel. Activations: uint8, asymmetric, per tensor,
  `scale = (max - min) / 255` over the calibration data (minmax) or over the `percentile` of
  its histogram (percentile). Deterministic for the same pixels.

  `float_stem`: the first Conv / Gemm / MatMul (the layer that reads the normalised pixels)
  stays float and its output is quantized. Why: ORT's integer convolution is slow on very few
  input channels: resnet8_s's 3x3 stem on one channel took 560 us in int8 against 85 us in
  float (batch 32, one thread), a sixth of the int8 file's time.
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
  # ORT's quantizer reads and writes paths: a private directory (mkdtemp: 0700, a fresh name),
  # read back into memory; the caller writes the result atomically.
  with tempfile.TemporaryDirectory() as tmp:
    src, pre, out = (os.path.join(tmp, n) for n in ('f.onnx', 'pre.onnx', 'q.onnx'))
    onnx.save(float_proto, src)
    # Shape inference and ORT's float fusions (BatchNorm into Conv) before choosing the QDQ
    # points, as ORT's quantization guide prescribes.
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    stem = [first_layer(onnx.load(pre))] if float_stem else []
    quantize_static(
        pre, out, _Reader(pixels.astype(np.float32), batch), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=(CalibrationMethod.MinMax if method == 'minmax'
                          else CalibrationMethod.Percentile),
        extra_options={'CalibPercentile': float(percentile)}, nodes_to_exclude=stem)
    return onnx.load(out)


def first_layer(proto) -> str:
  """The name of the first Conv, Gemm or MatMul node of a (topologically sorted) graph."""
  for node in proto.graph.node:
    if node.op_type in ('Conv', 'Gemm', 'MatMul'):
      return node.name
  raise UserError('--float-stem: this graph has no Conv, Gemm or MatMul layer.')


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


def serialize(proto, metadata: dict | None = None) -> bytes:
  """The bytes of `proto` (one self-contained file, `compact`ed) with `metadata` as ONNX
  metadata_props."""
  compact(proto)
  for k, v in (metadata or {}).items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = str(k), str(v)
  return proto.SerializeToString()


def save(proto, path: str, metadata: dict | None = None) -> int:
  """Writes `serialize(proto, metadata)` atomically (`jkd.storage.write_bytes`); returns its
  size in bytes."""
  from jkd import storage
  data = serialize(proto, metadata)
  storage.write_bytes(path, data)
  return len(data)
