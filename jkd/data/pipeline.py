"""Grain pipelines: a checkpointable infinite train iterator and a padded one-pass eval iterable.

Both are a `grain.MapDataset` over batch indices whose elements are whole local batches, read
by Grain's threads or worker processes (`jkd.data.workers`); the train iterator's state is the
number of batches it has yielded. Each batch is a pure function of
(seed, step, process): the order is a fresh permutation of the split per epoch, each process
reads a disjoint slice of every global batch, and augmentation draws come from (seed, step, row
of the global batch). So batches do not depend on the number of reader threads or processes,
and resuming needs only the number of batches consumed. Working on whole batches (one numpy
gather, one vectorized crop and flip) is over 10x faster than Grain's per-example `random_map`
on small images.
"""
import functools
import math
from typing import Any, Callable, Iterator

import grain
import ml_collections
import numpy as np

from jkd.data import augment
from jkd.data import folder
from jkd.data import jpeg
from jkd.data import sources
from jkd.data import workers
from jkd.errors import UserError

cfg_get = sources.cfg_get

# Per-dataset defaults for `default_data_config`: (train split, eval split, image_size,
# crop_padding, flip). Horizontal flips keep Fashion-MNIST's classes (a mirrored shirt is a
# shirt); crop padding is the usual ~1/8 of the side.
_DEFAULTS = {
    'fashion_mnist': ('train', 'test', None, 2, True),
    'mnist': ('train', 'test', None, 2, False),
    'cifar10': ('train', 'test', None, 4, True),
    'cifar100': ('train', 'test', None, 4, True),
    'imagenet2012': ('train', 'validation', 224, 0, True),
    'synthetic': ('train', 'test', 32, 0, False),
    'folder': ('train', 'val', 224, 0, True),
}


def default_data_config(name: str = 'fashion_mnist') -> ml_collections.ConfigDict:
  """Returns the data config for `name`, with every field the pipeline reads.

  Fields: name, data_dir (IDX directory for fashion_mnist, TFDS data_dir otherwise; None = the
  default search path), train_split, eval_split, image_size (None = native size), crop_padding
  (0 = no random crop), flip, num_workers (reader threads; 0 = in the calling thread),
  prefetch (batches buffered ahead), crop_fraction (eval center crop of variable-size images),
  inception_crop (random-resized-crop for variable-size train images), train_resize ('opencv' or
  'pillow': how image files' train crops are resized, `jkd.data.jpeg.resize_box`), randaugment_ops /
  randaugment_magnitude / randaugment_std and random_erasing (device-side, in `jkd train` and
  `jkd distill`'s steps: `jkd.data.randaugment`), repeated_aug (examples shown that many times
  per epoch), and for 'synthetic': num_classes, channels, num_examples, num_eval_examples; for
  'folder' (the user's images, `jkd.data.folder`): dir, holdout, split_seed, mode, mean, std,
  worker_processes.
  """
  train_split, eval_split, image_size, padding, flip = _DEFAULTS.get(
      name, ('train', 'test', None, 0, True))
  placeholder = ml_collections.config_dict.placeholder
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  cfg.data_dir = placeholder(str)
  cfg.train_split = train_split
  cfg.eval_split = eval_split
  cfg.image_size = placeholder(int) if image_size is None else image_size
  cfg.crop_padding = padding
  cfg.flip = flip
  cfg.num_workers = 2
  cfg.prefetch = 4
  cfg.crop_fraction = 0.875
  cfg.inception_crop = True
  cfg.crop_scale = (0.08, 1.0)   # Inception crop area range (MAE: (0.2, 1.0); SimMIM: (0.67, 1)).
  cfg.crop_ratio = (3 / 4, 4 / 3)
  # How image files' train crops are resized: 'opencv' (bilinear; ~5x faster than Pillow,
  # the input pipeline's largest cost at ImageNet size) or 'pillow' (torchvision's pixels).
  # Eval crops always use Pillow, pixel for pixel what torchvision and timm evaluate on.
  cfg.train_resize = 'opencv'
  # DeiT's recipe basics, off by default: RandAugment and random erasing run on the device in
  # the train step (jkd.data.randaugment; DeiT: 2 ops, magnitude 9, std 0.5, erasing 0.25);
  # repeated augmentation shows each example of an epoch this many times, in the same batch
  # with different draws (DeiT: 3).
  cfg.randaugment_ops = 0
  cfg.randaugment_magnitude = 9.0
  cfg.randaugment_std = 0.5
  cfg.random_erasing = 0.0
  cfg.repeated_aug = 1
  if name == 'synthetic':
    cfg.num_classes = 10
    cfg.channels = 3
    cfg.num_examples = 50000
    cfg.num_eval_examples = 10000
  if name == 'folder':
    folder.add_config_fields(cfg)
  return cfg


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
  return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f'Batch size {global_batch_size} must be a positive multiple of the number '
                    f'of processes ({process_count}): each process reads an equal slice.')
  return global_batch_size // process_count


