"""The user's own images (`config.data.name='folder'`): real Fashion-MNIST images written as JPEG
and PNG files into class folders, read in worker processes, trained and distilled from (per-class
eval, confusion matrix), packed by `jkd data prepare` (same batches both ways), resumed
bit-identically after a kill, and every bad-input case as a clear exit-2 error."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from jkd import data
from jkd.checkpoint import load_arrays
from jkd.data import folder, jpeg, prepare, sources
from jkd.errors import UserError

from conftest import REPO, run_jkd

CONFIGS = os.path.join(REPO, 'configs', 'folder')
PER_CLASS = 30  # 10 classes x 30 = 300 images: 270 train, 30 held out


def _write_fmnist_folder(root, per_class=PER_CLASS, split_dirs=False):
  """Fashion-MNIST's first images as files: odd ones JPEG, even ones PNG, one folder a class."""
  images, labels = data.load_fashion_mnist('train[:1000]')
  count = np.zeros(10, int)
  for i, (image, label) in enumerate(zip(images, labels)):
    if count[label] >= per_class:
      continue
    count[label] += 1
    name = sources.FASHION_MNIST_CLASSES[label].replace('/', '-')
    split = ('val' if count[label] > per_class * 0.8 else 'train') if split_dirs else ''
    directory = os.path.join(root, split, name)
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(image[..., 0]).save(
        os.path.join(directory, f'{i:05d}.' + ('jpg' if i % 2 else 'png')))
  return str(root)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  return _write_fmnist_folder(tmp_path_factory.mktemp('photos'))


def _cfg(root, **overrides):
  cfg = data.default_data_config('folder')
  cfg.update(dir=str(root), image_size=28, num_workers=0)
  cfg.update(overrides)
  return cfg


def _train(cfg, n, **kwargs):
  iterator = data.make_train_iterator(cfg, global_batch_size=kwargs.pop('batch', 32), seed=0,
                                      process_index=kwargs.pop('process_index', 0),
                                      process_count=kwargs.pop('process_count', 1))
  batches = [next(iterator) for _ in range(n)]
  iterator.close()
  return batches


def _equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _eval(cfg, split=None, **kwargs):
  return list(data.make_eval_iterator(cfg, split, global_batch_size=kwargs.get('batch', 16),
                                      process_index=0, process_count=1))


# ---------------------------------------------------------------- layouts


def test_class_folders_hold_out_a_stratified_seeded_fraction(photos):
  info = data.get_info(_cfg(photos))
  assert info.num_examples == {'train': 270, 'val': 30} and info.num_classes == 10
  assert info.image_shape == (28, 28, 1) and info.mean == (0.5,)  # grayscale: mode 'L'
  assert info.class_names[0] == 'Ankle boot' and 'T-shirt-top' in info.class_names
  idx = folder.index(_cfg(photos))
  assert np.bincount(idx.splits['val'][1]).tolist() == [3] * 10  # every class held out alike
  assert not set(idx.splits['val'][0]) & set(idx.splits['train'][0])
  other = folder.index(_cfg(photos, split_seed=1))
  assert set(other.splits['val'][0]) != set(idx.splits['val'][0])
  # Slices sample every class: a split's files are in a fixed seeded order, not by class.
  head = sources.open_source(_cfg(photos), 'train[:20%]')
  assert len(head) == 54 and len(set(head.labels.tolist())) >= 8  # sorted: 2 classes


