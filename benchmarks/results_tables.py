r"""Runs the Fashion-MNIST result tables over several seeds and writes them as markdown + JSON.

  python benchmarks/results_tables.py --table distill --seeds 0 1 2 --root runs/tables \
      [--scale gpu|cpu|tiny] [--rows kd dkd] [--out docs/results_gpu.md] [--time-limit 540] \
      [--parallel 4] [--dry-run | --report-only] [-- --config.a.b=value ...]

Tables (each a declarative spec below: rows -> jkd runs with their dependencies):
  supervised  ResNet-18 `supervised.py:gpu` (issue target >= 94.5%).
  mim         ViT fine-tuned from scratch vs. from an MAE / a SimMIM pretraining of the same seed.
  distill     mdistiller-style: one teacher (seed 0), the student from scratch, every recipe of
              configs/fashion_mnist/distill.py, and DeiT beside its own ViT-from-scratch baseline.
  compress    the scratch student in fp32, PTQ, QAT int8, QAT+KD int8, 50% and 2:4 pruning, with
              the export's size and accuracy.

Every run is an ordinary `jkd` command (`python -m jkd.cli`) in a child process, its output
streamed here and appended to WORKDIR.log, the seed given as `--config.seed=N`. Workdirs are
ROOT/SCALE/JOB/seedN and shared between tables (the distill table's teacher and scratch student
are the compress table's). Each run is a `jkd.pipeline.Stage`, planned and skipped as
`jkd pipeline` does its stages: a workdir holding summary.json is finished and skipped; any other
is rerun with the same command, which resumes from its checkpoints. So an invocation cut off
by a time limit is continued by running it again. `--time-limit S` stops cleanly after S
seconds (the current run gets SIGTERM and saves a checkpoint; exit code 3): give it a minute
less than the limit imposed from outside. SIGTERM/SIGINT to this script do the same.
`--parallel N` runs up to N at once (a run starts when the runs it needs have finished): the
Fashion-MNIST models use a small part of a GPU, so N seeds or recipes side by side take about
the time of one.

Writes ROOT/SCALE/tables/TABLE/table.md and results.json (every per-seed number, the exact
command of every run, the device and versions it ran on), and with `--out FILE` replaces (or
appends) this table's section of FILE. The spread is the sample standard deviation over seeds
(n - 1 in the denominator), with min-max beside it. `--scale tiny` swaps every config for its
`:tiny` test-suite size: the whole pipeline then runs on a CPU in seconds per command.
`--scale cpu` keeps the recipes but shortens them to `jkd demo`'s CPU sizes (students 0.7 epoch
without augmentation, ViTs `vit_micro_p7`): a real, small-budget table on a 2-core machine.
Exit codes: 0 done, 1 a run failed, 2 bad arguments, 3 time limit, 128+N stopped by signal N.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

from jkd import cpu_budget, pipeline  # Neither imports jax, nor does this script.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs', 'fashion_mnist')
SCALES = ('gpu', 'cpu', 'tiny')
EXIT_FAILED, EXIT_TIME_LIMIT = 1, 3  # argparse exits 2 on bad arguments


@dataclasses.dataclass(frozen=True)
class Job:
  """One jkd run; instantiated per seed, or once (seed 0) when `once`."""
  command: str                        # jkd subcommand: train, pretrain, distill, compress
  config: str                         # file in configs/fashion_mnist/
  gpu_arg: str = ''                   # the config's argument at --scale gpu ('' = its default)
  tiny_arg: str = 'tiny'              # ... and at --scale tiny
  overrides: tuple[str, ...] = ()     # `a.b=v` at both scales
  gpu_overrides: tuple[str, ...] = ()  # `a.b=v` at --scale gpu only (tiny sets its own sizes)
  cpu_overrides: tuple[str, ...] = ()  # `a.b=v` at --scale cpu, after `overrides`
  cpu_arg: str | None = None          # the config's argument at --scale cpu (None = gpu_arg)
  needs: tuple[tuple[str, str], ...] = ()  # (config field, job): field = that job's workdir
  once: bool = False

  def arg(self, scale: str) -> str:
    """The config's argument (after the colon) at this scale."""
    if scale == 'tiny':
      return self.tiny_arg
    return self.gpu_arg if scale == 'gpu' or self.cpu_arg is None else self.cpu_arg

  def scale_overrides(self, scale: str) -> tuple[str, ...]:
    """`a.b=v` overrides at this scale, one per key: the scale's own replace the common ones."""
    merged = {}
    for o in self.overrides + {'gpu': self.gpu_overrides, 'cpu': self.cpu_overrides}.get(scale, ()):
      merged[o.split('=', 1)[0]] = o
    return tuple(merged.values())


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str
  job: str                            # the run whose summary.json the row reports
  baseline: str | None = None         # row whose mean accuracy the Δ column subtracts


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  about: str
  rows: tuple[Row, ...]
  sizes: bool = False                 # compress: export bytes, ratio, sparsity columns
  chain_wall: bool = False            # mim: wall of pretraining + fine-tuning per seed
  about_cpu: str = ''                 # what --scale cpu changes (models, lengths)


DISTILL_RECIPES = ('kd', 'dkd', 'dist', 'kd_logit_std', 'fitnet', 'at', 'rkd')
COMPRESS_VARIANTS = ('ptq', 'qat', 'qat_kd', 'prune50', 'prune24', 'channel50')
# The scratch students copy distill.py's data, optimiser and schedule (crop + flip, 6 epochs,
# batch 128) so that only the loss differs; tests/test_results_tables.py checks the match.
_STUDENT = ('optim.lr=3e-3', 'optim.weight_decay=1e-4', 'data.crop_padding=2', 'data.flip=true',
            'num_epochs=6.0')
