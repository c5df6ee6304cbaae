"""Tests of jkd.data: IDX reading, determinism, resume, sharding, padding, TFDS, augmentation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import data
from jkd.data import augment
from jkd.data import sources
from jkd.errors import UserError


def _fmnist(**overrides):
  cfg = data.default_data_config('fashion_mnist')
  cfg.num_workers = 0
  cfg.update(overrides)
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _train(cfg, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return data.make_train_iterator(cfg, **kwargs)


# ---------------------------------------------------------------- sources


def test_fashion_mnist_idx_files():
  images, labels = data.load_fashion_mnist('train')
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.int32
  assert set(np.unique(labels)) == set(range(10))
  assert abs(images.mean() / 255 - 0.2860) < 0.002
  test_images, test_labels = data.load_fashion_mnist('test')
  assert test_images.shape == (10000, 28, 28, 1) and test_labels.shape == (10000,)
  assert np.bincount(test_labels).tolist() == [1000] * 10


def test_split_slicing():
  sizes = {'train': 60000, 'test': 10000}
  assert sources.parse_split('train[:50000]', sizes) == ('train', slice(0, 50000))
  assert sources.parse_split('train[50000:]', sizes) == ('train', slice(50000, 60000))
  assert sources.parse_split('test[10%:20%]', sizes) == ('test', slice(1000, 2000))
  assert sources.parse_split('train[-100:]', sizes) == ('train', slice(59900, 60000))
  with pytest.raises(UserError, match='Unknown split'):
    sources.parse_split('validation', sizes)
  head, _ = data.load_fashion_mnist('train[:100]')
  full, _ = data.load_fashion_mnist('train')
  np.testing.assert_array_equal(head, full[:100])


def test_get_info():
  info = data.get_info(_fmnist(train_split='train[:50000]', eval_split='train[50000:]'))
  assert info.num_examples == {'train[:50000]': 50000, 'train[50000:]': 10000}
  assert info.num_classes == 10 and info.image_shape == (28, 28, 1)
  assert info.mean == (0.2860,) and info.std == (0.3530,)


def test_missing_fashion_mnist_is_user_error(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'FASHION_MNIST_DIRS', ())
  monkeypatch.delenv(sources.FASHION_MNIST_ENV, raising=False)
  with pytest.raises(UserError) as info:
    data.get_info(_fmnist(data_dir=str(tmp_path)))
  message = str(info.value)
  assert str(tmp_path) in message and '\n' not in message
  for hint in ('apt-get install dataset-fashion-mnist', 'zalandoresearch/fashion-mnist',
               '--config.data.data_dir=DIR', 'tfds build fashion_mnist'):
    assert hint in message


def test_unprepared_tfds_dataset_is_user_error(tmp_path):
  with pytest.raises(UserError, match=r"tfds build cifar10 .*pip install 'jkd\[tf\]'"):
    _train(_cifar(tmp_path), global_batch_size=8, seed=0)


def _cifar(data_dir, **overrides):
  cfg = data.default_data_config('cifar10')
  cfg.data_dir = str(data_dir)
  cfg.num_workers = 0
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------- train iterator


def test_train_batches_shapes_and_determinism():
  cfg = _fmnist()
  first = _take(_train(cfg, global_batch_size=64, seed=1), 3)
  assert first[0]['image'].shape == (64, 28, 28, 1) and first[0]['image'].dtype == np.uint8
  assert first[0]['label'].shape == (64,) and first[0]['label'].dtype == np.int32
  _assert_batches_equal(first, _take(_train(cfg, global_batch_size=64, seed=1), 3))
  other = _take(_train(cfg, global_batch_size=64, seed=2), 3)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


def test_train_does_not_depend_on_reader_threads():
  batches = [_take(_train(_fmnist(num_workers=n), global_batch_size=32, seed=0), 4)
             for n in (0, 3)]
  _assert_batches_equal(*batches)


def test_train_resume_across_epochs():
  # 'train[:100]' with batch 32: 3 batches an epoch (4 examples dropped), so batches 5..7
  # cross from epoch 1 into epoch 2.
  cfg = _fmnist(train_split='train[:100]')
  iterator = _train(cfg, global_batch_size=32, seed=0)
  epochs = _take(iterator, 6)
  state = json.loads(json.dumps(iterator.get_state()))
  assert state['next_batch'] == 6
  expected = _take(iterator, 3)
  resumed = _train(cfg, global_batch_size=32, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 3))
  # Each epoch is a fresh shuffle: 96 distinct examples, in another order than epoch 0.
  labels = [np.concatenate([b['label'] for b in epochs[i:i + 3]]) for i in (0, 3)]
  assert not np.array_equal(labels[0], labels[1])
  assert all(np.bincount(l, minlength=10).sum() == 96 for l in labels)


def test_resume_with_other_settings_is_user_error():
  cfg = _fmnist(train_split='train[:100]')
  state = _train(cfg, global_batch_size=32, seed=0).get_state()
  with pytest.raises(UserError, match='seed'):
    _train(cfg, global_batch_size=32, seed=1).set_state(state)


def test_train_process_shards_are_disjoint_slices_of_the_global_batch():
  cfg = _fmnist(train_split='train[:1000]')
  whole = _take(_train(cfg, global_batch_size=64, seed=3), 2)
  shards = [_take(_train(cfg, global_batch_size=64, seed=3, process_index=p, process_count=2), 2)
            for p in range(2)]
  for step in range(2):
    assert shards[0][step]['image'].shape == (32, 28, 28, 1)
    # Augmentation draws depend on the row of the global batch, so even augmented images agree.
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[step][key])
  with pytest.raises(UserError, match='multiple of the number of processes'):
    _train(cfg, global_batch_size=63, seed=0, process_index=0, process_count=2)


def test_train_augmentation_changes_images_not_order():
  plain = _take(_train(_fmnist(crop_padding=0, flip=False), global_batch_size=64, seed=0), 1)[0]
  augmented = _take(_train(_fmnist(crop_padding=2, flip=True), global_batch_size=64, seed=0), 1)[0]
  np.testing.assert_array_equal(plain['label'], augmented['label'])
  assert augmented['image'].shape == plain['image'].shape
  assert augmented['image'].dtype == np.uint8
  differs = (augmented['image'] != plain['image']).any(axis=(1, 2, 3))
  assert 0.5 < differs.mean() <= 1.0


# ---------------------------------------------------------------- eval iterator


def test_eval_covers_split_once_with_padding_mask():
  cfg = _fmnist()
  batches = list(data.make_eval_iterator(cfg, 'test[:1000]', global_batch_size=384,
                                         process_index=0, process_count=1))
  assert len(batches) == 3
  assert all(b['image'].shape == (384, 28, 28, 1) and b['mask'].dtype == np.float32
             for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 1000 and mask[:1000].all()
  images, labels = data.load_fashion_mnist('test[:1000]')
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:1000], labels)
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in batches])[:1000], images)
  assert not batches[-1]['image'][mask[768:] == 0].any()


def test_eval_process_shards_union_is_the_global_batch():
  cfg = _fmnist()
  whole = list(data.make_eval_iterator(cfg, 'test[:900]', global_batch_size=384,
                                       process_index=0, process_count=1))
  shards = [data.make_eval_iterator(cfg, 'test[:900]', global_batch_size=384,
                                    process_index=p, process_count=2) for p in range(2)]
  assert [len(s) for s in shards] == [3, 3]
  shards = [list(s) for s in shards]
  for step, batch in enumerate(whole):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([shards[0][step][key], shards[1][step][key]]), batch[key])
  # The last global batch holds rows 768..1151: process 1's rows (960..) are all padding.
  assert shards[1][2]['mask'].sum() == 0 and shards[0][2]['mask'].sum() == 900 - 768


# ---------------------------------------------------------------- TFDS (mocked, no TensorFlow)


def test_tfds_mock_cifar10(tmp_path):
  # tfds.testing.mock_data patches tfds.data_source too and needs no TensorFlow: with no
  # metadata files in tmp_path it falls back to the builder code (MockPolicy.AUTO -> USE_CODE)
  # for the features and generates random examples per index.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=48):
    cfg = _cifar(tmp_path)
    info = data.get_info(cfg)
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    assert info.num_examples == {'train': 48, 'test': 48} and len(info.mean) == 3
    iterator = _train(cfg, global_batch_size=16, seed=0)
    batch = next(iterator)
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32
    assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
    resized = next(_train(_cifar(tmp_path, image_size=40), global_batch_size=16, seed=0))
    assert resized['image'].shape == (16, 40, 40, 3)
    evals = list(data.make_eval_iterator(cfg, global_batch_size=20, process_index=0,
                                         process_count=1))
    assert len(evals) == 3 and sum(b['mask'].sum() for b in evals) == 48


def test_tfds_mock_variable_size_images(tmp_path):
  # imagenet-like: images of varying size get a random-resized crop (train) and a center crop
  # (eval) to image_size.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=8):
    cfg = data.default_data_config('imagenet2012')
    cfg.update(data_dir=str(tmp_path), num_workers=0, image_size=64)
    train = next(_train(cfg, global_batch_size=4, seed=0))
    assert train['image'].shape == (4, 64, 64, 3)
    evals = list(data.make_eval_iterator(cfg, global_batch_size=4, process_index=0,
                                         process_count=1))
    assert evals[0]['image'].shape == (4, 64, 64, 3)
    # The crop's area range is a config field (MAE: (0.2, 1); SimMIM: (0.67, 1)); bad ranges
    # are user errors.
    cfg.update(crop_scale=(0.2, 1.0), crop_ratio=(1.0, 1.0))
    assert next(_train(cfg, global_batch_size=4, seed=0))['image'].shape == (4, 64, 64, 3)
    cfg.update(crop_scale=(0.5, 0.2))
    with pytest.raises(UserError, match='crop_scale'):
      _train(cfg, global_batch_size=4, seed=0)


def test_random_resized_crop_scale_bounds_the_area():
  image = np.arange(40 * 40 * 1, dtype=np.uint8).reshape(40, 40, 1)
  whole = augment.random_resized_crop(image, np.random.default_rng(0), 40, (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_array_equal(whole, image)  # area 1 and ratio 1: the image itself


# ---------------------------------------------------------------- synthetic


def test_synthetic():
  iterator = data.synthetic_batches(global_batch_size=8, image_shape=(32, 32, 3), num_classes=5,
                                    process_count=1)
  a, b = next(iterator), next(iterator)
  assert a['image'].shape == (8, 32, 32, 3) and a['label'].dtype == np.int32
  np.testing.assert_array_equal(a['image'], b['image'])
  assert iterator.get_state() == {}
  iterator.set_state({})
  cfg = data.default_data_config('synthetic')
  cfg.num_examples, cfg.num_workers = 64, 0
  assert next(_train(cfg, global_batch_size=16, seed=0))['image'].shape == (16, 32, 32, 3)
  assert data.get_info(cfg).num_examples == {'train': 64, 'test': 10000}


# ---------------------------------------------------------------- augmentation ops


def test_crop_and_flip_batch():
  images = np.random.default_rng(0).integers(1, 256, (4, 8, 8, 1), dtype=np.uint8)
  zero = np.zeros((4, 2), np.int64)
  np.testing.assert_array_equal(augment.crop_batch(images, zero, 2), images)
  shifted = augment.crop_batch(images, np.array([[1, 0], [0, -2], [2, 2], [0, 0]]), 2)
  assert shifted.shape == images.shape and shifted.dtype == np.uint8
  np.testing.assert_array_equal(shifted[0, :-1], images[0, 1:])  # moved up by one row
  assert not shifted[0, -1].any()  # filled with zeros
  np.testing.assert_array_equal(shifted[1, :, 2:], images[1, :, :-2])
  np.testing.assert_array_equal(shifted[3], images[3])
  flipped = augment.flip_batch(images, np.array([True, False, True, False]))
  np.testing.assert_array_equal(flipped[0], images[0, :, ::-1])
  np.testing.assert_array_equal(flipped[1], images[1])


def test_host_resize_crops():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
  assert augment.random_resized_crop(image, rng, 24).shape == (24, 24, 3)
  assert augment.center_crop(image, 24).shape == (24, 24, 3)
  gray = rng.integers(0, 256, (10, 12, 1), dtype=np.uint8)
  assert augment.resize(gray, 20, 16).shape == (20, 16, 1)


def test_normalize():
  images = jnp.array([[[[0], [255]]]], jnp.uint8)  # [1, 1, 2, 1]
  out = data.normalize(images, (0.5,), (0.25,), dtype=jnp.bfloat16)
  assert out.shape == images.shape and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32).ravel(), [-2.0, 2.0])


@pytest.mark.parametrize('mix', [data.mixup, data.cutmix])
def test_mixup_and_cutmix(mix):
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  mixed, mixed_labels = jax.jit(mix, static_argnums=3)(jax.random.key(1), images, labels, 0.8)
  assert mixed.shape == images.shape and mixed_labels.shape == labels.shape
  np.testing.assert_allclose(mixed_labels.sum(-1), 1.0, rtol=1e-6)
  # Row i mixes i with 7 - i: lam is the weight left on its own label, the same for all rows.
  lam = mixed_labels[jnp.arange(8), jnp.arange(8) % 4]
  assert ((lam >= 0) & (lam <= 1)).all() and jnp.allclose(lam, lam[0])
  if mix is data.mixup:
    np.testing.assert_allclose(mixed, lam[0] * images + (1 - lam[0]) * images[::-1], atol=1e-5)
  same, same_labels = mix(jax.random.key(1), images, labels, 0.0)
  assert same is images and same_labels is labels


def test_encoded_dataset_images_are_capped_before_decoding():
  """TFDS-style encoded image bytes go through the folder reader's pixel cap: a PNG whose header
  claims 40000x40000 is refused from its header, not decoded into 4.8 GB."""
  import io
  import struct
  import zlib
  from PIL import Image
  from jkd.data import augment, jpeg
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((4, 5), np.uint8)).save(buffer, 'PNG')
  assert augment.decode(buffer.getvalue()).shape == (4, 5, 3)
  bomb = bytearray(buffer.getvalue())
  bomb[16:24] = struct.pack('>II', 40000, 40000)  # IHDR width, height; then its CRC
  bomb[29:33] = struct.pack('>I', zlib.crc32(bytes(bomb[12:29])))
  with pytest.raises(jpeg.ImageReadError, match='178,956,970'):
    augment.decode(bytes(bomb))
