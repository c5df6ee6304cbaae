"""Joining a multi-process run: `jax.distributed.initialize` from the environment.

jkd adds nothing of its own to JAX's distributed runtime. Every `jkd` command calls
`initialize()` before anything touches a device; it decides from `JKD_DISTRIBUTED` whether to
call `jax.distributed.initialize()`, which then finds the coordinator, the number of processes
and this process's id from the cluster (TPU pod metadata, SLURM, Open MPI, GKE) unless they are
given explicitly in `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

  JKD_DISTRIBUTED=auto  (default) join only when the environment is clearly multi-process:
                        JAX_COORDINATOR_ADDRESS is set, SLURM runs more than one task, or
                        Open MPI started us. A plain `jkd train` on one machine stays alone.
  JKD_DISTRIBUTED=on    always join (TPU pod slices: JAX reads the workers from metadata).
  JKD_DISTRIBUTED=off   never join.

See `launch/README.md` for the TPU-pod, SLURM, GKE and local launchers.
"""
from __future__ import annotations

import os
from typing import Mapping

from jkd.errors import UserError

MODES = ('auto', 'on', 'off')


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{name}={value!r} is not an integer; set it to a whole number '
                    f'(e.g. {name}=0) or unset it.') from None


def wants_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Whether `initialize` should call `jax.distributed.initialize` in this environment."""
  env = os.environ if env is None else env
  mode = env.get('JKD_DISTRIBUTED', 'auto').strip().lower() or 'auto'
  if mode not in MODES:
    raise UserError(f'JKD_DISTRIBUTED={mode!r}: use one of {", ".join(MODES)} (auto joins a '
                    'multi-process run only when the environment names one).')
  if mode != 'auto':
    return mode == 'on'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  slurm_tasks = _int_env(env, 'SLURM_STEP_NUM_TASKS') or _int_env(env, 'SLURM_NTASKS') or 1
  if 'SLURM_PROCID' in env and slurm_tasks > 1:
    return True
  return 'OMPI_COMM_WORLD_SIZE' in env and (_int_env(env, 'OMPI_COMM_WORLD_SIZE') or 1) > 1


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process run the environment describes; returns True if it joined.

  Call once, before any jax computation or device query. Explicit settings
  (`JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) win over
  cluster auto-detection.
  """
  env = os.environ if env is None else env
  if not wants_distributed(env):
    return False
  import jax  # pylint: disable=g-import-not-at-top  (only multi-process runs need it here)
  if jax.distributed.is_initialized():
    return True
  num_processes = _int_env(env, 'JAX_NUM_PROCESSES')
  process_id = _int_env(env, 'JAX_PROCESS_ID')
  try:
    jax.distributed.initialize(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS') or None,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, TypeError) as e:
    raise UserError(
        f'Could not join the multi-process run ({e}). Outside a TPU pod, SLURM or Open MPI job, '
        'set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in every '
        'process (launch/local.sh does this on one machine), or JKD_DISTRIBUTED=off to run '
        'alone.') from None
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    # jax's persistent compilation cache deadlocks CPU (gloo) collectives across processes: with
    # a warm cache the first step of a 2-process run blocked forever (jax 0.12.1), so a
    # multi-process CPU run compiles afresh (seconds for what runs on CPUs).
    jax.config.update('jax_enable_compilation_cache', False)
  return True
