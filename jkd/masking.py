"""Random masks for masked image modeling (SimMIM and MAE), and token/patch helpers.

Everything here is a pure function of a PRNG key and static sizes: it runs inside `jax.jit`,
draws an independent mask for every example of the batch from one key, and needs no host
numpy (so masks can be drawn inside the train step, on device, after the batch is sharded).

Conventions:
  * 1 means masked (SimMIM) / removed (MAE), 0 means visible, as in both reference codebases.
  * Images are NHWC. Patches follow MAE's order: tokens row-major over the (h, w) patch grid,
    and inside a token the pixels in (row, column, channel) row-major order.

References:
  * SimMIM: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022,
    https://arxiv.org/abs/2111.09886 (`MaskGenerator` in microsoft/SimMIM data/data_simmim.py).
  * MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377 (`random_masking`, `patchify` in facebookresearch/mae
    models_mae.py).
"""
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp


def _check_ratio(ratio: float, name: str) -> None:
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {ratio}.")


def _check_positive(**sizes: int) -> None:
  for name, value in sizes.items():
    # Sizes fix array shapes, so they must be concrete Python/numpy integers (not 4.0).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _random_ranks(key: jax.Array, batch: int, n: int) -> tuple[jax.Array, jax.Array]:
  """Per-example uniform random permutation of `n` items and its inverse.

  Returns:
    `(ids_shuffle, ids_restore)`, both int32 of shape (batch, n): `ids_shuffle[b]` lists the
    items in random order and `ids_restore[b][i]` is the position of item `i` in that order,
    i.e. `ids_shuffle[b][ids_restore[b]] == arange(n)`.
  """
  noise = jax.random.uniform(key, (batch, n))
  # argsort of i.i.d. noise is a uniform random permutation per row; jnp.argsort is stable, so
  # even a (rare) tie in float32 noise still yields a valid permutation.
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_shuffle, ids_restore


def simmim_mask(
    key: jax.Array,
    batch: int,
    image_size: int,
    mask_patch_size: int,
    model_patch_size: int,
    ratio: float,
) -> jax.Array:
  """SimMIM random block mask at the model's patch resolution.

  The image is cut into a `g x g` grid of mask-patches, `g = image_size // mask_patch_size`.
  Per example, exactly

    mask_count = ceil(g**2 * ratio)

  mask-patches, a uniformly random subset, are masked. Each mask-patch is then repeated
  `scale x scale` times, `scale = mask_patch_size // model_patch_size`, so the mask lines up
  with the model's patch tokens. Matches `MaskGenerator.__call__` of SimMIM (the count uses
  the same float expression `ceil(token_count * ratio)`), drawn independently per example.

  Args:
    key: PRNG key; one key gives a whole batch of different masks.
    batch: number of examples B (static).
    image_size: side of the square input image in pixels (static).
    mask_patch_size: side of a masking block in pixels (static), e.g. 32.
    model_patch_size: side of the model's patch in pixels (static), e.g. 4 (Swin) or 16 (ViT).
    ratio: fraction of mask-patches to mask, in [0, 1] (static), e.g. 0.6.

  Returns:
    int32 array of shape (B, n, n), `n = image_size // model_patch_size`; 1 = masked. Every
    example has exactly `mask_count * scale**2` ones, in `scale x scale` constant blocks.

  Raises:
    ValueError: when `image_size` is not a multiple of `mask_patch_size`, `mask_patch_size`
      is not a multiple of `model_patch_size`, a size is not positive or `ratio` is outside
      [0, 1].
  """
  _check_positive(batch=batch, image_size=image_size, mask_patch_size=mask_patch_size,
                  model_patch_size=model_patch_size)
  _check_ratio(ratio, "ratio")
  if image_size % mask_patch_size:
    raise ValueError(
        f"image_size ({image_size}) must be a multiple of mask_patch_size ({mask_patch_size}).")
  if mask_patch_size % model_patch_size:
    raise ValueError(f"mask_patch_size ({mask_patch_size}) must be a multiple of "
                     f"model_patch_size ({model_patch_size}).")
  grid = image_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  token_count = grid**2
  # Same float expression as SimMIM so the count agrees with the reference for every ratio.
  mask_count = int(math.ceil(token_count * ratio))
  # Masking the first `mask_count` items of a random permutation == `ids_restore < mask_count`:
  # the same distribution as SimMIM's `np.random.permutation(n)[:mask_count]`, but on device.
  _, ids_restore = _random_ranks(key, batch, token_count)
  mask = (ids_restore < mask_count).astype(jnp.int32).reshape(batch, grid, grid)
  return upsample_mask(mask, scale)


class MaeMask(NamedTuple):
  """A batch of MAE random masks.

  Attributes:
    ids_keep: int32 (B, len_keep), indices of the visible tokens, in shuffled order (feed to
      `gather_tokens` to build the encoder input).
    ids_restore: int32 (B, L), inverse permutation: `unshuffle_tokens` with it puts
      `[kept tokens, mask tokens]` back into the original token order.
    mask: float32 (B, L) in original token order, 0 = kept, 1 = removed (the loss weight).
  """
  ids_keep: jax.Array
  ids_restore: jax.Array
  mask: jax.Array


