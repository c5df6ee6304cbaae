r"""Bench: one MAE ViT-B/16 pretraining step (configs/imagenet/mae_vit_b16.py's model, mask and
optimizer) on synthetic data, global batch 256, bf16, cuDNN attention on GPU.

  jkd bench --config configs/bench/mae_vit_b16.py --workdir /tmp/bench_mae_b16
  jkd bench --config configs/bench/vit_b16.py --workdir /tmp/bench_sup_b16   # supervised, same batch

Compare `examples_per_sec` with the supervised ViT-B/16 bench (same batch): the issue asks how
much cheaper per example masked pretraining is. `:tpu` uses XLA attention; `:cpu` is a small
CPU check (32×32, batch 8, float32) and `:tiny` the test-suite size (2 blocks).
"""
import os

from jkd.bench import mim_bench_config

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'imagenet',
                      'mae_vit_b16.py')


def get_config(arg=None):
  return mim_bench_config(RECIPE, arg)
