"""benchmarks/results_tables.py: the command plan of every table, its specs against the configs,
the runner's skip / failure / time-limit behaviour (with a stand-in for `jkd`), the runner and
command lines it shares with `jkd pipeline`, that it leaves jax uninitialised, and (slow) a real
tiny distill table end to end."""
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

from conftest import REPO

RUNNER = os.path.join(REPO, 'benchmarks', 'results_tables.py')
_spec = importlib.util.spec_from_file_location('results_tables', RUNNER)
rt = importlib.util.module_from_spec(_spec)
sys.modules['results_tables'] = rt  # dataclasses look their module up while it loads.
_spec.loader.exec_module(rt)

CFG = 'configs/fashion_mnist'


def _dry_run(capsys, *args):
  assert rt.main(['--dry-run', '--root', 'R', *args]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('#')
  return lines[1:]


def _matching(lines, *parts):
  """The command lines that contain every one of `parts`."""
  return [line for line in lines if all(p in line for p in parts)]


def test_dry_run_supervised(capsys):
  lines = _dry_run(capsys, '--table', 'supervised', '--seeds', '0', '1', '2')
  assert len(lines) == 3
  for seed, line in enumerate(lines):
    assert line == (f'jkd train --config {CFG}/supervised.py:gpu --workdir '
                    f'R/gpu/sup_resnet18/seed{seed} --config.seed={seed}')


def test_dry_run_mim(capsys):
  lines = _dry_run(capsys, '--table', 'mim', '--seeds', '0', '1', '2')
  assert len(lines) == 15
  for s in (0, 1, 2):
    for method in ('mae', 'simmim'):
      pre = _matching(lines, f'jkd pretrain --config {CFG}/{method}.py ', f'--config.seed={s}')
      ft = _matching(lines, f'jkd train --config {CFG}/finetune.py ', f'--config.seed={s}',
                     f'--config.init_from=R/gpu/{method}/seed{s}')
      assert len(pre) == len(ft) == 1 and lines.index(pre[0]) < lines.index(ft[0])
    scratch = _matching(lines, f'{CFG}/finetune.py ', f'--config.seed={s}')
    assert len([l for l in scratch if 'init_from' not in l]) == 1  # noqa: E741


def test_dry_run_distill(capsys):
  lines = _dry_run(capsys, '--table', 'distill', '--seeds', '0', '1', '2')
  teacher = [l for l in lines if '/teacher/' in l.split('--workdir ')[1].split()[0]]  # noqa: E741
  assert teacher == [f'jkd train --config {CFG}/supervised.py --workdir R/gpu/teacher/seed0 '
                     '--config.seed=0 --config.model.name=resnet20_s']
  assert lines[0] == teacher[0]  # before every student
  recipes = _distill_recipes()
  canon = {recipe for recipe, _ in rt.CANON_RECIPES.values()}
  assert set(rt.DISTILL_RECIPES) | {'deit'} | canon == set(recipes)
  vit = '--config.teacher.workdir=R/gpu/vit_teacher/seed0'
  assert lines.index(_matching(lines, '--workdir R/gpu/vit_teacher/seed0 ')[0]) < lines.index(
      _matching(lines, '/ofa/seed0 ')[0])
  for s in (0, 1, 2):
    for recipe in rt.DISTILL_RECIPES + ('deit', 'crd', 'reviewkd'):
      assert len(_matching(lines, f'jkd distill --config {CFG}/distill.py:{recipe} ',
                           f'--config.seed={s}',
                           '--config.teacher.workdir=R/gpu/teacher/seed0')) == 1, (recipe, s)
    # The ViT teacher's rows; KD from both teachers; teacher-free KD names no teacher.
    assert len(_matching(lines, f'distill.py:kd --workdir R/gpu/kd_vit/seed{s} ', vit)) == 1
    assert len(_matching(lines, f'distill.py:ofa --workdir R/gpu/ofa/seed{s} ', vit)) == 1
    assert len(_matching(lines, f'distill.py:multi --workdir R/gpu/multi/seed{s} ',
                         '--config.teachers.resnet.workdir=R/gpu/teacher/seed0',
                         '--config.teachers.vit.workdir=R/gpu/vit_teacher/seed0')) == 1
    tfkd = _matching(lines, f'distill.py:tfkd --workdir R/gpu/tfkd/seed{s} ')
    assert len(tfkd) == 1 and 'teacher' not in tfkd[0].split('--workdir')[1]
    assert len(_matching(lines, 'jkd train', f'/student_scratch/seed{s} ')) == 1
    assert len(_matching(lines, 'jkd train', f'/vit_scratch/seed{s} ')) == 1
  # Two teachers; per seed every recipe (kd twice: from each teacher) and two scratch baselines.
  assert len(lines) == 2 + 3 * (len(recipes) + 1 + 2)


def test_dry_run_compress(capsys):
  lines = _dry_run(capsys, '--table', 'compress', '--seeds', '0', '1', '2')
  assert set(rt.COMPRESS_VARIANTS) == set(_load(f'{CFG}/compress.py').VARIANTS)
  for s in (0, 1, 2):
    student = f'R/gpu/student_scratch/seed{s}'
    assert len(_matching(lines, 'jkd train', f'--workdir {student} ')) == 1
    for v in rt.COMPRESS_VARIANTS:
      hits = _matching(lines, f'jkd compress --config {CFG}/compress.py:{v} ',
                       f'--config.seed={s}', f'--config.init_from={student}')
      assert len(hits) == 1, (v, s)
      assert ('--config.teacher.workdir=R/gpu/teacher/seed0' in hits[0]) == (v == 'qat_kd')
      assert (f'--config.teacher.workdir={student}' in hits[0]) == (v == 'channel50')
      assert lines.index(hits[0]) > lines.index(_matching(lines, f'--workdir {student} ')[0])
    # QAT + KD of the KD student of the same seed, after it, from the one teacher.
    kd = f'R/gpu/kd/seed{s}'
    hits = _matching(lines, f'jkd compress --config {CFG}/compress.py:qat_kd ',
                     f'--config.seed={s}', f'--config.init_from={kd}',
                     '--config.teacher.workdir=R/gpu/teacher/seed0')
    assert len(hits) == 1 and lines.index(hits[0]) > lines.index(
        _matching(lines, f'--workdir {kd} ')[0])
  assert len(lines) == 1 + 3 * (2 + len(rt.COMPRESS_VARIANTS) + 1)


def test_dry_run_tiny_scale_and_overrides(capsys):
  lines = _dry_run(capsys, '--table', 'compress', '--scale', 'tiny', '--seeds', '4',
                   '--rows', 'qat_kd', '--', '--config.log_every=1')
  assert [l.split()[3] for l in lines] == [  # noqa: E741
      f'{CFG}/supervised.py:tiny', f'{CFG}/supervised.py:tiny', f'{CFG}/compress.py:tiny-qat_kd']
  assert all(l.endswith('--config.log_every=1') and '/tiny/' in l for l in lines)  # noqa: E741
  assert '--config.seed=4' in lines[0] and '--config.seed=0' in lines[1]  # the teacher: once


def test_cpu_scale_is_the_demo_recipes_at_full_recipe_args(capsys):
  lines = _dry_run(capsys, '--table', 'distill', '--scale', 'cpu', '--seeds', '0')
  assert all('/cpu/' in l for l in lines)  # noqa: E741
  for line in lines:  # One value per key: the cpu sizes replace the common overrides.
    keys = [a.split('=')[0] for a in line.split() if a.startswith('--config.')]
    assert len(keys) == len(set(keys)), line
  assert _matching(lines, f'jkd distill --config {CFG}/distill.py:dkd ', '--config.num_epochs=0.7')
  # The students and pretraining are exactly `jkd demo`'s CPU stages (configs/demo.py), so the
  # tables and the demo measure the same thing; the fine-tunes differ only in their epochs.
  from jkd.config import load_config
  demo = _load('configs/demo.py').get_config().stages
  ignore = re.compile(r'^(losses|teacher)\.|^(checkpoint_every|log_every|num_epochs)$')
  for job, stage in (('student_scratch', 'student_scratch'), ('kd', 'student_kd'),
                     ('mae', 'pretrain'), ('ft_mae', 'teacher')):
    a = _job_config(job, 'cpu')
    b = _flat(load_config(os.path.join(REPO, 'configs', demo[stage].config),
                          demo[stage].overrides).to_dict())
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
            if not ignore.search(k) and a.get(k) != b.get(k)}
    assert not diff, (job, diff)
    if job != 'ft_mae':
      assert a['num_epochs'] == b['num_epochs'], job


