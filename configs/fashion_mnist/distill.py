r"""Knowledge distillation on Fashion-MNIST: a small ResNet student from a trained teacher.

  jkd train   --config configs/fashion_mnist/supervised.py --workdir /tmp/teacher \
              --config.model.name=resnet20_s
  jkd distill --config configs/fashion_mnist/distill.py --workdir /tmp/kd \
              --config.teacher.workdir=/tmp/teacher

The loss is a weighted sum of named terms (`config.losses`); the default is mdistiller's KD
recipe (0.1 x CE + 0.9 x KD at T=4). Other recipes by name after the colon:
`:dkd`, `:dist`, `:fitnet`, `:at`, `:rkd`, `:kd_logit_std`, `:crd`, `:reviewkd`, `:ofa`,
`:tfkd` (each keeps a CE term), `:deit`, `:multi`, and `:tiny` / `:tiny-NAME` for the test
suite. Terms can be changed from the command line, e.g.
`--config.losses.kd.temperature=2`.

`:crd`, `:reviewkd`, `:ofa` are CRD, ReviewKD and OFA-KD with their trainable heads
(jkd/trainers/distill_heads.py); `:tfkd` is teacher-free KD (no --config.teacher.workdir needed).

`:multi` distils from two teachers at once (a CNN and a ViT; jkd/teachers.py): their logits
averaged with equal weights into the KD recipe's target.

  jkd distill --config configs/fashion_mnist/distill.py:multi --workdir /tmp/multi \
              --config.teachers.resnet.workdir=/tmp/teacher --config.teachers.vit.workdir=/tmp/vit

`:deit` is DeiT's hard distillation (Touvron et al. 2021): the student is a small ViT with a
distillation token (`vit_nano_p4`, pool='token', `model.distill_token=True`); 0.5 x CE on the
class head + 0.5 x deit_hard (CE to the teacher's argmax) on the distillation head; eval uses the
mean of both heads and also reports each head's accuracy.

  jkd distill --config configs/fashion_mnist/distill.py:deit --workdir /tmp/deit \
              --config.teacher.workdir=/tmp/teacher

Cached teacher (FKD / ReLabel; docs/distillation.md): with `--config.teacher.cache.dir=DIR` the
command first runs the teacher once over the run's exact batches, stores its top-k logits in DIR
(resumable; reused by any later run with the same data, seed, batch size and teacher) and then
distills without a teacher forward. Logit terms only.
"""
import ml_collections

from jkd.data import default_data_config
from jkd.defaults import base_config, parse_variant, shrink_for_tests

