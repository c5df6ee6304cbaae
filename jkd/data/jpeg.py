"""Image files to crops in one step: JPEGs decoded at the smallest size the crop needs.

A 224x224 training crop of a photo rarely needs every pixel of it. libjpeg can decode a JPEG at
1/2, 1/4 or 1/8 of its size for a fraction of the cost (the scaled inverse DCT skips most of the
work), so `decode_crop` picks the largest such reduction that still leaves the crop at least as
big as the output, decodes at that size and resizes only the crop. For ImageNet's typical
500x375 photos the reduction is mostly 1 (the crop is already close to 224), and the gain comes
from decoding with simplejpeg (libjpeg-turbo straight into a numpy array: about 1.8x Pillow's
`Image.open(...).convert('RGB')`, same pixels); for camera-size photos (4000x3000) the reduced
decode is up to ~30x cheaper. PNG, WebP and anything simplejpeg refuses go through Pillow.

The crop is then resized once: by Pillow's antialiased bilinear filter (torchvision's pixels;
eval crops always), or for train crops with `resizer='opencv'` (`config.data.train_resize`, the
default there) by OpenCV (bilinear below 2x, area average beyond), about 5x cheaper; at
ImageNet's size the resize, not the decode, is the largest cost of a crop.

Results are a pure function of (file bytes, box, output size, mode, resizer): both decoders give
the same pixels (libjpeg-turbo's scaled decode is what Pillow's `draft` does), so batches do not
depend on which worker, process or host decodes them.

Image files come from outside, so every decode is bounded: the header's width x height must
be at most `MAX_PIXELS` (Pillow's own decompression-bomb limit, 178,956,970 pixels: about
540 MB decoded as RGB; lower it with $JKD_MAX_IMAGE_PIXELS) before a single pixel is allocated,
for JPEG as for every other format; only the formats of `FORMATS` are opened (never, say, an EPS
file named .jpg, which Pillow would hand to Ghostscript); 16-bit grayscale PNGs are scaled to
8 bits (v / 257) instead of being clipped at 255. Whatever else goes wrong in a decoder becomes an
`ImageReadError`, the one error this module raises for bad bytes.

References: Pillow `Image.draft`; TF's `decode_and_crop_jpeg`; simplejpeg
(https://gitlab.com/jfolz/simplejpeg).
"""
from __future__ import annotations

import io
import math
import os
import stat
from typing import Sequence

import numpy as np
from PIL import Image

try:  # The fast JPEG path; Pillow gives the same pixels, slower (see the module docstring).
  import simplejpeg
except ImportError:  # pragma: no cover  (a dependency of jkd; kept optional for slim installs)
  simplejpeg = None
try:  # The fast train resize (`resizer='opencv'`); Pillow does every resize without it.
  import cv2
  cv2.setNumThreads(1)  # one small image per call: the parallelism is Grain's worker processes
except ImportError:  # pragma: no cover  (a dependency of jkd; kept optional for slim installs)
  cv2 = None

MODES = ('RGB', 'L')
# How a crop is resized: Pillow's antialiased bilinear (torchvision's PIL path, pixel for pixel),
# or OpenCV's bilinear below 2x and area average beyond (about 5x faster; `resize_box`).
RESIZERS = ('pillow', 'opencv')
# Pillow modes without colour: such images read as one channel when the dataset is grayscale.
GRAY_MODES = frozenset({'1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'})
# Pillow modes of 16-bit grayscale images (a 16-bit PNG): scaled to 8 bits, not clipped.
WIDE_MODES = frozenset({'I', 'I;16', 'I;16B', 'I;16L', 'I;16N'})
_SCALES = (8, 4, 2, 1)
# The most pixels (width x height) an image may claim: Pillow's DecompressionBombError limit
# (2 x Image.MAX_IMAGE_PIXELS), applied to every format before anything is decoded. A 40000 x
# 40000 JPEG (1.6 G pixels, 4.8 GB as RGB) is refused; a 100-megapixel photo is read.
MAX_PIXELS_DEFAULT = 178_956_970
MAX_PIXELS = int(os.environ.get('JKD_MAX_IMAGE_PIXELS') or MAX_PIXELS_DEFAULT)
# The largest image file read into memory (a JPEG of MAX_PIXELS at the highest quality is well
# below it); bigger files are refused before they are read.
MAX_FILE_BYTES = 1 << 30
# The file formats Pillow may open (whatever the file's extension says). Others it knows
# (EPS through Ghostscript, PSD, TIFF...) are refused as unreadable.
FORMATS = ('JPEG', 'PNG', 'WEBP', 'BMP', 'GIF')  # JPEG includes MPO (camera JPEGs)


class ImageReadError(ValueError):
  """The bytes are not an image this module can decode (the caller adds the file's path)."""


