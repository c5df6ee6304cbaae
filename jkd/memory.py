"""Per-device memory of a train, pretraining or distillation step: an estimate, and what XLA reports.

  est = jkd.memory.estimate('vit_s16', teacher='vit_l16', global_batch=256, image_size=224,
                            mesh={'fsdp': 8})
  est.total, est.as_dict()           # bytes per device, by component

Parameters, gradients, optimizer state and teacher weights are exact: they come from the real
model's abstract parameters (`jax.eval_shape`, no device memory) mapped through the trainers'
own logical-axis rules (`parallel.tree_shardings`) on a `jax.sharding.AbstractMesh` of the wanted
shape, so ViT-H on 256 chips can be planned on a laptop. Activations follow analytic ViT
formulas (`jkd.activations`: `vit_activation_bytes`, `mim_activation_bytes` for SimMIM/MAE
pretraining configs). `compile_step` compiles the real jkd step and returns
`compiled.memory_analysis()`; tests/test_memory.py holds the estimate to it and docs/scaling.md
gives the figures. `plan` is `jkd plan`: the breakdown for a config, and a mesh that fits.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jkd import parallel
from jkd.models import param_count
from jkd.activations import mim_activation_bytes, vit_activation_bytes  # noqa: F401 (API)
from jkd.errors import UserError
from jkd.models.mim import METHODS

GiB = 2**30
# Share of a device's memory a step may plan on: the rest is the runtime's (CUDA context, cuDNN
# workspaces, allocator fragmentation). On GPU also set XLA_PYTHON_CLIENT_MEM_FRACTION=.95: jax
# preallocates only 75% by default.
USABLE_FRACTION = 0.9
COMPONENTS = ('params', 'grads', 'optimizer', 'teacher_params', 'weight_copies', 'activations',
              'teacher_activations', 'inputs')
RNG_KEY_BYTES = 16  # jax.random.key(impl='rbg'): uint32[4], replicated.


def abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """A ('data', 'fsdp', 'tensor') mesh of the given sizes (missing = 1), with no devices."""
  shape = tuple(int(sizes.get(a, 1)) for a in parallel.MESH_AXES)
  return jax.sharding.AbstractMesh(shape, parallel.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def resolve_mesh(sizes: Mapping[str, int] | None, num_devices: int | None = None
                 ) -> dict[str, int]:
  """`config.mesh` with its -1 axis (if any) given the devices `num_devices` leaves (default: the
  product of the other axes, i.e. -1 means 1); a mesh without -1 is taken as it is."""
  sizes = dict(sizes or {'data': -1})
  fixed = math.prod(int(v) for v in sizes.values() if int(v) != -1)
  return parallel.mesh_shape(sizes, (num_devices or fixed) if -1 in sizes.values() else fixed)


def sharded_bytes(tree: Any, mesh_sizes: Mapping[str, int],
                  rules: Sequence[tuple[str, Any]] | None = None, dtype: Any = None) -> int:
  """Bytes one device holds of `tree` (abstract leaves, boxed with logical names or not).

  Each leaf's shard is `NamedSharding(mesh, spec).shard_shape(shape)` with the spec the trainers
  give it (`parallel.tree_shardings`); unnamed leaves are replicated. `dtype` overrides the
  leaves' own.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  shardings = parallel.tree_shardings(tree, abstract_mesh(mesh_sizes), rules)
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree, is_leaf=is_box), jax.tree.leaves(shardings)):
    value = leaf.value if is_box(leaf) else leaf
    total += math.prod(sharding.shard_shape(value.shape)) * jnp.dtype(dtype or value.dtype).itemsize
  return int(total)


def model_config(spec: str | Mapping, dtype: str | None = None) -> ml_collections.ConfigDict:
  """A `config.model`-style ConfigDict {name, dtype, ...overrides} from a name or a mapping."""
  cfg = {'name': spec} if isinstance(spec, str) else dict(spec)
  if dtype:
    cfg['dtype'] = dtype
  cfg.setdefault('dtype', 'float32')
  return ml_collections.ConfigDict(cfg)