_STUDENT_GPU = ('batch_size=128', 'optim.warmup_steps=200')
# --scale cpu: the recipes of `jkd demo`, sized for a 2-core CPU (jkd.cpu_budget, shared with
# configs/demo.py); scratch and distilled students still see the same data.
_VIT_CPU = cpu_budget.NO_AUG + cpu_budget.VIT + ('num_epochs=1.0', 'batch_size=128',
                                                 'optim.lr=2e-3', 'optim.warmup_steps=100')
_FINETUNE_CPU = cpu_budget.FINETUNE + ('num_epochs=3',)


def _compress_cpu(variant: str) -> tuple[str, ...]:
  """compress.py:VARIANT at --scale cpu: QAT 0.3 epoch, pruning 0.5, PTQ its one step."""
  epochs = {'ptq': (), 'prune50': ('num_epochs=0.5',), 'prune24': ('num_epochs=0.5',),
            'channel50': ('num_epochs=0.5',)}
  return cpu_budget.NO_AUG + epochs.get(variant, ('num_epochs=0.3',))


_TEACHER = (('teacher.workdir', 'teacher'),)
_VIT_TEACHER = (('teacher.workdir', 'vit_teacher'),)
# The distill table's rows of issue 22 (distill.py recipes beyond DISTILL_RECIPES): each its
# teachers. 'kd_vit' is the KD recipe from the ViT teacher alone, the single-teacher control of
# 'multi' (the same student budget as 'kd' from the ResNet teacher).
CANON_RECIPES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    'multi': ('multi', (('teachers.resnet.workdir', 'teacher'),
                        ('teachers.vit.workdir', 'vit_teacher'))),
    'kd_vit': ('kd', _VIT_TEACHER),
    'crd': ('crd', _TEACHER),
    'reviewkd': ('reviewkd', _TEACHER),
    'ofa': ('ofa', _VIT_TEACHER),    # a ViT teacher -> the CNN student
    'tfkd': ('tfkd', ()),            # no teacher
}
# QAT + KD learns from the distill table's teacher; the channel-pruned student from its own
# unpruned parent (compress.py:channel50).
_COMPRESS_TEACHER = {'qat_kd': _TEACHER, 'channel50': (('teacher.workdir', 'student_scratch'),)}

JOBS: dict[str, Job] = {
    # At --scale cpu: supervised.py's default (resnet8_s, >= 91% in 10 minutes on 2 cores).
    'sup_resnet18': Job('train', 'supervised.py', gpu_arg='gpu', cpu_arg=''),
    # The teacher docs/distillation.md names; trained once.
    'teacher': Job('train', 'supervised.py', overrides=('model.name=resnet20_s',), once=True,
                   cpu_overrides=('num_epochs=2.0',)),
    'student_scratch': Job('train', 'supervised.py', overrides=_STUDENT,
                           gpu_overrides=_STUDENT_GPU, cpu_overrides=cpu_budget.STUDENT),
    # DeiT's baseline: the same ViT (class token, no distillation token) and optimiser, CE only.
    'vit_scratch': Job('train', 'supervised.py', overrides=(
        'model.name=vit_nano_p4', 'model.pool=token', 'optim.lr=1e-3', 'optim.weight_decay=0.05',
        'data.crop_padding=2', 'data.flip=true', 'num_epochs=6.0'), gpu_overrides=_STUDENT_GPU,
        cpu_overrides=_VIT_CPU),
    **{r: Job('distill', 'distill.py', gpu_arg=r, tiny_arg=f'tiny-{r}', needs=_TEACHER,
              cpu_overrides=_VIT_CPU if r == 'deit' else cpu_budget.STUDENT)
       for r in DISTILL_RECIPES + ('deit',)},
    # The ViT teacher of the multi-teacher and OFA rows: finetune.py's ViT from scratch, once.
    'vit_teacher': Job('train', 'finetune.py', once=True,
                       cpu_overrides=cpu_budget.FINETUNE + ('num_epochs=5',)),
    **{name: Job('distill', 'distill.py', gpu_arg=recipe, tiny_arg=f'tiny-{recipe}',
                 needs=needs, cpu_overrides=cpu_budget.STUDENT)
       for name, (recipe, needs) in CANON_RECIPES.items()},
    'ft_scratch': Job('train', 'finetune.py', cpu_overrides=_FINETUNE_CPU),
    'mae': Job('pretrain', 'mae.py',
               cpu_overrides=cpu_budget.MIM_PRETRAIN + cpu_budget.MAE_DECODER),
    'simmim': Job('pretrain', 'simmim.py',
                  cpu_overrides=cpu_budget.MIM_PRETRAIN + ('mask_patch_size=7',)),
    'ft_mae': Job('train', 'finetune.py', needs=(('init_from', 'mae'),),
                  cpu_overrides=_FINETUNE_CPU),
    'ft_simmim': Job('train', 'finetune.py', needs=(('init_from', 'simmim'),),
                     cpu_overrides=_FINETUNE_CPU),
    **{v: Job('compress', 'compress.py', gpu_arg=v, tiny_arg=f'tiny-{v}',
              needs=(('init_from', 'student_scratch'),) + _COMPRESS_TEACHER.get(v, ()),
              cpu_overrides=_compress_cpu(v))
       for v in COMPRESS_VARIANTS},
    # The pipeline users run (and `jkd demo`): the KD student, then int8 QAT with the same teacher.
    'kd_qat_kd': Job('compress', 'compress.py', gpu_arg='qat_kd', tiny_arg='tiny-qat_kd',
                     needs=(('init_from', 'kd'),) + _TEACHER,
                     cpu_overrides=_compress_cpu('qat_kd')),
}

