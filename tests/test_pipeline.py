"""`jkd pipeline`: multi-stage distillation in one resumable command (tiny sizes), the stage
references it refuses, and the command line a stage's references make. (Its runner, shared with
benchmarks/results_tables.py, is tested against that script in tests/test_results_tables.py.)"""
import json
import os

import ml_collections
import pytest

from jkd import pipeline
from jkd.checkpoint import load_arrays
from jkd.errors import UserError

from conftest import REPO, run_jkd

PIPELINE = os.path.join(REPO, 'configs', 'fashion_mnist', 'pipeline.py')


def test_teacher_assistant_student_runs_in_order_and_resumes(tmp_path):
  w = str(tmp_path / 'takd')
  out = run_jkd('pipeline', '--config', PIPELINE + ':tiny', '--workdir', w)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(os.path.join(w, 'pipeline.json')))
  assert list(result['stages']) == ['teacher', 'assistant', 'student']
  for name, stage in result['stages'].items():
    assert stage['workdir'] == os.path.join(w, name)
    assert 0.0 <= stage['test_accuracy'] <= 1.0
    assert json.load(open(os.path.join(w, name, 'summary.json')))['steps'] == 8
  # Each distillation learnt from the stage before it.
  for name, teacher in (('assistant', 'teacher'), ('student', 'assistant')):
    meta = load_arrays(os.path.join(w, name))[1]
    assert meta['config']['teacher']['workdir'] == os.path.join(w, teacher)
  stages = result['stages']
  assert stages['student']['params'] < stages['assistant']['params'] < stages['teacher']['params']
  # Rerunning finds every stage finished and trains nothing.
  out = run_jkd('pipeline', '--config', PIPELINE + ':tiny', '--workdir', w)
  assert out.returncode == 0 and out.stdout.count('already done') == 3, out.stdout[-2000:]
  assert 'ETA' not in out.stdout  # no progress line: no training step ran


def test_only_process_0_writes_the_result(tmp_path, monkeypatch, capsys):
  """In a multi-process run every process runs the stages; only process 0 writes
  pipeline.json (and prints), the others return the same result."""
  import jax
  from jkd.config import load_config
  w = str(tmp_path / 'p')
  for name in ('teacher', 'assistant', 'student'):  # Finished stages: nothing trains.
    os.makedirs(os.path.join(w, name))
    with open(os.path.join(w, name, 'summary.json'), 'w') as f:
      json.dump({'test_accuracy': 0.5, 'params': 10, 'wall_s': 1.0}, f)
  config = load_config(PIPELINE + ':tiny')
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  result = pipeline.run(config, w)
  assert list(result['stages']) == ['teacher', 'assistant', 'student']
  assert not os.path.exists(os.path.join(w, 'pipeline.json'))
  assert capsys.readouterr().out == ''
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  assert pipeline.run(config, w)['stages'] == result['stages']
  assert os.path.exists(os.path.join(w, 'pipeline.json'))


def test_hint_stage_then_kd_starts_from_the_hint_weights(tmp_path):
  w = str(tmp_path / 'hint')
  out = run_jkd('pipeline', '--config', PIPELINE + ':tiny-hint', '--workdir', w)
  assert out.returncode == 0, out.stderr[-3000:]
  # Every student tensor comes from the hint stage (its projector is not part of the student).
  loaded = [l for l in out.stdout.splitlines() if l.startswith(f'init_from {w}/hint: loaded')]
  assert len(loaded) == 1 and 'kept 0 fresh' in loaded[0], out.stdout[-3000:]
  hint = load_arrays(os.path.join(w, 'hint'))[1]['config']['losses']
  assert hint['fitnet']['weight'] > 0 and hint['ce']['weight'] == hint['kd']['weight'] == 0


def _pipeline(**stages):
  c = ml_collections.ConfigDict()
  c.order = tuple(stages)
  c.stages = ml_collections.ConfigDict(stages)
  return c


@pytest.mark.parametrize('stages, message', [
    (dict(a=pipeline.stage('distill', 'x.py', teacher='b'), b=pipeline.stage('train', 'x.py')),
     "teacher='b' is not an earlier stage"),
    (dict(a=pipeline.stage('distill', 'x.py', teacher='a')), "teacher='a' is not an earlier"),
    (dict(a=pipeline.stage('compress', 'x.py', init_from='no/such/run')),
     "neither a stage of this pipeline"),
    (dict(a=pipeline.stage('finetune', 'x.py')), "command 'finetune' is not one of"),
])
def test_bad_stage_references_are_refused_before_anything_runs(stages, message):
  with pytest.raises(UserError, match=message):
    pipeline.stage_names(_pipeline(**stages))


def test_references_become_overrides_and_the_command_line(tmp_path):
  """`plan` puts each stage in WORKDIR/NAME; its references to earlier stages become, after its
  own overrides, what `jkd pipeline` applies in-process and the `jkd` command that runs it."""
  w = str(tmp_path / 'p')
  teacher, student = pipeline.plan(_pipeline(
      teacher=pipeline.stage('train', 'fashion_mnist/supervised.py:tiny'),
      student=pipeline.stage('distill', 'fashion_mnist/distill.py:tiny', ['model.width=8'],
                             init_from='teacher', teacher='teacher')), w)
  assert (teacher.name, teacher.workdir, teacher.config_overrides()) == (
      'teacher', os.path.join(w, 'teacher'), [])
  overrides = ['model.width=8', f'init_from={w}/teacher', f'teacher.workdir={w}/teacher']
  assert student.config_overrides() == overrides
  assert student.args(['--config.log_every=1']) == [
      'distill', '--config', os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py:tiny'),
      '--workdir', os.path.join(w, 'student'), *(f'--config.{o}' for o in overrides),
      '--config.log_every=1']
