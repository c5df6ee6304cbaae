r"""Prune and/or quantize (int8 QAT) a model trained on your images, then export it.

  jkd compress --config configs/folder/compress.py:qat_kd --workdir runs/int8 \
               --config.data.dir=~/photos --config.init_from=runs/student \
               --config.teacher.workdir=runs/teacher
  jkd eval     --workdir runs/int8 --export      # the exported integer model

The variants are those of configs/fashion_mnist/compress.py (`qat`, `ptq`, `prune50`,
`prune24`, `qat_kd`; `:tiny` / `:tiny-NAME` for the test suite) with the folder's data and a
ResNet-18 (set `--config.model.name` to the model of `init_from`).
"""
import os

import ml_collections

from jkd.config import load_config

VARIANTS = os.path.join(os.path.dirname(__file__), '..', 'fashion_mnist', 'compress.py')


def get_config(arg=None):
  tiny = bool(arg) and arg.startswith('tiny')
  c = load_config(VARIANTS + (f':{arg}' if arg else ''))
  supervised = load_config(os.path.join(os.path.dirname(__file__), 'supervised.py') +
                           (':tiny' if tiny else ''))
  c.data = supervised.data
  c.model = ml_collections.ConfigDict(supervised.model)
  c.batch_size, c.eval_batch_size = supervised.batch_size, supervised.eval_batch_size
  if not tiny and not c.total_steps:  # a folder is smaller than Fashion-MNIST: more epochs
    c.num_epochs = 10.0 if c.prune.enabled else 5.0
  return c
