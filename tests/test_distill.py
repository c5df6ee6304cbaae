"""`jkd distill`: every loss kind runs a few steps from a real (tiny) teacher, the teacher never
changes, the student's loss falls; multi-term configs and bad configs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import parallel
from jkd import teacher as teacher_lib
from jkd.checkpoint import load_arrays
from jkd.config import load_config
from jkd.errors import UserError
from jkd import trainers
from jkd.trainers import distill

from conftest import REPO, SUPERVISED, read_jsonl

DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  w = str(tmp_path_factory.mktemp('teacher'))
  config = load_config(SUPERVISED + ':tiny', ['model.name=resnet20_s', 'total_steps=30',
                                              'log_every=10'])
  trainers.train('train', config, w)
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
  summary = trainers.train('distill', config, w)
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
  trainers.train('distill', load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}',
                                                'model.name=resnet20_s']), ta)
  st = str(tmp_path / 'st')
  summary = trainers.train('distill', load_config(f'{DISTILL}:tiny', [f'teacher.workdir={ta}']), st)
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


# --- DeiT distillation token ------------------------------------------------------------------
def test_deit_model_heads_and_mean():
  """`__call__` is the mean of the two heads (DeiT's inference rule), with either pooling."""
  from jkd import models
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  for pool in ('token', 'gap'):
    model = models.create('vit_nano_p4', depth=1, pool=pool, distill_token=True,
                          head_zero_init=False)
    variables = model.init(jax.random.key(1), x)
    assert {'dist_token', 'head', 'head_dist'} <= set(variables['params'])
    cls_logits, dist_logits = model.apply(variables, x, method='heads')
    assert cls_logits.shape == dist_logits.shape == (3, 10)
    assert not np.allclose(cls_logits, dist_logits)
    np.testing.assert_allclose(model.apply(variables, x), (cls_logits + dist_logits) / 2,
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(UserError, match='num_classes'):
    models.create('vit_nano_p4', num_classes=0, distill_token=True).init(jax.random.key(0), x)
  plain = models.create('vit_nano_p4', depth=1)
  with pytest.raises(UserError, match='distill_token'):
    plain.apply(plain.init(jax.random.key(0), x), x, method='heads')


def test_deit_recipe_trains_both_heads(teacher, tmp_path):
  from jkd import models
  from jkd.evaluate import evaluate_workdir
  before, _ = load_arrays(teacher)
  w = str(tmp_path / 'deit')
  config = load_config(f'{DISTILL}:tiny-deit', [f'teacher.workdir={teacher}', 'total_steps=16'])
  summary = trainers.train('distill', config, w)
  losses = _losses(w)
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  first = read_jsonl(os.path.join(w, 'metrics.jsonl'))[0]
  assert {'loss_ce', 'loss_deit_hard'} <= set(first), first
  for key in ('cls_head_accuracy', 'dist_head_accuracy', 'teacher_accuracy', 'agreement'):
    assert 0 <= summary['eval'][key] <= 1, summary['eval']
  after, _ = load_arrays(teacher)
  for a, b in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params'])):
    np.testing.assert_array_equal(a, b)
  saved, meta = load_arrays(w)
  student = saved['params']['student']
  assert {'cls', 'dist_token', 'head', 'head_dist'} <= set(student)
  assert meta['config']['model']['distill_token'] is True
  # `jkd eval` rebuilds the model from the stored config: the mean of both heads.
  result = evaluate_workdir(w)
  assert result['accuracy'] == summary['test_accuracy']
  assert result['dist_head_accuracy'] == summary['eval']['dist_head_accuracy']
  model = models.create('vit_nano_p4', pool='token', distill_token=True)
  x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  cls_logits, dist_logits = model.apply({'params': student}, x, method='heads')
  np.testing.assert_allclose(model.apply({'params': student}, x),
                             (cls_logits + dist_logits) / 2, rtol=1e-6, atol=1e-6)
  # The DeiT student can teach the next stage (the teacher is its mean output).
  nxt = trainers.train('distill', load_config(f'{DISTILL}:tiny', [f'teacher.workdir={w}', 'total_steps=4']),
                      str(tmp_path / 'next'))
  assert nxt['teacher']['model'] == 'vit_nano_p4'


# --- Cached teacher ---------------------------------------------------------------------------
from jkd.trainers import teacher_cache  # noqa: E402

# Mixup on, so the cache must also redraw each step's mixup; k = C and fp32 storage: exact.
CACHE_RUN = ['total_steps=6', 'log_every=1', 'mixup_alpha=0.2', 'checkpoint_every=0']
CACHE_OPTS = ['teacher.cache.topk=10', 'teacher.cache.dtype=float32',
              'teacher.cache.shard_steps=4']


def test_bf16_teacher_is_stored_in_bf16(teacher):
  # A frozen teacher needs no fp32 masters: its weights sit on the mesh in its compute dtype,
  # its BatchNorm statistics stay fp32 (no forward here: CPU bf16 ResNets are not run).
  config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}',
                                           'teacher.dtype=bfloat16'])
  task = distill.build_task(config, '/tmp/unused')
  (placed,), _ = task.place_extra_args(parallel.make_mesh({'data': 1}))
  assert {x.dtype for x in jax.tree.leaves(placed['params'])} == {jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(placed['batch_stats'])} == {jnp.dtype('float32')}


