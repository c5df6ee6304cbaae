r"""Every GPU measurement jkd still owes, in one command sized to one device lease.

On the lent GPU machine (after `benchmarks/gpu/prepare.sh` here filled `.carry/`):

  python3 benchmarks/gpu/session.py --budget 540 --out $OUT [--steps NAME ...]
  python3 benchmarks/gpu/session.py --list              # the steps, in order, with their issues
  python3 benchmarks/gpu/session.py --cpu-check --out /tmp/s   # the same steps at toy size, on CPU

A lease gives 15 minutes of device time, a minute or two of it spent starting the machine, and
at most 10 minutes per command, so the steps run in priority order inside `--budget` seconds:
a step starts only if the time left covers its `min_s`, and is stopped (SIGTERM to its process
group, SIGKILL 20 s later) when it reaches its `max_s` or the budget. Whatever finished is kept:

  OUT/session.log    everything every step printed
  OUT/session.json   per step: status (ok, failed, timed out, skipped), seconds, command
  OUT/bench_gpu.md   the jkd-vs-timm table of the bench jobs that finished (benchmarks/compare.py)
  OUT/results_gpu.md the Fashion-MNIST table sections that finished (benchmarks/results_tables.py)
  OUT/runs.tar.gz    every small file the runs wrote (json, jsonl, md, png, logs; no checkpoints)

Steps, in the default order: `install` (the wheels of `.carry/whl` into a private directory put
first on PYTHONPATH: the image has jax, flax, optax, orbax, torch and timm, not grain, TFDS,
ml_collections or qwix), `env` (versions, devices; a failure here stops the session), the
bench jobs that have speed targets (issue 8: ViT-B/16, KD ViT-B/16 -> ViT-S/16, MAE ViT-B/16,
ResNet-50), the supervised ResNet-18 run (issue 2), the other bench jobs, the largest
teacher+student pair on one GPU (issue 7), a cuDNN-vs-reference attention check, ViT-B/16's
step time with activation checkpointing (`remat`), the teacher-cache speed-up (ViT-B -> ViT-S,
one KD epoch online and from the cache: `teacher_cache`), then the
3-seed result tables (issues 4, 5, 6), 4 runs at a time (`results_tables.py --parallel 4`),
which may take several leases: `results_tables.py` resumes, but a fresh machine keeps nothing,
so each lease should name the table rows it can finish (`--table-args`).

Only the standard library is imported here; each step is a child process.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CARRY = os.path.join(REPO, '.carry')
PY = sys.executable
JKD = [PY, '-m', 'jkd.cli']
BENCH_FIRST = ('vit_b16', 'kd_vit_b16_s16', 'mae_vit_b16', 'resnet50')  # the speed targets
BENCH_REST = ('vit_s16', 'simmim_vit_b16', 'qat_vit_s16')
PLAN_PAIRS = (('vit_h14', 'vit_b16', (256, 512)),)  # the largest pair of docs/scaling.md
TABLE_FILES = ('summary.json', 'bench.json', 'plan.json', 'results.json', 'report.json',
               'pipeline.json', 'metrics.jsonl', '*.md', '*.png', '*.log')
RESERVE_S = 20  # kept back for writing the outputs
KILL_GRACE_S = 20  # SIGTERM -> SIGKILL: a jkd run saves a checkpoint on SIGTERM


@dataclasses.dataclass(frozen=True)
class Step:
  """One child process. `command(ctx)` returns argv; `min_s` is what makes starting it worth it."""
  name: str
  issue: str
  min_s: float
  max_s: float
  command: object  # Callable[[Context], list[str]]
  required: bool = False  # a failure stops the session


@dataclasses.dataclass
class Context:
  work: str        # workdirs of every step
  cpu_check: bool  # toy sizes, no timm, on CPU: checks this script, measures nothing
  table_args: tuple[str, ...] = ()  # appended to every results_tables.py command


def _install(ctx: Context) -> list[str]:
  wheels = sorted(glob.glob(os.path.join(CARRY, 'whl', '*.whl')))
  if not wheels:  # A machine that has everything (or a CPU check in a jkd venv).
    return [PY, '-c', 'print("no wheels in .carry/whl: nothing to install")']
  return [PY, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile',
          '--no-cache-dir', '--upgrade', '--target', site_dir(ctx), *wheels]


ENV_CHECK = r'''
import importlib.metadata as md, platform, subprocess, sys
print('python', platform.python_version(), sys.executable)
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorstore', 'grain',
             'tensorflow-datasets', 'ml_collections', 'qwix', 'etils', 'protobuf', 'numpy',
             'torch', 'timm'):
  try:
    print(f'{name:20s}', md.version(name))
  except md.PackageNotFoundError:
    print(f'{name:20s}', 'not installed')
import jax
print('devices', jax.devices())
import jkd, jkd.cli, jkd.data, jkd.compress, qwix, grain, tensorflow_datasets  # noqa: F401
from jkd.data import sources
print('fashion-mnist search path', sources.fashion_mnist_search_path(None))
try:
  print(subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip())
except OSError:
  print('no nvidia-smi')
'''


def _env(ctx: Context) -> list[str]:
  return [PY, '-c', ENV_CHECK]


def _bench(job: str):
  def command(ctx: Context) -> list[str]:
    cmd = [PY, os.path.join(REPO, 'benchmarks', 'compare.py'), '--jobs', job, '--gap',
           '--workdir', os.path.join(ctx.work, 'bench')]
    return cmd + (['--config-arg', 'tiny', '--skip-timm'] if ctx.cpu_check else [])
  return command


TABLE_PARALLEL = 4  # Fashion-MNIST runs side by side on the GPU: each uses a small part of it.


def _table(table: str, seeds: tuple[int, ...], rows: tuple[str, ...] = (), parallel: int = 1):
  def command(ctx: Context) -> list[str]:
    cmd = [PY, os.path.join(REPO, 'benchmarks', 'results_tables.py'), '--table', table,
           '--seeds', *map(str, seeds), '--root', os.path.join(ctx.work, 'tables'),
           '--out', os.path.join(ctx.work, 'results_gpu.md'),
           '--parallel', str(min(parallel, 2) if ctx.cpu_check else parallel)]
    cmd += ['--rows', *rows] if rows else []
    cmd += ['--scale', 'tiny'] if ctx.cpu_check else []
    return cmd + list(ctx.table_args)  # Last: its --seeds/--rows win over the defaults.
  return command


def _bash(commands: list[str]) -> list[str]:
  """One step of several commands, echoed, stopping at the first that fails."""
  return ['bash', '-c', '\n'.join(['set -x'] + [c + ' || exit 1' for c in commands])]


def _plan(ctx: Context) -> list[str]:
  """Largest batch of each pair whose distill step compiles and runs (docs/scaling.md)."""
  lines = []
  for teacher, student, batches in PLAN_PAIRS:
    if ctx.cpu_check:
      teacher, student, batches = 'vit_nano_p4', 'vit_nano_p4', (4,)
    config = 'configs/bench/vit_b16.py' + (':cpu' if ctx.cpu_check else '')
    for batch in batches:
      workdir = os.path.join(ctx.work, 'plan', f'{teacher}_{student}_{batch}')
      lines.append(shlex.join([
          *JKD, 'plan', '--config', config, f'--config.model.name={student}', '--teacher',
          teacher, '--config.mesh.data=1', f'--config.batch_size={batch}', '--measure',
          '--workdir', workdir]))
  return _bash(lines)


ATTENTION_CHECK = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from jkd import models
cpu = len(sys.argv) > 1  # on CPU 'xla' stands in for 'cudnn'
name, size, fast_impl = ('vit_nano_p4', 28, 'xla') if cpu else ('vit_s16', 224, 'cudnn')
x = jax.random.normal(jax.random.key(0), (8, size, size, 3), jnp.float32)
kwargs = dict(num_classes=10, dtype=jnp.bfloat16, pool='gap')
# sow_attention=False keeps the fused kernel while block outputs are tapped; the default model
# sows the attention maps, which takes the explicit softmax path. Both read the same weights.
fast_model = models.create(name, attention=fast_impl, sow_attention=False, **kwargs)
reference_model = models.create(name, attention=fast_impl, **kwargs)
variables = jax.jit(fast_model.init)(jax.random.key(1), x)
outputs = []
for model in (fast_model, reference_model):
  _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(variables, x)
  outputs.append(np.asarray(models.block_outputs(state['intermediates'])[-1], np.float32))
fast, reference = outputs
err, scale = float(np.max(np.abs(fast - reference))), float(np.max(np.abs(reference)))
print(f'{name} bf16, last block output, {fast_impl} vs explicit attention: max abs diff '
      f'{err:.4f} (largest value {scale:.3f})')
assert err <= 2e-2 * max(1.0, scale), 'fused attention differs from the reference path'
'''


def _remat(ctx: Context) -> list[str]:
  """The step-time price of activation checkpointing: ViT-B/16 with remat 'dots' and 'full'
  (bench:vit_b16 is the 'none' figure)."""
  config = 'configs/bench/vit_b16.py' + (':tiny' if ctx.cpu_check else '')
  return _bash([shlex.join([*JKD, 'bench', '--config', config,
                             f'--config.model.remat={policy}', '--workdir',
                             os.path.join(ctx.work, 'bench_remat', policy)])
                for policy in ('dots', 'full')])


def _teacher_cache(ctx: Context) -> list[str]:
  """Issue 5's teacher-cache speed-up: a ViT-B teacher (patch 4 on 28x28: 49 tokens) trained
  briefly, then one epoch of KD into a ViT-S student with the online teacher and one from the
  cache (built in that run); summary.json of each has examples/s, wall_s and accuracy."""
  root = os.path.join(ctx.work, 'teacher_cache')
  teacher, student = ('vit_nano_p4', 'vit_nano_p4') if ctx.cpu_check else ('vit_b16', 'vit_s16')
  size = [] if ctx.cpu_check else ['--config.model.patch_size=4']
  dtype = [] if ctx.cpu_check else ['--config.model.dtype=bfloat16']
  epochs = '0.05' if ctx.cpu_check else '1.0'
  train = [*JKD, 'train', '--config', 'configs/fashion_mnist/supervised.py', '--workdir',
           os.path.join(root, 'teacher'), f'--config.model.name={teacher}', *size, *dtype,
           '--config.optim.lr=1e-3', '--config.optim.weight_decay=0.05', '--config.batch_size=256',
           f'--config.num_epochs={"0.05" if ctx.cpu_check else "3.0"}']
  distill = [*JKD, 'distill', '--config', 'configs/fashion_mnist/distill.py',
             f'--config.teacher.workdir={os.path.join(root, "teacher")}',
             f'--config.model.name={student}', *size, *dtype, '--config.batch_size=256',
             f'--config.num_epochs={epochs}']
  if not ctx.cpu_check:
    distill.append('--config.teacher.dtype=bfloat16')
  runs = [train, distill + ['--workdir', os.path.join(root, 'online')],
          distill + ['--workdir', os.path.join(root, 'cached'),
                     f'--config.teacher.cache.dir={os.path.join(root, "cache")}']]
  return _bash([shlex.join(r) for r in runs])


def _attention(ctx: Context) -> list[str]:
  return [PY, '-c', ATTENTION_CHECK] + (['cpu'] if ctx.cpu_check else [])


def steps() -> list[Step]:
  """Every step in the default (priority) order."""
  out = [Step('install', 'all', 5, 180, _install, required=True),
         Step('env', 'all', 5, 120, _env, required=True)]
  out += [Step(f'bench:{job}', '8', 90, 240, _bench(job)) for job in BENCH_FIRST]
  out.append(Step('supervised', '2', 150, 420, _table('supervised', (0,))))
  out += [Step(f'bench:{job}', '8', 90, 240, _bench(job)) for job in BENCH_REST]
  out.append(Step('plan', '7', 60, 240, _plan))
  out.append(Step('attention', '8', 20, 90, _attention))
  out.append(Step('remat', '7', 60, 240, _remat))
  out.append(Step('teacher_cache', '5', 150, 480, _teacher_cache))
  for table, issue in (('mim', '4'), ('distill', '5'), ('compress', '6')):
    out.append(Step(f'table:{table}', issue, 120, 100_000,
                    _table(table, (0, 1, 2), parallel=TABLE_PARALLEL)))
  return out


def site_dir(ctx: Context) -> str:
  return os.path.join(ctx.work, 'site')


def child_env(ctx: Context) -> dict:
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (site_dir(ctx), REPO, os.environ.get('PYTHONPATH')) if p)
  data = os.path.join(CARRY, 'fashion-mnist')
  if os.path.isdir(data):
    env.setdefault('JKD_FASHION_MNIST_DIR', data)
  if not ctx.cpu_check:  # jax takes 75% of the GPU by default; the plan step needs more.
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '.95')
  return env


class Log:
  """Writes to stdout and session.log at once."""

  def __init__(self, path: str):
    self._file = open(path, 'a', buffering=1)

  def __call__(self, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    self._file.write(text)


def run_child(argv: list[str], env: dict, limit_s: float, log: Log) -> tuple[str, int | None]:
  """Runs argv in its own process group, streaming its output; stops it after limit_s."""
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors='replace',
                          start_new_session=True)
  stopped = threading.Event()

  def stop():
    stopped.set()
    log(f'[session] time limit of {limit_s:.0f} s reached: SIGTERM\n')
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
      try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
        return
      except ProcessLookupError:
        return
      except subprocess.TimeoutExpired:
        continue

  timer = threading.Timer(limit_s, stop)
  timer.start()
  try:
    for line in proc.stdout:
      log(line)
    code = proc.wait()
  finally:
    timer.cancel()
  if stopped.is_set():
    return 'timed out', code
  return ('ok' if code == 0 else 'failed'), code


def select(names: list[str] | None) -> list[Step]:
  every = {s.name: s for s in steps()}
  if not names:
    return list(every.values())
  unknown = [n for n in names if n not in every]
  if unknown:
    raise SystemExit(f'session.py: unknown step(s) {unknown}; --list shows them')
  # install and env always come first: nothing else runs without them.
  return [every['install'], every['env']] + [every[n] for n in names
                                             if n not in ('install', 'env')]


def collect(ctx: Context, out: str, log: Log) -> None:
  """Copies the tables and packs the small files of every run into out/runs.tar.gz."""
  from importlib import util
  spec = util.spec_from_file_location('compare', os.path.join(REPO, 'benchmarks', 'compare.py'))
  compare = util.module_from_spec(spec)
  spec.loader.exec_module(compare)
  bench_root = os.path.join(ctx.work, 'bench')
  jkd, timm = {}, {}
  for job in BENCH_FIRST + BENCH_REST:
    for path, into in ((os.path.join(bench_root, job, 'bench.json'), jkd),
                       (os.path.join(bench_root, f'timm.{job}.json'), timm)):
      if os.path.exists(path):
        with open(path) as f:
          data = json.load(f)
        into[job] = data[0] if isinstance(data, list) else data
  if jkd:
    with open(os.path.join(out, 'bench_gpu.md'), 'w') as f:
      f.write(compare.markdown(jkd, timm))
  results = os.path.join(ctx.work, 'results_gpu.md')
  if os.path.exists(results):
    with open(results) as src, open(os.path.join(out, 'results_gpu.md'), 'w') as dst:
      dst.write(src.read())
  site = site_dir(ctx)
  with tarfile.open(os.path.join(out, 'runs.tar.gz'), 'w:gz') as tar:
    for root, dirs, files in os.walk(ctx.work):
      dirs[:] = [d for d in dirs if os.path.join(root, d) != site and d != 'checkpoints']
      for name in files:
        if any(fnmatch.fnmatch(name, pattern) for pattern in TABLE_FILES):
          path = os.path.join(root, name)
          if os.path.getsize(path) < 4 << 20:
            tar.add(path, arcname=os.path.relpath(path, ctx.work))
  log(f'[session] outputs in {out}: {sorted(os.listdir(out))}\n')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--budget', type=float, default=540,
                      help='seconds for the whole session (keep it under the 600 s command '
                           'limit, and under the lease\'s device time left)')
  parser.add_argument('--out', default=os.environ.get('OUT'), help='output folder (default $OUT)')
  parser.add_argument('--work', default='/tmp/jkd_session', help='workdirs of the steps')
  parser.add_argument('--steps', nargs='+', help='run these steps (in this order) after '
                      'install and env; default: all, in priority order')
  parser.add_argument('--table-args', default='',
                      help="added to the table steps' results_tables.py commands, e.g. "
                           "'--rows scratch kd --seeds 0 1' for a table too long for one lease")
  parser.add_argument('--cpu-check', action='store_true',
                      help='toy sizes, no timm: checks the script itself on a CPU')
  parser.add_argument('--list', action='store_true', help='print the steps and exit')
  args = parser.parse_args(argv)
  chosen = select(args.steps)
  if args.list:
    for s in chosen:
      print(f'{s.name:24s} issue {s.issue:4s} min {s.min_s:4.0f} s  max {s.max_s:6.0f} s')
    return 0
  if not args.out:
    parser.error('--out is required (or set $OUT)')
  deadline = time.monotonic() + args.budget
  os.makedirs(args.out, exist_ok=True)
  ctx = Context(work=args.work, cpu_check=args.cpu_check,
                table_args=tuple(shlex.split(args.table_args)))
  os.makedirs(ctx.work, exist_ok=True)
  log = Log(os.path.join(args.out, 'session.log'))
  env = child_env(ctx)
  record = []
  for step in chosen:
    left = deadline - time.monotonic() - RESERVE_S
    argv = step.command(ctx)
    entry = dict(step=step.name, issue=step.issue, command=shlex.join(argv))
    if left < step.min_s:
      entry.update(status='skipped', reason=f'{left:.0f} s left, needs {step.min_s:.0f}')
      log(f'[session] skip {step.name}: {entry["reason"]}\n')
    else:
      limit = min(step.max_s, left)
      log(f'\n[session] === {step.name} (issue {step.issue}, limit {limit:.0f} s) ===\n'
          f'$ {entry["command"][:400]}\n')
      start = time.monotonic()
      status, code = run_child(argv, env, limit, log)
      entry.update(status=status, exit_code=code, seconds=round(time.monotonic() - start, 1))
      log(f'[session] {step.name}: {status} in {entry["seconds"]} s\n')
    record.append(entry)
    with open(os.path.join(args.out, 'session.json'), 'w') as f:
      json.dump(dict(budget_s=args.budget, cpu_check=args.cpu_check, steps=record), f, indent=1)
    if step.required and entry['status'] != 'ok':
      log(f'[session] {step.name} did not succeed: nothing else can run\n')
      break
  collect(ctx, args.out, log)
  failed = [e['step'] for e in record if e['status'] in ('failed', 'timed out')]
  log(f'[session] done: {len(record) - len(failed)} of {len(record)} steps without failure'
      + (f'; not ok: {failed}' if failed else '') + '\n')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
