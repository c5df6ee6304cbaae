"""Fields every run config has, with their defaults (config files start from `base_config`)."""
from __future__ import annotations

import ml_collections

from jkd.optim import default_optim_config


def base_config() -> ml_collections.ConfigDict:
  """The shared run settings; a config file fills in `model` and `data` and adjusts the rest."""
  c = ml_collections.ConfigDict()
  c.task = 'classification'    # What the model predicts (jkd.tasks): the second axis.
  c.seed = 0
  c.rng_impl = 'rbg'           # or 'threefry2x32' (portable bits, slower compile).
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 10.0
  c.total_steps = 0            # > 0 overrides num_epochs.
  c.optim = default_optim_config()
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0
  c.log_every = 50
  c.eval_every = 0             # Steps between evals; 0 = at the end only.
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.stop_check_every = 10      # Multi-process: steps between agreeing on a SIGTERM (jkd.loop).
  c.nan_patience = 0           # Non-finite steps in a row skipped before the run stops (0: stop).
  c.resume_from_step = 0       # Resume (or jkd eval) this checkpoint step instead of the latest.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Entries replacing jkd.parallel.DEFAULT_RULES, e.g. (('embed', None), ('mlp', 'fsdp')).
  c.sharding_rules = ()
  c.init_from = ''             # A workdir whose weights initialise this run (fine-tuning).
  c.init_prefix = ()           # Sub-tree of its params to take, e.g. ('encoder',).
  return c


def parse_variant(arg: str | None, variants, *, kind: str = 'variant') -> tuple[bool, str]:
  """Splits a config argument 'NAME', 'tiny' or 'tiny-NAME' into (tiny, NAME).

  None and 'tiny' mean the first of `variants` (the default); an unknown NAME is a ValueError
  that lists them.
  """
  arg = arg or variants[0]
  tiny = arg.startswith('tiny')
  name = arg.split('-', 1)[1] if tiny and '-' in arg else (variants[0] if tiny else arg)
  if name not in variants:
    raise ValueError(f'unknown {kind} {name!r}; use one of {", ".join(variants)} '
                     '(or tiny, tiny-NAME)')
  return tiny, name


def shrink_for_tests(c: ml_collections.ConfigDict, *, total_steps: int, log_every: int,
                     checkpoint_every: int, warmup_steps: int,
                     eval_examples: int = 256) -> ml_collections.ConfigDict:
  """The `:tiny` size every Fashion-MNIST config offers the test suite: 512 training images,
  `eval_examples` test images, batch 32, a few steps. Changes `c` in place and returns it."""
  c.data.train_split = 'train[:512]'
  c.data.eval_split = f'test[:{eval_examples}]'
  c.batch_size = 32
  c.eval_batch_size = eval_examples // 2
  c.total_steps = total_steps
  c.log_every = log_every
  c.checkpoint_every = checkpoint_every
  c.optim.warmup_steps = warmup_steps
  return c