@pytest.fixture(scope='module')
def cache_dir(teacher, tmp_path_factory):
  d = str(tmp_path_factory.mktemp('cache'))
  config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}', *CACHE_RUN,
                                           *CACHE_OPTS, f'teacher.cache.dir={d}'])
  manifest = teacher_cache.ensure(config)
  assert manifest['shards'] == {'0': 4, '1': 2} and manifest['eval']['examples'] == 256
  return d


def test_cached_teacher_matches_online_without_teacher_forward(teacher, cache_dir, tmp_path,
                                                               monkeypatch):
  """Same seed, k = C, fp32 cache: the kd loss of every step equals the online teacher's to
  rtol 1e-5 (in practice bit-identical), and the cached run never loads the teacher."""
  online = str(tmp_path / 'online')
  trainers.train('distill', load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}', *CACHE_RUN]),
                online)
  config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}', *CACHE_RUN,
                                           *CACHE_OPTS, f'teacher.cache.dir={cache_dir}'])

  def no_teacher(*args, **kwargs):
    raise AssertionError('the cached run loaded the teacher')
  monkeypatch.setattr(teacher_lib, 'load_model', no_teacher)  # how any teacher is read
  task = distill.build_task(config, str(tmp_path / 'unused'))
  assert task.place_extra_args is None  # the jitted step gets no teacher argument
  cached = str(tmp_path / 'cached')
  summary = trainers.train('distill', config, cached)
  a = [l for l in read_jsonl(os.path.join(online, 'metrics.jsonl')) if 'split' not in l]
  b = [l for l in read_jsonl(os.path.join(cached, 'metrics.jsonl')) if 'split' not in l]
  assert len(a) == len(b) == 6
  np.testing.assert_allclose([l['loss_kd'] for l in b], [l['loss_kd'] for l in a],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose([l['agreement'] for l in b], [l['agreement'] for l in a])
  online_eval = json.load(open(os.path.join(online, 'summary.json')))['eval']
  # The teacher's test predictions come from the cache: same teacher accuracy and agreement.
  assert summary['eval']['teacher_accuracy'] == online_eval['teacher_accuracy']
  assert summary['eval']['agreement'] == online_eval['agreement']
  assert summary['teacher_cache']['topk'] == 10


def test_cache_mismatch_and_feature_terms_are_user_errors(teacher, cache_dir, tmp_path):
  from conftest import run_jkd
  proc = run_jkd('distill', '--config', f'{DISTILL}:tiny', '--workdir', str(tmp_path / 'w'),
                 f'--config.teacher.workdir={teacher}', f'--config.teacher.cache.dir={cache_dir}',
                 *[f'--config.{o}' for o in CACHE_RUN + CACHE_OPTS], '--config.seed=1')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'seed: cache 0, run 1' in ' '.join(proc.stderr.split())
  assert 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().split('\n\n')) == 1  # one paragraph
  config = load_config(f'{DISTILL}:tiny-fitnet', [f'teacher.workdir={teacher}',
                                                  f'teacher.cache.dir={cache_dir}'])
  with pytest.raises(UserError, match='teacher features'):
    distill.build_task(config, str(tmp_path))


