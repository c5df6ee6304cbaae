"""The frozen teacher: one object for every trainer, the teacher cache, `jkd bench` and `jkd plan`.

A `Teacher` is a Flax module, its variables on the host (numpy, as saved), a description for
summaries, and what placing it on a mesh needs. It is never trained: `place(mesh)` shards it by
the student's logical-axis rules in its storage dtype, and the step receives the placed
variables as an argument, so they are never donated, updated or checkpointed with the student.

  teacher = Teacher.from_workdir('runs/teacher', num_classes=10, image_shape=(28, 28, 1))
  variables, shardings = teacher.place(mesh)
  logits, taps = teacher.apply(variables, images, capture=True)

Where a teacher comes from:
  `from_config` / `from_workdir`  a classifier workdir (`jkd train`, `jkd distill`, ...);
  `mim_from_config`               a `jkd pretrain` (SimMIM / MAE) workdir, decoder included;
  `named`                         a model by name with zero weights: `jkd bench` and `jkd plan`
                                  time and size a teacher's cost, not its knowledge.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jkd import data, models, parallel
from jkd.checkpoint import load_model, read_latest_meta
from jkd.errors import UserError
from jkd.mim import MimObjective
from jkd.models import build
from jkd.models.mim import METHODS

_NO_TEACHER = ('No teacher: set --config.teacher.workdir=DIR to the workdir of a trained model '
               '(e.g. the output of `jkd train`).')
_NO_MIM_TEACHER = ('No teacher: set --config.teacher.workdir=DIR to a `jkd pretrain` workdir '
                   '(MAE or SimMIM), e.g. the output of `jkd pretrain --config '
                   'configs/fashion_mnist/mae.py --workdir DIR`.')


# Where `config.teacher.checkpoint` is imported, inside the run's workdir (a jkd workdir).
IMPORTED_TEACHER = 'imported_teacher'


def import_checkpoint(config, workdir: str, *, build_task, log=print) -> None:
  """`config.teacher.checkpoint` (a public checkpoint file, read as `jkd import` reads it) as
  the run's teacher: imported once into WORKDIR/imported_teacher, a jkd workdir that a resumed
  run reuses, and set as `config.teacher.workdir`; everything downstream (placement, dtype,
  taps, the teacher cache's identity) then reads a workdir. `config.teacher.model` names the
  model to build and `config.teacher.model_fields` ({'num_heads': 6, ...}) sets its fields when
  the shapes do not say (as `jkd import --model NAME --config.model.K=V`). Nothing happens
  without the setting. `build_task` is `jkd.trainers.build_task` (`convert.save_workdir`).

  Raises:
    UserError: both `teacher.checkpoint` and `teacher.workdir` set, a file `jkd import` cannot
      read, or a resumed run whose imported teacher came from another file.
  """
  from jkd import convert, storage  # pylint: disable=g-import-not-at-top  (torch-free, lazy)
  tcfg = config.get('teacher') or {}
  path = tcfg.get('checkpoint') or ''
  if not path:
    return
  if tcfg.get('workdir'):
    raise UserError(f'config.teacher.checkpoint={path!r} and config.teacher.workdir='
                    f'{tcfg.workdir!r} are both set: give one teacher (a checkpoint file, or a '
                    'jkd workdir such as `jkd import` writes).')
  target = storage.join(workdir, IMPORTED_TEACHER)
  report = storage.join(target, 'import.json')
  if storage.isfile(report):
    source = storage.read_json(report).get('checkpoint')
    if source != storage.resolve(path):
      raise UserError(f'{workdir} was started with the teacher imported from {source}, not '
                      f'{path}: a resumed run keeps its teacher. Use a new --workdir for '
                      'another teacher.')
  else:
    if storage.isdir(target):  # an import cut off before its report: start it again
      storage.remove_tree(target)
    log(f'importing the teacher {path} into {target} ...')
    fields = dict(tcfg.get('model_fields') or {})
    convert.save_workdir(path, target, build_task=build_task, model=tcfg.get('model') or None,
                         overrides=[f'model.{k}={v!r}' for k, v in fields.items()], log=log)
  config.teacher.workdir = target


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model and its host variables.

  Attributes:
    module: the Flax module (a classifier, or a SimMIM / MAE model for MIM distillation).
    variables: {'params': ..., other collections (BatchNorm statistics)} as numpy arrays.
    description: what summaries record ({'workdir', 'model'[, 'method']}).
    image_shape: one input image (H, W, C), for the abstract shapes of `place`.
    input_dtype: images are cast to this before the teacher sees them (`config.teacher.dtype`;
      float32 when unset).
    objective: a MIM teacher's `MimObjective` (its method, mask ratio, norm_pix), else None.
  """
  module: nn.Module
  variables: Mapping[str, Any]
  description: dict
  image_shape: tuple[int, int, int]
  input_dtype: Any = jnp.float32
  objective: MimObjective | None = None

  # ---------------------------------------------------------------- where teachers come from

  @classmethod
  def from_config(cls, config, num_classes: int, image_shape) -> 'Teacher':
    """The classifier in `config.teacher.workdir`, computing in `config.teacher.dtype`."""
    tcfg = config.get('teacher') or {}
    if not tcfg.get('workdir'):
      raise UserError(_NO_TEACHER)
    return cls.from_workdir(tcfg.workdir, num_classes, image_shape, dtype=tcfg.get('dtype'),
                            ema=bool(tcfg.get('ema', False)))

  @classmethod
  def from_workdir(cls, workdir: str, num_classes: int, image_shape,
                   dtype: str | None = None, ema: bool = False) -> 'Teacher':
    """The classifier a jkd workdir holds (the model its checkpoint metadata names).

    Args:
      dtype: compute dtype ('bfloat16', ...); None keeps the saved model's and feeds it fp32.
      ema: the exponential moving average of its weights instead of the weights (a run trained
        with `config.ema.decay` > 0): the EMA teacher of self-distillation.
    """
    saved = load_model(workdir)
    model_cfg = ml_collections.ConfigDict(saved.model_config)
    if not model_cfg.get('name'):
      raise UserError(f'The checkpoint in {workdir} does not say which model it holds.')
    meta = saved.meta
    if meta.get('method') in METHODS:
      raise UserError(
          f'config.teacher.workdir={workdir!r} is a masked-image-modeling run ({meta.get("kind")} '
          f'{meta.get("method")}, model {meta.get("model")!r}): it reconstructs pixels and has '
          'no classifier head to teach from. Fine-tune it into a classifier first (`jkd train '
          '--config configs/fashion_mnist/finetune.py --config.init_from=THAT_WORKDIR`) and use '
          'that workdir as the teacher, or distill a masked student from it with '
          'configs/fashion_mnist/mim_distill.py.')
    saved_classes = meta.get('num_classes')
    if saved_classes is not None and int(saved_classes) != int(num_classes):
      raise UserError(
          f'config.teacher.workdir={workdir!r} holds a {saved_classes}-class model, but the '
          f'student has {num_classes} classes (the dataset\'s): the teacher\'s logits cannot '
          'teach those labels. Use a teacher trained on this dataset\'s classes.')
    if ema and saved.ema is None:
      raise UserError(f'{workdir} holds no EMA of its weights (it was trained without '
                      '--config.ema.decay): drop --config.teacher.ema, or train the teacher with '
                      'an EMA, e.g. --config.ema.decay=0.999.')
    if dtype:
      model_cfg.dtype = dtype
    description = {'workdir': workdir, 'model': model_cfg.name, **({'ema': True} if ema else {})}
    return cls(module=build.create_model(model_cfg, num_classes),
               variables=saved.ema if ema else saved.variables,
               description=description,
               image_shape=tuple(image_shape),
               input_dtype=build.compute_dtype(dtype or 'float32'))

  @classmethod
  def mim_from_config(cls, config, image_shape) -> 'Teacher':
    """The SimMIM / MAE model (encoder and decoder) of the `jkd pretrain` workdir (or an earlier
    MIM distillation) in `config.teacher.workdir`, computing in `config.teacher.dtype`."""
    workdir = config.teacher.get('workdir')
    if not workdir:
      raise UserError(_NO_MIM_TEACHER)
    saved = load_model(workdir)
    meta, model_cfg = saved.meta, saved.model_config
    method = meta.get('method')
    if method not in METHODS or not model_cfg.get('name'):
      raise UserError(
          f'The teacher {workdir!r} holds a {meta.get("kind")!r} run of {meta.get("model")!r}, '
          'not a masked-image-modeling model: MIM distillation needs a teacher with a pixel '
          'decoder, i.e. the workdir of `jkd pretrain` (config.method mae or simmim) or of an '
          'earlier MIM distillation. Pretrain one with `jkd pretrain --config '
          'configs/fashion_mnist/mae.py --workdir T` and pass --config.teacher.workdir=T, or '
          'distill from this classifier with configs/fashion_mnist/distill.py instead.')
    if list(meta.get('image_shape') or image_shape) != list(image_shape):
      raise UserError(f'The teacher {workdir!r} was trained on images of shape '
                      f'{meta.get("image_shape")}, the student gets {list(image_shape)}: use the '
                      "teacher's dataset and config.data.image_size.")
    saved_config = meta.get('config') or {}
    settings = meta.get('mim') or {
        'method': method, 'mask_ratio': saved_config.get('mask_ratio', 0.75),
        'mask_patch_size': saved_config.get('mask_patch_size', 0) or 0,
        'norm_pix_loss': saved_config.get('norm_pix_loss', True)}
    module = build.create_mim_model(method, model_cfg, image_shape[2],
                                    dtype=config.teacher.get('dtype') or None,
                                    either_method=True)
    objective = MimObjective(module, ml_collections.ConfigDict(
        {k: settings[k] for k in ('method', 'mask_ratio', 'mask_patch_size', 'norm_pix_loss')}),
                             image_shape[0])
    return cls(module=module, variables={'params': saved.params},
               description={'workdir': workdir, 'model': model_cfg['name'], 'method': method},
               image_shape=tuple(image_shape), input_dtype=module.dtype, objective=objective)

  @classmethod
  def named(cls, config, name: str | None = None) -> 'Teacher':
    """Model `name` (default `config.teacher.model`) with zero weights, for the classes and
    images of `config.data` (`named_config`): what `jkd bench` and `jkd plan` use to measure a
    teacher's cost without a trained one."""
    name = name or config.teacher.model
    model_cfg = named_config(config, name)
    info = data.get_info(config.data)
    image_shape = build.input_shape(info, config.data)
    module = build.create_model(model_cfg, info.num_classes)
    params, state = jax.eval_shape(lambda k: build.init_variables(module, k, image_shape),
                                   jax.random.key(0))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                         {'params': nn.meta.unbox(params), **state})
    return cls(module=module, variables=zeros, description={'workdir': '', 'model': name},
               image_shape=tuple(image_shape),
               input_dtype=build.compute_dtype(model_cfg.dtype))

  # ---------------------------------------------------------------- using a teacher

  @property
  def storage_dtype(self) -> np.dtype:
    """The dtype the weights are kept in on the devices: the compute dtype when that is a
    16-bit float (a frozen teacher needs no fp32 masters; a ViT-H teacher is 2.4 GiB in fp32),
    else fp32."""
    return storage_dtype(self.module)

  def abstract_variables(self) -> dict:
    """The variables' shapes, boxed with logical axis names, from the module's init."""
    images = jnp.zeros((1, *self.image_shape), jnp.float32)
    if self.objective is not None:
      return jax.eval_shape(lambda k: {'params': self.module.init(
          {'params': k}, images, self.objective.draw_mask(k, 1), train=False)['params']},
                            jax.random.key(0))
    params, state = jax.eval_shape(
        lambda k: build.init_variables(self.module, k, self.image_shape), jax.random.key(0))
    return {'params': params, **state}

  def place(self, mesh) -> tuple[dict, dict]:
    """Puts the variables on `mesh`, sharded by the active logical-axis rules as a student of
    the same architecture would be: parameters in `storage_dtype`, other collections
    (BatchNorm statistics) in fp32. Returns (variables, their shardings)."""
    abstract = self.abstract_variables()
    placed, shardings = {}, {}
    for name, tree in self.variables.items():
      placed[name], shardings[name] = parallel.place_frozen(
          tree, abstract[name], mesh, self.storage_dtype if name == 'params' else np.float32)
    return placed, shardings

  def step_args(self, mesh) -> tuple[tuple, tuple]:
    """`place` as a Task's `place_extra_args`: ((variables,), (shardings,)), the teacher's
    variables as the train and eval steps' last argument."""
    placed, shardings = self.place(mesh)
    return (placed,), (shardings,)

  def apply(self, variables, images, *, capture: bool = False):
    """A classifier teacher's forward pass in inference mode on (B, H, W, C) images.

    Returns (logits (B, C), intermediates): the sown features and attention maps when
    `capture`, else {}.
    """
    images = images.astype(self.input_dtype)
    if capture:
      logits, inter = self.module.apply(variables, images, train=False,
                                        mutable=['intermediates'])
      return logits, inter['intermediates']
    return self.module.apply(variables, images, train=False), {}

  def without_attention_maps(self) -> 'Teacher':
    """The same teacher whose ViT keeps the fused attention kernel (block taps only)."""
    return dataclasses.replace(self, module=build.without_attention_maps(self.module))


