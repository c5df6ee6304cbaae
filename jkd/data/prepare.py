"""`jkd data prepare`: a folder of images packed into ArrayRecord shards, and reading them back.

The output folder is a TFDS dataset folder (dataset_info.json, features.json and
`folder-<split>.array_record-<k>-of-<n>` shards of serialized `tf.train.Example`s with the
features image (the file's original bytes), label (a ClassLabel with the class names) and
file_name), written without TensorFlow. So it reads back with random access, per-host sharding
and no TensorFlow through `tfds.builder_from_directory(OUT).as_data_source(split)`, Grain's
`ArrayRecordDataSource`, or `config.data.dir=OUT` in jkd, where `PreparedSource` hands the
original bytes to the same decoder as the folder: the batches are identical both ways.

Every file is read and decoded once; unreadable ones are listed (`bad_files` in
`OUT/prepare.json`) and left out, or fail the run with `strict=True`. Shards are written one at a
time (to a temporary name, then renamed) and recorded in `OUT/prepare_state.json`, so a killed
run, started again with the same command, continues with the next shard.
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
    self.mode = meta.get('mode') or ('L' if channels == 1 else 'RGB')
    self.class_names = tuple(features['label'].names)
    self.num_classes = len(self.class_names)
    self.native_shape = (None, None, 1 if self.mode == 'L' else 3)

  def __len__(self) -> int:
    return self._slice.stop - self._slice.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[self._slice.start + int(index)]
    name = example.get('file_name', b'')
    return {'image': example['image'], 'label': np.int32(example['label']),
            'path': name.decode() if isinstance(name, bytes) else str(name)}

  def __repr__(self) -> str:
    return f'PreparedSource({self.root!r}, {len(self)} images, {self.num_classes} classes)'


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------- writing


def check_file(path: str) -> tuple[bytes | None, str | None, bool | None]:
  """Reads and fully decodes one file: (bytes, None, is_gray), or (None, why, None)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    _, _, gray = jpeg.header(data)
    jpeg.decode(data, 'L' if gray else 'RGB')
  except (OSError, jpeg.ImageReadError) as e:
    return None, str(e), None
  return data, None, gray


def _fingerprint(idx: folder.FolderIndex, shard_size: int) -> str:
  """What fixes the shards' content: files, labels, classes and the shard size."""
  h = hashlib.sha256(json.dumps([idx.classes, shard_size]).encode())
  for name in sorted(idx.splits):
    paths, labels = idx.splits[name]
    h.update(name.encode())
    h.update('\n'.join(paths).encode())
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


def prepare(cfg, out: str, *, workers: int = 0, strict: bool = False, shard_size: int = 1000,
            progress: bool = True) -> dict:
  """Packs the folder dataset of `cfg` (`config.data`) into ArrayRecord shards in `out`.

  Args:
    cfg: data config with `dir` naming class folders, split folders or a CSV/JSONL list; its
      `holdout`, `split_seed` and `mode` apply as in training.
    out: the output folder (created; not inside `cfg.dir`).
    workers: processes that read and decode the files (0: this process).
    strict: fail (exit code 2) when any file cannot be read or decoded, instead of leaving it
      out; shards already written are kept for the next run.
    shard_size: images per shard, at most (shards of a split are balanced).
    progress: print a progress line to stderr.

  Returns:
    The summary also written to `out/prepare.json`: num_examples per split, bad_files,
    classes, mode, wall_s.

  Raises:
    UserError: the folder's problems (see `folder.index`), `out` inside the folder or holding
      another dataset, mixed image modes with mode='auto', unreadable files with strict=True.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  root = folder.data_dir(cfg)
  if is_prepared(root):
    raise UserError(f'config.data.dir={root!r} is already prepared; train on it directly.')
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(root) and (out + os.sep).startswith(root + os.sep):
    raise UserError(f'--out {out!r} is inside the image folder {root!r}: it would be read as a '
                    'class folder next time. Write it somewhere else.')
  idx = folder.index(cfg)
  os.makedirs(out, exist_ok=True)
  fingerprint = _fingerprint(idx, shard_size)
  state_path = os.path.join(out, STATE_FILE)
  state = _read_json(state_path) or {'fingerprint': fingerprint, 'shards': {}}
  if state['fingerprint'] != fingerprint:
    raise UserError(f'{out!r} holds shards of another folder, split or shard size. Pass a new '
                    '--out, or delete that folder to start again.')
  features = _features(idx)
  base = root if os.path.isdir(root) else os.path.dirname(root)
  context = multiprocessing.get_context('spawn')  # never fork a process that may hold jax
  pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
          if workers > 0 else None)
  try:
    for split, (paths, labels) in idx.splits.items():
      done = state['shards'].setdefault(split, {})
      count = max(1, math.ceil(len(paths) / shard_size))
      finished = sum(v['end'] - v['start'] for v in done.values())
      bar = _Progress(f'prepare {split}', len(paths), finished) if progress else None
      for k in range(count):
        start, end = k * len(paths) // count, (k + 1) * len(paths) // count
        name = FILENAME_TEMPLATE.format(DATASET=DATASET_NAME, SPLIT=split,
                                        FILEFORMAT='array_record',
                                        SHARD_X_OF_Y=f'{k:05d}-of-{count:05d}')
        if str(k) in done and os.path.isfile(os.path.join(out, name)):
          continue
        results = (pool.map(check_file, paths[start:end], chunksize=8) if pool
                   else map(check_file, paths[start:end]))
        tmp = os.path.join(out, name + '.tmp')
        writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
        records, bad, gray = 0, [], 0
        for i, (path, label, (data, error, is_gray)) in enumerate(
            zip(paths[start:end], labels[start:end], results)):
          if data is None:
            bad.append([path, error])
          else:
            writer.write(features.serialize_example({
                'image': data, 'label': int(label), 'file_name': os.path.relpath(path, base)}))
            records += 1
            gray += bool(is_gray)
          if bar and i % 16 == 0:
            bar.update(finished + i, _bad_count(state) + len(bad))
        writer.close()
        os.replace(tmp, os.path.join(out, name))
        done[str(k)] = {'file': name, 'start': start, 'end': end, 'records': records,
                        'bad': bad, 'gray': gray}
        finished += end - start
        _write_json(state_path, state)
      if bar:
        bar.update(len(paths), _bad_count(state), force=True)
        bar.close()
  finally:
    if pool:
      pool.shutdown()
  return _finish(cfg, idx, out, state, features, strict, time.time() - t0)


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


def _finish(cfg, idx: folder.FolderIndex, out: str, state: dict, features, strict: bool,
            wall_s: float) -> dict:
  """Checks modes and unreadable files over every shard, then writes the TFDS metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=features, split_infos=split_infos,
      filename_template=FILENAME_TEMPLATE, check_data=False,
      description=f'Images of {idx.root}, packed by `jkd data prepare`.')
  summary = {
      'source': idx.root, 'layout': idx.layout, 'classes': list(idx.classes), 'mode': mode,
      'holdout': float(cfg.get('holdout', 0.1)), 'split_seed': int(cfg.get('split_seed', 0)),
      'num_examples': {s: sum(v['records'] for v in e.values()) for s, e in shards.items()},
      'bad_files': bad, 'wall_s': round(wall_s, 2)}
  _write_json(os.path.join(out, META_FILE), summary)
  _write_json(os.path.join(out, SUMMARY_FILE), summary)
  return summary
