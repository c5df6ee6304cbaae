"""Grain worker processes: how many, iterating with them, and cleaning up after them.

`config.data.worker_processes` > 0 moves the reading, decoding and cropping of batches into that
many Grain worker processes (`IterDataset.mp_prefetch`), past the GIL; batches come back through
shared memory. Elements are still whole batches and a pure function of their index, so the
batches do not depend on the number of processes. Two gaps of Grain's are closed here: workers
whose parent was killed (SIGKILL, the OOM killer) end instead of waiting forever, and a process
that exits right after its last batch frees that batch's shared memory itself.
"""
from __future__ import annotations

import atexit
import os

from jkd.data.lifetime import die_with_parent
from jkd.data.sources import cfg_get


def worker_processes(cfg) -> int:
  """`cfg.worker_processes`: Grain worker processes (-1: one per core this process may use)."""
  n = int(cfg_get(cfg, 'worker_processes', 0))
  return len(os.sched_getaffinity(0)) if n < 0 else n


def iterate(ds: grain.MapDataset, read_options: grain.ReadOptions,
            processes: int) -> grain.DatasetIterator:
  """Iterates `ds` with `read_options`' reader threads, in `processes` worker processes.

  Grain's worker process k computes elements k, k + P, k + 2P... and the main process takes
  them in turn, so the order does not depend on P; batches come back through shared memory.
  Processes sidestep the GIL for the Python parts of decoding and cropping.
  """
  import grain  # pylint: disable=g-import-not-at-top  (the prepare workers need none of it)
  iter_ds = ds.to_iter_dataset(read_options)
  if processes:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when it starts workers: a
      flags.FLAGS.mark_as_parsed()   # program that never parsed them gets their defaults.
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes),
                                  worker_init_fn=_exit_with_parent)
    atexit.unregister(_release_shared_memory)  # registered once, however many iterators
    atexit.register(_release_shared_memory)
  return iter_ds.__iter__()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Grain worker set-up: the worker ends when the process that started it dies.

  A run killed with SIGKILL (or by the OOM killer) never tells its Grain workers to stop, and
  they would wait on their full queue forever; a daemon thread watching the parent's pid ends
  them within a second instead."""
  del worker_index, worker_count
  # Only the pid watch: Grain may start its workers from a thread, and the kernel's parent-death
  # signal fires when that thread (not the process) ends.
  die_with_parent(os.getppid(), kernel=False)


def _release_shared_memory() -> None:
  """Waits for Grain's background thread that frees the shared memory of consumed batches.

  A process that exits right after its last batch (a run's final eval) would otherwise leave
  those blocks to Python's resource tracker, which frees them but warns of "leaked
  shared_memory objects". Grain has no public call for this; without the attribute it does
  nothing."""
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  cls = shared_memory_array.SharedMemoryArray
  pool = getattr(cls, '_del_thread_pool', None)
  if pool is not None:
    pool.close()
    pool.join()
    cls._del_thread_pool = cls._outstanding_del_requests = None  # later frees: synchronous