def test_split_folders_and_list_files(tmp_path, photos):
  split_root = _write_fmnist_folder(tmp_path / 'splits', split_dirs=True)
  info = data.get_info(_cfg(split_root))
  assert info.num_examples == {'train': 240, 'val': 60}
  # 'test' as the eval split name finds 'val' (and 'val' finds 'validation' or 'test').
  assert len(sources.open_source(_cfg(split_root), 'test')) == 60
  # The same files as a CSV list (with a split column) and as JSONL (held-out split drawn).
  idx = folder.index(_cfg(photos))
  rows = [(p, idx.classes[l], s) for s in ('train', 'val') for p, l in zip(*idx.splits[s])]
  csv_path = tmp_path / 'list.csv'
  csv_path.write_text('path,label,split\n' + ''.join(
      f'{os.path.relpath(p, tmp_path)},{c},{s}\n' for p, c, s in rows))
  listed = folder.index(_cfg(csv_path))
  assert listed.layout == 'list' and listed.classes == idx.classes
  assert set(listed.splits['val'][0]) == set(idx.splits['val'][0])
  jsonl = tmp_path / 'list.jsonl'
  jsonl.write_text(''.join(json.dumps({'path': p, 'label': c}) + '\n' for p, c, _ in rows))
  assert data.get_info(_cfg(jsonl)).num_examples == {'train': 270, 'val': 30}
  ints = tmp_path / 'ints.csv'  # integer labels without a header: classes '0'..'9'
  ints.write_text(''.join(f'{p},{idx.classes.index(c)}\n' for p, c, _ in rows))
  assert folder.index(_cfg(ints)).classes == tuple(str(i) for i in range(10))


def _bad(tmp_path, case):
  root = tmp_path / case
  if case == 'missing':
    return _cfg(root), 'does not exist'
  root.mkdir()
  if case == 'empty':
    return _cfg(root), 'no class folders'
  image = Image.fromarray(np.zeros((8, 8), np.uint8))
  (root / 'cat').mkdir()
  image.save(root / 'cat' / 'a.png')
  (root / 'dog').mkdir()
  if case == 'class_without_images':
    (root / 'dog' / 'notes.txt').write_text('no image here')
    return _cfg(root), r"dog' holds no images"
  if case == 'mixed_modes':
    image.convert('RGB').save(root / 'dog' / 'b.jpg')
    return _cfg(root), 'mixes image modes.*--config.data.mode=RGB'
  if case == 'list_missing_files':
    (root / 'list.csv').write_text('cat/a.png,cat\ndog/gone.jpg,dog\n')
    return _cfg(root / 'list.csv'), r"names 1 files that do not exist.*dog/gone.jpg"
  if case == 'unset':
    return _cfg(''), 'needs config.data.dir'
  raise AssertionError(case)


@pytest.mark.parametrize('case', ['missing', 'empty', 'class_without_images', 'mixed_modes',
                                  'list_missing_files', 'unset'])
def test_bad_folders_are_user_errors(tmp_path, case):
  cfg, words = _bad(tmp_path, case)
  with pytest.raises(UserError, match=words) as error:
    data.get_info(cfg)
  assert '\n' not in str(error.value)
  if case == 'mixed_modes':  # saying how to read them is the fix
    assert data.get_info(_cfg(cfg.dir, mode='RGB', eval_split='train')).image_shape == (28, 28, 3)