def _model(cfg: ml_collections.ConfigDict, num_classes: int, mim: tuple | None = None
           ) -> nn.Module:
  """The classifier of `cfg`, or with `mim` = (method, mask_ratio, channels) its SimMIM/MAE
  model."""
  from jkd.models import build
  if mim is None:
    return build.create_model(cfg, num_classes)
  return build.create_mim_model(mim[0], cfg, channels=mim[2])


def _mim_mask(model: nn.Module, mim: tuple, image_shape: Sequence[int], batch: int):
  from jkd import masking
  method, ratio, _ = mim
  p = model.patch_size
  if method == 'simmim':  # The mask's block size does not change any shape.
    return jnp.zeros((batch, image_shape[0] // p, image_shape[1] // p), jnp.int32)
  return masking.mae_mask(jax.random.key(0), batch, (image_shape[0] // p) * (image_shape[1] // p),
                          ratio)


@functools.lru_cache(maxsize=32)
def _abstract(cfg_json: str, num_classes: int, image_shape: tuple, mim: tuple | None
              ) -> tuple[Any, Any]:
  from jkd.models import build
  cfg = json.loads(cfg_json)
  if 'attention' in cfg:  # Same parameters; cuDNN attention cannot even be traced off-GPU.
    cfg['attention'] = 'xla'
  model = _model(ml_collections.ConfigDict(cfg), num_classes, mim)
  if mim is None:
    return jax.eval_shape(lambda k: build.init_variables(model, k, image_shape),
                          jax.random.key(0))
  images = jnp.zeros((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda k: (model.init(k, images, _mim_mask(model, mim, image_shape, 1))
                                   ['params'], {}), jax.random.key(0))


def abstract_variables(cfg: ml_collections.ConfigDict, num_classes: int,
                       image_shape: Sequence[int], mim: tuple | None = None
                       ) -> tuple[Any, Any]:
  """(boxed abstract params, abstract model_state) of a model, as the trainers initialise it;
  with `mim` = (method, mask_ratio, channels), of its SimMIM/MAE pretraining model."""
  return _abstract(json.dumps(cfg.to_dict(), sort_keys=True), int(num_classes),
                   tuple(int(s) for s in image_shape), mim)


@dataclasses.dataclass
class Estimate:
  """Bytes per device of one step, by component (see `estimate`)."""
  student: str
  teacher: str | None
  mesh: dict
  global_batch: int
  local_batch: int
  image_shape: tuple
  dtype: str
  teacher_dtype: str | None
  remat: str  # the student's activation checkpointing ('none' for models without it)
  method: str | None  # 'mae' / 'simmim': a pretraining step of the student, else None
  param_count: int
  teacher_param_count: int
  params: int
  grads: int
  optimizer: int
  teacher_params: int
  weight_copies: int
  activations: int | None
  teacher_activations: int | None
  inputs: int

  @property
  def total(self) -> int:
    return sum(int(getattr(self, c) or 0) for c in COMPONENTS)

  @property
  def activations_modelled(self) -> bool:
    return self.activations is not None and (self.teacher is None
                                             or self.teacher_activations is not None)

  def fits(self, device_bytes: float) -> bool:
    return self.total <= USABLE_FRACTION * device_bytes

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'total': self.total}


def estimate(student: str | Mapping, *, teacher: str | Mapping | None = None,
             global_batch: int, image_size: int | Sequence[int] = 224, channels: int = 3,
             num_classes: int = 1000, dtype: str | None = None,
             teacher_dtype: str | None = None, mesh: Mapping[str, int] | None = None,
             num_devices: int | None = None, rules: Sequence[tuple[str, Any]] | None = None,
             optim: ml_collections.ConfigDict | None = None, method: str | None = None,
             mask_ratio: float = 0.75) -> Estimate:
  """Per-device bytes of a training step (a distillation step when `teacher` is given).

  Components (bytes on one device):
    params          student parameters, fp32, sharded by `rules` on `mesh` (exact);
    grads           their gradients: same size and sharding (XLA holds them as temporaries);
    optimizer       the optax state of `optim` (AdamW: mu and nu, fp32, sharded like the params),
                    step counters and batch statistics (exact);
    teacher_params  the frozen teacher as `jkd distill` places it (weights in its compute dtype
                    if 16-bit, else fp32; BatchNorm statistics fp32), same rules (exact);
    weight_copies   compute-dtype copies of the weights: the bf16 casts the backward pass
                    reuses and, when fsdp > 1, both models' weights all-gathered over fsdp (XLA
                    may keep them for the whole step; it did for the teacher on CPU);
    activations     student tensors saved for the backward pass (`vit_activation_bytes`);
    teacher_activations  the teacher's inference peak (it saves nothing for a backward pass);
    inputs          the local batch (uint8 images, int32 labels) and the RNG key.

  Args:
    student, teacher: model names or `config.model`-style mappings {name, dtype, ...overrides}.
    global_batch: examples per step over all devices; split over the mesh axes data×fsdp.
    image_size: side, or (height, width); `channels`, `num_classes` give input and head shapes.
    dtype, teacher_dtype: compute dtypes ('bfloat16', 'float32'); None keeps the mapping's
      (default float32); the teacher defaults to the student's.
    mesh: {'data', 'fsdp', 'tensor'} sizes; one may be -1 (filled from `num_devices`).
    rules: logical-axis rules; None = `parallel.active_rules()` (see `parallel.merge_rules`).
    optim: `config.optim`; default `jkd.optim.default_optim_config()` (AdamW).
    method, mask_ratio: 'mae' or 'simmim' plans `jkd pretrain`'s step of that model (the
      student's name is the ViT encoder, its mapping may hold decoder fields); no teacher.
  """
  from jkd.optim import default_optim_config, make_optimizer
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  image_shape = (int(h), int(w), int(channels))
  sizes = resolve_mesh(mesh, num_devices)
  local = _local_batch(global_batch, sizes)
  gathered = {'tensor': sizes['tensor']}  # What a device holds once fsdp is all-gathered.

  s_cfg = model_config(student, dtype)
  mim = (method, float(mask_ratio), image_shape[2]) if method else None
  if mim and teacher is not None:
    raise UserError(f'a {method} pretraining step has no teacher: drop --teacher.')
  s_model = _model(s_cfg, num_classes, mim)
  s_params, s_state = abstract_variables(s_cfg, num_classes, image_shape, mim)
  tx, _ = make_optimizer(optim or default_optim_config(), global_batch, 10_000)
  params = sharded_bytes(s_params, sizes, rules, jnp.float32)
  optimizer = (sharded_bytes(jax.eval_shape(tx.init, s_params), sizes, rules)
               + 4 + sharded_bytes(s_state, sizes, rules))  # + TrainState.step.
  b = jnp.dtype(s_model.dtype).itemsize
  copies = (sharded_bytes(s_params, gathered, rules, s_model.dtype)
            if b < 4 or sizes['fsdp'] > 1 else 0)  # fp32 unsharded: the params themselves.
  activations = (mim_activation_bytes(s_model, method, mask_ratio, image_shape, local,
                                      sizes['tensor']) if mim else
                 vit_activation_bytes(s_model, image_shape, local, sizes['tensor'], train=True))

  t_cfg, t_params, t_count, t_acts = None, 0, 0, None
  if teacher is not None:
    t_cfg = model_config(teacher, teacher_dtype or (
        None if isinstance(teacher, Mapping) and 'dtype' in teacher else s_cfg.dtype))
    t_count, t_params, t_copies, t_acts = _teacher_bytes(t_cfg, num_classes, image_shape, local,
                                                         sizes, rules)
    copies += t_copies
  return Estimate(
      student=s_cfg.name, teacher=t_cfg.name if t_cfg else None, mesh=sizes,
      global_batch=int(global_batch), local_batch=local, image_shape=image_shape,
      dtype=s_cfg.dtype, teacher_dtype=t_cfg.dtype if t_cfg else None,
      remat=getattr(s_model, 'remat', 'none'), method=method, param_count=param_count(s_params),
      teacher_param_count=t_count, params=params, grads=params,
      optimizer=optimizer, teacher_params=t_params, weight_copies=copies,
      activations=activations, teacher_activations=t_acts,
      inputs=local * (math.prod(image_shape) + 4) + RNG_KEY_BYTES)


def _local_batch(global_batch: int, sizes: Mapping[str, int]) -> int:
  """Examples per device: `global_batch` split over the mesh axes data×fsdp."""
  shards = sizes['data'] * sizes['fsdp']
  if global_batch % shards:
    raise UserError(f'global batch {global_batch} does not divide by the {shards} batch shards '
                    f'(data×fsdp) of the mesh {sizes}.')
  return global_batch // shards


def _teacher_bytes(t_cfg: ml_collections.ConfigDict, num_classes: int, image_shape: tuple,
                   local: int, sizes: Mapping[str, int], rules) -> tuple[int, int, int, int | None]:
  """The frozen teacher's part of `estimate`, per device: (parameter count, bytes as `jkd
  distill` places it, bytes of its fsdp all-gathered weights, inference activation bytes)."""
  t_model = _model(t_cfg, num_classes)
  t_abstract, t_state = abstract_variables(t_cfg, num_classes, image_shape)
  t_count = param_count(t_abstract)
  from jkd.teacher import storage_dtype  # pylint: disable=g-import-not-at-top
  t_params = (sharded_bytes(t_abstract, sizes, rules, storage_dtype(t_model))
              + sharded_bytes(t_state, sizes, rules, jnp.float32))
  copies = 0
  if sizes['fsdp'] > 1:  # Stored in its compute dtype: only the fsdp all-gather copies it.
    copies = sharded_bytes(t_abstract, {'tensor': sizes['tensor']}, rules, t_model.dtype)
  t_acts = vit_activation_bytes(t_model, image_shape, local, sizes['tensor'], train=False)
  return t_count, t_params, copies, t_acts


# ---------------------------------------------------------------- what XLA reports


def distill_config(config: ml_collections.ConfigDict,
                   teacher: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` that `jkd distill` can build with a freshly initialised teacher named
  `teacher` (or `config.teacher.model`) instead of a teacher workdir: adds a `teacher` group
  and a KD loss where the config (e.g. a bench config) has none."""
  config = ml_collections.ConfigDict(config.to_dict())
  if 'teacher' not in config:
    config.teacher = ml_collections.ConfigDict({'workdir': '', 'dtype': ''})
  if teacher:
    config.teacher.model = teacher
  if not config.teacher.get('dtype'):
    config.teacher.dtype = config.model.get('dtype', 'float32')
  if 'losses' not in config:
    config.losses = ml_collections.ConfigDict({'kd': {'weight': 1.0}})
  return config


def compile_step(config: ml_collections.ConfigDict, *, teacher: str | None = None,
                 run: bool = False) -> dict:
  """Compiles the real jkd train step of `config` on this process's devices; XLA's memory.

  The step is `jkd train`'s (supervised), `jkd pretrain`'s for a MAE/SimMIM config, or, with a
  teacher (`teacher` names a model, or
  `config.teacher.workdir` / `config.teacher.model` is set), `jkd distill`'s, jitted by
  `jkd.loop.jit_train_step` as training jits it, on `config.mesh` with
  `config.sharding_rules`. A named teacher gets zero weights (`distill_config`), the data are
  synthetic of the config's image shape. Compilation is ahead of time on abstract state: only
  the teacher and one batch reach the devices unless `run`.

  Returns:
    Per-device bytes from `compiled.memory_analysis()`: argument, output, alias, temp,
    generated_code, and peak = argument + output − alias + temp; with `run` (one real step)
    also `peak_bytes_in_use`, the allocator's high-water mark where the device reports it.
  """
  from jkd import data, loop, trainers  # pylint: disable=g-import-not-at-top
  from jkd.teacher import Teacher  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  if config.data.name != 'synthetic':  # Same shapes, nothing read from disk (as `jkd bench`).
    shape, classes = image_spec(config.data)
    config.data = data.default_data_config('synthetic')
    config.data.update(image_size=shape[0], channels=shape[2], num_classes=classes)
  config.data.num_workers, config.data.prefetch = 0, 1
  tcfg = config.get('teacher') or {}
  is_distill = bool(teacher or tcfg.get('workdir') or tcfg.get('model'))
  if is_distill:
    config = distill_config(config, teacher)
  trainer = trainers.get('distill' if is_distill else 'pretrain' if mim_method(config)
                         else 'train', config)
  inputs = {}
  if trainer.name == 'distill' and (teacher or not config.teacher.get('workdir')):
    inputs['teacher'] = Teacher.named(config)  # A named teacher wins, as in `plan`.
  with parallel.use_rules(parallel.merge_rules(config.get('sharding_rules'))):
    task = trainer.build_task(config, '', **inputs)
    mesh = parallel.make_mesh(config.get('mesh'))
    key, _ = loop.run_keys(config)
    state, shardings = loop.abstract_sharded_state(task.init_state, key, mesh)
    step_fn, extra = loop.jit_train_step(task, mesh, shardings)
    batch = parallel.global_batch(next(task.train_iterator), mesh)
    getattr(task.train_iterator, 'close', lambda: None)()
    key = jax.device_put(key, parallel.replicated(mesh))
    compiled = step_fn.lower(state, batch, key, *extra).compile()
    m = compiled.memory_analysis()
    out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
           'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes,
           'generated_code': m.generated_code_size_in_bytes}
    out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
    out.update(job='distill' if is_distill else 'pretrain' if mim_method(config) else 'train',
               devices=jax.device_count(),
               device=jax.devices()[0].device_kind,
               mesh={k: int(v) for k, v in mesh.shape.items()})
    if run:
      real = jax.jit(lambda k: nn.meta.unbox(task.init_state(k)), out_shardings=shardings)(key)
      jax.block_until_ready(compiled(real, batch, key, *extra))
      stats = jax.devices()[0].memory_stats() or {}
      if 'peak_bytes_in_use' in stats:
        out['peak_bytes_in_use'] = int(stats['peak_bytes_in_use'])
  return out


# ---------------------------------------------------------------- jkd plan


def parse_bytes(text: str | float) -> float:
  """'80GB', '16GiB', '512MB', or a number of bytes. GB and GiB both mean 2^30 here, as
  accelerator memory is quoted (an '80 GB' H100 has 80 GiB of HBM)."""
  if isinstance(text, (int, float)):
    return float(text)
  m = re.fullmatch(r'\s*([\d.]+)\s*([KMGT]i?B?)?\s*', str(text), re.IGNORECASE)
  if not m:
    raise UserError(f'--device-memory {text!r} is not a size; write e.g. 80GB, 16GiB or 32G.')
  unit = (m.group(2) or 'B')[0].upper()
  return float(m.group(1)) * {'B': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}[unit]


def candidate_meshes(num_devices: int, max_tensor: int = 8) -> list[dict[str, int]]:
  """Meshes of `num_devices`, cheapest communication first: tensor size, then fsdp size."""
  out = []
  for t in (t for t in (1, 2, 4, 8) if t <= max_tensor and num_devices % t == 0):
    for f in (f for f in range(1, num_devices // t + 1) if num_devices // t % f == 0):
      out.append({'data': num_devices // t // f, 'fsdp': f, 'tensor': t})
  return out


def image_spec(data_cfg) -> tuple[tuple[int, int, int], int]:
  """(image shape, classes) the pipeline would yield; from `data_cfg.image_size` (channels 3,
  1000 classes unless set) where this machine does not hold the dataset (ImageNet on a laptop)."""
  from jkd import data
  try:
    info = data.get_info(data_cfg)
    return tuple(info.image_shape), int(info.num_classes)
  except UserError:
    size = data_cfg.get('image_size')
    if not size:
      raise
    return (size, size, data_cfg.get('channels', 3)), data_cfg.get('num_classes', 1000)


def mim_method(config: ml_collections.ConfigDict) -> str | None:
  """'mae' / 'simmim' for a `jkd pretrain` config, else None."""
  return config.get('method') if config.get('method') in METHODS else None


def plan_inputs(config: ml_collections.ConfigDict, teacher: str | None = None) -> dict:
  """What `estimate` needs, read from a run config: image shape, classes, teacher model."""
  from jkd import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  image_shape, num_classes = image_spec(config.data)
  tcfg = config.get('teacher') or ml_collections.ConfigDict()
  name, t_model, note = teacher or tcfg.get('model'), None, ''
  if (tcfg.get('cache') or {}).get('dir') and not teacher:
    note = 'teacher cache: the teacher is not in memory while distilling'
  elif name:
    t_model = teacher_lib.named_config(config, name).to_dict()
  elif tcfg.get('workdir'):
    try:
      t_model = teacher_lib.saved_config(tcfg.workdir, tcfg.get('dtype'))
    except UserError as e:
      raise UserError(f'{e} To plan without a teacher workdir, name the teacher model: '
                      '--teacher vit_l16 (for example).') from e
  elif 'teacher' in config:
    note = 'no teacher given: the student alone is planned (pass --teacher MODEL)'
  return {'image_shape': tuple(image_shape), 'num_classes': int(num_classes),
          'teacher': t_model, 'note': note}


def plan(config: ml_collections.ConfigDict, *, teacher: str | None = None,
         device_memory: float = 80 * GiB, num_devices: int | None = None) -> dict:
  """`jkd plan`: the per-device estimate for `config`, whether it fits, and a mesh that fits.

  Args:
    config: a run config (model, data, batch_size, mesh, optim, teacher, sharding_rules).
    teacher: a teacher model name; overrides the config's teacher (for planning without one).
    device_memory: bytes per device.
    num_devices: devices of the planned machine; default the product of config.mesh (a -1 axis
      takes this machine's device count).

  Returns:
    {'estimate': Estimate.as_dict(), 'fits', 'device_memory', 'usable', 'suggestion' (first
    mesh of the same devices that fits, see `candidate_meshes`, or None), 'remat_suggestion'
    ({'remat': 'full', 'total'} when the model does not fit but would with
    `model.remat='full'`, else None), 'max_local_batch'
    (largest per-device batch that fits on config.mesh), 'note'}.
  """
  inputs = plan_inputs(config, teacher)
  rules = parallel.merge_rules(config.get('sharding_rules'))
  sizes = dict(config.get('mesh') or {'data': -1})
  if num_devices is None:
    num_devices = (jax.device_count() if -1 in sizes.values()
                   else math.prod(int(v) for v in sizes.values()))

  method = mim_method(config)

  def at(mesh, batch=config.batch_size, model=config.model.to_dict()):
    return estimate(model, teacher=inputs['teacher'], global_batch=batch, method=method,
                    mask_ratio=config.get('mask_ratio', 0.75),
                    image_size=inputs['image_shape'][:2], channels=inputs['image_shape'][2],
                    num_classes=inputs['num_classes'], mesh=mesh, num_devices=num_devices,
                    rules=rules, optim=config.get('optim'))
  est = at(sizes)
  usable = USABLE_FRACTION * device_memory
  suggestion = None
  if not est.fits(device_memory):
    for mesh in candidate_meshes(math.prod(est.mesh.values())):
      if config.batch_size % (mesh['data'] * mesh['fsdp']):
        continue
      other = at(mesh)
      if other.fits(device_memory):
        suggestion = {'mesh': mesh, 'total': other.total}
        break
  remat_suggestion = None  # Recomputing the blocks instead: same mesh, about 1/3 more FLOPs.
  if not est.fits(device_memory) and est.remat == 'none' and est.activations is not None:
    try:
      other = at(sizes, model={**config.model.to_dict(), 'remat': 'full'})
    except UserError:  # A model without remat.
      other = None
    if other is not None and other.fits(device_memory):
      remat_suggestion = {'remat': 'full', 'total': other.total}
  shards = est.mesh['data'] * est.mesh['fsdp']
  one = at(est.mesh, shards).total
  per_example = at(est.mesh, 2 * shards).total - one  # Bytes each local example adds.
  max_local = int((usable - (one - per_example)) // per_example) if per_example > 0 else 0
  return {'estimate': est.as_dict(), 'fits': est.fits(device_memory),
          'device_memory': int(device_memory), 'usable': int(usable),
          'suggestion': suggestion, 'remat_suggestion': remat_suggestion,
          'max_local_batch': max(max_local, 0),
          'activations_modelled': est.activations_modelled, 'note': inputs['note']}


def _gib(n: float | None) -> str:
  if n is None:
    return 'n/a'
  return f'{n / GiB:,.2f} GiB' if n >= GiB / 10 else f'{n / 2**20:,.1f} MiB'


def format_plan(result: dict) -> str:
  """The human-readable `jkd plan` report."""
  e = result['estimate']
  remat = f', remat {e["remat"]}' if e.get('remat', 'none') != 'none' else ''
  method = {'mae': 'MAE pretraining of ', 'simmim': 'SimMIM pretraining of '}.get(
      e.get('method'), '')
  who = (f'{method}{e["student"]} ({e["param_count"] / 1e6:.1f}M params'
         f'{" with the decoder" if e.get("method") == "mae" else ""}, {e["dtype"]} compute'
         f'{remat})')
  if e['teacher']:
    who += (f' <- teacher {e["teacher"]} ({e["teacher_param_count"] / 1e6:.1f}M params, '
            f'{e["teacher_dtype"]} compute)')
  rows = [('student params (fp32)', e['params']), ('gradients (fp32)', e['grads']),
          ('optimizer state', e['optimizer']), ('teacher params', e['teacher_params']),
          ('weight copies (compute dtype)', e['weight_copies']),
          ('student activations', e['activations']),
          ('teacher activations (peak)', e['teacher_activations']),
          ('inputs', e['inputs']), ('total', e['total'])]
  lines = [who, f'global batch {e["global_batch"]}, image {"x".join(map(str, e["image_shape"]))},'
                f' mesh {e["mesh"]}: local batch {e["local_batch"]} per device']
  width = max(len(k) for k, _ in rows)
  lines += [f'  {k.ljust(width)}  {_gib(v):>14}' for k, v in rows
            if (e['teacher'] or not k.startswith('teacher'))
            and (v is not None or k.startswith('student act'))]
  verdict = 'fits' if result['fits'] else 'does NOT fit'
  lines.append(f'{verdict} in {_gib(result["device_memory"])} per device '
               f'({_gib(result["usable"])} usable)' + (
                   f'; at most {result["max_local_batch"]} examples per device would fit on '
                   'this mesh' if result['activations_modelled'] else ''))
  if not result['fits']:
    s = result['suggestion']
    lines.append(f'mesh {s["mesh"]} fits ({_gib(s["total"])} per device): set '
                 + ' '.join(f'--config.mesh.{k}={v}' for k, v in s['mesh'].items())
                 if s else 'no mesh of these devices fits: lower config.batch_size or add '
                           'devices')
    r = result.get('remat_suggestion')
    if r:
      lines.append(f'activation checkpointing fits on this mesh ({_gib(r["total"])} per device, '
                   'about 1/3 more FLOPs): set --config.model.remat=full')
  if not result['activations_modelled']:
    lines.append('activations are modelled for ViTs only: run with --measure for XLA\'s figure')
  if result['note']:
    lines.append(result['note'])
  return '\n'.join(lines)


def format_measured(result: dict) -> str:
  """One line comparing `compile_step`'s figures (result['xla']) with the estimate."""
  x, total = result['xla'], result['estimate']['total']
  line = (f'XLA, compiled here ({x["devices"]} x {x["device"]}, mesh {x["mesh"]}): arguments '
          f'{_gib(x["argument"])} + temporaries {_gib(x["temp"])} + outputs not donated '
          f'{_gib(x["output"] - x["alias"])} = {_gib(x["peak"])} per device '
          f'({x["peak"] / total:.2f} x the estimate)')
  if 'peak_bytes_in_use' in x:
    line += (f'; allocator peak after one step {_gib(x["peak_bytes_in_use"])} '
             f'({x["peak_bytes_in_use"] / total:.2f} x)')
  return line
