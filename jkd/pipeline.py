"""`jkd pipeline`: several jkd commands in order, each stage its own workdir, resumable.

A pipeline config lists stages; each is an ordinary command (`pretrain`, `train`, `distill`,
`compress`) with its config file (relative to `configs/`), overrides, and optionally the stage
(or any workdir) to start from (`init_from`) and to learn from (`teacher`):

  config.order = ('teacher', 'assistant', 'student')
  config.stages = dict(
      teacher=stage('train', 'fashion_mnist/supervised.py', ['model.name=resnet20_s']),
      assistant=stage('distill', 'fashion_mnist/distill.py', teacher='teacher'),
      student=stage('distill', 'fashion_mnist/distill.py', teacher='assistant'))

Stage NAME runs in WORKDIR/NAME. A stage with a `summary.json` is finished and skipped; any
other resumes from its checkpoints, so rerunning the command after a crash or preemption
continues where it stopped. `teacher`/`init_from` name an earlier stage, or else are taken as a
workdir path (local or gs://). WORKDIR/pipeline.json gathers each stage's accuracy, parameters,
time and workdir. `jkd demo` is one such pipeline plus its report.

The runner is shared with `benchmarks/results_tables.py`: a `Stage` is one command ready to run
(its config, overrides and the workdirs it refers to, and from them its `jkd` command line),
`finished` is the one test of a finished workdir, and `run_in_order` walks the stages, skipping
the finished ones and handing the others to an executor: here `trainers.get(...).train` in this
process; in results_tables a child process running `Stage.args()`, several at once if asked.
Planning, the finished test and the walk neither import nor initialise jax (only running and
reporting stages in this process do): results_tables plans and skips in the parent process of
runs that use the GPU.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

import ml_collections

from jkd import storage, trainers
from jkd.config import load_config
from jkd.errors import UserError


def stage(command: str, config: str, overrides: Sequence[str] = (), init_from: str = '',
          teacher: str = '') -> ml_collections.ConfigDict:
  """One stage of a pipeline config (as written in the config file; `plan` makes it a `Stage`).

  Args:
    command: 'pretrain', 'train', 'distill' or 'compress'.
    config: the stage's config file relative to `configs/` (an absolute path also works), with
      an optional ':ARG'.
    overrides: 'a.b=value' strings, as after --config. on the command line.
    init_from: an earlier stage's name or a workdir: sets `config.init_from`.
    teacher: an earlier stage's name or a workdir: sets `config.teacher.workdir`.
  """
  return ml_collections.ConfigDict(dict(command=command, config=config,
                                        overrides=tuple(overrides), init_from=init_from,
                                        teacher=teacher))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One jkd command ready to run in its own workdir: a stage of `jkd pipeline`, or a run of
  benchmarks/results_tables.py (which adds how it starts the command).

  Attributes:
    name: what the caller calls it ('teacher'; results_tables: 'kd/seed1').
    command: 'pretrain', 'train', 'distill' or 'compress'.
    config: the config file with an optional ':ARG', as `--config` takes it.
    workdir: where it runs; it is finished once its summary.json is written (`finished`).
    overrides: 'a.b=value' strings.
    references: {config field: workdir} of the runs it starts from or learns from (e.g.
      {'teacher.workdir': ...}); set after `overrides`. Those runs must finish before it starts.
  """
  name: str
  command: str
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()
  references: dict[str, str] = dataclasses.field(default_factory=dict)

  def config_overrides(self) -> list[str]:
    """Every 'a.b=value' override, references last: what `jkd pipeline` applies in-process."""
    return [*self.overrides, *(f'{field}={wd}' for field, wd in self.references.items())]

  def args(self, extra: Sequence[str] = ()) -> list[str]:
    """The `jkd` arguments that run it, `extra` (e.g. '--config.a.b=value') after its own."""
    return [self.command, '--config', self.config, '--workdir', self.workdir,
            *(f'--config.{o}' for o in self.config_overrides()), *extra]


def finished(workdir: str) -> dict | None:
  """The summary.json of the finished run in `workdir`; None while it is unfinished (also when
  the file was cut off while being written, is not a JSON object, or marks a failed run: a run
  that diverged is run again, from its last good checkpoint)."""
  try:
    summary = storage.read_json(storage.join(workdir, 'summary.json'))
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or summary.get('status') == 'failed':
    return None
  return summary


def run_in_order(stages: Sequence[Stage], execute: Callable[[int, Stage], dict | None],
                 skipped: Callable[[int, Stage, dict], None]) -> dict[str, dict | None]:
  """Walks `stages` in order: a finished one goes to `skipped(i, stage, summary)` and is not run
  again; any other (which its command resumes from its checkpoints) to `execute(i, stage)`.

  `i` counts from 1. Returns each stage's summary by name: the finished one's, or what `execute`
  returned.
  """
  summaries = {}
  for i, s in enumerate(stages, 1):
    summary = finished(s.workdir)
    if summary is not None:
      skipped(i, s, summary)
    else:
      summary = execute(i, s)
    summaries[s.name] = summary
  return summaries


