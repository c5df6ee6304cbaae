"""StableHLO export: `jax.export` of the classifier with its weights inside (no jkd needed).

Float, or with `int8=True` Qwix's serving model: per-channel int8 weights stored as integers and
dynamic-range int8 activations (each batch's absmax), XLA's integer dot/conv. Any JAX runtime
(`jax.export.deserialize(...).call`) or a StableHLO consumer runs it; batch size is symbolic.
"""
from __future__ import annotations


def serialize(clf, *, int8: bool = False) -> bytes:
  """`jax.export`-serialized `logits = f(pixels)` with a symbolic batch dimension."""
  import jax
  import jax.numpy as jnp
  variables = jax.tree.map(jnp.asarray, clf.variables)
  module = clf.module
  if int8:
    from jkd.compress import quant
    cfg = {'weight_bits': 8, 'act_bits': 8, 'module_path': '.*'}
    serving = quant.serving_model(module, cfg)
    params = quant.quantize_weights(module, cfg, variables['params'], clf.image_shape)
    variables = {**variables, 'params': params}
    clf = _with_module(clf, serving)
  b = jax.export.symbolic_shape('b')[0]
  spec = jax.ShapeDtypeStruct((b, *clf.image_shape), jnp.float32)
  exported = jax.export.export(jax.jit(lambda x: clf.apply(x, variables)))(spec)
  return exported.serialize()


def _with_module(clf, module):
  import dataclasses
  return dataclasses.replace(clf, module=module)


def save(program: bytes, path: str) -> int:
  """Writes the serialized program atomically (`jkd.storage.write_bytes`); returns its size."""
  from jkd import storage
  storage.write_bytes(path, program)
  return len(program)
