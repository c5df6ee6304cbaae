"""Augmentations: host-side numpy ops on uint8 images, and device-side jax ops on batches.

Host ops take their randomness as arguments (drawn by the pipeline from (seed, step, row)), so
results do not depend on the number of reader threads or processes. Device ops are pure jax
functions of a batch, to be called inside the jitted step.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd.data import jpeg

# ---------------------------------------------------------------- host side (numpy)


def crop_batch(images: np.ndarray, shifts: np.ndarray, padding: int) -> np.ndarray:
  """Pad-and-crop augmentation of a batch: shifts each image, filling with zeros.

  Equivalent to zero-padding by `padding` per side and cropping the original size at offset
  `padding + shift` (the CIFAR recipe of He et al. 2016: padding 4 for 32x32, 2 for 28x28).
  The shifts are drawn by the caller so that they depend on the example, not on the batch.

  Args:
    images: uint8 [B, H, W, C].
    shifts: int [B, 2], (dy, dx) in [-padding, padding].
    padding: pixels of zero padding per side; 0 returns the images unchanged.

  Returns:
    uint8 [B, H, W, C].
  """
  if padding <= 0:
    return images
  height, width = images.shape[1:3]
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  # One gather over all (2p+1)^2 candidate windows instead of a Python loop over the batch.
  windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
  top, left = shifts[:, 0] + padding, shifts[:, 1] + padding
  out = windows[np.arange(len(images)), top, left]  # [B, C, H, W]
  return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def flip_batch(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors left-right the images [B, H, W, C] where `flips` [B] (bool) is set."""
  if not flips.any():
    return images
  out = images.copy()
  out[flips] = images[flips, :, ::-1]
  return out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of uint8 [H, W, C] to [height, width, C] with PIL."""
  if image.shape[:2] == (height, width):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only resizing pipelines need it)
  channels = image.shape[2]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out.reshape(height, width, channels)


def decode(image) -> np.ndarray:
  """Returns uint8 [H, W, C] from a decoded array or encoded (JPEG/PNG) bytes."""
  if isinstance(image, (bytes, np.bytes_)):
    import io  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    jpeg.header(bytes(image))  # The pixel cap from the header first: no decompression bombs.
    image = np.asarray(Image.open(io.BytesIO(image), formats=jpeg.FORMATS).convert('RGB'))
  image = np.asarray(image, dtype=np.uint8)
  return image[..., None] if image.ndim == 2 else image


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop: random area fraction and aspect ratio, resized to size x size.

  Same sampling as torchvision's `RandomResizedCrop` (10 tries, then a center crop of the
  closest allowed aspect ratio); big_vision's `inception_crop` is the TF equivalent.

  Args:
    image: uint8 [H, W, C] of any size.
    rng: random generator.
    size: output height and width.
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's width/height.

  Returns:
    uint8 [size, size, C].
  """
  height, width = image.shape[:2]
  # The same draws as a file's crop in `jkd.data.jpeg.train_crop`.
  left, top, w, h = jpeg.random_crop_box(width, height, rng, scale, ratio)
  return resize(image[top:top + h, left:left + w], size, size)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet eval crop: resize the shorter side to size/crop_fraction, crop the center.

  Args:
    image: uint8 [H, W, C] of any size.
    size: output height and width.
    crop_fraction: fraction of the resized shorter side kept (0.875 = 224 of 256).

  Returns:
    uint8 [size, size, C].
  """
  height, width = image.shape[:2]
  short = int(round(size / crop_fraction))
  if height <= width:
    new_h, new_w = short, max(short, int(round(width * short / height)))
  else:
    new_h, new_w = max(short, int(round(height * short / width))), short
  image = resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top:top + size, left:left + size]


# ---------------------------------------------------------------- device side (jax, per batch)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype=jnp.float32) -> jax.Array:
  """Maps uint8 pixels to `(images / 255 - mean) / std`.

  Args:
    images: uint8 [..., C].
    mean: per-channel mean of pixel/255, length C (`DatasetInfo.mean`).
    std: per-channel std of pixel/255, length C (`DatasetInfo.std`).
    dtype: output dtype; the arithmetic is float32 before the cast, so bf16 loses nothing extra.

  Returns:
    [..., C] of `dtype`.
  """
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def _mix_lambda(key: jax.Array, alpha: float) -> jax.Array:
  return jax.random.beta(key, alpha, alpha)


def mixup(key: jax.Array, images: jax.Array, labels: jax.Array,
          alpha: float) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018) with one lambda per batch, pairing the batch with its reverse.

  x' = lam * x + (1 - lam) * x[::-1],  y' = lam * y + (1 - lam) * y[::-1],  lam ~ Beta(alpha,
  alpha). One lambda per batch and a reversed batch as partner, as in timm's batch mode and
  big_vision; reversing (not a permutation) keeps it a cheap, shard-friendly op.

  Args:
    key: PRNG key.
    images: float [B, H, W, C] (normalized); integer images are cast to float32.
    labels: one-hot or soft labels [B, K].
    alpha: Beta concentration (a Python float); alpha <= 0 returns the inputs unchanged.

  Returns:
    (mixed images [B, H, W, C], mixed labels [B, K]); label rows still sum to 1.
  """
  if alpha <= 0:
    return images, labels
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  lam = _mix_lambda(key, alpha)
  mixed = lam * images + (1.0 - lam) * images[::-1]
  mixed_labels = lam * labels + (1.0 - lam) * labels[::-1]
  return mixed.astype(images.dtype), mixed_labels.astype(labels.dtype)


def cutmix(key: jax.Array, images: jax.Array, labels: jax.Array,
           alpha: float) -> tuple[jax.Array, jax.Array]:
  """CutMix (Yun et al. 2019), one box per batch, pasting from the reversed batch.

  A box of area fraction (1 - lam), lam ~ Beta(alpha, alpha), with a uniform random center
  (clipped at the borders) is replaced by the same box of x[::-1]; labels mix by the box's
  actual area: y' = lam' * y + (1 - lam') * y[::-1].

  Args:
    key: PRNG key.
    images: [B, H, W, C] of any dtype.
    labels: one-hot or soft labels [B, K].
    alpha: Beta concentration (a Python float); alpha <= 0 returns the inputs unchanged.

  Returns:
    (images [B, H, W, C], labels [B, K]).
  """
  if alpha <= 0:
    return images, labels
  height, width = images.shape[1:3]
  key_lam, key_y, key_x = jax.random.split(key, 3)
  lam = _mix_lambda(key_lam, alpha)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  mixed = jnp.where(box[None, :, :, None], images[::-1], images)
  lam_area = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  mixed_labels = lam_area * labels + (1.0 - lam_area) * labels[::-1]
  return mixed, mixed_labels.astype(labels.dtype)
