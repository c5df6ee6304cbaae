"""`jkd data prepare` stopped at random moments (issue 29): SIGKILL or SIGTERM of the parent,
then the same command again, must give exactly the examples of an uninterrupted run (the same
file names, labels and bytes, nothing twice, nothing old); SIGTERM exits 143 (or 0 when the run
was already done) without a traceback; no decoding worker outlives its parent.

The normal tier SIGKILLs one run after its first shard is recorded (a SIGTERM there is in the
slow tier: each run with workers takes 5-10 s); the slow tier also stops 20 runs of each kind
at uniformly random moments over an uninterrupted run's duration.
"""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

PER_CLASS = 300  # 3 classes x 300 tiny images, 50 per shard: 18 shards, about 1 s of writing
SHARD = '50'
WORKERS = '3'


def _write_folder(root) -> str:
  """Tiny images of three classes, each different: PNG and JPEG, gray."""
  rng = np.random.default_rng(0)
  for k, name in enumerate(('ant', 'bee', 'cat')):
    os.makedirs(os.path.join(root, name))
    for i in range(PER_CLASS):
      pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, name, f'{i:04d}.' + ('png' if i % 3 else
                                                                            'jpg')))
  return str(root)


def _expected(root) -> dict:
  """{split: sorted (name relative to root, label, sha256 of the file)} that prepare must pack."""
  from jkd import data  # pylint: disable=g-import-not-at-top
  from jkd.data import folder  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config('folder')
  cfg.dir = root
  idx = folder.index(cfg)
  out = {}
  for split, (paths, labels) in idx.splits.items():
    out[split] = sorted((os.path.relpath(p, root), int(l),
                         hashlib.sha256(open(p, 'rb').read()).hexdigest())
                        for p, l in zip(paths, labels))
  return out


def _packed(out) -> dict:
  """{split: sorted (file_name, label, sha256 of the image bytes)} of the shards in `out` that
  its metadata lists (what a reader of the prepared folder gets)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(out)
  found = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    found[split] = sorted((source[i]['file_name'].decode(), int(source[i]['label']),
                           hashlib.sha256(source[i]['image']).hexdigest())
                          for i in range(len(source)))
  return found


def _session_alive(sid: int) -> list[int]:
  """The live processes (zombies excluded) of session `sid`."""
  alive = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if fields[0] != 'Z' and int(fields[3]) == sid:  # state, ppid, pgrp, session
      alive.append(int(pid))
  return alive


def _start(root, out, workers=WORKERS):
  return subprocess.Popen(
      [sys.executable, '-m', 'jkd.cli', 'data', 'prepare', '--dir', root, '--out', out,
       '--workers', workers, '--shard-size', SHARD], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
      env=dict(os.environ, PYTHONUNBUFFERED='1', JAX_ENABLE_COMPILATION_CACHE='0'))


def _stop(proc, sig, out) -> tuple[int, str]:
  """Sends `sig`, waits for the parent, then checks that its whole session (the decoding
  workers, multiprocessing's helpers) is gone within 5 s; returns (exit status, stderr)."""
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  deadline = time.time() + 5
  while _session_alive(proc.pid) and time.time() < deadline:
    time.sleep(0.05)
  left = _session_alive(proc.pid)
  for pid in left:  # only this test's own session: never leave them behind
    os.kill(pid, signal.SIGKILL)
  assert not left, f'worker processes {left} outlived the stopped prepare ({out})'
  return proc.returncode, err


def _check_stopped(sig, code, err, out) -> None:
  assert 'Traceback' not in err, err[-3000:]
  if code == 0:  # it had finished before the signal: the rerun must still change nothing
    pass
  elif sig == signal.SIGKILL:
    assert code == -signal.SIGKILL, (code, err[-2000:])
  elif code == -signal.SIGTERM:  # before jkd's handler was installed: nothing can be written
    assert not os.path.exists(os.path.join(out, 'prepare_state.json')), err[-2000:]
  else:
    assert code in (143, 0), (code, err[-2000:])
  state = os.path.join(out, 'prepare_state.json')
  if os.path.exists(state):
    assert isinstance(json.load(open(state)), dict)  # whole, never half-written


def _finish(root, out, expected, workers=WORKERS) -> None:
  """The same command again (its --workers do not change the shards): it completes, and the
  prepared folder holds exactly `expected`."""
  proc = _start(root, out, workers)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert _packed(out) == expected
  assert not [f for f in os.listdir(out) if '.tmp' in f or f == 'jkd.lock']


def _wait_for_first_shard(proc, out, timeout=120) -> bool:
  state = os.path.join(out, 'prepare_state.json')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(state):
      return True
    time.sleep(0.01)
  return False


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  root = _write_folder(tmp_path_factory.mktemp('kill_prepare') / 'photos')
  return root, _expected(root)


def _stop_after_first_shard(root, out, sig, expected) -> None:
  proc = _start(root, out)
  assert _wait_for_first_shard(proc, out), 'prepare ended before its first shard was seen'
  code, err = _stop(proc, sig, out)
  _check_stopped(sig, code, err, out)
  if sig == signal.SIGTERM:
    assert code == 143 and 'stopped by signal 15' in err, (code, err[-2000:])
  _finish(root, out, expected, workers='0')  # starts faster; the shards are the same


def test_kill_after_the_first_shard(images, tmp_path):
  """SIGKILL while shards are being written: the workers die with the parent (the kernel's
  parent-death signal), and the rerun packs exactly the folder."""
  root, expected = images
  _stop_after_first_shard(root, str(tmp_path / 'out'), signal.SIGKILL, expected)


@pytest.mark.slow
def test_term_after_the_first_shard(images, tmp_path):
  """SIGTERM while shards are being written: exit 143, the workers stopped, the rerun
  completes."""
  root, expected = images
  _stop_after_first_shard(root, str(tmp_path / 'out'), signal.SIGTERM, expected)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM], ids=['SIGKILL', 'SIGTERM'])
def test_stopped_at_20_random_moments(images, tmp_path, sig):
  root, expected = images
  t0 = time.time()
  _finish(root, str(tmp_path / 'reference'), expected)
  duration = time.time() - t0
  rng = random.Random(29 + sig)
  codes = []
  for trial in range(20):
    out = str(tmp_path / f'{sig.name}_{trial}')
    proc = _start(root, out)
    time.sleep(rng.uniform(0.2, duration))
    shards = os.path.exists(os.path.join(out, 'prepare_state.json'))
    code, err = _stop(proc, sig, out)
    _check_stopped(sig, code, err, out)
    codes.append((code, 'after a shard' if shards else 'before any shard'))
    _finish(root, out, expected)
  print(f'{sig.name} at 20 random moments over {duration:.1f} s: exit statuses {codes}')
