"""Deterministic stand-in weights for the import fixtures, from a seed (numpy only).

The fixtures (tests/fixtures/import/*.json + .npz, made by tests/fixtures/import/make.py from
the real reference code) record each checkpoint's tensor names, shapes and dtypes, the
reference network's outputs with these weights, and the few tensors the reference code fixes
itself (MAE's sin-cos tables, BEiT's relative position indices). `generate` rebuilds the exact
state dict from that, so the tests need neither torch nor the reference code, and the repository
holds no multi-megabyte checkpoints (torchvision's ResNet-50 has 25M parameters).
"""
import numpy as np


def generate(spec: dict, kept: dict) -> dict:
  """{name: array} in the checkpoint's order: `kept` tensors as stored, the others drawn from
  `spec['seed']` with scales that keep a deep net's activations O(1)."""
  rng = np.random.default_rng(spec['seed'])
  out = {}
  for name, shape, dtype in spec['tensors']:
    shape = tuple(shape)
    if name in kept:
      out[name] = np.asarray(kept[name])
      continue
    if not np.issubdtype(np.dtype(dtype), np.floating):
      out[name] = np.zeros(shape, dtype)
      continue
    if name.endswith('running_var'):
      value = 0.5 + rng.random(shape)
    elif len(shape) == 1 and any(s in name for s in ('norm', 'bn', 'ln', 'LayerNorm',
                                                     'layernorm', 'downsample.1')) \
        and (name.endswith('weight') or name.endswith('scale')):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2 and not name.endswith(('token', 'pos_embed', 'position_embeddings',
                                                'pos_embedding', 'cls')):
      fan_in = int(np.prod(shape[1:])) if len(shape) == 2 or len(shape) == 4 else shape[0]
      if name.endswith('kernel'):  # flax layouts keep the output axis last.
        fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[name] = value.astype(dtype)
  return out
