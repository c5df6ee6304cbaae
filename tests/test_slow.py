"""The slow tier (`pytest -m slow`): full default runs that check the documented targets.

Not run in CI (minutes of CPU each); run before resolving an issue that claims a figure.
"""
import json
import os

import pytest

from conftest import SUPERVISED, run_jkd


@pytest.mark.slow
def test_supervised_default_reaches_91_percent_within_10_minutes(tmp_path):
  """Issue 2: `jkd train` with the default Fashion-MNIST config on a 2-core CPU."""
  w = str(tmp_path / 'sup')
  out = run_jkd('train', '--config', SUPERVISED, '--workdir', w, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(os.path.join(w, 'summary.json')))
  print(json.dumps(summary, indent=1))
  assert summary['test_accuracy'] >= 0.91
  assert summary['wall_s'] <= 600