def _read_options(cfg) -> grain.ReadOptions:
  threads = int(cfg_get(cfg, 'num_workers', 0))
  # Grain warns when fewer batches are buffered than threads read.
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(int(cfg_get(cfg, 'prefetch', 2)), threads))


def check_crop(crop_scale, crop_ratio) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """`config.data.crop_scale` / `crop_ratio` as float pairs; UserError unless each is (low,
  high) with 0 < low <= high (and high <= 1 for the area fraction)."""
  try:
    scale = tuple(float(v) for v in crop_scale)
    ratio = tuple(float(v) for v in crop_ratio)
  except (TypeError, ValueError):
    scale = ratio = ()
  if (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1
      or len(ratio) != 2 or not 0 < ratio[0] <= ratio[1] or not math.isfinite(ratio[1])):
    raise UserError(f'config.data.crop_scale={crop_scale} / crop_ratio={crop_ratio}: '
                    'give (low, high) with 0 < low <= high <= 1 for the area fraction and '
                    '0 < low <= high for the aspect ratio, e.g. crop_scale=(0.2, 1.0).')
  return scale, ratio


class _BatchReader:
  """Reads (`read`) and augments (`augment`) this process's rows of one global batch."""

  def __init__(self, cfg, source, *, train: bool, seed: int = 0):
    self.source, self.train, self.seed = source, train, seed
    self.size = cfg_get(cfg, 'image_size')
    native = getattr(source, 'native_shape', None)
    self.variable = native is not None and None in native[:2]
    if self.variable and not self.size:
      raise UserError(f'Dataset {cfg_get(cfg, "name")!r} has images of varying size: set '
                      f'--config.data.image_size (e.g. 224).')
    self.padding = int(cfg_get(cfg, 'crop_padding', 0)) if train else 0
    self.flip = bool(cfg_get(cfg, 'flip', False)) and train
    self.inception = train and self.variable and bool(cfg_get(cfg, 'inception_crop', True))
    self.crop_fraction = float(cfg_get(cfg, 'crop_fraction', 0.875))
    self.resizer = cfg_get(cfg, 'train_resize', 'pillow')
    if self.inception and self.resizer == 'opencv' and jpeg.cv2 is None:  # no silent switch
      raise UserError("config.data.train_resize='opencv' needs OpenCV: pip install "
                      "opencv-python-headless (a dependency of jkd), or set "
                      "--config.data.train_resize=pillow.")
    self.crop_scale, self.crop_ratio = check_crop(cfg_get(cfg, 'crop_scale', (0.08, 1.0)),
                                                  cfg_get(cfg, 'crop_ratio', (3 / 4, 4 / 3)))
    self.mode = getattr(source, 'mode', 'RGB')  # how encoded images are read: 'RGB' or 'L'
    # In-memory arrays at the wanted size need no per-example work: one fancy-index gather.
    self.gather = hasattr(source, 'get_batch') and (
        not self.size or source.get_batch(np.zeros(1, np.int64))[0].shape[1:3] ==
        (self.size, self.size))

  def _image(self, image, rng, path: str | None = None, flip: bool = False) -> np.ndarray:
    if isinstance(image, (bytes, np.bytes_)) and self.size:
      return self._crop_file(bytes(image), rng, path, flip)
    image = self._array_image(image, rng)
    return image[:, ::-1] if flip else image

  def _array_image(self, image, rng) -> np.ndarray:
    image = augment.decode(image)
    if self.inception:
      return augment.random_resized_crop(image, rng, self.size, self.crop_scale, self.crop_ratio)
    if self.variable:
      return augment.center_crop(image, self.size, self.crop_fraction)
    if self.size:
      return augment.resize(image, self.size, self.size)
    return image

  def _crop_file(self, data: bytes, rng, path: str | None, flip: bool) -> np.ndarray:
    """Encoded bytes straight to the crop: `jkd.data.jpeg` decodes only the size it needs."""
    try:
      if self.inception:
        return jpeg.train_crop(data, rng, self.size, self.mode, self.crop_scale, self.crop_ratio,
                               flip, self.resizer)
      if self.variable:
        image = jpeg.eval_crop(data, self.size, self.mode, self.crop_fraction)
      else:
        width, height, _ = jpeg.header(data)
        image = jpeg.decode_crop(data, (0, 0, width, height), (self.size, self.size), self.mode)
      return image[:, ::-1] if flip else image
    except jpeg.ImageReadError as e:
      raise UserError(folder.unreadable_message(path or '(in the dataset)', e)) from None

  @property
  def flips_each_image(self) -> bool:
    """Whether `read` takes the flips: images read one at a time are mirrored as they are
    cropped (cheaper than flipping the batch); not with pad-crops, which come first."""
    return self.flip and not self.padding and not self.gather

  def read(self, rows: np.ndarray, step: int, local: slice,
           flips: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 [R, H, W, C], int32 [R]) for `rows`, the slice `local` of global batch `step`,
    each row mirrored where `flips` [R] says.

    Random draws are made for every row of the global batch and then sliced, so a row's
    augmentation depends on (seed, step, row) only, not on which process reads it.
    """
    if self.gather:
      images, labels = self.source.get_batch(rows)
    else:
      row_ids = range(local.start, local.start + len(rows))
      examples = [self.source[int(r)] for r in rows]
      flips = np.zeros(len(rows), bool) if flips is None else flips
      images = np.stack([
          self._image(ex['image'], np.random.default_rng([self.seed, 2, step, i]),
                      ex.get('path'), bool(f))
          for ex, i, f in zip(examples, row_ids, flips)])
      labels = np.array([ex['label'] for ex in examples])
    return images, labels.astype(np.int32)

  def draws(self, step: int, global_size: int, local: slice) -> tuple[np.ndarray, np.ndarray]:
    """(shifts [R, 2], flips [R]) of this process's rows of global batch `step`."""
    rng = np.random.default_rng([self.seed, 1, step])
    shifts = rng.integers(-self.padding, self.padding + 1, size=(global_size, 2))[local]
    flips = (rng.random(global_size) < 0.5)[local] & self.flip
    return shifts, flips

  def augment(self, images: np.ndarray, step: int, global_size: int,
              local: slice, flipped: bool = False) -> np.ndarray:
    """Random pad-crop and flip of uint8 [R, H, W, C], drawn per row of the global batch
    (`flipped`: `read` has applied the flips already)."""
    if not (self.padding or self.flip):
      return images
    shifts, flips = self.draws(step, global_size, local)
    images = augment.crop_batch(images, shifts, self.padding)
    return images if flipped else augment.flip_batch(images, flips)


