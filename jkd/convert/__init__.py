"""Public vision checkpoints as jkd models: the same network, provably, in one call.

  module, variables = jkd.convert.load('deit_small_patch16_224.safetensors')
  logits = module.apply(variables, images)              # images (B, 224, 224, 3), NHWC
  report = jkd.convert.save_workdir('mae_pretrain_vit_base.pth', 'runs/mae_b',  # `jkd import`
                                    build_task=jkd.trainers.build_task)

`save_workdir` writes a normal jkd workdir (an Orbax checkpoint at step 0 and its metadata): use
it as `--config.teacher.workdir`, `--config.init_from`, a MIM teacher (MAE / SimMIM
pretraining checkpoints keep their decoders), or evaluate it with `jkd eval --workdir`.

Formats: `jkd.convert.formats` (safetensors, PyTorch zip read weights-only, big_vision .npz).
Sources: timm ViT / DeiT / DeiT III / ResNet, Hugging Face ViT, torchvision ResNet, the
official MAE (pretraining with decoder, and fine-tuned) and SimMIM ViT, big_vision ViT
(`jkd.convert.vit`, `jkd.convert.resnet`). The model's sizes come from the tensors' shapes;
what shapes do not say (a ViT's head count when its width is not a multiple of 64) comes from
`--model NAME` or `--config.model.num_heads=H`. A different class count gets a fresh head, a
different image size a resampled position table (bicubic, as timm); the report lists both.
docs/pretrained.md has the workflow end to end.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from jkd import storage
from jkd.convert import formats
from jkd.errors import UserError

if TYPE_CHECKING:
  import flax.linen as nn
  import ml_collections
  from jkd.convert.vit import Converted

# jax, flax and the converters are imported where used: `jkd.convert.formats` (the file
# readers) must import without jax (tests/test_fuzz_checkpoints.py runs it in small processes).
# A MIM model's masking defaults (the papers'), for `jkd eval` and MIM distillation.
MIM_DEFAULTS = {'mae': {'mask_ratio': 0.75, 'norm_pix_loss': True, 'mask_patch_size': 0},
                'simmim': {'mask_ratio': 0.6, 'norm_pix_loss': False, 'mask_patch_size': 32}}


def convert(tensors: dict, model: dict | None = None) -> Converted:
  """Detects the tensors' layout and translates them (`Converted`).

  Args:
    tensors: {name: array} as `formats.read_tensors` returns them.
    model: fields the tensors cannot say or the user wants instead ({'name': 'vit_s16'},
      {'num_heads': 3}, ...).
  """
  layouts = _layouts()
  found = [name for name, (detect, _) in layouts.items() if detect(tensors)]
  if not found:
    raise UserError('The checkpoint\'s tensors match no layout jkd imports (timm / Hugging Face '
                    'ViT and DeiT, official MAE and SimMIM, big_vision ViT, torchvision / timm '
                    f'ResNet). It holds: {formats.describe(tensors)}.')
  from jkd.convert import vit  # pylint: disable=g-import-not-at-top
  return vit.translate(found[0], layouts[found[0]][1], tensors, dict(model or {}))


def _layouts() -> dict:
  """layout name -> (detector, converter), ViTs first."""
  from jkd.convert import resnet, vit  # pylint: disable=g-import-not-at-top
  return {**vit.LAYOUTS, **resnet.LAYOUTS}


def __getattr__(name: str):
  """`LAYOUTS` and the converter modules, imported on first use (they import jax)."""
  if name == 'LAYOUTS':
    return _layouts()
  if name in ('vit', 'resnet', 'posemb'):
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f'jkd.convert.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


@dataclasses.dataclass
class Imported:
  """A converted checkpoint as a jkd module with its variables.

  Attributes:
    module: the Flax module (`ViT`, `ResNet`, `SimMIM` or `MAE`).
    variables: {'params': ..., other collections}, numpy float32.
    config: the run config that describes it (model, data, and a MIM model's masking).
    report: what was mapped (see `build`).
  """
  module: nn.Module
  variables: dict
  config: ml_collections.ConfigDict
  report: dict


def default_config(converted: Converted) -> ml_collections.ConfigDict:
  """A run config for a converted model with no data of its own: synthetic images of the
  checkpoint's size, channels and classes (replace `config.data` to evaluate or train)."""
  import ml_collections  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from jkd.data import default_data_config  # pylint: disable=g-import-not-at-top
  from jkd.defaults import base_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.data = default_data_config('synthetic')
  c.data.image_size = converted.image_size or 224
  c.data.channels = converted.channels
  c.data.num_classes = converted.num_classes or 1000
  c.batch_size = 8
  c.eval_batch_size = 8
  c.model = ml_collections.ConfigDict(converted.model)
  if converted.method:
    c.method = converted.method
    c.update(MIM_DEFAULTS[converted.method])
  return c


def _model_overrides(overrides: Sequence[str]) -> dict:
  """{'num_heads': 6, ...} from 'model.num_heads=6' overrides (typed later by apply_override)."""
  out = {}
  for o in overrides:
    key, _, text = o.partition('=')
    if key.startswith('model.') and key.count('.') == 1:
      try:
        out[key[len('model.'):]] = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        out[key[len('model.'):]] = text
  return out


def make_config(converted: Converted, config_spec: str | None = None,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The run config of an import: `config_spec`'s (a jkd config file, e.g. the dataset to
  evaluate or fine-tune on) or `default_config`'s, with the converted model, then `overrides`.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top,redefined-outer-name
  from jkd.config import apply_override, load_config  # pylint: disable=g-import-not-at-top
  config = load_config(config_spec) if config_spec else default_config(converted)
  base = ml_collections.ConfigDict(config.get('model') or {})
  config.model = ml_collections.ConfigDict(converted.model)
  if base.get('dtype') and 'dtype' not in config.model:
    config.model.dtype = base.dtype
  if converted.method:
    config.method = converted.method
    for k, v in MIM_DEFAULTS[converted.method].items():
      if k not in config:
        config[k] = v
  for o in overrides:
    apply_override(config, o)
  return config


def _init(module: nn.Module, method: str | None, shape, seed: int) -> dict:
  """Fresh variables (unboxed numpy) of `module` for images of `shape`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jkd import masking  # pylint: disable=g-import-not-at-top
  key = jax.random.key(seed)
  x = jnp.zeros((1, *shape), jnp.float32)
  if method == 'mae':
    mask = masking.mae_mask(key, 1, (shape[0] // module.patch_size) ** 2, 0.75)
    variables = module.init({'params': key}, x, mask, train=False)
  elif method == 'simmim':
    g = shape[0] // module.patch_size
    variables = module.init({'params': key}, x, jnp.zeros((1, g, g), jnp.int32), train=False)
  else:
    variables = module.init({'params': key, 'dropout': key}, x, train=False)
  variables = {k: v for k, v in nn.meta.unbox(variables).items() if k != 'intermediates'}
  return jax.tree.map(np.asarray, variables)


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
  return out


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


# Top-level params that start fresh when their shape differs from the checkpoint's: the heads,
# for another class count.
RESHAPED_FRESH = ('head', 'head_dist')


def build(converted: Converted, config: ml_collections.ConfigDict, *, seed: int = 0,
          source: dict | None = None) -> Imported:
  """The jkd module of `config.model` with the converted tensors in its variables.

  Where the target differs from the checkpoint, the target wins and the report says so: a head
  for another class count starts fresh, a learned position table is resampled to another image
  size, a parameter the checkpoint lacks starts fresh.

  Returns:
    `Imported`, whose report has: checkpoint, format, layout, method, model (the config),
    tensors (in the file), used (file tensors translated), arrays (the model's variables),
    mapped (of them, loaded from the file), params (the model's parameter count), dropped (file
    tensors not used), fresh (model variables not from the file), resized, notes.
  """
  from jkd import data, models  # pylint: disable=g-import-not-at-top
  from jkd.convert import posemb, vit  # pylint: disable=g-import-not-at-top
  from jkd.models.build import (  # pylint: disable=g-import-not-at-top
      create_mim_model, create_model, input_shape)
  info = data.get_info(config.data)
  shape = input_shape(info, config.data)
  if converted.method:
    module = create_mim_model(converted.method, config.model, shape[2])
  else:
    module = create_model(config.model, info.num_classes)
  if shape[2] != converted.channels:
    raise UserError(f'The checkpoint takes {converted.channels}-channel images, but the data '
                    f'gives {shape[2]} channels: use a dataset with {converted.channels} '
                    'channels (config.data).')
  target = _init(module, converted.method, shape, seed)
  # Converted tensors by the name the report uses: 'path' for params, 'collection/path' else.
  sources = {path: v for path, v in converted.params.items()}
  for collection, tree in converted.model_state.items():
    sources.update({f'{collection}/{path}': v for path, v in tree.items()})
  fresh, resized, seen, out = [], [], set(), {}
  for collection, tree in target.items():
    flat = _flatten(tree)
    for path, leaf in flat.items():
      name = path if collection == 'params' else f'{collection}/{path}'
      value = sources.get(name)
      seen.add(name)
      if value is not None and path == 'pos_embedding' and value.shape != leaf.shape:
        old, new = vit._grid_of(value.shape[1]), vit._grid_of(leaf.shape[1])
        value = posemb.resample(np.asarray(value, np.float32), (new, new), (old, old))
        resized.append(f'pos_embedding {old}x{old} -> {new}x{new} patches (bicubic, as timm)')
      if value is not None and tuple(value.shape) != tuple(leaf.shape) and (
          collection != 'params' or path.split('/')[0] not in RESHAPED_FRESH):
        # Only a head may start fresh for another shape (another class count): any other
        # tensor of the wrong shape is a checkpoint that does not fit, never re-initialised.
        raise UserError(
            f'The checkpoint\'s tensor for {name} has shape {tuple(value.shape)}, but the model '
            f'{config.model.get("name")!r} needs {tuple(leaf.shape)}: the file is damaged or '
            'another architecture. Check --model and --config.model (width, depth, heads, patch '
            'size, MLP width); nothing was written.')
      if value is None or tuple(value.shape) != tuple(leaf.shape):
        fresh.append(name + ('' if value is None else
                             f' (checkpoint {tuple(value.shape)}, model {tuple(leaf.shape)})'))
      else:
        flat[path] = np.asarray(value, np.float32).astype(leaf.dtype)
    out[collection] = _unflatten(flat)
  mapped = len(seen) - len(fresh)
  # Converted tensors the model has no place for (e.g. a head when it has none).
  unplaced = sorted(set(sources) - seen)
  if not mapped:
    raise UserError('None of the checkpoint\'s tensors fit the model: check --model and '
                    '--config.model.')
  dropped = sorted(set((source or {}).get('names', ())) - converted.used) + unplaced
  report = {**{k: v for k, v in (source or {}).items() if k != 'names'},
            'layout': converted.layout, 'method': converted.method,
            'model': config.model.to_dict(), 'used': len(converted.used), 'mapped': mapped,
            'arrays': len(seen),
            'params': models.param_count(out['params']), 'dropped': dropped, 'fresh': fresh,
            'resized': resized, 'notes': list(converted.notes)}
  return Imported(module, out, config, report)


def read(path: str, model: dict | None = None) -> tuple[Converted, dict]:
  """(converted, source facts {path, format, tensors, names}) of a checkpoint file."""
  tensors, fmt = formats.read_tensors(path)
  converted = convert(tensors, model)
  _check_finite({n: tensors[n] for n in converted.used if n in tensors}, path)
  _check_finite({**converted.params, **{f'{c}/{k}': v for c, tree in converted.model_state.items()
                                        for k, v in tree.items()}}, path)
  return converted, {'checkpoint': storage.resolve(path), 'format': fmt,
                     'tensors': len(tensors), 'names': sorted(tensors)}


def _check_finite(tensors: dict, path: str) -> None:
  """Refuses a checkpoint whose float tensors (those used, by their names in the file, then
  as translated) hold NaN or inf: a model that computes NaN would otherwise surface later as a
  diverged distillation blamed on its learning rate."""
  bad = []
  for name in sorted(tensors):
    value = np.asarray(tensors[name])
    if value.dtype.kind in 'biu':
      continue
    if not np.isfinite(value.astype(np.float32, copy=False)).all():
      bad.append(f'{name} {tuple(value.shape)}')
  if bad:
    raise UserError(f'{path!r} holds NaN or infinite weights in {len(bad)} tensor(s): '
                    f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}. The file is damaged '
                    'or the model diverged before it was saved; import another checkpoint.')


def load(path: str, model: str | None = None, **overrides: Any) -> tuple[nn.Module, dict]:
  """A checkpoint file as (Flax module, variables), ready for `module.apply(variables, x)`.

  Args:
    path: a safetensors, PyTorch (.pth / .bin) or big_vision .npz file.
    model: a registered jkd model name to build (its head count, say) instead of the one
      inferred from the shapes.
    **overrides: model fields, e.g. num_heads=3, dtype='bfloat16', num_classes=10 (a fresh
      head), image_size=384 (a resampled position table).
  """
  image_size = overrides.pop('image_size', None)
  num_classes = overrides.pop('num_classes', None)
  given = {**({'name': model} if model else {}), **overrides}
  converted, source = read(path, given)
  config = default_config(converted)
  config.model.update(given)
  if image_size:
    config.data.image_size = int(image_size)
  if num_classes:
    config.data.num_classes = int(num_classes)
  imported = build(converted, config, source=source)
  return imported.module, imported.variables


def save_workdir(path: str, workdir: str, *, build_task: Callable[..., Any],
                 model: str | None = None, config_spec: str | None = None,
                 overrides: Sequence[str] = (), log=print) -> dict:
  """`jkd import`: converts `path` and writes it as a jkd workdir; returns the report (also in
  `WORKDIR/import.json`).

  The workdir holds an Orbax checkpoint at step 0 of the trainer that runs such a model
  (`jkd train`'s for a classifier, `jkd pretrain`'s for an MAE / SimMIM model), with the config
  (`make_config`) in its metadata: everything that reads a workdir reads it. That trainer's
  Task comes from `build_task(command, config, workdir)`, `jkd.trainers.build_task`: the jobs
  sit above this module, so their caller (the `jkd import` command, `Trainer.train` importing
  `config.teacher.checkpoint`) passes it in; the imported tensors replace its fresh state.

  Safe to stop and to run twice: the file is read and converted before the workdir is touched;
  then the workdir lock (`jkd.lock`) is taken, so a run or another import writing there refuses
  this one (or this one refuses them); the checkpoint is written, then `import.json`, which
  marks the import complete. SIGTERM/SIGINT (`jkd.interrupt`) stop it at the next safe point:
  before the checkpoint (nothing written) or after `import.json` (a complete import). An import
  killed between the two (SIGKILL) leaves a step-0 checkpoint without `import.json`, which the
  next import into that workdir replaces.

  Raises:
    UserError: a file jkd cannot read or convert, a workdir that already holds checkpoints, or
      one that another jkd command holds.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top,redefined-outer-name
  import jax  # pylint: disable=g-import-not-at-top
  from jkd import interrupt, lock, loop, models  # pylint: disable=g-import-not-at-top
  from jkd.checkpoint import RunCheckpointer  # pylint: disable=g-import-not-at-top
  workdir = storage.resolve(workdir)
  with interrupt.deferred(), contextlib.ExitStack() as held:
    # An existing workdir is locked first (a run there is named at once); a new one only once
    # the file is converted, so that a file jkd refuses leaves no directory behind.
    locked = storage.isdir(workdir)
    if locked:
      held.enter_context(lock.hold(workdir, command='jkd import', log=log))
    _existing_import(workdir)  # Refused early (checked again under the lock).
    given = {**({'name': model} if model else {}), **_model_overrides(overrides)}
    converted, source = read(path, given)
    interrupt.check('while reading the checkpoint file; nothing was written')
    config = make_config(converted, config_spec, overrides)
    imported = build(converted, config, source=source)
    task = build_task('pretrain' if converted.method else 'train', config, workdir)
    try:
      init_key, _ = loop.run_keys(config)
      state = jax.jit(lambda k: nn.meta.unbox(task.init_state(k)))(init_key)
      state = state.replace(params=imported.variables['params'],
                            model_state={k: v for k, v in imported.variables.items()
                                         if k != 'params'})
      report = {**imported.report, 'workdir': workdir}
      meta = dict(task.meta, kind=task.kind, params=report['params'], config=config.to_dict(),
                  model_defaults=models.MODEL_DEFAULTS_VERSION,
                  imported={k: report[k] for k in ('checkpoint', 'format', 'layout')})
      interrupt.check('while converting the checkpoint; nothing was written')
      if not locked:
        held.enter_context(lock.hold(workdir, command='jkd import', log=log))
      if _existing_import(workdir) == 'cut off':
        log(f'{workdir}: replacing an import that was cut off before its import.json')
        storage.remove_tree(storage.join(workdir, 'checkpoints'))
      interrupt.check('before writing the checkpoint; nothing was written')
      ckpt = RunCheckpointer(workdir)
      try:
        ckpt.save(0, state, task.train_iterator.get_state(), meta)
        ckpt.wait()
      finally:
        ckpt.close()
      # import.json last: it marks the import complete (a signal meanwhile waits for it).
      if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, 'import.json'), report)
    finally:
      close = getattr(task.train_iterator, 'close', None)
      if close:
        close()
    log(format_report(report))
    interrupt.check('after the import was complete (checkpoint and import.json written)')
  return report


