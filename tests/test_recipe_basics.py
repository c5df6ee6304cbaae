"""DeiT / MAE recipe basics: EMA of the weights, gradient accumulation, the step schedule,
RandAugment, random erasing and repeated augmentation — deterministic, resumable, switchable."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jkd import data
from jkd.config import load_config
from jkd.data import randaugment as R
from jkd.errors import UserError
from jkd.optim import default_optim_config, make_optimizer
from jkd import trainers
from jkd.trainers import ema

from conftest import REPO, SUPERVISED, assert_resume_is_bit_exact

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')


# --- RandAugment and random erasing -----------------------------------------------------------
def test_colour_ops_match_pil_within_one_level():
  from PIL import Image, ImageEnhance, ImageOps
  rng = np.random.default_rng(0)
  x = rng.integers(20, 220, (16, 16, 3)).astype(np.uint8)
  x[:3] = rng.integers(0, 256, (3, 16, 3))
  img, m = Image.fromarray(x), 6.0
  factor = 1 + 0.9 * m / 10
  want = {'AutoContrast': ImageOps.autocontrast(img), 'Equalize': ImageOps.equalize(img),
          'Invert': ImageOps.invert(img), 'Posterize': ImageOps.posterize(img, 2),
          'Solarize': ImageOps.solarize(img, 256 - int(256 * m / 10)),
          'Color': ImageEnhance.Color(img).enhance(factor),
          'Contrast': ImageEnhance.Contrast(img).enhance(factor),
          'Brightness': ImageEnhance.Brightness(img).enhance(factor),
          'Sharpness': ImageEnhance.Sharpness(img).enhance(factor)}
  apply = jax.jit(R.apply_op)
  for name, ref in want.items():
    got = np.asarray(apply(R.OPS.index(name), jnp.asarray(x, jnp.float32), m, 1.0))
    assert np.abs(got - np.asarray(ref, np.float32)).max() <= 1, name


def test_rand_augment_and_erasing_are_functions_of_the_key():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.integers(0, 256, (4, 12, 12, 1)), jnp.uint8)
  f = jax.jit(lambda k, x: R.rand_augment(k, x, num_ops=2, magnitude=9.0))
  a, b, c = f(jax.random.key(0), x), f(jax.random.key(0), x), f(jax.random.key(1), x)
  assert a.dtype == jnp.uint8 and a.shape == x.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert R.rand_augment(jax.random.key(0), x, num_ops=0) is x
  z = jnp.zeros((400, 12, 12, 2))
  erased = R.random_erasing(jax.random.key(2), z, prob=0.5)
  np.testing.assert_array_equal(erased, R.random_erasing(jax.random.key(2), z, prob=0.5))
  hit = np.asarray((erased != 0).any(axis=(1, 2, 3)))
  assert 0.4 < hit.mean() < 0.6
  frac = np.asarray((erased != 0).any(-1).mean(axis=(1, 2)))[hit]
  assert 0.01 <= frac.min() and frac.max() <= 0.4  # area in [0.02, 1/3], boxes rounded
  assert R.random_erasing(jax.random.key(2), z, prob=0.0) is z


def test_augmentation_off_is_plain_normalisation_and_erasing_keeps_the_rest():
  from jkd.trainers import common
  cfg = data.default_data_config('cifar100')
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  x = jnp.asarray(np.random.default_rng(3).integers(0, 256, (6, 8, 8, 3)), jnp.uint8)
  key = jax.random.key(0)
  plain = data.normalize(x, mean, std)
  np.testing.assert_array_equal(
      common.augmented_images(x, key, mean, std, R.augment_settings(cfg), jnp.float32), plain)
  cfg.random_erasing = 1.0
  erased = common.augmented_images(x, key, mean, std, R.augment_settings(cfg), jnp.float32)
  kept = np.asarray(erased == plain).all(-1)
  assert 0.5 < kept.mean() < 1.0  # boxes of at most a third of each image were replaced


def test_repeated_augmentation_repeats_examples_in_the_same_batch():
  cfg = data.default_data_config('fashion_mnist')
  cfg.train_split, cfg.repeated_aug, cfg.num_workers = 'train[:96]', 3, 0
  it = data.make_train_iterator(cfg, global_batch_size=24, seed=0, with_index=True)
  batches = [next(it) for _ in range(4)]  # one epoch: 96 rows, 32 distinct examples
  index = np.concatenate([b['index'] for b in batches])
  assert len(set(index)) == 32 and (index.reshape(-1, 3) == index.reshape(-1, 3)[:, :1]).all()
  # Copies of an example get their own crop/flip draws.
  b = batches[0]
  assert not all(np.array_equal(b['image'][i], b['image'][i + 1]) for i in range(0, 24, 3))
  state = it.get_state()
  assert state['repeated_aug'] == 3
  again = data.make_train_iterator(cfg, global_batch_size=24, seed=0, with_index=True)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['index'], next(it)['index'])
  cfg.repeated_aug = 1
  plain = data.make_train_iterator(cfg, global_batch_size=24, seed=0)
  with pytest.raises(UserError, match='other settings'):
    plain.set_state(state)


# --- EMA, accumulation, schedule --------------------------------------------------------------
def test_ema_update_copies_first_then_averages_every_k_steps():
  avg = {'params': {'w': jnp.zeros(2)}}
  one = {'w': jnp.ones(2)}
  a0 = ema.update(avg, one, {}, jnp.int32(0), 0.9, every=2)
  np.testing.assert_allclose(a0['params']['w'], 1.0)            # first update: a copy
  a1 = ema.update(a0, {'w': jnp.full(2, 3.0)}, {}, jnp.int32(1), 0.9, every=2)
  np.testing.assert_allclose(a1['params']['w'], 0.9 * 1 + 0.1 * 3, rtol=1e-6)
  a2 = ema.update(a1, {'w': jnp.full(2, 5.0)}, {}, jnp.int32(2), 0.9, every=2)
  np.testing.assert_array_equal(a2['params']['w'], a1['params']['w'])  # mid-accumulation
  with pytest.raises(UserError, match='ema.decay'):
    ema.decay_of(ml_collections.ConfigDict({'ema': {'decay': 1.0}}))


def test_accumulation_is_one_update_of_the_mean_gradient():
  cfg = default_optim_config()
  cfg.name, cfg.schedule, cfg.lr, cfg.grad_clip, cfg.weight_decay = 'sgd', 'constant', 0.1, 0, 0
  cfg.momentum = 0.0
  cfg.accumulate_steps = 2
  tx2, _ = make_optimizer(cfg, 8, 100)
  cfg.accumulate_steps = 1
  tx1, _ = make_optimizer(cfg, 16, 100)
  p = {'w': jnp.ones(3)}
  g1, g2 = {'w': jnp.asarray([1.0, 2.0, 3.0])}, {'w': jnp.asarray([3.0, 0.0, -1.0])}
  s2 = tx2.init(p)
  u, s2 = tx2.update(g1, s2, p)
  np.testing.assert_array_equal(u['w'], 0.0)
  u, s2 = tx2.update(g2, s2, p)
  want, _ = tx1.update({'w': (g1['w'] + g2['w']) / 2}, tx1.init(p), p)
  np.testing.assert_allclose(u['w'], want['w'], rtol=1e-6)


def test_step_schedule_is_mdistillers():
  cfg = default_optim_config()
  cfg.schedule, cfg.lr, cfg.warmup_steps = 'step', 0.05, 0
  _, schedule = make_optimizer(cfg, 64, 240)
  got = [float(schedule(s)) for s in (0, 149, 150, 180, 239)]
  np.testing.assert_allclose(got, [0.05, 0.05, 0.005, 0.0005, 0.00005], rtol=1e-5)


# --- whole runs ---------------------------------------------------------------------------------
BASICS = ['ema.decay=0.9', 'optim.accumulate_steps=2', 'data.randaugment_ops=1',
          'data.random_erasing=0.25', 'data.repeated_aug=2']


def test_recipe_basics_train_resume_exactly_and_the_ema_teaches(tmp_path):
  w = str(tmp_path / 'sup')
  config = load_config(SUPERVISED + ':tiny', BASICS)
  saved = assert_resume_is_bit_exact(functools.partial(trainers.train, 'train'), config, w, steps=8)
  assert set(saved['model_state']['ema']) == {'params', 'batch_stats'}
  summary = json.load(open(os.path.join(w, 'summary.json')))
  assert 0 <= summary['eval']['ema_accuracy'] <= 1
  # The EMA as the teacher (self-distillation): its accuracy is the one the run reported.
  kd = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={w}', 'teacher.ema=true',
                                       'total_steps=2', *BASICS[:1]])
  result = trainers.train('distill', kd, str(tmp_path / 'kd'))
  assert result['eval']['teacher_accuracy'] == summary['eval']['ema_accuracy']
  assert result['teacher']['ema'] is True and 'ema_accuracy' in result['eval']
