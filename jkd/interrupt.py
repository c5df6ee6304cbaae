"""SIGTERM and SIGINT: one flag for the whole process, acted on where stopping is safe.

A preempted or Ctrl-C'd run must stop without losing work and without leaving half a
checkpoint. So the handlers never stop a run by themselves while it holds something to save:
inside `deferred()` (a training run, from taking the workdir lock to writing `summary.json`)
they only record the signal, and the run stops at its next safe point (`jkd.loop`: after the
current step, eval batch or save), saves a checkpoint of the step it reached, and raises
`Interrupted`. Outside it (reading the config, `jkd eval`, `bench`, `plan`: nothing to save) the
first signal raises `Interrupted` at once. The CLI prints its message and exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), without a traceback.

  interrupt.install()                 # jkd.cli.main, first thing
  with interrupt.deferred():          # jkd.trainers.Trainer.train
    ...
    interrupt.check('during start-up')  # raises Interrupted if a signal arrived

A second signal while a run is stopping is ignored (the save in progress finishes); SIGKILL
stops a process at once, and the previous checkpoints stay intact (Orbax saves atomically).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
  """A run stopped by SIGTERM/SIGINT at a safe point. `code` is 128 + the signal number (the
  exit status of `jkd`); `message` says where it stopped and what was saved."""

  def __init__(self, signum: int, message: str):
    super().__init__(128 + int(signum))
    self.signum = int(signum)
    self.message = message

  def __str__(self) -> str:
    return self.message


_state = {'signum': None, 'depth': 0, 'previous': None, 'unraisable': None}


def _handle(signum, frame) -> None:
  del frame
  if _state['signum'] is None:
    _state['signum'] = signum
  if _state['depth'] == 0:  # Nothing to save: stop now.
    raise Interrupted(signum, f'stopped by signal {signum} before any run started; nothing was '
                      'written.')


def _install() -> bool:
  """Installs the handlers (main thread only), also over those a library put in place meanwhile
  (`jax.distributed.initialize` installs its own SIGTERM handler). True if they were not
  installed before."""
  if threading.current_thread() is not threading.main_thread():
    return False  # Signals are delivered to the main thread only: nothing to handle here.
  fresh = _state['previous'] is None
  if fresh:
    _state['previous'] = {}
    _state['unraisable'] = sys.unraisablehook
    sys.unraisablehook = _unraisable
  for sig in SIGNALS:
    # Always set again: a handler installed from C (jax's preemption notifier) replaces ours at
    # the OS level while `signal.getsignal` still reports ours.
    previous = signal.signal(sig, _handle)
    _state['previous'].setdefault(sig, previous)
  return fresh


def _uninstall() -> None:
  previous = _state['previous']
  if previous is None:
    return
  for sig, handler in previous.items():
    signal.signal(sig, handler)
  if sys.unraisablehook is _unraisable and _state['unraisable'] is not None:
    sys.unraisablehook = _state['unraisable']
  _state.update(previous=None, signum=None, unraisable=None)


def _unraisable(unraisable) -> None:
  """sys.unraisablehook: an `Interrupted` raised where Python cannot propagate it (the handler
  ran inside a gc callback of XLA's or a finalizer, which print "Exception ignored ...") is
  not printed; the signal is delivered again a moment later, so that it stops the command from
  ordinary code (at most a few times while such callbacks run)."""
  if isinstance(unraisable.exc_value, Interrupted):
    signum = unraisable.exc_value.signum

    def again():
      if _state['previous'] is not None and _state['depth'] == 0:  # Still ours, still at once.
        os.kill(os.getpid(), signum)

    timer = threading.Timer(0.01, again)
    timer.daemon = True
    timer.start()
    return
  previous = _state['unraisable'] or sys.__unraisablehook__
  previous(unraisable)


def install() -> None:
  """Handles SIGTERM/SIGINT from now on (the CLI calls it first thing, and again after joining a
  multi-process run); `uninstall` restores the previous handlers and forgets any signal
  received."""
  _install()


def uninstall() -> None:
  _uninstall()


def ignore() -> None:
  """Ignores SIGTERM/SIGINT from now on: the CLI's last act, once its work is done and its exit
  status decided, so that a signal during interpreter shutdown cannot turn a finished run's
  status into a kill."""
  if threading.current_thread() is threading.main_thread():
    for sig in SIGNALS:
      signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Inside: a signal only sets the flag (`received`, `check`), so the run reaches a safe point
  first. Installs the handlers if `install` was not called (library use) and removes them on
  exit."""
  installed = _install()
  _state['depth'] += 1
  try:
    yield
  finally:
    _state['depth'] -= 1
    if installed:
      _uninstall()


def received() -> int | None:
  """The first signal received since the handlers were installed, or None."""
  return _state['signum']


def check(where: str) -> None:
  """Raises `Interrupted` ('stopped by signal N {where}') if a signal has arrived."""
  signum = _state['signum']
  if signum is not None:
    raise Interrupted(signum, f'stopped by signal {signum} {where}')
