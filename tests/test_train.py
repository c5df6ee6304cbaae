"""`jkd train` end to end on real Fashion-MNIST (tiny sizes): outputs, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jkd.checkpoint import load_arrays

from conftest import REPO, SUPERVISED, read_jsonl, run_jkd


def test_train_writes_outputs_and_eval_matches(tmp_path):
  w = str(tmp_path / 'w')
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'ETA' in out.stdout and 'step' in out.stdout  # progress lines
  summary = json.load(open(os.path.join(w, 'summary.json')))
  for key in ('test_accuracy', 'steps', 'wall_s', 'params', 'examples_per_sec'):
    assert key in summary
  assert summary['steps'] == 12 and 0.0 <= summary['test_accuracy'] <= 1.0
  lines = read_jsonl(os.path.join(w, 'metrics.jsonl'))
  assert all('step' in l for l in lines)
  train = [l for l in lines if 'loss' in l and 'split' not in l]
  evals = [l for l in lines if 'split' in l]
  assert train and all('examples_per_sec' in l for l in train)
  assert evals and 'accuracy' in evals[-1]
  assert os.path.isdir(os.path.join(w, 'checkpoints', '12'))
  assert any(f.startswith('events') for f in os.listdir(os.path.join(w, 'tensorboard')))
  # `jkd eval` on the workdir reproduces the final accuracy.
  out = run_jkd('eval', '--workdir', w)
  assert out.returncode == 0, out.stderr[-3000:]
  ev = json.load(open(os.path.join(w, 'eval.json')))
  assert abs(ev['accuracy'] - summary['test_accuracy']) < 1e-6 and ev['examples'] == 256
  # Running the finished command again resumes at the end and does no more steps.
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w)
  assert out.returncode == 0 and 'resumed' in out.stdout
  assert json.load(open(os.path.join(w, 'summary.json')))['steps'] == 12


KILL_ARGS = ['--config.total_steps=40', '--config.batch_size=128', '--config.checkpoint_every=5',
             '--config.data.train_split=train[:2048]', '--config.log_every=5']


def test_sigkill_then_rerun_gives_same_parameters(tmp_path):
  ref, killed = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  args = ['train', '--config', SUPERVISED + ':tiny', *KILL_ARGS]
  assert run_jkd(*args, '--workdir', ref).returncode == 0

  env = dict(os.environ, PYTHONUNBUFFERED='1')
  proc = subprocess.Popen([sys.executable, '-m', 'jkd.cli', *args, '--workdir', killed],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, 'checkpoints', '10')):
    assert proc.poll() is None, 'run ended before it could be killed'
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, 'summary.json')), 'was not interrupted'

  out = run_jkd(*args, '--workdir', killed)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed' in out.stdout
  a, _ = load_arrays(ref)
  b, _ = load_arrays(killed)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_array_equal(x, y)
  assert json.load(open(os.path.join(killed, 'summary.json')))['steps'] == 40


def test_sigterm_saves_and_resumes(tmp_path):
  w = str(tmp_path / 'w')
  args = ['train', '--config', SUPERVISED + ':tiny', *KILL_ARGS, '--config.checkpoint_every=1000',
          '--workdir', w]
  proc = subprocess.Popen([sys.executable, '-m', 'jkd.cli', *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))
  for line in proc.stdout:  # wait for training to be under way
    if 'ETA' in line:
      break
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, rest
  assert 'checkpoint saved' in rest
  steps = [int(d) for d in os.listdir(os.path.join(w, 'checkpoints')) if d.isdigit()]
  assert steps and 0 < max(steps) < 40


@pytest.mark.parametrize('extra, words', [
    (['--config.optim.lrr=1'], 'Unknown config key'),
    (['--config.batch_size=x'], 'not a valid integer'),
    (['--config.data.data_dir=/nonexistent'], 'dataset-fashion-mnist'),
    (['--config.model.name=resnet9000'], 'resnet9000'),
])
def test_bad_input_exits_2_with_one_paragraph(tmp_path, extra, words):
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', str(tmp_path / 'w'),
                *extra)
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
  assert 'Traceback' not in out.stderr and 'error:' in out.stderr
  if words:
    assert words in out.stderr


def test_foreign_checkpoint_is_refused_and_left_untouched(tmp_path):
  w = str(tmp_path / 'w')
  assert run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w).returncode == 0
  ckpts = os.path.join(w, 'checkpoints')
  before = {d: sorted(os.listdir(os.path.join(ckpts, d))) for d in os.listdir(ckpts)}
  for override, words in (('--config.model.name=resnet20_s', "model 'resnet8_s'"),
                          ('--config.optim.name=sgd', 'does not match')):
    out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w, override)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert words in ' '.join(out.stderr.split())  # The paragraph is wrapped where it fits.
    assert {d: sorted(os.listdir(os.path.join(ckpts, d))) for d in os.listdir(ckpts)} == before
