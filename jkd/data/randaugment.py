"""Device-side RandAugment and random erasing: pure jax functions of a batch and a key.

The recipe basics of DeiT / MAE fine-tuning (timm's `rand-m9-mstd0.5-inc1` and
`RandomErasing(mode='pixel')`), run inside the jitted step on uint8 batches, so that they cost
no host CPU, are drawn from (seed, step) alone (a resumed run redraws the same ones, the teacher
cache reproduces them) and teacher and student see the same augmented images.

RandAugment (Cubuk et al. 2020) as timm's `RandAugment` with the "increasing" ops: each image
gets `num_ops` ops drawn uniformly with replacement from `OPS`, each applied with probability
1/2 at a magnitude m ~ N(magnitude, magnitude_std) clipped to [0, 10] (m = 10 is the strongest):

  AutoContrast, Equalize, Invert      (no magnitude)
  Rotate        ±30 m/10 degrees      ShearX/Y     ±0.3 m/10        TranslateX/Y  ±0.45 m/10 of
  Posterize     4 - 4 m/10 bits kept  Solarize     threshold 256 - 256 m/10            the size
  SolarizeAdd   +110 m/10 below 128   Color/Contrast/Brightness/Sharpness: factor 1 ± 0.9 m/10

Geometric ops sample bilinearly about the image centre and fill with grey (128). The colour
ops follow PIL's definitions (ImageOps / ImageEnhance: grey = 0.299 R + 0.587 G + 0.114 B,
Sharpness blends with PIL's 3x3 smoothing kernel); results are rounded to uint8 after each op
(PIL truncates; values can differ by one level). Images with one channel skip Color.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
       'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
       'TranslateY')
FILL = 128.0


def _to_uint8(x):
  return jnp.clip(jnp.round(x), 0, 255)


def _grey(img):
  """PIL's 'L' conversion of an (H, W, C) float image: (H, W, 1)."""
  if img.shape[-1] == 1:
    return img
  return jnp.sum(img * jnp.asarray([0.299, 0.587, 0.114], img.dtype), -1, keepdims=True)


def _blend(degenerate, img, factor):
  return _to_uint8(degenerate + factor * (img - degenerate))


def _affine(img, matrix):
  """Bilinear resampling of (H, W, C): output pixel (x, y) reads input `matrix @ (x, y, 1)`
  (coordinates about the centre), grey outside."""
  h, w, _ = img.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing='ij')
  cy, cx = (h - 1) / 2, (w - 1) / 2
  x, y = xs - cx, ys - cy
  src_x = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2] + cx
  src_y = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2] + cy
  channels = [jax.scipy.ndimage.map_coordinates(img[..., c], [src_y, src_x], order=1,
                                                mode='constant', cval=FILL)
              for c in range(img.shape[-1])]
  return _to_uint8(jnp.stack(channels, -1))


def _equalize(img):
  """PIL's ImageOps.equalize per channel (the histogram's step skips the last used level)."""
  def one(ch):
    values = ch.astype(jnp.int32).reshape(-1)
    hist = jnp.zeros(256, jnp.int32).at[values].add(1)
    last = jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))
    step = (jnp.sum(hist) - hist[last]) // 255
    lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(lut, 0, 255)
    return jnp.where(step > 0, lut[values].reshape(ch.shape).astype(ch.dtype), ch)
  return jnp.stack([one(img[..., c]) for c in range(img.shape[-1])], -1)


