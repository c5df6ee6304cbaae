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
import io
import json
import os
import re
import stat
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
# The most classes a dataset may have (ImageNet-21k has 21,841): integer labels must be below
# it, so that one stray label such as 20000000 cannot build a head of that many outputs.
MAX_CLASSES = 100_000
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


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _printable(path: str) -> str:
  """`path` quoted for a message: non-UTF-8 bytes as \\x escapes, control characters escaped."""
  return repr(path)


def _check_name(path: str) -> None:
  """Refuses a file or folder name that is not UTF-8 (jkd stores class names and file names as
  UTF-8 text: in checkpoints, shards and JSON)."""
  try:
    path.encode('utf-8')
  except UnicodeEncodeError:
    raise UserError(
        f'{_printable(path)} has a name that is not UTF-8 text (the bytes shown as \\x.. or '
        '\\udc.. escapes). Rename it with UTF-8 characters (e.g. `convmv -f latin1 -t utf8`); '
        'jkd stores class and file names as UTF-8.') from None


class _Walk:
  """One walk of a dataset folder: which real folders and files were reached, and from where.

  Symbolic links to folders are followed only inside the dataset's root (its real path), and
  each real folder is walked once: a link back to a folder above it (`loop -> .`) or a second
  path to a folder already walked would list the same files again, under another class or
  split. Both are refused (exit 2 naming the link), not skipped, because either way the folder
  does not hold what it seems to; a link leaving the root is refused unless
  `config.data.follow_links_outside` (it would read files the folder does not hold).
  Links to single files are followed anywhere (a subset of a big dataset is often made that
  way); a file reached twice (by links or hard links) counts once within a class and is
  refused across classes or splits (`_unique`)."""

  def __init__(self, root: str, follow_outside: bool):
    self.root = os.path.realpath(root)
    self.follow_outside = follow_outside
    self.folders: dict[tuple[int, int], str] = {}

  def enter(self, path: str) -> bool:
    """Whether to walk the folder `path` (False: not a folder); raises for a looping,
    repeated or (unless allowed) outside link."""
    _check_name(path)
    try:
      info = os.stat(path)
    except OSError:
      return False  # a broken link or a vanished folder: nothing to list
    if not stat.S_ISDIR(info.st_mode):
      return False
    real = os.path.realpath(path)
    key = (info.st_dev, info.st_ino)
    if key in self.folders:
      first = self.folders[key]
      loop = (os.path.realpath(os.path.dirname(path)) + os.sep).startswith(real + os.sep)
      what = 'loops back to the folder above it' if loop else 'leads to a folder walked already'
      raise UserError(
          f'The link {_printable(path)} {what}, {_printable(first)} (its target: '
          f'{_printable(os.readlink(path) if os.path.islink(path) else real)}): its images '
          'would be listed twice, under two classes or splits. Remove the link (or replace it '
          'by a copy of the images it should add).')
    if (not self.follow_outside and real != self.root
        and not real.startswith(self.root + os.sep)):
      raise UserError(
          f'The link {_printable(path)} leads out of the dataset folder {self.root!r}, to '
          f'{real!r}. jkd reads only what the dataset folder holds: copy those images in, '
          'or point config.data.dir at a folder that holds them, or pass '
          '--config.data.follow_links_outside=true to read them through the link.')
    self.folders[key] = path
    return True

  @staticmethod
  def _entries(path: str) -> list[tuple[str, bool]]:
    """(name, is a folder through links) of the entries of `path`, sorted, hidden ones
    skipped (the file type comes from the directory listing: no stat per file)."""
    with os.scandir(path) as entries:
      return sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith('.'))

  def subdirs(self, path: str) -> list[str]:
    """The names of the folders in `path` to walk, sorted (hidden ones skipped)."""
    return [n for n, is_dir in self._entries(path)
            if is_dir and self.enter(os.path.join(path, n))]

  def images_under(self, path: str) -> list[str]:
    """Image files anywhere below the folder `path` (already entered), sorted per folder:
    torchvision's walk (a folder's files, then its sub-folders), each real folder once."""
    found = []
    stack = [path]
    while stack:
      directory = stack.pop()
      subdirs = []
      for name, is_dir in self._entries(directory):
        full = os.path.join(directory, name)
        if is_dir:
          if self.enter(full):
            subdirs.append(full)
        elif _is_image(name):  # broken links too: listed as unreadable when read
          _check_name(full)
          found.append(full)
      stack.extend(reversed(subdirs))
    return found


