"""MIM-teacher distillation (`jkd distill` with configs/fashion_mnist/mim_distill.py): every
recipe trains a masked student from a real tiny MAE teacher, the teacher never changes, the
workdir fine-tunes like a pretraining one; SimMIM and MAE steps with every term; a classifier
teacher is refused with exit code 2."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import loop, parallel, trainers
from jkd.checkpoint import RunCheckpointer, load_arrays
from jkd.config import load_config
from jkd.errors import UserError
from jkd.trainers import mim_distill, mim_terms, supervised

from conftest import REPO, read_jsonl, run_jkd

CONFIGS = os.path.join(REPO, 'configs', 'fashion_mnist')
MIM_DISTILL = os.path.join(CONFIGS, 'mim_distill.py')
# Smaller than the ':tiny' encoders so the file compiles quickly on 2 cores. Teacher and student
# differ in width (projectors) and head count (TinyMIM regroups the student's heads).
TEACHER = dict(width=48, depth=2, num_heads=2)
STUDENT = dict(width=32, depth=2, num_heads=4)
ALL_TERMS = {'pixel': dict(weight=1.0), 'teacher_pixel': dict(weight=1.0),
             'masked_feature': dict(weight=1.0), 'tinymim_relation': dict(weight=1.0)}


def _pretrain(workdir, method, steps):
  config = load_config(os.path.join(CONFIGS, f'{method}.py:tiny'),
                       [f'total_steps={steps}', f'checkpoint_every={steps}', 'log_every=2'])
  config.model.update(TEACHER)
  trainers.train('pretrain', config, workdir)
  return workdir


@pytest.fixture(scope='module')
def mae_teacher(tmp_path_factory):
  return _pretrain(str(tmp_path_factory.mktemp('mae_teacher')), 'mae', 8)


def _config(teacher, recipe='', overrides=()):
  config = load_config(f'{MIM_DISTILL}:tiny{"-" + recipe if recipe else ""}',
                       [f'teacher.workdir={teacher}', *overrides])
  config.model.update(STUDENT)
  return config


def _train_lines(workdir):
  return [l for l in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'split' not in l]


@pytest.fixture(scope='module')
def distilled(mae_teacher, tmp_path_factory):
  """The default recipe (pixel + teacher_pixel), trained through `jkd distill`'s entry point."""
  w = str(tmp_path_factory.mktemp('mim_default'))
  before, _ = load_arrays(mae_teacher)
  config = _config(mae_teacher)
  summary = trainers.get('distill', config).train(config, w)
  return w, summary, before


