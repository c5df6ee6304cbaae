"""The same train step on 1 device and on 8 simulated CPU devices gives the same result."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TOLERANCE = 2e-5  # fp32: only the order of the cross-device reductions differs.


def run_sharded(model, mesh):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, 'tests/sharded_equivalence.py', model, json.dumps(mesh)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('model, mesh', [
    ('resnet8_s', {'data': 8}),
    ('vit_nano_p4', {'data': 2, 'fsdp': 4}),
])
def test_sharded_step_matches_single_device(model, mesh):
  r = run_sharded(model, mesh)
  assert r['devices'] == 8
  for a, b in zip(r['loss_1'], r['loss_n']):
    assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (r['loss_1'], r['loss_n'])
  assert r['max_param_diff'] <= TOLERANCE, r['max_param_diff']
  if mesh.get('fsdp', 1) > 1:
    # FSDP really shards the ViT matrices along 'embed' (checked from .sharding).
    assert any('MlpBlock' in p or 'mlp' in p.lower() for p in r['sharded']), r['sharded']
