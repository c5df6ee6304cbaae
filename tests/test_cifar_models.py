"""The CIFAR-100 zoo of the distillation tables (jkd/models/cifar.py): mdistiller's parameter
counts, the taps ReviewKD/CRD/OFA read, training steps, and a distillation between two of them."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd import models
from jkd.config import load_config
from jkd.models import cifar
from jkd import trainers

from conftest import REPO, SUPERVISED

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')

# Parameter counts at 100 classes, computed layer by layer from mdistiller's definitions; the
# CRD / DKD papers print them rounded (1.23 M, 7.43 M, 0.70 M, 2.26 M, 3.96 M, 9.46 M, 0.81 M,
# 1.36 M).
PARAMS = {'resnet8x4': 1_233_540, 'resnet32x4': 7_433_860, 'wrn_16_2': 703_284,
          'wrn_40_2': 2_255_156, 'vgg8': 3_965_028, 'vgg13': 9_462_180,
          'mobilenetv2': 812_836, 'shufflenetv2': 1_355_528, 'resnet56': 861_620,
          'resnet20': 278_324, 'resnet110': 1_736_564, 'resnet32': 472_756,
          'wrn_40_1': 569_780}
STAGE3 = {'resnet8x4': (8, 8, 256), 'resnet32x4': (8, 8, 256), 'wrn_16_2': (8, 8, 128),
          'wrn_40_2': (8, 8, 128), 'vgg8': (4, 4, 512), 'vgg13': (4, 4, 512),
          'mobilenetv2': (4, 4, 48), 'shufflenetv2': (4, 4, 464)}


def _abstract(name, size=32, channels=3, **kw):
  model = models.create(name, **kw)
  x = jnp.zeros((2, size, size, channels))
  variables = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
  out, inter = jax.eval_shape(lambda v: model.apply(v, x, mutable=['intermediates']), variables)
  return variables, out, {k: v[0].shape for k, v in inter['intermediates'].items()}


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts_match_mdistiller(name):
  variables, out, taps = _abstract(name)
  assert models.param_count(variables['params']) == PARAMS[name]
  assert out.shape == (2, 100) and taps['pre_logits'][0] == 2
  assert {'stem', 'stage1', 'stage2', 'stage3', 'pre_logits'} <= set(taps)


@pytest.mark.parametrize('name', sorted(STAGE3))
def test_taps_at_32_and_28_pixels(name):
  _, _, taps = _abstract(name)
  assert taps['stage3'][1:] == STAGE3[name]
  if name != 'mobilenetv2':  # mdistiller's MobileNetV2 has no pre-activation features
    assert taps['stage3_preact'] == taps['stage3']
  _, out, taps28 = _abstract(name, size=28, channels=1, num_classes=10)  # Fashion-MNIST
  assert out.shape == (2, 10) and taps28['pre_logits'] == taps['pre_logits']


def test_channel_shuffle_is_torchs_reshape_permute():
  x = np.arange(2 * 1 * 1 * 6).reshape(2, 1, 1, 6)
  nchw = x.transpose(0, 3, 1, 2)  # torch: (N, g, C/g, H, W) -> permute(0, 2, 1, 3, 4)
  want = nchw.reshape(2, 2, 3, 1, 1).transpose(0, 2, 1, 3, 4).reshape(2, 6, 1, 1)
  np.testing.assert_array_equal(cifar.channel_shuffle(jnp.asarray(x)),
                                want.transpose(0, 2, 3, 1))


# The others train in the whole runs below (wrn_16_2, resnet8x4, resnet20).
@pytest.mark.parametrize('name', ['vgg8', 'mobilenetv2', 'shufflenetv2'])
def test_students_fit_a_batch(name):
  """A few SGD steps on one batch lower the loss and update the BatchNorm statistics."""
  model = models.create(name, num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 8))
  variables = model.init(jax.random.key(0), x)
  params, stats = variables['params'], variables['batch_stats']
  tx = optax.sgd(0.05, momentum=0.9)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(p):
      logits, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                                mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new['batch_stats'], opt, loss
  losses = []
  for _ in range(6):
    params, new_stats, opt, loss = step(params, stats, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats),
                                                  jax.tree.leaves(new_stats)))


def test_train_and_distill_between_zoo_models(tmp_path):
  """`jkd train` of a wrn_16_2 teacher on Fashion-MNIST, then KD into a resnet8x4 student with
  a FitNet term on mdistiller's pre-activation tap."""
  teacher = str(tmp_path / 'teacher')
  trainers.train('train', load_config(SUPERVISED + ':tiny', ['model.name=wrn_16_2', 'total_steps=4']),
                   teacher)
  config = load_config(f'{DISTILL}:tiny-fitnet', [
      f'teacher.workdir={teacher}', 'model.name=resnet8x4', 'total_steps=4',
      'losses.fitnet.teacher=stage2_preact'])
  summary = trainers.train('distill', config, str(tmp_path / 'student'))
  assert summary['steps'] == 4 and summary['model'] == 'resnet8x4'
  assert summary['teacher']['model'] == 'wrn_16_2'


CIFAR100 = os.path.join(REPO, 'configs', 'cifar100')


def test_cifar100_configs_are_mdistillers_recipes():
  from importlib import util
  spec = util.spec_from_file_location('c100_distill', os.path.join(CIFAR100, 'distill.py'))
  module = util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for method in module.METHODS:
    for pair, (teacher, student, _) in module.PAIRS.items():
      c = load_config(os.path.join(CIFAR100, 'distill.py') + f':{method}-{pair}')
      assert c.model.name == student and c.pair.teacher == teacher
      assert (c.num_epochs, c.batch_size, c.optim.name, c.optim.schedule) == (240.0, 64, 'sgd',
                                                                              'step')
      assert c.optim.lr == (0.01 if student in ('mobilenetv2', 'shufflenetv2') else 0.05)
      models.create(teacher)  # every teacher and student is in the zoo
  c = load_config(os.path.join(CIFAR100, 'train.py') + ':wrn_40_2')
  assert c.data.name == 'cifar100' and c.optim.weight_decay == 5e-4


def test_cifar100_tiny_teacher_and_reviewkd_student(tmp_path):
  """A few steps of a zoo teacher and of ReviewKD on its pre-activation maps (synthetic data
  of CIFAR-100's shape: the test needs no download)."""
  teacher = str(tmp_path / 'teacher')
  trainers.train('train', load_config(os.path.join(CIFAR100, 'train.py') + ':tiny-resnet20'), teacher)
  summary = trainers.train('distill', load_config(os.path.join(CIFAR100, 'distill.py') + ':tiny-reviewkd',
                                      [f'teacher.workdir={teacher}']), str(tmp_path / 'kd'))
  assert summary['steps'] == 4 and summary['model'] == 'resnet8x4'
