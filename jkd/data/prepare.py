"""`jkd data prepare`: a folder of images packed into ArrayRecord shards, and reading them back.

The output folder is a TFDS dataset folder (dataset_info.json, features.json and
`folder-<split>.array_record-<k>-of-<n>` shards of serialized `tf.train.Example`s with the
features image (the file's original bytes), label (a ClassLabel with the class names) and
file_name), written without TensorFlow. So it reads back with random access, per-host sharding
and no TensorFlow through `tfds.builder_from_directory(OUT).as_data_source(split)`, Grain's
`ArrayRecordDataSource`, or `config.data.dir=OUT` in jkd, where `PreparedSource` hands the
original bytes to the same decoder as the folder: the batches are identical both ways.

Every file is read and decoded once, within `jkd.data.jpeg`'s limits (pixels, file size,
regular files only); unreadable ones are listed (`bad_files` in `OUT/prepare.json`) and left
out, or fail the run with `strict=True`. Shards are written one at a time (to a fresh temporary
name, fsynced, then renamed) and recorded in `OUT/prepare_state.json` (written atomically by
`jkd.storage.write_json`) with a digest of their source files' size, mtime, inode and ctime, so
a killed run, started again with the same command, continues with the next shard and writes
again every shard whose images changed meanwhile. One prepare writes an OUT at a time (its
`jkd.lock`, as a workdir's); SIGTERM/SIGINT stop it between images (exit 143/130, the complete
shards kept); its decoding processes die with it, even when it is SIGKILLed; a full or
read-only disk is exit 2 with the complete shards kept.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Any

import numpy as np

from jkd.data import folder
from jkd.data import jpeg
from jkd.errors import UserError

DATASET_NAME = 'folder'
FILENAME_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'
META_FILE = 'jkd_folder.json'
STATE_FILE = 'prepare_state.json'
SUMMARY_FILE = 'prepare.json'


def is_prepared(root: str) -> bool:
  """Whether `root` is a TFDS dataset folder (as `jkd data prepare` writes)."""
  return os.path.isdir(root) and all(
      os.path.isfile(os.path.join(root, f)) for f in ('dataset_info.json', 'features.json'))


# ---------------------------------------------------------------- reading


class PreparedSource:
  """One split of a prepared folder: `source[i]` is {'image': the file's original bytes,
  'label': int32, 'path': the file's path relative to the folder it came from}.

  Attributes:
    native_shape: (None, None, C); num_classes, class_names, mode: of the dataset.
  """

  def __init__(self, root: str, split: str, parse_split):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self.root = root
    builder = tfds.builder_from_directory(root)
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
      raise UserError(f'{root!r} is a TFDS dataset with features {list(features)}; jkd reads '
                      "image classification datasets with 'image' and 'label' features.")
    head, bracket, rest = split.partition('[')
    base = folder.resolve_split(head.strip(), builder.info.splits.keys(), root)
    base, self._slice = parse_split(base + bracket + rest, {
        k: v.num_examples for k, v in builder.info.splits.items()})
    self._source = builder.as_data_source(
        split=base, decoders={'image': tfds.decode.SkipDecoding()})
    channels = features['image'].shape[-1] or 3
    meta = _read_json(os.path.join(root, META_FILE)) or {}
    mode = meta.get('mode')
    self.mode = mode if mode in jpeg.MODES else ('L' if channels == 1 else 'RGB')
    self.class_names = tuple(str(n) for n in (getattr(features['label'], 'names', None) or ()))
    self.num_classes = len(self.class_names)
    if not 2 <= self.num_classes <= folder.MAX_CLASSES:
      raise UserError(f'{root!r} declares {self.num_classes:,} classes (features.json): a '
                      f'classifier needs 2 to {folder.MAX_CLASSES:,}. Prepare it again with '
                      '`jkd data prepare`.')
    self.native_shape = (None, None, 1 if self.mode == 'L' else 3)

  def __len__(self) -> int:
    return self._slice.stop - self._slice.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[self._slice.start + int(index)]
    name = example.get('file_name', b'')
    name = name.decode('utf-8', 'replace') if isinstance(name, bytes) else str(name)
    label = int(example['label'])
    if not 0 <= label < self.num_classes:  # a record from outside: one-hot would be all zeros
      raise UserError(f'{self.root!r}: the record of {name!r} has label {label}, outside the '
                      f'{self.num_classes} classes of its features.json. Prepare it again with '
                      '`jkd data prepare`.')
    return {'image': example['image'], 'label': np.int32(label), 'path': name}

  def __repr__(self) -> str:
    return f'PreparedSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


def _read_json(path: str) -> dict | None:
  """A JSON object jkd wrote, or None when the file is absent.

  Raises:
    UserError: the file is not a JSON object (damaged or edited).
  """
  if not os.path.lexists(path):
    return None
  try:
    if not os.path.isfile(path) or os.path.islink(path):
      raise ValueError('not a regular file')
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
    if not isinstance(value, dict):
      raise ValueError(f'a JSON {type(value).__name__}, not an object')
  except (OSError, ValueError, RecursionError) as e:
    raise UserError(f'{path} cannot be read ({type(e).__name__}: {str(e)[:200]}): it is damaged '
                    'or was edited. Delete its folder and prepare again.') from None
  return value


# ---------------------------------------------------------------- writing

# Argument bounds of `prepare` (and `jkd data prepare`).
MAX_WORKERS = 256


def _stamp(path: str) -> list[int] | None:
  """What identifies the version of a file: [size, mtime_ns, inode, ctime_ns] (a file replaced
  or rewritten changes one of them), or None if it cannot be stat'ed."""
  try:
    info = os.stat(path)
  except (OSError, ValueError):
    return None
  return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns]


