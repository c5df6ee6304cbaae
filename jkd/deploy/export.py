"""`jkd export`: a workdir's classifier as an ONNX, LiteRT or StableHLO file, float or int8.

  info = export('runs/student', 'onnx', 'student_int8.onnx', int8=True)
  jkd export --workdir runs/student --format onnx --int8 --out student_int8.onnx

Writes FILE and FILE.json (what was exported, from where, how it was calibrated, its size, its
sha256 and the data config that `jkd eval --export FILE` evaluates it on).

How the two files are written (`_commit`), so that a kill, a full disk or a signal leaves the
previous export or the complete new one, never a mix:
- every setting and the output path are checked before anything is read (`check_settings`,
  `check_out`); a SIGTERM / SIGINT only sets a flag during the export (`interrupt.deferred`),
  acted on at safe points (between calibration batches, before the writes): exit 143 / 130 with
  nothing written;
- each file goes through `jkd.storage.write_bytes` (a temporary file in the same folder, created
  O_EXCL | O_NOFOLLOW, fsynced, then `os.replace`d over the name: a symlink planted at FILE or
  FILE.json is replaced, never followed);
- FILE first, FILE.json last: FILE.json records FILE's `sha256` and `bytes`, and every reader
  (`jkd.deploy.runtime.Runner`) refuses a FILE that does not match them. FILE.json is thus the
  commit record: a kill between the two renames leaves the new FILE with the old FILE.json,
  which is refused (exit 2, "export again"), never run with the old facts. If FILE.json cannot
  be written (a full disk), the previous FILE is put back from a hard link kept aside;
- with `--out` inside a jkd workdir (a folder with jkd.lock or checkpoints/), that workdir's
  lock is held while writing (`jkd.lock`): a running `jkd train` there refuses the export.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import time

from jkd import interrupt
from jkd.deploy import calibration, runtime
from jkd.deploy.exported_file import show, sidecar
from jkd.errors import UserError

FORMATS = ('onnx', 'tflite', 'stablehlo')
EXTENSIONS = {'onnx': '.onnx', 'tflite': '.tflite', 'stablehlo': '.stablehlo'}
MAX_CALIBRATION_IMAGES = 1 << 20
MAX_BENCH_BATCH = 4096


def default_settings() -> dict:
  """The export settings `jkd export` flags and `config.deploy` set (see docs/deploy.md)."""
  return dict(calibration_batches=8, calibration_batch_size=32, calibration_method='minmax',
              percentile=99.999, calibration_seed=0, float_stem=False)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check_settings(fmt: str, int8: bool, settings: dict) -> dict:
  """The export settings (defaults filled in), each checked; UserError naming the flag."""
  if fmt not in FORMATS:
    raise UserError(f'--format {show(fmt)} is unknown: use {", ".join(FORMATS)}.')
  s = {**default_settings(), **{k: v for k, v in settings.items() if v is not None}}
  calibration.check_method(s['calibration_method'])
  ranges = {'calibration_batches': (1, MAX_CALIBRATION_IMAGES, 'batches of training images '
                                    'whose activation ranges fix the int8 scales (default 8)'),
            'calibration_batch_size': (1, MAX_CALIBRATION_IMAGES, 'images per calibration batch '
                                       '(default 32)'),
            'calibration_seed': (0, 2**31 - 1, 'the seed of the calibration images (default 0)'),
            'batch': (1, 65536, "the TFLite signature's batch (default 1)")}
  for key, (lo, hi, what) in ranges.items():
    v = s.get(key)
    if key not in s or (key == 'batch' and v is None):
      continue
    if not _is_int(v) or not lo <= v <= hi:
      raise UserError(f'--{key.replace("_", "-")} {v}: {what}; give an integer from {lo} to '
                      f'{hi:,}.')
  if s['calibration_batches'] * s['calibration_batch_size'] > MAX_CALIBRATION_IMAGES:
    raise UserError(f'--calibration-batches {s["calibration_batches"]} x --calibration-batch-size '
                    f'{s["calibration_batch_size"]} images is more than the '
                    f'{MAX_CALIBRATION_IMAGES:,} calibration holds in memory: a few hundred '
                    'images fix the ranges (the default is 8 x 32).')
  p = s['percentile']
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not (
      0 < p <= 100) or not math.isfinite(p):  # (a huge int fails the range before isfinite)
    raise UserError(f'--percentile {p}: the share of |activations| the int8 range covers, in '
                    '(0, 100], e.g. 99.999 (with --calibration-method percentile).')
  if s['float_stem'] and (fmt != 'onnx' or not int8):
    raise UserError('--float-stem keeps the first layer of an int8 ONNX file in float: use it '
                    'with --format onnx --int8 (a LiteRT full-integer file has no float layer).')
  if fmt == 'tflite' and int8 and s['calibration_method'] != 'minmax':
    raise UserError('The TFLite converter calibrates with min/max ranges only: drop '
                    '--calibration-method percentile for --format tflite.')
  return s


def check_out(out: str, fmt: str) -> str:
  """`out` as an absolute path, checked before any work: a local path with the format's suffix,
  a file name (not a directory) whose FILE.json is not a directory, under a folder that exists
  or can be created in a writable directory. UserError naming --out otherwise."""
  text = os.fspath(out)
  if not text or '://' in text:
    raise UserError(f'--out {show(text)}: give a local file path (jkd export writes '
                    'local files; copy them to a bucket afterwards).')
  if not text.endswith(EXTENSIONS[fmt]):
    raise UserError(f'--out {show(text)}: a {fmt} file must end in {EXTENSIONS[fmt]} '
                    '(jkd eval and bench pick the runtime by it).')
  path = os.path.abspath(os.path.expanduser(text))
  for p, what in ((path, '--out'), (sidecar(path), f'--out {show(text)}: its '
                                    'description FILE.json')):
    if os.path.isdir(p) and not os.path.islink(p):
      raise UserError(f'{what} {show(p)} is a directory: name a file to write, e.g. '
                      f'{show(os.path.join(p, "model" + EXTENSIONS[fmt]))}.')
  # Nothing is created here (the lock of a workdir is not taken yet): the nearest existing
  # folder on the way must be a writable directory; the rest is created at the write.
  folder = os.path.dirname(path)
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f'--out {show(text)} cannot be created: {show(existing)}, '
                    'a part of its folder, is a file, not a directory. Write under a directory.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f'--out {show(text)}: its folder {show(existing)} is not '
                    'writable (read-only directory or file system). Write to a folder this user '
                    'can write.')
  return path


def _workdir_of(path: str) -> str | None:
  """The nearest folder above `path` that is a jkd workdir (holds jkd.lock or checkpoints/)."""
  from jkd.lock import LOCK_FILE
  d = os.path.dirname(path)
  while True:
    if os.path.lexists(os.path.join(d, LOCK_FILE)) or os.path.isdir(
        os.path.join(d, 'checkpoints')):
      return d
    parent = os.path.dirname(d)
    if parent == d:
      return None
    d = parent


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _out_lock(path: str, take: bool):
  """`jkd.lock.hold` of the workdir that `path` lies in, if any and if `take`."""
  workdir = _workdir_of(path) if take else None
  if workdir is None:
    return _nothing()
  from jkd import lock
  return lock.hold(workdir, command=f'jkd export --out {path}')


def export(workdir: str, fmt: str, out: str, *, int8: bool = False, clf=None,
           lock: bool = True, **settings) -> dict:
  """Exports the classifier of `workdir` (or `clf`) to `out`; returns and writes FILE.json.

  Args:
    fmt: 'onnx', 'tflite' or 'stablehlo'.
    int8: onnx and tflite: static full-integer int8, activation ranges from
      `calibration_batches` batches of `calibration_batch_size` training images
      (`calibration_method` 'minmax' or 'percentile'); stablehlo: int8 weights with dynamic
      int8 activations. `float_stem` (onnx): the first layer, which reads the pixels, stays
      float (see `jkd.deploy.onnx.quantize`); the rest is int8.
    lock: hold the lock of the workdir `out` lies in (False where the caller holds it: `jkd
      compress` writing WORKDIR/export/).
  The writes are atomic and FILE.json is the commit record (see the module docstring).
  """
  s = check_settings(fmt, int8, settings)
  path = check_out(out, fmt)
  if fmt == 'onnx':
    from jkd.deploy import onnx as fmt_lib
  elif fmt == 'tflite':
    from jkd.deploy import litert as fmt_lib
  else:
    fmt_lib = None
  if fmt_lib is not None:
    fmt_lib.require()  # Before reading anything: a missing extra is the first thing to say.
  with interrupt.deferred(), _out_lock(path, lock):
    return _export(workdir, fmt, path, int8, clf, s, fmt_lib)


def _export(workdir, fmt, path, int8, clf, s, fmt_lib) -> dict:
  from jkd.deploy.classifier import Classifier
  t0 = time.perf_counter()
  clf = clf or Classifier.from_workdir(workdir)
  interrupt.check('while reading the model; nothing was written')
  static = int8 and fmt != 'stablehlo'
  pixels = None
  if static:
    pixels = calibration.calibration_pixels(
        clf.data_config, num_batches=int(s['calibration_batches']),
        batch_size=int(s['calibration_batch_size']), seed=int(s['calibration_seed']))
  if fmt == 'onnx':
    proto = fmt_lib.float_model(clf)
    if int8:
      interrupt.check('before int8 calibration; nothing was written')
      proto = fmt_lib.quantize(proto, pixels, method=s['calibration_method'],
                               percentile=float(s['percentile']),
                               batch=int(s['calibration_batch_size']),
                               float_stem=bool(s['float_stem']))
    data = fmt_lib.serialize(proto, {'jkd_model': clf.description['model'],
                                     'jkd_int8': int(int8)})
  elif fmt == 'tflite':
    data = fmt_lib.convert(clf, int8=int8, pixels=pixels, batch=int(s.get('batch') or 1))
  else:
    from jkd.deploy import stablehlo
    data = stablehlo.serialize(clf, int8=int8)
  info = describe(clf, fmt, path, data, int8, s, export_s=time.perf_counter() - t0,
                  fmt_lib=fmt_lib)
  interrupt.check(f'before writing {show(path)}; nothing was written (the previous '
                  'file, if any, is unchanged)')
  _commit(path, data, info)
  return info


def describe(clf, fmt: str, path: str, data: bytes, int8: bool, s: dict, *,
             export_s: float = 0.0, fmt_lib=None) -> dict:
  """FILE.json of `data` (the bytes of FILE at `path`): format, size and sha256, quantization,
  model, image shape, classes, normalisation and data config."""
  info = {
      'format': fmt, 'file': path, 'bytes': len(data),
      'sha256': hashlib.sha256(data).hexdigest(), 'int8': bool(int8),
      'quantization': _quantization(fmt, int8, s),
      'model': clf.description['model'], 'model_config': clf.model_config,
      'params': clf.param_count(), 'source': clf.description,
      'image_shape': list(clf.image_shape), 'num_classes': clf.num_classes,
      'mean': list(clf.mean), 'std': list(clf.std),
      'input': 'pixels: float32 (B, H, W, C) in [0, 255]; output logits float32 (B, classes)',
      'data': clf.data_config.to_dict() if hasattr(clf.data_config, 'to_dict')
              else dict(clf.data_config),
      'export_s': round(export_s, 2),
  }
  if fmt == 'tflite':
    info['batch'] = int(s.get('batch') or 1)
    if fmt_lib is not None and fmt_lib.approximations(clf)[1]:
      info['approximations'] = fmt_lib.approximations(clf)[1]
  return info


def sidecar_text(info: dict) -> str:
  """FILE.json's text: strict JSON (no NaN), one field per line."""
  from jkd import storage
  return json.dumps(storage.strict_json(info), indent=1, default=str, allow_nan=False) + '\n'


