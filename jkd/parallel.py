"""Meshes, logical-axis sharding rules and global batches.

One table (`DEFAULT_RULES`, MaxText style) maps the logical axis names that model parameters
carry onto the mesh axes `data`, `fsdp` and `tensor`. The same code runs on one CPU, 8 simulated
CPU devices, a GPU or a TPU pod: only the mesh changes. A run may replace entries of the table
with `config.sharding_rules` (see `merge_rules`); `loop.run` makes that table active while it
runs (`use_rules`), so the student, the teacher and the optimizer state all follow it.

The rules are turned into `NamedSharding`s once, outside any Flax rules context (flax issue
3676: rules context + mesh can crash on 3-D attention kernels).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jkd.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')
# Batch dimension of input batches (and so of every activation): split over every data-like
# axis. Parameters have no batch axis, so the rules below name parameter axes only.
BATCH_AXES = ('data', 'fsdp')

# Logical axis of a parameter -> mesh axis (or None = replicated). Read top to bottom, like
# MaxText's table.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('embed', 'fsdp'),      # ViT width: FSDP shards the large dimension of every matrix.
    ('mlp', 'tensor'),      # Megatron-style: MLP hidden and heads split across tensor.
    ('heads', 'tensor'),
    ('kv', None),
    ('classes', None),
    ('pos', None),
    ('conv_in', None),
    ('conv_out', 'fsdp'),
    ('norm', None),
)


_ACTIVE_RULES: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    'jkd_sharding_rules', default=DEFAULT_RULES)


def merge_rules(overrides: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with the entries named in `overrides` (`config.sharding_rules`) replaced.

  Args:
    overrides: pairs (logical_name, mesh_axis | (mesh_axes...) | None), e.g.
      `(('embed', None), ('mlp', ('fsdp', 'tensor')))`. A name not in DEFAULT_RULES is added.
  """
  table = dict(DEFAULT_RULES)
  for pair in overrides or ():
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise UserError(f'config.sharding_rules entry {tuple(pair)!r} is not a pair '
                      f"(logical_name, mesh_axis or None), e.g. ('embed', 'fsdp').")
    name, axes = pair
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    bad = [a for a in names if a not in MESH_AXES]
    if bad:
      raise UserError(f'config.sharding_rules maps {name!r} to unknown mesh axes {bad}; the '
                      f'mesh axes are {", ".join(MESH_AXES)} (or None to replicate).')
    table[name] = axes if isinstance(axes, str) or axes is None else tuple(axes)
  return tuple(table.items())


@contextlib.contextmanager
def use_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes `rules` the table `tree_shardings` uses inside the block (one run's setting)."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def active_rules() -> tuple[tuple[str, Any], ...]:
  """The rules table in force: DEFAULT_RULES unless a run set `config.sharding_rules`."""
  return _ACTIVE_RULES.get()


def mesh_shape(axis_sizes: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """`config.mesh` made whole: every axis of MESH_AXES with its size, the -1 axis (at most one)
  taking the devices the others leave, checked against `num_devices`.

  Args:
    axis_sizes: e.g. {'data': -1}, {'data': 2, 'fsdp': 4}. Missing axes have size 1.
    num_devices: the devices the mesh must cover.
  """
  sizes = dict(axis_sizes or {'data': -1})
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise UserError(f'config.mesh has unknown axes {sorted(unknown)}; the mesh axes are '
                    f'{", ".join(MESH_AXES)} (e.g. --config.mesh="dict(data=2, fsdp=4)").')
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise UserError(f'config.mesh {sizes}: at most one axis may be -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f'config.mesh {sizes}: {num_devices} devices do not divide by {known}.')
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f'config.mesh {sizes} needs {math.prod(shape)} devices but '
                    f'{num_devices} are available. Use -1 for one axis to fill the rest.')
  return dict(zip(MESH_AXES, shape))


def make_mesh(axis_sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh; one size may be -1 to take the rest.

  Args:
    axis_sizes: e.g. {'data': -1}, {'data': 2, 'fsdp': 4}. Missing axes have size 1.
    devices: defaults to all devices of all processes.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = tuple(mesh_shape(axis_sizes, len(devices)).values())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None] | None,
                         rules: Sequence[tuple[str, Any]] | None = None) -> P:
  """Maps one tuple of logical names to a PartitionSpec; a mesh axis is used at most once."""
  if logical is None:
    return P()
  table = dict(active_rules() if rules is None else rules)
  used, out = set(), []
  for name in logical:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def _fit_spec_to_shape(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (small models on big meshes)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def tree_shardings(abstract_tree: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (from eval_shape).

  Unboxed leaves (optimizer counters, batch statistics without names) are replicated. `rules`
  defaults to `active_rules()`.
  """
  rules = active_rules() if rules is None else rules
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned) or isinstance(leaf, nn.Partitioned):
      spec = logical_to_mesh_spec(leaf.names, rules)
      return NamedSharding(mesh, _fit_spec_to_shape(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def place_frozen(tree: Any, abstract_tree: Any, mesh: Mesh, dtype=np.float32) -> tuple[Any, Any]:
  """Puts a frozen model's host (numpy) tree on `mesh`, each leaf cast to `dtype`.

  The layout comes from `abstract_tree` (the same structure, from `jax.eval_shape` of the
  model's init, leaves boxed with logical axis names) under the active rules, so a teacher is
  sharded exactly as a student of the same architecture would be and is never gathered whole on
  one device. Returns (placed tree of jax.Arrays, its NamedShardings).
  """
  shardings = tree_shardings(abstract_tree, mesh)
  placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, dtype), s), tree, shardings)
  return placed, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-like axes; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded on the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise UserError(f'config.{what}={global_batch_size} must divide by the {shards} data shards '
                    f'of the mesh {dict(mesh.shape)} and by the {jax.process_count()} processes; '
                    f'pick a multiple of {math.lcm(shards, jax.process_count())}.')
