"""The classifier a workdir holds, as a pure function of raw pixels: what every export converts.

  clf = Classifier.from_workdir('runs/student')
  logits = clf.apply(pixels)        # pixels float32 (B, H, W, C) in [0, 255]

A channel-pruned run (`jkd compress` with `config.prune.method='channel'`) stores its
full-width parameters with whole channels at zero; here they are physically removed
(`jkd.compress.channel_pruning.shrink`), so every exported file is the smaller dense model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jkd import data
from jkd.errors import UserError
from jkd.models import param_count
from jkd.models.mim import METHODS


@dataclasses.dataclass
class Classifier:
  """A Flax classifier, its variables and the input it expects.

  Attributes:
    module: the Linen module (its `__call__(images, train=False)` returns logits (B, classes)).
    variables: {'params': ..., 'batch_stats': ...} as host numpy arrays.
    image_shape: (H, W, C) of one image.
    mean, std: per-channel normalisation of pixel / 255 (the dataset's).
    num_classes: classes of the head.
    model_config: the run's `config.model` (after channel pruning: the narrower model's).
    data_config: the run's `config.data` (calibration and evaluation read it).
    description: what reports record ({'workdir', 'model', ...}).
  """
  module: nn.Module
  variables: dict
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  model_config: dict
  data_config: Any
  description: dict

  @classmethod
  def from_workdir(cls, workdir: str) -> 'Classifier':
    """Reads the latest checkpoint of a classifier workdir (train, distill, compress, import).

    Raises UserError for a workdir that holds no classifier (a MIM pretraining run, a model
    without a head), naming what it holds.
    """
    from jkd.checkpoint import load_model
    saved = load_model(workdir)
    meta = saved.meta
    config = ml_collections.ConfigDict(meta.get('config') or {})
    model_cfg = dict(saved.model_config)
    if meta.get('method') in METHODS or meta.get('kind') in ('pretrain',):
      raise UserError(f'{workdir!r} holds a {meta.get("kind")!r} run ({meta.get("method")}), '
                      'not a classifier: only classifiers export (the logits are the output). '
                      'Fine-tune it first: jkd train --config configs/fashion_mnist/finetune.py '
                      f'--config.init_from={workdir}.')
    if not model_cfg.get('name') or 'data' not in config:
      raise UserError(f'The checkpoint in {workdir!r} does not record its model and data '
                      'config; export needs a workdir written by jkd train, distill, compress '
                      'or import.')
    num_classes = int(meta.get('num_classes') or 0)
    return cls.from_run(config, model_cfg, saved.variables, num_classes=num_classes,
                        description={'workdir': workdir, 'model': model_cfg['name'],
                                     'kind': meta.get('kind'), 'step': saved.step})

  @classmethod
  def from_run(cls, config, model_cfg: dict, variables: dict, *, num_classes: int = 0,
               description: dict | None = None) -> 'Classifier':
    """The classifier of a run's config and variables (e.g. `jkd compress`'s final state)."""
    from jkd.models import build
    info = data.get_info(config.data)
    shape = build.input_shape(info, config.data)
    num_classes = int(num_classes or info.num_classes)
    variables = jax.tree.map(np.asarray, nn.meta.unbox(variables))
    model_cfg = dict(model_cfg)
    prune = config.get('prune') or {}
    if prune.get('enabled') and prune.get('method') == 'channel':
      from jkd.compress import channel_pruning
      model_cfg, variables = channel_pruning.shrink(model_cfg, variables)
    module = build.create_model(ml_collections.ConfigDict(
        {**model_cfg, 'dtype': 'float32'}), num_classes)
    if getattr(module, 'num_classes', 1) == 0:
      raise UserError(f'{model_cfg["name"]} has no classifier head (num_classes=0): only '
                      'classifiers export.')
    return cls(module=module, variables=variables, image_shape=tuple(shape),
               mean=tuple(info.mean), std=tuple(info.std), num_classes=num_classes,
               model_config=model_cfg, data_config=config.data,
               description=description or {'model': model_cfg['name']})

  def apply(self, pixels: jax.Array, variables: dict | None = None) -> jax.Array:
    """Logits (B, num_classes) float32 of float32 pixels (B, H, W, C) in [0, 255].

    `x = (pixels / 255 - mean) / std`, then the model in inference mode (BatchNorm running
    statistics, no dropout).
    """
    v = self.variables if variables is None else variables
    x = pixels.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    return self.module.apply(v, x, train=False).astype(jnp.float32)

  def param_count(self) -> int:
    """Parameters of the (possibly shrunk) model, BatchNorm statistics excluded."""
    return int(param_count(self.variables['params']))