_RECIPE_LABELS = {'kd': 'KD (0.1 CE + 0.9 KD, T=4)', 'dkd': 'DKD', 'dist': 'DIST',
                  'kd_logit_std': 'KD with logit standardization', 'fitnet': 'FitNet (+ KD)',
                  'at': 'AT', 'rkd': 'RKD',
                  'multi': 'KD from two teachers (ResNet + ViT, logits averaged; `:multi`)',
                  'kd_vit': 'KD from the ViT teacher alone', 'crd': 'CRD (`:crd`)',
                  'reviewkd': 'ReviewKD (`:reviewkd`)',
                  'ofa': 'OFA-KD from the ViT teacher (`:ofa`)',
                  'tfkd': 'Teacher-free KD, Tf-KD_reg (`:tfkd`)'}
TABLES: dict[str, Table] = {t.name: t for t in (
    Table('supervised', 'Supervised Fashion-MNIST', (
        '`jkd train --config configs/fashion_mnist/supervised.py:gpu` (ResNet-18 small stem, '
        '40 epochs, batch 256, bf16, crop + flip, label smoothing 0.1). Issue target: >= 94.5%.'),
          (Row('resnet18_s', 'ResNet-18 (`supervised.py:gpu`)', 'sup_resnet18'),),
          about_cpu=('the row is `supervised.py`\'s default (resnet8_s, 5.8 epochs), not '
                     'ResNet-18.')),
    Table('mim', 'MIM pretraining → fine-tuning vs. from scratch', (
        'The ViT of `finetune.py` trained from scratch, and fine-tuned from an MAE '
        '(`mae.py`) or a SimMIM (`simmim.py`) pretraining of the same seed.'),
          (Row('scratch', 'ViT from scratch (`finetune.py`)', 'ft_scratch'),
           Row('mae_ft', 'MAE → fine-tune', 'ft_mae', 'scratch'),
           Row('simmim_ft', 'SimMIM → fine-tune', 'ft_simmim', 'scratch')), chain_wall=True,
          about_cpu=('every ViT is `vit_micro_p7` (16 tokens of 7×7 pixels, width 64, depth 4); '
                     'pretraining 600 steps × 128 as `jkd demo` (MAE decoder 64 × 1, SimMIM '
                     'masks 7×7 patches), fine-tuning 3 epochs without augmentation, drop path '
                     '0, layer decay 0.85, lr 3e-3.')),
    Table('distill', 'Knowledge distillation (mdistiller-style)', (
        'One teacher (`supervised.py` with resnet20_s, seed 0, as docs/distillation.md), '
        'students of `distill.py:RECIPE` (resnet8_s, 6 epochs) beside the same student trained '
        'from scratch with the same data and schedule; DeiT (`:deit`, vit_nano_p4 with a '
        'distillation token) beside that ViT from scratch. Issue 22\'s rows: a second, ViT '
        'teacher (`finetune.py` trained from scratch, seed 0), KD from both teachers at once '
        '(`:multi`) beside KD from each alone (`kd`, `kd_vit`: the same student budget), CRD, '
        'ReviewKD, OFA-KD from the ViT teacher into the CNN student, and teacher-free KD.'),
          (Row('teacher', 'teacher (resnet20_s, seed 0 only)', 'teacher'),
           Row('scratch', 'student from scratch', 'student_scratch'),
           *(Row(r, _RECIPE_LABELS[r], r, 'scratch') for r in DISTILL_RECIPES),
           Row('vit_scratch', 'ViT student from scratch', 'vit_scratch'),
           Row('deit', 'DeiT hard distillation (`:deit`)', 'deit', 'vit_scratch'),
           Row('vit_teacher', 'ViT teacher (`finetune.py` from scratch, seed 0 only)',
               'vit_teacher'),
           *(Row(r, _RECIPE_LABELS[r], r, 'scratch') for r in CANON_RECIPES)),
          about_cpu=('the teacher trains 2 epochs; the students train 0.7 epoch at batch 64 '
                     '(lr 2e-3, warmup 100) without augmentation, as `jkd demo`\'s; the ViTs are '
                     '`vit_micro_p7` for 1 epoch at batch 128; the ViT teacher is '
                     '`vit_micro_p7` trained 5 epochs (no augmentation, layer decay 0.85). The '
                     'recipes keep their weights (DKD\'s and ReviewKD\'s 500-step warmups are '
                     'most of the 656 steps; CRD draws 4096 negatives).')),
    Table('compress', 'Compression of the scratch student', (
        'The student from scratch of the distill table (resnet8_s) compressed by '
        '`compress.py:VARIANT` (`--config.init_from` = that student of the same seed; QAT+KD '
        'from the distill table\'s teacher). Accuracy of the trained model, the exported '
        'integer (or float, for pruning) model and its size. The last two rows start from the '
        'KD student instead (`distill.py:kd`, same seed), as `jkd demo` does.'),
          (Row('fp32', 'fp32 student', 'student_scratch'),
           Row('ptq', 'int8 PTQ (no training)', 'ptq', 'fp32'),
           Row('qat', 'int8 QAT', 'qat', 'fp32'),
           Row('qat_kd', 'int8 QAT + KD', 'qat_kd', 'fp32'),
           Row('prune50', '50% unstructured pruning', 'prune50', 'fp32'),
           Row('prune24', '2:4 semi-structured pruning', 'prune24', 'fp32'),
           Row('channel50', '50% of the channels removed (+ KD from fp32)', 'channel50', 'fp32'),
           Row('kd_fp32', 'KD student (fp32, the distill table\'s `kd` row)', 'kd'),
           Row('kd_qat_kd', 'int8 QAT + KD of the KD student', 'kd_qat_kd', 'kd_fp32')),
          sizes=True,
          about_cpu=('the student is the distill table\'s 0.7-epoch one; QAT runs 0.3 epoch, '
                     'pruning (channel pruning too) 0.5 epoch, without augmentation.')),
)}