# Settings that fix the order of batches but enter the iterator state only when not at their
# default (states saved before they existed resume unchanged).
_OPTIONAL_IDENTITY = {'repeated_aug': 1}


class TrainIterator:
  """Infinite iterator of local train batches with JSON-serializable, resumable state.

  The state is the number of global batches already yielded plus the settings that fix the
  order (dataset, split, seed, global batch size). It holds no process count: batch k of a run
  is the same global batch whatever the number of processes, so a run may resume on another
  number of hosts.

  Batches are read by `make(first)`, a Grain iterator starting at batch `first`, created at the
  first `next` (so a `set_state` before it starts no worker twice); resuming makes a new one.
  The count of batches yielded is the state, whatever Grain's own state looks like (that of
  worker processes depends on their number).
  """

  def __init__(self, make: Callable[[int], Iterator], identity: dict[str, Any]):
    self._make = make
    self._identity = identity
    self._next = 0
    self._iterator = None

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make(self._next)
    batch = next(self._iterator)
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Returns {'next_batch': int, 'dataset', 'split', 'seed', 'global_batch_size'}."""
    return {'next_batch': self._next, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes so that the next batch is batch `state['next_batch']` of this run."""
    changed = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    for k, default in _OPTIONAL_IDENTITY.items():  # Recorded only when not the default.
      saved, now = state.get(k, default), self._identity.get(k, default)
      if saved != now:
        changed[k] = (saved, now)
    if changed:
      detail = ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in changed.items())
      raise UserError(f'The checkpointed data iterator was made with other settings ({detail}); '
                      f'resuming would not continue the same sequence of batches. Restore the '
                      f'original settings, or start a new workdir.')
    self.close()
    self._next = int(state['next_batch'])

  def close(self) -> None:
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
    self._iterator = None


