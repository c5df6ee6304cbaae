"""CRD, ReviewKD, OFA-KD and teacher-free KD in `jkd distill` (jkd/trainers/distill_heads.py):
each trains (loss falls), keeps the teacher frozen, resumes bit-exactly (CRD's memory banks
included), drops its heads and state from the saved student; OFA across architectures."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from jkd.checkpoint import load_arrays, load_model
from jkd.config import load_config
from jkd.evaluate import evaluate_workdir
from jkd import trainers
from jkd.trainers import distill, distill_heads

from conftest import REPO, SUPERVISED, assert_resume_is_bit_exact, read_jsonl

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')


def _losses(workdir):
  return [l['loss'] for l in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in l and 'split' not in l]


@pytest.mark.parametrize('recipe, heads', [('crd', True), ('reviewkd', True), ('ofa', True),
                                           ('tfkd', False)])
def test_recipe_trains_resumes_exactly_and_keeps_the_teacher(tiny_teachers, tmp_path, recipe,
                                                             heads):
  teacher = tiny_teachers['resnet']
  before, _ = load_arrays(teacher)
  overrides = [] if recipe == 'tfkd' else [f'teacher.workdir={teacher}']
  # ReviewKD's warmup would hide the term in 8 steps; CRD with fewer negatives (a fast test).
  extra = {'reviewkd': ['losses.reviewkd.warmup_steps=0'],
           'crd': ['losses.crd.nce_k=256']}.get(recipe, [])
  config = load_config(f'{DISTILL}:tiny-{recipe}', overrides + extra + ['optim.warmup_steps=0'])
  w = str(tmp_path / recipe)
  saved = assert_resume_is_bit_exact(functools.partial(trainers.train, 'distill'), config, w, steps=8)
  losses_ = _losses(w)[:8]
  assert np.isfinite(losses_).all() and losses_[-1] < losses_[0], losses_
  assert (distill_heads.HEADS in saved['params']) == heads
  after, _ = load_arrays(teacher)
  for a, b in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params'])):
    np.testing.assert_array_equal(a, b)
  # The kept model is the student alone: heads, projectors and the banks stay behind.
  student = load_model(w)
  assert 'distill' not in student.model_state and 'heads' not in student.params
  assert 0 <= evaluate_workdir(w)['accuracy'] <= 1
  if recipe == 'crd':
    state = saved['model_state']['distill']['crd']
    assert state['student_bank'].shape == (512, 128) and (state['z'] > 0).all()
    norms = np.linalg.norm(state['student_bank'], axis=1)
    assert np.isclose(norms, 1.0, atol=1e-5).sum() >= 32  # rows of seen examples: unit norm
  if recipe == 'tfkd':
    summary = json.load(open(os.path.join(w, 'summary.json')))
    assert summary['teacher'] == {'teacher_free': True} and 'agreement' not in summary['eval']


def test_crd_state_follows_repdistiller_step_by_step():
  """One CRD step of the trainer's term against the reference memory and loss: Z set from the
  first batch, banks updated at the batch's rows only."""
  import reference_losses as ref
  rng = np.random.default_rng(0)
  n, d, b = 50, 8, 4
  term = {'name': 'crd', 'kind': 'crd', **distill_heads.TERMS['crd'], 'feat_dim': d,
          'nce_k': 6}
  state = distill_heads.init_state([term], jax.random.key(0), n)
  emb = [x / np.linalg.norm(x, axis=1, keepdims=True)
         for x in rng.normal(size=(2, b, d)).astype(np.float32)]
  index = np.array([3, 7, 11, 40])
  key = jax.random.key(1)
  value, new = distill_heads.term_value(
      term, {'crd': tuple(emb)}, state=state, index=index, key=key, labels=None, s_logits=None,
      t_logits=None, t_feats=None, step=None, num_data=n)
  negatives = np.asarray(jax.random.randint(key, (b, 6), 0, n))
  idx = np.concatenate([index[:, None], negatives], 1)
  banks = state['crd']
  want, z_s, z_t = ref.crd(*emb, banks['student_bank'], banks['teacher_bank'], idx, 0.07, n)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new['z']), [z_s, z_t], rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(new['student_bank']),
      ref.crd_memory_update(banks['student_bank'], index, emb[0], 0.5), rtol=1e-5, atol=1e-6)
  # The second step keeps Z.
  value2, new2 = distill_heads.term_value(
      term, {'crd': tuple(emb)}, state={'crd': new}, index=index, key=key, labels=None,
      s_logits=None, t_logits=None, t_feats=None, step=None, num_data=n)
  np.testing.assert_array_equal(np.asarray(new2['z']), np.asarray(new['z']))
  assert np.isfinite(float(value2))


