r"""Benchmark: one KD step, ViT-B/16 teacher (frozen, inference) -> ViT-S/16 student, at
ImageNet size on synthetic data: the issue's "KD ViT-B/16 -> ViT-S/16" row.

  jkd bench --config configs/bench/kd_vit_b16_s16.py --workdir /tmp/bench_kd_b16_s16

The student step is `configs/bench/vit_s16.py`'s (batch 256, bf16, cuDNN attention, pooled
head) plus the teacher's forward and the loss 0.1 x CE + 0.9 x KD (T=4), exactly as `jkd distill`
jits it. The teacher is `config.teacher.model` with zero weights (its cost is what is timed);
`--config.teacher.workdir=DIR` times a real teacher instead. `:tpu` uses XLA attention; `:cpu` is
a small CPU check and `:tiny` the test-suite size (2-block student, ViT-Ti/16 teacher).
Compare with a cached teacher: `docs/distillation.md`.
"""
import ml_collections

from jkd.bench import imagenet_bench_config


def get_config(arg=None):
  c = imagenet_bench_config(
      {'name': 'vit_s16', 'dtype': 'bfloat16', 'attention': 'cudnn', 'pool': 'gap'}, arg)
  c.bench.job = 'distill'
  c.teacher = ml_collections.ConfigDict({'workdir': '', 'model': 'vit_b16', 'dtype': ''})
  c.losses = ml_collections.ConfigDict({'ce': dict(weight=0.1),
                                        'kd': dict(weight=0.9, temperature=4.0)})
  if arg in ('tpu', 'cpu', 'tiny'):
    c.model.attention = 'xla'   # cuDNN is NVIDIA-only.
  if arg == 'tiny':
    c.model.depth = 2
    c.teacher.model = 'vit_ti16'
  return c
