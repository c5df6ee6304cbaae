"""The PyTorch side of benchmarks/deploy.py: jkd's resnet8_s or ViT as a torch module, to ONNX.

  python benchmarks/deploy_torch.py WEIGHTS.npz OUT.onnx     (a Python with torch, onnx and
                                                             onnxscript: torch.onnx.export needs it)

Builds the same network in torch (a ResNet: torchvision's BasicBlock layout, jkd's widths and
strides; a ViT: timm's pre-LN blocks with `F.scaled_dot_product_attention`, mean-pooled patch
tokens, and heads of `head_dim` channels so that head-pruned students fit too), copies the
trained jkd weights from WEIGHTS.npz (written by benchmarks/deploy.py), checks the
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


class Attention(nn.Module):
  def __init__(self, dim, heads, head_dim):
    super().__init__()
    self.heads, self.head_dim = heads, head_dim
    self.qkv = nn.Linear(dim, 3 * heads * head_dim)
    self.proj = nn.Linear(heads * head_dim, dim)

  def forward(self, x):
    b, n, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    y = nn.functional.scaled_dot_product_attention(q, k, v)
    return self.proj(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class ViTBlock(nn.Module):
  def __init__(self, dim, heads, head_dim, mlp, eps):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, heads, head_dim)
    self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
  """jkd's ViT with pool='gap', no class token, learned position embedding, final LayerNorm."""

  def __init__(self, patch, dim, depth, heads, head_dim, mlp, tokens, mean, std, channels=1,
               classes=10, eps=1e-6):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    self.patch = nn.Conv2d(channels, dim, patch, patch)
    self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
    self.blocks = nn.ModuleList([ViTBlock(dim, heads, head_dim, mlp, eps) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=eps)
    self.head = nn.Linear(dim, classes)

  def forward(self, pixels):
    x = (pixels.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std
    x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
    for b in self.blocks:
      x = b(x)
    return self.head(self.norm(x).mean(dim=1))


def _linear(module, kernel, bias):
  module.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.T))
  module.bias.data = torch.from_numpy(np.ascontiguousarray(bias))


def _ln(module, w, name):
  module.weight.data = torch.from_numpy(w[f'params/{name}/scale'])
  module.bias.data = torch.from_numpy(w[f'params/{name}/bias'])


def build_vit(w) -> ViT:
  """The torch copy of a jkd ViT whose flattened variables are `w`."""
  if 'params/cls' in w or 'params/encoder/block0/rel_pos_bias/relative_position_bias_table' in w:
    raise SystemExit('deploy_torch.py builds ViTs with pool=gap, no class token, no relative '
                     'position bias.')
  kp = w['params/patch_embed/proj/kernel']
  q = w['params/encoder/block0/attn/query/kernel']
  depth = len({k.split('/')[2] for k in w if k.startswith('params/encoder/block')})
  dim, heads, head_dim = q.shape
  mlp = w['params/encoder/block0/mlp/fc1/kernel'].shape[1]
  model = ViT(kp.shape[0], dim, depth, heads, head_dim, mlp, w['params/pos_embedding'].shape[1],
              w['mean'].tolist(), w['std'].tolist(), channels=kp.shape[2],
              classes=int(w['params/head/bias'].shape[0]))
  _conv(model.patch, w, 'patch_embed/proj')
  model.patch.bias.data = torch.from_numpy(w['params/patch_embed/proj/bias'])
  model.pos.data = torch.from_numpy(w['params/pos_embedding'])
  for i, b in enumerate(model.blocks):
    p = f'encoder/block{i}'
    a = f'params/{p}/attn'
    _linear(b.attn.qkv, np.concatenate([w[f'{a}/{n}/kernel'].reshape(dim, -1)
                                        for n in ('query', 'key', 'value')], axis=1),
            np.concatenate([w[f'{a}/{n}/bias'].reshape(-1) for n in ('query', 'key', 'value')]))
    _linear(b.attn.proj, w[f'{a}/out/kernel'].reshape(-1, dim), w[f'{a}/out/bias'])
    _ln(b.norm1, w, f'{p}/ln1')
    _ln(b.norm2, w, f'{p}/ln2')
    _linear(b.fc1, w[f'params/{p}/mlp/fc1/kernel'], w[f'params/{p}/mlp/fc1/bias'])
    _linear(b.fc2, w[f'params/{p}/mlp/fc2/kernel'], w[f'params/{p}/mlp/fc2/bias'])
  _ln(model.norm, w, 'encoder/encoder_norm')
  _linear(model.head, w['params/head/kernel'], w['params/head/bias'])
  return model.eval()


def _bn(module, w, name):
  _ln(module, w, name)  # the same scale and bias
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
  model = build_vit(w) if 'params/patch_embed/proj/kernel' in w else build(w)
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
