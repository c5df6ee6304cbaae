"""The trainers, one per job, and the one table that says which runs which command.

Each trainer module has `build_task(config, workdir, ...) -> jkd.loop.Task` (the step and the
state; `jkd bench`, `jkd plan` and `jkd eval` build it too), and optionally `before_run(config)`
(what must happen before the loop: the teacher cache). `Trainer.train` (or `train(command,
config, workdir)`) runs a job: the one entry for all of them. `get(command, config)` picks the trainer: `jkd distill` with
`config.method = 'mim'` is the MIM-distillation trainer. A checkpoint's `kind` is the command
that wrote it, so `get(meta['kind'], config)` rebuilds any saved run's Task.

Modules are imported when a trainer is used, so the CLI starts without loading them all.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from jkd.errors import UserError


@dataclasses.dataclass(frozen=True)
class Trainer:
  """One trainer: the command that runs it and the module that implements it.

  Attributes:
    name: the trainer ('supervised', 'mim_distill', ...).
    command: the `jkd` command, also the `kind` its checkpoints record.
    module: the module with `build_task` (and optionally `before_run`).
    description: one line for `jkd --help`.
    method: the `config.method` that selects this trainer among those of its command; None for
      the command's default trainer.
  """
  name: str
  command: str
  module: str
  description: str
  method: str | None = None

  def load(self) -> ModuleType:
    return importlib.import_module(self.module)

  def build_task(self, config, workdir: str, **inputs):
    """The trainer's Task; `inputs` are its optional arguments (e.g. `teacher=`)."""
    return self.load().build_task(config, workdir, **inputs)

  def check(self, config) -> None:
    """`jkd.validate.check` of a config this trainer runs, its loss terms included; UserError
    for the first setting that cannot work. Cheap: nothing is loaded or built."""
    from jkd import validate  # pylint: disable=g-import-not-at-top
    validate.check(config, self.command, trainer=self.name)
    if not config.get('losses') or self.name not in ('distill', 'mim_distill', 'compress'):
      return
    if self.name == 'mim_distill':
      from jkd.trainers import mim_terms  # pylint: disable=g-import-not-at-top
      terms = mim_terms.parse_terms(config.losses)
    elif self.name == 'compress':
      from jkd.trainers import compress  # pylint: disable=g-import-not-at-top
      terms = compress.loss_terms(config)
    else:
      from jkd.trainers import distill_terms, teacher_cache  # pylint: disable=g-import-not-at-top
      terms = distill_terms.parse_terms(config.losses)
      if teacher_cache.enabled(config):  # Now, not after the cache was built.
        teacher_cache.check_terms(terms)
    validate.check_terms(terms)

  def train(self, config, workdir: str) -> dict:
    """Runs the command; returns the summary (also in `workdir/summary.json`).

    The one way a run starts (the CLI, `jkd pipeline`, `jkd demo`): the config is checked
    (`jkd.validate`), the workdir's lock taken (`jkd.lock`; a second writer is refused), and
    SIGTERM/SIGINT deferred to the run's safe points (`jkd.interrupt`) until it returns.
    """
    from jkd import interrupt, lock, loop, xla_cpu  # pylint: disable=g-import-not-at-top
    self.check(config)
    xla_cpu.prepare(config)  # Before the first computation starts the backend.
    with interrupt.deferred(), lock.hold(workdir, command=f'jkd {self.command}'):
      interrupt.check('during start-up; nothing new was written')
      if self.name in ('distill', 'mim_distill', 'compress'):
        from jkd import teacher  # pylint: disable=g-import-not-at-top
        # config.teacher.checkpoint, if set; its step-0 Task from `build_task` below.
        teacher.import_checkpoint(config, workdir, build_task=build_task)
      module = self.load()
      if hasattr(module, 'before_run'):
        module.before_run(config)
      return loop.run(module.build_task(config, workdir), config, workdir, label=self.command)


TRAINERS: tuple[Trainer, ...] = (
    Trainer('supervised', 'train', 'jkd.trainers.supervised',
            'supervised training of a teacher or a student'),
    Trainer('pretrain', 'pretrain', 'jkd.trainers.pretrain',
            'SimMIM or MAE masked-image-modeling pretraining (config.method)'),
    Trainer('distill', 'distill', 'jkd.trainers.distill',
            'teacher -> student distillation (config.teacher.workdir; config.method=mim: '
            'a masked student from a SimMIM / MAE teacher)'),
    Trainer('mim_distill', 'distill', 'jkd.trainers.mim_distill',
            'a masked student from a SimMIM / MAE teacher (config.method=mim)', method='mim'),
    Trainer('compress', 'compress', 'jkd.trainers.compress',
            'pruning and/or quantization-aware training, then int8 export (export/)'),
)
# The training commands, in the order `jkd --help` lists them.
COMMANDS: tuple[str, ...] = tuple(dict.fromkeys(t.command for t in TRAINERS))


def get(command: str, config=None) -> Trainer:
  """The trainer that runs `jkd COMMAND` (or rebuilds a checkpoint of that kind) for `config`.

  Raises:
    UserError: not a training command.
  """
  return _find(command, config)


def train(command: str, config, workdir: str) -> dict:
  """Runs `jkd COMMAND` with `config` in `workdir` (`Trainer.train`); returns the summary."""
  return _find(command, config).train(config, workdir)


def build_task(command: str, config, workdir: str, **inputs):
  """The Task of the trainer that runs `jkd COMMAND` with `config` (`get(command,
  config).build_task`). What the modules below the jobs take when they need a job's state:
  `jkd.convert.save_workdir` (`jkd import`) writes the step-0 checkpoint of such a Task."""
  return get(command, config).build_task(config, workdir, **inputs)


def check(command: str, config) -> None:
  """`Trainer.check` of the trainer that runs `jkd COMMAND` with `config`: the whole config and
  its loss terms checked (`jkd.validate`), nothing built. UserError for the first bad setting."""
  _find(command, config).check(config)


def _find(command: str, config=None) -> Trainer:
  candidates = [t for t in TRAINERS if t.command == command]
  if not candidates:
    raise UserError(f'{command!r} is not a training command; use one of {", ".join(COMMANDS)}.')
  method = config.get('method') if config is not None else None
  return next((t for t in candidates if t.method is not None and t.method == method),
              next(t for t in candidates if t.method is None))


def describe(command: str) -> str:
  """The help line of a command: its default trainer's."""
  return get(command).description
