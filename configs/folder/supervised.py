r"""Train a classifier on your own images: a folder of class folders, split folders or a list.

  jkd train --config configs/folder/supervised.py --workdir runs/photos \
    --config.data.dir=~/photos      # ~/photos/<class>/*.jpg, or ~/photos/train/<class>/ + val/
  jkd eval --workdir runs/photos    # accuracy per class and runs/photos/confusion.png

Fine-tune a public checkpoint instead of starting from scratch (the usual case for a few
thousand photos): `jkd import --checkpoint resnet50.safetensors --workdir runs/r50`, then add
`--config.init_from=runs/r50 --config.model.name=resnet50` (its head is replaced; ImageNet's
mean/std are the folder default for colour images, as imported models expect).

Default: ResNet-18 at 224x224, bf16, AdamW 1e-3 + cosine, 30 epochs of batch 128, random-resized
crop + flip (ImageNet's train transform, decoded by `jkd.data.jpeg` at the size the crop needs,
resized by OpenCV; `--config.data.train_resize=pillow` for torchvision's pixels)
and resize + center crop for eval (Pillow's bilinear, as torchvision), decoding in one Grain worker process per core. Without split
folders, 10% of each class is held out as 'val' (`config.data.holdout`). `jkd data prepare`
packs the folder into ArrayRecord shards first if you like (same batches, one file per shard).
`:vit_s16` is ViT-S/16 (DeiT-S recipe: AdamW 5e-4 x batch/512, wd 0.05, drop path 0.1, mixup
0.8); `:tiny` the test-suite size (28x28 images, a few steps, no worker processes).
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.data = default_data_config('folder')   # image_size 224, crop + flip, eval split 'val'
  c.data.worker_processes = -1             # one decoding process per core
  c.model = ml_collections.ConfigDict({'name': 'resnet18', 'dtype': 'bfloat16'})
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 30.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 500
  c.label_smoothing = 0.1
  c.checkpoint_every = 1000
  c.log_every = 50
  if arg == 'vit_s16':
    c.model = ml_collections.ConfigDict({'name': 'vit_s16', 'dtype': 'bfloat16',
                                         'drop_path': 0.1})
    c.optim.lr = 5e-4 * c.batch_size / 512
    c.mixup_alpha = 0.8
  elif arg == 'tiny':
    tiny(c)
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use vit_s16 or tiny')
  return c


def tiny(c):
  """The test-suite size: 28x28 images (Fashion-MNIST written as files), a small ResNet."""
  c.data.image_size = 28
  c.data.worker_processes = 0
  c.data.num_workers = 0
  c.model = ml_collections.ConfigDict({'name': 'resnet8_s', 'dtype': 'float32'})
  c.batch_size = 32
  c.eval_batch_size = 64
  c.total_steps = 8
  c.log_every = 4
  c.checkpoint_every = 4
  c.optim.warmup_steps = 2
  c.label_smoothing = 0.0
  return c
