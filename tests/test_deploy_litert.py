"""LiteRT files in CI without TensorFlow: the committed fixtures (tests/fixtures/deploy/make.py,
written by jkd.deploy.litert) run in ai-edge-litert and match the JAX model they came from."""
import os
import sys

import numpy as np
import pytest

pytest.importorskip('ai_edge_litert')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'fixtures', 'deploy'))
import make  # noqa: E402  (the fixture's model and calibration data)

HERE = os.path.join(os.path.dirname(__file__), 'fixtures', 'deploy')


def _pixels(n=128):
  return np.random.default_rng(7).integers(0, 256, (n, 28, 28, 1)).astype(np.float32)


def test_float_tflite_equals_the_jax_model():
  from jkd.deploy import runtime
  clf, _ = make.load()
  x = _pixels()
  out = runtime.open_file(os.path.join(HERE, 'tiny.tflite'))(x)  # batch 1 file, resized to 128
  np.testing.assert_allclose(out, np.asarray(clf.apply(x)), atol=1e-4)


def test_int8_tflite_is_full_integer_and_follows_the_fake_quant_model():
  from ai_edge_litert.interpreter import Interpreter
  from jkd.deploy import fake_quant, runtime
  path = os.path.join(HERE, 'tiny_int8.tflite')
  ops = {d['op_name'] for d in Interpreter(model_path=path)._get_ops_details()}
  assert {'QUANTIZE', 'CONV_2D', 'DEQUANTIZE'} <= ops
  clf, calib = make.load()
  x = _pixels()
  fq = np.asarray(fake_quant.apply(clf, fake_quant.calibrate(clf, calib), x))
  fp = np.asarray(clf.apply(x))
  out = runtime.open_file(path)(x)
  # The stated bounds of tests/test_deploy.py (random weights and images: looser agreement).
  assert np.abs(out - fq).mean() <= 0.85 * np.abs(out - fp).mean()
  assert np.mean(out.argmax(1) == fq.argmax(1)) >= 0.9
