"""Worker processes that end with their parent, however it ends (jkd data prepare's decoders and
Grain's workers): a parent killed by SIGKILL or the OOM killer never tells them to stop."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, kernel: bool = True) -> None:
  """Makes this worker process end when `parent` (the pid that started it) dies, however it
  dies (SIGKILL, the OOM killer): on Linux the kernel sends it SIGKILL then
  (`prctl(PR_SET_PDEATHSIG)`); everywhere a daemon thread also checks the parent's pid every
  second and exits. Call it first thing in the worker (a pool's `initializer`). `kernel=False`
  skips the prctl: the kernel signals when the *thread* that started the worker ends, so only
  a pool started from the main thread may use it.

  Raises nothing; when `parent` is already gone the worker exits at once."""
  if kernel and sys.platform.startswith('linux'):
    try:
      import ctypes  # pylint: disable=g-import-not-at-top
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
      pass  # the pid watch below still ends the worker
  if os.getppid() != parent:  # died before the prctl took effect
    os._exit(0)  # pylint: disable=protected-access

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)  # pylint: disable=protected-access  (no cleanup to run: the parent is gone)
  threading.Thread(target=watch, daemon=True, name='jkd-die-with-parent').start()
