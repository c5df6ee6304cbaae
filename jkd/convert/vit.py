"""Vision Transformers from other codebases' checkpoints, as jkd `ViT` / `SimMIM` / `MAE` params.

Layouts (detected from the tensor names; `LAYOUTS` lists them):
  timm_vit      timm's VisionTransformer: ViT, DeiT (with its distillation token), DeiT III
                (layer scale), the official MAE fine-tuned models (`models_vit.py`: avg pool +
                `fc_norm`), BEiT-style q/v biases.
  hf_vit        Hugging Face transformers' ViTModel / ViTForImageClassification.
  mae_pretrain  the official MAE pretraining model (facebookresearch/mae `models_mae.py`),
                decoder included: a jkd `MAE` with `cls_token=True`, `posemb='sincos2d_mae'`.
  simmim        the official SimMIM ViT (microsoft/SimMIM `models/simmim.py` +
                `vision_transformer.py`, BEiT's ViT): a jkd `SimMIM` with a class token, layer
                scale and a shared (or per-block) relative position bias, 1x1-conv decoder.
  big_vision    big_vision's `vit.py` (`.npz`, keys joined with '/', scanned or not).

Every converter returns flat '/'-joined jkd parameter paths. The tensors' own conventions are
translated exactly: torch Linear (out, in) -> Dense (in, out); the fused qkv (3D, D) -> query,
key, value (D, H, D/H); the attention projection (D, D) -> (H, D/H, D); Conv2d (O, I, kh, kw) ->
(kh, kw, I, O); a position embedding's class-token entry is added to the (constant) class token,
since jkd's position table covers the patches only; PixelShuffle's channel order
(c, i, j) -> patchify's (i, j, c).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from jkd import models
from jkd.errors import UserError
from jkd.models import vit as vit_lib


@dataclasses.dataclass
class Converted:
  """A checkpoint translated into a jkd model.

  Attributes:
    layout: which codebase's layout it was (see the module docstring).
    method: 'mae' / 'simmim' for a MIM pretraining model (with its decoder), else None.
    model: the jkd model config {'name': a registered model, ...field overrides}.
    params: flat jkd param path ('encoder/block0/attn/query/kernel') -> array.
    model_state: flat path -> array of other collections (BatchNorm statistics).
    image_size: the image side the checkpoint's position table was made for (None: any).
    channels: input channels.
    num_classes: classes of its head (0: none).
    used: the source tensors that were mapped (the rest are reported as dropped).
    notes: what the translation did beyond renaming (one line each).
  """
  layout: str
  method: str | None
  model: dict
  params: dict
  model_state: dict
  image_size: int | None
  channels: int
  num_classes: int
  used: set
  notes: list


def _t(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).T)


def _conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d (O, I, kh, kw) -> flax (kh, kw, I, O)."""
  return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


# The last source tensor a converter read: named when a translation fails on a shape.
_LAST_READ: list = [None]


class _Tensors:
  """The source tensors, recording which were used."""

  def __init__(self, tensors: dict):
    self.all, self.used = tensors, set()

  def __contains__(self, name):
    return name in self.all

  def __getitem__(self, name) -> np.ndarray:
    if name not in self.all:
      raise UserError(f'the checkpoint lacks the tensor {name!r} its layout needs: it is '
                      'incomplete, or another architecture.')
    self.used.add(name)
    _LAST_READ[0] = (name, tuple(np.shape(self.all[name])))
    return np.asarray(self.all[name])

  def take(self, name, ndim: int) -> np.ndarray:
    """The tensor `name`, which must have `ndim` dimensions (a Linear weight 2, a bias 1, a
    conv weight 4...)."""
    value = self[name]
    if value.ndim != ndim:
      raise UserError(f'The checkpoint\'s tensor {name!r} has shape {tuple(value.shape)}, but '
                      f'its layout needs a {ndim}-D tensor there: the file is damaged or another '
                      'architecture.')
    return value

  def dim(self, name, axis: int, ndim: int) -> int:
    """One size of the tensor `name` (checked to have `ndim` dims), without marking it used."""
    if name not in self.all:
      raise UserError(f'the checkpoint lacks the tensor {name!r} its layout needs: it is '
                      'incomplete, or another architecture.')
    shape = tuple(np.shape(self.all[name]))
    if len(shape) != ndim:
      raise UserError(f'The checkpoint\'s tensor {name!r} has shape {shape}, but its layout '
                      f'needs a {ndim}-D tensor there: the file is damaged or another '
                      'architecture.')
    return int(shape[axis])

  def get(self, name):
    return self[name] if name in self.all else None