def _autocontrast(img):
  lo = jnp.min(img, axis=(0, 1), keepdims=True)
  hi = jnp.max(img, axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  return jnp.where(hi > lo, _to_uint8((img - lo) * scale), img)


def _sharpness(img, factor):
  """PIL's ImageEnhance.Sharpness: blend with the 3x3 smoothing filter (1 1 1 / 1 5 1 / 1 1 1)
  / 13, the border kept."""
  kernel = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
  padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
  h, w, _ = img.shape
  smooth = sum(kernel[i, j] * padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
  border = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  degenerate = jnp.where(border, _to_uint8(smooth), img)
  return _blend(degenerate, img, factor)


def apply_op(index, img, magnitude, sign):
  """Op `OPS[index]` on one float (H, W, C) image in [0, 255] at `magnitude` in [0, 10];
  `sign` (±1) picks the direction of the signed ops."""
  m = magnitude / 10.0
  h, w, _ = img.shape
  factor = 1.0 + sign * 0.9 * m
  angle = sign * 30.0 * m * math.pi / 180.0
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  eye = jnp.eye(3, dtype=jnp.float32)

  def shear(axis):
    return eye.at[axis, 1 - axis].set(sign * 0.3 * m)

  def translate(axis, size):
    return eye.at[axis, 2].set(sign * 0.45 * m * size)

  bits = 4 - jnp.floor(4 * m).astype(jnp.int32)
  mask = jnp.left_shift(255, 8 - bits) & 255
  threshold = 256.0 - jnp.floor(256 * m)
  add = jnp.floor(110 * m)
  branches = [
      _autocontrast,
      _equalize,
      lambda x: 255.0 - x,
      lambda x: _affine(x, jnp.asarray([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])),
      lambda x: jnp.bitwise_and(x.astype(jnp.int32), mask).astype(x.dtype),
      lambda x: jnp.where(x >= threshold, 255.0 - x, x),
      lambda x: jnp.where(x < 128, jnp.minimum(x + add, 255.0), x),
      lambda x: _blend(jnp.broadcast_to(_grey(x), x.shape), x, factor),
      lambda x: _blend(jnp.round(jnp.mean(_grey(x))), x, factor),
      lambda x: _blend(jnp.zeros_like(x), x, factor),
      lambda x: _sharpness(x, factor),
      lambda x: _affine(x, shear(0)),
      lambda x: _affine(x, shear(1)),
      lambda x: _affine(x, translate(0, w)),
      lambda x: _affine(x, translate(1, h)),
  ]
  return jax.lax.switch(index, branches, img)


def rand_augment(key: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> jax.Array:
  """RandAugment of a uint8 batch (B, H, W, C) -> uint8 (B, H, W, C) (module docstring).

  Args:
    key: PRNG key (the step's).
    images: uint8 images.
    num_ops: ops per image (timm's n; DeiT 2). 0 returns the images.
    magnitude: mean magnitude in [0, 10] (timm's m; DeiT 9).
    magnitude_std: its standard deviation per op (timm's mstd; DeiT 0.5).
    prob: probability of applying each drawn op (timm 0.5).
  """
  if num_ops <= 0:
    return images
  b = images.shape[0]
  k_op, k_mag, k_sign, k_apply = jax.random.split(key, 4)
  ops = jax.random.randint(k_op, (b, num_ops), 0, len(OPS))
  mags = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_mag, (b, num_ops)), 0, 10)
  signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (b, num_ops)), 1.0, -1.0)
  applied = jax.random.bernoulli(k_apply, prob, (b, num_ops))

  def one(img, ops_i, mags_i, signs_i, applied_i):
    x = img.astype(jnp.float32)
    for j in range(num_ops):
      x = jnp.where(applied_i[j], apply_op(ops_i[j], x, mags_i[j], signs_i[j]), x)
    return x.astype(jnp.uint8)
  return jax.vmap(one)(images, ops, mags, signs, applied)


def random_erasing(key: jax.Array, images: jax.Array, prob: float = 0.25,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10
                   ) -> jax.Array:
  """Random erasing (Zhong et al. 2020) as timm's `RandomErasing(mode='pixel')`: with
  probability `prob` per image, a box of area fraction U(area) and log-uniform aspect ratio,
  the first of `attempts` draws that fits, at a uniform position, is replaced by N(0, 1) noise
  per pixel and channel (the images are normalised). (B, H, W, C) float -> same.
  """
  if prob <= 0:
    return images
  b, h, w, c = images.shape
  k_do, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(key, 6)
  target = h * w * jax.random.uniform(k_area, (b, attempts), minval=area[0], maxval=area[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b, attempts), minval=math.log(aspect[0]),
                                     maxval=math.log(aspect[1])))
  bh = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
  bw = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
  fits = (bh < h) & (bw < w)
  first = jnp.argmax(fits, axis=1)
  pick = lambda x: jnp.take_along_axis(x, first[:, None], 1)[:, 0]  # noqa: E731
  bh, bw = pick(bh), pick(bw)
  do = jax.random.bernoulli(k_do, prob, (b,)) & jnp.any(fits, axis=1)
  top = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - bh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - bw + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  box = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None]) &
         (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]) &
         do[:, None, None])
  noise = jax.random.normal(k_noise, images.shape, jnp.float32).astype(images.dtype)
  return jnp.where(box[..., None], noise, images)


def augment_settings(data_cfg) -> dict:
  """The device-side augmentation of `config.data`: {'randaugment': (num_ops, magnitude,
  magnitude_std), 'random_erasing': prob}; zeros when the fields are absent (off)."""
  get = lambda k, d: (data_cfg.get(k, d) if hasattr(data_cfg, 'get') else d)  # noqa: E731
  return {'randaugment': (int(get('randaugment_ops', 0) or 0),
                          float(get('randaugment_magnitude', 9.0)),
                          float(get('randaugment_std', 0.5))),
          'random_erasing': float(get('random_erasing', 0.0) or 0.0)}
