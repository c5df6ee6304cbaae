"""The model zoo: ViTs and ResNets looked up by name.

  model = jkd.models.create('vit_s16', num_classes=10, dtype=jnp.bfloat16, attention='cudnn')
  variables = model.init(key, images)            # images (B, H, W, C)
  logits = model.apply(variables, images)         # (B, num_classes) fp32

ImageNet names default to 1000 classes; the small ones (suffix `_s` or `_p4`, for 28×28 / 32×32
inputs) to 10; the CIFAR-100 zoo of the distillation tables (`resnet8x4`, `resnet32x4`,
`wrn_16_2`, `wrn_40_2`, `vgg8`, `vgg13`, `mobilenetv2`, `shufflenetv2`, ...; `jkd.models.cifar`)
to 100.
"""

import dataclasses

import flax.linen as nn

from jkd.errors import UserError
from jkd.models import cifar
from jkd.models.layers import param_count
from jkd.models.resnet import ResNet
from jkd.models.vit import ViT, attention_maps, block_outputs, posemb_sincos_2d

__all__ = ['MODEL_DEFAULTS_VERSION', 'ResNet', 'ViT', 'attention_maps', 'block_outputs',
           'create', 'legacy_fields', 'names', 'param_count', 'posemb_sincos_2d',
           'with_legacy_fields']


def _vit(width, depth, heads, patch=16, num_classes=1000):
  return ViT, dict(num_classes=num_classes, patch_size=patch, width=width, depth=depth,
                   num_heads=heads)


def _resnet(stage_sizes, block='basic', width=64, stem='imagenet', num_classes=1000):
  return ResNet, dict(num_classes=num_classes, stage_sizes=tuple(stage_sizes), block=block,
                      width=width, stem=stem)


_REGISTRY = {
    'vit_ti16': _vit(192, 12, 3),
    'vit_s16': _vit(384, 12, 6),
    'vit_b16': _vit(768, 12, 12),
    'vit_l16': _vit(1024, 24, 16),
    'vit_h14': _vit(1280, 32, 16, patch=14),
    'resnet18': _resnet([2, 2, 2, 2]),
    'resnet34': _resnet([3, 4, 6, 3]),
    'resnet50': _resnet([3, 4, 6, 3], block='bottleneck'),
    # Small inputs (28×28, 32×32): no downsampling stem.
    'resnet8_s': _resnet([1, 1, 1], width=16, stem='small', num_classes=10),
    'resnet18_s': _resnet([2, 2, 2, 2], stem='small', num_classes=10),
    'resnet20_s': _resnet([3, 3, 3], width=16, stem='small', num_classes=10),
    'vit_micro_p7': _vit(64, 4, 4, patch=7, num_classes=10),   # 16 tokens: the CPU demo's teacher.
    'vit_nano_p4': _vit(96, 4, 3, patch=4, num_classes=10),
    'vit_mini_p4': _vit(192, 6, 3, patch=4, num_classes=10),
    'vit_small_p4': _vit(256, 8, 4, patch=4, num_classes=10),
    # The students and teachers of mdistiller's CIFAR-100 tables (jkd/models/cifar.py).
    **cifar.registry(),
}


# Model fields whose default changed, with the value that runs saved before the change used.
# A checkpoint records `meta['model_defaults'] = MODEL_DEFAULTS_VERSION`; one without it (an
# older run) gets these values wherever its saved config leaves the field unset, so that no
# saved run changes meaning. Keyed by the run's MIM method (checkpoint `meta['method']`).
MODEL_DEFAULTS_VERSION = 2
LEGACY_DEFAULTS: dict[str, dict] = {
    # Until 2026-12 MAE used jkd's own sin-cos table; since then the official MAE table.
    'mae': {'posemb': 'sincos2d'},
}


def legacy_fields(meta: dict) -> dict:
  """The model fields an older checkpoint's saved config must be read with (see
  `LEGACY_DEFAULTS`); {} for checkpoints written since `MODEL_DEFAULTS_VERSION`."""
  if int(meta.get('model_defaults', 1)) >= MODEL_DEFAULTS_VERSION:
    return {}
  return dict(LEGACY_DEFAULTS.get(meta.get('method'), {}))


def with_legacy_fields(model_cfg: dict, meta: dict) -> dict:
  """`model_cfg` (a saved `config.model`) with `legacy_fields(meta)` where it sets nothing."""
  return {**legacy_fields(meta), **dict(model_cfg)}


def names() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_REGISTRY)


def fields(name: str) -> list[str]:
  """The fields `create(name, ...)` accepts as overrides, sorted."""
  cls, _ = _lookup(name)
  return _fields(cls)


def create(name: str, **overrides) -> nn.Module:
  """Builds a registered model, with some of its fields replaced.

  Args:
    name: one of `names()`.
    **overrides: module fields to replace, e.g. num_classes=10, dtype=jnp.bfloat16,
      attention='cudnn', drop_path=0.1.

  Returns:
    An unbound Flax Linen module.

  Raises:
    UserError: unknown name, or a field the model does not have.
  """
  cls, defaults = _lookup(name)
  valid = _fields(cls)
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise UserError(f'model {name!r} has no field(s) {", ".join(unknown)}; '
                    f'valid fields: {", ".join(valid)}.')
  return cls(**{**defaults, **overrides})


def _lookup(name: str):
  if name not in _REGISTRY:
    raise UserError(f'unknown model {name!r}; available models: {", ".join(names())}.')
  return _REGISTRY[name]


def field_default(name: str, field: str):
  """The value model `name` uses for `field` unless overridden (KeyError if it has none)."""
  cls, defaults = _lookup(name)
  if field not in _fields(cls):
    raise KeyError(field)
  if field in defaults:
    return defaults[field]
  spec = next(f for f in dataclasses.fields(cls) if f.name == field)
  if spec.default is not dataclasses.MISSING:
    return spec.default
  return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None


def _fields(cls) -> list[str]:
  # `parent` and `name` are Flax plumbing, not model settings.
  return sorted(f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name'))
