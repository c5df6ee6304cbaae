"""The `jkd` command.

  jkd train    --config FILE.py[:ARG] --workdir DIR [--config.a.b=value ...]
  jkd pretrain --config FILE.py[:ARG] --workdir DIR [...]
  jkd distill  --config FILE.py[:ARG] --workdir DIR [...]
  jkd compress --config FILE.py[:ARG] --workdir DIR --config.init_from=TRAINED [...]
  jkd eval     --workdir DIR [--split test] [--export]
  jkd eval     --export FILE.onnx|.tflite|.stablehlo [--workdir DIR] [--split test]
  jkd export   --workdir DIR --format onnx|tflite|stablehlo [--int8] --out FILE
  jkd bench    --config FILE.py[:ARG] --workdir DIR [...]
  jkd bench    --export FILE [--threads 1] [--batch-sizes 1 32]
  jkd plan     --config FILE.py[:ARG] [--workdir DIR] [--device-memory 80GB] [--teacher M]
  jkd demo     --workdir DIR [--config configs/demo.py[:fast|full]]
  jkd pipeline --config FILE.py[:ARG] --workdir DIR [...]   (stages in WORKDIR/<stage>)
  jkd import   --checkpoint FILE --workdir DIR [--model NAME] [--config FILE.py] [...]

Bad input ends with exit code 2 and one paragraph naming the problem and the fix.
Multi-process runs (TPU pods, SLURM, GKE, launch/local.sh) are joined from the environment:
see jkd/distributed.py and launch/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from jkd import storage, trainers
from jkd.errors import UserError

DESCRIPTIONS = {
    'eval': "evaluate a workdir's latest checkpoint (or --export) on a split (eval.json)",
    'demo': 'the whole pipeline on Fashion-MNIST: MAE teacher, KD student, int8 (report.md)',
    'bench': 'time train steps on synthetic data on the available accelerator (bench.json)',
    'plan': 'per-device memory of a config\'s step, whether it fits, and a mesh that does',
    'pipeline': 'several commands in order, e.g. teacher -> assistant -> student '
                '(pipeline.json)',
    'export': "a workdir's classifier as an ONNX / LiteRT / StableHLO file, float or static "
              'int8 (FILE and FILE.json)',
    'import': 'a public checkpoint (timm, Hugging Face, official MAE / SimMIM / DeiT, '
              'torchvision, big_vision) as a jkd workdir (import.json)',
}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' not in body:
        if i + 1 >= len(argv):
          raise UserError(f'{arg} needs a value: write {arg}=VALUE.')
        body, i = f'{body}={argv[i + 1]}', i + 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='jkd', description='jkd: JAX/Flax training backend for compressing vision models.',
      epilog='Every command takes --config FILE.py[:ARG], --workdir DIR and any number of '
             '--config.a.b=value overrides, and resumes from DIR/checkpoints when it exists.')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  for name in trainers.COMMANDS:
    p = sub.add_parser(name, help=trainers.describe(name))
    p.add_argument('--config', required=True, help='config file, FILE.py or FILE.py:ARG')
    p.add_argument('--workdir', required=True, help='output and checkpoint directory')
  p = sub.add_parser('bench', help=DESCRIPTIONS['bench'])
  p.add_argument('--config', default=None, help='config file, e.g. configs/bench/vit_b16.py')
  p.add_argument('--workdir', default=None, help='where bench.json is written')
  _add_export_bench_args(p)
  p = sub.add_parser('demo', help=DESCRIPTIONS['demo'])
  p.add_argument('--workdir', required=True, help='where every stage and the report go')
  p.add_argument('--config', default=None,
                 help='default configs/demo.py (sized for a 2-core CPU); :fast or :full')
  p = sub.add_parser('pipeline', help=DESCRIPTIONS['pipeline'])
  p.add_argument('--config', required=True,
                 help='pipeline config, e.g. configs/fashion_mnist/pipeline.py[:hint]')
  p.add_argument('--workdir', required=True, help='stage NAME runs in WORKDIR/NAME')
  p = sub.add_parser('plan', help=DESCRIPTIONS['plan'])
  p.add_argument('--config', required=True, help='config file, e.g. configs/bench/vit_b16.py')
  p.add_argument('--workdir', default=None, help='optional: where plan.json is written')
  p.add_argument('--device-memory', default='80GB', help='memory per device (80GB, 16GiB...)')
  p.add_argument('--teacher', default=None,
                 help='teacher model name (e.g. vit_l16): plan distillation without a workdir')
  p.add_argument('--devices', type=int, default=None,
                 help='devices of the planned machine (default: the product of config.mesh)')
  p.add_argument('--measure', action='store_true',
                 help='also compile (and run once) the real step here: XLA\'s memory figures')
  p = sub.add_parser('import', help=DESCRIPTIONS['import'])
  p.add_argument('--checkpoint', required=True,
                 help='a .safetensors, PyTorch .pth/.bin (read weights-only) or big_vision .npz')
  p.add_argument('--workdir', required=True, help='the new workdir (an Orbax checkpoint)')
  p.add_argument('--model', default=None,
                 help='a registered jkd model to build (default: inferred from the shapes)')
  p.add_argument('--config', default=None,
                 help='optional run config whose data (and optimizer) the workdir records, '
                      'e.g. configs/fashion_mnist/supervised.py; default synthetic data of the '
                      "checkpoint's size")
  p = sub.add_parser('export', help=DESCRIPTIONS['export'])
  _add_export_args(p)
  p = sub.add_parser('eval', help=DESCRIPTIONS['eval'])
  p.add_argument('--workdir', default=None)
  p.add_argument('--config', default=None,
                 help='config file (default: the config stored with the checkpoint)')
  p.add_argument('--split', default=None, help="TFDS-style split, e.g. test or 'train[:1000]'")
  p.add_argument('--export', nargs='?', const=True, default=False, metavar='FILE',
                 help='alone: the integer model in WORKDIR/export/ (jkd compress); with FILE '
                      '(.onnx, .tflite, .stablehlo): that file in its own runtime')
  p.add_argument('--threads', type=int, default=1, help='runtime threads for --export FILE')
  return parser


def _add_export_args(p) -> None:
  from jkd.deploy.export import FORMATS, default_settings
  d = default_settings()
  p.add_argument('--workdir', required=True, help='the trained classifier to export')
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--out', required=True, help='the file to write (.onnx, .tflite, .stablehlo)')
  p.add_argument('--int8', action='store_true',
                 help='static full-integer int8 (onnx, tflite) calibrated on training images')
  p.add_argument('--calibration-batches', type=int, default=d['calibration_batches'])
  p.add_argument('--calibration-batch-size', type=int, default=d['calibration_batch_size'])
  p.add_argument('--calibration-method', default=d['calibration_method'],
                 help='minmax or percentile (onnx)')
  p.add_argument('--percentile', type=float, default=d['percentile'])
  p.add_argument('--calibration-seed', type=int, default=d['calibration_seed'])
  p.add_argument('--batch', type=int, default=1,
                 help="tflite: the signature's batch (a ViT's LiteRT file keeps it)")


def _add_export_bench_args(p) -> None:
  p.add_argument('--export', default=None, metavar='FILE',
                 help='time an exported file (.onnx, .tflite, .stablehlo) in its runtime')
  p.add_argument('--threads', type=int, default=1, help='runtime intra-op threads')
  p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
  p.add_argument('--repeats', type=int, default=7, help='timed repeats; the median is reported')


def _run_training(command: str, args, overrides: list[str]) -> dict:
  from jkd.config import load_config
  config = load_config(args.config, overrides)
  storage.makedirs(args.workdir)
  return trainers.get(command, config).train(config, args.workdir)


def _run_bench(args, overrides: list[str]) -> dict:
  from jkd import bench
  from jkd.config import load_config
  if args.export:
    return _bench_export(args)
  if not (args.config and args.workdir):
    raise UserError('jkd bench needs --config FILE.py and --workdir DIR (a train step), or '
                    '--export FILE (an exported model in its runtime).')
  return bench.run(load_config(args.config, overrides), args.workdir)


def _bench_export(args) -> dict:
  from jkd.deploy.export import bench_file
  result = bench_file(args.export, threads=args.threads, batch_sizes=args.batch_sizes,
                      repeats=args.repeats)
  out = storage.join(args.workdir, 'bench.json') if args.workdir else args.export + '.bench.json'
  storage.write_json(out, result)
  for b, r in result['batches'].items():
    print(f'{result["runtime"]}, {result["threads"]} thread(s): batch {b}: {r["ms"]:.3f} ms '
          f'({r["images_per_s"]:.0f} images/s); file {result["file_bytes"]:,} bytes')
  return result


def _run_export(args, overrides: list[str]) -> dict:
  from jkd.deploy.export import export
  if overrides:
    raise UserError('jkd export takes no --config overrides: it exports the model the workdir '
                    'holds.')
  info = export(args.workdir, args.format, args.out, int8=args.int8,
                calibration_batches=args.calibration_batches,
                calibration_batch_size=args.calibration_batch_size,
                calibration_method=args.calibration_method, percentile=args.percentile,
                calibration_seed=args.calibration_seed, batch=args.batch)
  print(f'{info["file"]}: {info["format"]}, {info["quantization"]["kind"]}, {info["bytes"]:,} '
        f'bytes, {info["params"]:,} params ({info["model"]})')
  return info


def _run_demo(args, overrides: list[str]) -> dict:
  from jkd import demo
  from jkd.config import load_config
  spec = args.config or os.path.join(demo.configs_dir(), 'demo.py')
  return demo.run(load_config(spec, overrides), args.workdir)


def _run_pipeline(args, overrides: list[str]) -> dict:
  from jkd import pipeline
  from jkd.config import load_config
  return pipeline.run(load_config(args.config, overrides), args.workdir)


def _run_plan(args, overrides: list[str]) -> dict:
  from jkd import memory
  from jkd.config import load_config
  config = load_config(args.config, overrides)
  result = memory.plan(config, teacher=args.teacher, num_devices=args.devices,
                       device_memory=memory.parse_bytes(args.device_memory))
  print(memory.format_plan(result))
  if args.measure:
    result['xla'] = memory.compile_step(config, teacher=args.teacher, run=True)
    print(memory.format_measured(result))
  if args.workdir:
    storage.write_json(storage.join(args.workdir, 'plan.json'), result)
  return result


def _run_import(args, overrides: list[str]) -> dict:
  from jkd import convert
  return convert.save_workdir(args.checkpoint, args.workdir, model=args.model,
                              config_spec=args.config, overrides=overrides)


def _run_eval(args, overrides: list[str]) -> dict:
  from jkd.evaluate import evaluate_workdir
  if isinstance(args.export, str):
    from jkd.deploy.export import evaluate_file
    data_config = None
    if args.config:
      from jkd.config import load_config
      data_config = load_config(args.config, overrides).data
    result = evaluate_file(args.export, workdir=args.workdir, data_config=data_config,
                           split=args.split, threads=args.threads)
    if args.workdir:
      storage.write_json(storage.join(args.workdir, 'eval.json'), result)
    print(json.dumps(result, indent=2))
    return result
  if not args.workdir:
    raise UserError('jkd eval needs --workdir DIR (a checkpoint), or --export FILE.')
  result = evaluate_workdir(args.workdir, config_spec=args.config, overrides=overrides,
                            split=args.split, export=args.export)
  print(json.dumps(result, indent=2))
  return result


def _quiet_libraries() -> None:
  """Orbax logs every save through absl at INFO/WARNING; the progress lines are ours."""
  import logging
  logging.getLogger('absl').setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _quiet_libraries()
  try:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if getattr(args, 'workdir', None):  # Local paths made absolute; a bucket URL checked for its package.
      args.workdir = storage.resolve(args.workdir)
    # Before anything touches a device: join the multi-process run the environment names.
    from jkd import distributed
    distributed.initialize()
    if args.command == 'eval':
      _run_eval(args, overrides)
    elif args.command == 'plan':
      _run_plan(args, overrides)
    elif args.command == 'bench':
      _run_bench(args, overrides)
    elif args.command == 'demo':
      _run_demo(args, overrides)
    elif args.command == 'pipeline':
      _run_pipeline(args, overrides)
    elif args.command == 'import':
      _run_import(args, overrides)
    elif args.command == 'export':
      _run_export(args, overrides)
    else:
      _run_training(args.command, args, overrides)
    return 0
  except UserError as e:
    message = textwrap.fill(str(e), width=100)
    print(f'jkd {argv[0] if argv else ""}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
