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
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
import zlib
from typing import Any

import ml_collections
import numpy as np

from jkd.data import jpeg
from jkd.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')
LIST_EXTENSIONS = ('.csv', '.jsonl')
HOLDOUT_SPLIT = 'val'
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
  reader threads of `num_workers` in this process).
  """
  placeholder = ml_collections.config_dict.placeholder
  cfg.dir = ''
  cfg.holdout = 0.1
  cfg.split_seed = 0
  cfg.mode = 'auto'
  cfg.mean = placeholder(tuple)
  cfg.std = placeholder(tuple)
  cfg.worker_processes = 0


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


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _subdirs(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if not e.name.startswith('.') and e.is_dir())


def _images_under(path: str) -> list[str]:
  """Image files anywhere below `path` (following links), sorted: torchvision's walk."""
  found = []
  for root, dirs, files in os.walk(path, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found.extend(os.path.join(root, f) for f in sorted(files) if _is_image(f))
  return found


def _class_files(split_dir: str, classes: list[str]) -> dict[str, list[str]]:
  files = {}
  for name in classes:
    images = _images_under(os.path.join(split_dir, name))
    if not images:
      raise UserError(
          f'Class folder {os.path.join(split_dir, name)!r} holds no images (looked for '
          f'{", ".join(IMAGE_EXTENSIONS)}, in any sub-folder). Add its images, or remove the '
          'folder if it is not a class.')
    files[name] = images
  return files


def _stable(text: str) -> int:
  return zlib.crc32(text.encode('utf-8'))


def _ordered(paths: list[str], labels: list[int], seed: int, split: str):
  """Sorts a split by (label, path), then applies a permutation fixed by (seed, split name)."""
  pairs = sorted(zip(labels, paths))
  order = np.random.default_rng([seed, _stable(split)]).permutation(len(pairs))
  return (tuple(pairs[i][1] for i in order),
          np.array([pairs[i][0] for i in order], np.int32))


def _holdout(by_class: dict[int, list[str]], fraction: float, seed: int, classes) -> dict:
  """Splits each class's sorted files into 'train' and 'val': round(fraction * n) of them
  (at least one when fraction > 0 and the class has two or more), drawn by (seed, class name)."""
  if not 0 <= fraction < 1:
    raise UserError(f'config.data.holdout={fraction} must be in [0, 1): the fraction of each '
                    "class held out as the 'val' split, e.g. 0.1.")
  out = {'train': ([], []), HOLDOUT_SPLIT: ([], [])}
  for label, files in sorted(by_class.items()):
    files = sorted(files)
    n = len(files)
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
      k = min(max(k, 1), n - 1)
    held = set(np.random.default_rng([seed, _stable(classes[label])]).permutation(n)[:k].tolist())
    for i, path in enumerate(files):
      split = out[HOLDOUT_SPLIT if i in held else 'train']
      split[0].append(path)
      split[1].append(label)
  return {name: split for name, split in out.items() if split[0]}


def _index_folder(root: str, holdout: float, seed: int):
  top = _subdirs(root)
  train = os.path.join(root, 'train')
  if 'train' in top and _subdirs(train):
    splits = {}
    classes = _subdirs(train)
    for split in top:
      split_dir = os.path.join(root, split)
      names = _subdirs(split_dir)
      if not names:
        loose = [f for f in os.listdir(split_dir) if _is_image(f)]
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
      files = _class_files(split_dir, names)
      pairs = [(p, classes.index(c)) for c in names for p in files[c]]
      splits[split] = _ordered([p for p, _ in pairs], [l for _, l in pairs], seed, split)
    return 'splits', classes, splits
  if not top:
    loose = [f for f in os.listdir(root) if _is_image(f)]
    what = f'{len(loose)} images but no class folders' if loose else 'no class folders'
    raise UserError(
        f'{root!r} has {what}. Put each class in its own folder, DIR/<class>/*.jpg (a held-out '
        'fraction becomes the val split), or DIR/train/<class>/ and DIR/val/<class>/; or pass '
        'a CSV/JSONL list of path,label as config.data.dir.')
  files = _class_files(root, top)
  by_class = {i: files[c] for i, c in enumerate(top)}
  splits = {name: _ordered(paths, labels, seed, name)
            for name, (paths, labels) in _holdout(by_class, holdout, seed, top).items()}
  return 'classes', top, splits


def _read_list(path: str) -> list[dict[str, str]]:
  rows = []
  if path.lower().endswith('.jsonl'):
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f'{path}, line {number}: not JSON ({e}). Each line of a JSONL list is '
                          'an object like {"path": "a/1.jpg", "label": "cat"}.') from None
        if not isinstance(row, dict) or 'path' not in row or 'label' not in row:
          raise UserError(f'{path}, line {number}: needs "path" and "label" keys, got {line!r}.')
        rows.append({k: str(v) for k, v in row.items()})
    return rows
  with open(path, newline='', encoding='utf-8') as f:
    table = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
  if not table:
    raise UserError(f'{path} is empty: write one "path,label" line per image.')
  header = [c.strip().lower() for c in table[0]]
  if 'path' in header and 'label' in header:
    columns, table = header, table[1:]
  else:
    columns = ['path', 'label', 'split'][:len(table[0])]
  for number, row in enumerate(table, 2 if columns is header else 1):
    if len(row) != len(columns) or len(columns) < 2:
      raise UserError(f'{path}, line {number}: expected the columns {columns}, got {row}.')
    rows.append({k: v.strip() for k, v in zip(columns, row)})
  return rows


