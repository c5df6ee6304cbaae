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
import os
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
  os.makedirs(os.path.dirname(os.path.abspath(text)), exist_ok=True)
  tmp = f'{text}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, text)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, default=float) + '\n')


def read_json(path) -> Any:
  return json.loads(read_text(path))


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
      self._lines = [read_text(self.path)] if exists(self.path) else []
      self._dirty = False
      self._last_upload = time.monotonic()
    else:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, 'a', buffering=1)

  def write(self, line: str) -> None:
    if not self.remote:
      self._file.write(line + '\n')
      return
    self._lines.append(line + '\n')
    self._dirty = True
    if time.monotonic() - self._last_upload >= self.flush_every_s:
      self.flush()

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
