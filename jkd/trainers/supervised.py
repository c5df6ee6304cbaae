"""Supervised classification: `jkd train`.

Cross-entropy with label smoothing and optional mixup, optax optimizer from `config.optim`, bf16
compute with fp32 parameters when `config.model.dtype='bfloat16'`. Reads top to bottom:
data -> model -> optimizer -> init -> step -> Task for `jkd.loop.run`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jkd import data, loop
from jkd.data import randaugment
from jkd.optim import accumulate_steps, layerwise_lr_scales, make_optimizer
from jkd.trainers import common, ema


def cross_entropy_step(model, tx, schedule, *, mean, std, dtype, num_classes: int,
                       label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                       ema_decay: float = 0.0, ema_every: int = 1, augment: dict | None = None):
  """Returns `step(state, batch, key) -> (state, metrics)` for softmax cross-entropy.

  batch: image uint8 (B, H, W, C), label int32 (B,). The key is folded with the step number so
  a resumed run draws the same randomness as an uninterrupted one. `ema_decay` > 0 moves the
  EMA of the weights after each update (`jkd.trainers.ema`; every `ema_every` steps).
  `augment`: RandAugment / random erasing on the device (`common.augmented_images`).
  """
  def step(state: loop.TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    mix_key, dropout_key = jax.random.split(key)
    images = common.augmented_images(batch['image'], key, mean, std, augment, dtype)
    targets = jax.nn.one_hot(batch['label'], num_classes)
    if mixup_alpha > 0:
      images, targets = data.mixup(mix_key, images, targets, mixup_alpha)
    if label_smoothing > 0:
      targets = optax.smooth_labels(targets, label_smoothing)

    def loss_fn(params):
      logits, model_state, _ = common.apply_model(model, params, state.model_state, images,
                                                  train=True, key=dropout_key)
      logits = logits.astype(jnp.float32)
      return optax.softmax_cross_entropy(logits, targets).mean(), (logits, model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state.apply_gradients(grads, tx, model_state=model_state)
    new_state = ema.after_step(state, new_state, ema_decay, ema_every)
    metrics = {
        'loss': loss,
        'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'grad_norm': optax.tree.norm(grads),
        'lr': schedule(state.step),
    }
    return new_state, metrics
  return step


def build_task(config, workdir: str) -> loop.Task:
  """The supervised Task for `jkd.loop.run`."""
  del workdir  # Everything is written by the loop.
  run = common.RunData.from_config(config)
  info = run.info
  model = common.create_model(config.model, info.num_classes)
  dtype = common.compute_dtype(config.model.get('dtype', 'float32'))
  # Layer-wise lr decay (fine-tuning a pretrained ViT); 0 or absent = off.
  layer_decay = config.optim.get('layer_decay', 0.0)
  lr_scale_fn = functools.partial(layerwise_lr_scales, decay=layer_decay) if layer_decay else None
  tx, schedule = make_optimizer(config.optim, config.batch_size, run.steps,
                                lr_scale_fn=lr_scale_fn)
  decay = ema.decay_of(config)

  return common.make_task(
      config, 'train', run, meta={'num_classes': info.num_classes},
      init_state=lambda key: ema.attach(common.init_state(model, tx, run.shape, key), decay),
      train_step=cross_entropy_step(
          model, tx, schedule, mean=info.mean, std=info.std, dtype=dtype,
          num_classes=info.num_classes, label_smoothing=config.get('label_smoothing', 0.0),
          mixup_alpha=config.get('mixup_alpha', 0.0), ema_decay=decay,
          ema_every=accumulate_steps(config.optim),
          augment=randaugment.augment_settings(config.data)),
      eval_step=common.classification_eval_step(model, info.mean, info.std, dtype,
                                                info.num_classes),
      on_init=common.init_from(config))

