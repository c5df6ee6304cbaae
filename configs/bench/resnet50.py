r"""Benchmark: ResNet-50 supervised train step at ImageNet size, on synthetic data.

  jkd bench --config configs/bench/resnet50.py --workdir /tmp/bench_resnet50

Measures the throughput (img/s), step time, MFU against the device's dense bf16 peak, XLA's
FLOPs per image and the peak device memory of one full train step (forward, backward with
BatchNorm statistics, AdamW update) of ResNet-50 at 224×224×3, 1000 classes, global batch 256,
bf16 compute with fp32 parameters, NHWC layout (what channels-last is in PyTorch). The batch
stays on the device, so the host input pipeline is not measured. The PyTorch/timm reference for
the same step is `benchmarks/timm_reference.py --model resnet50`; the issue quotes timm
(channels-last) at 5,670 img/s on the lent H100.

`:cpu` is a functional check of the full model on CPU (about a minute on 2 cores, mostly
compilation): 32×32 images, batch 8, float32 (a jitted bf16 ResNet gives NaN on XLA's CPU
backend in jax 0.12). `:tiny` is `:cpu` with one bottleneck block per stage instead of
(3, 4, 6, 3), the test-suite size (seconds).
"""
import ml_collections

from jkd.bench import default_bench_config
from jkd.data import default_data_config
from jkd.defaults import base_config

MODEL = 'resnet50'


def get_config(arg=None):
  c = base_config()
  c.bench = default_bench_config()
  c.data = default_data_config('synthetic')
  c.data.image_size = 224
  c.data.num_classes = 1000
  c.model = ml_collections.ConfigDict({'name': MODEL, 'dtype': 'bfloat16'})
  c.batch_size = 256
  c.total_steps = 10_000      # Sizes the lr schedule only.
  c.optim.name = 'adamw'      # As the timm reference: AdamW, no clipping, no label smoothing.
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  if arg in (None, '', 'gpu', 'tpu'):
    pass
  elif arg in ('cpu', 'tiny'):
    c.data.image_size = 32
    c.batch_size = 8
    c.model.dtype = 'float32'
    c.bench.warmup_steps = 1
    c.bench.steps = 3
    c.bench.repeats = 3
    if arg == 'tiny':  # The test-suite size: the same blocks, one per stage.
      c.model.stage_sizes = (1, 1, 1, 1)
  else:
    raise ValueError(f'unknown config arg {arg!r}; use gpu, tpu, cpu or tiny')
  return c