def _stamps_digest(stamps) -> str:
  return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()


def check_file(path: str) -> tuple[bytes | None, str | None, bool | None, list | None]:
  """Reads and fully decodes one file: (bytes, None, is_gray, stamp), or (None, why, None,
  stamp). The stamp (`_stamp`) is taken before the read, so a file changed meanwhile is read
  again next time."""
  stamp = _stamp(path)
  try:
    data = jpeg.read_file(path)
    _, _, gray = jpeg.header(data)
    jpeg.decode(data, 'L' if gray else 'RGB')
  except (OSError, jpeg.ImageReadError) as e:
    return None, str(e), None, stamp
  except MemoryError:
    return None, 'out of memory while decoding it', None, stamp
  return data, None, gray, stamp


def _worker_init(parent: int) -> None:
  """A decoding process: ends with its parent; leaves SIGINT/SIGTERM to the parent (a Ctrl-C
  reaches the whole process group; the parent stops the pool at a safe point)."""
  import signal  # pylint: disable=g-import-not-at-top
  from jkd.data.lifetime import die_with_parent  # pylint: disable=g-import-not-at-top
  die_with_parent(parent)
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)


def _fingerprint(idx: folder.FolderIndex, shard_size: int) -> str:
  """What fixes the shards' content: files, labels, classes and the shard size."""
  h = hashlib.sha256(json.dumps([idx.classes, shard_size]).encode())
  for name in sorted(idx.splits):
    paths, labels = idx.splits[name]
    h.update(name.encode())
    h.update('\n'.join(paths).encode('utf-8', 'surrogateescape'))
    h.update(labels.tobytes())
  return h.hexdigest()