@functools.lru_cache(maxsize=4)  # reader threads straddle at most two epochs
def _permutation(seed: int, epoch: int, num_examples: int, repeats: int = 1) -> np.ndarray:
  order = np.random.default_rng([seed, 0, epoch]).permutation(num_examples)
  if repeats > 1:  # DeiT's RASampler: each index `repeats` times in a row, epoch length kept.
    order = np.repeat(order, repeats)[:num_examples]
  return order


class _TrainBatches:
  """`batches(step, _)`: this process's rows of global batch `step`, read and augmented.

  A module-level class rather than a closure so that Grain's worker processes can unpickle it.
  """

  def __init__(self, reader: _BatchReader, *, num_examples: int, steps_per_epoch: int,
               global_batch_size: int, local: slice, seed: int, repeats: int = 1,
               with_index: bool = False):
    self.reader, self.num_examples, self.seed = reader, num_examples, seed
    self.repeats, self.with_index = repeats, with_index
    self.steps_per_epoch, self.global_batch_size, self.local = (steps_per_epoch,
                                                                global_batch_size, local)

  def __call__(self, step: int, _) -> dict[str, np.ndarray]:
    epoch, start = divmod(step, self.steps_per_epoch)
    start *= self.global_batch_size  # the tail of each epoch's permutation is dropped
    order = _permutation(self.seed, epoch, self.num_examples, self.repeats)
    rows = order[start + self.local.start:start + self.local.stop]
    reader, size = self.reader, self.global_batch_size
    flips = reader.draws(step, size, self.local)[1] if reader.flips_each_image else None
    images, labels = reader.read(rows, step, self.local, flips)
    out = {'image': reader.augment(images, step, size, self.local, flipped=flips is not None),
           'label': labels}
    if self.with_index:
      out['index'] = rows.astype(np.int32)
    return out


def make_train_iterator(cfg, *, global_batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None, with_index: bool = False
                        ) -> TrainIterator:
  """Returns an infinite, checkpointable iterator over `cfg.train_split`.

  Each epoch is a fresh global shuffle of the split (seeded by `seed` and the epoch), cut into
  `len // global_batch_size` global batches (the remainder is dropped). Process p yields rows
  [p * B_local, (p + 1) * B_local) of every global batch. Crop/flip (per `cfg.crop_padding`,
  `cfg.flip`) run on the host with randomness from (seed, epoch, index), so batches do not
  depend on `cfg.num_workers` (threads) or `cfg.worker_processes`.

  Args:
    cfg: data config (see `default_data_config`).
    global_batch_size: batch size summed over processes.
    seed: shuffle and augmentation seed.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    with_index: also yield each example's position in the split, 'index' int32 [B_local]
      (CRD's memory banks are indexed by it).

  Returns:
    `TrainIterator` yielding {'image': uint8 [B_local, H, W, C], 'label': int32 [B_local]}.
  """
  index, count = _process(process_index, process_count)
  local_size = _local_batch_size(global_batch_size, count)
  local = slice(index * local_size, (index + 1) * local_size)
  split = cfg_get(cfg, 'train_split', 'train')
  source = sources.open_source(cfg, split)
  num_examples = len(source)
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise UserError(f'Split {split!r} has {num_examples} examples, fewer than one global batch '
                    f'of {global_batch_size}: lower the batch size or use a larger split.')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}.')
  repeats = int(cfg_get(cfg, 'repeated_aug', 1) or 1)
  if repeats < 1:
    raise UserError(f'config.data.repeated_aug={repeats}: use 1 (off) or more (DeiT: 3).')
  batches = _TrainBatches(_BatchReader(cfg, source, train=True, seed=seed),
                          num_examples=num_examples, steps_per_epoch=steps_per_epoch,
                          global_batch_size=global_batch_size, local=local, seed=seed,
                          repeats=repeats, with_index=with_index)
  ds = grain.MapDataset.range(steps_per_epoch).repeat().map_with_index(batches)
  identity = {'dataset': cfg_get(cfg, 'name'), 'split': split, 'seed': int(seed),
              'global_batch_size': int(global_batch_size),
              **({'repeated_aug': repeats} if repeats > 1 else {})}
  # Element k of `ds` is batch k whatever the slice: resuming at batch `first` reads ds[first:].
  read_options, processes = _read_options(cfg), workers.worker_processes(cfg)
  return TrainIterator(lambda first: workers.iterate(ds[first:], read_options, processes),
                       identity)


