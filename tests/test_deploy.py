"""Deployable files: ONNX / LiteRT / StableHLO exports of a trained tiny model, their runtimes,
static int8 against jkd's fake-quant model, calibration, and the command's errors."""
import json
import os

import numpy as np
import pytest

from conftest import SUPERVISED, run_jkd

pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')

# Stated tolerances. Float files equal the JAX model to float rounding. A static int8 file is
# compared with jkd's fake-quant model (jkd.deploy.fake_quant: the same per-channel int8
# weights and calibrated uint8 layer inputs): the file also rounds some tensors between layers
# to 8 bits, so its logits are not identical, but they must be much closer to the fake-quant
# model than to the float one, and change the predicted class of at most 5% of the images.
FLOAT_ATOL = 1e-4
INT8_AGREEMENT = 0.95
INT8_CLOSER = 0.85  # mean |file - fake-quant| <= 0.85 * mean |file - float| (0.44 on the
#                     Fashion-MNIST resnet8_s of docs/deploy.md, 0.76 on this 40-step model)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A briefly trained resnet8_s, its Classifier and 256 real test images."""
  from jkd import data
  from jkd.config import load_config
  from jkd.deploy.classifier import Classifier
  from jkd import trainers
  root = tmp_path_factory.mktemp('deploy')
  w = str(root / 'sup')
  trainers.train('train', load_config(SUPERVISED + ':tiny', ['total_steps=40']), w)
  clf = Classifier.from_workdir(w)
  batch = next(iter(data.make_eval_iterator(clf.data_config, 'test[:256]',
                                            global_batch_size=256)))
  return w, clf, batch['image'].astype(np.float32), root


def _export(w, fmt, out, int8=False, **settings):
  from jkd.deploy.export import export
  return export(w, fmt, out, int8=int8, calibration_batches=2, **settings)


def _check_int8(clf, path, pixels):
  from jkd.deploy import calibration, fake_quant, runtime
  calib = calibration.calibration_pixels(clf.data_config, num_batches=2, batch_size=32)
  ranges = fake_quant.calibrate(clf, calib)
  fq = np.asarray(fake_quant.apply(clf, ranges, pixels))
  fp = np.asarray(clf.apply(pixels))
  out = runtime.open_file(path)(pixels)
  assert np.mean(out.argmax(1) == fq.argmax(1)) >= INT8_AGREEMENT
  assert np.abs(out - fq).mean() <= INT8_CLOSER * np.abs(out - fp).mean()


def test_onnx_float_and_int8_round_trip(trained):
  import onnx
  w, clf, pixels, root = trained
  fp32, int8 = str(root / 'm.onnx'), str(root / 'm_int8.onnx')
  info = _export(w, 'onnx', fp32)
  qinfo = _export(w, 'onnx', int8, int8=True)
  from jkd.deploy import runtime
  out = runtime.open_file(fp32)(pixels)
  np.testing.assert_allclose(out, np.asarray(clf.apply(pixels)), atol=FLOAT_ATOL)
  ops = {n.op_type for n in onnx.load(int8).graph.node}
  assert {'QuantizeLinear', 'DequantizeLinear', 'Conv'} <= ops
  assert qinfo['bytes'] < info['bytes'] / 3.3   # int8 weights + per-channel scales, int32 biases
  assert qinfo['quantization']['calibration']['calibration_batches'] == 2
  _check_int8(clf, int8, pixels)


def test_onnx_int8_runs_integer_kernels(trained):
  """ORT fuses the QDQ pairs into integer ops (QLinearConv...), not float convs."""
  import onnxruntime as ort
  w, _, _, root = trained
  path, optimized = str(root / 'k_int8.onnx'), str(root / 'k_opt.onnx')
  _export(w, 'onnx', path, int8=True)
  options = ort.SessionOptions()
  options.optimized_model_filepath = optimized
  options.log_severity_level = 3
  ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  import onnx
  ops = [n.op_type for n in onnx.load(optimized).graph.node]
  assert ops.count('QLinearConv') == 9 and 'Conv' not in ops