def header(data: bytes) -> tuple[int, int, bool]:
  """Returns (width, height, is_gray) of encoded image bytes, reading only the header.

  Raises:
    ImageReadError: not a readable image, or larger than `MAX_PIXELS`.
  """
  if simplejpeg is not None and simplejpeg.is_jpeg(data):
    try:
      height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
      pass  # Pillow may still read it (and says why not otherwise).
    else:
      return _checked(int(width), int(height)) + (colorspace == 'Gray',)
  try:
    with _open(data) as image:
      return _checked(*image.size) + (image.mode in GRAY_MODES,)
  except ImageReadError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise ImageReadError(_why(e)) from None


def _checked(width: int, height: int) -> tuple[int, int]:
  """(width, height) if the image may be decoded: both >= 1, at most `MAX_PIXELS` in all."""
  if width < 1 or height < 1:
    raise ImageReadError(f'the header claims a {width}x{height} image')
  if width * height > MAX_PIXELS:
    raise ImageReadError(
        f'the header claims {width}x{height} = {width * height:,} pixels, more than the '
        f'{MAX_PIXELS:,} jkd decodes (a decompression bomb, or a huge scan: shrink it, or raise '
        'the limit with $JKD_MAX_IMAGE_PIXELS)')
  return width, height


def _open(data: bytes) -> Image.Image:
  """Pillow's lazy open (header only) of one of `FORMATS`."""
  return Image.open(io.BytesIO(data), formats=FORMATS)


def read_file(path: str) -> bytes:
  """The bytes of the image file `path` (`read_file_stat`)."""
  return read_file_stat(path)[0]


def read_file_stat(path: str) -> tuple[bytes, os.stat_result]:
  """(bytes, stat of the same open file) of the image file `path`: a regular file of at most
  `MAX_FILE_BYTES` (never a FIFO, a device such as /dev/zero behind a link, or a directory:
  those would hang or never end). The stat is that of the bytes read (size, mtime_ns), so a
  record of it says which version of the file was read.

  Raises:
    ImageReadError: not a regular file, or too big.
    OSError: it cannot be opened or read.
  """
  fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
  with os.fdopen(fd, 'rb') as f:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise ImageReadError('not a regular file (a device, FIFO or directory)')
    if info.st_size > MAX_FILE_BYTES:
      raise ImageReadError(f'{info.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} an image '
                           'file may have')
    data = f.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows meanwhile
  if len(data) > MAX_FILE_BYTES:
    raise ImageReadError(f'more than the {MAX_FILE_BYTES:,} bytes an image file may have')
  return data, info


def _why(error: Exception) -> str:
  if isinstance(error, Image.UnidentifiedImageError):  # its message names a BytesIO object
    return f'not an image format jkd reads ({", ".join(FORMATS)})'
  if isinstance(error, Image.DecompressionBombError):  # Pillow's own check, at open
    return (f'{error} (jkd decodes at most {MAX_PIXELS:,} pixels per image: shrink it; Pillow '
            'refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS whatever $JKD_MAX_IMAGE_PIXELS says)')
  return f'{type(error).__name__}: {error}'


def _jpeg_scale(width: int, height: int, box: Sequence[float], out_w: int, out_h: int) -> int:
  """The largest s in (8, 4, 2, 1) with the crop still >= the output after dividing by s."""
  del width, height
  for s in _SCALES:
    if box[2] / s >= out_w and box[3] / s >= out_h:
      return s
  return 1


