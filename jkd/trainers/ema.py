"""Exponential moving average of the weights (`config.ema.decay`; `jkd train`, `jkd distill`).

  ema <- decay * ema + (1 - decay) * weights          after every optimizer update

over the parameters and the other collections (BatchNorm statistics), as timm's `ModelEmaV2`
(which DeiT uses with decay 0.99996) averages the whole state dict. The first update copies the
weights (timm copies them before training; here a warm start by `init_from` replaces the
weights after the state is built, so the copy is taken after the first step). With gradient
accumulation (`config.optim.accumulate_steps = k`) the average moves once per k steps, when the
weights do.

The average is `model_state['ema']` (`jkd.checkpoint.RUN_STATE_KEYS`): checkpointed and resumed
with the run, evaluated beside the weights at every eval (`ema_accuracy`, `ema_loss`; also by
`jkd eval`), and usable as a teacher (`--config.teacher.ema=true`, or `ema=True` in an entry of
`config.teachers`: born-again / EMA-teacher self-distillation). A distillation keeps the
student's average only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jkd.checkpoint import RUN_STATE_KEYS as _RUN_STATE
from jkd.errors import UserError

KEY = 'ema'


def decay_of(config) -> float:
  """`config.ema.decay` (0 when the config has no `ema` group: off), checked."""
  decay = float((config.get('ema') or {}).get('decay', 0.0) or 0.0)
  if not 0.0 <= decay < 1.0:
    raise UserError(f'config.ema.decay={decay}: use a value in [0, 1), e.g. 0.999 (0 = off).')
  return decay


def init(params, model_vars: dict) -> dict:
  """The average's initial value: a copy of the model's variables {'params', collections}."""
  return jax.tree.map(jnp.copy, {'params': params, **model_vars})


def update(average: dict, params, model_vars: dict, step, decay: float, every: int = 1) -> dict:
  """The average after the update of train step `step` (0-based, before the increment):
  the variables themselves at step 0, then decay * average + (1 - decay) * variables at every
  `every`-th step, unchanged in between (accumulation steps)."""
  current = {'params': params, **model_vars}
  first = step == 0
  moves = jnp.logical_or(first, (step + 1) % every == 0)
  d = jnp.where(first, 0.0, decay)

  def one(a, x):
    mixed = (d * a.astype(jnp.float32) + (1.0 - d) * x.astype(jnp.float32)).astype(a.dtype)
    return jnp.where(moves, mixed, a)
  return jax.lax.stop_gradient(jax.tree.map(one, average, current))


def attach(state, decay: float, into: str | None = None):
  """`state` with a fresh average in `model_state['ema']` when `decay` > 0 (of
  `state.params[into]` and the model's collections; `into` 'student' in a distillation)."""
  if not decay:
    return state
  params = state.params if into is None else state.params[into]
  model_vars = {k: v for k, v in state.model_state.items() if k not in _RUN_STATE}
  return state.replace(model_state={**state.model_state, KEY: init(params, model_vars)})


def after_step(old_state, new_state, decay: float, every: int = 1, into: str | None = None):
  """`new_state` (the result of `old_state`'s update) with its average moved (`update`)."""
  if not decay:
    return new_state
  params = new_state.params if into is None else new_state.params[into]
  model_vars = {k: v for k, v in new_state.model_state.items() if k not in _RUN_STATE}
  average = update(old_state.model_state[KEY], params, model_vars, old_state.step, decay, every)
  return new_state.replace(model_state={**new_state.model_state, KEY: average})


def eval_sums(state, predict, labels, mask, into: str | None = None) -> dict:
  """The eval sums of the average ({'ema_accuracy', 'ema_loss'} as sums over valid rows, which
  `loop.evaluate` divides by the count), or {} when the run keeps none. `predict(params,
  model_vars)` returns logits (B, C)."""
  average = state.model_state.get(KEY) if hasattr(state.model_state, 'get') else None
  if average is None:
    return {}
  average = dict(average)
  logits = predict(average.pop('params'), average).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {'ema_accuracy': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          'ema_loss': jnp.sum(loss * mask)}

