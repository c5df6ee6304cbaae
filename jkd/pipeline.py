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
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Sequence

import jax
import ml_collections

from jkd import storage
from jkd.config import load_config
from jkd.errors import UserError
from jkd.metrics import format_duration

def stage(command: str, config: str, overrides: Sequence[str] = (), init_from: str = '',
          teacher: str = '') -> ml_collections.ConfigDict:
  """One stage of a pipeline config.

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
  from jkd.cli import TRAINERS  # The one table of commands (imported late, as jkd.evaluate does).
  # pylint: disable=g-import-not-at-top
  names = list(config.get('order') or config.stages.keys())
  missing = [n for n in names if n not in config.stages]
  if missing:
    raise UserError(f'config.order names stages {missing} that config.stages does not define.')
  for name in names:
    s = config.stages[name]
    if s.command not in TRAINERS:
      raise UserError(f'stage {name!r}: command {s.command!r} is not one of '
                      f'{", ".join(TRAINERS)}.')
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


def _resolve_ref(ref: str, stage_dirs: dict[str, str]) -> str:
  return stage_dirs.get(ref) or storage.resolve(ref)


def _run_stage(name, s, out, stage_dirs, log) -> dict:
  summary_path = storage.join(out, 'summary.json')
  if storage.exists(summary_path):
    log(f'{name}: already done, skipped ({summary_path})')
    return storage.read_json(summary_path)
  overrides = list(s.overrides)
  if s.init_from:
    overrides.append(f'init_from={_resolve_ref(s.init_from, stage_dirs)}')
  if s.teacher:
    overrides.append(f'teacher.workdir={_resolve_ref(s.teacher, stage_dirs)}')
  from jkd.cli import TRAINERS  # pylint: disable=g-import-not-at-top
  config = load_config(os.path.join(configs_dir(), s.config), overrides)
  module_name, fn_name = TRAINERS[s.command]
  storage.makedirs(out)
  return getattr(importlib.import_module(module_name), fn_name)(config, out)


def run_stages(config, workdir: str, label: str = 'pipeline'
               ) -> tuple[dict[str, dict], dict[str, float], dict[str, str]]:
  """Runs (or skips, when finished) every stage in order, printing a '[label]' line as each
  starts and ends.

  Returns (summaries, seconds, workdirs), each keyed by stage name; a stage finished by an
  earlier invocation reports its own time.
  """
  def log(text):
    if jax.process_index() == 0:  # Every process runs the stages; one reports them.
      print(f'[{label}] {text}', flush=True)

  names = stage_names(config)
  workdir = storage.resolve(workdir)
  storage.makedirs(workdir)
  stage_dirs = {n: storage.join(workdir, n) for n in names}
  summaries, times = {}, {}
  for i, name in enumerate(names, 1):
    s = config.stages[name]
    log(f'stage {i}/{len(names)} {name}: jkd {s.command} --config configs/{s.config}')
    start = time.time()
    summaries[name] = _run_stage(name, s, stage_dirs[name], stage_dirs, log)
    times[name] = round(summaries[name].get('wall_s') or (time.time() - start), 1)
    acc = summaries[name].get('test_accuracy')
    log(f'stage {i}/{len(names)} {name}: done in {format_duration(times[name])}'
        + (f', test accuracy {acc:.4f}' if acc is not None else ''))
  return summaries, times, stage_dirs


def run(config, workdir: str) -> dict:
  """`jkd pipeline`: runs the stages, writes and returns WORKDIR/pipeline.json."""
  t0 = time.time()
  summaries, times, stage_dirs = run_stages(config, workdir)
  result = {'stages': {name: {'command': config.stages[name].command,
                              'workdir': stage_dirs[name],
                              'test_accuracy': summaries[name].get('test_accuracy'),
                              'params': summaries[name].get('params'),
                              'wall_s': times[name]}
                       for name in summaries},
            'wall_s': round(time.time() - t0, 1)}
  if jax.process_index() != 0:  # Every process ran the stages; one writes the result.
    return result
  storage.write_json(storage.join(storage.resolve(workdir), 'pipeline.json'), result)
  for name, r in result['stages'].items():
    acc = '-' if r['test_accuracy'] is None else f'{100 * r["test_accuracy"]:.2f}%'
    params = '-' if r['params'] is None else f'{r["params"]:,}'
    print(f'[pipeline] {name:<20} {acc:>8}  {params:>12} params  '
          f'{format_duration(r["wall_s"])}', flush=True)
  return result
