"""Pieces every trainer shares: the run's data and length, the inputs both models of a
distillation see, the eval step, `init_from`, and the Task itself. Models from config and their
variable init live with the models (`jkd.models.build`); their names are re-exported here."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkd import data, loop, models, tasks
from jkd.data import randaugment
from jkd.checkpoint import RUN_STATE_KEYS, load_model
from jkd.errors import UserError
# Models from config (re-exported: `common.create_model` etc. keep working).
from jkd.models.build import (  # noqa: F401
    DTYPES, TRANSIENT_COLLECTIONS, compute_dtype, create_mim_model, create_model, init_variables,
    input_shape, without_attention_maps)
from jkd.models.mim import posemb_of
from jkd.tasks.classification import confusion_counts  # noqa: F401 (re-export)
from jkd.trainers import ema


def split_run_state(model_state: dict) -> tuple[dict, dict]:
  """(the model's collections, the trainer's entries) of a `model_state`: the EMA of the weights
  and the loss terms' state (`jkd.checkpoint.RUN_STATE_KEYS`) are not the model's variables."""
  model_vars = {k: v for k, v in model_state.items() if k not in RUN_STATE_KEYS}
  return model_vars, {k: v for k, v in model_state.items() if k in RUN_STATE_KEYS}


def apply_model(model: nn.Module, params, model_state: dict, images, *, train: bool,
                key: jax.Array | None = None, capture: bool = False):
  """Forward pass. Returns (logits, new_model_state, intermediates).

  `capture=True` also returns the 'intermediates' collection (named features, attention maps).
  The trainer's entries of `model_state` (an EMA of the weights) pass through untouched.
  """
  model_state, run_state = split_run_state(model_state)
  if run_state:
    logits, model_state, intermediates = apply_model(model, params, model_state, images,
                                                     train=train, key=key, capture=capture)
    return logits, {**model_state, **run_state}, intermediates
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


@dataclasses.dataclass(frozen=True)
class RunData:
  """What every trainer reads first: the dataset's facts, the input shape and the run's length.

  Attributes:
    info: the dataset (`data.DatasetInfo`: classes, mean/std, split sizes).
    shape: one input image (H, W, C) as the pipeline yields it.
    steps: train steps of the run (`config.total_steps`, else epochs of the train split).
  """
  info: data.DatasetInfo
  shape: tuple[int, int, int]
  steps: int

  @classmethod
  def from_config(cls, config, *, square_for: str = '') -> 'RunData':
    """Reads `config.data`; `square_for` names a job that needs square images (MIM)."""
    from jkd import validate  # pylint: disable=g-import-not-at-top  (no cycle at import time)
    info = data.get_info(config.data)
    shape = input_shape(info, config.data)
    if square_for and shape[0] != shape[1]:
      raise UserError(f'{square_for} needs square images, got {shape[:2]}: set '
                      '--config.data.image_size.')
    validate.check_data(config, info, shape)
    return cls(info, shape, total_steps(config, info.num_examples[config.data.train_split]))


def new_state(params, model_state: dict, tx) -> loop.TrainState:
  """A step-0 TrainState with the optimizer state of `tx` for `params`."""
  return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                         opt_state=tx.init(params))


def init_state(model: nn.Module, tx, shape, key: jax.Array) -> loop.TrainState:
  """A classifier's step-0 state: its fresh variables and the optimizer state of `tx`."""
  return new_state(*init_variables(model, key, shape), tx)


def eval_batches(config):
  """() -> one pass over `config.data.eval_split` (the Task's `eval_batches`)."""
  return lambda: data.make_eval_iterator(
      config.data, config.data.eval_split,
      global_batch_size=config.get('eval_batch_size', config.batch_size))