def test_cpu_scale_tables_say_what_the_scale_changes(tmp_path):
  for name, table in rt.TABLES.items():
    kw = dict(root=str(tmp_path), launcher=['jkd'], extra=[])
    about = {scale: rt.collect(table, [0], dict(kw, scale=scale), {}, argv=[], extra=[])['about']
             for scale in ('gpu', 'cpu')}
    assert about['gpu'] == table.about and table.about_cpu, name
    assert about['cpu'] == f'{table.about} At scale cpu: {table.about_cpu}'


def test_bad_arguments_exit_2():
  for args in (['--table', 'nope'], ['--table', 'mim', '--rows', 'nope'],
               ['--table', 'mim', '--', '--config.seed=3'], ['--table', 'mim', '--', 'x']):
    p = subprocess.run([sys.executable, RUNNER, *args, '--dry-run'], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and 'error:' in p.stderr, (args, p.stderr)


def _load(path):
  spec = importlib.util.spec_from_file_location('cfg_' + os.path.basename(path)[:-3],
                                                os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _distill_recipes():
  return list(_load(f'{CFG}/distill.py').RECIPES)


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {prefix + k: v})
  return out


def _job_config(name, scale):
  from jkd.config import load_config
  job = rt.JOBS[name]
  arg = job.arg(scale)
  return _flat(load_config(os.path.join(REPO, CFG, job.config) + (f':{arg}' if arg else ''),
                           job.scale_overrides(scale)).to_dict())


@pytest.mark.parametrize('scale', rt.SCALES)
def test_every_job_config_loads_and_scratch_matches_its_distilled_student(scale):
  configs = {name: _job_config(name, scale) for name in rt.JOBS}
  # The baselines differ from their distilled students only in the loss and the teacher.
  ignore = re.compile(r'^(losses|teacher)\.|^(checkpoint_every|log_every|model\.distill_token)$')
  for scratch, student in (('student_scratch', 'kd'), ('vit_scratch', 'deit')):
    a, b = configs[scratch], configs[student]
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b)
            if not ignore.search(k) and a.get(k) != b.get(k)}
    assert not diff, (scratch, student, diff)
  assert configs['deit']['model.distill_token'] and 'model.distill_token' not in configs[
      'vit_scratch']


