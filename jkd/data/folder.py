"""The user's own images: class folders, split folders and list files, as random-access sources.

`config.data.name = 'folder'` with `config.data.dir` naming one of:
  - split folders, `DIR/<split>/<class>/*.{jpg,jpeg,png,webp}` (torchvision `ImageFolder`'s
    layout per split; `DIR/train` must exist);
  - class folders, `DIR/<class>/*.jpg ...`: a stratified, seeded fraction
    `config.data.holdout` of each class becomes the split 'val', the rest 'train';
  - a list file, `LIST.csv` (`path,label[,split]`, header optional) or `LIST.jsonl` (one
    `{"path": ..., "label": ..., "split": ...}` per line); paths relative to the list's folder;
    without a split column the held-out fraction is drawn as for class folders;
  - a folder written by `jkd data prepare` (ArrayRecord shards, `jkd.data.prepare`).

Classes are the sorted folder names (or label values), as torchvision's `ImageFolder` numbers
them; their names go into each run's checkpoint metadata. Each split lists its files in a fixed
seeded order, so a slice such as 'train[:10%]' samples every class. Images are read as 'RGB' or
'L' (`config.data.mode`; 'auto' picks 'L' when the checked images are all grayscale), decoded
and cropped by `jkd.data.jpeg` in the Grain pipeline.

This module finds the layout, lists folders into splits and checks the result (class count,
image mode, a model's classes); list files are read by `jkd.data.lists`, folders walked (with
their link rules) by `jkd.data.walk`, and classes and splits drawn by `jkd.data.labelling`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import ml_collections
import numpy as np

from jkd.data import jpeg, labelling, lists, walk
from jkd.data.labelling import HOLDOUT_SPLIT, MAX_CLASSES
from jkd.data.walk import IMAGE_EXTENSIONS
from jkd.errors import UserError

LIST_EXTENSIONS = ('.csv', '.jsonl')
# An eval split named 'val' finds a folder's 'validation' or 'test' split when 'val' is absent.
_EVAL_ALIASES = ('val', 'validation', 'test')
_MODE_SAMPLE = 32  # images per split whose header 'auto' mode checks
# ImageNet's statistics for colour photos: what imported ImageNet models expect.
_RGB_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_GRAY_STATS = ((0.5,), (0.5,))


def add_config_fields(cfg: ml_collections.ConfigDict) -> None:
  """Adds the fields of a folder dataset to a data config (`default_data_config('folder')`).

  dir: the folder, list file or prepared folder; holdout: fraction of each class held out as
  'val' when the folder has no split folders; split_seed: seed of that draw and of the order of
  each split; mode: 'auto', 'RGB' or 'L'; mean/std: per-channel statistics of pixel/255 (None:
  ImageNet's for RGB, 0.5 for L); worker_processes: Grain worker processes that decode (0: the
  reader threads of `num_workers` in this process); classes: the class names in label order
  (None: the sorted folder names or label values; given, every class the data has must be
  among them, and a list's labels are these names); follow_links_outside: follow symbolic links
  to folders outside `dir` (refused by default: jkd reads what the dataset folder holds).
  """
  placeholder = ml_collections.config_dict.placeholder
  cfg.dir = ''
  cfg.holdout = 0.1
  cfg.split_seed = 0
  cfg.mode = 'auto'
  cfg.mean = placeholder(tuple)
  cfg.std = placeholder(tuple)
  cfg.worker_processes = 0
  cfg.classes = placeholder(tuple)
  cfg.follow_links_outside = False


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The files of every split of a folder dataset.

  Attributes:
    root: the folder or list file, as given.
    layout: 'splits', 'classes' or 'list'.
    classes: class names; label i is classes[i].
    splits: split name -> (paths: tuple of absolute file paths, labels: int32 [N]).
    mode: 'RGB' or 'L', the mode images are read in.
  """
  root: str
  layout: str
  classes: tuple[str, ...]
  splits: dict[str, tuple[tuple[str, ...], np.ndarray]]
  mode: str

  def resolve_split(self, name: str) -> str:
    """The split a config's split name means ('val' finds 'validation' or 'test')."""
    return resolve_split(name, self.splits, self.root, held_out=self.layout != 'splits')


def resolve_split(name: str, available, root: str, held_out: bool = False) -> str:
  """`name` if `available` has it, else for 'val' / 'validation' / 'test' the first of those
  that it has (folders name their eval split either way).

  Raises:
    UserError: no such split; `held_out` adds how the 'val' split of class folders is made.
  """
  if name in available:
    return name
  if name in _EVAL_ALIASES:
    for alias in _EVAL_ALIASES:
      if alias in available:
        return alias
  hint = ''
  if held_out and name in _EVAL_ALIASES:
    hint = (f' With no split folders, a held-out fraction of each class is the split '
            f"'{HOLDOUT_SPLIT}': set --config.data.holdout (now 0, or too small for the "
            'classes) to a fraction such as 0.1.')
  raise UserError(f'{root!r} has no split {name!r} (it has {sorted(available)}): set '
                  '--config.data.train_split / eval_split to one of those, optionally sliced '
                  f"as 'train[:90%]'.{hint}")


def _cfg(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def _class_files(walker: walk.Walk, split_dir: str, classes: list[str], split: str,
                 owner: dict) -> dict[str, list[str]]:
  files = {}
  for name in classes:
    images = walk.unique(walker.images_under(os.path.join(split_dir, name)), owner, name, split)
    if not images:
      raise UserError(
          f'Class folder {os.path.join(split_dir, name)!r} holds no images (looked for '
          f'{", ".join(IMAGE_EXTENSIONS)}, in any sub-folder). Add its images, or remove the '
          'folder if it is not a class.')
    files[name] = images
  return files


def _index_folder(root: str, holdout: float, seed: int, given, follow_outside: bool):
  walker = walk.Walk(root, follow_outside)
  walker.enter(root)
  top = walker.subdirs(root)
  train = os.path.join(root, 'train')
  owner: dict[str, tuple[str, str, str]] = {}
  train_classes = walker.subdirs(train) if 'train' in top else []
  if train_classes:
    splits = {}
    classes = labelling.named_classes(given, train_classes, repr(train))
    for split in top:
      split_dir = os.path.join(root, split)
      names = train_classes if split == 'train' else walker.subdirs(split_dir)
      if not names:
        loose = [f for f in os.listdir(split_dir) if walk.is_image(f)]
        if loose:
          raise UserError(
              f'{split_dir!r} holds {len(loose)} images but no class folders: put each class '
              f'in {split_dir}/<class>/ (the names of {train}/), or list the files with their '
              'labels in a CSV (path,label,split) and pass it as config.data.dir.')
        continue
      unknown = sorted(set(names) - set(classes))
      if unknown:
        raise UserError(
            f'{split_dir!r} has class folders that {train!r} lacks: {unknown[:5]}. Every '
            "split's classes must be among the train split's; rename or remove those folders.")
      files = _class_files(walker, split_dir, names, split, owner)
      pairs = [(p, classes.index(c)) for c in names for p in files[c]]
      splits[split] = labelling.ordered([p for p, _ in pairs], [l for _, l in pairs], seed, split)
    return 'splits', classes, splits
  if not top:
    loose = [f for f in os.listdir(root) if walk.is_image(f)]
    what = f'{len(loose)} images but no class folders' if loose else 'no class folders'
    raise UserError(
        f'{root!r} has {what}. Put each class in its own folder, DIR/<class>/*.jpg (a held-out '
        'fraction becomes the val split), or DIR/train/<class>/ and DIR/val/<class>/; or pass '
        'a CSV/JSONL list of path,label as config.data.dir.')
  classes = labelling.named_classes(given, top, repr(root))
  files = _class_files(walker, root, top, '', owner)
  by_class = {classes.index(c): files[c] for c in top}
  held = labelling.holdout(by_class, holdout, seed, classes)
  splits = {name: labelling.ordered(paths, labels, seed, name)
            for name, (paths, labels) in held.items()}
  return 'classes', classes, splits


def _resolve_mode(mode: str, root: str, splits) -> str:
  """'RGB' or 'L'; 'auto' checks the headers of up to `_MODE_SAMPLE` images per split."""
  if mode in jpeg.MODES:
    return mode
  if mode != 'auto':
    raise UserError(f"config.data.mode={mode!r} is unknown: use 'auto', 'RGB' or 'L'.")
  gray, colour = [], []
  for paths, _ in splits.values():
    step = max(len(paths) // _MODE_SAMPLE, 1)
    for path in paths[::step][:_MODE_SAMPLE]:
      try:
        is_gray = jpeg.header(jpeg.read_file(path))[2]
      except (OSError, jpeg.ImageReadError):
        continue  # reported with its path where it is decoded (or by `jkd data prepare`)
      (gray if is_gray else colour).append(path)
  if gray and colour:
    raise UserError(
        f'{root!r} mixes image modes: of {len(gray) + len(colour)} images checked, '
        f'{len(gray)} are grayscale (e.g. {gray[0]!r}) and {len(colour)} colour (e.g. '
        f'{colour[0]!r}). Say how to read them all: --config.data.mode=RGB (3 channels; '
        'grayscale images repeated) or --config.data.mode=L (1 channel).')
  return 'L' if gray else 'RGB'


def unreadable_message(path: str, error: Exception) -> str:
  """One paragraph for an image file that cannot be read or decoded."""
  return (f'Cannot read the image {path!r} ({error}). Replace or delete the file; '
          '`jkd data prepare` checks every image of a folder and lists all unreadable ones.')


@functools.lru_cache(maxsize=8)
def _cached_index(root: str, holdout: float, seed: int, mode: str, stamp, classes,
                  follow_outside: bool) -> FolderIndex:
  del stamp  # part of the cache key only: a changed folder is read again
  given = classes
  try:
    if os.path.isfile(root):
      layout, classes, splits = lists.index(root, holdout, seed, given)
    else:
      layout, classes, splits = _index_folder(root, holdout, seed, given, follow_outside)
  except OSError as e:
    raise UserError(f'Cannot read {e.filename or root!r} ({e.strerror or e}) while listing '
                    f'config.data.dir={root!r}: make it readable, or fix the path.') from None
  if not splits:
    raise UserError(f'{root!r} has no images in any split folder.')
  if len(classes) > MAX_CLASSES:
    raise UserError(f'{root!r} has {len(classes):,} classes, more than the {MAX_CLASSES:,} jkd '
                    'trains.')
  if len(classes) < 2:
    raise UserError(
        f'{root!r} has one class, {classes[0]!r}: a classifier needs at least 2 classes (with '
        'one, every prediction is right and training learns nothing). Add the images of the '
        'other classes, each in its own folder (or with its own label), or name the classes '
        'the model should know with --config.data.classes.')
  return FolderIndex(root=root, layout=layout, classes=tuple(classes), splits=splits,
                     mode=_resolve_mode(mode, root, splits))


def data_dir(cfg) -> str:
  """`config.data.dir`, checked to exist, as an absolute path."""
  root = _cfg(cfg, 'dir', '')
  if not root:
    raise UserError("config.data.name='folder' needs config.data.dir: pass "
                    '--config.data.dir=DIR (class folders DIR/<class>/*.jpg, split folders '
                    'DIR/train/<class>/, a CSV/JSONL list of path,label, or the output of '
                    '`jkd data prepare`).')
  root = os.path.abspath(os.path.expanduser(str(root)))
  if not os.path.exists(root):
    raise UserError(f'config.data.dir={root!r} does not exist: pass the folder of your images '
                    '(or their CSV/JSONL list) as --config.data.dir=DIR.')
  if os.path.isfile(root) and not root.lower().endswith(LIST_EXTENSIONS):
    raise UserError(f'config.data.dir={root!r} is a file but not a .csv or .jsonl list: pass a '
                    'folder of class folders or a list of path,label.')
  if not (os.path.isfile(root) or os.path.isdir(root)):
    raise UserError(f'config.data.dir={root!r} is neither a folder nor a regular file (a FIFO '
                    'or a device?): pass the folder of your images or their CSV/JSONL list.')
  return root


def index(cfg) -> FolderIndex:
  """Lists the folder (or list file) of `cfg.dir` into splits; cached per process.

  Raises:
    UserError: missing or empty folder, a class folder without images, a list naming missing
      files, mixed image modes under mode='auto', an unknown mode; one class only; a file
      under two classes or in two splits; a folder link that loops, repeats a folder or (unless
      allowed) leaves the folder; a list that is not UTF-8 or has an empty, unknown, negative,
      too large or sparse label; a name that is not UTF-8.
  """
  root = data_dir(cfg)
  stamp = os.stat(root).st_mtime_ns
  classes = _cfg(cfg, 'classes')
  classes = tuple(classes) if isinstance(classes, (list, tuple)) else classes
  return _cached_index(root, float(_cfg(cfg, 'holdout', 0.1)), int(_cfg(cfg, 'split_seed', 0)),
                       str(_cfg(cfg, 'mode', 'auto')), stamp, classes or None,
                       bool(_cfg(cfg, 'follow_links_outside', False)))


class FolderSource:
  """One split of a folder dataset: `source[i]` is {'image': the file's bytes, 'label': int32,
  'path': str}, read when asked (the Grain workers decode it).

  Attributes:
    native_shape: (None, None, C): images of any size, C = 3 for 'RGB', 1 for 'L'.
    num_classes, class_names, mode: of the dataset.
  """

  def __init__(self, paths, labels: np.ndarray, classes, mode: str):
    self.paths, self.labels = tuple(paths), np.asarray(labels, np.int32)
    self.class_names, self.num_classes = tuple(classes), len(classes)
    self.mode = mode
    self.native_shape = (None, None, 3 if mode == 'RGB' else 1)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.paths[index]
    try:
      data = jpeg.read_file(path)
    except (OSError, jpeg.ImageReadError) as e:
      raise UserError(unreadable_message(path, e)) from None
    return {'image': data, 'label': self.labels[index], 'path': path}

  def __repr__(self) -> str:
    return f'FolderSource({len(self)} images, {self.num_classes} classes, {self.mode})'


def open_split(cfg, split: str, parse_split) -> FolderSource:
  """The source of `split` ('train', 'val', 'train[:50%]'...) of the folder dataset `cfg`.

  Args:
    cfg: data config with `dir` naming class folders, split folders or a list file.
    split: split name, optionally sliced TFDS-style.
    parse_split: `jkd.data.sources.parse_split` (passed in: sources imports this module).
  """
  idx = index(cfg)
  head, bracket, rest = split.partition('[')
  base, sl = parse_split(idx.resolve_split(head.strip()) + bracket + rest,
                         {k: len(v[0]) for k, v in idx.splits.items()})
  paths, labels = idx.splits[base]
  return FolderSource(paths[sl], labels[sl], idx.classes, idx.mode)


def check_model_classes(cfg, meta: dict, workdir: str) -> None:
  """Refuses to score a model on a folder dataset with other classes than it was trained on.

  Args:
    cfg: a folder data config (`config.data`); its classes are the folder's (or, for a folder
      `jkd data prepare` wrote, the ones recorded there).
    meta: the checkpoint's metadata ('num_classes', 'class_names' where recorded).
    workdir: named in the message.

  Raises:
    UserError: the class count differs, or the names (in label order) do.
  """
  root = data_dir(cfg)
  summary = os.path.join(root, 'jkd_folder.json')
  if os.path.isdir(root) and os.path.isfile(os.path.join(root, 'dataset_info.json')):
    try:
      with open(summary, encoding='utf-8') as f:
        classes = list(json.load(f)['classes'])
    except (OSError, ValueError, KeyError, TypeError):
      return  # not written by jkd: the prepared folder's reader checks what it can
  else:
    classes = list(index(cfg).classes)
  trained = meta.get('class_names') or []
  count = meta.get('num_classes')
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    return  # a run without a classifier head (MIM pretraining), or an older checkpoint
  if len(trained) != count:
    trained = []  # names not recorded (or not these): compare the count only

  def show(names):
    return f'{names[:8]}{" ..." if len(names) > 8 else ""}'
  if count != len(classes):
    raise UserError(
        f'The model in {workdir!r} was trained for {count} classes'
        f'{" " + show(list(trained)) if trained else ""}, and config.data.dir={root!r} has '
        f'{len(classes)}: {show(classes)}. Its scores would mean nothing: evaluate it on data '
        'of its own classes (name them in its order with --config.data.classes), or fine-tune '
        'it on these first (--config.init_from with a new head).')
  if trained and list(trained) != classes:
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(trained, classes)) if a != b]
    raise UserError(
        f'The model in {workdir!r} and config.data.dir={root!r} both have {count} classes, but '
        f'not the same ones in the same order: label {differ[0][0]} is {differ[0][1]!r} for the '
        f'model and {differ[0][2]!r} for the data ({len(differ)} labels differ). Pass the '
        "model's order with --config.data.classes (its classes: "
        f'{show(list(trained))}), or rename the folders.')


def stats(cfg, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of pixel/255 per channel: `cfg.mean`/`cfg.std`, else ImageNet's for colour
  (what imported ImageNet models were trained with), else 0.5 for grayscale."""
  default = _RGB_STATS if channels == 3 else _GRAY_STATS
  mean = tuple(float(v) for v in (_cfg(cfg, 'mean') or default[0]))
  std = tuple(float(v) for v in (_cfg(cfg, 'std') or default[1]))
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise UserError(f'config.data.mean={mean} / std={std}: give {channels} values each (one per '
                    'channel, in units of pixel/255), std > 0.')
  return mean, std
