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

An export directory is code: `jkd eval --export` runs the serialized program it finds there (a
StableHLO computation, not Python; it cannot read files or the network, but it decides the
model's outputs). Evaluate exports you made or trust. Reading one checks every manifest field
against weights.bin and the program's signature first (`load_tensors`, `load_export`): a
damaged or edited export is a UserError naming the file, never a crash.
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
from jkd.errors import UserError

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


# Stored dtypes `_storable` writes, and the logical dtypes they stand for.
STORED_DTYPES = ('uint8', 'int8', 'int16', 'int32', 'float32')
LOGICAL_DTYPES = ('int4', 'uint8', 'int8', 'int16', 'int32', 'float32')


MAX_MANIFEST_BYTES = 64 << 20
MAX_PROGRAM_BYTES = 2 << 30  # a flatbuffer addresses at most 2 GiB


def _read(path: str, limit: int) -> bytes:
  """The bytes of a local regular file of at most `limit` bytes (`read_regular`: not a FIFO
  or device, checked before reading), or of a bucket object."""
  if storage.is_remote(path):
    return storage.read_bytes(path)
  from jkd.deploy.exported_file import read_regular  # pylint: disable=g-import-not-at-top
  return read_regular(path, limit, 'export file',
                      fix='Run `jkd compress` again to rewrite the export.')


def _damaged(path: str, what: str) -> UserError:
  return UserError(f'{path}: {what}. The export is damaged or was edited: run `jkd compress` '
                   'again to rewrite it (or restore it from where it came from).')


def read_manifest(export_dir: str) -> dict:
  """The export's manifest.json, every field checked (types, dtypes, shapes, offsets within
  the weights); UserError naming the field otherwise."""
  path = storage.join(export_dir, MANIFEST)
  try:
    manifest = json.loads(_read(path, MAX_MANIFEST_BYTES))
  except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
    raise _damaged(path, f'not readable JSON ({type(e).__name__}: {str(e)[:120]})') from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get('tensors'), list):
    raise _damaged(path, 'no "tensors" list')
  shape = manifest.get('image_shape')
  if not (isinstance(shape, list) and len(shape) == 3 and all(
      isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise _damaged(path, f'image_shape is {shape!r}, not [H, W, C] of positive integers')
  end = 0
  for i, t in enumerate(manifest['tensors']):
    where = f'tensors[{i}]' + (f' ({t.get("name")})' if isinstance(t, dict) else '')
    if not isinstance(t, dict):
      raise _damaged(path, f'{where} is not an object')
    if t.get('dtype') not in STORED_DTYPES or t.get('logical_dtype') not in LOGICAL_DTYPES:
      raise _damaged(path, f'{where} has dtype {t.get("dtype")!r} / logical_dtype '
                     f'{t.get("logical_dtype")!r}; allowed: {STORED_DTYPES} / {LOGICAL_DTYPES}')
    dims, offset, size = t.get('shape'), t.get('offset'), t.get('bytes')
    if not (isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                           and d >= 0 for d in dims)):
      raise _damaged(path, f'{where} has shape {dims!r}, not a list of sizes')
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size)):
      raise _damaged(path, f'{where} has offset {offset!r} / bytes {size!r}, not byte counts')
    count = int(np.prod(dims, dtype=np.int64))
    itemsize = np.dtype(t['dtype']).itemsize
    want = (count + 1) // 2 if t['logical_dtype'] == 'int4' else count * itemsize
    packed = t['logical_dtype'] == 'int4' and t['dtype'] == 'uint8'
    if size != want or not (packed or t['logical_dtype'] == t['dtype']):
      raise _damaged(path, f'{where} has {size} bytes of {t["dtype"]} for a '
                     f'{t["logical_dtype"]} tensor of shape {dims} ({want} expected)')
    if offset != end:
      raise _damaged(path, f'{where} starts at byte {offset}; the tensors are stored back to '
                     f'back, so it should start at {end}')
    end = offset + size
  if manifest.get('weights_bytes') != end:
    raise _damaged(path, f'weights_bytes is {manifest.get("weights_bytes")!r} but the tensors '
                   f'take {end} bytes')
  return manifest


