r"""Benchmark: ViT-B/16 supervised train step at ImageNet size, on synthetic data.

  jkd bench --config configs/bench/vit_b16.py --workdir /tmp/bench_vit_b16

Measures the throughput (img/s), step time, MFU against the device's dense bf16 peak, XLA's
FLOPs per image and the peak device memory of one full train step (forward, backward, AdamW
update) of ViT-B/16 at 224×224×3, 1000 classes, global batch 256, bf16 compute with fp32
parameters, cuDNN fused attention over 196 tokens (global-average-pooled head, no class token).
The batch stays on the device, so the host input pipeline is not measured. The PyTorch/timm
reference for the same step is `benchmarks/timm_reference.py --model vit_b16`; the issue quotes
timm at 3,270 img/s on the lent H100.

`:tpu` uses XLA attention (cuDNN is NVIDIA-only). `:cpu` is a functional check of the full
model on CPU (about a minute on 2 cores, mostly compilation): 32×32 images (4 tokens), batch 8,
float32, XLA attention — XLA's CPU bf16 is emulated, so fp32 is the meaningful CPU dtype.
`:tiny` is `:cpu` with 2 blocks instead of 12, the test-suite size (seconds).
"""
from jkd.bench import imagenet_bench_config

MODEL = 'vit_b16'


def get_config(arg=None):
  c = imagenet_bench_config(
      {'name': MODEL, 'dtype': 'bfloat16', 'attention': 'cudnn', 'pool': 'gap'}, arg)
  if arg in ('tpu', 'cpu', 'tiny'):
    c.model.attention = 'xla'   # cuDNN is NVIDIA-only.
  if arg == 'tiny':             # The test-suite size: the same blocks, fewer of them.
    c.model.depth = 2
  return c
