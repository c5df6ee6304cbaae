"""Export of a (pruned and/or quantized) classifier as real integer tensors + a jax.export program.

Layout of `WORKDIR/export/`:
  weights.bin        every tensor's raw bytes, back to back (int8 kernels, int4 kernels packed
                     two per byte, float32 per-channel scales, float32 biases and norm stats);
  manifest.json      per tensor: name, stored dtype, logical dtype, shape, offset, bytes; plus
                     model name, quantization settings, image shape and totals;
  model.jaxexport    `jax.export`-serialized `logits = f(tensors, images_uint8)`: it unpacks the
                     integers and runs Qwix's serving model (integer weights, dynamic int8
                     activations), so no jkd/Flax code is needed to run it.
`export_size_bytes(dir)` is the size of weights.bin as written. Pruned weights are exact zeros
before quantization and so exact integer zeros here (`round(0 / s) = 0`).
"""
from __future__ import annotations

import json
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkd import storage
from jkd.compress import quant

WEIGHTS, MANIFEST, PROGRAM = 'weights.bin', 'manifest.json', 'model.jaxexport'


def _name(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int4 values in [-8, 7] (any shape) -> uint8, two per byte (low nibble first), flat."""
  flat = (np.asarray(q, np.int8).ravel() & 0x0F).astype(np.uint8)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
  return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: jax.Array, shape) -> jax.Array:
  """Inverse of `pack_int4` in jax: uint8 (ceil(n/2),) -> int8 values of `shape`."""
  lo = (packed & 0x0F).astype(jnp.int8)
  hi = (packed >> 4).astype(jnp.int8)
  both = jnp.stack([lo, hi], -1).ravel()[:int(np.prod(shape))]
  return jnp.where(both > 7, both - 16, both).reshape(shape)  # Sign-extend the nibble.


def _storable(x) -> tuple[np.ndarray, str]:
  """(array to write, logical dtype). int4 is packed; everything float is stored float32."""
  dtype = str(x.dtype)
  if dtype == 'int4':
    return pack_int4(np.asarray(x).astype(np.int8)), 'int4'
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.asarray(x), dtype
  return np.asarray(x, np.float32), 'float32'


def export_model(export_dir: str, model: nn.Module, quant_cfg, params, model_state,
                 *, image_shape, mean, std, info: dict | None = None) -> dict:
  """Writes `export_dir/{weights.bin, manifest.json, model.jaxexport}`; returns the manifest.

  Args:
    model: the float Linen module; params/model_state: its float (QAT-trained) variables.
    quant_cfg: {enabled, weight_bits, act_bits, module_path}; disabled -> float32 export.
    image_shape: (H, W, C) of one uint8 image; mean/std: normalization of pixel/255.
  """
  storage.makedirs(export_dir)
  enabled = bool(quant_cfg.get('enabled', False))
  params = jax.device_get(params)
  weights_only = enabled and quant.weights_only(quant_cfg)
  if enabled:
    run_model = quant.serving_model(model, quant_cfg)
    params = quant.quantize_weights(model, quant_cfg, params, image_shape)
  else:
    run_model = model
  variables = {'params': params, **jax.device_get(model_state)}
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(variables)

  tensors, stored, offset = [], [], 0
  for path, leaf in leaves_with_path:
    arr, logical = _storable(leaf)
    tensors.append({'name': _name(path), 'dtype': str(arr.dtype), 'logical_dtype': logical,
                    'shape': list(leaf.shape), 'offset': offset, 'bytes': arr.nbytes})
    stored.append(arr)
    offset += arr.nbytes
  blob = b''.join(a.tobytes() for a in stored)
  storage.write_bytes(storage.join(export_dir, WEIGHTS), blob)

  logical = [(t['logical_dtype'], tuple(t['shape'])) for t in tensors]

  def predict(flat, images):
    """flat: the stored tensors in manifest order; images: uint8 (B, H, W, C) -> logits."""
    leaves = []
    for x, (dt, shape) in zip(flat, logical):
      if dt == 'int4':
        x = unpack_int4(x, shape).astype(jnp.int4)
      leaves.append(x)
    v = jax.tree.unflatten(treedef, leaves)
    if weights_only:
      v = quant.dequantize_weights(v)
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return run_model.apply(v, x, train=False).astype(jnp.float32)

  b = jax.export.symbolic_shape('b')[0]
  args = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in stored],
          jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8))
  program = jax.export.export(jax.jit(predict))(*args).serialize()
  storage.write_bytes(storage.join(export_dir, PROGRAM), program)

  manifest = {
      **(info or {}),
      'quantized': enabled,
      'weight_bits': int(quant_cfg.get('weight_bits', 8)) if enabled else 32,
      'act_bits': int(quant_cfg.get('act_bits', 8)) if enabled else 32,
      'image_shape': list(image_shape),
      'weights_bytes': offset,
      # Pruned zeros make the integer blob compressible; this is what a zip of it weighs.
      'weights_bytes_zlib': len(zlib.compress(blob, 9)),
      'program_bytes': len(program),
      'tensors': tensors,
  }
  # Written last: a manifest means a complete export (`jkd eval --export` looks for it).
  storage.write_text(storage.join(export_dir, MANIFEST), json.dumps(manifest, indent=1))
  return manifest


def load_tensors(export_dir: str) -> tuple[list[np.ndarray], dict]:
  """(stored tensors in manifest order, manifest) read back from `weights.bin`."""
  manifest = storage.read_json(storage.join(export_dir, MANIFEST))
  blob = storage.read_bytes(storage.join(export_dir, WEIGHTS))
  arrays = []
  for t in manifest['tensors']:
    a = np.frombuffer(blob, dtype=t['dtype'], count=t['bytes'] // np.dtype(t['dtype']).itemsize,
                      offset=t['offset'])
    arrays.append(a if t['logical_dtype'] == 'int4' else a.reshape(t['shape']))
  return arrays, manifest


def load_export(export_dir: str):
  """Returns `predict(images_uint8 (B, H, W, C)) -> float32 logits (B, classes)` and manifest.

  Runs the deserialized `model.jaxexport` on the integer tensors of `weights.bin`.
  """
  arrays, manifest = load_tensors(export_dir)
  exported = jax.export.deserialize(bytearray(storage.read_bytes(storage.join(export_dir,
                                                                             PROGRAM))))
  flat = [jnp.asarray(a) for a in arrays]
  call = jax.jit(exported.call)
  return (lambda images: call(flat, jnp.asarray(images, jnp.uint8))), manifest


def export_size_bytes(export_dir: str) -> int:
  """Bytes of the stored weights as written on disk (`weights.bin`)."""
  return storage.size(storage.join(export_dir, WEIGHTS))


def evaluate_export(export_dir: str, batches) -> dict:
  """Accuracy of the exported model over eval batches (dicts with image, label, mask)."""
  predict, _ = load_export(export_dir)
  correct = count = 0.0
  for batch in batches:
    logits = np.asarray(predict(batch['image']))
    mask = np.asarray(batch['mask'], np.float64)
    correct += float(np.sum((logits.argmax(-1) == np.asarray(batch['label'])) * mask))
    count += float(np.sum(mask))
  return {'accuracy': correct / max(count, 1.0), 'examples': int(count)}