# ---------------------------------------------------------------------------------------------
# Planning: which runs, in which order, with which command lines.

@dataclasses.dataclass(frozen=True, kw_only=True)
class Run(pipeline.Stage):
  """One job at one seed: a pipeline stage named JOB/seedN (the seed its first override, the
  workdirs of the jobs it needs its references), started as `launcher` + its jkd arguments."""
  job: str
  seed: int
  launcher: tuple[str, ...]           # how to start jkd, e.g. python -m jkd.cli
  extra: tuple[str, ...] = ()         # --config.a.b=value after `--`: on every run, last

  @property
  def argv(self) -> list[str]:
    """The command line exactly as executed."""
    return [*self.launcher, *self.args(self.extra)]

  @property
  def display(self) -> str:
    """The same as `jkd ...`, for humans and results.json."""
    return shlex.join(['jkd', *self.args(self.extra)])


def workdir(root: str, scale: str, job: str, seed: int) -> str:
  return os.path.join(root, scale, job, f'seed{seed}')


def _config_path() -> str:
  """configs/fashion_mnist relative to the working directory (short, portable command lines)."""
  rel = os.path.relpath(CONFIGS)
  return CONFIGS if rel.startswith('..') else rel


def make_run(job_name: str, seed: int, *, root: str, scale: str, launcher: list[str],
             extra: list[str]) -> Run:
  job = JOBS[job_name]
  seed = 0 if job.once else seed
  arg = job.arg(scale)
  config = os.path.join(_config_path(), job.config) + (f':{arg}' if arg else '')
  needs = {field: workdir(root, scale, dep, 0 if JOBS[dep].once else seed)
           for field, dep in job.needs}
  return Run(f'{job_name}/seed{seed}', job.command, config, workdir(root, scale, job_name, seed),
             (f'seed={seed}', *job.scale_overrides(scale)), needs, job=job_name, seed=seed,
             launcher=tuple(launcher), extra=tuple(extra))


def chain(job_name: str) -> list[str]:
  """The job after every job it needs, dependencies first."""
  out: list[str] = []
  for _, dep in JOBS[job_name].needs:
    out += [j for j in chain(dep) if j not in out]
  return out + [job_name]


def plan(rows: list[Row], seeds: list[int], **kw) -> list[Run]:
  """Every run the rows need, seed-major: a full one-seed table exists before the second seed."""
  runs: dict[tuple[str, int], Run] = {}
  for seed in seeds:
    for row in rows:
      for job in chain(row.job):
        key = (job, 0 if JOBS[job].once else seed)
        if key not in runs:
          runs[key] = make_run(job, seed, **kw)
  return list(runs.values())


def _sidecar(wd: str) -> str:
  return wd + '.run.json'


def _read_json(path: str, default):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


# ---------------------------------------------------------------------------------------------
# Environment: the device and versions each run used.

_PROBE = r'''
import json, platform
from importlib import metadata
import jax
d = jax.devices()
def v(name):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None
print(json.dumps({'platform': d[0].platform, 'device_kind': d[0].device_kind,
                  'device_count': len(d), 'jax': jax.__version__, 'jaxlib': v('jaxlib'),
                  'flax': v('flax'), 'python': platform.python_version()}))
'''


def probe_environment(env: dict) -> dict:
  """jax.devices() and versions, read in a child process (this script never imports jax)."""
  out = {'source': 'jax.devices() in a child process'}
  try:
    p = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, env=env,
                       timeout=300)
    out.update(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
               {'error': p.stderr.strip()[-500:]})
  except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
    out['error'] = f'{type(e).__name__}: {e}'
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                            text=True, timeout=30).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout.strip()
    out['git'] = commit + ('+uncommitted changes' if dirty else '') if commit else None
  except (OSError, subprocess.TimeoutExpired):
    out['git'] = None
  return out


# ---------------------------------------------------------------------------------------------
# Running.

@dataclasses.dataclass
class Active:
  """A started run: its process, log and the sidecar record its end completes."""
  run: Run
  proc: subprocess.Popen
  log_path: str
  offset: int                          # where this attempt's output starts in the log
  meta: dict
  attempt: dict
  t0: float