def translate(layout: str, converter: Callable, tensors: dict, given: dict) -> 'Converted':
  """`converter(tensors, given)`, with a shape the translation cannot use (a 1-D weight where
  a matrix belongs, a qkv that does not split) turned into a UserError naming the tensor."""
  _LAST_READ[0] = None
  try:
    return converter(tensors, given)
  except UserError:
    raise
  except (IndexError, ValueError, TypeError, ZeroDivisionError, KeyError) as e:
    last = _LAST_READ[0]
    where = f' at the tensor {last[0]!r} of shape {last[1]}' if last else ''
    raise UserError(f'The checkpoint\'s tensors do not fit the {layout} layout{where} '
                    f'({type(e).__name__}: {str(e)[:200]}): the file is damaged or another '
                    'architecture. Nothing was written.') from None


# ---------------------------------------------------------------- model configs


def model_config(*, patch: int, width: int, depth: int, mlp_dim: int, num_heads: int | None,
                 given: dict, **fields) -> dict:
  """The jkd model config for a ViT of these sizes: a registered name where one matches
  (`given['name']` if the user named one), else 'vit_b16' with the sizes as overrides. The
  head count is not in the tensors' shapes: `given` (the user's --config.model.num_heads or
  --model), else the registered model's, else width / 64 (the ViT family's convention)."""
  given = dict(given)
  name = given.pop('name', None)
  sizes = {'patch_size': patch, 'width': width, 'depth': depth}
  if name is not None and _vit_sizes(name) not in (None, (patch, width, depth, mlp_dim)):
    raise UserError(
        f'--model {name} is a ViT of patch, width, depth, MLP width {_vit_sizes(name)}, but the '
        f'checkpoint\'s are {(patch, width, depth, mlp_dim)}: drop --model (jkd reads the sizes '
        'from the tensors) or name a model of these sizes.')
  if name is not None and _vit_sizes(name) is None and name in models.names():
    raise UserError(f'--model {name} is not a ViT, but the checkpoint holds one.')
  if name is None:
    name = next((n for n in models.names() if _vit_sizes(n) == (patch, width, depth, mlp_dim)),
                None)
  heads = given.pop('num_heads', None) or num_heads
  if name is not None and heads is None:
    heads = models.field_default(name, 'num_heads') if _vit_sizes(name) else None
  if heads is None:
    if width % 64:
      raise UserError(f'The checkpoint is a ViT of width {width}, whose head count its tensors '
                      'do not say: pass --config.model.num_heads=H (or --model NAME).')
    heads = width // 64
  cfg = {'name': name or 'vit_b16'}
  overrides = {**sizes, 'mlp_dim': mlp_dim, 'num_heads': heads, **fields, **given}
  for field, value in overrides.items():
    default = _default(cfg['name'], field)
    if default != value or field in given:
      cfg[field] = value
  return cfg


def _default(name: str, field: str):
  try:
    value = models.field_default(name, field)
  except KeyError:
    return None
  if field == 'mlp_dim' and value is None:
    return 4 * models.field_default(name, 'width')
  return value


def _vit_sizes(name: str):
  try:
    return (models.field_default(name, 'patch_size'), models.field_default(name, 'width'),
            models.field_default(name, 'depth'), _default(name, 'mlp_dim'))
  except KeyError:
    return None


