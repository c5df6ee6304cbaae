"""The same train and distill steps on 1 device and on 8 simulated CPU devices give the same
result, and parameters are laid out as the logical-axis rules say (read from `.sharding`)."""
import json
import os
import subprocess
import sys

import pytest

from jkd import parallel
from jkd.errors import UserError

from conftest import REPO

TOLERANCE = 2e-5  # fp32: only the order of the cross-device reductions differs.


def run_sharded(job, model, mesh, teacher=None):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  args = [sys.executable, 'tests/sharded_equivalence.py', job, model, json.dumps(mesh)]
  out = subprocess.run(args + ([teacher] if teacher else []), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_result(r):
  assert r['devices'] == 8
  for a, b in zip(r['loss_1'], r['loss_n']):
    assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (r['loss_1'], r['loss_n'])
  assert r['max_param_diff'] <= TOLERANCE, r['max_param_diff']


@pytest.mark.parametrize('model, mesh', [
    ('resnet8_s', {'data': 8}),
    ('vit_nano_p4', {'data': 2, 'fsdp': 4}),
])
def test_sharded_train_step_matches_single_device(model, mesh):
  r = run_sharded('train', model, mesh)
  assert_same_result(r)
  if mesh.get('fsdp', 1) > 1:
    # FSDP shards the ViT matrices along 'embed': the MLP kernels are (embed, mlp).
    assert r['specs']['encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']  # tensor has size 1
    assert r['specs']['encoder/block0/mlp/fc2/kernel'] == ['tensor', 'fsdp']
    assert 'encoder/block0/mlp/fc1/kernel' in r['sharded']
  else:
    assert not r['sharded'], r['sharded']  # data parallel only: every parameter replicated


def test_distill_step_on_data_fsdp_tensor_mesh_matches_single_device():
  # Teacher vit_small_p4 (4 heads) and student vit_nano_p4, both laid out by the same rules on
  # a 2x2x2 mesh: MLP and heads split over 'tensor', embed over 'fsdp', batch over both.
  r = run_sharded('distill', 'vit_nano_p4', {'data': 2, 'fsdp': 2, 'tensor': 2}, 'vit_small_p4')
  assert r['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert_same_result(r)
  s, t = r['specs'], r['teacher_specs']
  assert s['student/encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']
  assert t['params/encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']
  # Attention kernels are (embed, heads, kv): the teacher's 4 heads split over tensor; the
  # student's 3 heads do not divide by 2, so that dimension stays whole (see _fit_spec_to_shape).
  assert t['params/encoder/block0/attn/query/kernel'] == ['fsdp', 'tensor', None]
  assert s['student/encoder/block0/attn/query/kernel'] == ['fsdp', None, None]


def test_sharding_rules_override_is_validated_and_applied():
  rules = parallel.merge_rules([('embed', None), ('mlp', ('fsdp', 'tensor'))])
  table = dict(rules)
  assert table['embed'] is None and table['mlp'] == ('fsdp', 'tensor')
  assert table['heads'] == 'tensor'  # untouched entries keep their default
  with parallel.use_rules(rules):
    assert parallel.logical_to_mesh_spec(('embed', 'mlp')) == parallel.P(None, ('fsdp', 'tensor'))
  assert parallel.logical_to_mesh_spec(('embed', 'mlp')) == parallel.P('fsdp', 'tensor')
  with pytest.raises(UserError, match='unknown mesh axes'):
    parallel.merge_rules([('embed', 'model')])
  with pytest.raises(UserError, match='not a pair'):
    parallel.merge_rules([('embed',)])
