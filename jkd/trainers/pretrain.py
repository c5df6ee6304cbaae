"""Masked-image-modeling pretraining: `jkd pretrain` (SimMIM or MAE, `config.method`).

Reads top to bottom: data -> model -> optimizer -> init -> step -> Task for `jkd.loop.run`.
The mask is drawn inside the jitted step from `fold_in(key, step)`, on device and after the
batch is sharded, so a resumed run draws the masks an uninterrupted one would.

Config fields (beyond `jkd.defaults.base_config`):
  method: 'simmim' | 'mae'.
  model: {name: a registered ViT (the encoder), dtype, ...} plus any `SimMIM` / `MAE` field
    (decoder_width, decoder_depth, decoder_heads, posemb, drop_path...).
  mask_ratio: fraction of patches masked (SimMIM 0.6, MAE 0.75).
  mask_patch_size: SimMIM's masking block in pixels (a multiple of the model's patch size).
  norm_pix_loss: MAE's per-patch normalised targets.
  num_figure_images: examples shown in `WORKDIR/reconstructions.png`.

Loss: SimMIM = L1 on masked pixels (`losses.simmim_l1`), MAE = MSE on removed patches
(`losses.mae_mse`), both on the mean/std-normalised images.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jkd import data, figures, loop, masking, storage
from jkd.errors import UserError
from jkd.models.mim import METHODS
from jkd.mim import MimObjective  # Also `pretrain.MimObjective`, where it was defined.
from jkd.optim import make_optimizer
from jkd.trainers import common

# Eval masks come from this fixed key so every evaluation scores the same masking.
EVAL_MASK_SEED = 1234
MASK_COLOR = np.array([0.35, 0.45, 0.85], np.float32)


def mim_step(objective: MimObjective, tx, schedule, *, mean, std, dtype):
  """Returns `step(state, batch, key) -> (state, metrics)`: mask, reconstruct, loss, update."""
  def step(state: loop.TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    mask_key, dropout_key = jax.random.split(key)
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = objective.draw_mask(mask_key, target.shape[0])

    def loss_fn(params):
      pred = objective.forward(params, target.astype(dtype), mask, train=True, key=dropout_key)
      return objective.loss(pred, target, mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state = state.apply_gradients(grads, tx)
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                       'lr': schedule(state.step)}
  return step


def mim_eval_step(objective: MimObjective, *, mean, std, dtype):
  """(state, batch) -> {'loss': mean loss * count, 'count'} over valid rows, fixed masks."""
  def eval_step(state, batch):
    target = data.normalize(batch['image'], mean, std, jnp.float32)
    mask = objective.draw_mask(jax.random.key(EVAL_MASK_SEED), target.shape[0])
    pred = objective.forward(state.params, target.astype(dtype), mask, train=False)
    valid = batch['mask'].astype(jnp.float32)
    count = jnp.sum(valid)
    loss = objective.loss(pred, target, mask, row_weight=valid)
    # Every row has the same number of masked patches, so count-weighting batch means gives
    # the per-example mean over the split.
    return {'loss': jnp.where(count > 0, loss * count, 0.0), 'count': count}
  return eval_step


def write_reconstructions(path: str, objective: MimObjective, params, images_uint8, *, mean,
                          std, dtype, title: str) -> str:
  """Runs the model on a few eval images with the eval masks and writes the figure."""
  target = data.normalize(images_uint8, mean, std, jnp.float32)
  mask = objective.draw_mask(jax.random.key(EVAL_MASK_SEED), target.shape[0])
  pred = jax.jit(lambda p, x, m: objective.forward(p, x, m, train=False))(
      params, target.astype(dtype), mask)
  pred, recon = objective.reconstruct(pred, target, mask)
  originals, masked, to_pixels = figure_inputs(objective, target, mask, mean, std)
  return figures.save_reconstructions(path, originals, masked, to_pixels(recon), title=title,
                                      predictions=to_pixels(pred))


def figure_inputs(objective, target, mask, mean, std):
  """(originals, masked inputs, to_pixels) for a reconstruction figure of normalised `target`
  [B, H, W, C] under `mask`; `to_pixels` maps normalised images back to [0, 1]."""
  _, h, w, _ = target.shape
  p = objective.patch
  pixel = np.asarray(masking.upsample_mask(
      objective.patch_mask(mask).reshape(-1, h // p, w // p), p))[..., None]
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  to_pixels = lambda x: np.clip(np.asarray(x, np.float32) * std + mean, 0, 1)  # noqa: E731
  originals = to_pixels(target)
  # Masked patches in a colour no image contains, so a grey garment never reads as masked.
  rgb = np.repeat(originals, 3, axis=-1) if originals.shape[-1] == 1 else originals
  return originals, rgb * (1 - pixel) + MASK_COLOR * pixel, to_pixels


def first_eval_images(eval_batches, n: int) -> np.ndarray:
  """The first `n` real (unpadded) images of the eval set, (n, H, W, C) as stored, for figures."""
  images = []
  for batch in eval_batches:
    images.append(batch['image'][batch['mask'] > 0])
    if sum(len(x) for x in images) >= n:
      break
  return np.concatenate(images)[:n]


def build_task(config, workdir: str) -> loop.Task:
  """The pretraining Task for `jkd.loop.run`."""
  if config.get('method') not in METHODS:
    raise UserError(f"config.method={config.get('method')!r}: use 'simmim' or 'mae'.")
  run = common.RunData.from_config(config, square_for='MIM pretraining')
  info = run.info
  model = common.create_mim_model(config.method, config.model, channels=run.shape[2])
  objective = MimObjective(model, config, run.shape[0])
  dtype = common.compute_dtype(config.model.get('dtype', 'float32'))
  tx, schedule = make_optimizer(config.optim, config.batch_size, run.steps)

  def init_state(key):
    params_key, mask_key = jax.random.split(key)
    params = model.init({'params': params_key}, jnp.zeros((1, *run.shape), jnp.float32),
                        objective.draw_mask(mask_key, 1), train=False)['params']
    return common.new_state(params, {}, tx)

  return common.make_task(
      config, 'pretrain', run,
      meta={'method': config.method, 'model_fields': {'posemb': model.posemb}},
      init_state=init_state,
      train_step=mim_step(objective, tx, schedule, mean=info.mean, std=info.std, dtype=dtype),
      eval_step=mim_eval_step(objective, mean=info.mean, std=info.std, dtype=dtype),
      on_finish=functools.partial(write_figure, config, workdir, objective, info, dtype=dtype))


def write_figure(config, workdir: str, objective: MimObjective, info: data.DatasetInfo, state,
                 eval_results: dict, *, dtype) -> dict:
  """`on_finish` of a pretraining run: the final eval loss, and `reconstructions.png` of a few
  eval images under the eval masks (written by process 0)."""
  out = {'eval_loss': eval_results.get('loss')}
  if jax.process_index() != 0:
    return out
  images = first_eval_images(common.eval_batches(config)(),
                             int(config.get('num_figure_images', 8)))
  path = storage.join(workdir, 'reconstructions.png')
  loss = out['eval_loss']
  method = {'mae': 'MAE', 'simmim': 'SimMIM'}[config.method]
  title = (f'{method} {config.model.name}, step {int(state.step)}, '
           f'mask ratio {objective.ratio:g}' + (f', eval loss {loss:.4f}' if loss else ''))
  write_reconstructions(path, objective, jax.device_get(state.params), images,
                        mean=info.mean, std=info.std, dtype=dtype, title=title)
  return {**out, 'reconstructions': path}