# --- The runner with a stand-in for `jkd`: fast, no training. ---------------------------------

FAKE_JKD = textwrap.dedent('''
    import json, os, signal, sys, time
    args = sys.argv[1:]
    wd = args[args.index('--workdir') + 1]
    seed = int([a for a in args if a.startswith('--config.seed=')][0].split('=')[1])
    os.makedirs(wd, exist_ok=True)
    print('fake jkd', ' '.join(args), flush=True)
    if os.environ.get('FAKE_TRACE'):  # When it ran, and whether what it needs was finished.
      needs = [a.split('=', 1)[1] for a in args
               if a.startswith(('--config.init_from=', '--config.teacher.workdir='))]
      missing = [n for n in needs if not os.path.exists(os.path.join(n, 'summary.json'))]
      with open(os.environ['FAKE_TRACE'], 'a') as f:
        f.write(json.dumps({'wd': wd, 'start': time.time(), 'missing': missing}) + '\\n')
    if os.environ.get('FAKE_FAIL') and os.environ['FAKE_FAIL'] in wd:
      sys.exit(5)
    if os.environ.get('FAKE_SLEEP'):
      def stop(*unused):
        open(os.path.join(wd, 'got_sigterm'), 'w').close()
        sys.exit(143)
      signal.signal(signal.SIGTERM, stop)
      time.sleep(float(os.environ['FAKE_SLEEP']))
    summary = {'test_accuracy': 0.8 + 0.01 * seed + 0.002 * ('qat' in wd), 'wall_s': 2.0,
               'params': 1000, 'model': 'fake_net', 'steps': 3}
    if args[0] == 'compress':
      summary.update(export_bytes=1000, compression_ratio=4.0, sparsity=0.5,
                     export_accuracy=summary['test_accuracy'], fp32_bytes=4000)
    json.dump(summary, open(os.path.join(wd, 'summary.json'), 'w'))
''')


