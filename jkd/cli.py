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
  jkd data prepare (--dir DIR | --config FILE.py [...]) --out OUT [--workers N] [--strict]

Bad input ends with exit code 2 and one paragraph naming the problem and the fix; a run that
diverged (a non-finite loss) with exit code 3; SIGTERM / SIGINT with 143 / 130 after saving a
checkpoint of the step reached (docs/reliability.md).
Multi-process runs (TPU pods, SLURM, GKE, launch/local.sh) are joined from the environment:
see jkd/distributed.py and launch/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

# Only light modules here: `main` installs the signal handlers before anything heavy loads
# (jkd.storage, jax), so a SIGTERM during start-up is handled too.
from jkd import interrupt, trainers
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
    'data': 'your own images: `jkd data prepare` packs a folder into ArrayRecord shards, every '
            'file checked (prepare.json)',
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
  p = sub.add_parser('data', help=DESCRIPTIONS['data'])
  p.add_argument('action', choices=['prepare'],
                 help='prepare: pack config.data.dir (class folders, split folders or a '
                      'CSV/JSONL list) into ArrayRecord shards in --out')
  p.add_argument('--dir', default=None, help='the image folder or list (sets config.data.dir)')
  p.add_argument('--config', default=None,
                 help="a run config whose data settings apply (dir, holdout, split_seed, mode); "
                      "default a 'folder' data config")
  p.add_argument('--out', required=True, help='output folder (train with --config.data.dir=OUT)')
  p.add_argument('--workers', type=int, default=None,
                 help='processes that read and check the files (default: the cores here)')
  p.add_argument('--strict', action='store_true',
                 help='fail (exit 2) if any file cannot be decoded, instead of leaving it out')
  p.add_argument('--shard-size', type=int, default=1000, help='images per shard, at most')
  p.add_argument('--workdir', default=None, help=argparse.SUPPRESS)
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
  p.add_argument('--float-stem', action='store_true',
                 help='onnx --int8: keep the first layer (it reads the pixels) in float')
  p.add_argument('--batch', type=int, default=1,
                 help="tflite: the signature's batch (a ViT's LiteRT file keeps it)")


def _add_export_bench_args(p) -> None:
  p.add_argument('--export', default=None, metavar='FILE',
                 help='time an exported file (.onnx, .tflite, .stablehlo) in its runtime')
  p.add_argument('--threads', type=int, default=1, help='runtime intra-op threads')
  p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 32])
  p.add_argument('--repeats', type=int, default=7, help='timed repeats; the median is reported')


def _load(args, overrides: list[str], command: str):
  """The config of a command, loaded and checked (`jkd.validate`) before anything is built."""
  from jkd import validate
  from jkd.config import load_config
  config = load_config(args.config, overrides)
  if command in trainers.COMMANDS:
    trainers.check(command, config)
  else:
    validate.check(config, command)
  return config


def _run_training(command: str, args, overrides: list[str]) -> dict:
  from jkd import storage
  config = _load(args, overrides, command)
  storage.ensure_dir(args.workdir)
  return trainers.get(command, config).train(config, args.workdir)


def _run_bench(args, overrides: list[str]) -> dict:
  from jkd import bench, storage
  if args.export:
    return _bench_export(args)
  if not (args.config and args.workdir):
    raise UserError('jkd bench needs --config FILE.py and --workdir DIR (a train step), or '
                    '--export FILE (an exported model in its runtime).')
  config = _load(args, overrides, 'bench')
  storage.ensure_dir(args.workdir)
  return bench.run(config, args.workdir)


def _bench_export(args) -> dict:
  from jkd import storage
  from jkd.deploy.export import bench_file, check_bench_args, check_result_path, write_result
  check_bench_args(args.threads, args.batch_sizes, args.repeats)
  out = storage.join(args.workdir, 'bench.json') if args.workdir else args.export + '.bench.json'
  check_result_path(out)  # Before timing: a result that cannot be written is said first.
  result = bench_file(args.export, threads=args.threads, batch_sizes=args.batch_sizes,
                      repeats=args.repeats)
  write_result(out, result)
  for b, r in result['batches'].items():
    print(f'{result["runtime"]}, {result["threads"]} thread(s): batch {b}: {r["ms"]:.3f} ms '
          f'({r["images_per_s"]:.0f} images/s); file {result["file_bytes"]:,} bytes')
  return result


def _run_export(args, overrides: list[str]) -> dict:
  from jkd.deploy.export import export
  from jkd.deploy.exported_file import show
  if overrides:
    raise UserError('jkd export takes no --config overrides: it exports the model the workdir '
                    'holds.')
  info = export(args.workdir, args.format, args.out, int8=args.int8,
                calibration_batches=args.calibration_batches,
                calibration_batch_size=args.calibration_batch_size,
                calibration_method=args.calibration_method, percentile=args.percentile,
                calibration_seed=args.calibration_seed, float_stem=args.float_stem,
                batch=args.batch)
  print(f'{show(info["file"])[1:-1]}: {info["format"]}, {info["quantization"]["kind"]}, '
        f'{info["bytes"]:,} bytes, {info["params"]:,} params ({info["model"]})')
  return info


def _run_demo(args, overrides: list[str]) -> dict:
  from jkd import demo, lock, storage
  from jkd.config import load_config
  spec = args.config or os.path.join(demo.configs_dir(), 'demo.py')
  config = load_config(spec, overrides)
  storage.ensure_dir(args.workdir)
  with interrupt.deferred(), lock.hold(args.workdir, command='jkd demo'):
    return demo.run(config, args.workdir)


def _run_pipeline(args, overrides: list[str]) -> dict:
  from jkd import lock, pipeline, storage
  from jkd.config import load_config
  config = load_config(args.config, overrides)
  storage.ensure_dir(args.workdir)
  with interrupt.deferred(), lock.hold(args.workdir, command='jkd pipeline'):
    return pipeline.run(config, args.workdir)


