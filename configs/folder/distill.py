r"""Distill a teacher trained on your images into a small student, on the same folder.

  jkd train   --config configs/folder/supervised.py --workdir runs/teacher \
              --config.data.dir=~/photos --config.model.name=resnet50
  jkd distill --config configs/folder/distill.py --workdir runs/student \
              --config.data.dir=~/photos --config.teacher.workdir=runs/teacher

The recipes are those of configs/fashion_mnist/distill.py (default KD: 0.1 x CE + 0.9 x KD at
T=4; `:dkd`, `:dist`, `:fitnet`, `:at`, `:rkd`, `:kd_logit_std`, `:deit`), with the folder's
data (224x224, random-resized crop + flip, one decoding process per core) and a ResNet-18
student in bf16; `:tiny` / `:tiny-NAME` are the test-suite size. The teacher must have been
trained on the same image size and classes (any `jkd train` or `jkd import` workdir).
"""
import os

import ml_collections

from jkd.config import load_config

RECIPES = os.path.join(os.path.dirname(__file__), '..', 'fashion_mnist', 'distill.py')


def get_config(arg=None):
  tiny = bool(arg) and arg.startswith('tiny')
  c = load_config(RECIPES + (f':{arg}' if arg else ''))
  supervised = load_config(os.path.join(os.path.dirname(__file__), 'supervised.py') +
                           (':tiny' if tiny else ''))
  c.data = supervised.data
  if c.model.name == 'resnet8_s':  # every recipe but DeiT's ViT student
    c.model = ml_collections.ConfigDict(supervised.model)
  c.batch_size, c.eval_batch_size = supervised.batch_size, supervised.eval_batch_size
  if not tiny:
    c.num_epochs = 30.0
    c.teacher.dtype = 'bfloat16'
  return c
