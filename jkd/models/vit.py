"""Vision Transformer (Dosovitskiy et al. 2021), laid out for MIM pretraining and distillation.

Parameters are fp32 and carry logical axis names; `dtype` is the compute dtype. Intermediate
features are sown into the 'intermediates' collection; apply with `mutable=['intermediates']`
to read them (see `ViT`). The pretraining code reuses the parts by name: `patch_embed`,
`pos_embedding`, `cls`, `encoder`, `head`, and the method `ViT.embed`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkd.errors import UserError
from jkd.models.layers import DropPath, logical

Dtype = Any

# timm / MAE use eps 1e-6; matching it keeps PyTorch checkpoint imports exact.
LN_EPS = 1e-6
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', None)
# Activation checkpointing of each transformer block (`jax.checkpoint` through `nn.remat`):
# what a block keeps for the backward pass; the rest is recomputed there.
REMAT_POLICIES = {
    'none': None,  # no remat: everything autodiff saves (see jkd.memory.vit_activation_bytes)
    'full': jax.checkpoint_policies.nothing_saveable,  # only the block's input
    # The outputs of the weight matmuls (q, k, v, attention out, fc1, fc2); attention
    # probabilities, LayerNorms and GELU are recomputed: less memory, little extra compute.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


class AttentionConfigError(UserError, ValueError):
  """An attention implementation that cannot run with the chosen settings."""


# The fixed 2-D sin-cos position tables, by `posemb` name. Each is [sin, cos] of positions times
# frequencies omega_k = temperature^(-k / denominator), k < width/4, for the first coordinate's
# half of the channels, then the same for the other coordinate:
#   'sincos2d'      jkd's own (every jkd run before 2026-12): rows (y) first, denominator
#                   width/4 - 1 (big_vision's frequencies).
#   'sincos2d_mae'  official MAE (facebookresearch/mae util/pos_embed.py, also its decoder):
#                   columns (x) first, denominator width/4.
#   'sincos2d_bv'   big_vision's `posemb_sincos_2d` (MoCo v3): columns first, width/4 - 1.
SINCOS_TABLES = {'sincos2d': ('y', 1), 'sincos2d_mae': ('x', 0), 'sincos2d_bv': ('x', 1)}
POSEMBS = ('learn', *SINCOS_TABLES, 'none')


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32, table: str = 'sincos2d') -> jax.Array:
  """A fixed 2-D sin-cos position embedding (see `SINCOS_TABLES` for which is whose).

  Args:
    h: grid height in patches.
    w: grid width in patches.
    width: embedding width; must be divisible by 4.
    temperature: the base of the frequencies.
    dtype: output dtype.
    table: 'sincos2d' (jkd's), 'sincos2d_mae' (official MAE) or 'sincos2d_bv' (big_vision).

  Returns:
    (1, h*w, width) array, rows in raster order (row-major over the grid).
  """
  if width % 4:
    raise UserError(f'{table} position embedding needs a width divisible by 4, got {width}: '
                    "choose another width or posemb='learn'.")
  first, offset = SINCOS_TABLES[table]
  y, x = np.mgrid[:h, :w]
  quarter = width // 4
  omega = np.arange(quarter) / max(quarter - offset, 1)
  omega = 1. / (temperature**omega)
  y = np.einsum('n,d->nd', y.reshape(-1), omega)
  x = np.einsum('n,d->nd', x.reshape(-1), omega)
  halves = [np.sin(y), np.cos(y), np.sin(x), np.cos(x)]
  pe = np.concatenate(halves if first == 'y' else halves[2:] + halves[:2], axis=1)
  return jnp.asarray(pe, dtype)[None]


def position_embedding(module: nn.Module, kind: str, grid: tuple[int, int], width: int):
  """(1, gh*gw, D) fp32 position embedding of `module`'s patches, or None for posemb 'none':
  the param 'pos_embedding' when learned, else the fixed table named `kind`."""
  if kind not in POSEMBS:
    raise UserError(f'unknown posemb {kind!r}: use one of {", ".join(POSEMBS)}.')
  if kind == 'learn':
    return module.param('pos_embedding',
                        logical(nn.initializers.normal(0.02), (None, 'pos', 'embed')),
                        (1, grid[0] * grid[1], width))
  if kind == 'none':
    return None
  return posemb_sincos_2d(grid[0], grid[1], width, table=kind)


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """BEiT's index into a relative position bias table, for a class token then gh*gw patches.

  Returns (L, L) int with L = 1 + gh*gw: patch pairs index their (dy, dx) offset among
  (2gh-1)(2gw-1) entries; the last three entries are patch->class, class->patch and
  class->class. The table therefore has (2gh-1)(2gw-1) + 3 rows (microsoft/unilm beit, as
  SimMIM's models/vision_transformer.py).
  """
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += gh - 1
  rel[:, :, 1] += gw - 1
  rel[:, :, 0] *= 2 * gw - 1
  size = (2 * gh - 1) * (2 * gw - 1) + 3
  index = np.zeros((gh * gw + 1,) * 2, np.int32)
  index[1:, 1:] = rel.sum(-1)
  index[0, 0:] = size - 3
  index[0:, 0] = size - 2
  index[0, 0] = size - 1
  return index


class RelativePositionBias(nn.Module):
  """A learned bias on the attention logits per head and relative patch offset (BEiT, SimMIM's
  ViT). Param 'relative_position_bias_table' ((2gh-1)(2gw-1) + 3, H), zero-initialised.

  Attributes:
    grid: the patch grid (gh, gw).
    num_heads: H.
    class_token: whether the sequence starts with a class token (else its rows are dropped).
  """
  grid: tuple[int, int]
  num_heads: int
  class_token: bool = True

  @nn.compact
  def __call__(self) -> jax.Array:
    """Returns the bias (H, L, L) fp32, L = [1 +] gh*gw."""
    gh, gw = self.grid
    table = self.param('relative_position_bias_table', logical(_zeros, (None, 'heads')),
                       ((2 * gh - 1) * (2 * gw - 1) + 3, self.num_heads))
    index = relative_position_index(self.grid)
    if not self.class_token:
      index = index[1:, 1:]
    return jnp.transpose(table[index], (2, 0, 1))


class PatchEmbed(nn.Module):
  """Non-overlapping patches to tokens by a strided convolution.

  Attributes:
    patch_size: patch side p in pixels.
    width: token width D.
    dtype: compute dtype.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Args: images (B, H, W, C). Returns tokens (B, (H/p)*(W/p), D), raster order."""
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise UserError(f'image size {images.shape[1:3]} is not divisible by the patch size {p}: '
                      'resize the images or pick a model with another patch size.')
    # Input channels (3 for RGB) are too few to shard: leave that axis unnamed.
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')),
                bias_init=logical(_zeros, ('embed',)), name='proj')(images)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)


class Attention(nn.Module):
  """Multi-head self-attention with a switchable kernel.

  Without a mutable 'intermediates' collection the product runs through
  `jax.nn.dot_product_attention(implementation=...)` (the fast path; 'cudnn' is the fused
  flash kernel on NVIDIA GPUs). When 'intermediates' is mutable and `sow_maps` is set, the
  attention is computed explicitly instead so that it can be sown for distillation: 'attn'
  (B, H, L, L) fp32 rows summing to 1, and 'q', 'k', 'v' each (B, H, L, d) in `dtype`. A
  fused kernel never materialises the maps, so a trainer that taps only block outputs sets
  `sow_maps=False` and keeps the fast path.

  Attributes:
    num_heads: H; the token width must be divisible by it unless `head_dim` is given.
    dtype: compute dtype. cuDNN needs bf16 or fp16.
    implementation: 'xla', 'cudnn' or None (jax chooses).
    sow_maps: sow the maps (explicit attention) when 'intermediates' is mutable.
    head_dim: d, the channels of each head; None = width / H. A head-pruned model keeps its
      heads' d with fewer heads (`jkd.compress.channel_pruning`), so H·d < width there.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = 'xla'
  sow_maps: bool = True
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, seq_lengths: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """Self-attention over the tokens.

    Args:
      x: tokens (B, L, D).
      seq_lengths: optional (B,) int true lengths; tokens at or past the length are padding,
        never attended to, and their outputs are zero.
      bias: optional (H, L, L) fp32 added to the attention logits (a relative position bias).

    Returns:
      (B, L, D) in `dtype`.
    """
    d_model = x.shape[-1]
    if self.head_dim is None and d_model % self.num_heads:
      raise UserError(f'width {d_model} is not divisible by num_heads {self.num_heads}.')
    head_dim = self.head_dim or d_model // self.num_heads
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise AttentionConfigError(
          f'unknown attention implementation {self.implementation!r}; '
          f'use one of {ATTENTION_IMPLEMENTATIONS}.')

    def proj(name):
      return nn.DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype, name=name,
          kernel_init=logical(_xavier, ('embed', 'heads', 'kv')),
          bias_init=logical(_zeros, ('heads', 'kv')))(x)

    q, k, v = proj('query'), proj('key'), proj('value')  # (B, L, H, d) each.
    if seq_lengths is not None:
      seq_lengths = jnp.asarray(seq_lengths, jnp.int32)

    if self.sow_maps and self.is_mutable_collection('intermediates'):
      out = self._explicit(q, k, v, seq_lengths, bias)
    else:
      if self.implementation == 'cudnn' and jnp.dtype(q.dtype) not in (
          jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise AttentionConfigError(
            f"attention='cudnn' needs bf16 or fp16 compute, but dtype is {jnp.dtype(q.dtype)}: "
            "pass dtype=jnp.bfloat16 or use attention='xla'.")
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias[None].astype(q.dtype),
          implementation=self.implementation,
          query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths)

    return nn.DenseGeneral(
        d_model, axis=(-2, -1), dtype=self.dtype, name='out',
        kernel_init=logical(_xavier, ('heads', 'kv', 'embed')),
        bias_init=logical(_zeros, ('embed',)))(out)

  def _explicit(self, q, k, v, seq_lengths, bias=None):
    """Reference attention, the same recipe as jax's 'xla' path; sows probs and q, k, v."""
    head_dim = q.shape[-1]
    # fp32 logits and softmax whatever the compute dtype, as jax.nn.dot_product_attention does.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(1. / np.sqrt(head_dim))
    if bias is not None:
      logits = logits + bias[None].astype(jnp.float32)
    if seq_lengths is not None:
      valid = jnp.arange(q.shape[1])[None, :] < seq_lengths[:, None]  # (B, L)
      mask = valid[:, None, :, None] & valid[:, None, None, :]
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min * 0.7)
    probs = jax.nn.softmax(logits, axis=-1)
    self.sow('intermediates', 'attn', probs)
    for name, t in (('q', q), ('k', k), ('v', v)):
      self.sow('intermediates', name, t.transpose(0, 2, 1, 3))
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    if seq_lengths is not None:
      out = out * valid[:, :, None, None].astype(out.dtype)
    return out