# ---------------------------------------------------------------- shared pieces


def _grid_of(n: int) -> int:
  side = math.isqrt(n)
  if side * side != n:
    raise UserError(f'a position embedding of {n} patches is not a square grid: jkd imports '
                    'square ViT position tables only.')
  return side


def _attention(t: _Tensors, out: dict, dst: str, heads: int, *, qkv: str, proj: str,
               q_bias: str | None = None, v_bias: str | None = None) -> None:
  """torch fused qkv (3D, D) [+ bias (3D,) or q/v biases] and proj (D, D) -> jkd Attention."""
  w = t.take(f'{qkv}.weight', 2)
  d = w.shape[1]
  if w.shape[0] != 3 * d:
    raise UserError(f'The checkpoint\'s tensor {qkv + ".weight"!r} has shape {tuple(w.shape)}, '
                    f'but a fused q, k, v weight of width {d} is ({3 * d}, {d}): the file is '
                    'damaged or another architecture.')
  hd = w.shape[0] // 3 // heads
  if w.shape[0] % (3 * heads):
    raise UserError(f'{qkv}.weight {w.shape} does not split into q, k, v of {heads} heads: '
                    'check --config.model.num_heads.')
  bias = t.take(f'{qkv}.bias', 1) if f'{qkv}.bias' in t else None
  if bias is None and q_bias and q_bias in t:  # BEiT / SimMIM: q and v biases, k has none.
    bias = np.concatenate([t[q_bias], np.zeros_like(t[q_bias]), t[v_bias]])
  for i, name in enumerate(('query', 'key', 'value')):
    out[f'{dst}/{name}/kernel'] = _t(w[i * d:(i + 1) * d]).reshape(d, heads, hd)
    b = np.zeros(heads * hd, w.dtype) if bias is None else bias[i * d:(i + 1) * d]
    out[f'{dst}/{name}/bias'] = np.asarray(b).reshape(heads, hd)
  out[f'{dst}/out/kernel'] = _t(t.take(f'{proj}.weight', 2)).reshape(heads, hd, -1)
  out[f'{dst}/out/bias'] = t.take(f'{proj}.bias', 1)


def _norm(t: _Tensors, out: dict, src: str, dst: str, weight='weight', bias='bias') -> None:
  out[f'{dst}/scale'] = t.take(f'{src}.{weight}', 1)
  out[f'{dst}/bias'] = t.take(f'{src}.{bias}', 1)


def _dense(t: _Tensors, out: dict, src: str, dst: str) -> None:
  out[f'{dst}/kernel'] = _t(t.take(f'{src}.weight', 2))
  out[f'{dst}/bias'] = t.take(f'{src}.bias', 1)


def _timm_block(t: _Tensors, out: dict, src: str, dst: str, heads: int) -> None:
  """One timm / BEiT / MAE transformer block -> jkd Encoder1DBlock."""
  _norm(t, out, f'{src}.norm1', f'{dst}/ln1')
  _attention(t, out, f'{dst}/attn', heads, qkv=f'{src}.attn.qkv', proj=f'{src}.attn.proj',
             q_bias=f'{src}.attn.q_bias', v_bias=f'{src}.attn.v_bias')
  _norm(t, out, f'{src}.norm2', f'{dst}/ln2')
  _dense(t, out, f'{src}.mlp.fc1', f'{dst}/mlp/fc1')
  _dense(t, out, f'{src}.mlp.fc2', f'{dst}/mlp/fc2')
  for jkd_name, names in (('ls1', ('ls1.gamma', 'gamma_1')), ('ls2', ('ls2.gamma', 'gamma_2'))):
    for name in names:
      if f'{src}.{name}' in t:
        out[f'{dst}/{jkd_name}'] = t[f'{src}.{name}']
  table = f'{src}.attn.relative_position_bias_table'
  if table in t:
    out[f'{dst}/rel_pos_bias/relative_position_bias_table'] = t[table]
    t.get(f'{src}.attn.relative_position_index')  # Recomputed by jkd: used, not copied.


