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


def run_sharded(jobs, model, mesh, teacher=None):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  args = [sys.executable, 'tests/sharded_equivalence.py', ','.join(jobs), model, json.dumps(mesh)]
  out = subprocess.run(args + ([teacher] if teacher else []), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def assert_same_result(r):
  assert r['devices'] == 8
  for a, b in zip(r['loss_1'], r['loss_n']):
    assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (r['loss_1'], r['loss_n'])
  assert r['max_param_diff'] <= TOLERANCE, r['max_param_diff']


def test_resnet_data_parallel_step_matches_single_device():
  r = run_sharded(['train'], 'resnet8_s', {'data': 8})['train']
  assert_same_result(r)
  assert not r['sharded'], r['sharded']  # data parallel only: every parameter replicated


# A ViT train step and a KD step (teacher vit_small_p4, 4 heads; student vit_nano_p4, 3 heads)
# on each mesh of the issue. Teacher and student are laid out by the same rules.
@pytest.mark.parametrize('mesh', [
    {'data': 8},
    {'data': 2, 'fsdp': 4},
    {'data': 2, 'fsdp': 2, 'tensor': 2},
], ids=['data8', 'data2xfsdp4', 'data2xfsdp2xtensor2'])
def test_vit_train_and_distill_steps_match_single_device(mesh):
  results = run_sharded(['train', 'distill'], 'vit_nano_p4', mesh, 'vit_small_p4')
  train, kd = results['train'], results['distill']
  assert_same_result(train)
  assert_same_result(kd)
  assert kd['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1, **mesh}
  fsdp, tensor = ('fsdp' if 'fsdp' in mesh else None), ('tensor' if 'tensor' in mesh else None)
  if not fsdp and not tensor:
    assert not train['sharded'] and not kd['sharded']
    return
  s, t = kd['specs'], kd['teacher_specs']
  # MLP kernels are (embed, mlp): embed over fsdp, mlp over tensor (size-1 axes are kept).
  assert train['specs']['encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']
  assert s['student/encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']
  assert t['params/encoder/block0/mlp/fc1/kernel'] == ['fsdp', 'tensor']
  assert 'encoder/block0/mlp/fc1/kernel' in train['sharded']
  # Attention kernels are (embed, heads, kv): the teacher's 4 heads split over tensor; the
  # student's 3 heads do not divide by 2, so that dimension stays whole (_fit_spec_to_shape).
  assert t['params/encoder/block0/attn/query/kernel'] == ['fsdp', 'tensor', None]
  if tensor:
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
