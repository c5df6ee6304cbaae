"""Two real processes joined by jax.distributed (CPU collectives over localhost), and moving a
checkpoint to another device count.

One run of 12 steps is made three ways with the same global batch, mesh shape and seed:
  ref:  1 process  x 4 simulated devices, mesh data=2 x fsdp=2;
  mp:   2 processes x 2 simulated devices each (launch/local.sh), same mesh across processes;
  move: mp's checkpoint at step 8 restored onto 1 process x 1 device and trained to step 12.
All three must end with the same parameters.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from jkd import distributed
from jkd.checkpoint import load_arrays
from jkd.errors import UserError

from conftest import REPO, SUPERVISED, read_jsonl, run_jkd

# fp32; only the order of cross-device (and cross-process) reductions differs between runs.
TOLERANCE = 2e-5
ARGS = ['--config', SUPERVISED + ':tiny', '--config.model.name=vit_nano_p4',
        '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.checkpoint_every=4']


# Attention key biases have a true gradient of exactly zero (q . b_k shifts a softmax row by a
# constant), so what they get is fp32 rounding noise, which Adam normalises into steps of about
# lr whose sign depends on the reduction order. They are compared by size only.
ZERO_GRADIENT = "['attn']['key']['bias']"


def _max_param_diff(a_workdir, b_workdir):
  a, b = load_arrays(a_workdir)[0]['params'], load_arrays(b_workdir)[0]['params']
  assert jax.tree.structure(a) == jax.tree.structure(b)
  diffs = []
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    if jax.tree_util.keystr(path).endswith(ZERO_GRADIENT):
      assert max(np.max(np.abs(x)), np.max(np.abs(y))) < 1e-3  # noise-sized, nothing learnt
    else:
      diffs.append(float(np.max(np.abs(x - y))))
  return max(diffs)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multiprocess')
  ref, mp = str(root / 'ref'), str(root / 'mp')
  out = run_jkd('train', *ARGS, '--workdir', ref,
                env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert out.returncode == 0, out.stderr[-3000:]
  env = dict(os.environ, JKD_LOCAL_DEVICES='2', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  mp_out = subprocess.run(
      ['launch/local.sh', '2', sys.executable, '-m', 'jkd.cli', 'train', *ARGS, '--workdir', mp],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert mp_out.returncode == 0, mp_out.stdout[-3000:] + mp_out.stderr[-3000:]
  return ref, mp, mp_out.stdout


def test_two_processes_match_one_process(runs):
  ref, mp, log = runs
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}; 4 cpu device(s) in 2 process(es)" in log
  assert _max_param_diff(ref, mp) <= TOLERANCE
  ref_summary = json.load(open(os.path.join(ref, 'summary.json')))
  mp_summary = json.load(open(os.path.join(mp, 'summary.json')))
  assert mp_summary['steps'] == 12
  assert abs(ref_summary['final_train_loss'] - mp_summary['final_train_loss']) <= 1e-4
  assert abs(ref_summary['test_accuracy'] - mp_summary['test_accuracy']) <= 1 / 256


def test_only_process_zero_logs(runs):
  _, mp, log = runs
  assert '[p0] [train] step 12/12' in log
  assert '[p1] [train]' not in log
  lines = read_jsonl(os.path.join(mp, 'metrics.jsonl'))
  steps = [l['step'] for l in lines if 'split' not in l]
  assert steps == sorted(set(steps)), steps  # one writer: no duplicated lines


def test_checkpoint_restores_onto_another_device_count(runs, tmp_path):
  _, mp, _ = runs
  moved = str(tmp_path / 'moved')
  shutil.copytree(mp, moved)
  shutil.rmtree(os.path.join(moved, 'checkpoints', '12'))  # as if stopped after step 8
  os.remove(os.path.join(moved, 'summary.json'))
  out = run_jkd('train', *ARGS, '--config.mesh.data=-1', '--config.mesh.fsdp=1',
                '--workdir', moved, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resumed from' in out.stdout and 'at step 8' in out.stdout
  assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1}; 1 cpu device(s)" in out.stdout
  assert json.load(open(os.path.join(moved, 'summary.json')))['steps'] == 12
  assert _max_param_diff(mp, moved) <= TOLERANCE


def _pid_of_process(process_id: int, workdir: str) -> int:
  """The pid of the jkd process with JAX_PROCESS_ID=process_id working on `workdir`."""
  for entry in os.listdir('/proc'):
    try:
      cmdline = open(f'/proc/{entry}/cmdline', 'rb').read().split(b'\0')
      environ = open(f'/proc/{entry}/environ', 'rb').read().split(b'\0')
    except (OSError, ValueError):
      continue
    if (workdir.encode() in cmdline and b'jkd.cli' in cmdline
        and f'JAX_PROCESS_ID={process_id}'.encode() in environ):
      return int(entry)
  raise AssertionError(f'no jkd process {process_id} for {workdir}')


def _signal_a_training_run(workdir, deliver):
  """Starts a 2-process run with launch/local.sh, calls deliver(popen) once both processes are
  training, and returns (exit code, whole log, the step both stopped at)."""
  args = [*ARGS, '--config.total_steps=400', '--config.log_every=1',
          '--config.checkpoint_every=0', '--config.stop_check_every=2', '--workdir', workdir]
  env = dict(os.environ, JKD_LOCAL_DEVICES='2', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen(['launch/local.sh', '2', sys.executable, '-m', 'jkd.cli', 'train',
                           *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  seen = []
  # A run that never reaches step 3 (a collective deadlock) is killed rather than waited on.
  watchdog = threading.Timer(300, proc.kill)
  watchdog.start()
  try:
    for line in proc.stdout:  # Until both processes are training.
      seen.append(line)
      if re.search(r'\[p0\] \[train\] step +3/400', line):
        break
    deliver(proc)
    rest, _ = proc.communicate(timeout=300)
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  log = ''.join(seen) + rest
  # Only process 0 logs; the checkpoint (a collective save) shows that both stopped there.
  stopped = re.search(r'\[p0\] \[train\] stopped by signal 15 at step (\d+)', log)
  assert stopped, log[-3000:]
  step = int(stopped.group(1))
  assert step % 2 == 0 and 3 <= step < 400
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(step)]
  return proc.returncode, log, step, args, env


def test_a_signal_to_one_process_stops_every_process_at_one_step(tmp_path):
  """SIGTERM reaches process 1 only (one host preempted): both processes still save the same
  step (a collective checkpoint) and exit 143; the run then resumes from that step."""
  workdir = str(tmp_path / 'signalled')
  code, log, step, args, env = _signal_a_training_run(
      workdir, lambda _: os.kill(_pid_of_process(1, workdir), signal.SIGTERM))
  assert code == 128 + signal.SIGTERM, log[-3000:]
  # Process 0 stopped by agreement, with no signal of its own: local.sh must not send one
  # (a second signal makes jkd stop before its checkpoint).
  assert 'stopping the others' not in log and 'KeyboardInterrupt' not in log, log[-3000:]
  resumed = subprocess.run(['launch/local.sh', '2', sys.executable, '-m', 'jkd.cli', 'train',
                            *args, f'--config.total_steps={step + 2}'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert f'at step {step}' in resumed.stdout
  assert json.load(open(os.path.join(workdir, 'summary.json')))['steps'] == step + 2


def test_ctrl_c_to_local_sh_signals_each_process_once(tmp_path):
  """Ctrl-C reaches launch/local.sh (SIGINT): it sends each process one SIGTERM, never a
  second, so both save the same step and exit 143, and so does the script."""
  code, log, _, _, _ = _signal_a_training_run(
      str(tmp_path / 'interrupted'), lambda proc: proc.send_signal(signal.SIGINT))
  assert code == 128 + signal.SIGTERM, log[-3000:]
  assert '[local.sh] stopping: each process saves a checkpoint' in log
  assert 'signalled again' not in log and 'stopping the others' not in log, log[-3000:]
  assert 'KeyboardInterrupt' not in log and 'Traceback' not in log, log[-3000:]


@pytest.mark.parametrize('env, expected', [
    ({}, False),
    ({'JAX_COORDINATOR_ADDRESS': 'host:1234'}, True),
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, False),
    ({'SLURM_PROCID': '3', 'SLURM_NTASKS': '16'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, True),
    ({'JKD_DISTRIBUTED': 'on'}, True),
    ({'JKD_DISTRIBUTED': 'off', 'JAX_COORDINATOR_ADDRESS': 'host:1234'}, False),
])
def test_when_jkd_joins_a_multiprocess_run(env, expected):
  assert distributed.wants_distributed(env) is expected


def test_bad_distributed_settings_are_user_errors():
  with pytest.raises(UserError, match='JKD_DISTRIBUTED'):
    distributed.wants_distributed({'JKD_DISTRIBUTED': 'yes please'})
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', '/tmp/never',
                env={'JKD_DISTRIBUTED': 'on', 'JAX_NUM_PROCESSES': 'two'})
  assert out.returncode == 2 and 'JAX_NUM_PROCESSES' in out.stderr
  assert 'Traceback' not in out.stderr
