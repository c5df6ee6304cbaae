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
import ml_collections

from jkd.bench import default_bench_config
from jkd.data import default_data_config
from jkd.defaults import base_config

MODEL = 'vit_b16'


def get_config(arg=None):
  c = base_config()
  c.bench = default_bench_config()
  c.data = default_data_config('synthetic')
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.model = ml_collections.ConfigDict(
      {'name': MODEL, 'dtype': 'bfloat16', 'attention': 'cudnn', 'pool': 'gap'})
  c.batch_size = 256
  c.total_steps = 10_000      # Sizes the lr schedule only.
  c.optim.name = 'adamw'      # As the timm reference: AdamW, no clipping, no label smoothing.
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  if arg in (None, '', 'gpu'):
    pass
  elif arg == 'tpu':
    c.model.attention = 'xla'
  elif arg in ('cpu', 'tiny'):
    c.data.image_size = 32
    c.batch_size = 8
    c.model.dtype = 'float32'
    c.model.attention = 'xla'
    c.bench.warmup_steps = 1
    c.bench.steps = 3
    c.bench.repeats = 3
    if arg == 'tiny':  # The test-suite size: the same blocks, fewer of them.
      c.model.depth = 2
  else:
    raise ValueError(f'unknown config arg {arg!r}; use gpu, tpu, cpu or tiny')
  return c
