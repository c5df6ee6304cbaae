"""jkd vs PyTorch/timm, side by side: the same train steps on the same GPU.

  python benchmarks/compare.py --gap --out docs/bench_gpu.md [--workdir /tmp/jkd_compare]
  python benchmarks/compare.py --jobs mae_vit_b16 simmim_vit_b16 --gap   # some jobs only

For every job in JOBS (or `--jobs`) runs `jkd bench --config configs/bench/<job>.py`, then
`benchmarks/timm_reference.py --model <job>` — supervised ViT-B/16, ViT-S/16 and ResNet-50,
KD ViT-B/16 -> ViT-S/16, MAE and SimMIM ViT-B/16 pretraining, int8 QAT of ViT-S/16 — each in
its own child process one after the other (so JAX and PyTorch never hold the GPU at the same
time), and prints a markdown table: jkd img/s, timm img/s, their ratio, jkd MFU (and timm's,
from jkd's FLOP count of the same step), and peak memory. Both sides time a full train step
(forward, loss, backward, AdamW) on one synthetic batch of 256 that stays on the device,
median of repeats after warm-up. `--gap` builds the PyTorch ViTs without a class token, as the
jkd configs (see `timm_reference.py`).

`--skip-timm` times jkd only (a TPU, or a GPU without torch); `--config-arg tiny --skip-timm` is
a quick functional check on CPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each is configs/bench/<job>.py on the jkd side and `timm_reference.py --model <job>`.
JOBS = ('vit_b16', 'vit_s16', 'resnet50', 'kd_vit_b16_s16', 'mae_vit_b16', 'simmim_vit_b16',
        'qat_vit_s16')


def run_jkd(job: str, workdir: str, config_arg: str, overrides: list[str]) -> dict:
  """`jkd bench` for one job in a child process; returns its bench.json."""
  spec = os.path.join(REPO, 'configs', 'bench', f'{job}.py') + (
      f':{config_arg}' if config_arg else '')
  cmd = [sys.executable, '-m', 'jkd.cli', 'bench', '--config', spec, '--workdir', workdir,
         *overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  with open(os.path.join(workdir, 'bench.json')) as f:
    return json.load(f)


def run_timm(jobs, out_json: str, extra: list[str]) -> dict[str, dict]:
  """`timm_reference.py` for each of `jobs`, each in its own child process; results by job."""
  results = {}
  for job in jobs:  # One process per model: torch.compile caches and memory start clean.
    path = f'{out_json}.{job}.json'
    cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'timm_reference.py'), '--model', job,
           '--json', path, *extra]
    print('$', ' '.join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode:
      raise SystemExit(f'compare.py: the timm reference failed for {job} (exit code '
                       f'{done.returncode}); see its message above. Use --skip-timm to '
                       'report jkd alone.')
    with open(path) as f:
      results[job] = json.load(f)[0]
  return results


def markdown(jkd: dict[str, dict], timm: dict[str, dict]) -> str:
  """The side-by-side table."""
  gib = lambda b: f'{b / 2**30:.2f}' if b else 'n/a'  # noqa: E731
  rows = ['| job | batch | jkd img/s | timm img/s | jkd / timm | jkd MFU | timm MFU* '
          '| jkd peak GiB | timm peak GiB |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for job, j in jkd.items():
    t = timm.get(job)
    mfu = f'{j["mfu"] * 100:.1f}%' if j.get('mfu') is not None else 'n/a'
    if t:
      ratio = f'{j["examples_per_sec"] / t["examples_per_sec"]:.2f}'
      timm_mfu = 'n/a'
      if j.get('flops_per_example') and j.get('peak_flops'):
        peak = j['peak_flops']  # timm_reference.py runs on one GPU.
        timm_mfu = f'{t["examples_per_sec"] * j["flops_per_example"] / peak * 100:.1f}%'
      timm_cols = [f'{t["examples_per_sec"]:,.0f}', ratio, timm_mfu]
    else:
      timm_cols = ['—', '—', '—']
    rows.append(f'| {job} ({j["dtype"]}) | {j["batch_size"]} | {j["examples_per_sec"]:,.0f} | '
                f'{timm_cols[0]} | {timm_cols[1]} | {mfu} | {timm_cols[2]} | '
                f'{gib(j.get("peak_memory_bytes"))} | {gib(t and t.get("peak_memory_bytes"))} |')
  first = next(iter(jkd.values()))
  device_line = f'Device: {first["num_devices"]} x {first["device"]}, jax {first["jax_version"]}'
  if timm:
    t = next(iter(timm.values()))
    device_line += f'; torch {t["torch_version"]}, timm {t["timm_version"]} on {t["device"]}'
  notes = [
      device_line + '.',
      f'MFU against {first["peak_flops"] / 1e12:.3g} TFLOP/s per device ({first["peak_source"]}).',
      '*timm MFU = timm img/s x jkd\'s XLA FLOPs per image of the same step.',
      'jkd peak memory: ' + first['memory_source'] + '; timm: torch.cuda.max_memory_allocated '
      'over the timed steps.',
      'Both: one fixed device-resident synthetic batch (input pipeline not measured), median of '
      'repeats after warm-up.',
  ]
  return '\n'.join(rows) + '\n\n' + '\n'.join(f'- {n}' for n in notes) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--jobs', nargs='+', choices=JOBS, default=list(JOBS))
  parser.add_argument('--workdir', default=None, help='bench workdirs (default: a temp dir)')
  parser.add_argument('--config-arg', default='', help="config ARG, e.g. 'tpu' or 'tiny'")
  parser.add_argument('--skip-timm', action='store_true', help='time jkd only')
  parser.add_argument('--gap', action='store_true',
                      help='PyTorch ViTs without class token (196 patch tokens, as the jkd '
                           'configs; MAE/SimMIM encoders on patch tokens only)')
  parser.add_argument('--out', help='also write the markdown table to this file')
  args, overrides = parser.parse_known_args(argv)  # The rest go to jkd bench (--config.x=y).
  if not args.skip_timm:  # Fail before spending minutes on jkd when the other half cannot run.
    check = subprocess.run([sys.executable, '-c', 'import torch, timm; '
                            'assert torch.cuda.is_available(), "no CUDA GPU visible to torch"'],
                           capture_output=True, text=True)
    if check.returncode:
      print('compare.py: error: the timm reference cannot run here: '
            f'{check.stderr.strip().splitlines()[-1]}. Install torch (CUDA) and timm with '
            "`pip install -e '.[torch]'` on a GPU machine, or pass --skip-timm.",
            file=sys.stderr)
      return 2
  root = args.workdir or tempfile.mkdtemp(prefix='jkd_compare_')
  jkd = {job: run_jkd(job, os.path.join(root, job), args.config_arg, overrides)
         for job in args.jobs}
  timm = {}
  if not args.skip_timm:
    timm = run_timm(args.jobs, os.path.join(root, 'timm'), ['--gap'] if args.gap else [])
  table = markdown(jkd, timm)
  print('\n' + table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
