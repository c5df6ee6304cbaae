"""ResNets from torchvision and timm checkpoints (the same tensor names), as jkd `ResNet` params.

torchvision's `resnet18/34/50` and timm's ResNets of the same names are ResNet v1.5 with a 7x7
stem, as jkd's `resnet18/34/50`; other depths and widths become `resnet18`/`resnet50` with
`stage_sizes` / `width` overrides. BatchNorm weight/bias go to the params ('scale', 'bias'),
running_mean/var to the 'batch_stats' collection ('mean', 'var'); `num_batches_tracked` is
dropped (jkd's BatchNorm uses a fixed momentum).
"""
from __future__ import annotations

import re


from jkd.convert.vit import Converted, _Tensors, _conv, _count, _t
from jkd.errors import UserError

_NAMES = {((2, 2, 2, 2), 'basic'): 'resnet18', ((3, 4, 6, 3), 'basic'): 'resnet34',
          ((3, 4, 6, 3), 'bottleneck'): 'resnet50'}


def _bn(t: _Tensors, params: dict, state: dict, src: str, dst: str) -> None:
  params[f'{dst}/scale'] = t.take(f'{src}.weight', 1)
  params[f'{dst}/bias'] = t.take(f'{src}.bias', 1)
  state[f'{dst}/mean'] = t.take(f'{src}.running_mean', 1)
  state[f'{dst}/var'] = t.take(f'{src}.running_var', 1)
  t.get(f'{src}.num_batches_tracked')  # Read and dropped (jkd's BatchNorm has no counter).


def convert(tensors: dict, given: dict) -> Converted:
  """torchvision / timm ResNet tensors -> a jkd ResNet."""
  t = _Tensors(tensors)
  stem = t.take('conv1.weight', 4)
  if stem.shape[2] != 7:
    raise UserError(f'The ResNet stem is a {stem.shape[2]}x{stem.shape[3]} conv: jkd imports the '
                    'ImageNet ResNets (7x7 stem; deep stems such as timm\'s resnet50d are not '
                    'supported).')
  stages = [_count(tensors, rf'layer{s}\.(\d+)\.') for s in (1, 2, 3, 4)]
  stages = tuple(n for n in stages if n)
  block = 'bottleneck' if 'layer1.0.conv3.weight' in t else 'basic'
  width, channels = stem.shape[0], stem.shape[1]
  named = given.pop('name', None)
  if named and _NAMES.get((stages, block)) not in (None, named):
    raise UserError(f'--model {named} does not fit the checkpoint, a {_NAMES[(stages, block)]} '
                    f'({block} blocks {stages}): drop --model or pass --model '
                    f'{_NAMES[(stages, block)]}.')
  name = named or _NAMES.get((stages, block)) or (
      'resnet50' if block == 'bottleneck' else 'resnet18')
  cfg = {'name': name}
  if _NAMES.get((stages, block)) != name:
    cfg.update(stage_sizes=stages, block=block)
  if width != 64:
    cfg['width'] = width
  cfg.update(given)
  params, state = {}, {}
  params['stem_conv/kernel'] = _conv(stem)
  _bn(t, params, state, 'bn1', 'stem_bn')
  convs = ('conv1', 'conv2', 'conv3') if block == 'bottleneck' else ('conv1', 'conv2')
  for s, size in enumerate(stages, 1):
    for j in range(size):
      src, dst = f'layer{s}.{j}', f'stage{s}_block{j}'
      for c in convs:
        params[f'{dst}/{c}/kernel'] = _conv(t.take(f'{src}.{c}.weight', 4))
        _bn(t, params, state, f'{src}.bn{c[-1]}', f'{dst}/bn{c[-1]}')
      if f'{src}.downsample.0.weight' in t:
        params[f'{dst}/proj_conv/kernel'] = _conv(t.take(f'{src}.downsample.0.weight', 4))
        _bn(t, params, state, f'{src}.downsample.1', f'{dst}/proj_bn')
  classes = 0
  if 'fc.weight' in t:
    params['head/kernel'] = _t(t.take('fc.weight', 2))
    params['head/bias'] = t.take('fc.bias', 1)
    classes = t.dim('fc.weight', 0, 2)
  return Converted('resnet', None, cfg, params, {'batch_stats': state}, None, channels, classes,
                   t.used, ['BatchNorm running statistics -> batch_stats'])


def detect(tensors: dict) -> bool:
  return 'conv1.weight' in tensors and any(re.match(r'layer1\.0\.', k) for k in tensors)


LAYOUTS = {'resnet': (detect, convert)}