def _optimized_ops(path, root):
  """The op types of the graph ORT runs (after its fusions)."""
  import onnx
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.optimized_model_filepath = str(root / 'optimized.onnx')
  options.log_severity_level = 3
  ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_onnx_int8_float_stem_keeps_only_the_first_conv_float(trained):
  """--float-stem: the stem conv stays float, the other 8 are integer; the file still agrees
  with the fake-quant model that keeps its first layer float too."""
  w, clf, pixels, root = trained
  path = str(root / 'stem_int8.onnx')
  info = _export(w, 'onnx', path, int8=True, float_stem=True)
  assert info['quantization']['kind'] == 'static int8, float first layer'
  ops = _optimized_ops(path, root)
  assert ops.count('QLinearConv') == 8 and sum('Conv' in op for op in ops) == 9
  from jkd.deploy import calibration, fake_quant, runtime
  ranges = fake_quant.calibrate(clf, calibration.calibration_pixels(
      clf.data_config, num_batches=2, batch_size=32))
  out = runtime.open_file(path)(pixels)
  stem = np.asarray(fake_quant.apply(clf, ranges, pixels, float_stem=True))
  fp = np.asarray(clf.apply(pixels))
  # On the trained resnet8_s of docs/deploy.md the file is 0.044 from this model, 0.088 from the
  # all-int8 one and 0.083 from the float one (99.1% same class); this 40-step model's logits
  # are ~10x smaller and closer together (0.0067 vs 0.0078 from the float model), so the
  # bounds are looser than INT8_CLOSER and INT8_AGREEMENT: closer, and 90% the same class.
  assert np.abs(out - stem).mean() < np.abs(out - fp).mean()
  assert np.mean(out.argmax(1) == stem.argmax(1)) >= 0.9
  from jkd.errors import UserError
  with pytest.raises(UserError, match='--float-stem'):
    _export(w, 'tflite', str(root / 'stem.tflite'), int8=True, float_stem=True)


def test_onnx_files_broadcast_no_constant_of_lower_rank(trained):
  """Every constant operand of an elementwise op has its partner's rank (ORT's fast path)."""
  import onnx
  w, _, _, root = trained
  path = str(root / 'rank.onnx')
  _export(w, 'onnx', path)
  model = onnx.shape_inference.infer_shapes(onnx.load(path))
  rank = {v.name: len(v.type.tensor_type.shape.dim)
          for v in (*model.graph.value_info, *model.graph.input)}
  inits = {i.name: len(i.dims) for i in model.graph.initializer}
  pairs = [(inits[a], rank[b]) for n in model.graph.node if n.op_type in ('Div', 'Sub', 'Mul')
           for a, b in (n.input, n.input[::-1]) if a in inits and b in rank]
  assert pairs and all(c == r for c, r in pairs)


def test_calibration_is_deterministic(trained):
  from jkd.deploy import calibration
  w, clf, _, root = trained
  a = calibration.calibration_pixels(clf.data_config, num_batches=2, batch_size=16)
  b = calibration.calibration_pixels(clf.data_config, num_batches=2, batch_size=16)
  c = calibration.calibration_pixels(clf.data_config, num_batches=2, batch_size=16, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (32, 28, 28, 1) and not np.array_equal(a, c)
  p1, p2 = str(root / 'd1.onnx'), str(root / 'd2.onnx')
  _export(w, 'onnx', p1, int8=True)
  _export(w, 'onnx', p2, int8=True)
  assert open(p1, 'rb').read() == open(p2, 'rb').read()
  _export(w, 'onnx', p2, int8=True, calibration_method='percentile', percentile=99.9)
  assert open(p1, 'rb').read() != open(p2, 'rb').read()


def test_stablehlo_round_trip(trained):
  from jkd.deploy import runtime
  w, clf, pixels, root = trained
  path = str(root / 'm.stablehlo')
  _export(w, 'stablehlo', path)
  np.testing.assert_allclose(runtime.open_file(path)(pixels), np.asarray(clf.apply(pixels)),
                             atol=FLOAT_ATOL)


@pytest.mark.slow
def test_litert_float_and_int8_round_trip(trained):
  """The conversion needs TensorFlow (the litert extra, ~1.3 GB installed): slow tier only; CI
  checks the committed .tflite fixtures in tests/test_deploy_litert.py instead."""
  from jkd.deploy import runtime
  w, clf, pixels, root = trained
  fp32, int8 = str(root / 'm.tflite'), str(root / 'm_int8.tflite')
  _export(w, 'tflite', fp32)
  qinfo = _export(w, 'tflite', int8, int8=True)
  np.testing.assert_allclose(runtime.open_file(fp32)(pixels), np.asarray(clf.apply(pixels)),
                             atol=FLOAT_ATOL)
  assert qinfo['int8']
  _check_int8(clf, int8, pixels)


def test_cli_export_eval_and_bench(trained):
  w, clf, pixels, root = trained
  path = str(root / 'cli_int8.onnx')
  out = run_jkd('export', '--workdir', w, '--format', 'onnx', '--int8', '--out', path,
                '--calibration-batches', '2')
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.load(open(path + '.json'))
  assert info['int8'] and info['model'] == 'resnet8_s' and info['bytes'] == os.path.getsize(path)
  out = run_jkd('eval', '--export', path, '--split', 'test[:512]')
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout[out.stdout.index('{'):])
  assert result['examples'] == 512 and 0.0 <= result['accuracy'] <= 1.0
  assert result['runtime'].startswith('onnxruntime')
  out = run_jkd('bench', '--export', path, '--batch-sizes', '1', '4', '--repeats', '2')
  assert out.returncode == 0, out.stderr[-3000:]
  bench = json.load(open(path + '.bench.json'))
  assert set(bench['batches']) == {'1', '4'} and bench['threads'] == 1
  assert bench['batches']['4']['ms'] > 0 and len(bench['batches']['4']['ms_all']) == 2


