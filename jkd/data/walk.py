"""The walk of a dataset folder: its image files, and the link rules that keep it honest.

Symbolic links to folders are followed only inside the dataset's root (its real path), and each
real folder is walked once: a link back to a folder above it (`loop -> .`) or a second path to a
folder already walked would list the same files again, under another class or split. Both are
refused (exit 2 naming the link), not skipped, because either way the folder does not hold what
it seems to; a link leaving the root is refused unless `config.data.follow_links_outside` (it
would read files the folder does not hold). Links to single files are followed anywhere (a
subset of a big dataset is often made that way); a file reached twice (by links or hard links)
counts once within a class and is refused across classes or splits (`unique`, which list files
use too). Names must be UTF-8: jkd stores class and file names as UTF-8 text.
"""
from __future__ import annotations

import os
import stat

from jkd.errors import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')


def is_image(name: str) -> bool:
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


class Walk:
  """One walk of a dataset folder: which real folders and files were reached, and from where
  (its rules: the module's docstring)."""

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
        elif is_image(name):  # broken links too: listed as unreadable when read
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


def unique(paths: list[str], owner: dict[str, tuple[str, str, str]], label: str, split: str,
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