def test_bad_folder_exits_2_with_one_paragraph(tmp_path):
  out = run_jkd('train', '--config', os.path.join(CONFIGS, 'supervised.py:tiny'),
                '--workdir', str(tmp_path / 'w'), f'--config.data.dir={tmp_path / "nothing"}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert 'does not exist' in ' '.join(out.stderr.split())


def test_unreadable_image_is_reported_with_its_path(tmp_path):
  root = _write_fmnist_folder(tmp_path / 'p', per_class=4)
  broken = os.path.join(root, 'Bag', 'broken.jpg')
  with open(broken, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  cfg = _cfg(root, mode='L', holdout=0.0)
  with pytest.raises(UserError, match='broken.jpg.*jkd data prepare'):
    _train(cfg, 2, batch=40)


# ---------------------------------------------------------------- decoding


def _jpeg(array, quality=90):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def test_decode_and_crop_match_pillow_and_torchvision_semantics():
  rng = np.random.default_rng(0)
  pixels = np.clip(rng.normal(128, 40, (375, 500, 3)).cumsum(0) % 256, 0, 255).astype(np.uint8)
  encoded = _jpeg(pixels)
  full = np.asarray(Image.open(io.BytesIO(encoded)).convert('RGB'))
  np.testing.assert_array_equal(jpeg.decode(encoded), full)
  assert jpeg.header(encoded) == (500, 375, False)
  # A crop smaller than twice the output decodes at full size: exactly crop-then-resize
  # (torchvision's RandomResizedCrop on a PIL image), with the same draws as the array path.
  crop = jpeg.train_crop(encoded, np.random.default_rng(3), 224, scale=(0.3, 0.5))
  left, top, w, h = jpeg.random_crop_box(500, 375, np.random.default_rng(3), (0.3, 0.5))
  assert max(w, h) < 448
  expected = np.asarray(Image.fromarray(full[top:top + h, left:left + w]).resize(
      (224, 224), Image.BILINEAR))
  np.testing.assert_array_equal(crop, expected)
  # The eval crop: resize the short side to 256, center 224 (within 1 of resize-then-crop).
  from jkd.data import augment
  diff = jpeg.eval_crop(encoded, 224).astype(int) - augment.center_crop(full, 224)
  assert np.abs(diff).max() <= 1
  # A big photo decodes at 1/8 for a 64x64 eval crop: close to the full decode, not equal.
  big = np.asarray(Image.fromarray(full).resize((2000, 1500), Image.BILINEAR))
  small = jpeg.eval_crop(_jpeg(big), 64)
  assert np.abs(small.astype(int) - augment.center_crop(big, 64)).mean() < 3
  gray = jpeg.decode(_jpeg(full[..., 0]), 'RGB')  # grayscale files read as RGB repeat
  assert gray.shape == (375, 500, 3) and (gray[..., 0] == gray[..., 2]).all()
  with pytest.raises(jpeg.ImageReadError):
    jpeg.decode(encoded[:len(encoded) // 2])


def test_opencv_train_resize_is_the_same_crop_averaged_by_area():
  """`resizer='opencv'` (the default train resize of files): the same crop box, resized by area
  averaging; on a smooth photo within a few grey levels of Pillow's antialiased bilinear, a
  pure function of the bytes and the draws, mirrored by `flip`."""
  y, x = np.mgrid[0:375, 0:500]
  photo = np.stack([128 + 100 * np.sin(x / 23.0), 128 + 100 * np.cos(y / 31.0),
                    (x + y) % 256], -1).astype(np.uint8)
  encoded = _jpeg(photo)
  for scale in ((0.05, 0.08), (0.3, 0.5), (0.9, 1.0)):  # enlarged, shrunk, shrunk ~2x
    pil = jpeg.train_crop(encoded, np.random.default_rng(1), 224, scale=scale)
    fast = jpeg.train_crop(encoded, np.random.default_rng(1), 224, scale=scale,
                           resizer='opencv')
    assert fast.shape == pil.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - pil).mean() < 2.0, scale
    again = jpeg.train_crop(encoded, np.random.default_rng(1), 224, scale=scale,
                            resizer='opencv', flip=True)
    np.testing.assert_array_equal(again, fast[:, ::-1])
  with pytest.raises(ValueError, match='resizer'):
    jpeg.resize_box(photo, (0, 0, 100, 100), (50, 50), crop_first=True, resizer='lanczos')


def test_train_resize_setting_reaches_the_files_and_eval_stays_pillow(photos):
  """`config.data.train_resize` picks the train crops' resize; eval crops are Pillow's either
  way (torchvision's eval pixels)."""
  def first(**kw):
    return _train(_cfg(photos, image_size=20, holdout=0.0, **kw), 1)[0]['image']
  fast, pil = first(), first(train_resize='pillow')
  assert fast.shape == pil.shape and not np.array_equal(fast, pil)
  assert np.abs(fast.astype(int) - pil).mean() < 8
  np.testing.assert_array_equal(fast, first(train_resize='opencv'))
  evals = [next(iter(data.make_eval_iterator(_cfg(photos, image_size=20, train_resize=r),
                                             global_batch_size=16, process_index=0,
                                             process_count=1)))['image']
           for r in ('opencv', 'pillow')]
  np.testing.assert_array_equal(*evals)


def test_without_opencv_the_default_resize_asks_instead_of_switching_filters(photos,
                                                                             monkeypatch):
  monkeypatch.setattr(jpeg, 'cv2', None)  # a slim install without OpenCV
  with pytest.raises(UserError, match='train_resize=pillow'):
    _train(_cfg(photos, image_size=20, holdout=0.0), 1)
  assert _train(_cfg(photos, image_size=20, holdout=0.0, train_resize='pillow'), 1)[0][
      'image'].shape == (32, 20, 20, 1)


# ---------------------------------------------------------------- pipeline


def test_batches_do_not_depend_on_workers_or_hosts_and_resume(photos):
  cfg = _cfg(photos)
  reference = _train(cfg, 9)  # 8 batches an epoch: crosses into the second epoch
  assert reference[0]['image'].shape == (32, 28, 28, 1) and reference[0]['image'].dtype == np.uint8
  _equal(reference, _train(_cfg(photos, num_workers=3), 9))
  _equal(reference, _train(_cfg(photos, worker_processes=2), 9))  # Grain worker processes
  halves = [_train(cfg, 9, process_index=p, process_count=2) for p in range(2)]
  for step, whole in enumerate(reference):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[key])
  iterator = data.make_train_iterator(_cfg(photos, worker_processes=2), global_batch_size=32,
                                      seed=0, process_index=0, process_count=1)
  iterator.set_state({**iterator.get_state(), 'next_batch': 5})
  _equal(reference[5:], [next(iterator) for _ in range(4)])
  assert iterator.get_state()['next_batch'] == 9
  iterator.close()
  evals = _eval(cfg)
  assert sum(b['mask'].sum() for b in evals) == 30
  _equal(evals, _eval(_cfg(photos, worker_processes=2)))


def test_flips_applied_while_cropping_are_the_batch_flips(photos):
  flipped, plain = _train(_cfg(photos), 1)[0], _train(_cfg(photos, flip=False), 1)[0]
  mirrored = (flipped['image'] != plain['image']).any(axis=(1, 2, 3))
  assert 0.2 < mirrored.mean() < 0.8
  np.testing.assert_array_equal(flipped['image'][mirrored], plain['image'][mirrored][:, :, ::-1])
  # The flips are those of the batch flip (`_BatchReader.draws`), as for every other dataset.
  from jkd.data import pipeline  # pylint: disable=g-import-not-at-top
  reader = pipeline._BatchReader(_cfg(photos), sources.open_source(_cfg(photos), 'train'),
                                 train=True)
  np.testing.assert_array_equal(reader.draws(0, 32, slice(0, 32))[1], mirrored)


def test_prepare_gives_the_same_batches_and_resumes(tmp_path, photos):
  out = str(tmp_path / 'prepared')
  summary = prepare.prepare(_cfg(photos), out, workers=2, shard_size=100, progress=False)
  assert summary['num_examples'] == {'train': 270, 'val': 30} and summary['mode'] == 'L'
  assert summary['bad_files'] == []
  shards = sorted(f for f in os.listdir(out) if '.array_record-' in f)
  assert len(shards) == 4  # train: 3 shards of 90, val: 1
  packed = _cfg(out)
  assert data.get_info(packed) == data.get_info(_cfg(photos))
  _equal(_train(packed, 3), _train(_cfg(photos), 3))
  _equal(_eval(packed), _eval(_cfg(photos)))
  # Random access through TFDS without TensorFlow, the original bytes in each record.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(out).as_data_source(
      split='val', decoders={'image': tfds.decode.SkipDecoding()})
  first = folder.index(_cfg(photos)).splits['val'][0][0]
  assert source[0]['image'] == open(first, 'rb').read()
  # Killed after a shard: the next run writes only the missing ones, the same bytes.
  state = json.load(open(os.path.join(out, prepare.STATE_FILE)))
  last = state['shards']['train'].pop('2')
  os.remove(os.path.join(out, last['file']))
  kept = os.path.getmtime(os.path.join(out, shards[0]))
  json.dump(state, open(os.path.join(out, prepare.STATE_FILE), 'w'))
  prepare.prepare(_cfg(photos), out, workers=0, shard_size=100, progress=False)
  assert os.path.getmtime(os.path.join(out, shards[0])) == kept
  _equal(_train(packed, 3), _train(_cfg(photos), 3))


def test_prepare_lists_unreadable_files_and_strict_fails(tmp_path):
  root = _write_fmnist_folder(tmp_path / 'p', per_class=3)
  bad = os.path.join(root, 'Coat', 'zz.png')
  open(bad, 'wb').write(b'\x89PNG truncated')
  out = run_jkd('data', 'prepare', '--dir', root, '--out', str(tmp_path / 'o'), '--workers', '0',
                '--strict')
  assert out.returncode == 2 and 'zz.png' in out.stderr and 'Traceback' not in out.stderr
  out = run_jkd('data', 'prepare', '--dir', root, '--out', str(tmp_path / 'o'), '--workers', '0')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'unreadable: ' + bad in out.stdout
  summary = json.load(open(tmp_path / 'o' / 'prepare.json'))
  assert [p for p, _ in summary['bad_files']] == [bad]
  assert sum(summary['num_examples'].values()) == 30  # 31 files, one unreadable


# ---------------------------------------------------------------- commands


def test_train_eval_distill_and_compress_a_folder(tmp_path, photos):
  teacher, student = str(tmp_path / 'teacher'), str(tmp_path / 'student')
  out = run_jkd('train', '--config', os.path.join(CONFIGS, 'supervised.py:tiny'),
                '--workdir', teacher, f'--config.data.dir={photos}')
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.load(open(os.path.join(teacher, 'summary.json')))
  out = run_jkd('eval', '--workdir', teacher)
  assert out.returncode == 0, out.stderr[-3000:]
  ev = json.load(open(os.path.join(teacher, 'eval.json')))
  assert abs(ev['accuracy'] - summary['test_accuracy']) < 1e-6 and ev['examples'] == 30
  assert ev['class_names'][0] == 'Ankle boot' and len(ev['per_class_accuracy']) == 10
  assert np.array(ev['confusion']).sum() == 30 and np.trace(ev['confusion']) == round(
      30 * ev['accuracy'])
  assert os.path.isfile(os.path.join(teacher, 'confusion.png'))
  out = run_jkd('distill', '--config', os.path.join(CONFIGS, 'distill.py:tiny'),
                '--workdir', student, f'--config.data.dir={photos}',
                f'--config.teacher.workdir={teacher}', '--config.total_steps=4')
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.load(open(os.path.join(student, 'summary.json')))['steps'] == 4
  # Compressed too: int8 post-training quantization of the student (one step) and its export.
  int8 = str(tmp_path / 'int8')
  out = run_jkd('compress', '--config', os.path.join(CONFIGS, 'compress.py:tiny-ptq'),
                '--workdir', int8, f'--config.data.dir={photos}', f'--config.init_from={student}')
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.isfile(os.path.join(int8, 'export', 'manifest.json'))


def test_folder_configs():
  from jkd.config import load_config  # pylint: disable=g-import-not-at-top
  for spec in ('supervised.py', 'supervised.py:vit_s16', 'distill.py', 'distill.py:dkd',
               'distill.py:deit', 'compress.py:qat_kd', 'compress.py:prune50'):
    config = load_config(os.path.join(CONFIGS, spec))
    assert config.data.name == 'folder' and config.data.image_size == 224, spec
    assert config.data.worker_processes == -1 and config.data.eval_split == 'val'


def test_killed_run_resumes_bit_identically(tmp_path, photos):
  ref, killed = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  args = ['train', '--config', os.path.join(CONFIGS, 'supervised.py:tiny'),
          f'--config.data.dir={photos}', '--config.total_steps=20', '--config.checkpoint_every=2',
          '--config.log_every=2']
  assert run_jkd(*args, '--workdir', ref).returncode == 0
  # The killed run decodes in two Grain worker processes, the reference in its own process.
  proc = subprocess.Popen([sys.executable, '-m', 'jkd.cli', *args, '--workdir', killed,
                           '--config.data.worker_processes=2'], cwd=REPO,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'), start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, 'checkpoints', '6')):
      assert proc.poll() is None, 'run ended before it could be killed'
      assert time.time() < deadline
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the main process only: its workers must notice
    proc.wait()
    deadline = time.time() + 20
    while _session_alive(proc.pid) and time.time() < deadline:
      time.sleep(0.2)
    assert not _session_alive(proc.pid), 'worker processes outlived the killed run'
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert not os.path.exists(os.path.join(killed, 'summary.json')), 'was not interrupted'
  out = run_jkd(*args, '--workdir', killed)
  assert out.returncode == 0 and 'resumed' in out.stdout, out.stderr[-3000:]
  a, _ = load_arrays(ref)
  b, _ = load_arrays(killed)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_array_equal(x, y)


def _session_alive(sid: int) -> bool:
  """Whether any process of session `sid` is still running (zombies excluded)."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      stat = open(f'/proc/{pid}/stat').read()
    except OSError:
      continue
    fields = stat.rsplit(')', 1)[1].split()
    if fields[0] != 'Z' and int(fields[3]) == sid:  # state, ppid, pgrp, session
      return True
  return False


def test_per_class_report_for_any_dataset(tmp_path):
  from jkd import evaluate, figures  # pylint: disable=g-import-not-at-top
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]], np.float32)
  report = evaluate.per_class(confusion, ['cat', 'dog', 'fox'])
  assert report['per_class_accuracy'] == {'cat': 0.75, 'dog': None, 'fox': round(4 / 6, 6)}
  assert report['confusion'][2] == [2, 0, 4]
  # A run saved before class names were recorded: the labels' numbers.
  assert evaluate.per_class(confusion)['class_names'] == ['0', '1', '2']
  many = np.random.default_rng(0).integers(0, 5, (120, 120))  # colours only, no tick labels
  assert os.path.getsize(figures.save_confusion_matrix(
      str(tmp_path / 'c.png'), many, [str(i) for i in range(120)])) > 1000


# ---------------------------------------------------------------- files from outside (issue 29)


def _small_folder(root, classes=('a', 'b'), per_class=4, shade=0):
  """8x8 grayscale PNGs, a different value per (class, index, shade)."""
  for k, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      value = (shade * 97 + k * 40 + i * 9) % 256
      Image.fromarray(np.full((8, 8), value, np.uint8)).save(os.path.join(root, name, f'{i}.png'))
  return str(root)


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
  """A real 16-bit grayscale PNG (Pillow mode I;16): each pixel round(v / 257), where Pillow's
  convert used to make 99.5% of them 255."""
  values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
  path = tmp_path / 'wide.png'
  Image.fromarray(values).save(path)
  data = path.read_bytes()
  assert Image.open(io.BytesIO(data)).mode == 'I;16' and data[24] == 16  # IHDR bit depth
  expected = np.round(values / 257).astype(np.uint8)
  np.testing.assert_array_equal(jpeg.decode(data, 'L')[..., 0], expected)
  np.testing.assert_array_equal(jpeg.decode(data, 'RGB'), np.repeat(expected[..., None], 3, 2))
  crop = jpeg.decode_crop(data, (0, 0, 64, 64), (64, 64), 'L')
  np.testing.assert_array_equal(crop[..., 0], expected)
  assert jpeg.header(data) == (64, 64, True)


def test_pixel_cap_refuses_every_format_before_decoding(tmp_path):
  """A 40000x40000 JPEG header (700 bytes) and PNG / BMP headers claiming more than MAX_PIXELS
  are refused from the header; a FIFO is not read."""
  for fmt in ('JPEG', 'PNG', 'BMP', 'WEBP'):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    if fmt == 'JPEG':
      sof = data.find(b'\xff\xc0')
      data[sof + 5:sof + 9] = (40000).to_bytes(2, 'big') * 2
    elif fmt == 'PNG':
      import zlib  # pylint: disable=g-import-not-at-top
      data[16:24] = (40000).to_bytes(4, 'big') * 2  # IHDR width, height, and its CRC
      data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, 'big')
    elif fmt == 'BMP':
      data[18:26] = (40000).to_bytes(4, 'little') * 2
    else:
      continue  # WebP's header has 14-bit sides: at most 268 M pixels; decoded when it fits
    with pytest.raises(jpeg.ImageReadError, match='1,?600,?000,?000 pixels'):
      jpeg.decode(bytes(data))
  os.mkfifo(tmp_path / 'pipe.jpg')
  with pytest.raises(jpeg.ImageReadError, match='not a regular file'):
    jpeg.read_file(str(tmp_path / 'pipe.jpg'))


def test_lists_with_a_bom_and_links_reached_twice(tmp_path):
  root = _small_folder(tmp_path / 'p')
  (tmp_path / 'p' / 'bom.csv').write_text('path,label\na/0.png,a\na/1.png,a\nb/0.png,b\n'
                                          'b/1.png,b\n', encoding='utf-8-sig')
  idx = folder.index(_cfg(tmp_path / 'p' / 'bom.csv', holdout=0.0))
  assert idx.classes == ('a', 'b') and len(idx.splits['train'][0]) == 4
  # A second link to a file of the same class counts once; a hidden folder is skipped.
  os.symlink(os.path.join(root, 'a', '0.png'), os.path.join(root, 'a', 'again.png'))
  os.symlink(os.path.join(root, 'a'), os.path.join(root, 'b', '.hidden'))
  idx = folder.index(_cfg(root, holdout=0.0))
  assert len(idx.splits['train'][0]) == 8
  # Named classes fix the label order and may name classes the data lacks.
  idx = folder.index(_cfg(root, holdout=0.0, classes=('b', 'c', 'a')))
  assert idx.classes == ('b', 'c', 'a')
  labels = dict(zip(*idx.splits['train']))
  assert labels[os.path.join(root, 'a', '1.png')] == 2
  # A link out of the folder is refused unless asked for.
  other = _small_folder(tmp_path / 'other', classes=('c',))
  os.symlink(os.path.join(other, 'c'), os.path.join(root, 'c'))
  with pytest.raises(UserError, match='leads out of the dataset folder'):
    folder.index(_cfg(root, holdout=0.0))
  idx = folder.index(_cfg(root, holdout=0.0, follow_links_outside=True))
  assert idx.classes == ('a', 'b', 'c')


def _records(out):
  """{split: sorted (file_name, label, sha256 of the bytes)} of a prepared folder."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import hashlib  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = json.load(open(os.path.join(out, prepare.SUMMARY_FILE)))
  features = tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 1 if info['mode'] == 'L' else 3)),
      'label': tfds.features.ClassLabel(names=info['classes']),
      'file_name': tfds.features.Text()})
  found = {}
  for name in sorted(os.listdir(out)):
    if '.array_record-' not in name or '.tmp' in name:
      continue
    split = name.split('-')[1].split('.')[0]
    reader = array_record_module.ArrayRecordReader(os.path.join(out, name))
    for raw in reader.read_all():
      example = features.deserialize_example_np(raw, decoders={
          'image': tfds.decode.SkipDecoding()})
      found.setdefault(split, []).append((
          example['file_name'].decode(), int(example['label']),
          hashlib.sha256(example['image']).hexdigest()))
    reader.close()
  return {k: sorted(v) for k, v in found.items()}


