"""The second axis: what differs by task (`config.task`), for every job.

A job (`jkd.trainers`: train, pretrain, distill, compress) says how a model learns; a task says
what it predicts and how that is scored: the supervised loss on its outputs, the eval step's
sums and the metric made of them, what `summary.json` / `eval.json` report and draw, and the
signature of an exported model. One module per task; `get` picks it.

  task = jkd.tasks.get(config)          # config.task, default 'classification'
  task.eval_sums(logits, labels, mask)  # in a jitted eval step
  task.results(totals)                  # the metric, from the summed totals
"""
from __future__ import annotations

import importlib

from jkd.errors import UserError

DEFAULT = 'classification'
# name -> module defining TASK. Segmentation and detection come next (docs/architecture.md).
TASKS = {'classification': 'jkd.tasks.classification'}


def name_of(config) -> str:
  """`config.task`, or the default for configs and saved runs older than the key."""
  return (config.get('task') if config is not None else None) or DEFAULT


def get(config_or_name=None):
  """The task object of a config (or a task name)."""
  name = config_or_name if isinstance(config_or_name, str) else name_of(config_or_name)
  if name not in TASKS:
    raise UserError(f'config.task={name!r} is not a task jkd has; it has '
                    f'{", ".join(sorted(TASKS))}.')
  return importlib.import_module(TASKS[name]).TASK
