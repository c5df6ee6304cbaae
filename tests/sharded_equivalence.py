"""Runs a few train (or distill) steps on a 1-device mesh and on an N-device mesh; prints the max
difference and how the parameters were really laid out.

Executed by tests/test_parallel.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before jax is imported).
Usage: python tests/sharded_equivalence.py JOBS MODEL MESH_JSON [TEACHER_MODEL]
  JOBS: comma-separated 'train' (supervised step) and/or 'distill' (KD step from a frozen
  TEACHER_MODEL teacher whose random weights are saved to a temporary workdir first).
Prints one JSON line {job: result}.
"""
import json
import sys
import tempfile

import jax
import numpy as np

from jkd import loop, parallel
from jkd.checkpoint import RunCheckpointer
from jkd.config import load_config, to_dict
from jkd.trainers import distill, supervised

TINY = {'train': 'configs/fashion_mnist/supervised.py:tiny',
        'distill': 'configs/fashion_mnist/distill.py:tiny'}


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _spec(x) -> list:
  """A live array's PartitionSpec as JSON: one entry per dimension (None, axis or [axes])."""
  spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
  return [list(a) if isinstance(a, tuple) else a for a in spec]


def save_random_teacher(model: str, workdir: str) -> None:
  """A `jkd train`-style checkpoint of an untrained `model`: enough to be a frozen teacher."""
  config = load_config(TINY['train'], [f'model.name={model}'])
  task = supervised.build_task(config, workdir)
  one = parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])
  state, _ = loop.init_sharded(task.init_state, jax.random.key(7), one)
  ckpt = RunCheckpointer(workdir)
  ckpt.save(0, state, task.train_iterator.get_state(),
            dict(task.meta, kind='train', config=to_dict(config)))
  ckpt.close()


def train_steps(task, mesh, batches):
  state, shardings = loop.init_sharded(task.init_state, jax.random.key(0), mesh)
  step, extra = loop.jit_train_step(task, mesh, shardings)
  losses = []
  for b in batches:
    state, m = step(state, parallel.global_batch(b, mesh), jax.random.key(1), *extra)
    losses.append(float(m['loss']))
  return state, losses, extra


def compare(job: str, model: str, mesh_sizes: dict, teacher: str | None) -> dict:
  """Two steps of `job` on 1 device and on the mesh `mesh_sizes`, from the same batches."""
  overrides = [f'model.name={model}', 'batch_size=16', 'data.crop_padding=0']
  if job == 'distill':
    teacher_dir = tempfile.mkdtemp(prefix='jkd-teacher-')
    save_random_teacher(teacher, teacher_dir)
    overrides.append(f'teacher.workdir={teacher_dir}')
  config = load_config(TINY[job], overrides)
  module = distill if job == 'distill' else supervised
  batches = None
  results = {}
  for name, mesh in (('1', parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])),
                     ('n', parallel.make_mesh(mesh_sizes))):
    task = module.build_task(config, '/tmp/unused')
    batches = batches or [next(task.train_iterator) for _ in range(2)]
    results[name] = train_steps(task, mesh, batches)
  (s1, l1, _), (sn, ln, extra_n) = results['1'], results['n']
  p1, pn = jax.device_get(s1.params), jax.device_get(sn.params)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1),
                                                         jax.tree.leaves(pn)))
  # Layouts read from `.sharding` of the live arrays, not from the rules.
  leaves = jax.tree_util.tree_leaves_with_path(sn.params)
  teacher_leaves = jax.tree_util.tree_leaves_with_path(extra_n[0]) if extra_n else []
  return {'devices': jax.device_count(), 'mesh': dict(parallel.make_mesh(mesh_sizes).shape),
          'loss_1': l1, 'loss_n': ln, 'max_param_diff': diff,
          'sharded': sorted(_path(p) for p, x in leaves if not x.sharding.is_fully_replicated),
          'specs': {_path(p): _spec(x) for p, x in leaves},
          'teacher_specs': {_path(p): _spec(x) for p, x in teacher_leaves}}


def main():
  jobs, model, mesh_sizes = sys.argv[1].split(','), sys.argv[2], json.loads(sys.argv[3])
  teacher = sys.argv[4] if len(sys.argv) > 4 else None
  print(json.dumps({job: compare(job, model, mesh_sizes, teacher) for job in jobs}))


if __name__ == '__main__':
  main()