RECIPES = {
    'kd': {'ce': dict(weight=0.1), 'kd': dict(weight=0.9, temperature=4.0)},
    'dkd': {'ce': dict(weight=1.0), 'dkd': dict(weight=1.0, alpha=1.0, beta=8.0, temperature=4.0,
                                                warmup_steps=500)},
    'dist': {'ce': dict(weight=1.0), 'dist': dict(weight=1.0, beta=2.0, gamma=2.0,
                                                  temperature=4.0)},
    'kd_logit_std': {'ce': dict(weight=0.1), 'kd_logit_std': dict(weight=0.9, temperature=2.0)},
    'fitnet': {'ce': dict(weight=1.0), 'kd': dict(weight=1.0, temperature=4.0),
               'fitnet': dict(weight=1.0, student='stage2', teacher='stage2')},
    'at': {'ce': dict(weight=1.0), 'at': dict(weight=1000.0, student=('stage2', 'stage3'),
                                              teacher=('stage2', 'stage3'))},
    'rkd': {'ce': dict(weight=1.0), 'rkd': dict(weight=1.0)},
    'deit': {'ce': dict(weight=0.5), 'deit_hard': dict(weight=0.5)},
    # Two teachers (config.teachers below), their logits averaged: the KD recipe otherwise.
    'multi': {'ce': dict(weight=0.1), 'kd': dict(weight=0.9, temperature=4.0)},
    # mdistiller's CRD: CE + 0.8 x CRD (RepDistiller's -a 0 -b 0.8); 4096 negatives here (the
    # papers' 16384 on CIFAR-100's 50,000 images).
    'crd': {'ce': dict(weight=1.0), 'crd': dict(weight=0.8, nce_k=4096, student='pre_logits',
                                                teacher='pre_logits')},
    # mdistiller's ReviewKD: CE + ReviewKD (weight 1, ramped in as DKD's warmup).
    'reviewkd': {'ce': dict(weight=1.0), 'reviewkd': dict(
        weight=1.0, warmup_steps=500, student=('stage1', 'stage2', 'stage3', 'pre_logits'),
        teacher=('stage1', 'stage2', 'stage3', 'pre_logits'))},
    # OFA-KD (OFAKD's defaults: every stage and the logits, eps 1, all weights 1).
    'ofa': {'ce': dict(weight=1.0), 'ofa': dict(weight=1.0, eps=1.0,
                                                student=('stage1', 'stage2', 'stage3'))},
    # Teacher-free KD, Tf-KD_reg: no teacher at all (the authors' ResNet-18 CIFAR-100 setting:
    # alpha 0.1, multiplier 100, T 20 -> 0.9 CE + 10 x tf_kd).
    'tfkd': {'ce': dict(weight=0.9), 'tf_kd': dict(weight=10.0, correct_prob=0.99,
                                                  temperature=20.0)},
}
# `:multi`'s teachers: a CNN and a ViT, equal weights; set both workdirs.
MULTI_TEACHERS = {
    name: {'workdir': '', 'weight': 1.0, 'dtype': 'float32', 'taps': {}, 'ema': False}
    for name in ('resnet', 'vit')}
# A DeiT student: a ViT with the class token and the distillation token.
DEIT_MODEL = {'name': 'vit_nano_p4', 'dtype': 'float32', 'pool': 'token', 'distill_token': True}


def get_config(arg=None):
  tiny, recipe = parse_variant(arg, tuple(RECIPES), kind='recipe')
  c = base_config()
  c.data = default_data_config('fashion_mnist')
  c.model = ml_collections.ConfigDict({'name': 'resnet8_s', 'dtype': 'float32'})
  if recipe == 'deit':
    c.model = ml_collections.ConfigDict(DEIT_MODEL)
  c.teacher = ml_collections.ConfigDict({
      'workdir': '', 'dtype': 'float32',
      # Or a public checkpoint file (timm, DeiT, MAE...; imported into WORKDIR/imported_teacher
      # as `jkd import` does), with `model` naming the jkd model when the shapes do not say.
      'checkpoint': '', 'model': '', 'model_fields': {},
      # ema=True: the teacher's EMA weights (a run trained with --config.ema.decay > 0).
      'ema': False,
      # How the teachers of config.teachers meet the terms: 'average' or 'separate'.
      'combine': 'average',
      # dir='' distils from the online teacher; see jkd/trainers/teacher_cache.py.
      'cache': {'dir': '', 'topk': 10, 'dtype': 'float16', 'rest': 'smooth', 'shard_steps': 100},
  })
  # Several teachers instead of teacher.workdir (jkd/teachers.py): {name: {workdir, weight,
  # dtype, taps, ema}}, e.g. --config.teachers="{'a': {'workdir': 'runs/a'}, 'b': {...}}".
  c.teachers = ml_collections.ConfigDict(MULTI_TEACHERS if recipe == 'multi' else {})
  c.losses = ml_collections.ConfigDict(RECIPES[recipe])
  c.batch_size = 128
  c.num_epochs = 6.0
  # EMA of the weights (jkd/trainers/ema.py): decay > 0 keeps, evaluates and saves one.
  c.ema = ml_collections.ConfigDict({'decay': 0.0})
  c.optim.lr = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 200
  c.checkpoint_every = 1000
  c.log_every = 100
  if recipe == 'deit':  # DeiT's AdamW weight decay; a shorter schedule wants a higher lr.
    c.optim.lr, c.optim.weight_decay = 1e-3, 0.05
  if tiny:
    shrink_for_tests(c, total_steps=12, log_every=4, checkpoint_every=6, warmup_steps=2)
  return c