class Runner:
  """Starts the planned commands (one at a time, or several with `--parallel`); stops them
  cleanly on a time limit or a signal."""

  def __init__(self, env: dict, time_limit: float, out=sys.stdout, parallel: int = 1):
    self.env, self.out, self.parallel = env, out, parallel
    self.active: list[Active] = []
    self.stop_reason: str | None = None
    self.stop_code = 0
    self.environment: dict | None = None
    self._lock = threading.RLock()  # Re-entrant: the signal handler runs on the main thread.
    if time_limit > 0:
      timer = threading.Timer(time_limit, self.stop, args=(f'time limit of {time_limit:g} s',
                                                           EXIT_TIME_LIMIT))
      timer.daemon = True
      timer.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda signum, _: self.stop(f'signal {signum}', 128 + signum))

  def say(self, text: str) -> None:
    print(f'[results_tables] {text}', file=self.out, flush=True)

  def stop(self, reason: str, code: int) -> None:
    """Asks the running runs to save a checkpoint and exit (jkd does so on its first SIGTERM);
    nothing new starts. A second stop (a second signal) is passed on: jkd then stops without
    saving."""
    with self._lock:
      if self.stop_reason is None:
        self.stop_reason, self.stop_code = reason, code
      for a in self.active:
        if a.proc.poll() is None:
          a.proc.send_signal(signal.SIGTERM)

  def start(self, run: Run) -> Active | None:
    """Starts one command; None when a stop came first."""
    if self.environment is None:
      self.environment = probe_environment(self.env)
    if self.stop_reason:
      return None
    os.makedirs(os.path.dirname(run.workdir), exist_ok=True)
    meta = _read_json(_sidecar(run.workdir), {})
    meta.update(command=run.display, argv=run.argv)
    attempt = {'started': _now(), 'environment': self.environment, 'parallel': self.parallel}
    meta.setdefault('attempts', []).append(attempt)
    self.say(f'run {run.job} seed {run.seed}: {run.display}')
    log_path = run.workdir + '.log'
    log = open(log_path, 'ab')
    log.write(f'\n$ {run.display}\n'.encode())
    log.flush()
    offset = log.tell()
    with self._lock:
      if self.stop_reason:  # Stopped while the log was opened: start nothing.
        log.close()
        return None
      # The run writes to its log file, not to a pipe of ours: if we die, its prints do not
      # fail. Own session: a terminal's Ctrl-C reaches only us, and we pass on exactly one
      # SIGTERM. PR_SET_PDEATHSIG: if we are killed outright, the run gets SIGTERM and saves.
      proc = subprocess.Popen(run.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True, preexec_fn=_die_with_parent)
      active = Active(run, proc, log_path, offset, meta, attempt, time.time())
      self.active.append(active)
    log.close()  # The child holds its own descriptor.
    return active

  def finish(self, active: Active, code: int) -> None:
    """Records the end of a started run in its sidecar."""
    with self._lock:
      self.active.remove(active)
    active.attempt.update(ended=_now(), exit_code=code,
                          seconds=round(time.time() - active.t0, 1))
    with open(_sidecar(active.run.workdir), 'w') as f:
      json.dump(active.meta, f, indent=1)

  def run(self, run: Run) -> int | None:
    """Runs one command to its end, streaming its output; returns its exit code (None: stopped
    before it began)."""
    active = self.start(run)
    if active is None:
      return None
    code = self._stream(active)
    self.finish(active, code)
    return code

  def _stream(self, active: Active) -> int:
    """Copies the run's log, from this attempt's start, to our output until the run ends;
    returns its exit code."""
    decode = codecs.getincrementaldecoder('utf-8')(errors='replace').decode
    with open(active.log_path, 'rb') as f:
      f.seek(active.offset)
      while True:
        code = active.proc.poll()
        chunk = decode(f.read())
        if chunk:
          self.out.write(chunk)
          self.out.flush()
        elif code is not None:
          return code
        else:
          time.sleep(0.2)


def _die_with_parent() -> None:
  try:
    import ctypes
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    pass  # Not Linux: a killed runner leaves its run to finish on its own.


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# ---------------------------------------------------------------------------------------------
# Reporting.

def _stats(values: list[float]) -> dict | None:
  if not values:
    return None
  return {'mean': statistics.fmean(values),
          'std': statistics.stdev(values) if len(values) > 1 else None,
          'min': min(values), 'max': max(values), 'n': len(values)}


