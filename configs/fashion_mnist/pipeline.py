r"""Multi-stage distillation on Fashion-MNIST, one command: `jkd pipeline`.

  jkd pipeline --config configs/fashion_mnist/pipeline.py --workdir runs/takd        # :ta
  jkd pipeline --config configs/fashion_mnist/pipeline.py:hint --workdir runs/hint

`:ta` (default), teacher -> teacher assistant -> student (TAKD, Mirzadeh et al. 2020): a
resnet20_s teacher trained from scratch, distilled into a resnet8_s assistant, which is
distilled into a half-width resnet8_s student (`model.width=8`, about a quarter of its
parameters). Every distillation is mdistiller's KD recipe (0.1 CE + 0.9 KD, T = 4).

`:hint`, a FitNets-style hint pre-stage then KD (Romero et al. 2015): the resnet8_s student first
learns to match the teacher's stage-2 features (FitNet term, a 1x1 projector the trainer adds),
then starts from those weights (`init_from`; the projector is dropped) for KD.

Each stage is a workdir WORKDIR/NAME; rerunning the command skips finished stages and resumes
the unfinished one. `pipeline.json` gathers the stages' accuracies, sizes and times. Change a
stage from the command line (its overrides are replaced as a whole), e.g.
--config.stages.student.overrides="('model.width=8', 'num_epochs=3')", or start from a teacher
you already have: --config.stages.assistant.teacher=runs/my_teacher
--config.order="('assistant', 'student')". `:tiny` / `:tiny-hint`: the test-suite size.

`:born_again` is self-distillation (Born-Again Networks, Furlanello et al. 2018; Tf-KD_self,
Yuan et al. 2020): a resnet8_s trained with labels teaches a resnet8_s of the same shape, which
teaches the next generation. `:ema_teacher` trains the resnet8_s keeping an EMA of its weights
(`ema.decay=0.999`), then distils a fresh resnet8_s from that EMA (`teacher.ema=true`).

Measured on the 2-core CPU, one seed (docs/results.md): `:ta` teacher 90.27% (6m57s),
assistant 84.35% (2m23s), student 77.58% (1m07s); `:hint` student 86.36% (hint 2m23s + KD
2m19s). At these lengths KD does not beat training the 19,810-parameter student from scratch
(82.20%); the hint stage helps the resnet8_s student (+2.0 points over KD alone).
"""
import ml_collections

from jkd.defaults import parse_variant
from jkd.pipeline import stage

VARIANTS = ('ta', 'hint', 'born_again', 'ema_teacher')


def get_config(arg=None):
  tiny, variant = parse_variant(arg, VARIANTS)
  size = ':tiny' if tiny else ''
  # CPU-sized epochs (2 cores). No augmentation in the distillation stages either, as in the
  # teacher's supervised.py: runs of an epoch or two learn faster without it (measured:
  # docs/results.md).
  steps = ('total_steps=8',) if tiny else ()
  teacher_len = steps or ('num_epochs=2',)
  student_len = ('data.crop_padding=0', 'data.flip=false') + (steps or ('num_epochs=1',))
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = stage('train', f'fashion_mnist/supervised.py{size}',
                           ('model.name=resnet20_s',) + teacher_len)
  if variant == 'ta':
    c.order = ('teacher', 'assistant', 'student')
    c.stages.assistant = stage('distill', f'fashion_mnist/distill.py{size}', student_len,
                               teacher='teacher')
    c.stages.student = stage('distill', f'fashion_mnist/distill.py{size}',
                             ('model.width=8',) + student_len, teacher='assistant')
  elif variant in ('born_again', 'ema_teacher'):
    ema = variant == 'ema_teacher'
    c.stages.teacher = stage('train', f'fashion_mnist/supervised.py{size}',
                             teacher_len + (('ema.decay=0.999',) if ema else ()))
    c.stages.gen1 = stage('distill', f'fashion_mnist/distill.py{size}',
                          student_len + (('teacher.ema=true',) if ema else ()), teacher='teacher')
    c.order = ('teacher', 'gen1')
    if not ema:
      c.stages.gen2 = stage('distill', f'fashion_mnist/distill.py{size}', student_len,
                            teacher='gen1')
      c.order = ('teacher', 'gen1', 'gen2')
  else:
    c.order = ('teacher', 'hint', 'student')
    recipe = 'tiny-fitnet' if tiny else 'fitnet'
    c.stages.hint = stage('distill', f'fashion_mnist/distill.py:{recipe}',
                          ('losses.ce.weight=0.0', 'losses.kd.weight=0.0') + student_len,
                          teacher='teacher')
    c.stages.student = stage('distill', f'fashion_mnist/distill.py{size}', student_len,
                             init_from='hint', teacher='teacher')
  return c