@pytest.mark.parametrize('student, teacher', [('resnet8_s', 'vit'), ('vit_micro_p7', 'resnet')])
def test_ofa_across_architectures(tiny_teachers, tmp_path, student, teacher):
  """A ViT teacher teaches a CNN student through branches on the CNN's stages; a CNN teaches a
  ViT through branches on its blocks (token grids)."""
  taps = ('stage1', 'stage2', 'stage3') if student == 'resnet8_s' else ('block1', 'block3')
  config = load_config(f'{DISTILL}:tiny-ofa', [
      f'teacher.workdir={tiny_teachers[teacher]}', f'model.name={student}', 'total_steps=6',
      f'losses.ofa.student={taps!r}'])
  w = str(tmp_path / 'ofa')
  summary = trainers.train('distill', config, w)
  assert summary['steps'] == 6 and np.isfinite(_losses(w)).all()
  heads = load_arrays(w)[0]['params']['heads']
  assert sorted(heads) == [f'ofa_{i}' for i in range(len(taps))]


def test_reviewkd_on_mdistiller_preact_taps_and_hcl_shapes(tiny_teachers, tmp_path):
  """The zoo's pre-activation taps as ReviewKD's teacher features (mdistiller's choice), and
  the fused maps take the teacher's shapes."""
  from jkd.trainers.common import RunData
  teacher = str(tmp_path / 'wrn')
  trainers.train('train', load_config(SUPERVISED + ':tiny', ['model.name=wrn_16_2', 'total_steps=2']),
                   teacher)
  config = load_config(f'{DISTILL}:tiny-reviewkd', [
      f'teacher.workdir={teacher}', 'model.name=resnet8x4',
      "losses.reviewkd.teacher=('stage1_preact', 'stage2_preact', 'stage3_preact', "
      "'pre_logits')"])
  run = RunData.from_config(config)
  d = distill.Distillation.from_config(config, run, distill.teachers.from_config(
      config, 10, run.shape))
  spec = d.heads.specs['reviewkd']
  assert spec['out_channels'] == (32, 64, 128, 128) and spec['out_sizes'] == (28, 14, 7, 1)
  assert spec['mid'] == 256  # min(512, the student's pooled width)


def test_head_terms_need_their_inputs(tiny_teachers):
  from jkd.errors import UserError
  config = load_config(f'{DISTILL}:tiny-reviewkd', [
      f'teacher.workdir={tiny_teachers["resnet"]}',
      "losses.reviewkd.teacher=('stage2', 'stage3')"])
  with pytest.raises(UserError, match='one teacher tap per student tap'):
    distill.build_task(config, '/tmp/unused')


def test_ema_teacher_self_distillation_pipeline(tmp_path):
  """`pipeline.py:ema_teacher`: a resnet8_s keeping an EMA, then a fresh resnet8_s from that
  EMA (born-again with the averaged weights)."""
  from jkd import pipeline
  config = load_config(os.path.join(REPO, 'configs', 'fashion_mnist', 'pipeline.py') +
                       ':tiny-ema_teacher')
  result = pipeline.run(config, str(tmp_path / 'p'))
  assert list(result['stages']) == ['teacher', 'gen1']
  gen1 = json.load(open(os.path.join(str(tmp_path / 'p'), 'gen1', 'summary.json')))
  assert gen1['teacher']['ema'] is True and gen1['teacher']['model'] == 'resnet8_s'
  teacher = json.load(open(os.path.join(str(tmp_path / 'p'), 'teacher', 'summary.json')))
  assert gen1['eval']['teacher_accuracy'] == teacher['eval']['ema_accuracy']