def _decode_jpeg(data: bytes, mode: str, scale: int, width: int, height: int) -> np.ndarray:
  """[ceil(H/s), ceil(W/s), C] uint8 by simplejpeg, else Pillow's draft (the same pixels)."""
  if simplejpeg is not None:
    try:
      return simplejpeg.decode_jpeg(
          data, 'RGB' if mode == 'RGB' else 'GRAY', min_factor=scale,
          min_height=-(-height // scale), min_width=-(-width // scale))
    except ValueError:
      pass  # e.g. an exotic colour space: Pillow converts it (or reports the damage).
  return _decode_pillow(data, mode, scale)


def _decode_pillow(data: bytes, mode: str, scale: int = 1) -> np.ndarray:
  try:
    with _open(data) as image:
      _checked(*image.size)
      if scale > 1 and image.format in ('JPEG', 'MPO'):
        image.draft(mode, (image.size[0] // scale, image.size[1] // scale))
      if image.mode in WIDE_MODES:
        return _from_wide(np.asarray(image), mode)
      if image.mode != mode:
        image = image.convert(mode)
      array = np.asarray(image)
  except ImageReadError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise ImageReadError(_why(e)) from None
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ImageReadError(f'decoded as {array.dtype} {array.shape}, not 8-bit pixels')
  return array[..., None] if array.ndim == 2 else array


def _from_wide(values: np.ndarray, mode: str) -> np.ndarray:
  """A 16-bit grayscale image [H, W] (0..65535) as uint8 [H, W, C]: round(v / 257), so 65535 is
  255 and the full range is kept (Pillow's convert would clip everything above 255 to white)."""
  if values.dtype.kind == 'u' and values.itemsize <= 2:  # I;16: uint16 already in range
    wide = values.astype(np.uint32)
  else:  # mode I (int32): a 16-bit PNG read by an older Pillow
    wide = np.clip(values, 0, 65535).astype(np.uint32)
  wide += 128  # in place: 4 bytes a pixel at most, next to the decoded image
  wide //= 257
  gray = wide.astype(np.uint8)[..., None]
  return gray if mode == 'L' else np.repeat(gray, 3, axis=2)


def decode(data: bytes, mode: str = 'RGB') -> np.ndarray:
  """Decodes a whole image at full size.

  Args:
    data: encoded JPEG, PNG, WebP (anything Pillow reads) bytes.
    mode: 'RGB' (3 channels; grayscale images are replicated) or 'L' (1 channel).

  Returns:
    uint8 [H, W, C], C = 3 for 'RGB' and 1 for 'L'.

  Raises:
    ImageReadError: the bytes cannot be decoded.
  """
  if simplejpeg is not None and simplejpeg.is_jpeg(data):
    width, height, _ = header(data)
    return _decode_jpeg(data, mode, 1, width, height)
  return _decode_pillow(data, mode)


def decode_crop(data: bytes, box: Sequence[float], size: tuple[int, int],
                mode: str = 'RGB', image_size: tuple[int, int] | None = None, *,
                crop_first: bool = True, flip: bool = False,
                resizer: str = 'pillow') -> np.ndarray:
  """Decodes the region `box` of an image and resizes it to `size` (bilinear, antialiased).

  Equal, up to the reduced-size decode of JPEGs, to
  `Image.open(...).convert(mode).resize(size, BILINEAR, box=box)`: JPEGs are decoded at 1/s of
  their size for the largest s in {8, 4, 2, 1} that keeps the box at least `size` (so the
  resize still only shrinks or keeps), and the box is divided by s.

  Args:
    data: encoded image bytes.
    box: (left, top, width, height) in pixels of the full image; floats allowed.
    size: output (width, height).
    mode: 'RGB' or 'L'.
    image_size: (width, height) of the full image when the caller already read the header.
    crop_first: crop then resize (True, the train crop) or resize then crop (the eval crop);
      see `resize_box`.
    flip: mirror the output left-right.
    resizer: 'pillow' or 'opencv' (`RESIZERS`; see `resize_box`).

  Returns:
    uint8 [size[1], size[0], C].

  Raises:
    ImageReadError: the bytes cannot be decoded.
  """
  out_w, out_h = size
  width, height = image_size or header(data)[:2]
  is_jpeg = simplejpeg.is_jpeg(data) if simplejpeg is not None else data[:2] == b'\xff\xd8'
  scale = _jpeg_scale(width, height, box, out_w, out_h) if is_jpeg else 1
  pixels = _decode_jpeg(data, mode, scale, width, height) if is_jpeg else _decode_pillow(data, mode)
  return resize_box(pixels, [v / scale for v in box], size, crop_first=crop_first, flip=flip,
                    resizer=resizer)


def resize_box(pixels: np.ndarray, box: Sequence[float], size: tuple[int, int], *,
               crop_first: bool, flip: bool = False, resizer: str = 'pillow') -> np.ndarray:
  """Resizes the region `box` = (left, top, width, height) of uint8 [H, W, C] to `size`
  (width, height), bilinear with antialiasing as Pillow (and torchvision's PIL path) does.

  `resizer='opencv'` (crop-then-resize only; the train crop) cuts the box rounded to whole
  pixels and resizes it with `cv2.resize`: bilinear (INTER_LINEAR) when the crop is less than
  twice the output in both directions (always, after a JPEG's reduced-size decode), else the
  area average (INTER_AREA: each output pixel the mean of the source pixels it covers,
  antialiased). Not Pillow's pixels (within a few levels on photos), about 5x faster
  (docs/benchmarks.md "Host input pipeline"); deterministic, so batches still do not depend on
  workers or hosts.

  `crop_first=True` is crop-then-resize (torchvision's `RandomResizedCrop`): the filter sees no
  pixel outside the box. `crop_first=False` is resize-then-crop (`Resize` + `CenterCrop`): the
  filter reaches past the box's edges as it would in the whole resized image. Either way only
  the pixels under the box and the filter's support are handed to Pillow. `flip` mirrors the
  output left-right (on Pillow's image: a quarter of the cost of flipping the numpy batch)."""
  out_w, out_h = size
  if resizer == 'opencv' and crop_first:
    if cv2 is None:
      raise ValueError("resizer='opencv' needs OpenCV (pip install opencv-python-headless).")
    return _resize_opencv(pixels, box, size, flip)
  if resizer not in RESIZERS:
    raise ValueError(f'resizer {resizer!r}: use one of {", ".join(RESIZERS)}.')
  left, top, w, h = box
  channels = pixels.shape[2]
  # Pillow's bilinear filter reaches one source pixel per unit of scale beyond the box's edges.
  margin_x, margin_y = ((0.0, 0.0) if crop_first else
                        (max(1.0, w / out_w) + 1, max(1.0, h / out_h) + 1))
  x0, y0 = max(int(math.floor(left - margin_x)), 0), max(int(math.floor(top - margin_y)), 0)
  x1 = min(int(math.ceil(left + w + margin_x)), pixels.shape[1])
  y1 = min(int(math.ceil(top + h + margin_y)), pixels.shape[0])
  if (w, h) == (out_w, out_h) and float(left).is_integer() and float(top).is_integer():
    top, left = int(top), int(left)  # the box is the output already: a copy, no resampling
    region = pixels[top:top + out_h, left:left + out_w]
    return np.ascontiguousarray(region[:, ::-1] if flip else region)
  region = pixels[y0:y1, x0:x1]
  image = Image.fromarray(region[..., 0] if channels == 1 else region)
  out = image.resize((out_w, out_h), Image.BILINEAR,
                     box=(left - x0, top - y0, left - x0 + w, top - y0 + h))
  if flip:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out).reshape(out_h, out_w, channels)


def _resize_opencv(pixels: np.ndarray, box: Sequence[float], size: tuple[int, int],
                   flip: bool) -> np.ndarray:
  """`resize_box(..., crop_first=True, resizer='opencv')`."""
  out_w, out_h = size
  height, width, channels = pixels.shape
  left, top = min(int(round(box[0])), width - 1), min(int(round(box[1])), height - 1)
  w = max(min(int(round(box[2])), width - left), 1)
  h = max(min(int(round(box[3])), height - top), 1)
  region = pixels[top:top + h, left:left + w]
  if (w, h) == (out_w, out_h):
    out = region
  else:
    # Below 2x, bilinear reads every source pixel (little aliasing) at a quarter of the area
    # average's cost; a JPEG's reduced decode leaves its crops below 2x of the output.
    far = w >= 2 * out_w or h >= 2 * out_h
    out = cv2.resize(region, (out_w, out_h),
                     interpolation=cv2.INTER_AREA if far else cv2.INTER_LINEAR)
  if flip:
    out = cv2.flip(out, 1)  # a SIMD copy: ~5x numpy's out[:, ::-1] made contiguous
  return np.ascontiguousarray(out.reshape(out_h, out_w, channels))


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style crop box (left, top, width, height): random area fraction and aspect.

  torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area in `scale` x the
  image's and a log-uniform aspect ratio in `ratio`; the first that fits is placed uniformly;
  otherwise the center crop of the closest allowed aspect ratio. `jkd.data.augment.
  random_resized_crop` crops decoded images with it, so a decoded image and its file get the
  same crop.
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target_area * aspect)))
    h = int(round(np.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int,
                    crop_fraction: float = 0.875) -> tuple[float, float, float, float]:
  """The box (left, top, width, height) in source pixels of ImageNet's eval crop: resize the
  shorter side to size / crop_fraction, then take the center size x size (as
  `jkd.data.augment.center_crop`, fused into one resize of the box)."""
  short = int(round(size / crop_fraction))
  if height <= width:
    new_h, new_w = short, max(short, int(round(width * short / height)))
  else:
    new_h, new_w = max(short, int(round(height * short / width))), short
  sx, sy = width / new_w, height / new_h
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return left * sx, top * sy, size * sx, size * sy


def train_crop(data: bytes, rng: np.random.Generator, size: int, mode: str = 'RGB',
               scale: Sequence[float] = (0.08, 1.0),
               ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = False,
               resizer: str = 'pillow') -> np.ndarray:
  """ImageNet's train transform: random-resized crop to size x size, mirrored if `flip`
  (`resizer`: see `resize_box`).

  Returns:
    uint8 [size, size, C].
  """
  width, height, _ = header(data)
  box = random_crop_box(width, height, rng, scale, ratio)
  return decode_crop(data, box, (size, size), mode, (width, height), crop_first=True,
                     flip=flip, resizer=resizer)


def eval_crop(data: bytes, size: int, mode: str = 'RGB',
              crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet's eval transform: shorter side to size / crop_fraction, center size x size.

  Returns:
    uint8 [size, size, C].
  """
  width, height, _ = header(data)
  box = center_crop_box(width, height, size, crop_fraction)
  return decode_crop(data, box, (size, size), mode, (width, height), crop_first=False)
