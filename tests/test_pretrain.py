"""MIM pretraining: model shapes, MAE's visible-only encoder, masked-only losses, and a short
SimMIM / MAE run on real Fashion-MNIST followed by fine-tuning from its workdir."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import masking, models
from jkd.checkpoint import load_arrays
from jkd.config import load_config
from jkd.errors import UserError
from jkd.models.mim import MAE, SimMIM, create_mim
from jkd.optim import layerwise_lr_scales
from jkd import trainers
from jkd.trainers import common, pretrain, supervised

from conftest import REPO, read_jsonl

CONFIGS = os.path.join(REPO, 'configs', 'fashion_mnist')
# Smaller than the ':tiny' configs' encoder so the whole file compiles quickly on 2 cores.
SMALL = dict(width=32, depth=2, num_heads=2)
KEY = jax.random.key(0)


def _images(b=2):
  return jax.random.normal(KEY, (b, 28, 28, 1))


def _mae(**kw):
  return create_mim('mae', 'vit_nano_p4', channels=1, decoder_width=16, decoder_depth=1,
                    decoder_heads=2, **SMALL, **kw)


def test_create_mim_copies_the_encoder_fields():
  m = create_mim('mae', 'vit_b16')
  assert isinstance(m, MAE) and (m.width, m.depth, m.num_heads, m.patch_size) == (768, 12, 12, 16)
  assert (m.decoder_width, m.decoder_depth) == (512, 8)
  s = create_mim('simmim', 'vit_mini_p4', num_classes=10, drop_path=0.1)
  assert isinstance(s, SimMIM) and s.width == 192 and s.drop_path == 0.1
  with pytest.raises(UserError):
    create_mim('simmim', 'resnet18')
  with pytest.raises(UserError):
    create_mim('mae', 'vit_nano_p4', decoder_wdth=3)


def test_simmim_shapes_and_masked_only_loss():
  model = create_mim('simmim', 'vit_nano_p4', channels=1, **SMALL)
  x = _images()
  mask = masking.simmim_mask(KEY, 2, 28, 4, 4, 0.6)
  variables = model.init(KEY, x, mask)
  pred = model.apply(variables, x, mask)
  assert pred.shape == (2, 28, 28, 1) and pred.dtype == jnp.float32
  obj = pretrain.MimObjective(model, load_config(os.path.join(CONFIGS, 'simmim.py')), 28)
  loss = obj.loss(pred, x, mask)
  pixel = masking.upsample_mask(mask, 4)[..., None]
  perturbed = pred + 100.0 * (1 - pixel)  # Change only the visible pixels.
  np.testing.assert_allclose(obj.loss(perturbed, x, mask), loss, rtol=1e-6)
  assert float(obj.loss(pred + pixel, x, mask)) != pytest.approx(float(loss))


def test_mae_encoder_sees_only_kept_tokens_and_loss_is_masked_only():
  model = _mae()
  x = _images()
  m = masking.mae_mask(KEY, 2, 49, 0.75)
  variables = model.init(KEY, x, m)
  pred, state = model.apply(variables, x, m, mutable=['intermediates'])
  assert pred.shape == (2, 49, 16) and pred.dtype == jnp.float32
  inter = state['intermediates']
  assert inter['encoder']['block0']['out'][0].shape == (2, 12, 32)  # int(49 * 0.25) = 12
  assert inter['decoder']['blocks']['block0']['out'][0].shape == (2, 49, 16)
  obj = pretrain.MimObjective(model, load_config(os.path.join(CONFIGS, 'mae.py')), 28)
  loss = obj.loss(pred, x, m)
  perturbed = pred + 100.0 * (1 - m.mask)[..., None]
  np.testing.assert_allclose(obj.loss(perturbed, x, m), loss, rtol=1e-6)
  # MAE's defining property: the encoder output does not depend on the removed patches.
  removed = masking.upsample_mask(m.mask.reshape(2, 7, 7), 4)[..., None]
  changed = model.apply(variables, x + 50.0 * removed, m, mutable=['intermediates'])[1]
  np.testing.assert_allclose(changed['intermediates']['encoder']['block0']['out'][0],
                             inter['encoder']['block0']['out'][0], atol=1e-5)


def test_mae_token_padding_for_cudnn_changes_nothing():
  model = _mae()
  x = _images()
  m = masking.mae_mask(KEY, 2, 49, 0.75)
  variables = model.init(KEY, x, m)
  np.testing.assert_allclose(model.clone(pad_tokens_to=8).apply(variables, x, m),
                             model.apply(variables, x, m), atol=1e-5)


def test_layerwise_lr_scales():
  vit = models.create('vit_nano_p4', **SMALL, posemb='sincos2d')
  params = nn.unbox(vit.init(KEY, _images(1))['params'])
  s = layerwise_lr_scales(params, 0.5)
  assert s['head']['kernel'] == 1.0 and s['encoder']['encoder_norm']['scale'] == 1.0
  assert s['encoder']['block1']['mlp']['fc1']['kernel'] == 0.5
  assert s['encoder']['block0']['ln1']['scale'] == 0.25
  assert s['patch_embed']['proj']['kernel'] == 0.125


def _metrics(workdir):
  lines = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [l for l in lines if 'loss' in l and 'split' not in l], [l for l in lines if 'split' in l]


@pytest.mark.parametrize('method', ['mae', 'simmim'])
def test_pretrain_then_finetune(tmp_path, method):
  pre = str(tmp_path / 'pre')
  config = load_config(os.path.join(CONFIGS, f'{method}.py:tiny'))
  config.model.update(SMALL)
  summary = trainers.train('pretrain', config, pre)
  train_lines, eval_lines = _metrics(pre)
  assert summary['steps'] == 30 and summary['kind'] == 'pretrain'
  assert train_lines[-1]['loss'] < 0.9 * train_lines[0]['loss'], train_lines
  assert {'lr', 'grad_norm'} <= set(train_lines[-1])
  assert np.isfinite(summary['eval_loss']) and summary['eval_loss'] == eval_lines[-1]['loss']
  with open(os.path.join(pre, 'reconstructions.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'

  # The fine-tune ViT classifier starts from the pretrained encoder (fresh head).
  ft_dir = str(tmp_path / 'ft')
  ft_config = load_config(os.path.join(CONFIGS, 'finetune.py:tiny'), [f'init_from={pre}'])
  ft_config.model.update(SMALL)
  task = supervised.build_task(ft_config, ft_dir)
  loaded = task.on_init(nn.unbox(task.init_state(KEY)))
  arrays, _ = load_arrays(pre)
  for name in ('patch_embed', 'encoder'):
    want = jax.tree_util.tree_leaves_with_path(arrays['params'][name])
    got = jax.tree.leaves(loaded.params[name])
    assert len(want) == len(got) > 0
    for (path, a), b in zip(want, got):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f'{name}{path}')
  if method == 'mae':  # One short fine-tuning run is enough to cover the path (compiles are slow).
    ft = trainers.train('train', ft_config, ft_dir)
    assert ft['steps'] == 6 and 0.0 <= ft['test_accuracy'] <= 1.0


def test_imagenet_configs_follow_the_papers():
  from jkd.optim import peak_lr
  mae = load_config(os.path.join(REPO, 'configs', 'imagenet', 'mae_vit_b16.py'))
  assert (mae.method, mae.data.name, mae.mask_ratio, mae.norm_pix_loss) == (
      'mae', 'imagenet2012', 0.75, True)
  assert peak_lr(mae.optim, mae.batch_size) == pytest.approx(1.5e-4 * 4096 / 256)
  assert (mae.optim.b2, mae.model.decoder_width, mae.model.decoder_depth) == (0.95, 512, 8)
  sim = load_config(os.path.join(REPO, 'configs', 'imagenet', 'simmim_vit_b16.py'))
  assert (sim.method, sim.data.image_size, sim.mask_patch_size, sim.mask_ratio) == (
      'simmim', 192, 32, 0.6)
  assert peak_lr(sim.optim, sim.batch_size) == pytest.approx(8e-4 * 2048 / 512)
  # The model and masks fit together at the papers' sizes (shapes only, nothing computed).
  for config, size in ((mae, 224), (sim, 192)):
    model = common.create_mim_model(config.method, config.model, 3).clone(attention='xla',
                                                                         dtype=jnp.float32)
    objective = pretrain.MimObjective(model, config, size)
    mask = objective.draw_mask(KEY, 1)
    x = jnp.zeros((1, size, size, 3))
    out = jax.eval_shape(lambda: model.apply(model.init(KEY, x, mask), x, mask))
    assert out.shape == ((1, 196, 768) if config.method == 'mae' else (1, size, size, 3))