def test_prepare_redoes_shards_whose_images_changed_and_follows_no_planted_link(tmp_path):
  """Replacing every image (same names) after a killed prepare, and after a complete one: the
  rerun packs the new bytes (it kept 40 old ones). Links planted at the names prepare writes
  (the state's old temporary name, the metadata) are replaced, never followed."""
  root = _small_folder(tmp_path / 'p', per_class=10)
  out = str(tmp_path / 'o')
  prepare.prepare(_cfg(root), out, shard_size=4, progress=False)
  old = _records(out)
  state = json.load(open(os.path.join(out, prepare.STATE_FILE)))
  del state['shards']['train']['1']  # as if killed while writing shard 1
  json.dump(state, open(os.path.join(out, prepare.STATE_FILE), 'w'))
  time.sleep(0.01)
  _small_folder(tmp_path / 'p', per_class=10, shade=1)  # every image replaced
  victim = tmp_path / 'victim.txt'
  victim.write_text('outside')
  for name in (prepare.STATE_FILE + '.tmp', 'dataset_info.json', prepare.SUMMARY_FILE):
    os.remove(os.path.join(out, name)) if os.path.lexists(os.path.join(out, name)) else None
    os.symlink(victim, os.path.join(out, name))
  prepare.prepare(_cfg(root), out, shard_size=4, progress=False)
  assert victim.read_text() == 'outside'
  assert not os.path.islink(os.path.join(out, 'dataset_info.json'))
  fresh = str(tmp_path / 'fresh')
  prepare.prepare(_cfg(root), fresh, shard_size=4, progress=False)
  new = _records(out)
  assert new == _records(fresh) and new != old
  # After a complete prepare too: one image replaced, its shard written again.
  time.sleep(0.01)
  Image.fromarray(np.full((8, 8), 3, np.uint8)).save(os.path.join(root, 'b', '3.png'))
  prepare.prepare(_cfg(root), out, shard_size=4, progress=False)
  shutil_rm(fresh)
  prepare.prepare(_cfg(root), fresh, shard_size=4, progress=False)
  assert _records(out) == _records(fresh)
  # Only the planted link is left of the temporary names (untouched: jkd never writes there).
  assert [f for f in os.listdir(out) if '.tmp' in f] == [prepare.STATE_FILE + '.tmp']
  assert victim.read_text() == 'outside'


