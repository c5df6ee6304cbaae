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
from jkd.bench import imagenet_bench_config

MODEL = 'resnet50'


def get_config(arg=None):
  c = imagenet_bench_config({'name': MODEL, 'dtype': 'bfloat16'}, arg)
  if arg == 'tiny':  # The test-suite size: the same blocks, one per stage.
    c.model.stage_sizes = (1, 1, 1, 1)
  return c