class _Progress:
  """One status line: rewritten in place on a terminal, a line every 10% otherwise."""

  def __init__(self, label: str, total: int, initial: int = 0, stream=None):
    self.label, self.total, self.stream = label, total, stream or sys.stderr
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.start, self.shown, self.last, self.initial = time.time(), -1.0, 0.0, initial

  def update(self, done: int, bad: int, force: bool = False) -> None:
    now = time.time()
    fraction = done / max(self.total, 1)
    if not force and (now - self.last < 0.5 if self.tty else fraction < self.shown + 0.1):
      return
    self.last, self.shown = now, fraction
    rate = (done - self.initial) / max(now - self.start, 1e-9)  # this run's images only
    eta = (self.total - done) / rate if rate else 0.0
    line = (f'{self.label}: {done}/{self.total} images ({100 * fraction:.0f}%), '
            f'{rate:.0f} img/s, {bad} unreadable, ETA {eta:.0f}s')
    self.stream.write(('\r' + line) if self.tty else line + '\n')
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write('\n')


def check_arguments(workers: int, shard_size: int) -> None:
  """Refuses nonsense arguments of `prepare` before anything is read or written."""
  if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
    raise UserError(f'--shard-size {shard_size}: a shard holds at least 1 image. Pass a positive '
                    'count, e.g. 1000 (the default).')
  if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
    raise UserError(f'--workers {workers}: pass 0 (decode in this process) up to {MAX_WORKERS} '
                    'processes, e.g. the number of cores (the default).')


def prepare(cfg, out: str, *, workers: int = 0, strict: bool = False, shard_size: int = 1000,
            progress: bool = True) -> dict:
  """Packs the folder dataset of `cfg` (`config.data`) into ArrayRecord shards in `out`.

  The run holds `out`'s lock (`jkd.lock`, as a workdir's): a second prepare into the same
  folder is refused while this one runs. SIGTERM/SIGINT stop it between images: the shard in
  progress is dropped, the state keeps every complete shard, and `Interrupted` (exit 143/130)
  is raised; the same command continues. A shard is written again when one of its source
  files changed since it was written (size, mtime, inode or ctime: `_stamp`).

  Args:
    cfg: data config with `dir` naming class folders, split folders or a CSV/JSONL list; its
      `holdout`, `split_seed` and `mode` apply as in training.
    out: the output folder (created; not inside `cfg.dir`).
    workers: processes that read and decode the files (0: this process; at most MAX_WORKERS).
      They end with this process, even when it is killed.
    strict: fail (exit code 2) when any file cannot be read or decoded, instead of leaving it
      out; shards already written are kept for the next run.
    shard_size: images per shard, at most (>= 1; shards of a split are balanced).
    progress: print a progress line to stderr.

  Returns:
    The summary also written to `out/prepare.json`: num_examples per split, bad_files,
    classes, mode, wall_s.

  Raises:
    UserError: bad arguments, the folder's problems (see `folder.index`), `out` inside the
      folder, holding another dataset, locked by another run, not writable or full; mixed image
      modes with mode='auto', unreadable files with strict=True.
    interrupt.Interrupted: SIGTERM/SIGINT (after the complete shards were recorded).
  """
  from jkd import interrupt, storage  # pylint: disable=g-import-not-at-top
  from jkd import lock as lock_lib  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  check_arguments(workers, shard_size)
  root = folder.data_dir(cfg)
  if is_prepared(root):
    raise UserError(f'config.data.dir={root!r} is already prepared; train on it directly.')
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(root) and (out + os.sep).startswith(root + os.sep):
    raise UserError(f'--out {out!r} is inside the image folder {root!r}: it would be read as a '
                    'class folder next time. Write it somewhere else.')
  idx = folder.index(cfg)
  storage.ensure_dir(out, '--out')
  with interrupt.deferred():
    lock = lock_lib.WorkdirLock(out, 'jkd data prepare', flag='--out')
    lock.acquire(log=lambda m: print(m, file=sys.stderr))
    try:
      state = _write_shards(idx, out, workers, shard_size, progress)
      interrupt.check('after the last shard; the shards are complete, run the same command to '
                      'write the metadata')
      return _finish(cfg, idx, out, state, _features(idx), strict, time.time() - t0)
    except OSError as e:  # a full or read-only disk: the complete shards are kept
      raise UserError(_write_failed(out, e)) from None
    finally:
      lock.release()


