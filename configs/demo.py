r"""`jkd demo`: the whole pipeline at small scale on Fashion-MNIST, from nothing.

  jkd demo --workdir runs/demo                        # default: sized for a 2-core CPU
  jkd demo --workdir runs/demo --config configs/demo.py:full   # the GPU-size run
  jkd demo --workdir runs/demo --config configs/demo.py:fast   # seconds: a smoke test

Stages (each its own workdir under WORKDIR, resumable, skipped once finished):
1. pretrain          MAE pretraining of a small ViT (the teacher's encoder)
2. teacher           fine-tune that encoder with a classifier head
3. student_scratch   a small ResNet trained from scratch
4. student_kd        the same ResNet distilled from the teacher (0.1 CE + 0.9 KD)
5. student_compressed  the KD student pruned 50% + int8 QAT with KD, exported as integers
Writes report.json, report.md and PNG figures (reconstructions, training curves, accuracy vs
size). Any stage's config can be changed with --config.stages.NAME.overrides="(...)". The
stages run through `jkd.pipeline` (see `jkd pipeline` for pipelines of your own).
"""
import importlib.util

import ml_collections

from jkd import cpu_budget
from jkd.pipeline import stage

SCALES = ('cpu', 'fast', 'full')


def get_config(arg=None):
  scale = arg or 'cpu'
  if scale not in SCALES:
    raise ValueError(f'unknown scale {scale!r}; use one of {", ".join(SCALES)}')
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.seed = 0
  # ConfigDict does not keep key order: the stages run in this order.
  c.order = ('pretrain', 'teacher', 'student_scratch', 'student_kd', 'student_compressed')
  # The compressed student ends as a deployable file: static int8 ONNX, evaluated and timed in
  # ONNX Runtime (report.md), when the deploy extra is installed (pip install 'jkd[deploy]').
  deploy = (("deploy.formats=('onnx',)", 'deploy.float32=false', 'deploy.calibration_batches=4')
            if importlib.util.find_spec('onnxruntime') and importlib.util.find_spec('jax2onnx')
            else ())
  if scale == 'fast':
    student_steps = ('total_steps=8',)
    c.stages = ml_collections.ConfigDict(dict(
        pretrain=stage('pretrain', 'fashion_mnist/mae.py:tiny', ('total_steps=8',)),
        teacher=stage('train', 'fashion_mnist/finetune.py:tiny', ('total_steps=8',),
                      init_from='pretrain'),
        student_scratch=stage('train', 'fashion_mnist/supervised.py:tiny', student_steps),
        student_kd=stage('distill', 'fashion_mnist/distill.py:tiny', student_steps,
                         teacher='teacher'),
        student_compressed=stage('compress', 'fashion_mnist/compress.py:tiny-qat_kd',
                                 ('total_steps=6', 'prune.enabled=true') + deploy,
                                 init_from='student_kd', teacher='teacher'),
    ))
    return c
  # CPU: 0.5 + 4.4 + 1.3 + 1.3 + 1.1 minutes on 2 cores (8m49s in all, docs/results.md; about
  # 11 minutes on a loaded machine). The teacher is `vit_micro_p7` (16 tokens of 7×7 pixels,
  # 1,350-1,700 examples/s here): in a fixed CPU budget a small ViT gains more from epochs
  # than from width or tokens (measured from scratch: 2 epochs give 85.5-86.0% at widths
  # 64-192 and patch 7, 84.2% after 1 epoch at patch 4; 6 epochs at width 64 give 88.4%; after
  # this MAE pretraining 6 epochs give 88.2%, 7 give 88.6-88.7%).
  # Short runs learn faster without augmentation; the scratch and KD students see exactly the
  # same data.
  # The CPU recipes live in jkd.cpu_budget, which the CPU-scale result tables share.
  cpu = scale == 'cpu'
  c.stages = ml_collections.ConfigDict(dict(
      pretrain=stage('pretrain', 'fashion_mnist/mae.py',
                     cpu_budget.MIM_PRETRAIN + cpu_budget.MAE_DECODER if cpu else ()),
      teacher=stage('train', 'fashion_mnist/finetune.py',
                    cpu_budget.FINETUNE + ('num_epochs=8',) if cpu else (),
                    init_from='pretrain'),
      student_scratch=stage('train', 'fashion_mnist/supervised.py',
                            ('num_epochs=0.7',) if cpu else ('model.name=resnet8_s',)),
      student_kd=stage('distill', 'fashion_mnist/distill.py',
                       # The scratch student's batch, lr and warmup: only the loss differs.
                       cpu_budget.STUDENT if cpu else (),
                       teacher='teacher'),
      student_compressed=stage('compress', 'fashion_mnist/compress.py:qat_kd',
                               cpu_budget.NO_AUG + ('num_epochs=0.3', 'prune.enabled=true',
                                                    'log_every=20') + deploy if cpu
                               else ('prune.enabled=true',) + deploy,
                               init_from='student_kd', teacher='teacher'),
  ))
  return c