def _count(t: dict, pattern: str) -> int:
  found = {int(m.group(1)) for k in t for m in [re.match(pattern, k)] if m}
  return max(found) + 1 if found else 0


def _unsupported(t: dict, names: tuple[str, ...], what: str) -> None:
  hits = [k for k in t if any(n in k for n in names)]
  if hits:
    raise UserError(f'The checkpoint uses {what} ({hits[0]}), which jkd\'s ViT does not have.')


# ---------------------------------------------------------------- timm (and MAE fine-tuned)


def _timm_vit(tensors: dict, given: dict) -> Converted:
  _unsupported(tensors, ('reg_token', 'attn.q_norm', 'attn.k_norm', 'attn_pool'),
               'register tokens, q/k norms or attention pooling')
  t = _Tensors(tensors)
  w = t.take('patch_embed.proj.weight', 4)
  width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
  depth = _count(tensors, r'blocks\.(\d+)\.')
  has_cls, has_dist = 'cls_token' in t, 'dist_token' in t
  fc_norm = 'fc_norm.weight' in t
  layer_scale = 'blocks.0.ls1.gamma' in t or 'blocks.0.gamma_1' in t
  classes = t.dim('head.weight', 0, 2) if 'head.weight' in t else 0
  pool = 'gap' if (fc_norm or not has_cls) else 'token'
  fields = {'pool': pool, 'posemb': 'learn', 'class_token': has_cls if pool == 'gap' else None,
            'fc_norm': fc_norm, 'distill_token': has_dist,
            # Only an initial value (the checkpoint's scales are loaded): DeiT III's.
            'layer_scale': 1e-6 if layer_scale else 0.}
  fields = {k: v for k, v in fields.items() if v is not None}
  cfg = model_config(patch=patch, width=width, depth=depth,
                     mlp_dim=t.dim('blocks.0.mlp.fc1.weight', 0, 2), num_heads=None,
                     given=given, **fields)
  heads = cfg.get('num_heads') or models.field_default(cfg['name'], 'num_heads')
  out, notes = {}, []
  out['patch_embed/proj/kernel'] = _conv(w)
  out['patch_embed/proj/bias'] = t['patch_embed.proj.bias']
  prefix = int(has_cls) + int(has_dist)
  pos = t.take('pos_embed', 3)
  # timm's no_embed_class (DeiT III): the table covers the patches only. A square count tells
  # which (N + 1 and N + 2 are never both squares with N).
  if prefix and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
    prefix_pos = 0
    notes.append('position table over the patches only (timm no_embed_class)')
  else:
    prefix_pos = prefix
  n_patches = pos.shape[1] - prefix_pos
  out['pos_embedding'] = pos[:, prefix_pos:]
  tokens = [('cls', 'cls_token')] * has_cls + [('dist_token', 'dist_token')] * has_dist
  for i, (dst, src) in enumerate(tokens):
    out[dst] = t.take(src, 3) + (pos[0, i][None, None] if prefix_pos else 0)
  if tokens and prefix_pos:
    notes.append('position entries of the class/distillation tokens folded into the tokens')
  for i in range(depth):
    _timm_block(t, out, f'blocks.{i}', f'encoder/block{i}', heads)
  if fc_norm:
    _norm(t, out, 'fc_norm', 'fc_norm')
  else:
    _norm(t, out, 'norm', 'encoder/encoder_norm')
  for src, dst in (('head', 'head'), ('head_dist', 'head_dist')):
    if f'{src}.weight' in t:
      _dense(t, out, src, dst)
  return Converted('timm_vit', None, cfg, out, {}, _grid_of(n_patches) * patch, channels,
                   classes, t.used, notes)


# ---------------------------------------------------------------- Hugging Face ViT