def _run_fake(tmp_path, *args, env=None, timeout=120):
  fake = tmp_path / 'fake_jkd.py'
  fake.write_text(FAKE_JKD)
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
      [sys.executable, RUNNER, '--root', str(tmp_path / 'root'), '--scale', 'tiny',
       '--launcher', f'{sys.executable} {fake}', *args],
      capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def test_runner_tables_skip_and_sections(tmp_path):
  out = str(tmp_path / 'doc.md')
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--out', out)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  # Teacher once; per seed the scratch student, its 6 variants, the KD student and its QAT+KD.
  assert p.stdout.count('fake jkd') == 1 + 2 * (1 + len(rt.COMPRESS_VARIANTS) + 2)
  results = json.load(open(tmp_path / 'root' / 'tiny' / 'tables' / 'compress' / 'results.json'))
  for row in results['rows']:
    assert len(row['test_accuracy']['values']) == 2, row
    assert row['test_accuracy']['std'] is not None
  assert results['rows'][1]['export_bytes']['mean'] == 1000
  assert results['environments'] and all('jax' in e for e in results['environments'])
  assert all(r['command'].startswith('jkd ') for r in results['runs'].values())
  md = open(tmp_path / 'root' / 'tiny' / 'tables' / 'compress' / 'table.md').read()
  for row in rt.TABLES['compress'].rows:
    line = next(l for l in md.splitlines() if l.startswith(f'| {row.label} |'))  # noqa: E741
    assert ' ± ' in line, line
  assert '| fp32 student |' in md and '4,000 | 1.00× |' in md and '4.00×' in md
  # Again: every run is skipped; a second table goes into its own section of the same file.
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--out', out)
  assert p.returncode == 0 and 'fake jkd' not in p.stdout
  assert p.stdout.count('skipped') == 1 + 2 * (1 + len(rt.COMPRESS_VARIANTS) + 2)
  p = _run_fake(tmp_path, '--table', 'supervised', '--seeds', '0', '--out', out)
  assert p.returncode == 0
  doc = open(out).read()
  assert doc.count('results_tables:compress:tiny:begin') == 1
  assert doc.count('results_tables:supervised:tiny:end') == 1
  assert '| ResNet-18 (`supervised.py:gpu`) | fake_net (1,000 params) | 80.00 ± n/a |' in doc


def test_runner_failure_stops_and_rerun_resumes(tmp_path):
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--rows', 'qat',
                env={'FAKE_FAIL': 'qat/seed1'})
  assert p.returncode == 1
  assert 'FAILED: qat seed 1 exited with code 5' in p.stdout
  assert 'jkd compress --config configs/fashion_mnist/compress.py:tiny-qat' in p.stdout
  assert '| int8 QAT | fake_net (1,000 params) | 80.20 ± n/a |' in p.stdout  # the partial table
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--rows', 'qat')
  assert p.returncode == 0 and p.stdout.count('fake jkd') == 1
  assert p.stdout.count('skipped') == 3


def test_runner_time_limit_stops_the_run_with_sigterm(tmp_path):
  t0 = time.time()
  p = _run_fake(tmp_path, '--table', 'supervised', '--seeds', '0', '1', '--time-limit', '10',
                env={'FAKE_SLEEP': '60'})
  assert p.returncode == 3, p.stdout[-2000:]
  assert time.time() - t0 < 50
  assert 'stopped by the time limit of 10 s' in p.stdout and 'run the same command again' in (
      p.stdout)
  root = tmp_path / 'root' / 'tiny' / 'sup_resnet18'
  assert (root / 'seed0' / 'got_sigterm').exists() and not (root / 'seed1').exists()
  meta = json.load(open(str(root / 'seed0') + '.run.json'))
  assert meta['attempts'][-1]['exit_code'] == 143


def _overlap(trace_path, seconds):
  """Most runs going at once, taking each to last `seconds` from its start."""
  starts = [json.loads(line)['start'] for line in open(trace_path)]
  return max(sum(s <= t < s + seconds for s in starts) for t in starts)


def test_parallel_runs_wait_for_what_they_need(tmp_path):
  trace = tmp_path / 'trace.jsonl'
  p = _run_fake(tmp_path, '--table', 'mim', '--seeds', '0', '1', '--parallel', '3',
                env={'FAKE_SLEEP': '1.5', 'FAKE_TRACE': str(trace)})
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  lines = [json.loads(line) for line in open(trace)]
  assert len(lines) == 10 and not any(line['missing'] for line in lines), lines
  assert 2 <= _overlap(trace, 1.5) <= 3  # Side by side, never more than asked.
  assert p.stdout.count('done ') == 10 and 'fake jkd' not in p.stdout  # Output to the logs.
  results = json.load(open(tmp_path / 'root' / 'tiny' / 'tables' / 'mim' / 'results.json'))
  assert results['parallel'] == 3
  assert 'up to 3 runs shared the device' in open(
      tmp_path / 'root' / 'tiny' / 'tables' / 'mim' / 'table.md').read()
  meta = json.load(open(str(tmp_path / 'root' / 'tiny' / 'ft_mae' / 'seed1') + '.run.json'))
  assert meta['attempts'][-1]['parallel'] == 3 and meta['attempts'][-1]['exit_code'] == 0