def _commit(path: str, data: bytes, info: dict) -> None:
  """Writes FILE (`data`) and then FILE.json (`info`, whose sha256 names `data`), each
  atomically. If FILE.json cannot be written, the previous FILE is put back (a hard link to it
  is kept aside until then), so the pair stays the previous export."""
  side = sidecar(path)
  text = sidecar_text(info)
  aside = _keep_aside(path)
  try:
    _write(path, data)
    try:
      _write(side, text.encode())
    except BaseException:
      if aside:
        os.replace(aside, path)
        aside = None
      else:
        os.remove(path)
      raise
  finally:
    if aside:
      os.remove(aside)


def _keep_aside(path: str) -> str | None:
  """A fresh hard link to the current FILE (the link itself if FILE is a symlink), or None if
  there is none or the file system has no hard links."""
  if not os.path.lexists(path):
    return None
  for _ in range(5):
    aside = f'{path}.prev-{secrets.token_hex(6)}'
    try:
      os.link(path, aside, follow_symlinks=False)
      return aside
    except FileExistsError:
      continue
    except OSError:
      return None
  return None


_FIXES = {errno.ENOSPC: 'the disk is full: free space', errno.EDQUOT: 'the disk quota is '
          'reached: free space', errno.EFBIG: 'the file is larger than this process may write '
          '(ulimit -f) or the file system allows', errno.EROFS: 'the file system is read-only',
          errno.EACCES: 'this user may not write there', errno.EPERM: 'this user may not write '
          'there', errno.EISDIR: 'a directory has that name'}