def _duration(s: float | None) -> str:
  if s is None:
    return '—'
  s = int(round(s))
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else (
      f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s')


def _pct(x: float | None, digits: int = 2) -> str:
  return '—' if x is None else f'{100 * x:.{digits}f}'


SIZE_KEYS = ('export_accuracy', 'export_bytes', 'compression_ratio', 'sparsity', 'fp32_bytes',
             'nonzero_params')
KEPT_KEYS = ('test_accuracy', 'wall_s', 'params', 'steps', 'examples_per_sec', 'model', 'kind',
             'final_train_loss') + SIZE_KEYS


def collect(table: Table, seeds: list[int], plan_kw: dict, env: dict, *, argv: list[str],
            extra: list[str]) -> dict:
  """results.json: per row and seed, the numbers of each finished run and how it was made."""
  probed = None
  runs_out, rows_out = {}, []
  for row in table.rows:
    per_seed = {}
    for seed in ([0] if JOBS[row.job].once else seeds):
      entry = {}
      for job in chain(row.job):
        run = make_run(job, seed, **plan_kw)
        key = run.name
        if key not in runs_out:
          summary = pipeline.finished(run.workdir)
          meta = _read_json(_sidecar(run.workdir), {})
          attempts = meta.get('attempts') or [{}]
          environment = summary.get('environment') if summary else None
          environment = environment or attempts[-1].get('environment')
          if summary and not environment:  # Run by hand, not by this script: probe here.
            probed = probed or dict(probe_environment(env), source='probed when writing the '
                                    'table (the run was not started by this script)')
            environment = probed
          runs_out[key] = {
              'job': job, 'seed': run.seed, 'workdir': run.workdir,
              'command': meta.get('command', run.display), 'finished': summary is not None,
              'environment': environment,
              # Runs sharing the device with it (--parallel) when it finished: its wall time.
              'parallel': attempts[-1].get('parallel', 1),
              **({k: summary[k] for k in KEPT_KEYS if k in summary} if summary else {})}
        entry[job] = runs_out[key]
      per_seed[seed] = entry
    rows_out.append(_row_result(table, row, per_seed))
  base = {r['name']: r for r in rows_out}
  for row, r in zip(table.rows, rows_out):
    b = base.get(row.baseline or '', {}).get('test_accuracy')
    r['delta_vs_baseline'] = (r['test_accuracy']['mean'] - b['mean']
                              if b and r['test_accuracy'] else None)
  environments = [json.loads(e) for e in sorted({json.dumps(r['environment'], sort_keys=True)
                                                 for r in runs_out.values() if r['environment']})]
  about = table.about + (f' At scale cpu: {table.about_cpu}'
                         if plan_kw['scale'] == 'cpu' and table.about_cpu else '')
  return {'table': table.name, 'title': table.title, 'about': about,
          'scale': plan_kw['scale'], 'seeds': seeds, 'extra_overrides': extra,
          'spread': 'sample standard deviation over seeds (n - 1 denominator); min and max too',
          'accuracy': 'summary.json test_accuracy (0..1) of the row\'s run on its config\'s eval '
                      'split (the full test split at scale gpu)',
          'generated': _now(), 'regenerate': shlex.join(['python', *argv]),
          'environments': environments, 'rows': rows_out, 'runs': runs_out,
          'parallel': max([r['parallel'] for r in runs_out.values() if r['finished']],
                          default=1)}


def _row_result(table: Table, row: Row, per_seed: dict) -> dict:
  done = {s: e[row.job] for s, e in per_seed.items() if e[row.job]['finished']}
  acc = {s: r['test_accuracy'] for s, r in done.items() if r.get('test_accuracy') is not None}
  out = {'name': row.name, 'label': row.label, 'job': row.job, 'baseline': row.baseline,
         'model': next((r.get('model') for r in done.values()), None),
         'params': next((r.get('params') for r in done.values()), None),
         'test_accuracy': dict(_stats(list(acc.values())) or {}, values=acc) if acc else None,
         'wall_s': _stats([r['wall_s'] for r in done.values() if 'wall_s' in r])}
  if table.chain_wall:  # Every seeded run behind the row (pretraining + fine-tuning).
    out['chain_wall_s'] = _stats([
        sum(r.get('wall_s', 0) for j, r in e.items() if not JOBS[j].once)
        for e in per_seed.values() if all(r['finished'] for r in e.values())])
  if table.sizes:
    for key in ('export_accuracy', 'export_bytes', 'compression_ratio', 'sparsity'):
      vals = {s: r[key] for s, r in done.items() if r.get(key) is not None}
      out[key] = dict(_stats(list(vals.values())), values=vals) if vals else None
  return out


def _fp32_bytes(results: dict) -> float | None:
  """The float student's stored bytes, as every compress run of it reports them."""
  vals = [r['fp32_bytes'] for r in results['runs'].values() if r.get('fp32_bytes')]
  return statistics.fmean(vals) if vals else None


def markdown(results: dict) -> str:
  sizes = any('export_bytes' in r for r in results['rows'])
  chain_wall = any('chain_wall_s' in r for r in results['rows'])
  head = ['row', 'model', 'test acc. % (mean ± std)', 'min–max', 'n', 'Δ', 'wall / run']
  if chain_wall:
    head.append('wall / seed incl. pretraining')
  if sizes:
    head += ['export acc. %', 'bytes', 'ratio', 'sparsity']
  lines = [f'### {results["title"]}: `--table {results["table"]}`, scale {results["scale"]}, '
           f'seeds {" ".join(map(str, results["seeds"]))}', '', results['about'], '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  fp32 = _fp32_bytes(results) if sizes else None
  for r in results['rows']:
    acc = r['test_accuracy']
    if acc:
      spread = f'{100 * acc["std"]:.2f}' if acc['std'] is not None else 'n/a'
      cells = [f'{_pct(acc["mean"])} ± {spread}',
               f'{_pct(acc["min"])}–{_pct(acc["max"])}', str(acc['n'])]
    else:
      cells = ['not run yet', '—', '0']
    delta = r.get('delta_vs_baseline')
    cells.append('' if r['baseline'] is None else
                 ('—' if delta is None else f'{100 * delta:+.2f}'))
    cells.append(_duration(r['wall_s']['mean']) if r['wall_s'] else '—')
    if chain_wall:
      cells.append(_duration(r['chain_wall_s']['mean']) if r.get('chain_wall_s') else '—')
    if sizes:
      mean = lambda k: r[k]['mean'] if r.get(k) else None  # noqa: E731
      # The one row without an export is the float student itself.
      size = mean('export_bytes') or (fp32 if acc else None)
      ratio = mean('compression_ratio') or (1.0 if size else None)
      cells += [_pct(mean('export_accuracy')), '—' if size is None else f'{size:,.0f}',
                '—' if ratio is None else f'{ratio:.2f}×',
                '—' if mean('sparsity') is None else f'{100 * mean("sparsity"):.1f}%']
    model = f'{r["model"]} ({r["params"]:,} params)' if r['model'] and r['params'] else '—'
    lines.append('| ' + ' | '.join([r['label'], model, *cells]) + ' |')
  envs = '; '.join(_env_text(e) for e in results['environments']) or 'nothing run yet'
  lines += ['', f'Test accuracy in %: mean ± sample standard deviation over the seeds, min–max, '
            f'n seeds. Δ: difference of means to the row\'s baseline. Wall: mean `wall_s` of '
            f'summary.json' + (f' (up to {results["parallel"]} runs shared the device at a '
                               'time: walls include the sharing)'
                               if results.get('parallel', 1) > 1 else '') + '.'
            + (' Bytes: the exported model (the fp32 row: float32 weights '
                                'and BatchNorm statistics); ratio against fp32.' if sizes else ''),
            f'Ran on: {envs}.',
            f'Regenerate: `{results["regenerate"]}`; every run\'s command line and numbers are '
            f'in results.json.']
  if results['extra_overrides']:
    lines[-1] += f' Overrides on every run: `{" ".join(results["extra_overrides"])}`.'
  return '\n'.join(lines) + '\n'


def _env_text(e: dict) -> str:
  if 'error' in e and 'jax' not in e:
    return f'unknown device ({e["error"][:80]})'
  return (f'{e.get("device_count")}× {e.get("device_kind")} ({e.get("platform")}), '
          f'jax {e.get("jax")}, flax {e.get("flax")}, Python {e.get("python")}, '
          f'git {e.get("git")}')


def replace_section(path: str, key: str, text: str) -> None:
  """Puts `text` between this table's markers in `path` (appended when absent)."""
  begin, end = f'<!-- results_tables:{key}:begin -->', f'<!-- results_tables:{key}:end -->'
  block = f'{begin}\n{text}{end}\n'
  old = open(path).read() if os.path.exists(path) else ''
  pattern = re.compile(re.escape(begin) + r'.*?' + re.escape(end) + r'\n?', re.S)
  new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else (
      old + ('\n' if old and not old.endswith('\n\n') else '') + block)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(new)


def write_report(table: Table, args, plan_kw: dict, env: dict, extra: list[str],
                 say) -> dict:
  results = collect(table, args.seeds, plan_kw, env, argv=args.regenerate, extra=extra)
  out_dir = os.path.join(args.root, args.scale, 'tables', table.name)
  os.makedirs(out_dir, exist_ok=True)
  text = markdown(results)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write(text)
  if args.out:
    replace_section(args.out, f'{table.name}:{args.scale}', text)
  say(f'wrote {out_dir}/table.md and results.json' + (f', and {args.out}' if args.out else ''))
  print(text, flush=True)
  return results


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str]):
  own, extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (
      argv, [])
  p = argparse.ArgumentParser(
      prog='results_tables.py', description=__doc__.split('\n\n')[0],
      epilog='Arguments after -- (--config.a.b=value) are added to every jkd command.')
  p.add_argument('--table', required=True, choices=sorted(TABLES))
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--root', default='runs/tables', help='workdirs go to ROOT/SCALE/JOB/seedN')
  p.add_argument('--scale', choices=SCALES, default='gpu',
                 help="gpu: the configs' full recipes; cpu: the same recipes at jkd demo's "
                      "CPU budget; tiny: their :tiny test sizes (seconds a run)")
  p.add_argument('--rows', nargs='+', default=None,
                 help='run only these rows (and the runs they need); the table shows every row')
  p.add_argument('--out', default=None, help="markdown file whose section for this table is "
                 'replaced (or appended), e.g. docs/results_gpu.md')
  p.add_argument('--time-limit', type=float, default=0.0,
                 help='seconds after which the current run is stopped with a checkpoint and '
                      'the script exits 3 (rerun to resume); 0 = none')
  p.add_argument('--parallel', type=int, default=1,
                 help='runs at once on the device (each once the runs it needs are done); '
                      'small Fashion-MNIST models leave most of a GPU idle. >1: their output '
                      'goes to their logs only, and XLA_PYTHON_CLIENT_MEM_FRACTION is '
                      '0.9/N per run without preallocation')
  p.add_argument('--dry-run', action='store_true', help='print the commands; run nothing')
  p.add_argument('--report-only', action='store_true',
                 help='write the table from the finished runs; run nothing')
  p.add_argument('--launcher', default=f'{shlex.quote(sys.executable)} -m jkd.cli',
                 help='how to start jkd (default: this Python, -m jkd.cli)')
  args = p.parse_args(own)
  bad = [e for e in extra if not e.startswith('--config.') or '=' not in e]
  if bad:
    p.error(f'after --, give only --config.a.b=value overrides; got {" ".join(bad)}')
  if any(e.startswith('--config.seed=') for e in extra):
    p.error('seeds are set by --seeds, not --config.seed')
  if args.parallel < 1:
    p.error(f'--parallel must be at least 1, got {args.parallel}')
  if len(set(args.seeds)) != len(args.seeds):
    p.error(f'--seeds has repeats: {args.seeds}')
  table = TABLES[args.table]
  names = [r.name for r in table.rows]
  unknown = [r for r in args.rows or () if r not in names]
  if unknown:
    p.error(f'table {table.name} has no row {", ".join(unknown)}; its rows: {", ".join(names)}')
  # The one command that (re)makes the whole table: no --rows, limits or modes.
  args.regenerate = ['benchmarks/results_tables.py', '--table', args.table, '--scale', args.scale,
                     '--seeds', *map(str, args.seeds), '--root', args.root,
                     *(['--out', args.out] if args.out else []), *(['--', *extra] if extra else [])]
  return args, extra