def test_parallel_failure_lets_the_others_finish_and_rerun_resumes(tmp_path):
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--rows', 'qat',
                '--parallel', '2', env={'FAKE_FAIL': 'qat/seed0'})
  assert p.returncode == 1
  assert 'FAILED: qat seed 0 exited with code 5' in p.stdout and '  | fake jkd' in p.stdout
  p = _run_fake(tmp_path, '--table', 'compress', '--seeds', '0', '1', '--rows', 'qat',
                '--parallel', '2')
  assert p.returncode == 0, p.stdout[-3000:]
  assert 'run qat seed 0' in p.stdout and 'run teacher' not in p.stdout


def test_parallel_time_limit_stops_every_run_with_sigterm(tmp_path):
  t0 = time.time()
  p = _run_fake(tmp_path, '--table', 'supervised', '--seeds', '0', '1', '--parallel', '2',
                '--time-limit', '8', env={'FAKE_SLEEP': '60'})
  assert p.returncode == 3, p.stdout[-2000:]
  assert time.time() - t0 < 50
  root = tmp_path / 'root' / 'tiny' / 'sup_resnet18'
  assert (root / 'seed0' / 'got_sigterm').exists() and (root / 'seed1' / 'got_sigterm').exists()
  assert p.stdout.count('stopped by the time limit of 8 s during') == 2


# --- What it shares with `jkd pipeline` (jkd.pipeline). ----------------------------------------

def _leave_summaries(workdirs):
  """workdirs[0] without summary.json, [1] finished, [2] with one cut off while being written,
  [3] with one that is no JSON object."""
  for wd, text in zip(workdirs[1:], ('{"test_accuracy": 0.5}', '{"test_acc', '[0.5]')):
    os.makedirs(wd)
    with open(os.path.join(wd, 'summary.json'), 'w') as f:
      f.write(text)


def test_it_skips_the_runs_jkd_pipeline_skips(tmp_path, monkeypatch, capsys):
  """Both walk their runs with `jkd.pipeline.run_in_order`: only a whole summary.json (a JSON
  object) makes a run finished and skipped; the others run again."""
  from jkd import pipeline, trainers
  seeds = [str(tmp_path / 'root' / 'tiny' / 'sup_resnet18' / f'seed{s}') for s in range(4)]
  _leave_summaries(seeds)
  assert [pipeline.finished(wd) for wd in seeds] == [None, {'test_accuracy': 0.5}, None, None]
  p = _run_fake(tmp_path, '--table', 'supervised', '--seeds', '0', '1', '2', '3')
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert re.findall(r'^fake jkd .* --workdir (\S+)', p.stdout, re.M) == [
      seeds[0], seeds[2], seeds[3]]
  assert p.stdout.count('skipped') == 1 and (
      f'[2/4] skipped sup_resnet18 seed 1: {seeds[1]} has summary.json') in p.stdout
  # `jkd pipeline` with the same four workdirs as its stages trains the same three.
  trained = []

  class Trainer:
    def train(self, config, workdir):
      trained.append((workdir, config.seed))
      return {'test_accuracy': 0.7}

  monkeypatch.setattr(trainers, 'get', lambda command, config: Trainer())
  w = tmp_path / 'pipeline'
  _leave_summaries([str(w / f'seed{s}') for s in range(4)])
  summaries = pipeline.run_stages(ml_collections.ConfigDict(dict(
      order=tuple(f'seed{s}' for s in range(4)),
      stages={f'seed{s}': pipeline.stage('train', 'fashion_mnist/supervised.py:tiny',
                                         [f'seed={s}']) for s in range(4)})), str(w))[0]
  assert trained == [(str(w / f'seed{s}'), s) for s in (0, 2, 3)]
  assert summaries['seed1'] == {'test_accuracy': 0.5}
  assert capsys.readouterr().out.count('already done, skipped') == 1


