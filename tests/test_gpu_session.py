"""benchmarks/gpu/session.py: the one-lease GPU script keeps to its budget and keeps what finished.

Its real steps (bench, tables, plan) are covered at toy size by test_bench, test_results_tables
and test_memory; here the scheduling: skipping what no longer fits, stopping a step at its limit,
stopping everything when a required step fails, and the outputs the device tool brings back.
"""
import importlib.util
import json
import os
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def session():
  spec = importlib.util.spec_from_file_location(
      'gpu_session', os.path.join(REPO, 'benchmarks', 'gpu', 'session.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules['gpu_session'] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  yield module
  del sys.modules['gpu_session']


def _python(code):
  return lambda ctx: [sys.executable, '-c', code]


def _fake_steps(session, *extra):
  return lambda: [session.Step('install', 'all', 0, 30, _python('print("installed")'), True),
                  session.Step('env', 'all', 0, 30, _python('print("env ok")'), True), *extra]


def test_every_step_has_an_issue_and_the_targets_come_first(session):
  names = [s.name for s in session.steps()]
  assert names[:2] == ['install', 'env']
  assert names[2:6] == [f'bench:{j}' for j in session.BENCH_FIRST]
  assert len(names) == len(set(names))
  assert all(s.min_s <= s.max_s for s in session.steps())
  with pytest.raises(SystemExit, match='unknown step'):
    session.select(['bench:nope'])
  # Named steps run in the order given, after install and env.
  assert [s.name for s in session.select(['plan', 'bench:vit_s16'])] == [
      'install', 'env', 'plan', 'bench:vit_s16']


def test_budget_limits_and_outputs(session, tmp_path, monkeypatch):
  monkeypatch.setattr(session, 'KILL_GRACE_S', 2)
  monkeypatch.setattr(session, 'RESERVE_S', 0)
  monkeypatch.setattr(session, 'steps', _fake_steps(
      session,
      session.Step('slow', '8', 0, 1.5, _python('import time; print("started"); time.sleep(60)')),
      session.Step('fails', '8', 0, 30, _python('raise SystemExit(4)')),
      session.Step('too_big', '8', 10_000, 20_000, _python('print("never")'))))
  work = tmp_path / 'work'
  (work / 'bench' / 'vit_b16').mkdir(parents=True)
  bench = dict(examples_per_sec=100.0, dtype='bfloat16', batch_size=256, mfu=0.5,
               peak_memory_bytes=2**30, num_devices=1, device='fake', jax_version='0',
               peak_flops=1e15, peak_source='test', memory_source='test',
               flops_per_example=1e9)
  (work / 'bench' / 'vit_b16' / 'bench.json').write_text(json.dumps(bench))
  (work / 'bench' / 'vit_b16' / 'checkpoints').mkdir()
  (work / 'bench' / 'vit_b16' / 'checkpoints' / 'summary.json').write_text('{}')
  out = tmp_path / 'out'
  start = time.monotonic()
  code = session.main(['--out', str(out), '--work', str(work), '--budget', '60'])
  assert time.monotonic() - start < 30  # The 60 s sleep was cut at its 1.5 s limit.
  assert code == 1
  record = json.loads((out / 'session.json').read_text())['steps']
  assert [(e['step'], e['status']) for e in record] == [
      ('install', 'ok'), ('env', 'ok'), ('slow', 'timed out'), ('fails', 'failed'),
      ('too_big', 'skipped')]
  assert record[3]['exit_code'] == 4
  log = (out / 'session.log').read_text()
  assert 'installed' in log and 'started' in log and 'never' not in log
  assert '| vit_b16 (bfloat16) | 256 | 100 |' in (out / 'bench_gpu.md').read_text()
  with tarfile.open(out / 'runs.tar.gz') as tar:
    assert tar.getnames() == ['bench/vit_b16/bench.json']  # Checkpoints stay behind.
  # The device tool brings back at most 8 files, no deeper than two folders.
  assert len(os.listdir(out)) <= 8 and all((out / n).is_file() for n in os.listdir(out))


def test_a_failed_required_step_stops_the_session(session, tmp_path, monkeypatch):
  broken = lambda: [session.Step('install', 'all', 0, 30, _python('raise SystemExit(1)'), True),  # noqa: E731
                    session.Step('env', 'all', 0, 30, _python('print("env")'), True)]
  monkeypatch.setattr(session, 'steps', broken)
  out = tmp_path / 'out'
  assert session.main(['--out', str(out), '--work', str(tmp_path / 'w'), '--budget', '60']) == 1
  record = json.loads((out / 'session.json').read_text())['steps']
  assert [(e['step'], e['status']) for e in record] == [('install', 'failed')]
  assert 'nothing else can run' in (out / 'session.log').read_text()
