"""Where a run's files live: a local directory or a bucket (`gs://`, `s3://`), one set of calls.

A workdir, a teacher's workdir, `init_from`, a teacher cache or a `data_dir` may be a local path
or a URL such as `gs://bucket/runs/vit_l16`. TPU VMs have small disks that are gone with the VM,
so pod users keep runs in a bucket; every file jkd writes or reads (checkpoints through Orbax and
TensorStore, which speak `gs://` themselves; metrics, summaries, figures, exports, caches
through `etils.epath`) goes through this module or those libraries.

Object stores differ from a file system in two ways this module hides:
- no append: `LineLog` keeps a remote JSONL file's lines and rewrites the object, at most every
  `flush_every_s` seconds and on close;
- no rename of directories, but a single object appears whole: `write_bytes` writes local files
  through a temporary file and `os.replace` (atomic), remote objects directly.

`gs://` needs `gcsfs` (`pip install 'jkd[gcs]'`) and the usual Google credentials (on a TPU VM,
its service account). Without TensorFlow installed, epath uses gcsfs; with TensorFlow, it uses
`tf.io.gfile` unless EPATH_USE_TF=false.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from typing import Any

from etils import epath

from jkd.errors import UserError

_PACKAGES = {'gs': 'gcsfs', 's3': 's3fs'}


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  text = os.fspath(path)
  return text.split('://', 1)[0] if '://' in text else None


def is_remote(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL as given (without a trailing '/').

  Raises UserError for a URL whose file-system package is missing, before any work starts.
  """
  text = os.fspath(path)
  kind = scheme(text)
  if kind is None:
    return os.path.abspath(os.path.expanduser(text))
  package = _PACKAGES.get(kind)
  if package is None:
    raise UserError(f'{text!r}: jkd reads and writes local paths, gs:// and s3:// URLs, not '
                    f'{kind}://. Use one of those (or mount the store, e.g. with gcsfuse).')
  try:
    __import__(package)
  except ImportError:
    raise UserError(f'{text!r} is a {kind}:// URL, which needs the {package!r} package: '
                    f"pip install 'jkd[gcs]' (or pip install {package}), then run the same "
                    'command again.') from None
  return text.rstrip('/')


def join(base: str | os.PathLike, *parts: str) -> str:
  """`os.path.join` for local paths, '/'-joined for URLs."""
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def exists(path) -> bool:
  return epath.Path(os.fspath(path)).exists()


def isdir(path) -> bool:
  return epath.Path(os.fspath(path)).is_dir()


def isfile(path) -> bool:
  p = epath.Path(os.fspath(path))
  return p.exists() and not p.is_dir()


def makedirs(path) -> None:
  """Creates a local directory and its parents. Nothing for a URL: a bucket's "directories"
  exist once an object is written under them, and gcsfs would create a missing bucket (a typo
  in its name should fail at the first write, not make a new bucket)."""
  if not is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


def ensure_dir(path, what: str = '--workdir') -> None:
  """Creates a local directory (and its parents) that this process can write, or raises a
  UserError naming `what` (the argument or config key the path came from). URLs pass as is."""
  text = os.fspath(path)
  if is_remote(text):
    return
  try:
    os.makedirs(text, exist_ok=True)
  except FileExistsError:
    raise UserError(f'{what} {text} is a file, not a directory. Pass a directory (it is created '
                    'if missing), or move the file away.') from None
  except NotADirectoryError:
    raise UserError(f'{what} {text} cannot be created: a part of that path is a file, not a '
                    'directory. Pass a path under a directory.') from None
  except OSError as e:
    raise UserError(f'{what} {text} cannot be created ({e.strerror}). Pass a directory this user '
                    'can write.') from None
  if not os.access(text, os.W_OK | os.X_OK):
    raise UserError(f'{what} {text} is not writable (read-only directory or file system). Pass '
                    'a directory this user can write, or fix its permissions.')


def open_file(path, mode: str = 'r'):
  """A file object for reading ('r', 'rb') or writing whole ('w', 'wb')."""
  return epath.Path(os.fspath(path)).open(mode)


def read_bytes(path) -> bytes:
  return epath.Path(os.fspath(path)).read_bytes()


def read_text(path) -> str:
  return epath.Path(os.fspath(path)).read_text()


