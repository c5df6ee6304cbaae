r"""Accuracy, size and latency of jkd's deployable files (docs/deploy.md), one runtime per process.

  python benchmarks/deploy.py --pair resnet8_s runs/r8 runs/r8_c50 \
      --pair vit_micro_p7 runs/vit runs/vit_c50 --out runs/deploy_bench --threads 1 \
      --torch-python .venv-torch/bin/python

For each workdir (a parent and its 50%-channel-pruned student) it writes fp32 and static int8
ONNX and LiteRT files with `jkd export` (and the ONNX int8 file once more with `--float-stem`), evaluates each on the test split in its runtime
(`jkd eval --export`) and times it (`jkd bench --export`: batch 1 and 32, median of repeats,
`--threads` threads), each in its own process. Beside them: the JAX model's accuracy (float and
jkd's fake-quant model of the int8 file, `jkd.deploy.fake_quant`). With `--torch-python`, the
same student (resnet8_s or the ViT) rebuilt in PyTorch with the same weights is exported by
`torch.onnx.export` (benchmarks/deploy_torch.py, in that Python) and quantized by the same ONNX
Runtime static quantizer on the same calibration images, then evaluated and timed the same way.
Writes OUT/results.json and OUT/results.md; records os.getloadavg() before and after each timing.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kw):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
  if out.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return out.stdout


def _jkd(*args):
  return _run([sys.executable, '-m', 'jkd.cli', *args])


def jax_reference(workdir: str, out: str, npz: str | None) -> None:
  """(subprocess) The JAX model's float and fake-quant test accuracy; weights for torch."""
  import numpy as np
  from flax.traverse_util import flatten_dict
  from jkd import data
  from jkd.deploy import calibration, fake_quant
  from jkd.deploy.classifier import Classifier
  clf = Classifier.from_workdir(workdir)
  ranges = fake_quant.calibrate(clf, calibration.calibration_pixels(clf.data_config))
  correct = {'float': 0, 'fake_quant': 0, 'fake_quant_stem': 0}
  count = 0
  for b in data.make_eval_iterator(clf.data_config, 'test', global_batch_size=500):
    x, y, m = b['image'].astype(np.float32), b['label'], b['mask']
    correct['float'] += float(((np.asarray(clf.apply(x)).argmax(1) == y) * m).sum())
    for key, stem in (('fake_quant', False), ('fake_quant_stem', True)):
      correct[key] += float(((np.asarray(fake_quant.apply(
          clf, ranges, x, float_stem=stem)).argmax(1) == y) * m).sum())
    count += float(m.sum())
  with open(out, 'w') as f:
    json.dump({k: v / count for k, v in correct.items()} | {'params': clf.param_count(),
                                                            'model_config': clf.model_config}, f)
  if npz:
    flat = {'/'.join(k): np.asarray(v) for k, v in flatten_dict(clf.variables).items()}
    px = next(iter(data.make_eval_iterator(clf.data_config, 'test[:8]', global_batch_size=8)))
    px = px['image'].astype(np.float32)
    np.savez(npz, **flat, mean=np.asarray(clf.mean, np.float32),
             std=np.asarray(clf.std, np.float32), check_pixels=px,
             check_logits=np.asarray(clf.apply(px)))


def ort_quantize(src: str, dst: str, workdir: str, like: str) -> None:
  """(subprocess) ONNX Runtime's static int8 of a torch-exported file, on jkd's calibration."""
  import shutil
  import onnx
  from jkd.deploy import calibration, onnx as onnx_export
  from jkd.deploy.classifier import Classifier
  clf = Classifier.from_workdir(workdir)
  pixels = calibration.calibration_pixels(clf.data_config)
  onnx_export.save(onnx_export.quantize(onnx.load(src), pixels), dst)
  for path in (src, dst):
    shutil.copy(like + '.json', path + '.json')  # Same input, classes and data config.


def measure(path: str, threads: int, b32_path: str | None = None) -> dict:
  """Accuracy in the runtime, size, and latency at batch 1 and 32 (batch 32 from `b32_path`,
  a LiteRT file exported with --batch 32, when given)."""
  ev = _eval(path)
  bench = {}
  for b, p in (('1', path), ('32', b32_path or path)):
    _jkd('bench', '--export', p, '--threads', str(threads), '--batch-sizes', b)
    with open(p + '.bench.json') as f:
      bench[b] = json.load(f)
  return {'accuracy': ev['accuracy'], 'bytes': os.path.getsize(path),
          'runtime': bench['1']['runtime'], 'ms_b1': bench['1']['batches']['1']['ms'],
          'ms_b32': bench['32']['batches']['32']['ms'],
          'load': [bench['1']['loadavg_before'], bench['32']['loadavg_after']]}