def mae_mask(key: jax.Array, batch: int, num_patches: int, ratio: float) -> MaeMask:
  """MAE per-sample random masking by argsort of uniform noise.

    len_keep    = int(L * (1 - ratio))           (Python truncation, as MAE)
    noise       ~ U[0, 1)^(B, L)
    ids_shuffle = argsort(noise)                 (small noise is kept, large is removed)
    ids_restore = argsort(ids_shuffle)
    ids_keep    = ids_shuffle[:, :len_keep]
    mask        = gather([0]*len_keep + [1]*(L - len_keep), ids_restore)

  Matches `MaskedAutoencoderViT.random_masking` of MAE, returning indices instead of gathered
  tokens so the caller can gather any tensor (tokens, positional embeddings, targets).

  Args:
    key: PRNG key; one key gives a whole batch of different masks.
    batch: number of examples B (static).
    num_patches: number of patch tokens L, without a class token (static).
    ratio: fraction of tokens to remove, in [0, 1] (static), e.g. 0.75.

  Returns:
    `MaeMask(ids_keep (B, len_keep) int32, ids_restore (B, L) int32, mask (B, L) float32)`;
    every row of `mask` sums to `L - len_keep`.

  Raises:
    ValueError: when `batch` or `num_patches` is not positive or `ratio` is outside [0, 1].
  """
  _check_positive(batch=batch, num_patches=num_patches)
  _check_ratio(ratio, "ratio")
  len_keep = int(num_patches * (1 - ratio))
  ids_shuffle, ids_restore = _random_ranks(key, batch, num_patches)
  ids_keep = ids_shuffle[:, :len_keep]
  # Gathering [0]*len_keep + [1]*rest by ids_restore gives 1 exactly where a token's shuffled
  # position is >= len_keep; the comparison says the same without materialising the gather.
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return MaeMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """Per-example token gather: `out[b, i] = x[b, ids[b, i]]`.

  Args:
    x: (B, L, D) tokens (any trailing feature dims are allowed: (B, L, ...)).
    ids: (B, K) integer indices into the token axis, e.g. `MaeMask.ids_keep`.

  Returns:
    (B, K, D) tokens, same dtype as `x`. MAE's `torch.gather(x, 1, ids[..., None].repeat(...))`.
  """
  ids = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, ids, axis=1)


def unshuffle_tokens(x: jax.Array, ids_restore: jax.Array) -> jax.Array:
  """Puts `[kept tokens, mask tokens]` (shuffled order) back into the original token order.

  With `m = mae_mask(...)`, `x = concat([gather_tokens(t, m.ids_keep), mask_tokens], axis=1)`
  (no class token) gives `out[b, j] = t[b, j]` where `m.mask[b, j] == 0` and a mask token
  where `m.mask[b, j] == 1`, as in MAE's `forward_decoder`.

  Args:
    x: (B, L, D) tokens in shuffled order: the `len_keep` kept ones then `L - len_keep` others.
    ids_restore: (B, L) int, `MaeMask.ids_restore`.

  Returns:
    (B, L, D) tokens in original order.

  Raises:
    ValueError: when `x` does not have exactly `L` tokens.
  """
  if x.shape[1] != ids_restore.shape[1]:
    raise ValueError(
        f"unshuffle_tokens needs all L={ids_restore.shape[1]} tokens (kept + mask tokens), "
        f"got {x.shape[1]}: append L - len_keep mask tokens first.")
  return gather_tokens(x, ids_restore)


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """Nearest-neighbour upsampling of a (B, H, W) mask by an integer factor.

  Used to go from mask-patches to model patches (SimMIM's `repeat(scale)` on both axes) and
  from patches to pixels for SimMIM's loss, `mask.repeat_interleave(patch_size, 1)
  .repeat_interleave(patch_size, 2)`.

  Args:
    mask: (B, H, W) array of any dtype.
    factor: positive integer.

  Returns:
    (B, H * factor, W * factor) array, same dtype, each input cell a constant block.
  """
  _check_positive(factor=factor)
  if factor == 1:
    return mask
  return jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)


def patchify(images: jax.Array, p: int) -> jax.Array:
  """Cuts NHWC images into flattened non-overlapping `p x p` patches, MAE's layout.

  `(B, h*p, w*p, C) -> (B, h*w, p*p*C)`; tokens are row-major over the patch grid and each
  token is its pixels in (row, column, channel) order, i.e. MAE's `'nchpwq->nhwpqc'` on NCHW.

  Args:
    images: (B, H, W, C) with H and W multiples of `p`.
    p: patch side in pixels.

  Returns:
    (B, L, p*p*C) patches, `L = (H // p) * (W // p)`.

  Raises:
    ValueError: when H or W is not a multiple of `p`.
  """
  _check_positive(p=p)
  b, height, width, c = images.shape
  if height % p or width % p:
    raise ValueError(f"image size {height}x{width} is not a multiple of patch size {p}.")
  h, w = height // p, width // p
  x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
  """Inverse of `patchify`: `(B, h*w, p*p*c) -> (B, h*p, w*p, c)`.

  Args:
    patches: (B, h*w, p*p*c) in `patchify`'s layout (e.g. an MAE decoder's predictions).
    p: patch side in pixels.
    h: patch rows.
    w: patch columns.
    c: channels.

  Returns:
    (B, h*p, w*p, c) images.

  Raises:
    ValueError: when `patches` does not have shape (B, h*w, p*p*c).
  """
  _check_positive(p=p, h=h, w=w, c=c)
  b = patches.shape[0]
  if patches.shape[1:] != (h * w, p * p * c):
    raise ValueError(f"patches of shape {patches.shape} do not fit p={p}, h={h}, w={w}, c={c}: "
                     f"expected (B, {h * w}, {p * p * c}).")
  x = patches.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)