# Hub files keep transformers' old ViT names; transformers >= 5 saves these (its own renaming,
# `conversion_mapping.py` "ViTModel"), applied in this order.
_HF_RENAMES = ((r'encoder\.layer\.', 'layers.'), (r'attention\.attention\.query', 'attention.q_proj'),
               (r'attention\.attention\.key', 'attention.k_proj'),
               (r'attention\.attention\.value', 'attention.v_proj'),
               (r'attention\.output\.dense', 'attention.o_proj'),
               (r'intermediate\.dense', 'mlp.fc1'), (r'\.output\.dense', '.mlp.fc2'))


def _hf_vit(tensors: dict, given: dict) -> Converted:
  renamed = {}
  for name, value in tensors.items():
    new = name
    for pattern, repl in _HF_RENAMES:
      new = re.sub(pattern, repl, new)
    renamed[new] = (name, value)
  t = _Tensors({k: v for k, (_, v) in renamed.items()})
  base = 'vit.' if 'vit.embeddings.cls_token' in t else ''
  e = f'{base}embeddings'
  w = t.take(f'{e}.patch_embeddings.projection.weight', 4)
  width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
  L = f'{base}layers'
  depth = _count(t.all, rf'{re.escape(L)}\.(\d+)\.')
  classes = t.dim('classifier.weight', 0, 2) if 'classifier.weight' in t else 0
  cfg = model_config(patch=patch, width=width, depth=depth,
                     mlp_dim=t.dim(f'{L}.0.mlp.fc1.weight', 0, 2),
                     num_heads=None, given=given, pool='token', posemb='learn',
                     norm_eps=float(given.pop('norm_eps', 1e-12)))
  heads = cfg.get('num_heads') or models.field_default(cfg['name'], 'num_heads')
  out = {'patch_embed/proj/kernel': _conv(w),
         'patch_embed/proj/bias': t[f'{e}.patch_embeddings.projection.bias']}
  pos = t.take(f'{e}.position_embeddings', 3)
  out['cls'] = t.take(f'{e}.cls_token', 3) + pos[0, :1][None]
  out['pos_embedding'] = pos[:, 1:]
  for i in range(depth):
    src, dst = f'{L}.{i}', f'encoder/block{i}'
    _norm(t, out, f'{src}.layernorm_before', f'{dst}/ln1')
    for theirs, ours in (('q_proj', 'query'), ('k_proj', 'key'), ('v_proj', 'value')):
      out[f'{dst}/attn/{ours}/kernel'] = _t(t.take(f'{src}.attention.{theirs}.weight',
                                                    2)).reshape(width, heads, -1)
      out[f'{dst}/attn/{ours}/bias'] = t.take(f'{src}.attention.{theirs}.bias', 1).reshape(
          heads, -1)
    out[f'{dst}/attn/out/kernel'] = _t(t.take(f'{src}.attention.o_proj.weight', 2)).reshape(
        heads, -1, width)
    out[f'{dst}/attn/out/bias'] = t.take(f'{src}.attention.o_proj.bias', 1)
    _norm(t, out, f'{src}.layernorm_after', f'{dst}/ln2')
    _dense(t, out, f'{src}.mlp.fc1', f'{dst}/mlp/fc1')
    _dense(t, out, f'{src}.mlp.fc2', f'{dst}/mlp/fc2')
  _norm(t, out, f'{base}layernorm', 'encoder/encoder_norm')
  if classes:
    _dense(t, out, 'classifier', 'head')
  used = {renamed[k][0] for k in t.used}
  return Converted('hf_vit', None, cfg, out, {}, _grid_of(pos.shape[1] - 1) * patch, channels,
                   classes, used, ['position entry of the class token folded into the token',
                                   'LayerNorm epsilon 1e-12 (transformers\' ViTConfig default; '
                                   'set --config.model.norm_eps if the model used another)'])


# ---------------------------------------------------------------- official MAE pretraining


def _matches_table(pos: np.ndarray, grid: int, table: str) -> bool:
  ref = np.asarray(vit_lib.posemb_sincos_2d(grid, grid, pos.shape[-1], table=table))
  return bool(np.allclose(pos, ref, atol=1e-5))


