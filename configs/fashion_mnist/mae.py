r"""MAE pretraining of a small ViT on Fashion-MNIST (28×28, patch 4: 49 patches, 12 kept).

  jkd pretrain --config configs/fashion_mnist/mae.py --workdir /tmp/fmnist_mae

Default: `vit_mini_p4` encoder (width 192, depth 6), decoder 128 × 2, mask ratio 0.75,
norm_pix loss, 20 epochs at batch 256, AdamW β=(0.9, 0.95), blr 1.5e-4 × batch/256 as MAE
(scaled up ×10 here: a small model on a small dataset trains faster at a higher rate).
Writes `reconstructions.png`. Then fine-tune the encoder:

  jkd train --config configs/fashion_mnist/finetune.py --workdir /tmp/fmnist_mae_ft \
    --config.init_from=/tmp/fmnist_mae

Measured on a shared 2-core CPU (~90 examples/s): 250 steps at batch 64
(`--config.total_steps=250 --config.batch_size=64 --config.optim.lr=6e-3
--config.optim.warmup_steps=25`) take 3m47s;
the norm-pix MSE on masked patches falls from 0.96 (step 25) to 0.585, eval 0.584 on
test[:1000], and the figure recovers the garments' outlines (trouser legs, sleeves) from 12
visible patches. The full default run (4,690 steps) is for a GPU or a long CPU session.
`:tiny` is the test-suite size (a few steps on 512 images).
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, shrink_for_tests


def get_config(arg=None):
  c = base_config()
  c.method = 'mae'
  c.data = default_data_config('fashion_mnist')
  c.data.crop_padding = 0       # MAE pretrains with crops; 28×28 digits-style images need none.
  c.model = ml_collections.ConfigDict({
      'name': 'vit_mini_p4', 'dtype': 'float32', 'decoder_width': 128, 'decoder_depth': 2,
      'decoder_heads': 4})
  c.mask_ratio = 0.75
  c.mask_patch_size = 0         # SimMIM only.
  c.norm_pix_loss = True
  c.num_figure_images = 8
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.num_epochs = 20.0
  c.optim.lr = 1.5e-3
  c.optim.lr_batch_base = 256
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 200
  c.optim.grad_clip = 0.0       # MAE does not clip.
  c.checkpoint_every = 1000
  c.log_every = 50
  if arg == 'tiny':
    c.model.name = 'vit_nano_p4'
    c.model.decoder_width = 64
    c.model.decoder_depth = 1
    c.model.decoder_heads = 2
    shrink_for_tests(c, total_steps=30, log_every=5, checkpoint_every=30, warmup_steps=3,
                     eval_examples=128)
    c.optim.lr = 2e-3
    c.optim.lr_batch_base = 0
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use tiny')
  return c
