"""`jkd export`: a workdir's classifier as an ONNX, LiteRT or StableHLO file, float or int8.

  info = export('runs/student', 'onnx', 'student_int8.onnx', int8=True)
  jkd export --workdir runs/student --format onnx --int8 --out student_int8.onnx

Writes FILE and FILE.json (what was exported, from where, how it was calibrated, its size and
the data config that `jkd eval --export FILE` evaluates it on).
"""
from __future__ import annotations

import json
import os
import time

from jkd.deploy import calibration, runtime
from jkd.errors import UserError

FORMATS = ('onnx', 'tflite', 'stablehlo')
EXTENSIONS = {'onnx': '.onnx', 'tflite': '.tflite', 'stablehlo': '.stablehlo'}


def default_settings() -> dict:
  """The export settings `jkd export` flags and `config.deploy` set (see docs/deploy.md)."""
  return dict(calibration_batches=8, calibration_batch_size=32, calibration_method='minmax',
              percentile=99.999, calibration_seed=0, float_stem=False)


def export(workdir: str, fmt: str, out: str, *, int8: bool = False, clf=None,
           **settings) -> dict:
  """Exports the classifier of `workdir` (or `clf`) to `out`; returns and writes FILE.json.

  Args:
    fmt: 'onnx', 'tflite' or 'stablehlo'.
    int8: onnx and tflite: static full-integer int8, activation ranges from
      `calibration_batches` batches of `calibration_batch_size` training images
      (`calibration_method` 'minmax' or 'percentile'); stablehlo: int8 weights with dynamic
      int8 activations. `float_stem` (onnx): the first layer, which reads the pixels, stays
      float (see `jkd.deploy.onnx.quantize`); the rest is int8.
  """
  from jkd.deploy.classifier import Classifier
  if fmt not in FORMATS:
    raise UserError(f'--format {fmt!r} is unknown: use {", ".join(FORMATS)}.')
  if not out.endswith(EXTENSIONS[fmt]):
    raise UserError(f'--out {out!r}: a {fmt} file must end in {EXTENSIONS[fmt]} (jkd eval and '
                    'bench pick the runtime by it).')
  s = {**default_settings(), **{k: v for k, v in settings.items() if v is not None}}
  calibration.check_method(s['calibration_method'])
  if s['float_stem'] and (fmt != 'onnx' or not int8):
    raise UserError('--float-stem keeps the first layer of an int8 ONNX file in float: use it '
                    'with --format onnx --int8 (a LiteRT full-integer file has no float layer).')
  if fmt == 'onnx':
    from jkd.deploy import onnx as fmt_lib
  elif fmt == 'tflite':
    from jkd.deploy import litert as fmt_lib
  else:
    fmt_lib = None
  if fmt_lib is not None:
    fmt_lib.require()  # Before reading anything: a missing extra is the first thing to say.
  t0 = time.perf_counter()
  clf = clf or Classifier.from_workdir(workdir)
  static = int8 and fmt != 'stablehlo'
  pixels = None
  if static:
    pixels = calibration.calibration_pixels(
        clf.data_config, num_batches=int(s['calibration_batches']),
        batch_size=int(s['calibration_batch_size']), seed=int(s['calibration_seed']))
  if fmt == 'onnx':
    proto = fmt_lib.float_model(clf)
    if int8:
      proto = fmt_lib.quantize(proto, pixels, method=s['calibration_method'],
                               percentile=float(s['percentile']),
                               batch=int(s['calibration_batch_size']),
                               float_stem=bool(s['float_stem']))
    size = fmt_lib.save(proto, out, {'jkd_model': clf.description['model'],
                                     'jkd_int8': int(int8)})
  elif fmt == 'tflite':
    if s['calibration_method'] != 'minmax' and int8:
      raise UserError('The TFLite converter calibrates with min/max ranges only: drop '
                      '--calibration-method percentile for --format tflite.')
    size = fmt_lib.save(fmt_lib.convert(clf, int8=int8, pixels=pixels,
                                        batch=int(s.get('batch') or 1)), out)
  else:
    from jkd.deploy import stablehlo
    size = stablehlo.save(stablehlo.serialize(clf, int8=int8), out)
  info = {
      'format': fmt, 'file': os.path.abspath(out), 'bytes': size, 'int8': bool(int8),
      'quantization': _quantization(fmt, int8, s),
      'model': clf.description['model'], 'model_config': clf.model_config,
      'params': clf.param_count(), 'source': clf.description,
      'image_shape': list(clf.image_shape), 'num_classes': clf.num_classes,
      'mean': list(clf.mean), 'std': list(clf.std),
      'input': 'pixels: float32 (B, H, W, C) in [0, 255]; output logits float32 (B, classes)',
      'data': clf.data_config.to_dict() if hasattr(clf.data_config, 'to_dict')
              else dict(clf.data_config),
      'export_s': round(time.perf_counter() - t0, 2),
  }
  if fmt == 'tflite':
    info['batch'] = int(s.get('batch') or 1)
  if fmt == 'tflite' and fmt_lib.approximations(clf)[1]:
    info['approximations'] = fmt_lib.approximations(clf)[1]
  with open(runtime.sidecar(out), 'w') as f:
    json.dump(info, f, indent=1, default=str)
  return info