def _existing_import(workdir: str) -> str | None:
  """None for a workdir without checkpoints; 'cut off' for one that holds only the step-0
  checkpoint of an import killed before its import.json (replaced by the next import);
  else a UserError: the workdir already holds a run or a complete import."""
  from jkd.checkpoint import RunCheckpointer, checkpoint_dir  # pylint: disable=g-import-not-at-top
  if not storage.isdir(checkpoint_dir(workdir)):
    return None
  ckpt = RunCheckpointer(workdir, create=False)
  step = ckpt.latest_step()
  if step is None:
    return None
  if step == 0 and not storage.exists(storage.join(workdir, 'import.json')):
    try:
      if 'imported' in ckpt.read_meta(0):
        return 'cut off'
    except UserError:
      pass
  raise UserError(f'{workdir} already holds checkpoints: import into a new --workdir (the '
                  'existing checkpoints were left untouched).')


def format_report(r: dict) -> str:
  """The lines `jkd import` prints."""
  model = r['model']
  lines = [f'imported {r.get("checkpoint")} ({r.get("format")}, {r["layout"]} layout) -> '
           f'{r.get("workdir", "memory")}',
           f'  model {model.get("name")} {({k: v for k, v in model.items() if k != "name"})}',
           f'  {r["used"]} of the file\'s {r.get("tensors")} tensors used; {r["mapped"]} of the '
           f'model\'s {r["arrays"]} arrays loaded from them; {r["params"]:,} parameters']
  for title, key in (('dropped (in the file, not in the model)', 'dropped'),
                     ('fresh (in the model, not from the file)', 'fresh'),
                     ('resized', 'resized'), ('notes', 'notes')):
    if r[key]:
      shown = r[key][:8] + ([f'... {len(r[key]) - 8} more'] if len(r[key]) > 8 else [])
      lines.append(f'  {title}: ' + '; '.join(shown))
  return '\n'.join(lines)
