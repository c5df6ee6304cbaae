r"""Benchmark: one int8 quantization-aware-training step of ViT-S/16 (`jkd compress`'s step) at
ImageNet size, on synthetic data: the issue's "QAT int8 ViT-S/16" row.

  jkd bench --config configs/bench/qat_vit_s16.py --workdir /tmp/bench_qat_vit_s16
  jkd bench --config configs/bench/vit_s16.py --workdir /tmp/bench_vit_s16   # not quantized

The step is `configs/bench/vit_s16.py`'s (224×224×3, 1000 classes, global batch 256, bf16
compute with fp32 parameters, cuDNN fused attention over 196 tokens, pooled head, AdamW) with
Qwix quantization-aware training as `jkd compress` runs it (the default of
`configs/fashion_mnist/compress.py`): every conv and dense layer (patch embedding, q/k/v, attention
output, MLP, head) quantizes its weights to int8 symmetric per output channel and its input
activations to int8 symmetric with a dynamic absmax scale (per token for dense layers, per example
for the patch-embedding conv), multiplies in int8 and trains the
float weights through straight-through gradients. No pruning, no teacher. The weights are random:
`config.init_from` matters to what `jkd compress` learns, not to what its step costs. On GPU the
attention's own two matmuls run in bf16 inside the cuDNN kernel, which Qwix does not intercept
(as PyTorch QAT of `nn.Linear` layers leaves `scaled_dot_product_attention` alone); with XLA
attention (`:tpu`, `:cpu`) Qwix quantizes them too (q·kᵀ and probabilities·v in int8).
Compare `examples_per_sec` with `configs/bench/vit_s16.py` (the same model and batch, not
quantized): the difference is what QAT costs in training; int8 pays off in the exported model.
The PyTorch reference for the same step is `benchmarks/timm_reference.py --model qat_vit_s16`.

`:tpu` uses XLA attention (cuDNN is NVIDIA-only). `:cpu` is a functional check of the full
model on CPU (under a minute on 2 cores, mostly compilation): 32×32 images (4 tokens), batch
8, float32, XLA attention. `:tiny` is `:cpu` with 2 blocks instead of 12, the test-suite size
(seconds). Overrides time variants, e.g. `--config.prune.enabled=True` (QAT plus gradual
magnitude pruning) or `--config.quant.enabled=False` (the compress step in float).
"""
import ml_collections

from jkd.bench import imagenet_bench_config

MODEL = 'vit_s16'


def get_config(arg=None):
  c = imagenet_bench_config(
      {'name': MODEL, 'dtype': 'bfloat16', 'attention': 'cudnn', 'pool': 'gap'}, arg)
  c.bench.job = 'compress'
  # `jkd compress`'s two groups, as in configs/fashion_mnist/compress.py with QAT on.
  c.quant = ml_collections.ConfigDict(dict(
      enabled=True, mode='qat', weight_bits=8, act_bits=8, module_path='.*'))
  c.prune = ml_collections.ConfigDict(dict(
      enabled=False, target_sparsity=0.5, schedule='cubic', scope='global', n_m=None,
      begin_step=0, end_step=0, update_every=10))
  if arg in ('tpu', 'cpu', 'tiny'):
    c.model.attention = 'xla'   # cuDNN is NVIDIA-only.
  if arg == 'tiny':             # The test-suite size: the same blocks, fewer of them.
    c.model.depth = 2
  return c
