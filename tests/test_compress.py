"""jkd.compress: pruning wrapper, fake-quant STE, Qwix QAT -> integer export parity, `jkd
compress` + `jkd eval --export` end to end on tiny real Fashion-MNIST."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jkd.compress import export, pruning, quant

from conftest import REPO, SUPERVISED, run_jkd

COMPRESS = os.path.join(REPO, 'configs', 'fashion_mnist', 'compress.py')


def _toy_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {'conv': {'kernel': jax.random.normal(k[0], (3, 3, 8, 16)), 'bias': jnp.ones(16)},
          'dense': {'kernel': jax.random.normal(k[1], (16, 8))},
          'head': {'kernel': jnp.ones((8, 4)), 'bias': jnp.ones(4)}}


def _train_toy(tx, steps):
  params, state = _toy_params(), None
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.tree.map(lambda p: 0.1 * jnp.sign(p) + 0.01, params)  # Moves every weight.
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
  return history, state


def test_pruned_weights_stay_exactly_zero():
  tx = pruning.magnitude_pruning(optax.adamw(1e-2), target_sparsity=0.5, begin_step=0,
                                 end_step=4, update_every=2)
  history, state = _train_toy(tx, 10)
  masks = pruning.find_masks(state)
  for params in history[5:]:  # After the last mask update (step 4).
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
      assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0.0)
  report = pruning.sparsity_report(history[-1])
  assert report['global'] == 0.5 and 'head/kernel' not in report['layers']
  assert report['nonzero_params'] < report['params']


def test_nm_masks_have_n_per_group():
  history, _ = _train_toy(pruning.magnitude_pruning(optax.sgd(1e-2), n_m=(2, 4), begin_step=0,
                                                    end_step=0), 3)
  w = np.asarray(history[-1]['conv']['kernel'])               # (3, 3, 8, 16): in = 8.
  nonzero = (w != 0).reshape(3, 3, 2, 4, 16).sum(axis=3)       # Groups of 4 along `in`.
  assert np.all(nonzero == 2)
  d = np.asarray(history[-1]['dense']['kernel'])               # (16, 8)
  assert np.all((d != 0).reshape(4, 4, 8).sum(axis=1) == 2)


def test_cubic_schedule_values():
  s = lambda t: float(pruning.cubic_sparsity(t, target_sparsity=0.8, begin_step=10,  # noqa
                                             end_step=20))
  assert s(0) == 0.0 and s(10) == 0.0 and s(20) == pytest.approx(0.8) and s(99) == \
      pytest.approx(0.8)
  assert s(15) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # s_f + (0 - s_f)(1 - 1/2)^3


def test_fake_quant_values_and_straight_through_gradient():
  x = jax.random.normal(jax.random.key(1), (4, 6)) * 3
  y = quant.fake_quant(x, 8, axis=-1)
  scale = np.abs(np.asarray(x)).max(0) / 127.5
  q = np.asarray(y) / scale
  assert np.allclose(q, np.round(q), atol=1e-3) and np.abs(q).max() <= 128
  assert np.max(np.abs(np.asarray(y - x)) / scale) <= 0.5 + 1e-4
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, 8, axis=-1) * 2.0))(x)
  assert np.allclose(g, 2.0)  # STE: d fake_quant / dx = 1 inside the range.
  y4 = quant.fake_quant(x, 4)
  assert len(np.unique(np.asarray(y4))) <= 16


def test_int4_pack_roundtrip():
  q = np.arange(-8, 8, dtype=np.int8).repeat(3)[:47]
  packed = export.pack_int4(q)
  assert packed.dtype == np.uint8 and packed.size == 24
  assert np.array_equal(np.asarray(export.unpack_int4(jnp.asarray(packed), q.shape)), q)


@pytest.fixture(scope='module')
def compressed(tmp_path_factory):
  """A tiny supervised run, then `jkd compress :tiny` (int8 QAT + 50% pruning) from it."""
  from jkd.config import load_config
  from jkd import trainers
  root = tmp_path_factory.mktemp('compress')
  sup, w = str(root / 'sup'), str(root / 'q8')
  trainers.train('train', load_config(SUPERVISED + ':tiny'), sup)
  config = load_config(COMPRESS + ':tiny', [f'init_from={sup}', 'prune.enabled=True'])
  return w, trainers.train('compress', config, w), config


def test_compress_end_to_end_and_eval_export(compressed):
  w, summary, _ = compressed
  for key in ('test_accuracy', 'params', 'nonzero_params', 'export_bytes', 'fp32_bytes',
              'compression_ratio', 'export_accuracy', 'sparsity'):
    assert key in summary
  assert summary['kind'] == 'compress'
  assert os.path.isfile(os.path.join(w, 'export', 'model.jaxexport'))
  assert summary['export_bytes'] < summary['fp32_bytes'] / 3.5
  assert summary['sparsity'] > 0.4 and summary['nonzero_params'] < summary['params']
  # Fake-quant eval and the integer export agree within the tolerance stated below (at most
  # 1% of examples may change class through a rounding-boundary flip).
  assert summary['export_accuracy'] == pytest.approx(summary['test_accuracy'], abs=1e-2)
  out = run_jkd('eval', '--workdir', w, '--export')
  assert out.returncode == 0, out.stderr[-3000:]
  ev = json.load(open(os.path.join(w, 'eval.json')))
  assert ev['accuracy'] == pytest.approx(summary['export_accuracy'], abs=1e-9)


def test_export_matches_fake_quant_forward_and_keeps_zeros(compressed):
  from jkd import data, models
  from jkd.checkpoint import load_arrays
  w, _, config = compressed
  arrays, _ = load_arrays(w)
  predict, manifest = export.load_export(os.path.join(w, 'export'))
  batch = next(iter(data.make_eval_iterator(config.data, config.data.eval_split,
                                            global_batch_size=128)))
  info = data.get_info(config.data)
  model = quant.qat_model(models.create('resnet8_s', num_classes=10), config.quant)
  x = data.normalize(batch['image'], info.mean, info.std)
  # Qwix finds weights among the module's params by identity, so they must be jax Arrays
  # (load_arrays returns host numpy arrays).
  variables = jax.tree.map(jnp.asarray, {'params': arrays['params'], **arrays['model_state']})
  fq = np.asarray(model.apply(variables, x, train=False))
  ex = np.asarray(predict(batch['image']))
  # Stated tolerance. The two paths do the same integer arithmetic, but float rounding can put
  # an activation on the other side of a .5 quantization boundary now and then: that flips one
  # int8 step, and every logit of that image moves a little. So: >= 98% of images with all
  # logits equal within 1e-5 (measured: 126/128 with jax 0.12.1, qwix 0.1.8), every
  # logit within 2% of the logit scale (measured: 0.4% at worst), >= 99% identical argmax.
  diff = np.abs(fq - ex)
  assert np.mean(np.all(diff <= 1e-5, axis=-1)) >= 0.98
  assert np.max(diff) <= 2e-2 * np.max(np.abs(fq))
  assert np.mean(fq.argmax(-1) == ex.argmax(-1)) >= 0.99
  # Pruned (zero) float weights are integer zeros in the export.
  tensors, _ = export.load_tensors(os.path.join(w, 'export'))
  by_name = {t['name']: a for t, a in zip(manifest['tensors'], tensors)}
  conv = np.asarray(arrays['params']['stage2_block0']['conv1']['kernel'])
  q = by_name['params/stage2_block0/conv1/kernel/array/qvalue']
  assert q.dtype == np.int8 and np.mean(conv == 0) > 0.2
  assert np.all(q[conv == 0] == 0)


def test_weights_only_qat_exports_integer_weights_with_the_same_forward(tmp_path):
  """act_bits=32 (int8 weights, float activations): QAT runs, and the export stores int8
  weights whose dequantized forward is the QAT forward."""
  from jkd import models
  cfg = ml_collections.ConfigDict({'enabled': True, 'weight_bits': 8, 'act_bits': 32})
  model = models.create('resnet8_s', num_classes=10)
  images = jax.random.randint(jax.random.key(1), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
  x = images.astype(jnp.float32) / 255.0
  variables = nn.meta.unbox(model.init(jax.random.key(0), x, train=False))
  fq = np.asarray(quant.qat_model(model, cfg).apply(variables, x, train=False))
  assert not np.allclose(fq, np.asarray(model.apply(variables, x, train=False)), atol=1e-6)
  export.export_model(str(tmp_path), model, cfg, variables['params'],
                      {'batch_stats': variables['batch_stats']}, image_shape=(28, 28, 1),
                      mean=0.0, std=1.0)
  predict, manifest = export.load_export(str(tmp_path))
  np.testing.assert_allclose(np.asarray(predict(images)), fq, atol=1e-4 * np.max(np.abs(fq)))
  assert any(t['dtype'] == 'int8' for t in manifest['tensors'])