def _write_failed(out: str, error: Exception) -> str:
  what = getattr(error, 'strerror', None) or str(error)
  return (f'Cannot write to --out {out!r} ({what}; {getattr(error, "filename", None) or ""}): '
          'the disk is full, read-only or over quota. Every complete shard is kept and '
          'recorded; free space (or pass another --out) and run the same command again.')


def _write_shards(idx: folder.FolderIndex, out: str, workers: int, shard_size: int,
                  progress: bool) -> dict:
  """Writes every shard missing from (or stale in) `out/prepare_state.json`; returns the state.
  Raises `interrupt.Interrupted` at the first image after a signal (the shard in progress is
  dropped, the state written before is complete)."""
  from jkd import interrupt, storage  # pylint: disable=g-import-not-at-top
  fingerprint = _fingerprint(idx, shard_size)
  state_path = os.path.join(out, STATE_FILE)
  state = _read_json(state_path) or {'fingerprint': fingerprint, 'shards': {}}
  if state.get('fingerprint') != fingerprint or not isinstance(state.get('shards'), dict):
    raise UserError(f'{out!r} holds shards of another folder, split or shard size. Pass a new '
                    '--out, or delete that folder to start again.')
  _remove_partial_shards(out)
  features = _features(idx)
  base = root_of(idx)
  pool = None
  if workers > 0:
    context = multiprocessing.get_context('spawn')  # never fork a process that may hold jax
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))
  try:
    for split, (paths, labels) in idx.splits.items():
      if not isinstance(state['shards'].get(split), dict):
        state['shards'][split] = {}  # absent, or damaged by hand: written again
      done = state['shards'][split]
      count = max(1, math.ceil(len(paths) / shard_size))
      layout = {str(k): _shard_layout(split, k, count, len(paths)) for k in range(count)}
      for k in list(done):  # shards whose sources changed since (or damaged): written again
        if k not in layout or not _shard_current(done[k], layout[k], out, paths):
          del done[k]
      finished = sum(v['end'] - v['start'] for v in done.values())
      bar = _Progress(f'prepare {split}', len(paths), finished) if progress else None
      for k in range(count):
        interrupt.check(f'before shard {k} of split {split!r}; the complete shards are '
                        'recorded, run the same command to continue')
        if str(k) in done:
          continue
        name, start, end = layout[str(k)]
        entry = _write_shard(pool, features, out, name, paths[start:end], labels[start:end],
                             base, bar, finished, _bad_count(state))
        done[str(k)] = dict(entry, start=start, end=end)
        finished += end - start
        storage.write_json(state_path, state)  # atomic: the old state or the new one
      if bar:
        bar.update(len(paths), _bad_count(state), force=True)
        bar.close()
  finally:
    if pool:
      pool.shutdown(wait=True, cancel_futures=True)
  return state


def root_of(idx: folder.FolderIndex) -> str:
  """The folder the files' names in the shards are relative to."""
  return idx.root if os.path.isdir(idx.root) else os.path.dirname(idx.root)


def _shard_layout(split: str, k: int, count: int, n: int) -> tuple[str, int, int]:
  """(file name, start, end) of shard k of `count` over a split of n files."""
  name = FILENAME_TEMPLATE.format(DATASET=DATASET_NAME, SPLIT=split, FILEFORMAT='array_record',
                                  SHARD_X_OF_Y=f'{k:05d}-of-{count:05d}')
  return name, k * n // count, (k + 1) * n // count


