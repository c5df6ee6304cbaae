r"""SimMIM pretraining of a small ViT on Fashion-MNIST (28×28, patch 4).

  jkd pretrain --config configs/fashion_mnist/simmim.py --workdir /tmp/fmnist_simmim

Default: `vit_mini_p4` encoder (width 192, depth 6), masking blocks of 4×4 pixels (one patch;
28 is not a multiple of 8, and 14-pixel blocks would hide half a garment each), mask ratio 0.6,
L1 loss on masked pixels, one-layer pixel-shuffle decoder, 20 epochs at batch 256, AdamW
β=(0.9, 0.999), base lr 8e-4 × batch/512 as SimMIM (scaled up ×2.5 for the small model).
Writes `reconstructions.png`. Fine-tune with configs/fashion_mnist/finetune.py
(`--config.init_from=/tmp/fmnist_simmim`).

Measured on a shared 2-core CPU (~36 examples/s: every token goes through the encoder, 2.6x
MAE's cost): 250 steps at batch 64 (`--config.total_steps=250 --config.batch_size=64
--config.optim.lr=8e-3 --config.optim.warmup_steps=25`) take 7m56s; the L1 on masked pixels
falls from 0.92 (step 25) to 0.41, eval 0.412 on test[:1000], and the figure fills masked
patches with the garment's shape and brightness. `:tiny` is the test-suite size.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, shrink_for_tests


def get_config(arg=None):
  c = base_config()
  c.method = 'simmim'
  c.data = default_data_config('fashion_mnist')
  c.data.crop_padding = 0
  # Fixed sin-cos positions so that one fine-tune config serves both methods (SimMIM's ViT
  # uses a relative position bias, which jkd's ViT does not have).
  c.model = ml_collections.ConfigDict({'name': 'vit_mini_p4', 'dtype': 'float32',
                                       'posemb': 'sincos2d_mae'})
  c.mask_ratio = 0.6
  c.mask_patch_size = 4
  c.norm_pix_loss = False       # MAE only.
  c.num_figure_images = 8
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.num_epochs = 20.0
  c.optim.lr = 2e-3
  c.optim.lr_batch_base = 512
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 200
  c.optim.grad_clip = 5.0       # SimMIM clips at 5.
  c.checkpoint_every = 1000
  c.log_every = 50
  if arg == 'tiny':
    c.model.name = 'vit_nano_p4'
    shrink_for_tests(c, total_steps=30, log_every=5, checkpoint_every=30, warmup_steps=3,
                     eval_examples=128)
    c.optim.lr = 2e-3
    c.optim.lr_batch_base = 0
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use tiny')
  return c
