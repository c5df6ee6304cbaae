"""The probe: an .onnx or .tflite file loaded and run on blank images in a forked child process
before this process opens it.

ONNX Runtime and the LiteRT interpreter are not hardened against hostile files (a fuzzed .tflite
made LiteRT's `allocate_tensors` abort the process). The child runs under an address-space
limit (`PROBE_MEMORY` above what it had) and a time limit (`PROBE_TIMEOUT_S`); a crash, hang or
memory blow-up there is a UserError (exit 2), and jkd itself is unharmed. What remains: a file
crafted to crash only at other batch sizes or on particular pixel values can still crash the
runtime in the parent. Not for StableHLO: jax cannot run in a forked process.
"""
from __future__ import annotations

import faulthandler
import os
import select
import signal
import time
import warnings

from jkd.deploy.exported_file import bad_file, show
from jkd.errors import UserError

PROBE_TIMEOUT_S = 120
PROBE_MEMORY = 4 << 30  # address space the probe may add to what the process had


def run_in_child(path: str, fmt: str, attempt) -> None:
  """Calls `attempt()` (open the file, run it on zero images) in a forked child (the
  runtimes are not hardened against hostile files); UserError if that child fails, crashes,
  or takes more than PROBE_TIMEOUT_S. The child inherits the bytes already read."""
  read, write = os.pipe()
  with warnings.catch_warnings():  # Python's and jax's warnings about fork and threads
    warnings.simplefilter('ignore')
    pid = os.fork()
  if pid == 0:  # The child: never returns into the caller's code.
    code = 3
    try:
      os.close(read)
      faulthandler.disable()  # A runtime's abort here is reported by the parent, not dumped.
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
      _limit_memory(PROBE_MEMORY)
      attempt()
      code = 0
    except UserError as e:
      os.write(write, str(e).encode('utf-8', 'replace')[:4000])
      code = 2
    except BaseException as e:  # pylint: disable=broad-except
      os.write(write, f'{type(e).__name__}: {e}'.encode('utf-8', 'replace')[:4000])
    finally:
      os._exit(code)  # pylint: disable=protected-access
  os.close(write)
  try:
    message, status = _wait_probe(pid, read)
  finally:
    os.close(read)
  if status == 0:
    return
  if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 2 and message:
    raise UserError(message)
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    what = ('took more than %d s' % PROBE_TIMEOUT_S if sig == signal.SIGKILL and message is None
            else f'crashed ({signal.Signals(sig).name})')
    raise UserError(f'{show(path)}: its runtime {what} while loading it and running it on '
                    'blank images (in a separate process, so jkd itself is unharmed). The file '
                    'is damaged or hostile; export it again with `jkd export`.')
  raise bad_file(path, fmt, message or f'loading it failed (status {status})')


def _limit_memory(extra: int) -> None:
  """RLIMIT_AS of this (child) process: what it maps now plus `extra` bytes."""
  import resource
  try:
    with open('/proc/self/status') as f:
      size = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmSize:'))
  except (OSError, StopIteration, ValueError):
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  limit = size + extra
  for bound in (soft, hard):  # Never above a limit the process already has.
    if bound != resource.RLIM_INFINITY:
      limit = min(limit, bound)
  resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _wait_probe(pid: int, read: int) -> tuple[str | None, int]:
  """(the child's message, its wait status); kills it after PROBE_TIMEOUT_S (message None)."""
  deadline = time.monotonic() + PROBE_TIMEOUT_S
  chunks = []
  while True:
    left = deadline - time.monotonic()
    ready = select.select([read], [], [], max(0.0, left))[0] if left > 0 else []
    if not ready:
      os.kill(pid, signal.SIGKILL)
      return None, os.waitpid(pid, 0)[1]
    chunk = os.read(read, 4096)
    if not chunk:  # The child closed the pipe: it has exited (or is exiting).
      break
    chunks.append(chunk)
  return b''.join(chunks).decode('utf-8', 'replace'), os.waitpid(pid, 0)[1]