def configs_dir() -> str:
  """The repository's configs/ (jkd is installed editable from the repository)."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(here, 'configs')
  if not os.path.isdir(path):
    raise UserError(f'jkd pipelines need the configs/ directory of the jkd repository (looked '
                    f'in {path}). Install jkd from a clone: pip install -e .')
  return path


def stage_names(config) -> list[str]:
  """The stages in run order (`config.order`; ConfigDict does not keep key order)."""
  names = list(config.get('order') or config.stages.keys())
  missing = [n for n in names if n not in config.stages]
  if missing:
    raise UserError(f'config.order names stages {missing} that config.stages does not define.')
  for name in names:
    s = config.stages[name]
    if s.command not in trainers.COMMANDS:
      raise UserError(f'stage {name!r}: command {s.command!r} is not one of '
                      f'{", ".join(trainers.COMMANDS)}.')
    for field in ('init_from', 'teacher'):
      ref = s.get(field)
      if not ref:
        continue
      if ref in names:
        if names.index(ref) >= names.index(name):
          raise UserError(f'stage {name!r}: {field}={ref!r} is not an earlier stage; a stage '
                          'starts from and learns from stages before it.')
      elif not storage.exists(ref):
        raise UserError(f'stage {name!r}: {field}={ref!r} is neither a stage of this pipeline '
                        f'({", ".join(names)}) nor an existing workdir.')
  return names


def plan(config, workdir: str) -> list[Stage]:
  """The stages of a pipeline config in run order, checked (`stage_names`), each in
  WORKDIR/NAME, their `init_from` and `teacher` made references to those workdirs."""
  names = stage_names(config)
  stage_dirs = {n: storage.join(storage.resolve(workdir), n) for n in names}
  stages = []
  for name in names:
    s = config.stages[name]
    references = {field: stage_dirs.get(ref) or storage.resolve(ref)  # a stage, or a workdir
                  for field, ref in (('init_from', s.init_from), ('teacher.workdir', s.teacher))
                  if ref}
    stages.append(Stage(name, s.command, os.path.join(configs_dir(), s.config),
                        stage_dirs[name], tuple(s.overrides), references))
  return stages


def check_stages(stages: Sequence[Stage]) -> None:
  """Loads and checks (`jkd.validate`) the config of every stage still to run, before the first
  one starts: a bad override in the last stage is reported now, not after the others ran."""
  for s in stages:
    if finished(s.workdir) is not None:
      continue
    try:
      config = load_config(s.config, s.config_overrides())
      trainers.check(s.command, config)
    except UserError as e:
      raise UserError(f'stage {s.name!r} (jkd {s.command} --config {s.config}): {e}') from None


def _train(s: Stage) -> dict:
  """Runs a stage in this process (`jkd pipeline`'s executor); returns its summary."""
  config = load_config(s.config, s.config_overrides())
  storage.makedirs(s.workdir)
  return trainers.get(s.command, config).train(config, s.workdir)


def _is_main_process() -> bool:
  """Whether this is process 0: every process runs the stages; one reports them."""
  import jax  # Here, not at the top: benchmarks/results_tables.py imports this module.
  return jax.process_index() == 0


def run_stages(config, workdir: str, label: str = 'pipeline'
               ) -> tuple[dict[str, dict], dict[str, float], dict[str, str]]:
  """Runs (or skips, when finished) every stage in order, printing a '[label]' line as each
  starts and ends.

  Returns (summaries, seconds, workdirs), each keyed by stage name; a stage finished by an
  earlier invocation reports its own time.
  """
  from jkd.metrics import format_duration  # It imports jax: here, not at the top.

  def log(text):
    if _is_main_process():
      print(f'[{label}] {text}', flush=True)

  stages = plan(config, workdir)
  check_stages(stages)
  storage.makedirs(storage.resolve(workdir))
  times = {}

  def begin(i, s):
    log(f'stage {i}/{len(stages)} {s.name}: jkd {s.command} '
        f'--config configs/{config.stages[s.name].config}')
    return time.time()

  def end(i, s, summary, start):
    times[s.name] = round(summary.get('wall_s') or (time.time() - start), 1)
    acc = summary.get('test_accuracy')
    log(f'stage {i}/{len(stages)} {s.name}: done in {format_duration(times[s.name])}'
        + (f', test accuracy {acc:.4f}' if acc is not None else ''))
    return summary

  def execute(i, s):
    start = begin(i, s)
    return end(i, s, _train(s), start)

  def skipped(i, s, summary):
    start = begin(i, s)
    log(f'{s.name}: already done, skipped ({storage.join(s.workdir, "summary.json")})')
    end(i, s, summary, start)

  summaries = run_in_order(stages, execute, skipped)
  return summaries, times, {s.name: s.workdir for s in stages}


def run(config, workdir: str) -> dict:
  """`jkd pipeline`: runs the stages, writes and returns WORKDIR/pipeline.json."""
  from jkd.metrics import format_duration  # It imports jax: here, not at the top.
  t0 = time.time()
  summaries, times, stage_dirs = run_stages(config, workdir)
  result = {'stages': {name: {'command': config.stages[name].command,
                              'workdir': stage_dirs[name],
                              'test_accuracy': summaries[name].get('test_accuracy'),
                              'params': summaries[name].get('params'),
                              'wall_s': times[name]}
                       for name in summaries},
            'wall_s': round(time.time() - t0, 1)}
  if not _is_main_process():  # Every process ran the stages; one writes the result.
    return result
  storage.write_json(storage.join(storage.resolve(workdir), 'pipeline.json'), result)
  for name, r in result['stages'].items():
    acc = '-' if r['test_accuracy'] is None else f'{100 * r["test_accuracy"]:.2f}%'
    params = '-' if r['params'] is None else f'{r["params"]:,}'
    print(f'[pipeline] {name:<20} {acc:>8}  {params:>12} params  '
          f'{format_duration(r["wall_s"])}', flush=True)
  return result
