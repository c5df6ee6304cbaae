"""Models from a run's config: the module of `config.model`, its input shape and fresh variables.

  model = build.create_model(config.model, num_classes=10)        # a classifier
  mim = build.create_mim_model('mae', config.model, channels=1)   # a SimMIM / MAE model
  params, model_state = build.init_variables(model, key, build.input_shape(info, config.data))

Every job builds its models here (`jkd.trainers.common` re-exports these names), and so do the
modules below the jobs that rebuild a saved run's model: the frozen teacher, `jkd import`,
`jkd export` and `jkd plan`.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jkd import models
from jkd.errors import UserError
from jkd.models.mim import METHODS, create_mim

if TYPE_CHECKING:
  from jkd.data import DatasetInfo

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


# Fields one MIM class has and the other lacks (decoder_*, posemb...).
_MIM_FIELDS = {m: {f.name for f in dataclasses.fields(c)} for m, c in METHODS.items()}
_ONE_METHOD_ONLY = set.union(*_MIM_FIELDS.values()) - set.intersection(*_MIM_FIELDS.values())


def create_mim_model(method: str, model_cfg: Mapping, channels: int, *, dtype: str | None = None,
                     either_method: bool = False) -> nn.Module:
  """{name (the ViT encoder), dtype, ...MIM fields} -> a SimMIM / MAE module (`create_mim`).

  Args:
    dtype: replaces the config's compute dtype (a teacher run in another precision).
    either_method: ignore fields that only the other method has (a MIM distillation's student
      config may carry decoder fields for either); otherwise they are a UserError.
  """
  model_cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  kwargs = {k: v for k, v in model_cfg.items() if k != 'name' and not (
      either_method and k in _ONE_METHOD_ONLY and k not in _MIM_FIELDS.get(method, ()))}
  if dtype:
    kwargs['dtype'] = dtype
  if 'dtype' in kwargs:
    kwargs['dtype'] = compute_dtype(kwargs['dtype'])
  kwargs.setdefault('channels', channels)
  return create_mim(method, model_cfg['name'], **kwargs)


def without_attention_maps(model: nn.Module) -> nn.Module:
  """The model with `sow_attention=False` if it has that field (a ViT), else unchanged: its
  block outputs can be tapped while attention keeps the fused kernel."""
  if hasattr(model, 'sow_attention'):
    return model.clone(sow_attention=False)
  return model


def input_shape(info: DatasetInfo, data_cfg) -> tuple[int, int, int]:
  """One input image (H, W, C): the dataset's, square `config.data.image_size` when set."""
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
