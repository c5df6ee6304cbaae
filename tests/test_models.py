"""Tests of the model zoo: shapes, intermediates, attention paths, sharding names, sizes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import masking, models
from jkd.errors import UserError
from jkd.models import cifar as cifar_models
from jkd.models import vit as vit_lib
from jkd.models.mim import create_mim

SMALL = ('resnet8_s', 'resnet18_s', 'resnet20_s', 'vit_micro_p7', 'vit_nano_p4', 'vit_mini_p4',
         'vit_small_p4')


def _images(b=2, size=28, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3), jnp.float32)


def _init(model, x, jit=False):
  init = jax.jit(model.init) if jit else model.init
  # 'rbg' keys: XLA:CPU compiles threefry slowly, once per parameter shape.
  return init(jax.random.key(0, impl='rbg'), x)


def _apply(model, variables, *args, jit=False, **kwargs):
  # Eager by default: a whole-model XLA:CPU compile costs more than op-by-op dispatch for the
  # one or two calls a test makes. Tiny graphs called many times are jitted.
  apply = functools.partial(model.apply, **kwargs)
  return (jax.jit(apply) if jit else apply)(variables, *args)


def _abstract(model, size, batch=1):
  """Params and outputs by shape only: no memory, so ViT-H is as cheap as ViT-Ti."""
  def run():
    variables = model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)))
    return variables, _apply(model, variables, jnp.zeros((batch, size, size, 3)))
  return jax.eval_shape(run)


# Initialising costs far more than applying on CPU (random bits compile per shape), so each
# tiny model is initialised once. Parameters do not depend on dtype, dropout or drop_path.
VIT = dict(depth=2, pool='token', head_zero_init=False)


@pytest.fixture(scope='module')
def vit_vars():
  return _init(models.create('vit_nano_p4', **VIT), _images(), jit=True)


@pytest.fixture(scope='module')
def resnet_vars():
  return _init(models.create('resnet8_s'), _images(), jit=True)


def test_names_sorted_and_complete():
  expected = {'vit_ti16', 'vit_s16', 'vit_b16', 'vit_l16', 'vit_h14', 'resnet18', 'resnet34',
              'resnet50', *SMALL,
              # mdistiller's CIFAR-100 zoo (jkd/models/cifar.py; tests/test_cifar_models.py).
              'resnet8', 'resnet20', 'resnet32', 'resnet56', 'resnet110', 'resnet8x4',
              'resnet32x4', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8', 'vgg11', 'vgg13', 'vgg16',
              'mobilenetv2', 'shufflenetv2'}
  assert models.names() == sorted(expected)


@pytest.mark.parametrize('name', models.names())
def test_every_model_builds(name):
  model = models.create(name)
  small, cifar = name in SMALL, name in cifar_models.registry()
  # 28 px (Fashion-MNIST) for patch 7, 32 px (CIFAR) for the other small models and the zoo.
  size = (28 if name.endswith('_p7') else 32) if small or cifar else 224
  _, logits = _abstract(model, size)
  assert logits.shape == (1, 10 if small else 100 if cifar else 1000)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name, expected', [
    # timm vit_small_patch16_224 has 22,050,664 with a class token and 197 positions; the
    # pooled variant here drops the class token and one position (-768).
    ('vit_s16', 22_050_664),
    ('resnet18', 11_689_512),  # torchvision
    ('resnet50', 25_557_032),  # torchvision
])
def test_param_counts_match_published(name, expected):
  variables, _ = _abstract(models.create(name), 224)
  assert models.param_count(variables['params']) == pytest.approx(expected, rel=0.01)


def test_small_resnet_sizes():
  variables, _ = _abstract(models.create('resnet8_s'), 28)
  assert models.param_count(variables['params']) == pytest.approx(78_000, rel=0.05)
  variables, _ = _abstract(models.create('resnet20_s'), 32)
  assert models.param_count(variables['params']) == pytest.approx(272_000, rel=0.02)


def test_vit_intermediates(vit_vars):
  model = models.create('vit_nano_p4', **VIT)
  x = _images()
  variables = vit_vars
  logits, state = _apply(model, variables, x, mutable=['intermediates'])
  inter = state['intermediates']
  b, length, d, heads = 2, 1 + 7 * 7, 96, 3
  assert logits.shape == (b, 10)
  assert inter['patch_embed'][0].shape == (b, length, d)
  assert inter['pre_logits'][0].shape == (b, d)
  for i in range(2):
    blk = inter['encoder'][f'block{i}']
    assert blk['out'][0].shape == (b, length, d)
    attn = blk['attn']['attn'][0]
    assert attn.shape == (b, heads, length, length)
    np.testing.assert_allclose(attn.sum(-1), 1., atol=1e-5)
    for name in 'qkv':
      assert blk['attn'][name][0].shape == (b, heads, length, d // heads)
  assert len(models.block_outputs(inter)) == 2
  assert models.attention_maps(inter, 'k')[1].shape == (b, heads, length, d // heads)


def test_resnet_intermediates(resnet_vars):
  model = models.create('resnet8_s')
  x = _images()
  variables = resnet_vars
  _, state = _apply(model, variables, x, mutable=['intermediates'])
  shapes = jax.tree.map(jnp.shape, state['intermediates'])
  assert shapes == {'stem': ((2, 28, 28, 16),), 'stage1': ((2, 28, 28, 16),),
                    'stage2': ((2, 14, 14, 32),), 'stage3': ((2, 7, 7, 64),),
                    'pre_logits': ((2, 64),)}
  # ImageNet stem: /4 before the first stage, then /2 per stage.
  model = models.create('resnet50', num_classes=5)
  variables, _ = _abstract(model, 64)
  _, state = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3)), mutable=['intermediates']), variables)
  inter = state['intermediates']
  assert inter['stem'][0].shape == (1, 16, 16, 64)
  assert inter['stage4'][0].shape == (1, 2, 2, 2048)
  assert inter['pre_logits'][0].shape == (1, 2048)


def _both_paths(model, variables, *args, **kwargs):
  fast = _apply(model, variables, *args, **kwargs)
  reference, _ = _apply(model, variables, *args, mutable=['intermediates'], **kwargs)
  return fast, reference


@pytest.mark.parametrize('dtype, atol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_fast_path_matches_explicit(vit_vars, dtype, atol):
  model = models.create('vit_nano_p4', **VIT, dtype=dtype)
  x = _images()
  variables = vit_vars
  fast, reference = _both_paths(model, variables, x)
  assert fast.dtype == reference.dtype == jnp.float32
  np.testing.assert_allclose(fast, reference, atol=atol, rtol=atol)


def test_block_outputs_without_attention_maps_keep_the_fast_path(vit_vars, monkeypatch):
  """sow_attention=False: block outputs are tapped while attention stays on
  jax.nn.dot_product_attention (cuDNN's fused kernel on GPU), with the explicit path's results."""
  x = _images()
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **k: calls.append(k['implementation']) or fused(*a, **k))
  model = models.create('vit_nano_p4', **VIT, sow_attention=False)
  logits, state = _apply(model, vit_vars, x, mutable=['intermediates'])
  assert calls == ['xla', 'xla']  # Both blocks, none explicit.
  blocks = state['intermediates']['encoder']
  assert all('attn' not in blocks[f'block{i}'] for i in range(2))
  calls.clear()
  ref_logits, ref_state = _apply(models.create('vit_nano_p4', **VIT), vit_vars, x,
                                 mutable=['intermediates'])
  assert calls == []  # The default sows the maps: explicit attention.
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
  for out, ref in zip(models.block_outputs(state['intermediates']),
                      models.block_outputs(ref_state['intermediates'])):
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('explicit', [False, True])
def test_seq_lengths_hide_padding(explicit):
  """Padded tokens change neither the real tokens' outputs; their own outputs are zero."""
  attn = vit_lib.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  variables = _init(attn, x, jit=True)
  mutable = ['intermediates'] if explicit else False
  out = _apply(attn, variables, x, seq_lengths=jnp.array([4, 6]), mutable=mutable, jit=True)
  out = out[0] if explicit else out
  alone = _apply(attn, variables, x[:1, :4], jit=True)
  np.testing.assert_allclose(out[0, :4], alone[0], atol=1e-5)
  np.testing.assert_allclose(out[1], _apply(attn, variables, x[1:], jit=True)[0], atol=1e-5)
  # Only the output projection's bias (zero at init) is left at padded positions.
  np.testing.assert_allclose(out[0, 4:], 0., atol=1e-6)


def test_cudnn_needs_half_precision():
  model = models.create('vit_nano_p4', depth=1, attention='cudnn')
  with pytest.raises(ValueError, match='bf16'):
    jax.eval_shape(lambda: _init(model, _images()))
  with pytest.raises(UserError):
    jax.eval_shape(lambda: _init(model, _images()))


def test_logical_axis_names(vit_vars, resnet_vars):
  specs = nn.get_partition_spec(vit_vars)['params']
  blk = specs['encoder']['block0']
  assert blk['mlp']['fc1']['kernel'] == jax.P('embed', 'mlp')
  assert blk['mlp']['fc2']['kernel'] == jax.P('mlp', 'embed')
  assert blk['attn']['query']['kernel'] == jax.P('embed', 'heads', 'kv')
  assert blk['attn']['out']['kernel'] == jax.P('heads', 'kv', 'embed')
  assert blk['ln1']['scale'] == jax.P('embed')
  assert specs['head']['kernel'] == jax.P('embed', 'classes')
  assert specs['pos_embedding'] == jax.P(None, 'pos', 'embed')
  assert specs['cls'] == jax.P(None, None, 'embed')
  assert specs['patch_embed']['proj']['kernel'] == jax.P(None, None, None, 'embed')

  variables = resnet_vars
  specs = nn.get_partition_spec(variables)['params']
  assert specs['stage1_block0']['conv1']['kernel'] == jax.P(None, None, 'conv_in', 'conv_out')
  assert specs['stage1_block0']['bn1']['scale'] == jax.P('norm')
  # Every parameter is named (none left as a plain array).
  boxed = jax.tree.leaves(variables['params'], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in boxed)


def test_resnet_train_updates_batch_stats(resnet_vars):
  model = models.create('resnet8_s')
  x = _images()
  variables = resnet_vars
  logits, state = _apply(model, variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 10)
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(state['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  # Eval mode reads the running averages and changes nothing.
  _apply(model, {**variables, **state}, x)


@pytest.mark.parametrize('name', ['resnet8_s', 'vit_nano_p4'])
def test_bf16_compute_fp32_params_and_logits(name, vit_vars, resnet_vars):
  # Eager on purpose: XLA:CPU in jax 0.12 miscompiles jitted bf16 conv stacks (NaN logits,
  # reproducible with plain lax.conv_general_dilated), which is not the model's doing.
  overrides = {} if name == 'resnet8_s' else VIT
  model = models.create(name, **overrides, dtype=jnp.bfloat16)
  x = _images()
  variables = resnet_vars if name == 'resnet8_s' else vit_vars
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits = _apply(model, variables, x)
  assert logits.dtype == jnp.float32
  assert np.isfinite(logits).all()


def test_vit_train_mode_drop_path_and_dropout(vit_vars):
  model = models.create('vit_nano_p4', **VIT, dropout=0.1, drop_path=0.5)
  x = _images()
  variables = vit_vars
  a = _apply(model, variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = _apply(model, variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(_apply(model, variables, x), _apply(model, variables, x))


def test_vit_variants_and_parts(vit_vars):
  x = _images()
  variables, pre_logits = _abstract(
      models.create('vit_nano_p4', depth=1, posemb='sincos2d', num_classes=0), 28, batch=2)
  assert 'pos_embedding' not in variables['params']
  assert pre_logits.shape == (2, 96)
  # MIM pretraining calls the parts: patch tokens, then the encoder on a subset of them.
  model = models.create('vit_nano_p4', **VIT)
  tokens = _apply(model, vit_vars, x, method=lambda m, im: m.embed(im))
  assert tokens.shape == (2, 49, 96)
  encoded = _apply(model, vit_vars, tokens[:, :12], method=lambda m, t: m.encoder(t, train=False))
  assert encoded.shape == (2, 12, 96)


def test_posemb_sincos_2d():
  pe = vit_lib.posemb_sincos_2d(3, 4, 16)
  assert pe.shape == (1, 12, 16)
  # Position (0, 0): sin terms 0, cos terms 1.
  np.testing.assert_allclose(pe[0, 0], np.tile(np.repeat([0., 1.], 4), 2), atol=1e-7)
  # Rows differ only in the first half, columns only in the second.
  np.testing.assert_allclose(pe[0, 1, :8], pe[0, 0, :8])
  np.testing.assert_allclose(pe[0, 4, 8:], pe[0, 0, 8:])


def test_create_errors():
  with pytest.raises(UserError, match='vit_s16'):
    models.create('vit_xxl')
  with pytest.raises(UserError, match='num_classes'):
    models.create('resnet18', num_clases=10)
  model = models.create('vit_s16', num_classes=10, dtype=jnp.bfloat16, attention='cudnn')
  assert (model.num_classes, model.dtype, model.attention) == (10, jnp.bfloat16, 'cudnn')


# --- activation checkpointing (remat) --------------------------------------------------------

def _loss_and_grads(model, variables, *args):
  """Train-mode loss (dropout and stochastic depth on, fixed rng) and its parameter gradients,
  with the intermediates the distillation taps read."""
  def loss(params):
    out, state = model.apply({**variables, 'params': params}, *args, train=True,
                             rngs={'dropout': jax.random.key(3)}, mutable=['intermediates'])
    return jnp.mean(out**2), state['intermediates']
  (value, taps), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, grads, taps


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_changes_memory_not_results(remat):
  """Recomputed blocks give the same loss, gradients and tapped intermediates (block outputs,
  attention maps) as stored ones, dropout and stochastic depth included; the parameter tree
  is the same, so checkpoints move between the settings."""
  kwargs = dict(depth=2, dropout=0.1, drop_path=0.2, head_zero_init=False)
  x = _images()
  plain = models.create('vit_nano_p4', **kwargs)
  checkpointed = models.create('vit_nano_p4', remat=remat, **kwargs)
  variables = _init(plain, x, jit=True)
  assert jax.tree.structure(_init(checkpointed, x, jit=True)) == jax.tree.structure(variables)
  ref, got = (_loss_and_grads(m, variables, x) for m in (plain, checkpointed))
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  assert len(models.attention_maps(got[2])) == 2


def test_remat_in_mae_encoder_and_decoder():
  x = _images(size=16)
  mask = masking.mae_mask(jax.random.key(5), 2, 16, 0.75)
  plain = create_mim('mae', 'vit_nano_p4', depth=2, decoder_width=32, decoder_depth=1,
                            decoder_heads=2)
  checkpointed = plain.clone(remat='full')
  variables = jax.jit(plain.init)(jax.random.key(0, impl='rbg'), x, mask)
  ref, got = (_loss_and_grads(m, variables, x, mask) for m in (plain, checkpointed))
  for a, b in zip(jax.tree.leaves(ref[:2]), jax.tree.leaves(got[:2])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # create_mim copies the field from a ViT config like the other encoder fields.
  assert create_mim('simmim', 'vit_nano_p4', remat='dots').remat == 'dots'


def test_remat_rejects_unknown_policies_and_models_without_it():
  with pytest.raises(UserError, match='unknown remat'):
    jax.eval_shape(lambda: _init(models.create('vit_nano_p4', remat='some'), _images()))
  with pytest.raises(UserError, match='remat'):
    models.create('resnet8_s', remat='full')


# --- options that public checkpoints need (jkd import; parity in tests/test_import.py) --------

def test_sincos_tables_are_jkds_maes_and_big_visions():
  jkd_t = vit_lib.posemb_sincos_2d(3, 4, 16)
  mae = vit_lib.posemb_sincos_2d(3, 4, 16, table='sincos2d_mae')
  bv = vit_lib.posemb_sincos_2d(3, 4, 16, table='sincos2d_bv')
  # big_vision's is jkd's with the halves swapped (columns first); MAE's has other frequencies.
  np.testing.assert_array_equal(bv[..., :8], jkd_t[..., 8:])
  np.testing.assert_array_equal(bv[..., 8:], jkd_t[..., :8])
  # MAE (util/pos_embed.py): omega_k = 1 / 10000^(k / (D/4)), columns (x) first, [sin, cos].
  y, x = np.mgrid[:3, :4]
  omega = 1. / 10000**(np.arange(4) / 4.)
  ex = np.concatenate([np.sin(np.outer(x.ravel(), omega)), np.cos(np.outer(x.ravel(), omega)),
                       np.sin(np.outer(y.ravel(), omega)), np.cos(np.outer(y.ravel(), omega))], 1)
  np.testing.assert_allclose(mae[0], ex, atol=1e-6)
  assert not np.allclose(mae, jkd_t, atol=1e-2)


def test_class_token_with_avg_pool_fc_norm_layer_scale_and_relative_position_bias():
  model = models.create('vit_nano_p4', depth=2, pool='gap', class_token=True, fc_norm=True,
                        layer_scale=0.1, rel_pos_bias='block', posemb='none')
  variables, out = _abstract(model, 28, batch=2)
  p = nn.meta.unbox(variables['params'])
  assert 'cls' in p and 'fc_norm' in p and 'encoder_norm' not in p['encoder']
  assert 'pos_embedding' not in p and out.shape == (2, 10)
  block = p['encoder']['block0']
  assert block['ls1'].shape == (96,) and block['ls2'].shape == (96,)
  # (2*7 - 1)^2 + 3 relative offsets (with the class token) by 3 heads.
  assert block['rel_pos_bias']['relative_position_bias_table'].shape == (172, 3)
  shared = models.create('vit_nano_p4', depth=2, pool='token', rel_pos_bias='shared')
  variables, _ = _abstract(shared, 28, batch=2)
  table = nn.meta.unbox(variables['params'])['encoder']['rel_pos_bias']
  assert table['relative_position_bias_table'].shape == (172, 3)
  for bad in (dict(pool='token', class_token=False), dict(posemb='sincos3d'),
              dict(rel_pos_bias='block', distill_token=True, pool='token'),
              dict(rel_pos_bias='global')):
    with pytest.raises(UserError):
      _abstract(models.create('vit_nano_p4', depth=1, **bad), 28, batch=1)


def test_relative_position_index_is_beits():
  """Index of microsoft/unilm beit (as SimMIM's vision_transformer.py) for a 2x2 grid."""
  index = vit_lib.relative_position_index((2, 2))
  assert index.shape == (5, 5)
  size = 3 * 3 + 3
  assert (index[0, 1:] == size - 3).all() and (index[1:, 0] == size - 2).all()
  assert index[0, 0] == size - 1
  # Patch (0, 0) -> (1, 1) is offset (-1, -1): row (-1 + 1) * 3 + (-1 + 1) = 0; the reverse 8.
  assert index[1, 4] == 0 and index[4, 1] == 8 and index[1, 1] == 4
