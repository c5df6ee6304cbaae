"""Several teachers (`config.teachers`, jkd/teachers.py): averaged and separate terms, each
teacher frozen, per-teacher logs and accuracies, resume, the cache of an averaged ensemble, and
the checks of bad teacher lists."""
import functools
import os

import jax
import numpy as np
import pytest

from jkd import teachers
from jkd.checkpoint import load_arrays
from jkd.config import load_config
from jkd.errors import UserError
from jkd import trainers
from jkd.trainers import teacher_cache

from conftest import REPO, assert_resume_is_bit_exact, read_jsonl

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')
COMPRESS = os.path.join(REPO, 'configs', 'fashion_mnist', 'compress.py')


def _multi(tiny_teachers, recipe='tiny-multi', extra=()):
  return load_config(f'{DISTILL}:{recipe}', [
      f'teachers.resnet.workdir={tiny_teachers["resnet"]}',
      f'teachers.vit.workdir={tiny_teachers["vit"]}', *extra])


def _train_losses(workdir):
  return [l for l in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'split' not in l]


def test_averaged_teachers_train_and_stay_frozen(tiny_teachers, tmp_path):
  before = {n: load_arrays(w)[0]['params'] for n, w in tiny_teachers.items()}
  w = str(tmp_path / 'multi')
  summary = trainers.train('distill', _multi(tiny_teachers, extra=['total_steps=16']), w)
  lines = _train_losses(w)
  assert lines[-1]['loss'] < lines[0]['loss'] and np.isfinite([l['loss'] for l in lines]).all()
  assert {'loss_ce', 'loss_kd'} <= set(lines[0])  # one averaged kd term
  ev = summary['eval']
  for key in ('teacher_accuracy', 'teacher_accuracy_resnet', 'teacher_accuracy_vit',
              'agreement'):
    assert 0 <= ev[key] <= 1, ev
  assert summary['teacher']['model'] == 'resnet20_s+vit_micro_p7'
  assert summary['teacher']['teachers']['vit']['weight'] == 0.5
  for name, w_t in tiny_teachers.items():
    after = load_arrays(w_t)[0]['params']
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after)):
      np.testing.assert_array_equal(a, b)
  saved, _ = load_arrays(w)
  assert set(saved['params']) == {'student', 'projectors'}


def test_combined_logits_are_the_weighted_mean(tiny_teachers):
  config = _multi(tiny_teachers, extra=['teachers.vit.weight=3.0'])
  ens = teachers.from_config(config, 10, (28, 28, 1))
  assert ens.names == ('resnet', 'vit') and ens.weights == (0.25, 0.75)
  x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
  members, _ = ens.apply_members(ens.variables, x)
  combined, _ = ens.apply(ens.variables, x)
  np.testing.assert_allclose(combined, 0.25 * members['resnet'] + 0.75 * members['vit'],
                             rtol=1e-6, atol=1e-6)
  single, _ = ens.members[1].apply(ens.members[1].variables, x)
  np.testing.assert_allclose(members['vit'], single, rtol=1e-6)


def test_separate_terms_per_teacher_with_their_own_taps(tiny_teachers, tmp_path):
  """combine='separate': every teacher term (logits and features) once per teacher, the ViT's
  tap named per teacher; resuming gives the same arrays as an uninterrupted run."""
  config = _multi(tiny_teachers, extra=[
      'teacher.combine=separate',
      "losses={'ce': {'weight': 0.1}, 'kd': {'weight': 0.9}, 'fitnet': {'weight': 1.0, "
      "'student': 'pre_logits', 'teacher': 'pre_logits', 'projector': 'always'}, "
      "'rkd': {'weight': 1.0, 'student': 'stage3', 'teacher': 'stage3'}}",
      "teachers.vit.taps={'rkd': 'block3'}"])
  w = str(tmp_path / 'separate')
  assert_resume_is_bit_exact(functools.partial(trainers.train, 'distill'), config, w)
  first = _train_losses(w)[0]
  for key in ('loss_kd', 'loss_kd_resnet', 'loss_kd_vit', 'loss_fitnet', 'loss_fitnet_resnet',
              'loss_fitnet_vit', 'loss_rkd_vit'):
    assert key in first, sorted(first)
  np.testing.assert_allclose(first['loss_kd'],
                             0.5 * first['loss_kd_resnet'] + 0.5 * first['loss_kd_vit'],
                             rtol=1e-5)
  saved, _ = load_arrays(w)
  assert set(saved['params']['projectors']) == {'fitnet_resnet', 'fitnet_vit'}  # one each


def test_an_averaged_ensemble_is_cached_and_taught_in_compress(tiny_teachers, tmp_path):
  """The teacher cache holds the ensemble's combined logits; `jkd compress` KD reads them."""
  cache = str(tmp_path / 'cache')
  config = _multi(tiny_teachers, extra=['total_steps=4', f'teacher.cache.dir={cache}',
                                       'teacher.cache.dtype=float32'])
  manifest = teacher_cache.ensure(config)
  members = manifest['identity']['teacher']['members']
  assert [m['name'] for m in members] == ['resnet', 'vit']
  summary = trainers.train('distill', config, str(tmp_path / 'cached'))
  assert summary['steps'] == 4
  separate = _multi(tiny_teachers, extra=['teacher.combine=separate',
                                         f'teacher.cache.dir={cache}'])
  with pytest.raises(UserError, match='separate'):
    teacher_cache.ensure(separate)
  qat = load_config(f'{COMPRESS}:tiny-qat_kd', [
      f'init_from={tiny_teachers["resnet"]}', 'model.name=resnet20_s', 'total_steps=2',
      "teachers={'resnet': {'workdir': '%s'}, 'vit': {'workdir': '%s'}}" % (
          tiny_teachers['resnet'], tiny_teachers['vit'])])
  assert trainers.train('compress', qat, str(tmp_path / 'qat'))['steps'] == 2


@pytest.mark.parametrize('extra, words', [
    (['teacher.workdir=/x'], 'Both config.teacher.workdir and config.teachers'),
    (['teachers.vit.workdir='], 'teachers.vit.workdir is empty'),
    (['teachers.vit.weight=0.0'], 'must be positive'),
    (['teacher.combine=median'], 'combine'),
    (["teachers.vit.taps={'fitnet': 'block0'}", "teachers.vit.ema=true"], 'no EMA'),
])
def test_bad_teacher_lists_are_user_errors(tiny_teachers, extra, words):
  with pytest.raises(UserError, match=words):
    teachers.from_config(_multi(tiny_teachers, extra=extra), 10, (28, 28, 1))


def test_unknown_teacher_field_is_a_user_error(tiny_teachers):
  config = _multi(tiny_teachers)
  config.teachers.vit.temperature = 2.0
  with pytest.raises(UserError, match='unknown fields'):
    teachers.parse(config)
