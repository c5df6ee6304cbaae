"""Random-access data sources: Fashion-MNIST IDX files, prepared TFDS datasets, synthetic.

Every source has `len(source)` and `source[i] -> {'image': uint8 [H, W, C] (or encoded bytes for
variable-size TFDS images), 'label': int}`, so the pipeline can shuffle, shard and checkpoint
by index alone; in-memory sources also have `get_batch(rows)` for one vectorized gather.
"""
import dataclasses
import functools
import gzip
import os
import re
import zlib
from typing import Any

import numpy as np

from jkd import storage
from jkd.errors import UserError

# Directories searched for the four Fashion-MNIST IDX files after `cfg.data_dir` and
# $JKD_FASHION_MNIST_DIR. A module-level tuple so that tests can empty it.
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_ENV = 'JKD_FASHION_MNIST_DIR'
_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')

# Per-channel pixel mean and std in units of pixel/255 (0..1), as `normalize` expects.
_STATS = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'mnist': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Anything else maps 0..1 onto -1..1: a safe default when a dataset's statistics are unknown,
# the same choice big_vision makes with `value_range(-1, 1)`.
_DEFAULT_STAT = 0.5


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a trainer need to know about a dataset.

  Attributes:
    name: dataset name as in the config ('fashion_mnist', 'cifar10', ...).
    num_examples: examples per split, keyed by the config's split strings (e.g. 'train',
      'test', 'train[:50000]').
    num_classes: number of labels.
    image_shape: (H, W, C) of the images the pipeline yields (after resizing).
    mean: per-channel mean of pixel/255, length C.
    std: per-channel std of pixel/255, length C.
    class_names: the name of each label where the dataset has them (else empty).
  """
  name: str
  num_examples: dict[str, int]
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...] = ()


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads `cfg.key` from a ConfigDict, a dict or any object, with a default."""
  if hasattr(cfg, 'get'):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def dataset_stats(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Returns (mean, std) per channel for `name`, in units of pixel/255."""
  base = name.split(':')[0].split('/')[0]
  if base.startswith('imagenet'):
    base = 'imagenet2012'
  if base in _STATS:
    return _STATS[base]
  return (_DEFAULT_STAT,) * channels, (_DEFAULT_STAT,) * channels


# ---------------------------------------------------------------- split strings


_SPLIT_RE = re.compile(r'^\s*(\w+)\s*(?:\[\s*([-\d.]*%?)\s*:\s*([-\d.]*%?)\s*\])?\s*$')


def parse_split(split: str, sizes: dict[str, int]) -> tuple[str, slice]:
  """Parses a TFDS-style split string such as 'train', 'train[:50000]' or 'test[10%:]'.

  Args:
    split: split name with an optional `[a:b]` range; bounds are example counts (negative
      counts from the end) or percents of the split, which round to the nearest example.
    sizes: number of examples of each base split.

  Returns:
    (base split name, slice with concrete non-negative bounds).
  """
  match = _SPLIT_RE.match(split)
  if not match or match.group(1) not in sizes:
    raise UserError(
        f'Unknown split {split!r}: use one of {sorted(sizes)}, optionally sliced as '
        f"'train[:50000]', 'train[50000:]' or 'train[:90%]'.")
  base, lo, hi = match.groups()
  n = sizes[base]

  def bound(text, default):
    if not text:
      return default
    if text.endswith('%'):
      return int(round(float(text[:-1]) * n / 100))
    return int(text)

  start, stop, _ = slice(bound(lo, 0), bound(hi, n)).indices(n)
  return base, slice(start, max(start, stop))


# ---------------------------------------------------------------- Fashion-MNIST IDX


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array.

  The header is two zero bytes, a type byte (0x08 = uint8), a rank byte, then `rank` big-endian
  int32 dimensions: magic 2051 for image files (rank 3), 2049 for label files (rank 1).

  Args:
    path: path or URL (gs://...) of a `*-ubyte` or `*-ubyte.gz` file.

  Returns:
    uint8 array of shape [N, H, W] for images, [N] for labels.
  """
  data = storage.read_bytes(path)
  if path.endswith('.gz'):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
      raise UserError(f'{path} is not a valid gzip file ({type(e).__name__}: {e}): it is '
                      'truncated or damaged; re-download it (or reinstall '
                      'dataset-fashion-mnist).') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise UserError(f'{path} is not a uint8 IDX file (bad magic number); re-download it.')
  rank = data[3]
  dims = tuple(int(d) for d in np.frombuffer(data, dtype='>i4', count=rank, offset=4))
  offset = 4 + 4 * rank
  if len(data) - offset != int(np.prod(dims)):
    raise UserError(f'{path} is truncated: header says {dims}, file has '
                    f'{len(data) - offset} bytes of data; re-download it.')
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx_file(directory: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = storage.join(directory, name)
    if storage.isfile(path):
      return path
  return None


def fashion_mnist_search_path(data_dir: str | None) -> list[str]:
  """Directories searched for the IDX files, in order.

  A `data_dir` the user names is the only place looked at: silently reading another copy would
  hide a typo in the path.
  """
  dirs = [data_dir] if data_dir else [os.environ.get(FASHION_MNIST_ENV), *FASHION_MNIST_DIRS]
  return [d if storage.is_remote(d) else os.path.expanduser(d) for d in dirs if d]


def _fashion_mnist_dir(data_dir: str | None) -> str | None:
  for directory in fashion_mnist_search_path(data_dir):
    stems = [s for pair in _FMNIST_FILES.values() for s in pair]
    if all(_find_idx_file(directory, s) for s in stems):
      return storage.resolve(directory)
  return None


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist_split(directory: str, base: str) -> tuple[np.ndarray, np.ndarray]:
  # Cached per process: decompressing the training set takes a fraction of a second, and every
  # iterator (train, eval, each test) would otherwise repeat it.
  image_stem, label_stem = _FMNIST_FILES[base]
  images = read_idx(_find_idx_file(directory, image_stem))
  labels = read_idx(_find_idx_file(directory, label_stem))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise UserError(f'Fashion-MNIST files in {directory} do not match: images '
                    f'{images.shape}, labels {labels.shape}; re-download them.')
  images = images[..., None]  # [N, 28, 28, 1]: every source yields HWC.
  images.setflags(write=False)
  labels = labels.astype(np.int32)
  labels.setflags(write=False)
  return images, labels


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads a Fashion-MNIST split from the IDX files.

  Args:
    split: 'train' (60000), 'test' (10000), or a slice of them such as 'train[:50000]'.
    data_dir: directory holding the four IDX files; searched before $JKD_FASHION_MNIST_DIR and
      `FASHION_MNIST_DIRS`.

  Returns:
    (images uint8 [N, 28, 28, 1], labels int32 [N]), read-only.

  Raises:
    UserError: no directory holds the files.
  """
  directory = _fashion_mnist_dir(data_dir)
  if directory is None:
    raise UserError(_missing_fashion_mnist_message(data_dir, None))  # TFDS not tried here
  base, sl = parse_split(split, {'train': 60000, 'test': 10000})
  images, labels = _load_fashion_mnist_split(directory, base)
  return images[sl], labels[sl]


def _missing_fashion_mnist_message(data_dir, tfds_problem: str | None) -> str:
  searched = ', '.join(fashion_mnist_search_path(data_dir)) or '(no directories)'
  tfds_clause = f', and TFDS fashion_mnist {tfds_problem}' if tfds_problem else ''
  return (
      f'Fashion-MNIST not found: no directory among [{searched}] holds the four IDX files '
      f'(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
      f't10k-labels-idx1-ubyte.gz){tfds_clause}. To fix it, either run `apt-get install '
      f'dataset-fashion-mnist` (installs them in /usr/share/datasets/fashion-mnist), or download '
      f'the four files from https://github.com/zalandoresearch/fashion-mnist into a directory '
      f'DIR and pass --config.data.data_dir=DIR (or set ${FASHION_MNIST_ENV}=DIR), or prepare '
      f'the TFDS dataset with `tfds build fashion_mnist --data_dir DIR '
      f"--file_format=array_record` (needs TensorFlow: pip install 'jkd[tf]').")


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0].rstrip(".") if lines else ""}'


def _tfds_problem(name: str, data_dir: str | None, error: BaseException) -> str:
  """Says in a few words why `tfds.data_source` failed: unknown name, not prepared, or other."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    return f'is not a known TFDS dataset name ({_first_line(error)})'
  if not prepared:
    return f'is not prepared in {where}'
  return f'cannot be read from {where} ({_first_line(error)})'


class ArraySource:
  """In-memory source over (images [N, H, W, C], labels [N])."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {'image': self.images[index], 'label': self.labels[index]}

  def get_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [R, H, W, C], labels [R]) at `rows`, in one gather."""
    return self.images[rows], self.labels[rows]

  def __repr__(self) -> str:
    return f'ArraySource(images={self.images.shape}, labels={self.labels.shape})'


# ---------------------------------------------------------------- TFDS


class TfdsSource:
  """A prepared TFDS split read through `tfds.data_source` (ArrayRecord, no TensorFlow).

  Attributes:
    native_shape: the dataset's image feature shape; None entries mark variable sizes.
    num_classes: number of labels.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    try:
      # download=False: building a TFDS dataset needs TensorFlow and network; never start it
      # implicitly from inside a training run.
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      features = self._source.dataset_info.features
    except Exception as e:  # pylint: disable=broad-except  (tfds raises many kinds)
      raise UserError(_missing_tfds_message(name, split, _tfds_problem(name, data_dir, e))) from e
    if 'image' not in features or 'label' not in features:
      raise UserError(f'TFDS dataset {name!r} has features {list(features)}; jkd reads image '
                      f"classification datasets with 'image' and 'label' features.")
    self.native_shape = tuple(features['image'].shape)
    self.num_classes = int(features['label'].num_classes)
    self.class_names = tuple(getattr(features['label'], 'names', None) or ())

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    return {'image': example['image'], 'label': example['label']}

  def __repr__(self) -> str:
    return f'TfdsSource({self._source!r})'


def _missing_tfds_message(name: str, split: str, problem: str) -> str:
  return (
      f'TFDS dataset {name!r} (split {split!r}) {problem}. jkd reads prepared TFDS datasets in '
      f'ArrayRecord format without TensorFlow; to prepare one, run `tfds build {name} '
      f'--data_dir DIR --file_format=array_record` (needs TensorFlow: pip install \'jkd[tf]\'), '
      f'then pass --config.data.data_dir=DIR. Names are listed by `tfds.list_builders()`.')


# ---------------------------------------------------------------- synthetic


class SyntheticSource:
  """Random uint8 images and labels, a pure function of the index (no files needed)."""

  def __init__(self, num_examples: int, image_shape: tuple[int, int, int], num_classes: int,
               seed: int = 0, offset: int = 0):
    self.num_examples, self.image_shape = num_examples, tuple(image_shape)
    self.num_classes, self.seed, self.offset = num_classes, seed, offset

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng((self.seed, self.offset + index))
    image = rng.integers(0, 256, self.image_shape, dtype=np.uint8)
    return {'image': image, 'label': np.int32(rng.integers(self.num_classes))}


def _synthetic_spec(cfg) -> tuple[tuple[int, int, int], int]:
  size = int(cfg_get(cfg, 'image_size', 32))
  return (size, size, int(cfg_get(cfg, 'channels', 3))), int(cfg_get(cfg, 'num_classes', 10))


# ---------------------------------------------------------------- dispatch


def open_source(cfg, split: str):
  """Opens `split` of the dataset named by `cfg.name`.

  Args:
    cfg: data config (see `default_data_config`).
    split: split string, e.g. 'train', 'test', 'train[:50000]'.

  Returns:
    A random-access source (ArraySource, TfdsSource or SyntheticSource).

  Raises:
    UserError: the dataset is missing or the split is unknown.
  """
  name = cfg_get(cfg, 'name')
  data_dir = cfg_get(cfg, 'data_dir')
  if name == 'folder':
    return _open_folder(cfg, split)
  if name == 'synthetic':
    image_shape, num_classes = _synthetic_spec(cfg)
    base, sl = parse_split(split, {'train': int(cfg_get(cfg, 'num_examples', 50000)),
                                   'test': int(cfg_get(cfg, 'num_eval_examples', 10000))})
    # Seeded by (split, position) so that 'train[:10]' and 'train' agree on shared examples.
    return SyntheticSource(sl.stop - sl.start, image_shape, num_classes,
                           seed=['train', 'test'].index(base), offset=sl.start)
  if name == 'fashion_mnist':
    if _fashion_mnist_dir(data_dir) is not None:
      return ArraySource(*load_fashion_mnist(split, data_dir))
    # The IDX files are the primary copy; a prepared TFDS dataset is the fallback.
    try:
      return TfdsSource('fashion_mnist', split, data_dir)
    except UserError as e:
      problem = _tfds_problem('fashion_mnist', data_dir, e.__cause__)
      raise UserError(_missing_fashion_mnist_message(data_dir, problem)) from None
  return TfdsSource(name, split, data_dir)


def _open_folder(cfg, split: str):
  """The user's images (`jkd.data.folder`), or the shards `jkd data prepare` made of them."""
  from jkd.data import folder  # pylint: disable=g-import-not-at-top
  from jkd.data import prepare  # pylint: disable=g-import-not-at-top
  root = folder.data_dir(cfg)
  if prepare.is_prepared(root):
    return prepare.PreparedSource(root, split, parse_split)
  return folder.open_split(cfg, split, parse_split)


def get_info(cfg) -> DatasetInfo:
  """Returns the `DatasetInfo` of the dataset named by `cfg.name` (opens both splits).

  `image_shape` is what the pipeline yields: (image_size, image_size, C) when `cfg.image_size`
  is set, else the native shape.
  """
  name = cfg_get(cfg, 'name')
  splits = [cfg_get(cfg, 'train_split', 'train'), cfg_get(cfg, 'eval_split', 'test')]
  sources = {split: open_source(cfg, split) for split in dict.fromkeys(splits)}
  source = sources[splits[0]]
  class_names = tuple(getattr(source, 'class_names', ()))
  if isinstance(source, SyntheticSource):
    native, num_classes = source.image_shape, source.num_classes
  elif isinstance(source, ArraySource):
    native, num_classes, class_names = source.images.shape[1:], 10, FASHION_MNIST_CLASSES
  else:
    native, num_classes = source.native_shape, source.num_classes
  size = cfg_get(cfg, 'image_size')
  if size is None and None in native[:2]:
    raise UserError(f'Dataset {name!r} has images of varying size {native}: set '
                    f'--config.data.image_size (e.g. 224).')
  height, width = (size, size) if size else native[:2]
  channels = native[2] if len(native) > 2 and native[2] else 3
  if name == 'folder':
    from jkd.data import folder  # pylint: disable=g-import-not-at-top
    mean, std = folder.stats(cfg, channels)
  else:
    mean, std = dataset_stats(name, channels)
  return DatasetInfo(name=name, num_examples={k: len(v) for k, v in sources.items()},
                     num_classes=num_classes, image_shape=(int(height), int(width), channels),
                     mean=tuple(mean), std=tuple(std), class_names=class_names)
