"""Pieces every trainer shares: model from config, variable init, eval step, init_from."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jkd import data, models
from jkd.checkpoint import load_arrays
from jkd.errors import UserError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# Collections a forward pass may write that are not state to keep across steps.
TRANSIENT_COLLECTIONS = ('intermediates',)


def compute_dtype(name: str):
  if name not in DTYPES:
    raise UserError(f'dtype {name!r} is unknown; use one of {", ".join(DTYPES)}.')
  return DTYPES[name]


def create_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """`config.model` = {name, dtype, ...overrides} -> a Flax module via `jkd.models.create`."""
  kwargs = {k: v for k, v in model_cfg.to_dict().items() if k != 'name'}
  if 'dtype' in kwargs:
    kwargs['dtype'] = compute_dtype(kwargs['dtype'])
  kwargs.setdefault('num_classes', num_classes)
  return models.create(model_cfg.name, **kwargs)


def without_attention_maps(model: nn.Module) -> nn.Module:
  """The model with `sow_attention=False` if it has that field (a ViT), else unchanged: its
  block outputs can be tapped while attention keeps the fused kernel."""
  if hasattr(model, 'sow_attention'):
    return model.clone(sow_attention=False)
  return model


def input_shape(info: data.DatasetInfo, data_cfg) -> tuple[int, int, int]:
  h, w, c = info.image_shape
  size = data_cfg.get('image_size')
  return (size, size, c) if size else (h, w, c)


def init_variables(model: nn.Module, key: jax.Array, shape) -> tuple[Any, dict]:
  """Returns (params, model_state) from a dummy batch of one; drops transient collections."""
  params_key, dropout_key = jax.random.split(key)
  variables = model.init({'params': params_key, 'dropout': dropout_key},
                         jnp.zeros((1, *shape), jnp.float32), train=False)
  params = variables['params']
  model_state = {k: v for k, v in variables.items()
                 if k != 'params' and k not in TRANSIENT_COLLECTIONS}
  return params, model_state


def apply_model(model: nn.Module, params, model_state: dict, images, *, train: bool,
                key: jax.Array | None = None, capture: bool = False):
  """Forward pass. Returns (logits, new_model_state, intermediates).

  `capture=True` also returns the 'intermediates' collection (named features, attention maps).
  """
  mutable = list(model_state) if train else []
  if capture:
    mutable.append('intermediates')
  rngs = {'dropout': key} if (train and key is not None) else {}
  out = model.apply({'params': params, **model_state}, images, train=train, rngs=rngs,
                    mutable=mutable or False)
  if not mutable:
    return out, model_state, {}
  logits, updated = out
  updated = dict(updated)
  intermediates = updated.pop('intermediates', {})
  return logits, {**model_state, **updated}, intermediates


def total_steps(config, num_train_examples: int) -> int:
  if config.get('total_steps', 0):
    return int(config.total_steps)
  return max(int(config.num_epochs * num_train_examples // config.batch_size), 1)


def classification_eval_step(model: nn.Module, mean, std, dtype, num_classes: int):
  """(state, batch) -> sums of `correct`, `loss` (cross-entropy) and `count` over valid rows."""
  def eval_step(state, batch):
    images = data.normalize(batch['image'], mean, std, dtype)
    logits, _, _ = apply_model(model, state.params, state.model_state, images, train=False)
    mask = batch['mask']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
            'count': jnp.sum(mask)}
  del num_classes
  return eval_step


def merge_pretrained(target: Any, source: Mapping, *, skip: tuple[str, ...] = ('head',)
                     ) -> tuple[Any, list[str], list[str]]:
  """Copies `source` leaves into `target` where the path exists and the shape matches.

  Returns (merged, loaded_paths, skipped_paths). Paths whose first part is in `skip` keep their
  fresh initialisation (a new classifier head for fine-tuning).
  """
  flat_source = {'/'.join(map(str, k)): v for k, v in _flatten(source)}
  loaded, skipped = [], []

  def pick(path, leaf):
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    value = flat_source.get(key)
    if key.split('/')[0] in skip or value is None or tuple(value.shape) != tuple(leaf.shape):
      skipped.append(key)
      return leaf
    loaded.append(key)
    return jnp.asarray(value, leaf.dtype)
  merged = jax.tree_util.tree_map_with_path(pick, target)
  return merged, loaded, skipped


def _flatten(tree: Mapping, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), np.asarray(v)


def load_init_from(workdir: str, state, *, params_prefix: tuple[str, ...] = (),
                   skip: tuple[str, ...] = ('head',), into: str | None = None, log=print):
  """Initialises `state.params` (and BatchNorm stats) from another run's latest checkpoint.

  Args:
    params_prefix: path inside the source params to take (e.g. ('encoder',) for the encoder
      of a pretraining model).
    skip: top-level names of the model that keep their fresh initialisation.
    into: the key of `state.params` that holds the model (a distilled student sits under
      'student', beside its projectors, which stay fresh); None: all of `state.params`.
  """
  arrays, meta = load_arrays(workdir)
  source = arrays['params']
  # A distilled student sits under params['student'] beside its dropped projectors.
  for p in params_prefix or tuple(meta.get('params_prefix', ())):
    source = source[p]
  target = state.params if into is None else state.params[into]
  params, loaded, skipped = merge_pretrained(target, source, skip=skip)
  if into is not None:
    params = {**state.params, into: params}
  if not loaded:
    raise UserError(f'init_from={workdir!r}: none of its weights fit this model '
                    f'({meta.get("model")!r} there). Check config.model and config.init_from.')
  model_state = state.model_state
  if model_state and arrays.get('model_state'):
    model_state, _, _ = merge_pretrained(model_state, arrays['model_state'], skip=())
  log(f'init_from {workdir}: loaded {len(loaded)} tensors, kept {len(skipped)} fresh '
      f'({", ".join(sorted({s.split("/")[0] for s in skipped})[:6]) or "none"})')
  return state.replace(params=params, model_state=model_state)