def make_task(config, kind: str, run: RunData, *, meta: dict, **fields) -> loop.Task:
  """The Task of a run of `config`: the run's train iterator, eval batches, batch size and
  length, filled in around the trainer's own `fields` (init_state, train_step, eval_step...,
  any of which may replace the defaults). `meta` is added to {model, dataset, image_shape}."""
  defaults = dict(
      train_iterator=fields.pop('train_iterator', None) or data.make_train_iterator(
          config.data, global_batch_size=config.batch_size, seed=config.seed),
      eval_batches=eval_batches(config), global_batch_size=config.batch_size,
      total_steps=run.steps)
  defaults['task_type'] = tasks.get(config)
  return loop.Task(kind=kind, **{**defaults, **fields}, meta={
      'model': config.model.name, 'dataset': config.data.name, 'image_shape': list(run.shape),
      'class_names': list(run.info.class_names), **meta})


def step_inputs(batch, key, step, info, mixup_alpha: float, augment: dict | None = None):
  """What both models of a distillation see at `step`: (normalized, mixed images (B, H, W, C)
  fp32, mixed one-hot targets (B, C), dropout key). Mixup and the device-side augmentation
  (`augment`: `data.randaugment.augment_settings(config.data)`) are drawn from (key, step) only,
  so the teacher cache reproduces them."""
  key = jax.random.fold_in(key, step)
  mix_key, dropout_key = jax.random.split(key)
  images = augmented_images(batch['image'], key, info.mean, info.std, augment, jnp.float32)
  targets = jax.nn.one_hot(batch['label'], info.num_classes)
  if mixup_alpha > 0:  # Mixed once, seen by both models: consistent teaching.
    images, targets = data.mixup(mix_key, images, targets, mixup_alpha)
  return images, targets, dropout_key


def augmented_images(images, key, mean, std, augment: dict | None, dtype):
  """uint8 (B, H, W, C) -> normalised `dtype` images with RandAugment before and random
  erasing after the normalisation (DeiT's order), each drawn from its own fold of `key` (the
  step's); without `augment` (or with both off) just `data.normalize`."""
  ops, magnitude, magnitude_std = (augment or {}).get('randaugment', (0, 0.0, 0.0))
  erasing = (augment or {}).get('random_erasing', 0.0)
  if ops:
    images = randaugment.rand_augment(jax.random.fold_in(key, 11), images, ops, magnitude,
                                      magnitude_std)
  images = data.normalize(images, mean, std, jnp.float32 if erasing else dtype)
  if erasing:
    images = randaugment.random_erasing(jax.random.fold_in(key, 12), images, erasing)
    images = images.astype(dtype)
  return images


def classification_eval_step(model: nn.Module, mean, std, dtype, num_classes: int):
  """(state, batch, *frozen) -> sums of `correct`, `loss` (cross-entropy) and `count` over valid
  rows, and the [K, K] `confusion` counts (`jkd eval` reports them per class). Extra arguments
  (a frozen teacher's variables) are ignored."""
  def eval_step(state, batch, *frozen):
    del frozen
    images = data.normalize(batch['image'], mean, std, dtype)
    logits, _, _ = apply_model(model, state.params, state.model_state, images, train=False)
    mask = batch['mask']
    # The EMA of the weights, when the run keeps one (jkd.trainers.ema), beside them.
    ema_sums = ema.eval_sums(state, lambda p, v: apply_model(model, p, v, images, train=False)[0],
                             batch['label'], mask)
    return {**tasks.get('classification').eval_sums(logits, batch['label'], mask, num_classes),
            **ema_sums}
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


def init_from(config, **options):
  """The Task's `on_init` that loads `config.init_from` (the sub-tree `config.init_prefix`) into
  a fresh state (`load_init_from(..., **options)`); None when the config names no workdir."""
  if not config.get('init_from'):
    return None
  return functools.partial(load_init_from, config.init_from,
                           params_prefix=tuple(config.get('init_prefix', ()) or ()),
                           posemb=posemb_of(config.model, config.get('method')),
                           model_name=config.model.get('name'), **options)


# Top-level parts a warm start may leave fresh: heads (new classes, DeiT's second head), and the
# tokens and learned positions a pretraining model may lack (MAE uses fixed sin-cos positions).
FRESH_PARTS = ('head', 'head_dist', 'pos_embedding', 'cls', 'dist_token')