def _identity(path: str):
  """What makes two paths one file: (device, inode) through links (symbolic or hard), or the
  path itself when it cannot be stat'ed (a broken link: reported as unreadable later)."""
  try:
    info = os.stat(path)
  except (OSError, ValueError):
    return path
  return info.st_dev, info.st_ino


def _unique(paths: list[str], owner: dict[str, tuple[str, str, str]], label: str, split: str,
            shown: list[str] | None = None) -> list[str]:
  """`paths` without files already listed (by real path): a second link to a file of the same
  class and split counts once; the same file under another class or split is refused.

  Args:
    paths: files of class `label` in `split`.
    owner: file identity (`_identity`) -> (label, split, how it was shown) of every file listed
      so far; updated.
    shown: how to name each path in a message (default: the path quoted).
  """
  kept = []
  for i, path in enumerate(paths):
    real = _identity(path)
    first = owner.get(real)
    show = shown[i] if shown else _printable(path)
    if first is None:
      owner[real] = (label, split, show)
      kept.append(path)
      continue
    if first[:2] == (label, split):
      continue
    where = (f'under the classes {first[0]!r} and {label!r}' if first[1] == split else
             f'in the splits {first[1]!r} and {split!r}')
    raise UserError(
        f'The same file is listed {where}: {first[2]} and {show} (one and the same file). A '
        'file belongs to one class, and the splits must not share files (the eval split would '
        'score images trained on). Remove one of them.')
  return kept


def _class_files(walk: _Walk, split_dir: str, classes: list[str], split: str,
                 owner: dict) -> dict[str, list[str]]:
  files = {}
  for name in classes:
    images = _unique(walk.images_under(os.path.join(split_dir, name)), owner, name, split)
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


def _named_classes(given, found: list[str], where: str) -> list[str]:
  """The class list: `config.data.classes` when given (its order is the label order; every
  class found must be in it), else the classes found, sorted.

  Args:
    given: `config.data.classes` (None or a sequence of names).
    found: the class names the data has (folder names or label values).
    where: what to name in the message for an unknown class (a folder or a list file).
  """
  if not given:
    return sorted(found)
  names = list(given) if isinstance(given, (list, tuple)) else None
  if names is None or not all(isinstance(n, str) and n for n in names):
    raise UserError(f'config.data.classes={given!r} must be a tuple of class names (non-empty '
                    "strings), e.g. \"('cat', 'dog')\"; its order is the label order.")
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise UserError(f'config.data.classes names {twice[:5]} more than once: each class once.')
  if len(names) > MAX_CLASSES:
    raise UserError(f'config.data.classes has {len(names):,} names, more than the '
                    f'{MAX_CLASSES:,} classes jkd trains.')
  unknown = sorted(set(found) - set(names))
  if unknown:
    raise UserError(f'{where} has the classes {unknown[:5]}, which config.data.classes '
                    f'({len(names)} names: {names[:5]}{" ..." if len(names) > 5 else ""}) lacks. '
                    'Add them to config.data.classes, or remove those images.')
  return names


