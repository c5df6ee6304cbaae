r"""CIFAR-100 teachers and baseline students of the distillation tables (mdistiller's recipe).

  jkd train --config configs/cifar100/train.py:resnet32x4 --workdir runs/c100/resnet32x4
  jkd train --config configs/cifar100/train.py:resnet8x4  --workdir runs/c100/resnet8x4

The argument is a model of the CIFAR zoo (jkd/models/cifar.py): resnet56, resnet110,
resnet32x4, wrn_40_2, vgg13 (teachers); resnet20, resnet32, resnet8x4, wrn_16_2, wrn_40_1,
vgg8, mobilenetv2, shufflenetv2 (students). Recipe of mdistiller's `vanilla.yaml` (the CRD
paper's): 240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2 and
ShuffleNetV2), x0.1 at epochs 150, 180 and 210, weight decay 5e-4, random crop (4 px padding)
and flip. Differences: jkd decays conv and dense kernels only (not BatchNorm and biases, as
torch's SGD does), and lets warmup be 0 as mdistiller.

Published top-1 (CRD paper, Tian et al. 2020, Table 1; DKD paper, Zhao et al. 2022) it should
reach: resnet56 72.34, resnet110 74.31, resnet32x4 79.42, wrn_40_2 75.61, vgg13 74.64;
resnet20 69.06, resnet32 71.14, resnet8x4 72.50, wrn_16_2 73.26, wrn_40_1 71.98, vgg8 70.36,
mobilenetv2 64.60, shufflenetv2 71.82. Not yet run in jkd (a GPU job: ~240 epochs x 782
steps; see benchmarks/results_tables.py for the Fashion-MNIST tables that have run).

Data: TFDS `cifar100`, prepared once where there is internet and TensorFlow
(`pip install 'jkd[tf]'` then `python -c "import tensorflow_datasets as tfds;
tfds.builder('cifar100').download_and_prepare()"`), read with --config.data.data_dir=DIR.
`:tiny-NAME` is a few steps on synthetic 32x32x3 data with 100 classes (the test suite).
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config

TEACHERS = ('resnet56', 'resnet110', 'resnet32x4', 'wrn_40_2', 'vgg13')
STUDENTS = ('resnet20', 'resnet32', 'resnet8x4', 'wrn_16_2', 'wrn_40_1', 'vgg8', 'mobilenetv2',
            'shufflenetv2')
# The students mdistiller trains at lr 0.01.
LOW_LR = ('mobilenetv2', 'shufflenetv2')


def mdistiller_recipe(c: ml_collections.ConfigDict, model: str, tiny: bool
                      ) -> ml_collections.ConfigDict:
  """mdistiller's CIFAR-100 solver on config `c` (shared with configs/cifar100/distill.py)."""
  c.data = default_data_config('cifar100')
  c.model = ml_collections.ConfigDict({'name': model, 'dtype': 'float32'})
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 240.0
  c.optim.name = 'sgd'
  c.optim.lr = 0.01 if model in LOW_LR else 0.05
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.grad_clip = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = 'step'
  c.optim.decay_at = (150 / 240, 180 / 240, 210 / 240)
  c.optim.decay_rate = 0.1
  c.ema = ml_collections.ConfigDict({'decay': 0.0})
  c.checkpoint_every = 5000
  c.log_every = 200
  c.eval_every = 7820  # every 10 epochs
  if tiny:
    c.data = default_data_config('synthetic')
    c.data.num_classes, c.data.image_size = 100, 32
    c.data.num_examples, c.data.num_eval_examples = 256, 128
    c.batch_size, c.eval_batch_size = 16, 64
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 4, 2, 2, 0
  return c


def get_config(arg=None):
  arg = arg or 'resnet8x4'
  tiny = arg.startswith('tiny')
  model = arg.split('-', 1)[1] if tiny and '-' in arg else ('resnet8x4' if tiny else arg)
  if model not in TEACHERS + STUDENTS:
    raise ValueError(f'unknown model {model!r}; use one of {", ".join(TEACHERS + STUDENTS)} '
                     '(or tiny-NAME)')
  return mdistiller_recipe(base_config(), model, tiny)