def storage_dtype(module: nn.Module) -> np.dtype:
  """`Teacher.storage_dtype` of a module: its compute dtype if 16-bit, else fp32."""
  dtype = np.dtype(getattr(module, 'dtype', None) or np.float32)
  return dtype if dtype.name in ('bfloat16', 'float16') else np.dtype(np.float32)


def named_config(config, name: str) -> ml_collections.ConfigDict:
  """The model config of a teacher given by name: `config.teacher.dtype` (else the student's
  dtype), and the student's attention and pooling where the teacher has those fields."""
  tcfg = config.get('teacher') or {}
  cfg = ml_collections.ConfigDict({
      'name': name, 'dtype': tcfg.get('dtype') or config.model.get('dtype', 'float32')})
  for field in ('attention', 'pool'):
    if field in config.model and field in models.fields(name):
      cfg[field] = config.model[field]
  return cfg


def saved_config(workdir: str, dtype: str | None = None) -> dict:
  """The model config ({name, dtype, ...}) a teacher workdir's checkpoint records, read from its
  metadata alone; `dtype` replaces the saved compute dtype."""
  _, meta = read_latest_meta(workdir)
  model = dict((meta.get('config') or {}).get('model') or {})
  if not model.get('name'):
    raise UserError(f'The checkpoint in {workdir} does not say which model it holds.')
  if dtype:
    model['dtype'] = dtype
  return model