def _shard_current(entry, layout: tuple[str, int, int], out: str, paths) -> bool:
  """Whether a recorded shard is still what its sources hold: the entry is well formed and
  where it belongs, its file is there, and every source file has the stamp it had when the
  shard was written (a state file edited or damaged by hand is redone, never trusted)."""
  name, start, end = layout
  ints = ('start', 'end', 'records', 'gray')
  if not (isinstance(entry, dict) and entry.get('file') == name
          and all(type(entry.get(k)) is int for k in ints)  # pylint: disable=unidiomatic-typecheck
          and (entry['start'], entry['end']) == (start, end)
          and 0 <= entry['gray'] <= entry['records'] <= end - start
          and isinstance(entry.get('sources'), str) and isinstance(entry.get('bad'), list)
          and all(isinstance(b, list) and len(b) == 2 and all(isinstance(x, str) for x in b)
                  for b in entry['bad'])):
    return False
  path = os.path.join(out, name)
  if not os.path.isfile(path) or os.path.islink(path):
    return False
  return _stamps_digest([_stamp(p) for p in paths[start:end]]) == entry['sources']


def _remove_partial_shards(out: str) -> None:
  """Deletes the temporary files of shards a killed run was writing (this run holds the lock:
  nobody else writes them)."""
  for name in os.listdir(out):
    if name.startswith(f'{DATASET_NAME}-') and '.array_record-' in name and '.tmp' in name:
      path = os.path.join(out, name)
      if os.path.isfile(path) and not os.path.islink(path):
        os.remove(path)


def _write_shard(pool, features, out: str, name: str, paths, labels, base: str, bar,
                 finished: int, bad_before: int) -> dict:
  """Reads, checks and writes one shard to `out/name` (through a fresh temporary file and a
  rename); returns its state entry {'file', 'records', 'bad', 'gray', 'sources'}.

  Raises:
    interrupt.Interrupted: a signal arrived (checked after every image); the temporary file
      is removed.
    OSError: the shard cannot be written (full or read-only disk).
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from jkd import interrupt  # pylint: disable=g-import-not-at-top
  results = (pool.map(check_file, paths, chunksize=4) if pool else map(check_file, paths))
  # A fresh, unpredictable name (mkstemp: O_EXCL, no symlink followed): a link planted at a
  # guessable name cannot redirect the shard.
  fd, tmp = tempfile.mkstemp(dir=out, prefix=name + '.tmp')
  os.close(fd)
  writer = None
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
    records, bad, gray, stamps = 0, [], 0, []
    for i, (path, label) in enumerate(zip(paths, labels)):
      try:
        data, error, is_gray, stamp = next(results)
      except concurrent.futures.process.BrokenProcessPool:
        raise UserError(
            f'A decoding process died while reading the files from {paths[i]!r} on (out of '
            'memory, or killed). Run again with fewer --workers (or --workers 0 to see which '
            'file it is); the complete shards are kept.') from None
      stamps.append(stamp)
      if data is None:
        bad.append([path, error])
      else:
        record = features.serialize_example({
            'image': data, 'label': int(label), 'file_name': os.path.relpath(path, base)})
        try:
          writer.write(record)
        except RuntimeError as e:  # ArrayRecord's failed write (full disk): an OSError here
          raise OSError(f'{e}') from None
        records += 1
        gray += bool(is_gray)
      if bar and i % 16 == 0:
        bar.update(finished + i, bad_before + len(bad))
      interrupt.check(f'while writing {name}; it was dropped, and the complete shards are '
                      'recorded: run the same command to continue')
    try:
      writer.close()
    except RuntimeError as e:  # ArrayRecord reports a failed write only here
      raise OSError(f'{e}') from None
    writer = None
    _fsync(tmp)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600: readable as a plain file would be
    os.replace(tmp, os.path.join(out, name))
  except BaseException:
    if writer is not None:
      try:
        writer.close()
      except RuntimeError:
        pass
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return {'file': name, 'records': records, 'bad': bad, 'gray': gray,
          'sources': _stamps_digest(stamps)}


def _fsync(path: str) -> None:
  """Flushes a written file to the disk (a crash after the rename keeps a whole shard)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _bad_count(state: dict) -> int:
  return sum(len(v['bad']) for shards in state['shards'].values() for v in shards.values())