def test_cli_export_bad_input_exits_2(trained, tmp_path):
  w, _, _, _ = trained
  cases = [
      (['--format', 'onnx', '--int8', '--out', str(tmp_path / 'a.onnx'),
        '--calibration-batches', '0'], 'calibration'),
      (['--format', 'onnx', '--out', str(tmp_path / 'a.tflite')], 'must end in'),
      (['--format', 'onnx', '--int8', '--out', str(tmp_path / 'a.onnx'),
        '--calibration-method', 'mse'], 'percentile'),
  ]
  for args, words in cases:
    out = run_jkd('export', '--workdir', w, *args)
    assert out.returncode == 2, out.stderr[-2000:]
    assert words in ' '.join(out.stderr.split()) and 'Traceback' not in out.stderr
  out = run_jkd('eval', '--export', str(tmp_path / 'missing.onnx'))
  assert out.returncode == 2 and 'does not exist' in ' '.join(out.stderr.split())


def test_export_of_a_non_classifier_exits_2(tmp_path):
  mae = str(tmp_path / 'mae')
  out = run_jkd('pretrain', '--config', os.path.join(os.path.dirname(SUPERVISED), 'mae.py:tiny'),
                '--workdir', mae, '--config.total_steps=2')
  assert out.returncode == 0, out.stderr[-2000:]
  out = run_jkd('export', '--workdir', mae, '--format', 'onnx', '--out', str(tmp_path / 'm.onnx'))
  assert out.returncode == 2 and 'not a classifier' in out.stderr


def test_unsupported_operation_is_named():
  from jkd.deploy import onnx as onnx_export
  err = onnx_export._unsupported(NotImplementedError("No plugin for primitive 'cumlogsumexp'"))
  assert "'cumlogsumexp'" in str(err) and 'stablehlo' in str(err)


def test_file_exported_before_the_sha256_record_still_runs_with_a_warning(tmp_path, capfd):
  """FILE.json from a jkd older than its sha256/bytes record: read, with a warning that nothing
  checks the pair; a recorded checksum that differs is refused (tests/test_bad_input.py)."""
  from jkd.deploy import runtime
  fixtures = os.path.join(os.path.dirname(__file__), 'fixtures', 'deploy')
  path = str(tmp_path / 'old.onnx')
  with open(os.path.join(fixtures, 'tiny.onnx'), 'rb') as src, open(path, 'wb') as dst:
    dst.write(src.read())
  info = json.load(open(os.path.join(fixtures, 'tiny.onnx.json')))
  del info['sha256'], info['bytes']
  json.dump(info, open(path + '.json', 'w'))
  logits = runtime.open_file(path)(np.zeros((2, *info['image_shape']), np.float32))
  assert logits.shape == (2, info['num_classes'])
  assert 'has no "sha256"' in capfd.readouterr().err
