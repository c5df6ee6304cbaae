"""One writer per workdir: `WORKDIR/jkd.lock`.

Two runs writing the same checkpoints, metrics and summary would corrupt each other's state (a
second process used to crash inside Orbax, by luck before it overwrote anything). A run takes the
lock before it reads or writes anything in its workdir and holds it until it ends, whatever way it
ends. The lock file records who holds it (host, pid, process start time, command, start date); a
second run on the same workdir is refused with a `UserError` that names that process.

Stale locks (a run that was SIGKILLed or lost its machine) are detected on the same host: the
pid no longer exists, or it is another process now (its start time differs). Such a lock is taken
over with a message. A lock held from another host cannot be checked from here: the error says
how to remove it once that run is known to be gone.

Creation is atomic (O_CREAT | O_EXCL | O_NOFOLLOW), so of two runs starting together exactly one
wins. A bucket workdir (gs://) has no such primitive: there the lock is best effort (checked,
then written), which still refuses a second run started later.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from typing import Callable, Iterator

from jkd import storage
from jkd.errors import UserError

LOCK_FILE = 'jkd.lock'
# A lock file still empty this long after it was created belongs to a writer that died between
# creating and filling it.
_EMPTY_GRACE_S = 10.0


def _proc_start(pid: int) -> str | None:
  """The process start time (clock ticks since boot) of `pid` on Linux, else None: together with
  the pid it identifies a process (pids are reused)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
    return stat.rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_record(command: str) -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'proc_start': _proc_start(os.getpid()),
          'command': command,
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def _alive(holder: dict) -> bool | None:
  """Whether the holder's process still runs: True / False on this host, None if it is on
  another host (unknown)."""
  if holder.get('host') != socket.gethostname():
    return None
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Another user's live process.
  start = holder.get('proc_start')
  now = _proc_start(pid)
  return not (start and now and start != now)  # A reused pid is another process.


def describe(holder: dict) -> str:
  return (f'{holder.get("command") or "a jkd run"} (pid {holder.get("pid")} on host '
          f'{holder.get("host")!r}, started {holder.get("started")})')


class WorkdirLock:
  """The lock of one workdir. `acquire` / `release`, or `with hold(workdir):`."""

  def __init__(self, workdir: str, command: str = '', flag: str = '--workdir'):
    self.flag = flag  # How the user named the directory, for the messages: --workdir, --out.
    self.workdir = storage.resolve(workdir)
    self.path = storage.join(self.workdir, LOCK_FILE)
    self.record = _holder_record(command)
    self.held = False

  def acquire(self, log: Callable[[str], None] = print) -> None:
    """Takes the lock, or raises UserError naming the run that holds it."""
    storage.makedirs(self.workdir)
    for _ in range(5):
      if self._try_create():
        self.held = True
        return
      holder = self._read()
      if holder is not None and holder.get('gone'):  # Released meanwhile: try again.
        continue
      if holder is None:  # Being written right now, or left empty by a writer that died.
        if self._age() < _EMPTY_GRACE_S:
          time.sleep(0.2)
          continue
        holder = {}
      alive = _alive(holder) if holder else False
      if alive is None:
        raise UserError(
            f'{self.workdir} is in use by {describe(holder)}: one run writes a workdir at a '
            f'time. Wait for it to finish, or use another {self.flag}. If that run is gone (its '
            f'machine was lost), delete {self.path} and run again.')
      if alive:
        raise UserError(
            f'{self.workdir} is in use by {describe(holder)}: one run writes a workdir at a '
            'time, and this one was refused (nothing was written). Wait for that run to finish '
            f'or stop it (kill {holder.get("pid")}; it saves a checkpoint), or use another '
            f'{self.flag}.')
      log(f'[lock] taking over the stale lock of {describe(holder) if holder else "a run"}, '
          f'which no longer runs ({self.path}).')
      self._remove_stale()
    raise UserError(f'Could not take the lock {self.path}: other runs keep taking it. Run one '
                    'jkd command per workdir.')

  def release(self) -> None:
    """Removes the lock if this process still holds it."""
    if not self.held:
      return
    self.held = False
    holder = self._read()
    if holder and holder.get('pid') == self.record['pid'] and holder.get(
        'host') == self.record['host']:
      with contextlib.suppress(OSError):
        if storage.is_remote(self.path):
          storage.remove(self.path)
        else:
          os.remove(self.path)

  # ---------------------------------------------------------------- file operations

  def _try_create(self) -> bool:
    data = (json.dumps(self.record) + '\n').encode()
    if storage.is_remote(self.path):
      if storage.exists(self.path):
        return False
      storage.write_bytes(self.path, data)
      return True
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0),
                   0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise UserError(f'Cannot create the lock {self.path} ({e.strerror}): the '
                      f'{self.flag} must be a directory this user can write.') from e
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return True

  def _read(self) -> dict | None:
    try:
      if not storage.is_remote(self.path) and os.path.islink(self.path):
        return {}  # Not ours: a planted link is treated as a stale lock and removed.
      holder = json.loads(storage.read_text(self.path))
      return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
      return {'gone': True}
    except (OSError, ValueError):
      return None

  def _age(self) -> float:
    try:
      return time.time() - os.lstat(self.path).st_mtime
    except OSError:
      return _EMPTY_GRACE_S

  def _remove_stale(self) -> None:
    if storage.is_remote(self.path):
      with contextlib.suppress(OSError):
        storage.remove(self.path)
      return
    # Renamed first: of two runs taking over the same stale lock, one rename succeeds and the
    # other finds the lock gone (or already retaken) on its next try.
    aside = f'{self.path}.stale-{os.getpid()}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with contextlib.suppress(OSError):
      os.remove(aside)


@contextlib.contextmanager
def hold(workdir: str, command: str = '', log: Callable[[str], None] = print) -> Iterator[None]:
  """Holds the lock of `workdir` inside the block (process 0 of a multi-process run: the
  processes of one run share its workdir)."""
  import jax  # pylint: disable=g-import-not-at-top  (process_index; jax is loaded by then)
  if jax.process_index() != 0:
    yield
    return
  lock = WorkdirLock(workdir, command)
  lock.acquire(log)
  try:
    yield
  finally:
    lock.release()
