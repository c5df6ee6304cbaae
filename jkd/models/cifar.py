"""The CIFAR-100 students and teachers of the distillation tables (CRD, ReviewKD, DKD: mdistiller).

Architectures as in megvii-research/mdistiller `mdistiller/models/cifar/` (commit a08d46f1;
the same as RepDistiller's `models/`), for 32×32 (and 28×28) NHWC inputs:

  name         mdistiller   params (100 classes)   family
  resnet8x4    resnet8x4    1.23 M                 `CifarResNet` (depth 8, filters 32-64-128-256)
  resnet32x4   resnet32x4   7.43 M                 `CifarResNet` (depth 32, ×4 width)
  resnet20 / 32 / 56 / 110  (16-16-32-64)          `CifarResNet`
  wrn_16_2     wrn_16_2     0.70 M                 `WideResNet` (pre-activation)
  wrn_40_2     wrn_40_2     2.26 M                 `WideResNet`
  vgg8 / vgg13 vgg8_bn / vgg13_bn  3.96 M / 9.46 M `VGG` (with BatchNorm)
  mobilenetv2  MobileNetV2 (mobile_half: T=6, width 0.5)  0.81 M
  shufflenetv2 ShuffleV2 (net size 1)      1.36 M

Differences from the PyTorch code, on purpose: the final average pools are global means
(identical at 32×32, where mdistiller's fixed pool sizes cover the whole map; at 28×28 they
would not); parameters carry logical axis names; BatchNorm momentum 0.9 is torch's 0.1.

Intermediates (apply with mutable=['intermediates']), named as jkd's ResNet taps:
  'stem'             the first features (mdistiller `feats[0]`),
  'stage1'..'stageN' each stage's output, after its ReLU (`feats[1:]`),
  'stageI_preact'    the same before that ReLU (`preact_feats[1:]`: ReviewKD's teacher taps),
  'pre_logits'       the pooled feature (B, C) fp32 (`pooled_feat`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd.errors import UserError
from jkd.models.layers import logical

Dtype = Any

# torch's kaiming_normal_(mode='fan_out') of mdistiller's convs (WRN/VGG/MobileNet's
# normal(0, sqrt(2 / (k*k*out))) is the same distribution).
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch's default Linear init, uniform(±1/sqrt(fan_in)).
_DENSE_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str,
         groups: int = 1, bias: bool = False, padding: int | None = None,
         in_axis: str | None = 'conv_in') -> nn.Conv:
  """A k×k convolution with torch's symmetric padding ((k - 1) / 2 unless given)."""
  pad = (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=bias,
                 dtype=dtype, name=name,
                 kernel_init=logical(_CONV_INIT, (None, None, in_axis if groups == 1 else None,
                                                  'conv_out')),
                 bias_init=logical(nn.initializers.zeros, ('conv_out',)))


def batch_norm(train: bool, dtype: Dtype, name: str, momentum: float = 0.9) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                      dtype=dtype, name=name, scale_init=logical(nn.initializers.ones, ('norm',)),
                      bias_init=logical(nn.initializers.zeros, ('norm',)))


def _head(module: nn.Module, x: jax.Array, num_classes: int) -> jax.Array:
  """Sows 'pre_logits' (B, C) fp32 and applies the classifier (none when num_classes == 0)."""
  x = x.astype(jnp.float32)
  module.sow('intermediates', 'pre_logits', x)
  if not num_classes:
    return x
  return nn.Dense(num_classes, dtype=jnp.float32, name='head',
                  kernel_init=logical(_DENSE_INIT, ('embed', 'classes')),
                  bias_init=logical(nn.initializers.zeros, ('classes',)))(x)


def _global_pool(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32).mean(axis=(1, 2))  # fp32: a mean over many bf16 values


def _stage_taps(module: nn.Module, index: int, preact: jax.Array, out: jax.Array) -> None:
  module.sow('intermediates', f'stage{index}_preact', preact)
  module.sow('intermediates', f'stage{index}', out)


# ---------------------------------------------------------------- ResNet (CIFAR, He et al.)

