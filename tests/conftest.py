"""Shared test set-up: CPU only, the repo's configs, helpers to run the `jkd` command."""
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite compiles the same small programs in many processes: share XLA's persistent cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.expanduser('~'), '.cache', 'jkd-test-xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# gs:// paths through gcsfs (the local GCS emulator of test_bucket_workdir.py) even where the
# slow tier's TensorFlow is installed: etils.epath would otherwise pick tf.io.gfile, which talks
# to the real Google Cloud Storage, and caches that choice for the process.
os.environ.setdefault('EPATH_USE_TF', 'false')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERVISED = os.path.join(REPO, 'configs', 'fashion_mnist', 'supervised.py')


def run_jkd(*args, timeout=600, env=None):
  """Runs `python -m jkd.cli ARGS` in a subprocess; returns the CompletedProcess."""
  full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
  return subprocess.run([sys.executable, '-m', 'jkd.cli', *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def repo():
  return REPO


def assert_resume_is_bit_exact(train, config, workdir, steps=8):
  """Trains `steps` steps with a checkpoint halfway, removes the final checkpoint and summary (an
  interruption after the halfway save), trains again (resuming from the halfway checkpoint) and
  checks that every saved array (params, model_state incl. EMA and loss-term state, optimizer
  state) equals the uninterrupted run's. `train(config, workdir)` is a trainer's `train`."""
  import shutil
  import numpy as np
  from jkd.checkpoint import load_arrays
  config = config.copy_and_resolve_references()
  config.total_steps, config.checkpoint_every, config.log_every = steps, steps // 2, 1
  train(config, workdir)
  straight, _ = load_arrays(workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(steps)))
  os.remove(os.path.join(workdir, 'summary.json'))
  train(config, workdir)
  resumed, meta = load_arrays(workdir)
  assert meta['step'] == steps
  flat_a = jax_flatten(straight)
  flat_b = jax_flatten(resumed)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  return straight


def jax_flatten(tree):
  """{'a/b/c': leaf} of a nested tree of arrays."""
  import jax
  return {'/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='session')
def tiny_teachers(tmp_path_factory):
  """{'resnet': workdir, 'vit': workdir}: a tiny CNN and a tiny ViT teacher (12 steps of
  supervised.py:tiny), trained once for every test that distils from them (read only)."""
  from jkd.config import load_config  # pylint: disable=g-import-not-at-top
  from jkd import trainers  # pylint: disable=g-import-not-at-top
  out = {}
  for name, model in (('resnet', 'resnet20_s'), ('vit', 'vit_micro_p7')):
    w = str(tmp_path_factory.mktemp(name))
    trainers.train('train', load_config(SUPERVISED + ':tiny', [f'model.name={model}',
                                                               'total_steps=12']), w)
    out[name] = w
  return out