def _fixed_table(pos: np.ndarray, grid: int, what: str) -> str:
  for table in vit_lib.SINCOS_TABLES:
    if _matches_table(pos, grid, table):
      return table
  raise UserError(f'{what} is none of the fixed sin-cos tables jkd knows '
                  f'({", ".join(vit_lib.SINCOS_TABLES)}): not an MAE pretraining checkpoint?')


def _mae_pretrain(tensors: dict, given: dict) -> Converted:
  t = _Tensors(tensors)
  w = t.take('patch_embed.proj.weight', 4)
  width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
  depth = _count(tensors, r'blocks\.(\d+)\.')
  dec_depth = _count(tensors, r'decoder_blocks\.(\d+)\.')
  dec_width = t.dim('decoder_embed.weight', 0, 2)
  pos = t.take('pos_embed', 3)
  grid = _grid_of(pos.shape[1] - 1)
  table = _fixed_table(pos[:, 1:], grid, 'The encoder position table')
  if _fixed_table(t.take('decoder_pos_embed', 3)[:, 1:], grid, 'The decoder position table') != table:
    raise UserError('The encoder and decoder position tables differ: not an MAE checkpoint.')
  dec_heads = given.pop('decoder_heads', None) or (16 if dec_width % 16 == 0 else None)
  if dec_heads is None:
    raise UserError(f'The MAE decoder width {dec_width} has no standard head count: pass '
                    '--config.model.decoder_heads=H.')
  cfg = model_config(patch=patch, width=width, depth=depth,
                     mlp_dim=t.dim('blocks.0.mlp.fc1.weight', 0, 2), num_heads=None,
                     given=given, cls_token=True, posemb=table, decoder_width=dec_width,
                     decoder_depth=dec_depth, decoder_heads=dec_heads,
                     decoder_mlp_dim=t.dim('decoder_blocks.0.mlp.fc1.weight', 0, 2))
  for field in ('pool', 'class_token', 'fc_norm', 'distill_token'):
    cfg.pop(field, None)
  heads = cfg.get('num_heads') or models.field_default(cfg['name'], 'num_heads')
  out = {'patch_embed/proj/kernel': _conv(w), 'patch_embed/proj/bias': t['patch_embed.proj.bias'],
         'cls': t.take('cls_token', 3) + pos[0, :1][None]}
  for i in range(depth):
    _timm_block(t, out, f'blocks.{i}', f'encoder/block{i}', heads)
  _norm(t, out, 'norm', 'encoder/encoder_norm')
  _dense(t, out, 'decoder_embed', 'decoder/embed')
  out['decoder/mask_token'] = t.take('mask_token', 3)
  for i in range(dec_depth):
    _timm_block(t, out, f'decoder_blocks.{i}', f'decoder/blocks/block{i}', dec_heads)
  _norm(t, out, 'decoder_norm', 'decoder/blocks/encoder_norm')
  _dense(t, out, 'decoder_pred', 'decoder/pred')
  if np.any(pos[0, 0]) or np.any(t.all['decoder_pos_embed'][0, 0]):
    raise UserError('The class token has a non-zero fixed position: not an MAE checkpoint.')
  return Converted('mae_pretrain', 'mae', cfg, out, {}, grid * patch, channels, 0, t.used,
                   [f'fixed position tables checked equal to {table!r}'])


# ---------------------------------------------------------------- official SimMIM


