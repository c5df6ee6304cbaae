"""ResNet (He et al. 2016), v1.5 (stride on the 3x3 conv of a bottleneck, as torchvision).

Parameters are fp32 and carry logical axis names; `dtype` is the compute dtype. BatchNorm
statistics live in the 'batch_stats' collection: apply with `mutable=['batch_stats']` when
`train=True`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd.errors import UserError
from jkd.models.layers import logical

Dtype = Any

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str,
          in_axis: str | None = 'conv_in') -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name,
                 kernel_init=logical(_conv_init, (None, None, in_axis, 'conv_out')))


def _bn(train: bool, momentum: float, dtype: Dtype, name: str, zero: bool = False):
  scale_init = nn.initializers.zeros if zero else nn.initializers.ones
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, name=name,
                      scale_init=logical(scale_init, ('norm',)),
                      bias_init=logical(nn.initializers.zeros, ('norm',)))


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual; a 1x1 projection when the shape changes.

  Attributes:
    features: output channels.
    stride: stride of the first conv (and the projection).
    dtype: compute dtype.
    bn_momentum: BatchNorm running-average momentum.
    zero_init_residual: zero the last BN scale so that the block starts as the identity.
  """
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Args: x (B, H, W, Cin). Returns (B, H/stride, W/stride, features)."""
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.bn_momentum, self.dtype, 'bn1')(y))
    y = _conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = _bn(train, self.bn_momentum, self.dtype, 'bn2', self.zero_init_residual)(y)
    if x.shape != y.shape:
      x = _conv(self.features, 1, self.stride, self.dtype, 'proj_conv')(x)
      x = _bn(train, self.bn_momentum, self.dtype, 'proj_bn')(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual.

  Attributes: as `BasicBlock`; `features` is the bottleneck width (output is 4 * features).
  """
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Args: x (B, H, W, Cin). Returns (B, H/stride, W/stride, 4 * features)."""
    y = _conv(self.features, 1, 1, self.dtype, 'conv1')(x)
    y = nn.relu(_bn(train, self.bn_momentum, self.dtype, 'bn1')(y))
    y = _conv(self.features, 3, self.stride, self.dtype, 'conv2')(y)
    y = nn.relu(_bn(train, self.bn_momentum, self.dtype, 'bn2')(y))
    y = _conv(4 * self.features, 1, 1, self.dtype, 'conv3')(y)
    y = _bn(train, self.bn_momentum, self.dtype, 'bn3', self.zero_init_residual)(y)
    if x.shape != y.shape:
      x = _conv(4 * self.features, 1, self.stride, self.dtype, 'proj_conv')(x)
      x = _bn(train, self.bn_momentum, self.dtype, 'proj_bn')(x)
    return nn.relu(x + y)


BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


class ResNet(nn.Module):
  """ResNet classifier for NHWC images.

  Stage s (0-based) has width `width * 2**s` and stride 1 for s = 0, else 2; so 4 stages give
  the ImageNet ResNets and 3 stages the CIFAR-style ones (w, 2w, 4w).

  Intermediates (apply with mutable=['intermediates']; values are 1-tuples): 'stem'
  (B, H', W', width), 'stage1'..'stageN' (B, h, w, C) NHWC, 'pre_logits' (B, C) fp32.
  Submodules: 'stem_conv', 'stem_bn', 'stage{s}_block{j}' (1-based s), 'head'.

  Attributes:
    num_classes: classes of the head; 0 means no head, and `__call__` returns pre-logits.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    width: channels of the stem and the first stage.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'small' (3x3/1 conv, for 28-32 px).
    dtype: compute dtype; parameters stay fp32 and logits are returned as fp32.
    bn_momentum: BatchNorm running-average momentum (0.9 = torch's 0.1).
    zero_init_residual: zero the last BN scale of each block (Goyal et al. 2017).
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  width: int = 64
  stem: str = 'imagenet'
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Classifies images.

    Args:
      images: (B, H, W, C) float.
      train: batch statistics and running-average updates (needs mutable=['batch_stats']).

    Returns:
      logits (B, num_classes) fp32, or pre-logits (B, C) fp32 when num_classes == 0.
    """
    if self.block not in BLOCKS:
      raise UserError(f'unknown ResNet block {self.block!r}: use one of {sorted(BLOCKS)}.')
    if self.stem not in ('imagenet', 'small'):
      raise UserError(f"unknown ResNet stem {self.stem!r}: use 'imagenet' or 'small'.")
    x = images.astype(self.dtype)
    # RGB input channels are too few to shard: leave that axis unnamed.
    kernel = 7 if self.stem == 'imagenet' else 3
    stride = 2 if self.stem == 'imagenet' else 1
    x = _conv(self.width, kernel, stride, self.dtype, 'stem_conv', in_axis=None)(x)
    x = nn.relu(_bn(train, self.bn_momentum, self.dtype, 'stem_bn')(x))
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.sow('intermediates', 'stem', x)

    block_cls = BLOCKS[self.block]
    for s, size in enumerate(self.stage_sizes):
      for j in range(size):
        stride = 2 if s > 0 and j == 0 else 1
        x = block_cls(self.width * 2**s, stride, self.dtype, self.bn_momentum,
                      self.zero_init_residual, name=f'stage{s + 1}_block{j}')(x, train=train)
      self.sow('intermediates', f'stage{s + 1}', x)

    # Pool in fp32: a mean over many bf16 values loses digits.
    x = x.astype(jnp.float32).mean(axis=(1, 2))
    self.sow('intermediates', 'pre_logits', x)
    if not self.num_classes:
      return x
    return nn.Dense(self.num_classes, dtype=jnp.float32, name='head',
                    kernel_init=logical(nn.initializers.lecun_normal(), ('embed', 'classes')),
                    bias_init=logical(nn.initializers.zeros, ('classes',)))(x)
