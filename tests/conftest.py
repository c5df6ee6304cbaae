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