class MlpBlock(nn.Module):
  """Transformer MLP: Dense(mlp_dim) -> GELU -> Dropout -> Dense(D) -> Dropout.

  Attributes:
    mlp_dim: hidden width.
    dtype: compute dtype.
    dropout: dropout rate after each dense layer.
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Args: x (B, L, D). Returns (B, L, D)."""
    d_model = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name='fc1',
                 kernel_init=logical(_xavier, ('embed', 'mlp')),
                 bias_init=logical(_zeros, ('mlp',)))(x)
    # Exact (erf) GELU, as timm and PyTorch use: imported checkpoints then give the same outputs.
    # big_vision's ViTs use the tanh approximation (`gelu_approximate`).
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Dense(d_model, dtype=self.dtype, name='fc2',
                 kernel_init=logical(_xavier, ('mlp', 'embed')),
                 bias_init=logical(_zeros, ('embed',)))(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


def _layer_norm(name: str, dtype: Dtype, eps: float = LN_EPS) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=logical(nn.initializers.ones, ('embed',)),
                      bias_init=logical(_zeros, ('embed',)))


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).

  With layer scale (CaiT, DeiT III, BEiT) each branch is multiplied by a learned per-channel
  scale first: x + ls1 * attn(ln1(x)), x + ls2 * mlp(ln2(x)). Sows 'intermediates' 'out'
  (B, L, D): the block's output. The attention's maps are under its submodule 'attn'.

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dropout: dropout rate (attention output and MLP).
    drop_path: stochastic-depth rate of both residual branches.
    dtype: compute dtype.
    attention: attention implementation, see `Attention`.
    sow_attention: sow the attention maps, see `Attention.sow_maps`.
    layer_scale: initial value of the params 'ls1', 'ls2' (D,); 0 = no layer scale.
    gelu_approximate: see `MlpBlock`.
    rel_pos_grid: the patch grid of this block's own relative position bias table (BEiT's
      per-block 'rel_pos_bias'), or None.
    class_token: the tokens start with a class token (for the relative position bias).
    norm_eps: the LayerNorms' epsilon (timm 1e-6; Hugging Face ViT 1e-12).
    head_dim: channels per head, see `Attention`.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.
  drop_path: float = 0.
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  sow_attention: bool = True
  layer_scale: float = 0.
  gelu_approximate: bool = False
  rel_pos_grid: tuple[int, int] | None = None
  class_token: bool = True
  norm_eps: float = LN_EPS
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, seq_lengths: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """Args: x (B, L, D); seq_lengths optional (B,) int; bias optional (H, L, L) on the
    attention logits. Returns (B, L, D).

    `train` may be positional: `nn.remat` needs it so (static_argnums), as `Encoder` calls it.
    """
    if self.rel_pos_grid is not None:
      own = RelativePositionBias(tuple(self.rel_pos_grid), self.num_heads, self.class_token,
                                 name='rel_pos_bias')()
      bias = own if bias is None else bias + own
    y = _layer_norm('ln1', self.dtype, self.norm_eps)(x)
    y = Attention(self.num_heads, self.dtype, self.attention, self.sow_attention,
                  self.head_dim, name='attn')(
        y, seq_lengths=seq_lengths, bias=bias)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    x = x + DropPath(self.drop_path)(self._scale('ls1', y), train=train)
    y = _layer_norm('ln2', self.dtype, self.norm_eps)(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.dropout, self.gelu_approximate, name='mlp')(
        y, train=train)
    x = x + DropPath(self.drop_path)(self._scale('ls2', y), train=train)
    self.sow('intermediates', 'out', x)
    return x

  def _scale(self, name: str, y: jax.Array) -> jax.Array:
    if not self.layer_scale:
      return y
    gamma = self.param(name, logical(nn.initializers.constant(self.layer_scale), ('embed',)),
                       (y.shape[-1],))
    return y * gamma.astype(y.dtype)