def _run_plan(args, overrides: list[str]) -> dict:
  from jkd import memory, storage
  if args.devices is not None and args.devices < 1:
    raise UserError(f'--devices {args.devices}: the planned machine needs at least 1 device. '
                    'Pass a positive count, or leave --devices out (the product of config.mesh).')
  config = _load(args, overrides, 'plan')
  device_memory = memory.parse_bytes(args.device_memory)
  if args.workdir:
    storage.ensure_dir(args.workdir)
  result = memory.plan(config, teacher=args.teacher, num_devices=args.devices,
                       device_memory=device_memory)
  print(memory.format_plan(result))
  if args.measure:
    result['xla'] = memory.compile_step(config, teacher=args.teacher, run=True)
    print(memory.format_measured(result))
  if args.workdir:
    storage.write_json(storage.join(args.workdir, 'plan.json'), result)
  return result


def _run_import(args, overrides: list[str]) -> dict:
  from jkd import convert
  return convert.save_workdir(args.checkpoint, args.workdir, build_task=trainers.build_task,
                              model=args.model, config_spec=args.config, overrides=overrides)


def _run_data(args, overrides: list[str]) -> dict:
  import ml_collections
  from jkd.config import apply_override, load_config
  from jkd.data import default_data_config, prepare
  if args.config:
    config = load_config(args.config, overrides)
  else:
    config = ml_collections.ConfigDict({'data': default_data_config('folder')})
    for o in overrides:
      apply_override(config, o)
  if config.data.get('name') != 'folder':
    raise UserError(f"jkd data prepare packs folder datasets; the config's data.name is "
                    f"{config.data.get('name')!r}. Use a config with data.name='folder' (e.g. "
                    'configs/folder/supervised.py) or pass --dir DIR.')
  if args.dir:
    config.data.dir = args.dir
  workers = (min(len(os.sched_getaffinity(0)), prepare.MAX_WORKERS) if args.workers is None
             else args.workers)
  prepare.check_arguments(workers, args.shard_size)  # before the folder is even listed
  summary = prepare.prepare(config.data, args.out, workers=workers, strict=args.strict,
                            shard_size=args.shard_size)
  counts = ', '.join(f'{k} {v}' for k, v in summary['num_examples'].items())
  print(f'prepared {args.out}: {counts} images, {len(summary["classes"])} classes, mode '
        f'{summary["mode"]}, {len(summary["bad_files"])} unreadable files left out '
        f'({summary["wall_s"]}s). Train on it with --config.data.dir={args.out}')
  for path, error in summary['bad_files'][:20]:  # names from outside: no raw escape codes
    print(f'  unreadable: {path if path.isprintable() else repr(path)}: {error!s:.300}')
  return summary


def _run_eval(args, overrides: list[str]) -> dict:
  from jkd.evaluate import evaluate_workdir
  if isinstance(args.export, str):
    from jkd import storage
    from jkd.deploy.export import check_result_path, evaluate_file, write_result
    data_config = None
    if args.config:
      from jkd.config import load_config
      data_config = load_config(args.config, overrides).data
    out = storage.join(args.workdir, 'eval.json') if args.workdir else None
    if out:
      check_result_path(out)  # Before evaluating: a result that cannot be written is said first.
    result = evaluate_file(args.export, workdir=args.workdir, data_config=data_config,
                           split=args.split, threads=args.threads)
    if out:
      write_result(out, result)
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


def _fill(text: str) -> str:
  """One paragraph wrapped at 100 columns; paths and URLs are never split (copyable). Control
  characters (a message may quote a file's name or bytes) are escaped: no terminal codes."""
  text = ''.join(c if c.isprintable() or c in '\n\t' else c.encode('unicode_escape').decode()
                 for c in text)
  return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def main(argv: list[str] | None = None) -> int:
  program = argv is None  # The `jkd` process itself, not a caller in Python.
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    # First thing: from here a SIGTERM/SIGINT ends in a clean exit 143/130, never a traceback.
    interrupt.install()
    _quiet_libraries()
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    from jkd import storage
    if getattr(args, 'workdir', None):  # Local paths made absolute; a bucket URL checked.
      args.workdir = storage.resolve(args.workdir)
    # Before anything touches a device: join the multi-process run the environment names.
    from jkd import distributed
    distributed.initialize()
    interrupt.install()  # Again: jax.distributed installs a SIGTERM handler of its own.
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
    elif args.command == 'data':
      _run_data(args, overrides)
    elif args.command == 'export':
      _run_export(args, overrides)
    else:
      _run_training(args.command, args, overrides)
    # A signal can be swallowed where Python cannot raise (a gc callback of XLA's prints
    # "Exception ignored ... Interrupted"): the command then still ends as a stopped one.
    interrupt.check('after the command had finished its work; every file it wrote is complete')
    return 0
  except UserError as e:
    message = _fill(str(e))
    print(f'jkd {argv[0] if argv else ""}: error: {message}', file=sys.stderr)
    return getattr(e, 'exit_code', 2)
  except interrupt.Interrupted as e:
    print(f'jkd {argv[0] if argv else ""}: {_fill(e.message)}',
          file=sys.stderr)
    return e.code
  except KeyboardInterrupt:  # Raised by a library's own handler: no traceback either.
    print(f'jkd {argv[0] if argv else ""}: interrupted; the last complete checkpoint is kept.',
          file=sys.stderr)
    return 128 + 2
  finally:
    if program:  # Done: a late signal must not turn the exit status into a kill.
      interrupt.ignore()
    else:
      interrupt.uninstall()


if __name__ == '__main__':
  sys.exit(main())