def load_tensors(export_dir: str) -> tuple[list[np.ndarray], dict]:
  """(stored tensors in manifest order, manifest) read back from `weights.bin`; the manifest
  and the file's size checked first (`read_manifest`)."""
  manifest = read_manifest(export_dir)
  path = storage.join(export_dir, WEIGHTS)
  try:
    # At most one byte more than the manifest says: a longer file is refused without reading
    # all of it (a FIFO or /dev/zero never ends).
    blob = _read(path, manifest['weights_bytes'] + 1)
  except OSError as e:
    raise _damaged(path, f'not readable ({e.strerror or e})') from None
  if len(blob) != manifest['weights_bytes']:
    raise _damaged(path, f'{len(blob)} bytes, but manifest.json says '
                   f'{manifest["weights_bytes"]} (truncated or replaced)')
  arrays = []
  for t in manifest['tensors']:
    a = np.frombuffer(blob, dtype=t['dtype'], count=t['bytes'] // np.dtype(t['dtype']).itemsize,
                      offset=t['offset'])
    arrays.append(a if t['logical_dtype'] == 'int4' else a.reshape(t['shape']))
  return arrays, manifest


def load_export(export_dir: str):
  """Returns `predict(images_uint8 (B, H, W, C)) -> float32 logits (B, classes)` and manifest.

  Runs the deserialized `model.jaxexport` on the integer tensors of `weights.bin`, after
  checking that the program takes exactly those tensors and images of the manifest's shape.
  """
  arrays, manifest = load_tensors(export_dir)
  path = storage.join(export_dir, PROGRAM)
  data = _read(path, MAX_PROGRAM_BYTES)
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except  (flatbuffer / version errors)
    raise _damaged(path, f'not a jax.export program ({type(e).__name__}: {str(e)[:150]})'
                   ) from None
  avals = list(exported.in_avals)
  want = [(a.shape, a.dtype) for a in arrays]
  got = [(tuple(a.shape), a.dtype) for a in avals[:-1]]
  if len(avals) != len(arrays) + 1 or [(tuple(s), np.dtype(d)) for s, d in want] != [
      (s, np.dtype(d)) for s, d in got]:
    raise _damaged(path, f'the program takes {len(avals) - 1} tensors that do not match the '
                   f'{len(arrays)} of manifest.json / weights.bin')
  image = avals[-1]
  if np.dtype(image.dtype) != np.uint8 or tuple(image.shape[1:]) != tuple(
      manifest['image_shape']):
    raise _damaged(path, f'the program takes images {image.dtype}{list(image.shape)}, the '
                   f'manifest says uint8 {manifest["image_shape"]}')
  flat = [jnp.asarray(a) for a in arrays]
  call = jax.jit(exported.call)
  return (lambda images: call(flat, jnp.asarray(images, jnp.uint8))), manifest


def export_size_bytes(export_dir: str) -> int:
  """Bytes of the stored weights as written on disk (`weights.bin`)."""
  return storage.size(storage.join(export_dir, WEIGHTS))


def evaluate_export(export_dir: str, batches) -> dict:
  """Accuracy of the exported model over eval batches (dicts with image, label, mask)."""
  predict, manifest = load_export(export_dir)
  correct = count = 0.0
  for batch in batches:
    if tuple(batch['image'].shape[1:]) != tuple(manifest['image_shape']):
      raise UserError(f'The export in {export_dir} takes images of shape '
                      f'{manifest["image_shape"]}, the eval data has '
                      f'{list(batch["image"].shape[1:])}: evaluate it on the dataset and '
                      'config.data.image_size it was exported for.')
    logits = np.asarray(predict(batch['image']))
    mask = np.asarray(batch['mask'], np.float64)
    correct += float(np.sum((logits.argmax(-1) == np.asarray(batch['label'])) * mask))
    count += float(np.sum(mask))
  return {'accuracy': correct / max(count, 1.0), 'examples': int(count)}