def _failed(r: Run, rc: int | None) -> str:
  return (f'FAILED: {r.job} seed {r.seed} exited with code {rc}'
          + ('' if rc else ' without writing summary.json') + f':\n  {r.display}\n'
          f'Its output is in {r.workdir}.log. Fix the cause and run the same command again: '
          'finished runs are skipped and this one resumes from its checkpoint.')


def _log_tail(path: str, offset: int, lines: int = 25) -> str:
  with open(path, 'rb') as f:
    f.seek(offset)
    text = f.read().decode('utf-8', errors='replace')
  return '\n'.join('  | ' + line for line in text.splitlines()[-lines:])


def run_parallel(runner: Runner, runs: list[Run], say) -> int:
  """Up to `runner.parallel` runs at once, each started once the runs it needs have finished;
  their output goes to their logs, and a line here as each starts and ends. After a failure
  or a stop nothing new starts, and the runs already going finish (or stop with a checkpoint).
  """
  def can_start(r: Run) -> bool:  # Every run it needs has finished.
    return all(pipeline.finished(d) is not None for d in r.references.values())

  pending = list(runs)
  code = 0
  while pending or runner.active:
    while (pending and not code and not runner.stop_reason
           and len(runner.active) < runner.parallel):
      ready = next((r for r in pending if can_start(r)), None)
      if ready is None:
        break
      pending.remove(ready)
      if runner.start(ready) is None:
        break
    for a in list(runner.active):
      rc = a.proc.poll()
      if rc is None:
        continue
      runner.finish(a, rc)
      r, summary = a.run, pipeline.finished(a.run.workdir)
      if summary is not None and rc == 0:
        acc = summary.get('test_accuracy')
        say(f'done {r.job} seed {r.seed} in {_duration(time.time() - a.t0)}'
            + (f': test accuracy {100 * acc:.2f}%' if acc is not None else ''))
      elif runner.stop_reason:
        say(f'stopped by the {runner.stop_reason} during {r.job} seed {r.seed} (exit {rc}); '
            f'its checkpoint is in {r.workdir}.')
      else:
        say(_failed(r, rc) + '\nIts last lines:\n' + _log_tail(a.log_path, a.offset))
        code = EXIT_FAILED
    if not runner.active and (code or runner.stop_reason):
      break
    if pending and not runner.active and not any(can_start(r) for r in pending):
      say('nothing can start: a needed run did not finish (see above)')  # Not expected: plan
      return EXIT_FAILED                                                  # orders the needs.
    time.sleep(0.5)
  return code