def _quantization(fmt: str, int8: bool, s: dict) -> dict:
  if not int8:
    return {'kind': 'float32'}
  if fmt == 'stablehlo':
    return {'kind': 'int8 weights per channel, dynamic int8 activations (Qwix serving model)'}
  stem = {'float_layers': ['the first conv / dense layer (reads the pixels)']} if s.get(
      'float_stem') else {}
  return {'kind': 'static int8, float first layer' if stem else 'static full-integer int8',
          **stem, 'weights': 'int8 symmetric per output channel',
          'activations': ('uint8 asymmetric per tensor (ONNX Runtime QDQ)' if fmt == 'onnx'
                          else 'int8 asymmetric per tensor (TFLite)'),
          'calibration': {k: s[k] for k in ('calibration_batches', 'calibration_batch_size',
                                             'calibration_method', 'calibration_seed')},
          **({'percentile': s['percentile']} if s['calibration_method'] == 'percentile' else {})}


def evaluate_file(path: str, *, workdir: str | None = None, data_config=None,
                  split: str | None = None, threads: int = 1, batch_size: int = 256) -> dict:
  """Accuracy of an exported file in its own runtime on `split` (default: the data config's
  eval split). The data config is `data_config`, else the workdir's, else FILE.json's."""
  import ml_collections
  from jkd import data
  runtime.format_of(path)
  if not os.path.isfile(path):
    raise UserError(f'{path!r} does not exist: write it with `jkd export --out {path}`.')
  info = runtime.read_info(path)
  if data_config is None and workdir:
    from jkd.checkpoint import read_latest_meta
    _, meta = read_latest_meta(workdir)
    data_config = ml_collections.ConfigDict((meta.get('config') or {}).get('data') or {})
  if data_config is None:
    if not info.get('data'):
      raise UserError(f'No data to evaluate {path!r} on: {runtime.sidecar(path)} is missing; '
                      'pass --workdir (the run it was exported from) or --config.')
    data_config = ml_collections.ConfigDict(info['data'])
  split = split or data_config.get('eval_split', 'test')
  runner = runtime.open_file(path, threads)
  t0 = time.perf_counter()
  batches = data.make_eval_iterator(data_config, split, global_batch_size=batch_size,
                                    process_index=0, process_count=1)
  result = runtime.evaluate(runner, batches)
  return {'file': os.path.abspath(path), 'format': runtime.format_of(path),
          'runtime': runner.name, 'split': split, **result,
          'test_accuracy': result['accuracy'], 'bytes': os.path.getsize(path),
          'int8': info.get('int8'), 'model': info.get('model'),
          'wall_s': round(time.perf_counter() - t0, 2)}


def bench_file(path: str, *, threads: int = 1, batch_sizes=(1, 32), repeats: int = 7,
               calls: int = 20) -> dict:
  """`runtime.latency` of an exported file, plus its size (FILE.json gives the image shape)."""
  info = runtime.read_info(path)
  if not info.get('image_shape'):
    raise UserError(f'{runtime.sidecar(path)} is missing: jkd bench --export reads the image '
                    'shape there; write the file with `jkd export`.')
  runner = runtime.open_file(path, threads)
  result = runtime.latency(runner, tuple(info['image_shape']), batch_sizes=batch_sizes,
                           repeats=repeats, calls=calls)
  return {**result, 'format': runtime.format_of(path), 'int8': info.get('int8'),
          'model': info.get('model'), 'params': info.get('params')}


def default_deploy_config():
  """`config.deploy` of `jkd compress`: which files its `on_finish` writes into WORKDIR/export/.

  formats: () (none), or any of 'onnx', 'tflite', 'stablehlo'; int8: also the int8 file of each;
  float32: also the float file; the calibration settings of `jkd export`.
  """
  import ml_collections
  return ml_collections.ConfigDict(dict(formats=(), int8=True, float32=True,
                                        **default_settings()))


def export_run(config, workdir: str, params, model_state, *, num_classes: int = 0) -> dict:
  """Writes `config.deploy`'s files of a finished run into WORKDIR/export/ and evaluates each in
  its runtime on the eval split. Returns {file name: {format, int8, bytes, accuracy}}."""
  from jkd.deploy.classifier import Classifier
  deploy = config.get('deploy') or {}
  formats = tuple(deploy.get('formats') or ())
  if not formats:
    return {}
  clf = Classifier.from_run(config, config.model.to_dict(), {'params': params, **model_state},
                            num_classes=num_classes,
                            description={'workdir': workdir, 'model': config.model.name})
  settings = {k: deploy.get(k) for k in default_settings()}
  out = {}
  for fmt in formats:
    for int8 in [False] * bool(deploy.get('float32', True)) + [True] * bool(deploy.get('int8')):
      name = f'model{"_int8" if int8 else ""}{EXTENSIONS[fmt]}'
      path = os.path.join(workdir, 'export', name)
      stem = bool(settings.get('float_stem')) and fmt == 'onnx' and int8  # ONNX int8 only
      info = export(workdir, fmt, path, int8=int8, clf=clf, **{**settings, 'float_stem': stem})
      result = evaluate_file(path, data_config=config.data)
      out[name] = {'format': fmt, 'int8': int8, 'bytes': info['bytes'],
                   'params': info['params'], 'accuracy': result['accuracy']}
  return out