def test_a_run_is_the_jkd_pipeline_stage_of_the_same_command(tmp_path):
  """A run is a `jkd.pipeline.Stage`: the `jkd pipeline` stage with the same command, config,
  seed and teacher has its command line, and this script launches exactly that."""
  from jkd import pipeline
  teacher = rt.workdir(str(tmp_path), 'gpu', 'teacher', 0)
  os.makedirs(teacher)  # A pipeline takes a reference that names no stage of it for a workdir.
  run = rt.make_run('kd', 1, root=str(tmp_path), scale='gpu', launcher=['python', '-m', 'jkd.cli'],
                    extra=['--config.log_every=1'])
  assert isinstance(run, pipeline.Stage) and run.references == {'teacher.workdir': teacher}
  [stage] = pipeline.plan(ml_collections.ConfigDict(dict(stages=dict(
      seed1=pipeline.stage('distill', 'fashion_mnist/distill.py:kd', ['seed=1'],
                           teacher=teacher)))), os.path.dirname(run.workdir))
  # The same but for the config's path: the pipeline's is absolute, this script's relative.
  assert stage.args() == dataclasses.replace(run, config=os.path.abspath(run.config)).args()
  assert run.argv == ['python', '-m', 'jkd.cli', *run.args(['--config.log_every=1'])]
  assert run.display == 'jkd ' + ' '.join(run.args(['--config.log_every=1']))


def test_planning_skipping_and_reporting_leave_jax_uninitialised(tmp_path):
  """The script is the parent process of runs that use the GPU: jkd.pipeline, the plan, the
  finished check and the report must not initialise a JAX backend (it would take GPU memory)."""
  root = str(tmp_path)
  wd = rt.workdir(root, 'tiny', 'student_scratch', 0)
  os.makedirs(wd)
  with open(os.path.join(wd, 'summary.json'), 'w') as f:  # Its environment: nothing to probe.
    json.dump({'test_accuracy': 0.8, 'environment': {'platform': 'cpu'}}, f)
  code = textwrap.dedent(f'''
      import importlib.util, json, sys
      spec = importlib.util.spec_from_file_location('results_tables', {RUNNER!r})
      rt = importlib.util.module_from_spec(spec)
      sys.modules['results_tables'] = rt
      spec.loader.exec_module(rt)
      for mode in ('--dry-run', '--report-only'):
        assert rt.main(['--table', 'compress', '--scale', 'tiny', '--seeds', '0', '--root',
                        {root!r}, mode]) == 0
      bridge = sys.modules.get('jax._src.xla_bridge')  # Absent unless jax was imported.
      print(json.dumps(sorted(bridge._backends) if bridge else []))
  ''')
  p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                     cwd=REPO)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert '# done: jkd train' in p.stdout and '| fp32 student |' in p.stdout
  assert json.loads(p.stdout.strip().splitlines()[-1]) == []


# --- The real thing at tiny size. ---------------------------------------------------------------

@pytest.mark.slow
def test_tiny_distill_table_end_to_end_and_rerun_skips(tmp_path):
  args = [sys.executable, RUNNER, '--table', 'distill', '--scale', 'tiny', '--seeds', '0', '1',
          '--rows', 'scratch', 'kd', '--root', str(tmp_path)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
  assert p.stdout.count('[distill] done') == 2 and p.stdout.count('[train] done') == 3
  table_dir = tmp_path / 'tiny' / 'tables' / 'distill'
  md = open(table_dir / 'table.md').read()
  for label, n in (('student from scratch', 2), ('KD (0.1 CE + 0.9 KD, T=4)', 2),
                   ('teacher (resnet20_s, seed 0 only)', 1)):
    line = next(l for l in md.splitlines() if l.startswith(f'| {label} |'))  # noqa: E741
    assert ' ± ' in line and f'| {n} |' in line, line
  results = json.load(open(table_dir / 'results.json'))
  rows = {r['name']: r for r in results['rows']}
  assert len(rows['scratch']['test_accuracy']['values']) == 2
  assert len(rows['kd']['test_accuracy']['values']) == 2
  assert rows['kd']['delta_vs_baseline'] is not None
  assert results['runs']['kd/seed1']['command'].startswith(
      'jkd distill --config configs/fashion_mnist/distill.py:tiny-kd ')
  assert results['environments'][0]['platform'] == 'cpu'
  t0 = time.time()
  p = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  assert p.returncode == 0 and p.stdout.count('skipped') == 5 and 'done in' not in p.stdout
  assert time.time() - t0 < 30
