r"""SimMIM ViT-B/16 pretraining on ImageNet-1k, the paper's ViT recipe (Xie et al. 2022).

  jkd pretrain --config configs/imagenet/simmim_vit_b16.py --workdir $W \
    --config.data.data_dir=$TFDS_DIR

800 epochs at 192×192 (12×12 patches), global batch 2048, AdamW β=(0.9, 0.999), weight
decay 0.05, base lr 8e-4 × batch/512 (SimMIM scales by the total batch / 512: 3.2e-3),
10 warmup epochs then cosine (min lr 5e-7/8e-4 of peak), gradient clipping 5.0, masking
blocks of 32×32 pixels at ratio 0.6, L1 on masked pixels, one-layer pixel-shuffle decoder.
The paper reaches 83.8% top-1 after 100 epochs of fine-tuning at 224.

Differences from the paper: jkd's ViT has no relative position bias (the paper's ViT uses a
shared RPB); this uses fixed 2-D sin-cos positions instead. Augmentation: RandomResizedCrop
with the paper's scale (0.67, 1.0) and ratio (3/4, 4/3), + flip.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown config arg {arg!r}; this config takes none')
  c = base_config()
  c.method = 'simmim'
  c.data = default_data_config('imagenet2012')
  c.data.image_size = 192
  c.data.inception_crop = True
  c.data.crop_scale = (0.67, 1.0)
  c.data.flip = True
  c.data.num_workers = 32
  c.model = ml_collections.ConfigDict({
      'name': 'vit_b16', 'dtype': 'bfloat16', 'attention': 'cudnn', 'posemb': 'sincos2d_mae',
      'drop_path': 0.1})
  c.mask_ratio = 0.6
  c.mask_patch_size = 32
  c.norm_pix_loss = False
  c.num_figure_images = 8
  c.batch_size = 2048
  c.eval_batch_size = 1024
  c.num_epochs = 800.0
  c.optim.name = 'adamw'
  c.optim.lr = 8e-4
  c.optim.lr_batch_base = 512
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 10 * IMAGENET_TRAIN // c.batch_size
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 5e-7 / 8e-4
  c.optim.grad_clip = 5.0
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data = -1
  return c
