"""Structured channel pruning: groups, exact physical removal, the optax wrapper, the trainer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd import models
from jkd.compress import channel_pruning as cp
from jkd.compress.pruning import apply_masks


def _variables(name, key=0, **overrides):
  m = models.create(name, num_classes=10, **overrides)
  v = nn.meta.unbox(m.init(jax.random.key(key), jnp.zeros((1, 28, 28, 1)), train=False))
  rng = np.random.default_rng(key)
  # Non-trivial BatchNorm statistics and scales, so that removal is tested on real numbers.
  v = jax.tree_util.tree_map_with_path(
      lambda p, x: (np.abs(rng.normal(1, .3, x.shape)) if 'var' in str(p[-1])
                    else rng.normal(0, .5, x.shape)).astype(np.float32)
      if x.ndim == 1 else np.asarray(x), v)
  return m, v


VIT_HALF = {'mlp_dim': 128, 'num_heads': 2, 'head_dim': 16}  # vit_micro_p7: 64 wide, 4 heads


@pytest.mark.parametrize('name,overrides,after,param_fraction', [
    ('resnet8_s', {}, {'width': 8}, 0.3), ('resnet20_s', {}, {'width': 8}, 0.3),
    ('vit_micro_p7', {}, VIT_HALF, 0.55),
    # A per-block relative position bias loses the removed heads' columns.
    ('vit_micro_p7', {'rel_pos_bias': 'block', 'pool': 'token'}, VIT_HALF, 0.56)])
def test_shrink_removes_channels_and_keeps_outputs(name, overrides, after, param_fraction):
  model, v = _variables(name, **overrides)
  groups = cp.groups_for(v['params'])
  masks = cp._param_masks(v['params'], groups, cp.channel_masks(v['params'], groups, 0.5, 'bn'))
  pruned = {**v, 'params': jax.tree.map(np.asarray, apply_masks(v['params'], masks))}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28, 28, 1)), jnp.float32)
  ref = model.apply(pruned, x, train=False)
  cfg, small = cp.shrink({'name': name, **overrides}, pruned)
  assert {k: cfg[k] for k in after} == after
  small_model = models.create(name, num_classes=10, **overrides, **after)
  out = small_model.apply(small, x, train=False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
  count = lambda t: sum(np.size(a) for a in jax.tree.leaves(t['params']))  # noqa: E731
  assert count(small) < param_fraction * count(v)  # Half the width: ~1/4 of a conv.
  shapes = jax.tree.map(np.shape, small['params'])
  expected = jax.tree.map(np.shape, nn.meta.unbox(jax.eval_shape(
      lambda: small_model.init(jax.random.key(0), x, train=False)))['params'])
  assert shapes == expected


def test_vit_groups_are_mlp_units_and_heads_unless_the_bias_table_is_shared():
  _, v = _variables('vit_micro_p7')
  groups = {g.name: g for g in cp.groups_for(v['params'])}
  assert set(groups) == {f'encoder/block{i}/{part}' for i in range(4)
                         for part in ('mlp/hidden', 'attn/heads')}
  heads = groups['encoder/block0/attn/heads']
  assert heads.size == 4 and heads.inputs == (('encoder/block0/attn/out/kernel', 0),)
  assert heads.masked == ('encoder/block0/attn/value/kernel', 'encoder/block0/attn/value/bias')
  _, shared = _variables('vit_micro_p7', rel_pos_bias='shared', pool='token')
  assert all(g.name.endswith('mlp/hidden') for g in cp.groups_for(shared['params']))


def test_resnet_groups_couple_the_residual_stream():
  _, v = _variables('resnet8_s')
  groups = {g.name: g for g in cp.resnet_groups(v['params'])}
  # stem + stage1 (identity shortcut) share one stream; stages 2 and 3 start their own.
  assert set(groups) == {'stream0', 'stream1', 'stream2', 'stage1_block0/inner1',
                         'stage2_block0/inner1', 'stage3_block0/inner1'}
  outs = {p for p, _ in groups['stream0'].outputs}
  assert {'stem_conv/kernel', 'stage1_block0/conv2/kernel'} <= outs
  assert ('head/kernel', 0) in groups['stream2'].inputs


def test_channel_pruning_wrapper_prunes_gradually_to_whole_zero_channels():
  model, v = _variables('resnet8_s')
  params = v['params']
  tx = cp.channel_pruning(optax.sgd(1e-3), params, ratio=0.5, begin_step=0, end_step=4,
                          update_every=1)
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  removed = []
  for _ in range(6):
    updates, state = tx.update(zero_grads, state, params)
    params = optax.apply_updates(params, updates)
    kept = cp.kept_channels(params, cp.groups_for(params))
    removed.append(16 - len(kept['stream0']))
  assert removed[0] == 0 and removed[-1] == 8          # 0 -> half, cubic in between
  assert all(a <= b for a, b in zip(removed, removed[1:]))
  assert 0 < removed[1] < 8


def test_compress_channel50_trains_and_exports_the_narrower_model(tmp_path):
  """`jkd compress :channel50` (KD from the parent) ends with masked channels, and its ONNX
  file is the width-8 network with the same accuracy as the run's own evaluation."""
  pytest.importorskip('onnxruntime')
  pytest.importorskip('jax2onnx')
  import os
  from conftest import SUPERVISED
  from jkd.config import load_config
  from jkd import trainers
  sup, w = str(tmp_path / 'sup'), str(tmp_path / 'c50')
  trainers.train('train', load_config(SUPERVISED + ':tiny'), sup)
  compress_cfg = os.path.join(os.path.dirname(SUPERVISED), 'compress.py')
  config = load_config(compress_cfg + ':tiny-channel50', [
      f'init_from={sup}', f'teacher.workdir={sup}', "deploy.formats=('onnx',)",
      'deploy.int8=false'])
  summary = trainers.train('compress', config, w)
  exported = summary['deploy']['model.onnx']
  assert exported['params'] == 19_810 and summary['params'] == 77_754
  assert exported['accuracy'] == pytest.approx(summary['test_accuracy'], abs=2e-3)
  assert os.path.isfile(os.path.join(w, 'export', 'model.onnx.json'))