class _ResBlock(nn.Module):
  """mdistiller's BasicBlock / Bottleneck; returns (relu(x + f(x)), x + f(x))."""
  features: int
  stride: int = 1
  bottleneck: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    if self.bottleneck:
      y = nn.relu(batch_norm(train, d, 'bn1')(conv(self.features, 1, dtype=d, name='conv1')(x)))
      y = nn.relu(batch_norm(train, d, 'bn2')(
          conv(self.features, 3, self.stride, dtype=d, name='conv2')(y)))
      out = 4 * self.features
      y = batch_norm(train, d, 'bn3')(conv(out, 1, dtype=d, name='conv3')(y))
    else:
      out = self.features
      y = nn.relu(batch_norm(train, d, 'bn1')(
          conv(out, 3, self.stride, dtype=d, name='conv1')(x)))
      y = batch_norm(train, d, 'bn2')(conv(out, 3, dtype=d, name='conv2')(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = batch_norm(train, d, 'proj_bn')(conv(out, 1, self.stride, dtype=d, name='proj_conv')(x))
    preact = x + y
    return nn.relu(preact), preact


class CifarResNet(nn.Module):
  """The CIFAR ResNets of He et al. 2016 as mdistiller builds them: a 3×3 stem, three stages
  of (depth - 2) / 6 basic blocks ((depth - 2) / 9 bottlenecks) at strides 1, 2, 2.

  Attributes:
    num_classes: classes of the head (0: no head, returns pre-logits).
    depth: 6n + 2 (basic) or 9n + 2 (bottleneck).
    filters: (stem, stage1, stage2, stage3) widths, e.g. (16, 16, 32, 64) or (32, 64, 128, 256)
      for the ×4 models.
    block: 'basic' or 'bottleneck'.
    dtype: compute dtype (parameters fp32, logits fp32).
  """
  num_classes: int = 100
  depth: int = 8
  filters: Sequence[int] = (32, 64, 128, 256)
  block: str = 'basic'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    per = 6 if self.block == 'basic' else 9
    if self.block not in ('basic', 'bottleneck') or (self.depth - 2) % per:
      raise UserError(f'CifarResNet: depth {self.depth} with {self.block!r} blocks; use '
                      'depth 6n+2 with basic blocks or 9n+2 with bottlenecks.')
    n, d = (self.depth - 2) // per, self.dtype
    x = conv(self.filters[0], 3, dtype=d, name='stem_conv', in_axis=None)(images.astype(d))
    x = nn.relu(batch_norm(train, d, 'stem_bn')(x))
    self.sow('intermediates', 'stem', x)
    for s in range(3):
      for j in range(n):
        x, preact = _ResBlock(self.filters[s + 1], 2 if s and not j else 1,
                              self.block == 'bottleneck', d, name=f'stage{s + 1}_block{j}')(
                                  x, train=train)
      _stage_taps(self, s + 1, preact, x)
    return _head(self, _global_pool(x), self.num_classes)


# ---------------------------------------------------------------- Wide ResNet (Zagoruyko 2016)

class _WideBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv twice, the shortcut a 1×1 conv of BN-ReLU(x) when the
  width changes. Also returns BN-ReLU(x)'s BN output (mdistiller's preact tap of the stage
  before)."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = self.dtype
    pre = batch_norm(train, d, 'bn1')(x)
    act = nn.relu(pre)
    y = nn.relu(batch_norm(train, d, 'bn2')(
        conv(self.features, 3, self.stride, dtype=d, name='conv1')(act)))
    y = conv(self.features, 3, dtype=d, name='conv2')(y)
    if x.shape[-1] == self.features:
      return x + y, pre
    return conv(self.features, 1, self.stride, dtype=d, name='proj_conv', padding=0)(act) + y, pre


class WideResNet(nn.Module):
  """WRN-depth-k: a 3×3 stem of 16, three stages of (depth - 4) / 6 pre-activation blocks of
  widths 16k, 32k, 64k, then BN-ReLU, global pool, head.

  Taps: 'stageI' is the stage's output (pre-activation, as mdistiller's `feats`);
  'stageI_preact' its BatchNorm by the next layer, without ReLU (mdistiller's `preact_feats`).
  """
  num_classes: int = 100
  depth: int = 16
  widen_factor: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise UserError(f'WideResNet depth {self.depth}: use 6n + 4 (16, 28, 40).')
    n, d, k = (self.depth - 4) // 6, self.dtype, self.widen_factor
    x = conv(16, 3, dtype=d, name='stem_conv', in_axis=None)(images.astype(d))
    self.sow('intermediates', 'stem', x)
    outs = []
    for s, width in enumerate((16 * k, 32 * k, 64 * k)):
      for j in range(n):
        x, pre = _WideBlock(width, 2 if s and not j else 1, d, name=f'stage{s + 1}_block{j}')(
            x, train=train)
        if j == 0 and s:  # The first block's BN of the previous stage's output.
          self.sow('intermediates', f'stage{s}_preact', pre)
      outs.append(x)
      self.sow('intermediates', f'stage{s + 1}', x)
    pre = batch_norm(train, d, 'final_bn')(x)
    self.sow('intermediates', 'stage3_preact', pre)
    return _head(self, _global_pool(nn.relu(pre)), self.num_classes)


# ---------------------------------------------------------------- VGG (Simonyan 2015), BN

VGG_STAGES = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class VGG(nn.Module):
  """mdistiller's CIFAR VGG with BatchNorm: five blocks of 3×3 conv-BN-ReLU (conv with bias),
  a 2×2 max pool after each of the first three (and after the fourth for 64×64 inputs), global
  average pool, head. 'stem' is block 0's output, 'stage1'..'stage4' blocks 1-4's."""
  num_classes: int = 100
  stages: Sequence[Sequence[int]] = VGG_STAGES['vgg8']
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    d, height = self.dtype, images.shape[1]
    x = images.astype(d)
    for s, widths in enumerate(self.stages):
      for j, width in enumerate(widths):
        if j:
          x = nn.relu(x)
        x = conv(width, 3, dtype=d, name=f'block{s}_conv{j}', bias=True,
                 in_axis=None if s == j == 0 else 'conv_in')(x)
        x = batch_norm(train, d, f'block{s}_bn{j}')(x)
      out = nn.relu(x)
      if s == 0:
        self.sow('intermediates', 'stem', out)
      else:
        _stage_taps(self, s, x, out)
      x = out
      if s < 3 or (s == 3 and height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return _head(self, _global_pool(x), self.num_classes)


# ---------------------------------------------------------------- MobileNetV2 (Sandler 2018)

MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class _InvertedResidual(nn.Module):
  features: int
  stride: int
  expand: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d, hidden = self.dtype, x.shape[-1] * self.expand
    y = nn.relu(batch_norm(train, d, 'bn1')(conv(hidden, 1, dtype=d, name='expand')(x)))
    y = nn.relu(batch_norm(train, d, 'bn2')(
        conv(hidden, 3, self.stride, dtype=d, name='depthwise', groups=hidden)(y)))
    y = batch_norm(train, d, 'bn3')(conv(self.features, 1, dtype=d, name='project')(y))
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
  """mdistiller's CIFAR MobileNetV2 (`mobile_half`: expansion 6, width 0.5): a 3×3/2 stem,
  seven groups of inverted residuals, a 1×1 conv to 1280, global pool, head. Taps: 'stem', and
  'stage1'..'stage4' after groups 2, 3, 5 and 7 (mdistiller's feats)."""
  num_classes: int = 100
  width_mult: float = 0.5
  expand: int = 6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    d = self.dtype
    x = conv(int(32 * self.width_mult), 3, 2, dtype=d, name='stem_conv', in_axis=None)(
        images.astype(d))
    x = nn.relu(batch_norm(train, d, 'stem_bn')(x))
    self.sow('intermediates', 'stem', x)
    taps = {1: 1, 2: 2, 4: 3, 6: 4}  # group index -> stage tap
    for g, (t, c, n, s) in enumerate(MOBILENETV2_SETTING):
      for j in range(n):
        x = _InvertedResidual(int(c * self.width_mult), s if j == 0 else 1,
                              self.expand if t != 1 else 1, d, name=f'group{g}_block{j}')(
                                  x, train=train)
      if g in taps:
        self.sow('intermediates', f'stage{taps[g]}', x)
    last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
    x = nn.relu(batch_norm(train, d, 'last_bn')(conv(last, 1, dtype=d, name='last_conv')(x)))
    return _head(self, _global_pool(x), self.num_classes)


# ---------------------------------------------------------------- ShuffleNetV2 (Ma 2018)

def channel_shuffle(x: jax.Array, groups: int = 2) -> jax.Array:
  """NHWC channel shuffle: channel j*(C/g) + i moves to i*g + j (torch's reshape-permute)."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class _ShuffleBlock(nn.Module):
  """Splits the channels in half, transforms the second half; returns (shuffled, preact)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d, half = self.dtype, x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y = nn.relu(batch_norm(train, d, 'bn1')(conv(half, 1, dtype=d, name='conv1')(x2)))
    y = batch_norm(train, d, 'bn2')(conv(half, 3, dtype=d, name='conv2', groups=half)(y))
    pre = batch_norm(train, d, 'bn3')(conv(half, 1, dtype=d, name='conv3')(y))
    out = jnp.concatenate([x1, nn.relu(pre)], -1)
    return channel_shuffle(out), jnp.concatenate([x1, pre], -1)


class _ShuffleDown(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    d, c, mid = self.dtype, x.shape[-1], self.features // 2
    left = batch_norm(train, d, 'bn1')(conv(c, 3, 2, dtype=d, name='conv1', groups=c)(x))
    left = nn.relu(batch_norm(train, d, 'bn2')(conv(mid, 1, dtype=d, name='conv2')(left)))
    right = nn.relu(batch_norm(train, d, 'bn3')(conv(mid, 1, dtype=d, name='conv3')(x)))
    right = batch_norm(train, d, 'bn4')(conv(mid, 3, 2, dtype=d, name='conv4', groups=mid)(right))
    right = nn.relu(batch_norm(train, d, 'bn5')(conv(mid, 1, dtype=d, name='conv5')(right)))
    return channel_shuffle(jnp.concatenate([left, right], -1))


class ShuffleNetV2(nn.Module):
  """mdistiller's CIFAR ShuffleNetV2 (`ShuffleV2`, net size 1): a 1×1 stem of 24, three stages
  (a stride-2 down block and 3, 7, 3 blocks of 116, 232, 464 channels), a 1×1 conv to 1024,
  global pool, head."""
  num_classes: int = 100
  stage_widths: Sequence[int] = (116, 232, 464)
  stage_blocks: Sequence[int] = (3, 7, 3)
  last_width: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    d = self.dtype
    x = conv(24, 1, dtype=d, name='stem_conv', in_axis=None)(images.astype(d))
    x = nn.relu(batch_norm(train, d, 'stem_bn')(x))
    self.sow('intermediates', 'stem', x)
    for s, (width, blocks) in enumerate(zip(self.stage_widths, self.stage_blocks)):
      x = _ShuffleDown(width, d, name=f'stage{s + 1}_down')(x, train=train)
      for j in range(blocks):
        x, pre = _ShuffleBlock(d, name=f'stage{s + 1}_block{j}')(x, train=train)
      _stage_taps(self, s + 1, pre, x)
    x = nn.relu(batch_norm(train, d, 'last_bn')(conv(self.last_width, 1, dtype=d,
                                                     name='last_conv')(x)))
    return _head(self, _global_pool(x), self.num_classes)


def registry() -> dict[str, tuple[type, dict]]:
  """name -> (class, defaults) for `jkd.models.create` (100 classes: CIFAR-100)."""
  small = (16, 16, 32, 64)
  return {
      'resnet8x4': (CifarResNet, dict(depth=8, filters=(32, 64, 128, 256))),
      'resnet32x4': (CifarResNet, dict(depth=32, filters=(32, 64, 128, 256))),
      **{f'resnet{n}': (CifarResNet, dict(depth=n, filters=small)) for n in (8, 20, 32, 56, 110)},
      'wrn_16_2': (WideResNet, dict(depth=16, widen_factor=2)),
      'wrn_40_1': (WideResNet, dict(depth=40, widen_factor=1)),
      'wrn_40_2': (WideResNet, dict(depth=40, widen_factor=2)),
      **{name: (VGG, dict(stages=stages)) for name, stages in VGG_STAGES.items()},
      'mobilenetv2': (MobileNetV2, {}),
      'shufflenetv2': (ShuffleNetV2, {}),
  }