def _features(idx: folder.FolderIndex):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  channels = 1 if idx.mode == 'L' else 3
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, channels)),
      'label': tfds.features.ClassLabel(names=list(idx.classes)),
      'file_name': tfds.features.Text(),
  })


def _write_metadata(out: str, write) -> None:
  """Runs `write(folder)` (TFDS's metadata writer, which opens its files in place) in a fresh
  temporary folder inside `out`, then moves each file it wrote into `out` with a rename: a kill
  leaves the old file or the new one, and a link planted at one of those names is replaced,
  never followed."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  staging = tempfile.mkdtemp(dir=out, prefix='.metadata.tmp')
  try:
    write(staging)
    for name in sorted(os.listdir(staging)):
      path = os.path.join(staging, name)
      if os.path.isfile(path) and not os.path.islink(path):
        _fsync(path)
        os.replace(path, os.path.join(out, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _finish(cfg, idx: folder.FolderIndex, out: str, state: dict, features, strict: bool,
            wall_s: float) -> dict:
  """Checks modes and unreadable files over every shard, then writes the TFDS metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jkd import storage  # pylint: disable=g-import-not-at-top
  shards = state['shards']
  bad = [b for split in shards.values() for v in split.values() for b in v['bad']]
  if bad and strict:
    listed = '; '.join(f'{p} ({e})' for p, e in bad[:5])
    raise UserError(f'{len(bad)} files of {idx.root!r} cannot be read: {listed}'
                    f'{" ..." if len(bad) > 5 else ""}. Replace or delete them, or drop --strict '
                    'to leave them out (the shards written so far are kept).')
  gray = sum(v['gray'] for split in shards.values() for v in split.values())
  total = sum(v['records'] for split in shards.values() for v in split.values())
  mode = idx.mode
  if str(cfg.get('mode', 'auto')) == 'auto':
    if 0 < gray < total:
      raise UserError(
          f'{idx.root!r} mixes image modes: {gray} of {total} images are grayscale and the '
          'rest colour. Say how to read them all and run the same command again (the shards '
          'are kept): --config.data.mode=RGB (3 channels; grayscale images repeated) or '
          '--config.data.mode=L (1 channel).')
    mode = 'L' if total and gray == total else 'RGB'
  if mode != idx.mode:  # the sample of `folder.index` missed what the full pass found
    features = _features(folder.FolderIndex(idx.root, idx.layout, idx.classes, idx.splits,
                                            mode))
  split_infos = []
  for split, entries in shards.items():
    ordered = [entries[k] for k in sorted(entries, key=int)]
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[v['records'] for v in ordered], num_bytes=sum(
            os.path.getsize(os.path.join(out, v['file'])) for v in ordered),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=out, template=FILENAME_TEMPLATE, dataset_name=DATASET_NAME, split=split,
            filetype_suffix='array_record')))
  # What `tfds.folder_dataset.write_metadata` does, written to a staging folder first.
  info = tfds.core.DatasetInfo(
      builder=tfds.core.dataset_info.DatasetIdentity(
          name=DATASET_NAME, version=tfds.core.Version('1.0.0'), data_dir=out, module_name=''),
      features=features, description=f'Images of {idx.root}, packed by `jkd data prepare`.')
  info.set_file_format(tfds.core.file_adapters.FileFormat.ARRAY_RECORD)
  info.set_splits(tfds.core.SplitDict(split_infos))
  _write_metadata(out, info.write_to_directory)
  summary = {
      'source': idx.root, 'layout': idx.layout, 'classes': list(idx.classes), 'mode': mode,
      'holdout': float(cfg.get('holdout', 0.1)), 'split_seed': int(cfg.get('split_seed', 0)),
      'num_examples': {s: sum(v['records'] for v in e.values()) for s, e in shards.items()},
      'bad_files': bad, 'wall_s': round(wall_s, 2)}
  storage.write_json(os.path.join(out, META_FILE), summary)
  storage.write_json(os.path.join(out, SUMMARY_FILE), summary)
  return summary