def test_cache_writer_resumes_after_interruption(teacher, cache_dir, tmp_path, monkeypatch):
  d = str(tmp_path / 'cache')
  config = load_config(f'{DISTILL}:tiny', [f'teacher.workdir={teacher}', *CACHE_RUN,
                                           *CACHE_OPTS, f'teacher.cache.dir={d}'])
  write = teacher_cache._write_shard
  calls = []

  def interrupted(directory, index, *arrays):
    calls.append(index)
    if len(calls) == 2:
      raise KeyboardInterrupt  # killed while writing the second shard
    write(directory, index, *arrays)
  monkeypatch.setattr(teacher_cache, '_write_shard', interrupted)
  with pytest.raises(KeyboardInterrupt):
    teacher_cache.ensure(config)
  assert json.load(open(os.path.join(d, 'manifest.json')))['shards'] == {'0': 4}
  first = os.stat(os.path.join(d, 'shard_000000.npz')).st_mtime_ns
  manifest = teacher_cache.ensure(config)  # resumes: only shard 1 is computed
  assert calls == [0, 1, 1] and manifest['shards'] == {'0': 4, '1': 2}
  assert os.stat(os.path.join(d, 'shard_000000.npz')).st_mtime_ns == first
  for name in ('shard_000000.npz', 'shard_000001.npz'):
    with np.load(os.path.join(d, name)) as x, np.load(os.path.join(cache_dir, name)) as y:
      for key in ('values', 'indices', 'rest'):
        np.testing.assert_array_equal(x[key], y[key])


def test_top_k_round_trip():
  """k = C rebuilds the logits exactly; k < C keeps the top-k probabilities and spreads the rest
  of the mass equally (FKD's marginal smoothing) or renormalises (rest='renorm')."""
  logits = jax.random.normal(jax.random.key(0), (5, 10)) * 3
  values, indices, rest = teacher_cache.top_k_logits(logits, 10)
  batch = {'teacher_values': values, 'teacher_indices': indices, 'teacher_rest': rest}
  np.testing.assert_array_equal(teacher_cache.teacher_logits(batch, 10), logits)
  values, indices, rest = teacher_cache.top_k_logits(logits, 3)
  batch = {'teacher_values': values, 'teacher_indices': indices, 'teacher_rest': rest}
  p, q = jax.nn.softmax(logits), jax.nn.softmax(teacher_cache.teacher_logits(batch, 10))
  top = np.take_along_axis(np.asarray(p), np.asarray(indices), -1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(q), np.asarray(indices), -1), top,
                             rtol=1e-5)
  left = np.asarray(q).copy()
  np.put_along_axis(left, np.asarray(indices), np.nan, -1)
  expected = (1 - top.sum(-1, keepdims=True)) / 7
  np.testing.assert_allclose(left[~np.isnan(left)].reshape(5, 7), np.repeat(expected, 7, -1),
                             rtol=1e-5)
  q = jax.nn.softmax(teacher_cache.teacher_logits(batch, 10, 'renorm'))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(q), np.asarray(indices), -1),
                             top / top.sum(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize('terms, explicit', [
    ([dict(kind='kd')], False),
    ([dict(kind='fitnet', student='block1', teacher='encoder/block3/out')], False),
    ([dict(kind='at', student=('stage2', 'stage3'), teacher=('stage2', 'stage3'))], False),
    ([dict(kind='x', student='encoder/block0/attn/attn', teacher='block3')], True),
    ([dict(kind='x', student=('block1', 'q'), teacher='k')], True),
])
def test_only_attention_taps_turn_off_the_fused_attention(terms, explicit):
  """Block/stage taps leave ViTs on the fused kernel (sow_attention=False); taps of attention
  maps or q/k/v need the explicit path that sows them."""
  from jkd import models
  from jkd.trainers import common
  from jkd.trainers import distill_terms
  assert distill_terms.reads_attention(terms) == explicit
  assert common.without_attention_maps(models.create('vit_nano_p4')).sow_attention is False
  resnet = models.create('resnet8_s')
  assert common.without_attention_maps(resnet) is resnet
