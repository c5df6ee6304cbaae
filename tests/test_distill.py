"""`jkd distill`: every loss kind runs a few steps from a real (tiny) teacher, the teacher never
changes, the student's loss falls; multi-term configs and bad configs."""
import json
import os

import jax
import numpy as np
import pytest

from jkd.checkpoint import load_arrays
from jkd.config import load_config
from jkd.errors import UserError
from jkd.trainers import distill, supervised

from conftest import REPO, SUPERVISED, read_jsonl

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  w = str(tmp_path_factory.mktemp('teacher'))
  config = load_config(SUPERVISED + ':tiny', ['model.name=resnet20_s', 'total_steps=30',
                                              'log_every=10'])
  supervised.train(config, w)
  return w


def _losses(workdir):
  return [l['loss'] for l in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in l and 'split' not in l]


@pytest.mark.parametrize('recipe', ['kd', 'dkd', 'dist', 'kd_logit_std', 'fitnet', 'at', 'rkd'])
def test_each_recipe_trains_and_teacher_is_frozen(teacher, tmp_path, recipe):
  before, _ = load_arrays(teacher)
  config = load_config(f'{DISTILL}:tiny-{recipe}', [f'teacher.workdir={teacher}',
                                                    'total_steps=16'])
  w = str(tmp_path / recipe)
  summary = distill.train(config, w)
  losses = _losses(w)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  assert 0 <= summary['test_accuracy'] <= 1
  assert 0 <= summary['eval']['teacher_accuracy'] <= 1 and 'agreement' in summary['eval']
  # Per-term metrics are logged.
  first = read_jsonl(os.path.join(w, 'metrics.jsonl'))[0]
  assert any(k.startswith('loss_') for k in first), first
  after, _ = load_arrays(teacher)
  for a, b in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params'])):
    np.testing.assert_array_equal(a, b)
  # The teacher is referenced, not stored: the student checkpoint holds student + projectors.
  saved, meta = load_arrays(w)
  assert set(saved['params']) <= {'student', 'projectors'}
  assert meta['params_prefix'] == ['student']


def test_teacher_variables_unchanged_through_steps(teacher):
  """The step takes the teacher as an argument and never donates or updates it."""
  # Student stage2 (14x14x32) -> teacher stage3 (7x7x64): a projector and pooling are needed.
  config = load_config(f'{DISTILL}:tiny-fitnet', [f'teacher.workdir={teacher}',
                                                  'losses.fitnet.teacher=stage3'])
  task = distill.build_task(config, '/tmp/unused')
  from jkd import loop, parallel
  mesh = parallel.make_mesh({'data': 1})
  state, shardings = loop.init_sharded(task.init_state, jax.random.key(0), mesh)
  (teacher_vars,), (t_sh,) = task.place_extra_args(mesh)
  snapshot = jax.device_get(teacher_vars)
  step = jax.jit(task.train_step, donate_argnums=(0,))
  for _ in range(3):
    batch = parallel.global_batch(next(task.train_iterator), mesh)
    state, _ = step(state, batch, jax.random.key(1), teacher_vars)
  for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(jax.device_get(teacher_vars))):
    np.testing.assert_array_equal(a, b)
  assert 'projectors' in state.params and state.params['projectors']  # widths differ


def test_distilled_student_can_seed_a_next_stage(teacher, tmp_path):
  """Two stages: teacher -> assistant (resnet20_s) -> student (resnet8_s)."""
  ta = str(tmp_path / 'ta')
  distill.train(load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}',
                                                'model.name=resnet20_s']), ta)
  st = str(tmp_path / 'st')
  summary = distill.train(load_config(f'{DISTILL}:tiny', [f'teacher.workdir={ta}']), st)
  assert summary['teacher']['model'] == 'resnet20_s' and summary['steps'] == 12


def test_bad_loss_configs_are_user_errors(teacher, tmp_path):
  for overrides, words in ((['losses.kd.temprature=2'], 'Unknown config key'),
                           (['teacher.workdir='], 'No teacher'),
                           (['teacher.workdir=/nonexistent'], 'not a jkd workdir')):
    with pytest.raises(UserError, match=words):
      config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}', *overrides])
      distill.build_task(config, str(tmp_path))
  config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}'])
  config.losses = {'kd': {'kind': 'kd', 'temprature': 2.0}}
  with pytest.raises(UserError, match='unknown options'):
    distill.build_task(config, str(tmp_path))