def _run_in_order(runner: Runner, runs: list[Run], say) -> int:
  """Skips the finished runs (`jkd.pipeline.run_in_order`); runs the rest, one after another
  or `--parallel` at a time."""
  def skipped(i: int, r: Run, unused_summary: dict) -> None:
    recorded = _read_json(_sidecar(r.workdir), {}).get('command')
    note = (f'; NOTE it was run as `{recorded}`: delete {r.workdir} to run it again with '
            'this command' if recorded and recorded != r.display else '')
    say(f'[{i}/{len(runs)}] skipped {r.job} seed {r.seed}: {r.workdir} has summary.json' + note)

  # Queued, not started here: --parallel starts each once the runs it needs are done, and the
  # sequential runs are numbered among themselves, after every skip is reported.
  todo: list[Run] = []
  pipeline.run_in_order(runs, lambda i, r: todo.append(r), skipped)
  if runner.parallel > 1:
    return run_parallel(runner, todo, say)
  return _run_sequentially(runner, todo, say)


def _run_sequentially(runner: Runner, runs: list[Run], say) -> int:
  code = 0
  for i, r in enumerate(runs, 1):
    if runner.stop_reason:
      break
    say(f'[{i}/{len(runs)}] {r.job} seed {r.seed} -> {r.workdir}')
    rc = runner.run(r)
    finished = pipeline.finished(r.workdir) is not None
    if runner.stop_reason and not finished:
      say(f'stopped by the {runner.stop_reason} ' + (
          f'before {r.job} seed {r.seed} began.' if rc is None else
          f'during {r.job} seed {r.seed} (exit {rc}); its checkpoint is in {r.workdir}.'))
      break
    if rc != 0 or not finished:
      say(_failed(r, rc))
      code = EXIT_FAILED
      break
  return code


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args, extra = parse_args(argv)
  table = TABLES[args.table]
  rows = [r for r in table.rows if args.rows is None or r.name in args.rows]
  plan_kw = dict(root=args.root, scale=args.scale, launcher=shlex.split(args.launcher),
                 extra=extra)
  runs = plan(rows, args.seeds, **plan_kw)
  done = {r.workdir for r in runs if pipeline.finished(r.workdir) is not None}
  say = lambda text: print(f'[results_tables] {text}', flush=True)  # noqa: E731
  if args.dry_run:
    print(f'# {table.name} table, scale {args.scale}, seeds {" ".join(map(str, args.seeds))}: '
          f'{len(runs)} runs, {len(done)} finished (marked "# done:")')
    for r in runs:
      print(('# done: ' if r.workdir in done else '') + r.display)
    return 0
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  # Seeds and recipes share programs: later runs reuse earlier compilations.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.abspath(
      os.path.join(args.root, args.scale, 'xla_cache')))
  if args.report_only:
    write_report(table, args, plan_kw, env, extra, say)
    return 0
  if args.parallel > 1:
    # Several JAX processes share the device: none may preallocate most of its memory.
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = f'{0.9 / args.parallel:.3f}'
  runner = Runner(env, args.time_limit, parallel=args.parallel)
  t0 = time.time()
  code = _run_in_order(runner, runs, say)
  left = sum(pipeline.finished(r.workdir) is None for r in runs)
  if not code and left and runner.stop_reason:
    code = runner.stop_code
  write_report(table, args, plan_kw, env, extra, say)
  say(f'{len(runs) - left}/{len(runs)} runs finished in {time.time() - t0:.0f} s'
      + (f'; {left} left: run the same command again to continue' if left else '')
      + (f' (exit {code})' if code else ''))
  return code


if __name__ == '__main__':
  sys.exit(main())