def shutil_rm(path):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(path)


def test_prepare_into_a_locked_out_and_on_a_full_disk(tmp_path):
  """A second prepare into an --out that a running prepare holds exits 2 naming it; a full disk
  (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG) exits 2 with no partial file, and
  the same command then completes."""
  import resource  # pylint: disable=g-import-not-at-top
  from jkd import lock  # pylint: disable=g-import-not-at-top
  root = _small_folder(tmp_path / 'p', per_class=40)
  out = str(tmp_path / 'o')
  held = lock.WorkdirLock(out, 'jkd data prepare')
  held.acquire()
  try:
    run = run_jkd('data', 'prepare', '--dir', root, '--out', out, '--workers', '0')
  finally:
    held.release()
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert f'in use by jkd data prepare (pid {os.getpid()}' in ' '.join(run.stderr.split())

  def full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))
  argv = [sys.executable, '-m', 'jkd.cli', 'data', 'prepare', '--dir', root, '--out', out,
          '--workers', '0', '--shard-size', '10']
  run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                       preexec_fn=full_disk,
                       env=dict(os.environ, JAX_ENABLE_COMPILATION_CACHE='0'))
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert 'Cannot write to --out' in ' '.join(run.stderr.split())
  assert not [f for f in os.listdir(out) if '.tmp' in f]
  state = os.path.join(out, prepare.STATE_FILE)
  assert not os.path.exists(state) or isinstance(json.load(open(state)), dict)
  run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert sum(json.load(open(os.path.join(out, prepare.SUMMARY_FILE)))['num_examples'].values()) \
      == 80