def write_bytes(path, data: bytes) -> None:
  """Writes `data` so that a reader sees the old file or the new one, never half of one."""
  text = os.fspath(path)
  if is_remote(text):  # An object upload becomes visible only when complete.
    epath.Path(text).write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(text))
  os.makedirs(directory, exist_ok=True)
  # A fresh, unpredictable name opened with O_EXCL | O_NOFOLLOW (mkstemp): in a shared workdir
  # a planted file or symlink of a guessable name cannot redirect the write. `os.replace`
  # swaps the name itself, so a symlink at the destination is replaced, never followed.
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(text) + '.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # A crash after the rename must not leave an empty file.
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open would give this.
    os.replace(tmp, text)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def strict_json(obj: Any) -> Any:
  """`obj` with every non-finite float as the string 'nan', 'inf' or '-inf' (JSON has no NaN;
  the value stays visible, as in metrics.jsonl) and numpy scalars as Python numbers."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if hasattr(obj, 'item') and getattr(obj, 'ndim', None) == 0:  # numpy / jax scalars
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  return obj


def write_json(path, obj: Any) -> None:
  """Writes strict JSON (`strict_json`: no bare NaN or Infinity), atomically."""
  write_text(path, json.dumps(strict_json(obj), indent=2, default=float, allow_nan=False) + '\n')


def read_json(path) -> Any:
  return json.loads(read_text(path))


def open_append(path: str):
  """A local text file opened for appending, line-buffered, never through a symlink (a planted
  link in a shared workdir cannot make jkd append to another file)."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0),
                 0o666)
  except OSError as e:
    raise UserError(f'Cannot open {path} for appending ({e.strerror}): it must be a regular file '
                    'the run can write, not a symlink. Remove it or use another --workdir.') from e
  return os.fdopen(fd, 'a', buffering=1)


def remove(path) -> None:
  """Deletes one file (local or an object in a bucket)."""
  epath.Path(os.fspath(path)).unlink()


def remove_tree(path) -> None:
  """Deletes a directory and everything in it (local or under a bucket prefix)."""
  epath.Path(os.fspath(path)).rmtree()


def copy(src, dst) -> None:
  epath.Path(os.fspath(src)).copy(epath.Path(os.fspath(dst)), overwrite=True)


def size(path) -> int:
  return int(epath.Path(os.fspath(path)).stat().length)


def save_figure(fig, path) -> str:
  """Saves a matplotlib figure as PNG at a local path or URL; returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  write_bytes(path, buffer.getvalue())
  return os.fspath(path)


class LineLog:
  """An append-only text file of lines (metrics.jsonl), local or in a bucket.

  Locally each line is appended and flushed at once. An object store cannot append, so for a
  URL the lines (those already there when a run resumes, then the new ones) are kept in memory
  and the whole object is rewritten when `flush_every_s` seconds have passed since the last
  upload, and on `flush`/`close`. A run killed without a signal loses at most that many seconds
  of metric lines; its checkpoints are unaffected.
  """

  def __init__(self, path, *, flush_every_s: float = 30.0):
    self.path = os.fspath(path)
    self.remote = is_remote(self.path)
    self.flush_every_s = flush_every_s
    if self.remote:
      self._lines = read_text(self.path).splitlines(keepends=True) if exists(self.path) else []
      self._dirty = False
      self._last_upload = time.monotonic()
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open_append(self.path)

  def write(self, line: str) -> None:
    if not self.remote:
      self._file.write(line + '\n')
      return
    self._lines.append(line + '\n')
    self._dirty = True
    if time.monotonic() - self._last_upload >= self.flush_every_s:
      self.flush()

  def rewrite(self, keep) -> list[dict]:
    """Keeps only the JSON lines `keep(record)` accepts (lines that do not parse as a JSON
    object with a 'step', e.g. one cut off by a kill, are dropped); returns the kept records.
    Locally the file is replaced atomically and reopened for appending."""
    if self.remote:
      lines = self._lines
    else:
      self._file.close()
      with open(self.path) as f:
        lines = f.readlines()
    kept_lines, kept = [], []
    for line in lines:
      try:
        record = json.loads(line)
        ok = isinstance(record, dict) and 'step' in record and keep(record)
      except (ValueError, TypeError):
        ok = False
      if ok:
        kept_lines.append(line if line.endswith('\n') else line + '\n')
        kept.append(record)
    if self.remote:
      self._lines, self._dirty = kept_lines, True
      self.flush()
    else:
      if kept_lines != lines:
        write_text(self.path, ''.join(kept_lines))
      self._file = open_append(self.path)
    return kept

  def flush(self) -> None:
    if not self.remote:
      self._file.flush()
    elif self._dirty:
      write_text(self.path, ''.join(self._lines))
      self._dirty = False
      self._last_upload = time.monotonic()

  def close(self) -> None:
    self.flush()
    if not self.remote and not self._file.closed:
      self._file.close()
