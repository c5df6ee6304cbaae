r"""MAE ViT-B/16 pretraining on ImageNet-1k, the paper's recipe (He et al. 2022, Table 8/A.1).

  jkd pretrain --config configs/imagenet/mae_vit_b16.py --workdir $W \
    --config.data.data_dir=$TFDS_DIR

800 epochs (`:1600` for 1600), global batch 4096, AdamW β=(0.9, 0.95), weight decay 0.05, base
lr 1.5e-4 × batch/256 (= 2.4e-3), 40 warmup epochs then cosine, mask ratio 0.75, norm_pix
loss, decoder 512 wide × 8 blocks × 16 heads, no class token (global-pool fine-tuning), bf16
compute, cuDNN attention (the 49 kept tokens are padded to 56 inside the model). The paper
reaches 83.6% (800 ep) / 83.6% top-1 after fine-tuning ViT-B (1600 ep: 83.6, linear probe 68.0)
with 100 fine-tuning epochs, on 64 V100s / TPU-v3 pods.

Augmentation: RandomResizedCrop with area scale (0.2, 1.0) (MAE's) + horizontal flip.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  epochs = {None: 800, '': 800, '800': 800, '1600': 1600}
  if arg not in epochs:
    raise ValueError(f'unknown config arg {arg!r}; use 800 or 1600')
  c = base_config()
  c.method = 'mae'
  c.data = default_data_config('imagenet2012')
  c.data.image_size = 224
  c.data.inception_crop = True
  c.data.crop_scale = (0.2, 1.0)
  c.data.flip = True
  c.data.num_workers = 32
  c.model = ml_collections.ConfigDict({
      'name': 'vit_b16', 'dtype': 'bfloat16', 'attention': 'cudnn', 'decoder_width': 512,
      'decoder_depth': 8, 'decoder_heads': 16})
  c.mask_ratio = 0.75
  c.mask_patch_size = 0
  c.norm_pix_loss = True
  c.num_figure_images = 8
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.num_epochs = float(epochs[arg])
  c.optim.name = 'adamw'
  c.optim.lr = 1.5e-4
  c.optim.lr_batch_base = 256
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 40 * IMAGENET_TRAIN // c.batch_size
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.0
  c.optim.grad_clip = 0.0
  c.log_every = 100
  c.checkpoint_every = 2000
  c.mesh.data = -1
  return c
