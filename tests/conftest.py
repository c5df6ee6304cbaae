"""Shared test set-up: CPU only, the repo's configs, helpers to run the `jkd` command."""
import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
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
