"""Runs a few train steps on a 1-device mesh and on an N-device mesh; prints the max difference.

Executed by tests/test_parallel.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before jax is imported).
Usage: python tests/sharded_equivalence.py MODEL MESH_JSON
"""
import json
import sys

import jax
import numpy as np

from jkd import loop, parallel
from jkd.config import load_config
from jkd.trainers import supervised


def train_steps(config, mesh, batches, steps=2):
  task = supervised.build_task(config, '/tmp/unused')
  state, shardings = loop.init_sharded(task.init_state, jax.random.key(0), mesh)
  rep = parallel.replicated(mesh)
  step = jax.jit(task.train_step, in_shardings=(shardings, parallel.batch_sharding(mesh), rep),
                 out_shardings=(shardings, rep))
  losses = []
  for b in batches[:steps]:
    state, m = step(state, parallel.global_batch(b, mesh), jax.random.key(1))
    losses.append(float(m['loss']))
  return state, losses, shardings


def main():
  model, mesh_sizes = sys.argv[1], json.loads(sys.argv[2])
  overrides = [f'model.name={model}', 'batch_size=16', 'data.crop_padding=0']
  config = load_config('configs/fashion_mnist/supervised.py:tiny', overrides)
  task = supervised.build_task(config, '/tmp/unused')
  batches = [next(task.train_iterator) for _ in range(2)]
  one = parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])
  many = parallel.make_mesh(mesh_sizes)
  s1, l1, _ = train_steps(config, one, batches)
  s8, l8, sh8 = train_steps(config, many, batches)
  p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                         jax.tree.leaves(p8)))
  # Which parameters are really split across devices (from .sharding, not from the rules).
  sharded = sorted('/'.join(str(getattr(k, 'key', k)) for k in path)
                   for path, x in jax.tree_util.tree_leaves_with_path(s8.params)
                   if not x.sharding.is_fully_replicated)
  specs = {'/'.join(str(getattr(k, 'key', k)) for k in path): str(x.sharding.spec)
           for path, x in jax.tree_util.tree_leaves_with_path(s8.params)}
  print(json.dumps({'devices': jax.device_count(), 'mesh': dict(many.shape), 'loss_1': l1,
                    'loss_n': l8, 'max_param_diff': diff, 'sharded': sharded, 'specs': specs}))


if __name__ == '__main__':
  main()