def _simmim(tensors: dict, given: dict) -> Converted:
  t = _Tensors(tensors)
  w = t.take('encoder.patch_embed.proj.weight', 4)
  width, channels, patch = w.shape[0], w.shape[1], w.shape[2]
  depth = _count(tensors, r'encoder\.blocks\.(\d+)\.')
  dec = t.take('decoder.0.weight', 4)            # (stride^2 * C, D, 1, 1)
  stride = math.isqrt(dec.shape[0] // channels)
  if stride != patch:
    raise UserError(f'The SimMIM decoder predicts {stride}x{stride} pixels per token but the '
                    f'patches are {patch}x{patch}: jkd\'s SimMIM needs encoder_stride = patch.')
  shared = 'encoder.rel_pos_bias.relative_position_bias_table' in t
  per_block = 'encoder.blocks.0.attn.relative_position_bias_table' in t
  pos = t.get('encoder.pos_embed')
  layer_scale = 'encoder.blocks.0.gamma_1' in t
  fields = {'cls_token': True, 'posemb': 'learn' if pos is not None else 'none',
            'rel_pos_bias': 'shared' if shared else 'block' if per_block else 'none',
            'layer_scale': 0.1 if layer_scale else 0.}
  cfg = model_config(patch=patch, width=width, depth=depth,
                     mlp_dim=t.dim('encoder.blocks.0.mlp.fc1.weight', 0, 2), num_heads=None,
                     given=given, **fields)
  for field in ('pool', 'class_token', 'fc_norm', 'distill_token'):
    cfg.pop(field, None)
  heads = cfg.get('num_heads') or models.field_default(cfg['name'], 'num_heads')
  table_rows = None
  if shared:
    table_rows = t.dim('encoder.rel_pos_bias.relative_position_bias_table', 0, 2)
  elif per_block:
    table_rows = t.dim('encoder.blocks.0.attn.relative_position_bias_table', 0, 2)
  if pos is not None:
    grid = _grid_of(pos.shape[1] - 1)
  elif table_rows is not None:  # (2g - 1)^2 + 3 rows
    grid = (math.isqrt(table_rows - 3) + 1) // 2
  else:
    grid = None
  out = {'patch_embed/proj/kernel': _conv(w),
         'patch_embed/proj/bias': t['encoder.patch_embed.proj.bias'],
         'mask_token': t['encoder.mask_token']}
  cls = t['encoder.cls_token']
  if pos is not None:
    out['pos_embedding'] = pos[:, 1:]
    cls = cls + pos[0, :1][None]
  out['cls'] = cls
  if shared:
    out['encoder/rel_pos_bias/relative_position_bias_table'] = t[
        'encoder.rel_pos_bias.relative_position_bias_table']
    t.get('encoder.rel_pos_bias.relative_position_index')
  for i in range(depth):
    _timm_block(t, out, f'encoder.blocks.{i}', f'encoder/block{i}', heads)
  _norm(t, out, 'encoder.norm', 'encoder/encoder_norm')
  # PixelShuffle reads conv channel c*p*p + i*p + j for pixel (i, j) of channel c; jkd's Dense
  # predicts patchify's (i, j, c) order.
  order = np.arange(patch * patch * channels).reshape(channels, patch, patch)
  order = order.transpose(1, 2, 0).reshape(-1)
  out['decoder/proj/kernel'] = _t(dec[order, :, 0, 0])
  out['decoder/proj/bias'] = t['decoder.0.bias'][order]
  return Converted('simmim', 'simmim', cfg, out, {}, grid * patch if grid else None, channels,
                   0, t.used, ['q/v biases with a zero key bias', 'decoder channels reordered '
                               'from PixelShuffle to patchify order'])


# ---------------------------------------------------------------- big_vision


def _big_vision(tensors: dict, given: dict) -> Converted:
  tensors = {k.replace('params/', '', 1) if k.startswith('params/') else k: v
             for k, v in tensors.items()}
  if 'Transformer/encoderblock/LayerNorm_0/scale' in tensors:  # scan: blocks stacked on axis 0
    stacked = {k: v for k, v in tensors.items() if k.startswith('Transformer/encoderblock/')}
    depth = next(iter(stacked.values())).shape[0]
    tensors = {k: v for k, v in tensors.items() if k not in stacked}
    for k, v in stacked.items():
      for i in range(depth):
        tensors[k.replace('encoderblock/', f'encoderblock_{i}/')] = v[i]
  if 'Transformer/posembed_input/pos_embedding' in tensors:  # pre-2022 checkpoints
    tensors['pos_embedding'] = tensors.pop('Transformer/posembed_input/pos_embedding')
  _unsupported(tensors, ('MAPHead_0', 'pre_logits/'), 'a MAP head or a representation layer')
  t = _Tensors(tensors)
  w = t.take('embedding/kernel', 4)              # (p, p, C, D) already
  patch, channels, width = w.shape[0], w.shape[2], w.shape[3]
  depth = _count(tensors, r'Transformer/encoderblock_(\d+)/')
  b0 = 'Transformer/encoderblock_0'
  q_heads = t.dim(f'{b0}/MultiHeadDotProductAttention_0/query/kernel', 1, 3)
  classes = t.dim('head/kernel', 1, 2) if 'head/kernel' in t else 0
  has_cls = 'cls' in t
  posemb = 'learn' if 'pos_embedding' in t else 'sincos2d_bv'
  cfg = model_config(patch=patch, width=width, depth=depth,
                     mlp_dim=t.dim(f'{b0}/MlpBlock_0/Dense_0/kernel', 1, 2),
                     num_heads=q_heads, given=given, pool='token' if has_cls else 'gap',
                     posemb=posemb, gelu_approximate=True)
  out = {'patch_embed/proj/kernel': w, 'patch_embed/proj/bias': t['embedding/bias']}
  if posemb == 'learn':
    out['pos_embedding'] = t['pos_embedding']
  if has_cls:
    out['cls'] = t['cls']
  for i in range(depth):
    src, dst = f'Transformer/encoderblock_{i}', f'encoder/block{i}'
    for a, b in (('LayerNorm_0', 'ln1'), ('LayerNorm_1', 'ln2')):
      out[f'{dst}/{b}/scale'] = t[f'{src}/{a}/scale']
      out[f'{dst}/{b}/bias'] = t[f'{src}/{a}/bias']
    for name in ('query', 'key', 'value', 'out'):
      for leaf in ('kernel', 'bias'):
        out[f'{dst}/attn/{name}/{leaf}'] = t[
            f'{src}/MultiHeadDotProductAttention_0/{name}/{leaf}']
    for a, b in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      for leaf in ('kernel', 'bias'):
        out[f'{dst}/mlp/{b}/{leaf}'] = t[f'{src}/MlpBlock_0/{a}/{leaf}']
  out['encoder/encoder_norm/scale'] = t['Transformer/encoder_norm/scale']
  out['encoder/encoder_norm/bias'] = t['Transformer/encoder_norm/bias']
  if classes:
    out['head/kernel'] = t['head/kernel']
    out['head/bias'] = t['head/bias']
  n = t.dim('pos_embedding', 1, 3) if posemb == 'learn' else None
  return Converted('big_vision', None, cfg, out, {}, _grid_of(n) * patch if n else None,
                   channels, classes, t.used, ['tanh-approximate GELU, as big_vision'])


# ---------------------------------------------------------------- detection

# layout -> (detector over the tensor names, converter)
LAYOUTS: dict[str, tuple[Callable[[dict], bool], Callable[[dict, dict], Converted]]] = {
    'mae_pretrain': (lambda t: 'decoder_embed.weight' in t and 'mask_token' in t,
                     _mae_pretrain),
    'simmim': (lambda t: 'encoder.patch_embed.proj.weight' in t and 'decoder.0.weight' in t,
               _simmim),
    'timm_vit': (lambda t: 'patch_embed.proj.weight' in t and 'blocks.0.attn.qkv.weight' in t,
                 _timm_vit),
    'hf_vit': (lambda t: any(k.endswith('embeddings.patch_embeddings.projection.weight')
                             for k in t), _hf_vit),
    'big_vision': (lambda t: any(k.endswith('embedding/kernel') for k in t)
                   and any('Transformer/' in k for k in t), _big_vision),
}