class Encoder(nn.Module):
  """A stack of `Encoder1DBlock`s ('block0', ...) and a final LayerNorm 'encoder_norm'.

  Intermediates (apply with mutable=['intermediates']) under 'block{i}': 'out' (B, L, D), the
  block output, and 'attn': {'attn' (B, H, L, L), 'q', 'k', 'v' (B, H, L, d)}. The block output
  sits in the block's own subtree (not at key 'block{i}' itself) because that key is the
  block's subtree. `block_outputs` / `attention_maps` collect them as lists.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dropout: dropout rate.
    drop_path: stochastic-depth rate of the last block; it rises linearly from 0 at block 0.
    dtype: compute dtype.
    attention: attention implementation, see `Attention`.
    sow_attention: sow the attention maps, see `Attention.sow_maps`.
    remat: activation checkpointing of each block, a key of `REMAT_POLICIES`: 'none', 'full'
      (keep only each block's input, recompute the block in the backward pass: about 1/3 more
      FLOPs) or 'dots' (keep the weight matmuls' outputs). Parameters, outputs, gradients and
      intermediates are the same with every policy; only memory and time differ.
    layer_scale, gelu_approximate: see `Encoder1DBlock`.
    rel_pos_bias: BEiT's relative position bias: 'none', 'shared' (one table
      'rel_pos_bias/relative_position_bias_table' for every block, SimMIM's pretraining ViT) or
      'block' (one per block, BEiT / SimMIM fine-tuning). Needs the patch grid at call time.
    class_token: the tokens start with a class token (for the relative position bias).
    final_norm: end with the LayerNorm 'encoder_norm'; False when the model normalises after
      pooling instead (`ViT.fc_norm`).
    norm_eps: the LayerNorms' epsilon.
    head_dim: channels per head, see `Attention`.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.
  drop_path: float = 0.
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  sow_attention: bool = True
  remat: str = 'none'
  layer_scale: float = 0.
  gelu_approximate: bool = False
  rel_pos_bias: str = 'none'
  class_token: bool = True
  final_norm: bool = True
  norm_eps: float = LN_EPS
  head_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, seq_lengths: jax.Array | None = None,
               grid: tuple[int, int] | None = None) -> jax.Array:
    """Args: x (B, L, D); seq_lengths optional (B,) int; grid (gh, gw) of the patches, needed
    with a relative position bias. Returns normed tokens (B, L, D)."""
    if self.rel_pos_bias not in ('none', 'shared', 'block'):
      raise UserError(f"unknown rel_pos_bias {self.rel_pos_bias!r}: use 'none', 'shared' or "
                      "'block'.")
    if self.rel_pos_bias != 'none' and grid is None:
      raise UserError('a relative position bias needs the patch grid: this model cannot use '
                      f'rel_pos_bias={self.rel_pos_bias!r}.')
    bias = None
    if self.rel_pos_bias == 'shared':
      bias = RelativePositionBias(tuple(grid), self.num_heads, self.class_token,
                                  name='rel_pos_bias')()
    own_grid = tuple(grid) if self.rel_pos_bias == 'block' else None
    block = remat_block(self.remat)
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x = block(self.num_heads, self.mlp_dim, self.dropout, rate, self.dtype,
                self.attention, self.sow_attention, self.layer_scale, self.gelu_approximate,
                own_grid, self.class_token, self.norm_eps, self.head_dim, name=f'block{i}')(
                    x, train, seq_lengths, bias)
    if not self.final_norm:
      return x
    return _layer_norm('encoder_norm', self.dtype, self.norm_eps)(x)


def remat_block(policy: str) -> type[nn.Module]:
  """`Encoder1DBlock`, or its `nn.remat` under one of `REMAT_POLICIES` (Chen et al. 2016,
  arXiv:1604.06174: recompute activations in the backward pass instead of storing them)."""
  if policy not in REMAT_POLICIES:
    raise UserError(f'unknown remat {policy!r}: use one of {", ".join(REMAT_POLICIES)}.')
  if policy == 'none':
    return Encoder1DBlock
  # Argument 2 (after self and x) is `train`, a Python bool that selects dropout: static.
  return nn.remat(Encoder1DBlock, static_argnums=(2,), policy=REMAT_POLICIES[policy])


class ViT(nn.Module):
  """Vision Transformer classifier.

  Intermediates (apply with mutable=['intermediates']; each value is a 1-tuple, as `sow` stores
  it): 'patch_embed' (B, L, D) tokens entering the encoder (position embedding added, class
  token prepended when pool='token', distillation token after it when distill_token=True);
  'encoder' (see `Encoder`); 'pre_logits' (B, D) fp32, the class head's input; with a
  distillation token also 'dist_pre_logits' (B, D) fp32, the distillation head's input.

  Distillation token (DeiT, Touvron et al. 2021, arXiv:2012.12877): `distill_token=True` adds
  a second learned token 'dist_token' (1, 1, D) beside the class token, read by its own head
  'head_dist'. `__call__` returns DeiT's inference rule, the mean of the two heads'
  logits, (head(cls) + head_dist(dist)) / 2, in train and eval mode alike, so every trainer,
  `jkd eval` and a teacher built from the checkpoint see one (B, C) output. A distillation
  trainer asks for the two heads separately with `model.apply(..., method='heads')`, which
  returns (class logits, distillation logits); a method rather than a sown value because
  capturing 'intermediates' switches attention to the slow explicit path. With pool='gap' the
  class head reads the mean of the patch tokens (the distillation token excluded) and the
  distillation head the distillation token; pool='token' is the paper's layout (198 tokens at
  224/16).

  Attributes:
    num_classes: classes of the head; 0 means no head, and `__call__` returns pre-logits.
    patch_size: patch side in pixels.
    width: token width D.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width; None means 4 * width.
    pool: 'gap' (mean of the patch tokens: 196 tokens at 224/16 without a class token, a
      length cuDNN accepts) or 'token' (the class token 'cls').
    posemb: 'learn' (param 'pos_embedding', (1, gh*gw, D), patches only: a checkpoint's class
      token position is folded into 'cls' on import), a fixed sin-cos table ('sincos2d',
      jkd's own; 'sincos2d_mae', official MAE's; 'sincos2d_bv', big_vision's: see
      `SINCOS_TABLES`), or 'none' (position from a relative position bias only).
    dropout: dropout rate.
    drop_path: stochastic-depth rate of the last block.
    dtype: compute dtype; parameters stay fp32 and logits are returned as fp32.
    attention: 'xla', 'cudnn' or None; see `Attention`.
    head_zero_init: zero-initialise the head (the usual ViT recipe).
    distill_token: add DeiT's distillation token and head (see above); needs num_classes > 0.
    sow_attention: with 'intermediates' mutable, also sow each block's attention maps (the
      explicit attention path). False keeps the fused kernel while block outputs are tapped.
    remat: activation checkpointing of the blocks: 'none', 'full' or 'dots' (see `Encoder`);
      for batches or models whose saved activations do not fit (`jkd plan` shows them).
    class_token: a learned class token 'cls' first in the sequence; None means pool='token'.
      With pool='gap' it is attended to but left out of the mean (timm's avg pooling, MAE
      fine-tuning, BEiT).
    fc_norm: normalise the pooled features (LayerNorm 'fc_norm') instead of the tokens
      ('encoder_norm'): timm's `fc_norm`, the default of its avg pooling and of MAE's
      fine-tuned models.
    layer_scale, gelu_approximate: see `Encoder1DBlock` (DeiT III / BEiT; big_vision).
    rel_pos_bias: 'none', 'shared' or 'block': BEiT's relative position bias (see `Encoder`).
    norm_eps: the LayerNorms' epsilon (1e-6 as timm; Hugging Face's ViT uses 1e-12).
    head_dim: channels per attention head; None = width / num_heads (a head-pruned student
      keeps its heads' size with fewer heads, see `jkd.compress.channel_pruning`).
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int | None = None
  pool: str = 'gap'
  posemb: str = 'learn'
  dropout: float = 0.
  drop_path: float = 0.
  dtype: Dtype = jnp.float32
  attention: str | None = 'xla'
  head_zero_init: bool = True
  distill_token: bool = False
  sow_attention: bool = True
  remat: str = 'none'
  class_token: bool | None = None
  fc_norm: bool = False
  layer_scale: float = 0.
  gelu_approximate: bool = False
  rel_pos_bias: str = 'none'
  norm_eps: float = LN_EPS
  head_dim: int | None = None

  @property
  def has_class_token(self) -> bool:
    return self.pool == 'token' if self.class_token is None else bool(self.class_token)

  def setup(self):
    if self.pool not in ('gap', 'token'):
      raise UserError(f"unknown pool {self.pool!r}: use 'gap' or 'token'.")
    if self.posemb not in POSEMBS:
      raise UserError(f'unknown posemb {self.posemb!r}: use one of {", ".join(POSEMBS)}.')
    if self.pool == 'token' and not self.has_class_token:
      raise UserError("pool='token' reads the class token: drop class_token=False.")
    if self.rel_pos_bias != 'none' and self.distill_token:
      raise UserError('a relative position bias and a distillation token cannot be combined.')
    self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype)
    self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width,
                           self.dropout, self.drop_path, self.dtype, self.attention,
                           self.sow_attention, self.remat, self.layer_scale,
                           self.gelu_approximate, self.rel_pos_bias, self.has_class_token,
                           final_norm=not self.fc_norm, norm_eps=self.norm_eps,
                           head_dim=self.head_dim)
    if self.fc_norm:
      self.fc_norm_layer = _layer_norm('fc_norm', self.dtype, self.norm_eps)
    if self.distill_token and not self.num_classes:
      raise UserError('distill_token=True needs a classifier head: set num_classes > 0, or '
                      'drop distill_token.')
    if self.has_class_token:
      self.cls = self.param('cls', logical(_zeros, (None, None, 'embed')), (1, 1, self.width))
    if self.distill_token:
      # Random, not zero like 'cls': two identical zero tokens would start as exact copies
      # (DeiT draws both from trunc_normal(0.02)).
      self.dist_token = self.param('dist_token', logical(nn.initializers.normal(0.02),
                                                         (None, None, 'embed')),
                                   (1, 1, self.width))
    if self.num_classes:
      head_init = _zeros if self.head_zero_init else _xavier
      # The head runs in fp32: it is tiny, and the logits feed losses that need the precision.
      self.head = nn.Dense(self.num_classes, dtype=jnp.float32,
                           kernel_init=logical(head_init, ('embed', 'classes')),
                           bias_init=logical(_zeros, ('classes',)))
      if self.distill_token:
        self.head_dist = nn.Dense(self.num_classes, dtype=jnp.float32,
                                  kernel_init=logical(head_init, ('embed', 'classes')),
                                  bias_init=logical(_zeros, ('classes',)))
    self.token_dropout = nn.Dropout(self.dropout)

  @nn.compact
  def embed(self, images: jax.Array) -> jax.Array:
    """Patch tokens plus position embedding: the part MIM pretraining masks.

    Args:
      images: (B, H, W, C) float.

    Returns:
      (B, gh*gw, D) in `dtype`, no class token. With posemb='learn' this owns the param
      'pos_embedding' (1, gh*gw, D), sized from the images seen at init.
    """
    x = self.patch_embed(images.astype(self.dtype))
    pos = position_embedding(self, self.posemb, self._grid(images), self.width)
    return x if pos is None else x + pos.astype(self.dtype)

  def _grid(self, images: jax.Array) -> tuple[int, int]:
    return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Classifies images.

    Args:
      images: (B, H, W, C) float, H and W divisible by `patch_size`.
      train: enables dropout and stochastic depth (needs a 'dropout' rng when they are > 0).

    Returns:
      logits (B, num_classes) fp32, or pre-logits (B, D) fp32 when num_classes == 0. With a
      distillation token: the mean of the class and distillation heads' logits (DeiT).
    """
    if self.distill_token:
      cls_logits, dist_logits = self.heads(images, train=train)
      return (cls_logits + dist_logits) / 2
    x, _ = self._pooled(images, train)
    if not self.num_classes:
      return x
    return self.head(x)

  def heads(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """The two heads of a ViT with `distill_token=True`, for DeiT distillation.

    Args:
      images: (B, H, W, C) float.
      train: as in `__call__`.

    Returns:
      (class-head logits, distillation-head logits), each (B, num_classes) fp32. DeiT trains
      the first with the labels and the second with the teacher; `__call__` is their mean.
    """
    if not self.distill_token:
      raise UserError('This ViT has no distillation head: create it with distill_token=True '
                      '(e.g. --config.model.distill_token=True).')
    x, x_dist = self._pooled(images, train)
    return self.head(x), self.head_dist(x_dist)

  def _pooled(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
    """Encodes; returns the class head's input (B, D) fp32 and the distillation head's (or
    None without a distillation token)."""
    x = self.embed(images)
    b = x.shape[0]
    prefix = []
    if self.has_class_token:
      prefix.append(jnp.broadcast_to(self.cls.astype(self.dtype), (b, 1, self.width)))
    if self.distill_token:
      prefix.append(jnp.broadcast_to(self.dist_token.astype(self.dtype), (b, 1, self.width)))
    if prefix:
      x = jnp.concatenate([*prefix, x], axis=1)
    self.sow('intermediates', 'patch_embed', x)
    x = self.token_dropout(x, deterministic=not train)
    grid = self._grid(images) if self.rel_pos_bias != 'none' else None
    x = self.encoder(x, train=train, grid=grid)
    n = len(prefix)  # Leading non-patch tokens: [cls][dist].
    pooled = x[:, 0] if self.pool == 'token' else x[:, n:].mean(axis=1)
    if self.fc_norm:
      pooled = self.fc_norm_layer(pooled)
    pooled = pooled.astype(jnp.float32)
    self.sow('intermediates', 'pre_logits', pooled)
    if not self.distill_token:
      return pooled, None
    dist = x[:, n - 1].astype(jnp.float32)
    self.sow('intermediates', 'dist_pre_logits', dist)
    return pooled, dist


def block_outputs(intermediates) -> list[jax.Array]:
  """Block outputs [(B, L, D)] in depth order, from a ViT's (or an Encoder's) intermediates."""
  enc = intermediates.get('encoder', intermediates)
  return [enc[f'block{i}']['out'][0] for i in range(_num_blocks(enc))]


def attention_maps(intermediates, what: str = 'attn') -> list[jax.Array]:
  """Per-block 'attn' (B, H, L, L) or 'q' / 'k' / 'v' (B, H, L, d), in depth order."""
  enc = intermediates.get('encoder', intermediates)
  return [enc[f'block{i}']['attn'][what][0] for i in range(_num_blocks(enc))]


def _num_blocks(enc) -> int:
  n = 0
  while f'block{n}' in enc:
    n += 1
  return n
