"""The PyTorch side of benchmarks/deploy.py: jkd's resnet8_s as a torch module, to ONNX.

  python benchmarks/deploy_torch.py WEIGHTS.npz OUT.onnx     (a Python with torch, onnx and
                                                             onnxscript: torch.onnx.export needs it)

Builds the same network in torch (torchvision's BasicBlock layout, jkd's widths and strides),
copies the trained jkd weights from WEIGHTS.npz (written by benchmarks/deploy.py), checks the
outputs against the jkd logits stored there, and exports it with `torch.onnx.export` taking
the same input as jkd's files: float32 pixels (B, H, W, C) in [0, 255]. Quantization and timing
then run in ONNX Runtime, in other processes (one framework per process).
"""
import sys

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, eps=1e-5)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False),
                                nn.BatchNorm2d(cout, eps=1e-5))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu((x if self.proj is None else self.proj(x)) + y)


class ResNet8(nn.Module):
  """jkd's resnet8_s at `width`: 3x3 stem, stages (w, 2w, 4w) of one block, mean pool, head."""

  def __init__(self, width, mean, std, channels=1, classes=10):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    self.stem = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
    self.stem_bn = nn.BatchNorm2d(width, eps=1e-5)
    self.blocks = nn.ModuleList([Block(width, width, 1), Block(width, 2 * width, 2),
                                 Block(2 * width, 4 * width, 2)])
    self.head = nn.Linear(4 * width, classes)

  def forward(self, pixels):
    x = (pixels.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std
    x = torch.relu(self.stem_bn(self.stem(x)))
    for b in self.blocks:
      x = b(x)
    return self.head(x.mean(dim=(2, 3)))


def _bn(module, w, name):
  module.weight.data = torch.from_numpy(w[f'params/{name}/scale'])
  module.bias.data = torch.from_numpy(w[f'params/{name}/bias'])
  module.running_mean.data = torch.from_numpy(w[f'batch_stats/{name}/mean'])
  module.running_var.data = torch.from_numpy(w[f'batch_stats/{name}/var'])


def _conv(module, w, name):
  module.weight.data = torch.from_numpy(np.ascontiguousarray(
      w[f'params/{name}/kernel'].transpose(3, 2, 0, 1)))


def build(w) -> ResNet8:
  width = int(w['params/stem_conv/kernel'].shape[-1])
  model = ResNet8(width, w['mean'].tolist(), w['std'].tolist(),
                  channels=int(w['params/stem_conv/kernel'].shape[2]),
                  classes=int(w['params/head/bias'].shape[0]))
  _conv(model.stem, w, 'stem_conv')
  _bn(model.stem_bn, w, 'stem_bn')
  for i, b in enumerate(model.blocks):
    p = f'stage{i + 1}_block0'
    _conv(b.conv1, w, f'{p}/conv1')
    _bn(b.bn1, w, f'{p}/bn1')
    _conv(b.conv2, w, f'{p}/conv2')
    _bn(b.bn2, w, f'{p}/bn2')
    if b.proj is not None:
      _conv(b.proj[0], w, f'{p}/proj_conv')
      _bn(b.proj[1], w, f'{p}/proj_bn')
  model.head.weight.data = torch.from_numpy(np.ascontiguousarray(w['params/head/kernel'].T))
  model.head.bias.data = torch.from_numpy(w['params/head/bias'])
  return model.eval()


def main(weights: str, out: str) -> None:
  w = dict(np.load(weights))
  model = build(w)
  with torch.no_grad():
    got = model(torch.from_numpy(w['check_pixels'])).numpy()
  diff = float(np.abs(got - w['check_logits']).max())
  assert diff < 1e-3, f'torch copy differs from jkd by {diff}'
  example = torch.from_numpy(w['check_pixels'][:2])
  torch.onnx.export(model, (example,), out, input_names=['pixels'], output_names=['logits'],
                    dynamic_shapes={'pixels': {0: torch.export.Dim('B', min=1, max=4096)}},
                    dynamo=True, external_data=False)
  print(f'torch {torch.__version__}: {out} (max |torch - jkd| = {diff:.2e})')


if __name__ == '__main__':
  main(*sys.argv[1:3])