def _index_list(path: str, holdout: float, seed: int):
  rows = _read_list(path)
  if not rows:
    raise UserError(f'{path} lists no images: write one "path,label" line per image.')
  base = os.path.dirname(os.path.abspath(path))
  paths = [os.path.normpath(os.path.join(base, os.path.expanduser(r['path']))) for r in rows]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise UserError(
        f'{path} names {len(missing)} files that do not exist, e.g. {missing[:3]} (paths are '
        'relative to the list file\'s folder). Fix the paths or remove those lines.')
  names = [r['label'] for r in rows]
  if all(re.fullmatch(r'\d+', n) for n in names):
    classes = [str(i) for i in range(max(int(n) for n in names) + 1)]
    labels = [int(n) for n in names]
  else:
    classes = sorted(set(names))
    labels = [classes.index(n) for n in names]
  if all(r.get('split') for r in rows):
    grouped: dict[str, tuple[list, list]] = {}
    for p, l, r in zip(paths, labels, rows):
      grouped.setdefault(r['split'], ([], []))
      grouped[r['split']][0].append(p)
      grouped[r['split']][1].append(l)
  else:
    by_class: dict[int, list[str]] = {}
    for p, l in zip(paths, labels):
      by_class.setdefault(l, []).append(p)
    grouped = _holdout(by_class, holdout, seed, classes)
  splits = {name: _ordered(ps, ls, seed, name) for name, (ps, ls) in grouped.items()}
  return 'list', classes, splits


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
        with open(path, 'rb') as f:
          is_gray = jpeg.header(f.read())[2]
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
def _cached_index(root: str, holdout: float, seed: int, mode: str, stamp) -> FolderIndex:
  del stamp  # part of the cache key only: a changed folder is read again
  if os.path.isfile(root):
    layout, classes, splits = _index_list(root, holdout, seed)
  else:
    layout, classes, splits = _index_folder(root, holdout, seed)
  if not splits:
    raise UserError(f'{root!r} has no images in any split folder.')
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
  return root


def index(cfg) -> FolderIndex:
  """Lists the folder (or list file) of `cfg.dir` into splits; cached per process.

  Raises:
    UserError: missing or empty folder, a class folder without images, a list naming missing
      files, mixed image modes under mode='auto', an unknown mode.
  """
  root = data_dir(cfg)
  stamp = os.stat(root).st_mtime_ns
  return _cached_index(root, float(_cfg(cfg, 'holdout', 0.1)), int(_cfg(cfg, 'split_seed', 0)),
                       str(_cfg(cfg, 'mode', 'auto')), stamp)


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
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
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