def load_init_from(workdir: str, state, *, params_prefix: tuple[str, ...] = (),
                   skip: tuple[str, ...] = ('head', 'head_dist'), into: str | None = None,
                   posemb: str | None = None, model_name: str | None = None, log=print):
  """Initialises `state.params` (and BatchNorm stats) from another run's latest checkpoint.

  The saved model must be this run's architecture: the same model name (`model_name`, when
  given, against the name the checkpoint records), and every tensor of this model found there
  with the same shape, except the `FRESH_PARTS` a fine-tune adds. Anything else (a ViT into a
  ResNet, resnet20_s into resnet8_s, another width) is a UserError: a warm start that loads a
  few tensors, or another model's, would train silently from a wrong start.

  Args:
    params_prefix: path inside the source params to take (e.g. ('encoder',) for the encoder
      of a pretraining model).
    skip: top-level names of the model that keep their fresh initialisation (by default the
      classifier heads, DeiT's distillation head too: a fine-tune on new classes replaces both).
    into: the key of `state.params` that holds the model (a distilled student sits under
      'student', beside its projectors, which stay fresh); None: all of `state.params`.
    posemb: this model's position embedding; a fixed table that differs from the one the
      source was trained with is refused (the weights would see other positions).
    model_name: this run's `config.model.name`.
  """
  saved = load_model(workdir, prefix=params_prefix)  # The run's own prefix unless one is given.
  source = posemb_of(saved.model_config, saved.meta.get('method')) if saved.model_config \
      else None
  fixed = models.vit.SINCOS_TABLES
  if posemb in fixed and source in fixed and source != posemb:
    raise UserError(f'init_from={workdir!r} was trained with the position table {source!r}, '
                    f'but this model uses {posemb!r}: the weights would see other positions. '
                    f'Set --config.model.posemb={source}.')
  saved_name = saved.meta.get('model')
  if model_name and saved_name and saved_name != model_name:
    raise UserError(
        f'init_from={workdir!r} holds a {saved_name!r} model ({saved.meta.get("kind")} run), but '
        f'this run trains {model_name!r}: the weights of another architecture cannot start it. '
        f'Set --config.model.name={saved_name} (and the same model fields), or point '
        'config.init_from to a run of this model.')
  target = state.params if into is None else state.params[into]
  params, loaded, skipped = merge_pretrained(target, saved.params, skip=skip)
  flat_source = {'/'.join(map(str, k)): v.shape for k, v in _flatten(saved.params)}
  # Left fresh for another reason than `skip`: another shape there, or missing there (allowed
  # for FRESH_PARTS only).
  wrong = [k for k in skipped if k.split('/')[0] not in skip
           and (k in flat_source or k.split('/')[0] not in FRESH_PARTS)]
  if into is not None:
    params = {**state.params, into: params}
  if not loaded or wrong:
    shapes = {k: tuple(np.shape(v)) for k, v in _flatten_leaves(target)}
    detail = '; '.join(
        f'{k} is {list(flat_source[k])} there, {list(shapes.get(k, ()))} here' if k in flat_source
        else f'{k} is missing there' for k in wrong[:3])
    raise UserError(
        f'init_from={workdir!r} ({saved_name!r}, {saved.meta.get("kind")} run) does not fit this '
        f'model: {len(loaded)} of {len(loaded) + len(skipped)} tensors load'
        + (f' ({detail}{" ..." if len(wrong) > 3 else ""})' if detail else '') + '. Use the '
        'model fields of that run (width, depth, heads, patch size, classes), or another '
        'config.init_from. Nothing was written.')
  model_state = state.model_state
  if model_state and saved.model_state:
    model_state, _, _ = merge_pretrained(model_state, saved.model_state, skip=())
  log(f'init_from {workdir}: loaded {len(loaded)} tensors, kept {len(skipped)} fresh '
      f'({", ".join(sorted({s.split("/")[0] for s in skipped})[:6]) or "none"})')
  return state.replace(params=params, model_state=model_state)


def _flatten_leaves(tree, prefix=()):
  """('a/b/kernel', leaf) of a tree of arrays (boxed or not)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield '/'.join(str(getattr(p, 'key', p)) for p in path), leaf