def _check_run(w, summary, teacher, before, terms):
  lines = _train_lines(w)
  losses = [l['loss'] for l in lines]
  assert summary['steps'] == 16 and np.isfinite(losses).all(), losses
  assert losses[-1] < 0.9 * losses[0], losses
  for term in terms:  # Per-term metrics.
    assert np.isfinite(lines[-1][f'loss_{term}'])
  assert np.isfinite(summary['eval_loss']) and np.isfinite(summary['teacher_eval_loss'])
  with open(os.path.join(w, 'reconstructions.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  after, _ = load_arrays(teacher)
  for a, b in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params'])):
    np.testing.assert_array_equal(a, b)
  # The teacher is referenced, not stored: the checkpoint holds the MIM student + projectors.
  saved, meta = load_arrays(w)
  assert set(saved['params']) <= {'student', 'projectors'}
  assert {'patch_embed', 'encoder', 'decoder'} <= set(saved['params']['student'])
  assert meta['params_prefix'] == ['student'] and meta['method'] == 'mae'
  return saved


def test_default_recipe_distills_pixels(mae_teacher, distilled):
  w, summary, before = distilled
  saved = _check_run(w, summary, mae_teacher, before, ['pixel', 'teacher_pixel'])
  assert not saved['params'].get('projectors')
  assert summary['teacher']['method'] == 'mae'


@pytest.mark.parametrize('recipe,term', [('feature', 'masked_feature'),
                                         ('tinymim', 'tinymim_relation')])
def test_feature_and_relation_recipes(mae_teacher, tmp_path, recipe, term):
  before, _ = load_arrays(mae_teacher)
  w = str(tmp_path / recipe)
  summary = trainers.train('distill', _config(mae_teacher, recipe), w)
  saved = _check_run(w, summary, mae_teacher, before, ['pixel', term])
  # Student decoder tokens (64 wide) -> teacher width (48): a projector, kept out of 'student'.
  assert bool(saved['params'].get('projectors')) == (recipe == 'feature')


def test_distilled_student_fine_tunes_and_teaches(distilled, tmp_path):
  """init_from loads the student's encoder into the fine-tuning ViT, as from `jkd pretrain`;
  the distilled workdir is itself a valid MIM teacher for a next stage."""
  w, _, _ = distilled
  config = load_config(os.path.join(CONFIGS, 'finetune.py:tiny'), [f'init_from={w}'])
  config.model.update(STUDENT)
  task = supervised.build_task(config, str(tmp_path / 'ft'))
  loaded = task.on_init(nn.unbox(task.init_state(jax.random.key(0))))
  arrays, _ = load_arrays(w)
  for name in ('patch_embed', 'encoder'):
    want = jax.tree.leaves(arrays['params']['student'][name])
    got = jax.tree.leaves(loaded.params[name])
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Next stage: the distilled student as teacher (shapes only; nothing compiled).
  task = mim_distill.build_task(_config(w), str(tmp_path / 'next'))
  assert task.meta['teacher']['model'] == 'vit_nano_p4' and task.meta['method'] == 'mae'


@pytest.mark.parametrize('method', ['simmim', 'mae'])
def test_every_term_steps_and_teacher_is_frozen(mae_teacher, tmp_path, method):
  """All four terms in one step; SimMIM reads masked tokens, MAE (student without norm_pix,
  teacher with it) the visible ones. The teacher argument survives donated steps unchanged."""
  teacher = (mae_teacher if method == 'mae' else
             _pretrain(str(tmp_path / 'simmim_teacher'), 'simmim', 2))
  overrides = ['norm_pix_loss=False'] if method == 'mae' else []
  config = _config(teacher, overrides=overrides)
  config.losses = dict(ALL_TERMS)
  if method == 'mae':
    config.losses['masked_feature'] = dict(weight=1.0, tokens='visible')
  task = mim_distill.build_task(config, str(tmp_path / 'unused'))
  mesh = parallel.make_mesh({'data': 1})
  state, _ = loop.init_sharded(task.init_state, jax.random.key(0), mesh)
  (teacher_vars,), _ = task.place_extra_args(mesh)
  snapshot = jax.device_get(teacher_vars)
  step = jax.jit(task.train_step, donate_argnums=(0,))
  batch = parallel.global_batch(next(task.train_iterator), mesh)
  metrics = []
  for _ in range(10):  # One batch, so the fall is the student's, not the data's.
    state, m = step(state, batch, jax.random.key(1), teacher_vars)
    metrics.append(jax.device_get(m))
  for term in ALL_TERMS:
    values = [m[f'loss_{term}'] for m in metrics]
    assert np.isfinite(values).all(), (term, values)
  assert metrics[-1]['loss'] < 0.8 * metrics[0]['loss'], [m['loss'] for m in metrics]
  for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(jax.device_get(teacher_vars))):
    np.testing.assert_array_equal(a, b)
  assert state.params['projectors']  # student 32 wide, teacher 48
  sums = jax.jit(task.eval_step)(state, batch | {'mask': np.ones(32, np.float32)}, teacher_vars)
  assert {'loss', 'teacher_loss', 'student_teacher_loss'} <= set(sums)


def test_classifier_teacher_exits_2_with_one_paragraph(tmp_path):
  """A `jkd train` workdir has no decoder to teach pixels: refused before anything compiles."""
  teacher = str(tmp_path / 'supervised')
  ckpt = RunCheckpointer(teacher)
  state = {'step': jnp.zeros((), jnp.int32), 'params': {'head': {'kernel': jnp.zeros((4, 10))}}}
  ckpt.save(1, state, {}, {'kind': 'train', 'model': 'resnet8_s', 'image_shape': [28, 28, 1],
                           'config': {'model': {'name': 'resnet8_s'}}})
  ckpt.close()
  w = str(tmp_path / 'student')
  out = run_jkd('distill', '--config', f'{MIM_DISTILL}:tiny', '--workdir', w,
                f'--config.teacher.workdir={teacher}')
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr and 'jkd pretrain' in out.stderr, out.stderr
  assert 'not a masked-image-modeling model' in out.stderr
  assert not os.path.exists(os.path.join(w, 'checkpoints'))


def test_bad_terms_are_user_errors():
  for spec, words in (({'pixle': {}}, 'unknown MIM distillation kind'),
                      ({'masked_feature': {'token': 'masked'}}, 'unknown options'),
                      ({'masked_feature': {'tokens': 'all'}}, 'use one of'),
                      ({}, 'empty')):
    with pytest.raises(UserError, match=words):
      mim_terms.parse_terms(spec)
  terms = mim_terms.parse_terms([dict(kind='pixel', weight=2.0), dict(kind='tinymim_relation')])
  assert terms[0]['weight'] == 2.0 and terms[1]['temperature'] == 1.0


@pytest.mark.parametrize('arg,terms', [('', {'pixel', 'teacher_pixel'}), (':pixel', {'pixel'}),
                                       (':feature', {'pixel', 'masked_feature'}),
                                       (':tinymim', {'pixel', 'tinymim_relation'}),
                                       (':tiny-tinymim', {'pixel', 'tinymim_relation'})])
def test_config_recipes(arg, terms):
  config = load_config(MIM_DISTILL + arg)
  assert set(config.losses) == terms and config.method == 'mim'
  assert (config.total_steps > 0) == arg.startswith(':tiny-')  # ':tinymim' is full size.