def test_prepare_onto_a_read_only_file_system(tmp_path):
  """--out on a read-only mount (a bind mount remounted read-only, in a private mount
  namespace: needs `unshare -m` and the right to mount, else skipped): exit 2, nothing written
  and the earlier shards there untouched."""
  import shutil  # pylint: disable=g-import-not-at-top
  root = _small_folder(tmp_path / 'p', per_class=6)
  out = str(tmp_path / 'o')
  prepare.prepare(_cfg(root), out, shard_size=4, progress=False)
  os.remove(os.path.join(out, prepare.SUMMARY_FILE))  # as if killed before the metadata
  before = {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)}
  probe = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount --bind {out} {out}'],
                         capture_output=True) if shutil.which('unshare') else None
  if probe is None or probe.returncode != 0:
    pytest.skip('no private mount namespace here (unshare -m)')
  script = (f'mount --bind {out} {out} && mount -o remount,ro,bind {out} && exec '
            f'{sys.executable} -m jkd.cli data prepare --dir {root} --out {out} --workers 0 '
            '--shard-size 4')
  run = subprocess.run(['unshare', '-m', 'sh', '-c', script], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONUNBUFFERED='1'))
  assert run.returncode == 2 and 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert f'--out {out} is not writable' in ' '.join(run.stderr.split())
  assert {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)} == before
