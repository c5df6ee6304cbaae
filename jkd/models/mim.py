"""Masked-image-modeling models: SimMIM and MAE around the ViT encoder of `jkd.models.vit`.

Both keep every ViT-shaped part under the names `ViT` uses, at the top level ('patch_embed',
'pos_embedding' when learned, 'cls' when used, 'encoder'); the MIM-only parts are 'mask_token'
(SimMIM) and 'decoder'. So a pretraining checkpoint fine-tunes as is:

  jkd train --config configs/fashion_mnist/finetune.py --workdir F --config.init_from=W

copies the encoder into a `ViT` with a fresh head (`common.merge_pretrained` walks the ViT's
params, so the decoder and mask token are simply not looked up). Keep the fine-tune ViT's
`posemb` equal to the pretraining one ('sincos2d' for MAE, which has no position param).

  model = create_mim('mae', 'vit_b16')                    # MAE ViT-B/16, decoder 512 x 8
  m = masking.mae_mask(key, B, model.num_patches(224), 0.75)
  pred = model.apply(variables, images, m, train=True)   # (B, 196, 16*16*3) fp32

References:
  * SimMIM: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022,
    https://arxiv.org/abs/2111.09886 (microsoft/SimMIM models/simmim.py).
  * MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377 (facebookresearch/mae models_mae.py).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd import masking
from jkd.errors import UserError
from jkd.models import vit as vit_lib
from jkd.models.layers import logical
from jkd.models.vit import Encoder, PatchEmbed, ViT, position_embedding, posemb_sincos_2d

Dtype = Any

# MAE / SimMIM initialise the mask and class tokens with a small normal.
_token_init = nn.initializers.normal(0.02)
_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def _pad_tokens(x: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array | None]:
  """Pads the token axis to a multiple of `multiple`; returns (tokens, true lengths or None).

  cuDNN's fused attention rejects lengths such as 49 (MAE's kept tokens at 28/4 or 224/16 with
  75% masking); padding plus `seq_lengths` keeps the padding out of every attention row.
  """
  length = x.shape[1]
  padded = -(-length // multiple) * multiple
  if multiple <= 1 or padded == length:
    return x, None
  x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0)))
  return x, jnp.full((x.shape[0],), length, jnp.int32)


class SimMIM(nn.Module):
  """SimMIM with a plain ViT encoder and the one-layer pixel decoder.

  tokens = PatchEmbed(x);  tokens <- (1 - m) * tokens + m * mask_token  (m = 1 on masked patches)
  tokens += pos;  [cls] + tokens;  z = Encoder(tokens)  (all L tokens, final LayerNorm)
  pred = PixelShuffle_p(Dense_{p*p*C}(z without cls))   (SimMIM's 1x1 conv, encoder_stride p)

  The official SimMIM ViT-B (microsoft/SimMIM models/simmim.py, BEiT's ViT) is
  `cls_token=True, posemb='none', rel_pos_bias='shared', layer_scale=0.1`.

  Attributes:
    patch_size, width, depth, num_heads, mlp_dim, dropout, drop_path, dtype, attention: the
      encoder, as `jkd.models.vit.ViT`.
    posemb: 'learn' (param 'pos_embedding', loads into a ViT with posemb='learn'), a fixed
      sin-cos table (`jkd.models.vit.SINCOS_TABLES`) or 'none'.
    channels: image channels C the decoder predicts (3 RGB, 1 grey).
    remat: activation checkpointing of the encoder blocks ('none', 'full', 'dots'; see
      `jkd.models.vit.Encoder`).
    cls_token: a learned class token 'cls' before the patches (dropped before the decoder).
    layer_scale, rel_pos_bias: see `jkd.models.vit.ViT` (BEiT's layer scale and relative
      position bias).
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  dropout: float = 0.
  drop_path: float = 0.
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  posemb: str = 'learn'
  channels: int = 3
  remat: str = 'none'
  cls_token: bool = False
  layer_scale: float = 0.
  rel_pos_bias: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Reconstructs images from a masked view.

    Args:
      images: (B, H, W, C) float, normalised; H, W multiples of `patch_size`.
      mask: (B, H/p, W/p) int or float, 1 = masked, at the model's patch resolution
        (`masking.simmim_mask(..., model_patch_size=p, ...)`).
      train: enables dropout / stochastic depth (needs a 'dropout' rng when they are > 0).

    Returns:
      (B, H, W, C) fp32 predicted (normalised) pixels, everywhere; the loss keeps masked ones.
    """
    b, h, w, c = images.shape
    p = self.patch_size
    grid = (h // p, w // p)
    x = PatchEmbed(p, self.width, self.dtype, name='patch_embed')(images.astype(self.dtype))
    if mask.shape[1:] != grid:
      raise UserError(f'SimMIM mask of shape {mask.shape[1:]} does not match the patch grid '
                      f'{grid}: draw it with model_patch_size={p}.')
    mask_token = self.param('mask_token', logical(_token_init, (None, None, 'embed')),
                            (1, 1, self.width))
    m = mask.reshape(b, -1, 1).astype(self.dtype)
    x = x * (1 - m) + mask_token.astype(self.dtype) * m
    pos = position_embedding(self, self.posemb, grid, self.width)
    if pos is not None:
      x = x + pos.astype(self.dtype)
    if self.cls_token:
      cls = self.param('cls', logical(_token_init, (None, None, 'embed')), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    self.sow('intermediates', 'encoder_input', x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.dropout,
                self.drop_path, self.dtype, self.attention, remat=self.remat,
                layer_scale=self.layer_scale, rel_pos_bias=self.rel_pos_bias,
                class_token=self.cls_token, name='encoder')(
                    x, train=train, grid=grid if self.rel_pos_bias != 'none' else None)
    if self.cls_token:
      x = x[:, 1:]
    return SimMIMDecoder(p, self.channels, name='decoder')(x, grid)


class SimMIMDecoder(nn.Module):
  """Linear per-token prediction of the patch's pixels, then pixel shuffle back to an image.

  Attributes:
    patch_size: p, SimMIM's `encoder_stride`.
    channels: C.
  """
  patch_size: int
  channels: int

  @nn.compact
  def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Args: tokens (B, gh*gw, D); grid (gh, gw). Returns (B, gh*p, gw*p, C) fp32."""
    p, c = self.patch_size, self.channels
    # fp32: a tiny layer whose output is the regression target's scale.
    y = nn.Dense(p * p * c, dtype=jnp.float32, name='proj',
                 kernel_init=logical(_xavier, ('embed', None)),
                 bias_init=logical(_zeros, (None,)))(tokens.astype(jnp.float32))
    return masking.unpatchify(y, p, grid[0], grid[1], c)


class MAE(nn.Module):
  """Masked autoencoder: the encoder sees the visible tokens only, a light decoder the rest.

  enc_in  = gather(PatchEmbed(x) + sincos, ids_keep)              (B, len_keep, D)
  z       = Encoder(enc_in)                                       (no mask tokens: MAE's speed)
  dec_in  = unshuffle([Dense_Dd(z), mask_token x (L - len_keep)], ids_restore) + sincos_Dd
  pred    = Dense_{p*p*C}(LN(Blocks_decoder(dec_in)))             (B, L, p*p*C)

  Attributes:
    patch_size, width, depth, num_heads, mlp_dim, dropout, drop_path, dtype, attention: the
      encoder, as `jkd.models.vit.ViT`.
    posemb: the fixed 2-D sin-cos table of the encoder and the decoder: 'sincos2d_mae' (the
      official MAE's, the default since 2026-12) or 'sincos2d' (jkd's own, which MAE runs made
      before then used; their checkpoints keep it, see `jkd.models.legacy_fields`).
    cls_token: prepend a learned class token 'cls' (the official MAE always has one). Off by
      default: pool-free fine-tuning ('gap') needs none, and the token counts stay
      cuDNN-friendly.
    decoder_width, decoder_depth, decoder_heads: the decoder (MAE ViT-B: 512, 8, 16).
    decoder_mlp_dim: decoder MLP width; None means 4 * decoder_width.
    channels: image channels C the decoder predicts.
    pad_tokens_to: pad the encoder's kept tokens to a multiple of this (true lengths passed to
      the attention); 0 means 8 with attention='cudnn' (which rejects lengths like 49), else 1.
    remat: activation checkpointing of the encoder's and the decoder's blocks ('none', 'full',
      'dots'; see `jkd.models.vit.Encoder`).
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  dropout: float = 0.
  drop_path: float = 0.
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  cls_token: bool = False
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int | None = None
  channels: int = 3
  pad_tokens_to: int = 0
  remat: str = 'none'
  posemb: str = 'sincos2d_mae'

  def num_patches(self, image_size: int) -> int:
    """L for a square image of side `image_size`."""
    return (image_size // self.patch_size)**2

  @nn.compact
  def __call__(self, images: jax.Array, mae_mask: masking.MaeMask, *,
               train: bool = False) -> jax.Array:
    """Predicts every patch from the visible ones.

    Args:
      images: (B, H, W, C) float, normalised; H, W multiples of `patch_size`.
      mae_mask: `masking.mae_mask(key, B, L, ratio)`; only `ids_keep` and `ids_restore` are
        used here (the loss uses `mask`).
      train: enables dropout / stochastic depth.

    Returns:
      (B, L, p*p*C) fp32 predicted patches in `masking.patchify` layout, all L positions.
    """
    b, h, w, c = images.shape
    grid = (h // self.patch_size, w // self.patch_size)
    x = PatchEmbed(self.patch_size, self.width, self.dtype, name='patch_embed')(
        images.astype(self.dtype))
    if mae_mask.ids_restore.shape[1] != x.shape[1]:
      raise UserError(f'MAE mask over {mae_mask.ids_restore.shape[1]} patches, but the images '
                      f'have {x.shape[1]}: draw it with num_patches={x.shape[1]}.')
    if self.posemb not in vit_lib.SINCOS_TABLES:
      raise UserError(f'MAE uses a fixed sin-cos position table: posemb={self.posemb!r} is not '
                      f'one of {", ".join(vit_lib.SINCOS_TABLES)}.')
    x = x + posemb_sincos_2d(*grid, self.width, table=self.posemb).astype(self.dtype)
    x = masking.gather_tokens(x, mae_mask.ids_keep)
    if self.cls_token:
      # MAE's class token has a zero position embedding, so nothing is added to it.
      cls = self.param('cls', logical(_token_init, (None, None, 'embed')), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], 1)
    self.sow('intermediates', 'encoder_input', x)
    length = x.shape[1]
    multiple = self.pad_tokens_to or (8 if self.attention == 'cudnn' else 1)
    x, seq_lengths = _pad_tokens(x, multiple)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.dropout,
                self.drop_path, self.dtype, self.attention, remat=self.remat, name='encoder')(
                    x, train=train, seq_lengths=seq_lengths)
    x = x[:, :length]
    return MAEDecoder(self.patch_size, self.channels, self.decoder_width, self.decoder_depth,
                      self.decoder_heads, self.decoder_mlp_dim, self.dtype, self.attention,
                      self.cls_token, self.remat, self.posemb, name='decoder')(
                          x, mae_mask.ids_restore, grid, train=train)


class MAEDecoder(nn.Module):
  """MAE's decoder: embed, append mask tokens, unshuffle, sin-cos, blocks, norm, predict.

  Attributes:
    patch_size, channels: what each token predicts (p*p*C values).
    width, depth, num_heads, mlp_dim: the decoder transformer.
    dtype, attention: as the encoder.
    has_cls: the encoder output starts with a class token (kept through the blocks, dropped
      before the prediction, as MAE).
    remat: activation checkpointing of the blocks (see `jkd.models.vit.Encoder`).
    posemb: the fixed sin-cos table (as `MAE.posemb`).
  """
  patch_size: int
  channels: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: int | None = None
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  has_cls: bool = False
  remat: str = 'none'
  posemb: str = 'sincos2d_mae'

  @nn.compact
  def __call__(self, x: jax.Array, ids_restore: jax.Array, grid: tuple[int, int], *,
               train: bool) -> jax.Array:
    """Args: x (B, [1 +] len_keep, D) encoder output; ids_restore (B, L). Returns (B, L, p*p*C)."""
    b, total = ids_restore.shape
    # The decoder's width plays the part of 'embed' in its blocks; label it so throughout.
    x = nn.Dense(self.width, dtype=self.dtype, name='embed',
                 kernel_init=logical(_xavier, (None, 'embed')),
                 bias_init=logical(_zeros, ('embed',)))(x)
    cls, x = (x[:, :1], x[:, 1:]) if self.has_cls else (None, x)
    mask_token = self.param('mask_token', logical(_token_init, (None, None, 'embed')),
                            (1, 1, self.width))
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, total - x.shape[1], self.width))
    x = masking.unshuffle_tokens(jnp.concatenate([x, fill], axis=1), ids_restore)
    x = x + posemb_sincos_2d(*grid, self.width, table=self.posemb).astype(x.dtype)
    if cls is not None:
      x = jnp.concatenate([cls, x], axis=1)
    # The decoder sees all L (+1) tokens; pad for cuDNN like the encoder.
    length = x.shape[1]
    x, seq_lengths = _pad_tokens(x, 8 if self.attention == 'cudnn' else 1)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, 0., 0., self.dtype,
                self.attention, remat=self.remat, name='blocks')(
                    x, train=train, seq_lengths=seq_lengths)
    x = x[:, :length]
    if cls is not None:
      x = x[:, 1:]
    p = self.patch_size
    return nn.Dense(p * p * self.channels, dtype=jnp.float32, name='pred',
                    kernel_init=logical(_xavier, ('embed', None)),
                    bias_init=logical(_zeros, (None,)))(x.astype(jnp.float32))


METHODS = {'simmim': SimMIM, 'mae': MAE}
# The ViT fields a MIM model copies from a registered encoder.
_ENCODER_FIELDS = ('patch_size', 'width', 'depth', 'num_heads', 'mlp_dim', 'dropout',
                   'drop_path', 'dtype', 'attention', 'remat')


def create_mim(method: str, encoder_name: str, **overrides) -> nn.Module:
  """Builds a SimMIM or MAE model around a registered ViT's encoder.

  Args:
    method: 'simmim' or 'mae'.
    encoder_name: a ViT in `jkd.models.names()`, e.g. 'vit_mini_p4', 'vit_b16'.
    **overrides: fields of the MIM class (`SimMIM` or `MAE`), e.g. dtype=jnp.bfloat16,
      channels=1, decoder_width=256, drop_path=0.1. `num_classes` is accepted and ignored
      (MIM models have no head), so a classifier's model config can be reused.

  Returns:
    An unbound Flax module whose encoder parameters load into
    `jkd.models.create(encoder_name, ...)`.

  Raises:
    UserError: unknown method, an encoder that is not a ViT, or an unknown field.
  """
  from jkd import models  # The registry imports model modules; import it lazily.
  if method not in METHODS:
    raise UserError(f'unknown MIM method {method!r}; use one of {", ".join(sorted(METHODS))}.')
  cls = METHODS[method]
  vit = models.create(encoder_name)
  if not isinstance(vit, ViT):
    raise UserError(f'MIM pretraining needs a ViT encoder; {encoder_name!r} is a '
                    f'{type(vit).__name__}.')
  overrides = {k: v for k, v in overrides.items() if k != 'num_classes'}
  valid = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name'))
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise UserError(f'{method} model has no field(s) {", ".join(unknown)}; '
                    f'valid fields: {", ".join(valid)}.')
  return cls(**{**{f: getattr(vit, f) for f in _ENCODER_FIELDS}, **overrides})


def posemb_of(model_cfg, method: str | None = None) -> str | None:
  """The position embedding a model config gives ('learn', a sin-cos table, 'none'), its
  default included; `method` 'mae' / 'simmim' for a MIM model's; None for models without."""
  if model_cfg.get('posemb'):
    return model_cfg['posemb']
  if method in METHODS:
    field = next((f for f in dataclasses.fields(METHODS[method]) if f.name == 'posemb'), None)
    return field.default if field else None
  from jkd import models  # The registry imports model modules; import it lazily.
  try:
    return models.field_default(model_cfg['name'], 'posemb')
  except (KeyError, UserError):
    return None