def _write(path: str, data: bytes) -> None:
  """`storage.write_bytes`, its OSError as a UserError naming the file (exit 2)."""
  from jkd import storage
  try:
    storage.write_bytes(path, data)
  except OSError as e:
    raise write_error(path, e) from None


def write_error(path: str, e: OSError) -> UserError:
  """The UserError of a failed atomic write of `path`: the previous file is unchanged."""
  fix = _FIXES.get(e.errno, 'check the path and its folder')
  return UserError(f'Could not write {show(path)} ({e.strerror or e}): {fix}, then run '
                   'the command again. The previous file, if any, is unchanged (jkd writes a '
                   'temporary file and renames it).')


def write_result(path: str, result: dict) -> None:
  """`storage.write_json` of a command's result (eval.json, FILE.bench.json); a failed write
  is a UserError naming the file."""
  from jkd import storage
  try:
    storage.write_json(path, result)
  except OSError as e:
    raise write_error(path, e) from None


def check_result_path(path: str) -> None:
  """Before a command runs: its result file can be written (its folder exists and is writable,
  the name is not a directory); UserError naming it otherwise."""
  from jkd import storage
  if storage.is_remote(path):
    return
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path) and not os.path.islink(path):
    raise UserError(f'{show(path)} is a directory: jkd writes its result file there; '
                    'move the directory away.')
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
    raise UserError(f'{show(path)} cannot be written: its folder '
                    f'{show(folder)} is missing or not writable (read-only directory or '
                    'file system). Pass --workdir DIR, a folder this user can write.')


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
  eval split). The data config is `data_config`, else the workdir's, else FILE.json's (checked
  as a run config's data would be, `jkd.validate`). FILE and FILE.json are read as untrusted
  (`runtime.Runner`)."""
  import ml_collections
  from jkd import data, validate
  runtime.check_threads(threads)
  runner = runtime.open_file(path, threads)
  info = runner.info
  if data_config is None and workdir:
    from jkd.checkpoint import read_latest_meta
    _, meta = read_latest_meta(workdir)
    data_config = ml_collections.ConfigDict((meta.get('config') or {}).get('data') or {})
  elif data_config is None:
    if not info.get('data'):
      raise UserError(f'No data to evaluate {show(path)} on: '
                      f'{show(sidecar(path))} has no "data" field; pass --workdir '
                      '(the run it was exported from) or --config.')
    try:
      data_config = ml_collections.ConfigDict(info['data'])
      validate.check(ml_collections.ConfigDict({'data': data_config}), 'eval')
    except UserError as e:
      raise UserError(f'{show(sidecar(path))}, field "data": {e}') from None
    except Exception as e:  # pylint: disable=broad-except  (ConfigDict of odd keys and values)
      raise UserError(f'{show(sidecar(path))}: field "data" is not a data '
                      f'config ({type(e).__name__}: {show(str(e)[:120])}); pass '
                      '--workdir or --config.') from None
  split = split or data_config.get('eval_split', 'test')
  t0 = time.perf_counter()
  batches = data.make_eval_iterator(data_config, split, global_batch_size=batch_size,
                                    process_index=0, process_count=1)
  result = runtime.evaluate(runner, batches, check=interrupt.check)
  return {'file': os.path.abspath(path), 'format': runner.format,
          'runtime': runner.name, 'split': split, **result,
          'test_accuracy': result['accuracy'], 'bytes': runner.bytes,
          'int8': info.get('int8'), 'model': info.get('model'),
          'wall_s': round(time.perf_counter() - t0, 2)}


def check_bench_args(threads, batch_sizes, repeats) -> None:
  """`jkd bench --export`'s flags: UserError naming the flag for a value that cannot be timed."""
  runtime.check_threads(threads)
  if not _is_int(repeats) or not 1 <= repeats <= 1000:
    raise UserError(f'--repeats {repeats}: timed repeats, whose median is reported; give 1 to '
                    '1000 (default 7).')
  if not batch_sizes:
    raise UserError('--batch-sizes: give at least one batch size, e.g. --batch-sizes 1 32.')
  for b in batch_sizes:
    if not _is_int(b) or not 1 <= b <= MAX_BENCH_BATCH:
      raise UserError(f'--batch-sizes {b}: a batch holds 1 to {MAX_BENCH_BATCH} images, e.g. '
                      '--batch-sizes 1 32.')


def bench_file(path: str, *, threads: int = 1, batch_sizes=(1, 32), repeats: int = 7,
               calls: int = 20) -> dict:
  """`runtime.latency` of an exported file, plus its size (FILE.json gives the image shape)."""
  check_bench_args(threads, batch_sizes, repeats)
  runner = runtime.open_file(path, threads)
  info = runner.info
  result = runtime.latency(runner, runner.image_shape, batch_sizes=batch_sizes,
                           repeats=repeats, calls=calls)
  return {**result, 'format': runner.format, 'int8': info.get('int8'),
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
      # lock=False: the run that calls this holds its workdir's lock.
      info = export(workdir, fmt, path, int8=int8, clf=clf, lock=False,
                    **{**settings, 'float_stem': stem})
      result = evaluate_file(path, data_config=config.data)
      out[name] = {'format': fmt, 'int8': int8, 'bytes': info['bytes'],
                   'params': info['params'], 'accuracy': result['accuracy']}
  return out