def _eval(path: str) -> dict:
  text = _jkd('eval', '--export', path, '--split', 'test')
  return json.loads(text[text.index('{'):])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--pair', nargs=3, action='append', metavar=('NAME', 'PARENT', 'PRUNED'),
                 required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--threads', type=int, default=1)
  p.add_argument('--formats', nargs='+', default=['onnx', 'tflite'])
  p.add_argument('--torch-python', default=None)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = []
  for name, parent, pruned in args.pair:
    for variant, workdir in (('fp32 parent', parent), ('50% channels', pruned)):
      tag = f'{name}_{"parent" if workdir == parent else "c50"}'
      ref_json = os.path.join(args.out, f'{tag}_jax.json')
      npz = os.path.join(args.out, f'{tag}.npz') if args.torch_python else None
      _run([sys.executable, __file__, '_jax', workdir, ref_json] + ([npz] if npz else []))
      ref = json.load(open(ref_json))
      for fmt in args.formats:
        ext = {'onnx': '.onnx', 'tflite': '.tflite'}[fmt]
        # ONNX int8 twice: full-integer, and with the first layer float (--float-stem).
        for int8, stem in ((False, False), (True, False)) + (((True, True),) if fmt == 'onnx'
                                                               else ()):
          path = os.path.join(args.out, f'{tag}{"_int8" if int8 else ""}{"_stem" * stem}{ext}')
          flags = ['--int8'] * int8 + ['--float-stem'] * stem
          try:
            _jkd('export', '--workdir', workdir, '--format', fmt, '--out', path, *flags)
          except RuntimeError as e:
            results.append({'model': name, 'variant': variant, 'format': fmt, 'int8': int8,
                            'float_stem': stem, 'error': str(e).strip().splitlines()[-1][:300]})
            continue
          b32 = None
          if fmt == 'tflite':  # LiteRT files keep their exported batch (see jkd/deploy/litert.py)
            b32 = path.replace(ext, f'_b32{ext}')
            _jkd('export', '--workdir', workdir, '--format', fmt, '--out', b32, '--batch', '32',
                 *flags)
          r = measure(path, args.threads, b32)
          jax_key = 'float' if not int8 else 'fake_quant_stem' if stem else 'fake_quant'
          results.append({'model': name, 'variant': variant, 'format': fmt, 'int8': int8,
                          'float_stem': stem, 'params': ref['params'],
                          'jax_accuracy': ref[jax_key], **r})
          print(json.dumps(results[-1]), flush=True)
      if npz:
        t_fp32 = os.path.join(args.out, f'{tag}_torch.onnx')
        t_int8 = os.path.join(args.out, f'{tag}_torch_int8.onnx')
        _run([args.torch_python, os.path.join(REPO, 'benchmarks', 'deploy_torch.py'), npz, t_fp32])
        _run([sys.executable, __file__, '_ortq', t_fp32, t_int8, workdir,
              os.path.join(args.out, f'{tag}.onnx')])
        for int8, path in ((False, t_fp32), (True, t_int8)):
          r = measure(path, args.threads)
          results.append({'model': name, 'variant': variant + ' (PyTorch: torch.onnx + ORT)',
                          'format': 'onnx', 'int8': int8, 'params': ref['params'], **r})
          print(json.dumps(results[-1]), flush=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'threads': args.threads, 'results': results}, f, indent=1)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(markdown(results, args.threads))
  print(markdown(results, args.threads))


def markdown(results, threads) -> str:
  rows = [f'| model | variant | file | accuracy (file, runtime) | JAX model | bytes | '
          f'batch 1 ms | batch 32 ms | load (1 min, before/after) |', '|---' * 9 + '|']
  for r in results:
    stem = ' (float stem)' if r.get('float_stem') else ''
    kind = f'{r["format"]} {"int8" if r["int8"] else "fp32"}{stem}'
    if 'error' in r:
      rows.append(f'| {r["model"]} | {r["variant"]} | {kind} | not converted: {r["error"]} '
                  '| | | | | |')
      continue
    jax_acc = f'{100 * r["jax_accuracy"]:.2f}%' if 'jax_accuracy' in r else '-'
    rows.append(f'| {r["model"]} | {r["variant"]} | {kind} | {100 * r["accuracy"]:.2f}% | '
                f'{jax_acc} | {r["bytes"]:,} | {r["ms_b1"]:.3f} | {r["ms_b32"]:.3f} | '
                f'{r["load"][0][0]:.2f}/{r["load"][1][0]:.2f} |')
  return '\n'.join(rows) + f'\n\nThreads: {threads}.\n'


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == '_jax':
    jax_reference(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
  elif len(sys.argv) > 1 and sys.argv[1] == '_ortq':
    ort_quantize(*sys.argv[2:6])
  else:
    main()
