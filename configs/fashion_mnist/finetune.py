r"""Fine-tune a MIM-pretrained ViT encoder (MAE or SimMIM) as a Fashion-MNIST classifier.

  jkd pretrain --config configs/fashion_mnist/mae.py --workdir /tmp/fmnist_mae
  jkd train --config configs/fashion_mnist/finetune.py --workdir /tmp/fmnist_ft \
    --config.init_from=/tmp/fmnist_mae

The ViT (`vit_mini_p4`, fixed sin-cos positions, global average pool, fresh zero head) takes
the pretrained 'patch_embed' and 'encoder' weights by name (`common.load_init_from`, which
skips the decoder and mask tokens). Recipe after MAE's fine-tuning: AdamW, layer-wise lr decay
0.75, drop path 0.1, label smoothing 0.1, 10 epochs. Without `init_from` it trains the same ViT
from scratch (the baseline). `:tiny` is the test-suite size. The model fields must match the
pretraining config's encoder (name, posemb).
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, shrink_for_tests


def get_config(arg=None):
  c = base_config()
  c.data = default_data_config('fashion_mnist')
  c.model = ml_collections.ConfigDict({'name': 'vit_mini_p4', 'dtype': 'float32',
                                       'posemb': 'sincos2d_mae', 'drop_path': 0.1})
  c.batch_size = 128
  c.num_epochs = 10.0
  c.optim.lr = 1e-3
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 300
  c.optim.layer_decay = 0.75    # Layer-wise lr decay (jkd.optim.layerwise_lr_scales); 0 = off.
  c.label_smoothing = 0.1
  c.checkpoint_every = 1000
  # EMA of the weights (jkd/trainers/ema.py): decay > 0 keeps, evaluates and saves one.
  c.ema = ml_collections.ConfigDict({'decay': 0.0})
  c.log_every = 100
  c.init_from = ''              # The pretraining workdir.
  c.init_prefix = ()            # MIM models keep the encoder at the top level.
  if arg == 'tiny':
    c.model.name = 'vit_nano_p4'
    c.model.drop_path = 0.0
    shrink_for_tests(c, total_steps=6, log_every=3, checkpoint_every=6, warmup_steps=2,
                     eval_examples=128)
  elif arg:
    raise ValueError(f'unknown config arg {arg!r}; use tiny')
  return c
