r"""Seeded tiny runs of every jkd command, fingerprinted: proof that a refactor changed nothing.

  python benchmarks/fingerprints.py --out before.json             # on the old code
  python benchmarks/fingerprints.py --out after.json --compare before.json

Each run is the real `jkd` command (`python -m jkd.cli`, in a child process, on the CPU) at the
test-suite size (`:tiny` configs, a fixed seed). A run's fingerprint is the SHA-256 of every
array of its final checkpoint (parameters, BatchNorm statistics, optimizer state, step; read
with `jkd.checkpoint.load_arrays`) plus the numbers of what it writes (`summary.json`,
`eval.json`, `bench.json`, `plan.json`, `pipeline.json`), leaving out what measures time
(`wall_s`, `*_per_sec`, `step_ms`, `compile_s`, `build_s`, peak FLOP/s of the CPU...) and with the
run root replaced by `ROOT` in paths. `--compare` prints every difference and exits 1 if there
is one. The runs take about 15 minutes on 2 cores. Used for the trainer redesign (issue 17);
reusable for any change that must not change results.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # This checkout's jkd, whatever is installed.
FM = 'configs/fashion_mnist'
BENCH = 'configs/bench'
# Keys that measure time or the machine, not the computation.
TIMING = ('wall_s', 'examples_per_sec', 'step_ms', 'step_ms_all', 'compile_s', 'build_s',
          'peak_flops', 'peak_source', 'mfu', 'peak_memory_bytes', 'memory_source',
          'python_version', 'jax_version', 'reconstructions')


def runs(root: str) -> list[tuple[str, list[str], str]]:
  """(name, jkd arguments, file the run writes) in dependency order."""
  def w(name):
    return os.path.join(root, name)
  teacher = f'--config.teacher.workdir={w("train")}'
  return [
      ('train', ['train', '--config', f'{FM}/supervised.py:tiny', '--workdir', w('train'),
                 '--config.model.name=resnet20_s', '--config.total_steps=12'], 'summary.json'),
      ('eval', ['eval', '--workdir', w('train'), '--split', 'test[:256]'], 'eval.json'),
      ('pretrain_mae', ['pretrain', '--config', f'{FM}/mae.py:tiny', '--workdir',
                        w('pretrain_mae')], 'summary.json'),
      ('pretrain_simmim', ['pretrain', '--config', f'{FM}/simmim.py:tiny', '--workdir',
                           w('pretrain_simmim')], 'summary.json'),
      ('distill_kd', ['distill', '--config', f'{FM}/distill.py:tiny', '--workdir',
                      w('distill_kd'), teacher, '--config.mixup_alpha=0.2'], 'summary.json'),
      ('distill_fitnet', ['distill', '--config', f'{FM}/distill.py:tiny-fitnet', '--workdir',
                          w('distill_fitnet'), teacher, '--config.losses.fitnet.teacher=stage3'],
       'summary.json'),
      ('distill_at', ['distill', '--config', f'{FM}/distill.py:tiny-at', '--workdir',
                      w('distill_at'), teacher], 'summary.json'),
      ('distill_deit', ['distill', '--config', f'{FM}/distill.py:tiny-deit', '--workdir',
                        w('distill_deit'), teacher], 'summary.json'),
      ('distill_cache', ['distill', '--config', f'{FM}/distill.py:tiny', '--workdir',
                         w('distill_cache'), teacher, f'--config.teacher.cache.dir={w("cache")}',
                         '--config.teacher.cache.topk=4'], 'summary.json'),
      ('distill_init_from', ['distill', '--config', f'{FM}/distill.py:tiny', '--workdir',
                             w('distill_init_from'), teacher,
                             f'--config.init_from={w("distill_kd")}'], 'summary.json'),
      ('eval_distill', ['eval', '--workdir', w('distill_kd'), '--split', 'test[:256]'],
       'eval.json'),
      ('mim_distill_mae', ['distill', '--config', f'{FM}/mim_distill.py:tiny', '--workdir',
                           w('mim_distill_mae'), f'--config.teacher.workdir={w("pretrain_mae")}'],
       'summary.json'),
      ('mim_distill_tinymim', ['distill', '--config', f'{FM}/mim_distill.py:tiny-tinymim',
                               '--workdir', w('mim_distill_tinymim'),
                               f'--config.teacher.workdir={w("pretrain_mae")}'], 'summary.json'),
      ('mim_distill_simmim', ['distill', '--config', f'{FM}/mim_distill.py:tiny-feature',
                              '--workdir', w('mim_distill_simmim'),
                              f'--config.teacher.workdir={w("pretrain_simmim")}'],
       'summary.json'),
      ('compress_qat_kd', ['compress', '--config', f'{FM}/compress.py:tiny-qat_kd', '--workdir',
                           w('compress_qat_kd'), f'--config.init_from={w("distill_kd")}',
                           teacher], 'summary.json'),
      # The model of `train` (resnet20_s): since issue 19 an init_from of another architecture
      # is refused (this run used to load resnet20_s's tensors into resnet8_s).
      ('compress_prune', ['compress', '--config', f'{FM}/compress.py:tiny-prune50',
                          '--workdir', w('compress_prune'), f'--config.init_from={w("train")}',
                          '--config.model.name=resnet20_s'], 'summary.json'),
      ('pipeline', ['pipeline', '--config', f'{FM}/pipeline.py:tiny', '--workdir',
                    w('pipeline')], 'pipeline.json'),
      ('bench_vit', ['bench', '--config', f'{BENCH}/vit_s16.py:tiny', '--workdir',
                     w('bench_vit')], 'bench.json'),
      ('bench_kd', ['bench', '--config', f'{BENCH}/kd_vit_b16_s16.py:tiny', '--workdir',
                    w('bench_kd')], 'bench.json'),
      ('bench_mae', ['bench', '--config', f'{BENCH}/mae_vit_b16.py:tiny', '--workdir',
                     w('bench_mae')], 'bench.json'),
      ('bench_qat', ['bench', '--config', f'{BENCH}/qat_vit_s16.py:tiny', '--workdir',
                     w('bench_qat')], 'bench.json'),
      ('plan_named', ['plan', '--config', f'{BENCH}/vit_s16.py', '--teacher', 'vit_l16',
                      '--config.mesh.data=1', '--workdir', w('plan_named')], 'plan.json'),
      ('plan_workdir', ['plan', '--config', f'{FM}/distill.py:tiny', teacher, '--measure',
                        '--workdir', w('plan_workdir')], 'plan.json'),
      ('plan_mae', ['plan', '--config', 'configs/imagenet/mae_vit_b16.py', '--config.mesh.data=8',
                    '--devices', '8', '--workdir', w('plan_mae')], 'plan.json'),
  ]


def array_digest(workdir: str) -> dict[str, str]:
  """SHA-256 of each top-level part of the latest checkpoint (params, model_state, ...)."""
  import jax
  import numpy as np
  from jkd.checkpoint import load_arrays
  arrays, _ = load_arrays(workdir)
  out = {}
  for part, tree in sorted(arrays.items()):
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
      a = np.asarray(leaf)
      h.update(jax.tree_util.keystr(path).encode())
      h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    out[part] = h.hexdigest()[:16]
  return out


def scrub(obj, root: str):
  """The numbers of a written JSON without timings; paths relative to ROOT."""
  if isinstance(obj, dict):
    return {k: scrub(v, root) for k, v in sorted(obj.items())
            if k not in TIMING and not k.endswith('_per_sec')}
  if isinstance(obj, list):
    return [scrub(v, root) for v in obj]
  if isinstance(obj, str):
    return obj.replace(root, 'ROOT')
  return obj


def fingerprint(root: str, log=print) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, 'xla_cache'))
  out = {}
  for name, args, written in runs(root):
    t0 = time.time()
    p = subprocess.run([sys.executable, '-m', 'jkd.cli', *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    record = {'exit': p.returncode}
    if p.returncode:
      record['stderr'] = p.stderr[-2000:]
    wd = args[args.index('--workdir') + 1]
    path = os.path.join(wd, written)
    if os.path.exists(path):
      with open(path) as f:
        record['written'] = scrub(json.load(f), root)
    if args[0] in ('train', 'pretrain', 'distill', 'compress') and not p.returncode:
      record['arrays'] = array_digest(wd)
    if args[0] == 'pipeline' and not p.returncode:
      record['stages'] = {s: array_digest(os.path.join(wd, s))
                          for s in sorted(os.listdir(wd)) if os.path.isdir(os.path.join(wd, s))}
    out[name] = record
    log(f'{name:<22} exit {p.returncode}  {time.time() - t0:5.1f} s  '
        f'{record.get("arrays", {}).get("params", "")}')
    if p.returncode:
      log(record['stderr'])
  return out


def differences(before, after, path='') -> list[str]:
  if isinstance(before, dict) and isinstance(after, dict):
    out = []
    for k in sorted(set(before) | set(after)):
      if k not in before or k not in after:
        out.append(f'{path}/{k}: only in {"after" if k in after else "before"}')
      else:
        out += differences(before[k], after[k], f'{path}/{k}')
    return out
  return [] if before == after else [f'{path}: {before!r} -> {after!r}']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='where the fingerprints (JSON) go')
  parser.add_argument('--compare', help='fingerprints of the old code to compare with')
  parser.add_argument('--root', help='run directory (default: a temporary one)')
  args = parser.parse_args(argv)
  root = os.path.abspath(args.root or tempfile.mkdtemp(prefix='jkd_fingerprints_'))
  t0 = time.time()
  result = fingerprint(root)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1, sort_keys=True)
  print(f'{len(result)} runs in {time.time() - t0:.0f} s -> {args.out}')
  failed = [n for n, r in result.items() if r['exit']]
  if failed:
    print(f'runs that failed: {", ".join(failed)}')
  if not args.compare:
    return 1 if failed else 0
  with open(args.compare) as f:
    before = json.load(f)
  diff = differences(before, result)
  same = [n for n in result if n in before and not differences(before[n], result[n])]
  print(f'identical: {len(same)}/{len(before)} runs ({", ".join(same)})')
  for line in diff:
    print('DIFFERENT', line)
  return 1 if diff or failed else 0


if __name__ == '__main__':
  sys.exit(main())