class EvalIterable:
  """One pass over a split in fixed-size padded batches; each `iter()` starts a fresh pass.

  Attributes:
    num_examples: examples in the split (all processes together).
  """

  def __init__(self, dataset: grain.MapDataset, read_options: grain.ReadOptions,
               num_examples: int, processes: int = 0):
    self._dataset, self._read_options = dataset, read_options
    self.num_examples, self._processes = num_examples, processes

  def __len__(self) -> int:
    return len(self._dataset)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return workers.iterate(self._dataset, self._read_options, self._processes)


class _EvalBatches:
  """`batches(step, _)`: this process's rows of eval batch `step`, zero-padded past the end of
  the split (mask 0). A class rather than a closure so that worker processes can unpickle it."""

  def __init__(self, reader: _BatchReader, *, num_examples: int, global_batch_size: int,
               local: slice):
    self.reader, self.num_examples = reader, num_examples
    self.global_batch_size, self.local = global_batch_size, local
    self.blank_shape = (reader.read(np.zeros(1, np.int64), 0, slice(0, 1))[0][0].shape
                        if num_examples else None)

  def __call__(self, step: int, _) -> dict[str, np.ndarray]:
    positions = np.arange(self.local.start, self.local.stop) + step * self.global_batch_size
    valid = positions < self.num_examples
    blank = self.blank_shape
    if valid.any():
      images, labels = self.reader.read(positions[valid], step, self.local)
    else:  # a process past the end of the split in the last batch
      images, labels = np.zeros((0, *blank), np.uint8), np.zeros(0, np.int32)
    if not valid.all():  # the last batch: pad with zeros, masked out
      pad = int((~valid).sum())
      images = np.concatenate([images, np.zeros((pad, *blank), np.uint8)])
      labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    return {'image': images, 'label': labels, 'mask': valid.astype(np.float32)}


def make_eval_iterator(cfg, split: str | None = None, *, global_batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> EvalIterable:
  """Returns a one-pass iterable over all of `split`, in order, without augmentation.

  The split is padded up to a multiple of `global_batch_size` with zero images whose mask is 0,
  so `sum(correct * mask) / sum(mask)` (summed over processes) covers each example exactly once.

  Args:
    cfg: data config (see `default_data_config`).
    split: split string; default `cfg.eval_split`.
    global_batch_size: batch size summed over processes.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    `EvalIterable` yielding {'image': uint8 [B_local, H, W, C], 'label': int32 [B_local],
    'mask': float32 [B_local]}; `len()` is the number of batches.
  """
  index, count = _process(process_index, process_count)
  local_size = _local_batch_size(global_batch_size, count)
  local = slice(index * local_size, (index + 1) * local_size)
  split = split or cfg_get(cfg, 'eval_split', 'test')
  source = sources.open_source(cfg, split)
  num_examples = len(source)
  batches = _EvalBatches(_BatchReader(cfg, source, train=False), num_examples=num_examples,
                         global_batch_size=global_batch_size, local=local)
  ds = grain.MapDataset.range(math.ceil(num_examples / global_batch_size)).map_with_index(
      batches)
  return EvalIterable(ds, _read_options(cfg), num_examples, workers.worker_processes(cfg))


class SyntheticIterator:
  """Yields the same random batch forever; state is empty (there is nothing to resume)."""

  def __init__(self, batch: dict[str, np.ndarray]):
    self._batch = batch

  def __iter__(self) -> 'SyntheticIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._batch

  def get_state(self) -> dict[str, Any]:
    return {}

  def set_state(self, state: dict[str, Any]) -> None:
    del state

  def close(self) -> None:
    pass


def synthetic_batches(*, global_batch_size: int, image_shape: tuple[int, int, int],
                      num_classes: int, seed: int = 0,
                      process_count: int | None = None) -> SyntheticIterator:
  """Returns an infinite iterator of one fixed random batch, for benchmarks (no input cost).

  Args:
    global_batch_size: batch size summed over processes.
    image_shape: (H, W, C).
    num_classes: labels are drawn from [0, num_classes).
    seed: numpy seed of the batch.
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    `SyntheticIterator` yielding {'image': uint8 [B_local, H, W, C], 'label': int32 [B_local]}.
  """
  _, count = _process(0, process_count)
  local = _local_batch_size(global_batch_size, count)
  rng = np.random.default_rng(seed)
  return SyntheticIterator({
      'image': rng.integers(0, 256, (local, *image_shape), dtype=np.uint8),
      'label': rng.integers(0, num_classes, (local,)).astype(np.int32),
  })
