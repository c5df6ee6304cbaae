r"""CIFAR-100 distillation as in mdistiller's tables: METHOD-PAIR.

  jkd distill --config configs/cifar100/distill.py:kd-res32x4_res8x4 \
              --workdir runs/c100/kd-res32x4_res8x4 --config.teacher.workdir=runs/c100/resnet32x4

METHOD: kd (0.1 CE + 0.9 KD, T 4), dkd (CE + DKD, alpha 1, beta 8 or 6, T 4, 20-epoch warmup),
crd (CE + 0.8 CRD, 16384 negatives), reviewkd (CE + ReviewKD on the teacher's pre-activation
maps, 20-epoch warmup), ofa (CE + OFA-KD on every stage, eps 1). PAIR (teacher_student) and the
top-1 printed in the DKD paper (Zhao et al., CVPR 2022, Tables 1-2; KD and DKD also in
mdistiller's README; CRD and ReviewKD as reported there) that each config should reach:

  pair                 teacher  student   KD     CRD    ReviewKD  DKD
  res56_res20           72.34    69.06   70.66  71.16   71.89    71.97
  res110_res32          74.31    71.14   73.08  73.48   73.89    74.11
  res32x4_res8x4        79.42    72.50   73.33  75.51   75.63    76.32
  wrn40_2_wrn16_2       75.61    73.26   74.92  75.48   76.12    76.24
  wrn40_2_wrn40_1       75.61    71.98   73.54  74.14   75.09    74.81
  vgg13_vgg8            74.64    70.36   72.98  73.94   74.84    74.68
  vgg13_mv2             74.64    64.60   67.37  69.73   70.37    69.71
  res32x4_shuv2         79.42    71.82   74.45  75.65   77.78    77.07

OFA-KD has no published number for these pairs (its CIFAR-100 results use ImageNet-style
teachers); `ofa-*` runs the same pairs for comparison. The teacher is a `jkd train --config
configs/cifar100/train.py:TEACHER` workdir (or an imported checkpoint); the recipe is
mdistiller's solver (train.py), only the loss differs. Not yet run in jkd (GPU jobs).
`:tiny-METHOD` is a few steps on synthetic data (the test suite).
"""
import importlib.util
import os

import ml_collections

from jkd.defaults import base_config

_spec = importlib.util.spec_from_file_location(
    'jkd_cifar100_train', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py'))
_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train)

PAIRS = {
    'res56_res20': ('resnet56', 'resnet20', 8.0),
    'res110_res32': ('resnet110', 'resnet32', 8.0),
    'res32x4_res8x4': ('resnet32x4', 'resnet8x4', 8.0),
    'wrn40_2_wrn16_2': ('wrn_40_2', 'wrn_16_2', 6.0),
    'wrn40_2_wrn40_1': ('wrn_40_2', 'wrn_40_1', 6.0),
    'vgg13_vgg8': ('vgg13', 'vgg8', 6.0),
    'vgg13_mv2': ('vgg13', 'mobilenetv2', 6.0),
    'res32x4_shuv2': ('resnet32x4', 'shufflenetv2', 8.0),
}
METHODS = ('kd', 'dkd', 'crd', 'reviewkd', 'ofa')
_EPOCH = 782  # steps of batch 64 in CIFAR-100's 50,000 training images
_PREACT = ('stage1_preact', 'stage2_preact', 'stage3_preact', 'pre_logits')


def losses(method: str, pair: str, student: str) -> dict:
  beta = PAIRS[pair][2]
  warmup = 20 * _EPOCH
  # mdistiller reads the teacher's pre-activation maps (MobileNetV2 has none: its feats).
  review_t = ('stage1', 'stage2', 'stage3', 'pre_logits') if student == 'mobilenetv2' else _PREACT
  return {
      'kd': {'ce': dict(weight=0.1), 'kd': dict(weight=0.9, temperature=4.0)},
      'dkd': {'ce': dict(weight=1.0), 'dkd': dict(weight=1.0, alpha=1.0, beta=beta,
                                                  temperature=4.0, warmup_steps=warmup)},
      'crd': {'ce': dict(weight=1.0), 'crd': dict(weight=0.8, nce_k=16384,
                                                  student='pre_logits', teacher='pre_logits')},
      'reviewkd': {'ce': dict(weight=1.0), 'reviewkd': dict(
          weight=5.0 if pair == 'res32x4_res8x4' else 1.0, warmup_steps=warmup,
          student=('stage1', 'stage2', 'stage3', 'pre_logits'), teacher=review_t)},
      'ofa': {'ce': dict(weight=1.0), 'ofa': dict(weight=1.0, eps=1.0,
                                                  student=('stage1', 'stage2', 'stage3'))},
  }[method]


def get_config(arg=None):
  arg = arg or 'kd-res32x4_res8x4'
  tiny = arg.startswith('tiny')
  if tiny:
    method, pair = (arg.split('-', 1)[1] if '-' in arg else 'kd'), 'res32x4_res8x4'
  else:
    method, _, pair = arg.partition('-')
  if method not in METHODS or pair not in PAIRS:
    raise ValueError(f'unknown recipe {arg!r}; use METHOD-PAIR with METHOD in '
                     f'{", ".join(METHODS)} and PAIR in {", ".join(PAIRS)} (or tiny-METHOD)')
  teacher, student, _ = PAIRS[pair]
  c = _train.mdistiller_recipe(base_config(), student, tiny)
  c.teacher = ml_collections.ConfigDict({
      'workdir': '', 'checkpoint': '', 'model': '', 'model_fields': {}, 'dtype': 'float32',
      'ema': False, 'combine': 'average',
      'cache': {'dir': '', 'topk': 10, 'dtype': 'float16', 'rest': 'smooth', 'shard_steps': 100}})
  c.teachers = ml_collections.ConfigDict()
  c.losses = ml_collections.ConfigDict(losses(method, pair, student))
  if tiny:
    for term in c.losses.values():
      if 'warmup_steps' in term:
        term.warmup_steps = 0
      if 'nce_k' in term:
        term.nce_k = 64
  c.pair = ml_collections.ConfigDict({'teacher': teacher, 'student': student})
  return c