def _index_folder(root: str, holdout: float, seed: int, given, follow_outside: bool):
  walk = _Walk(root, follow_outside)
  walk.enter(root)
  top = walk.subdirs(root)
  train = os.path.join(root, 'train')
  owner: dict[str, tuple[str, str, str]] = {}
  train_classes = walk.subdirs(train) if 'train' in top else []
  if train_classes:
    splits = {}
    classes = _named_classes(given, train_classes, repr(train))
    for split in top:
      split_dir = os.path.join(root, split)
      names = train_classes if split == 'train' else walk.subdirs(split_dir)
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
      files = _class_files(walk, split_dir, names, split, owner)
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
  classes = _named_classes(given, top, repr(root))
  files = _class_files(walk, root, top, '', owner)
  by_class = {classes.index(c): files[c] for c in top}
  splits = {name: _ordered(paths, labels, seed, name)
            for name, (paths, labels) in _holdout(by_class, holdout, seed, classes).items()}
  return 'classes', classes, splits


_MAX_LINE = 1 << 16  # characters in one line of a list: far more than a path and a label


def _decoded_list(path: str) -> str:
  """The text of a list file: UTF-8, a byte-order mark dropped (Excel writes one), or a
  UserError naming the line with the first byte that is not UTF-8."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise UserError(
        f'{path}, line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset '
        f'{e.start}). Save the list as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).') from None


def _read_list(path: str) -> list[dict[str, str]]:
  """The rows of a CSV or JSONL list: {'path', 'label'[, 'split'], 'line': line number}."""
  text = _decoded_list(path)
  rows = []
  if path.lower().endswith('.jsonl'):
    for number, line in enumerate(text.split('\n'), 1):
      if not line.strip():
        continue
      if len(line) > _MAX_LINE:
        raise UserError(f'{path}, line {number}: {len(line):,} characters, more than a line of '
                        f'a list may have ({_MAX_LINE:,}).')
      try:
        row = json.loads(line)
      except (ValueError, RecursionError) as e:
        raise UserError(f'{path}, line {number}: not JSON ({type(e).__name__}: '
                        f'{str(e)[:200]}). Each line of a JSONL list is an object like '
                        '{"path": "a/1.jpg", "label": "cat"}.') from None
      if not isinstance(row, dict) or 'path' not in row or 'label' not in row:
        raise UserError(f'{path}, line {number}: needs "path" and "label" keys, got '
                        f'{line[:200]!r}.')
      for key in ('path', 'label', 'split'):
        value = row.get(key, '')
        if isinstance(value, bool) or not isinstance(value, (str, int)):
          raise UserError(f'{path}, line {number}: "{key}" is {str(value)[:100]!r}; it must be '
                          'a string (a label may be an integer).')
      rows.append({'path': str(row['path']), 'label': str(row['label']).strip(),
                   'split': str(row.get('split', '')).strip(), 'line': number})
    return rows
  reader = csv.reader(io.StringIO(text, newline=''))
  table = []
  try:
    for r in reader:
      if r and any(c.strip() for c in r):
        if sum(len(c) for c in r) > _MAX_LINE:
          raise UserError(f'{path}, line {reader.line_num}: more characters than a line of a '
                          f'list may have ({_MAX_LINE:,}).')
        table.append((reader.line_num, r))
  except csv.Error as e:
    raise UserError(f'{path}, line {reader.line_num}: not CSV ({e}). Write one "path,label" '
                    'line per image.') from None
  if not table:
    raise UserError(f'{path} is empty: write one "path,label" line per image.')
  header = [c.strip().lower() for c in table[0][1]]
  if 'path' in header and 'label' in header:
    columns, table = header, table[1:]
  else:
    columns = ['path', 'label', 'split'][:len(table[0][1])]
  for number, row in table:
    if len(row) != len(columns) or len(columns) < 2:
      raise UserError(f'{path}, line {number}: expected the columns {columns}, got '
                      f'{row[:5]}.')
    values = {k: v.strip() for k, v in zip(columns, row)}
    rows.append({'path': values['path'], 'label': values['label'],
                 'split': values.get('split', ''), 'line': number})
  return rows


def _numeric_labels(rows, path: str) -> list[int] | None:
  """The labels as integers when every label is one (class i is label i), else None.

  Raises:
    UserError: a negative label, one of `MAX_CLASSES` or more, or sparse labels (far fewer
      distinct values than the largest + 1: a model with that many outputs would be built).
  """
  if not all(re.fullmatch(r'[+-]?\d+', r['label']) for r in rows):
    return None
  labels = []
  for r in rows:
    digits = r['label'].lstrip('+-').lstrip('0') or '0'
    value = int(digits) if len(digits) <= 9 else MAX_CLASSES  # no 10**4300-digit int()
    if r['label'].startswith('-') and value:
      value = -value
    if value < 0 or value >= MAX_CLASSES:
      raise UserError(
          f'{path}, line {r["line"]}: label {r["label"][:30]!r} is not a class id in [0, '
          f'{MAX_CLASSES:,}). Integer labels number the classes from 0; use names instead, or '
          'renumber them.')
    labels.append(value)
  count, distinct = max(labels) + 1, len(set(labels))
  if count > max(2 * distinct, distinct + 100):
    raise UserError(
        f'{path}: the integer labels are sparse: {distinct} distinct values up to '
        f'{count - 1}, which would make a {count}-class model. Renumber the classes 0..'
        f'{distinct - 1}, or name them all with --config.data.classes (then a label is one of '
        'those names).')
  return labels


def _index_list(path: str, holdout: float, seed: int, given):
  rows = _read_list(path)
  if not rows:
    raise UserError(f'{path} lists no images: write one "path,label" line per image.')
  for r in rows:
    if not r['path'] or not r['label']:
      raise UserError(f'{path}, line {r["line"]}: the {"path" if not r["path"] else "label"} '
                      'is empty. Every line names a file and its class.')
  base = os.path.dirname(os.path.abspath(path))
  paths = [os.path.normpath(os.path.join(base, os.path.expanduser(r['path']))) for r in rows]
  for p, r in zip(paths, rows):
    if '\0' in p:
      raise UserError(f'{path}, line {r["line"]}: the path has a NUL character.')
  missing = [(p, r['line']) for p, r in zip(paths, rows) if not os.path.isfile(p)]
  if missing:
    raise UserError(
        f'{path} names {len(missing)} files that do not exist (or are not regular files), e.g. '
        f'{[p for p, _ in missing[:3]]} (line {missing[0][1]}; paths are relative to the list '
        'file\'s folder). Fix the paths or remove those lines.')
  names = [r['label'] for r in rows]
  numeric = None if given else _numeric_labels(rows, path)
  if numeric is not None:
    classes = [str(i) for i in range(max(numeric) + 1)]
    labels = numeric
  else:
    known = set(given or ())
    for r in rows:
      if given and r['label'] not in known:
        raise UserError(
            f'{path}, line {r["line"]}: label {r["label"][:60]!r} is not one of '
            f'config.data.classes ({len(given)} names: {list(given)[:5]}'
            f'{" ..." if len(given) > 5 else ""}). Fix the label or add the class.')
    classes = _named_classes(given, sorted(set(names)), path)
    position = {c: i for i, c in enumerate(classes)}
    labels = [position[n] for n in names]
  split_of = [r['split'] or '' for r in rows]
  with_splits = all(split_of)
  owner: dict[str, tuple[str, str, str]] = {}
  kept = []
  for p, l, s, r in zip(paths, labels, split_of, rows):
    shown = [f'{path}, line {r["line"]} ({p!r})']
    if _unique([p], owner, classes[l], s if with_splits else '', shown) == [p]:
      kept.append((p, l, s))
  if with_splits:
    grouped: dict[str, tuple[list, list]] = {}
    for p, l, s in kept:
      grouped.setdefault(s, ([], []))
      grouped[s][0].append(p)
      grouped[s][1].append(l)
  else:
    by_class: dict[int, list[str]] = {}
    for p, l, _ in kept:
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
      layout, classes, splits = _index_list(root, holdout, seed, given)
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
