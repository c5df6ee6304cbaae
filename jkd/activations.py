"""Activation bytes of ViT training steps, from the model's fields: what autodiff keeps for the
backward pass per device (`vit_activation_bytes` for classifiers and distillation students,
`mim_activation_bytes` for SimMIM/MAE pretraining), remat included. `jkd.memory` adds the
parameters, optimizer state and teacher to make `jkd plan`'s estimate; tests/test_memory.py
checks these formulas against `jax.ad_checkpoint.print_saved_residuals` and XLA.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def vit_activation_bytes(model: nn.Module, image_shape: Sequence[int], local_batch: int,
                         tensor: int = 1, *, train: bool = True) -> int | None:
  """Activation bytes of a ViT on one device; None for other models (not modelled).

  L tokens, width D, MLP width F, H heads of d channels (A = H·d, = D unless the model sets
  `head_dim`: a head-pruned student), compute itemsize b, local batch B = global /
  (data×fsdp); heads and MLP columns split over the `tensor` size t (Megatron), the residual
  stream not. Training keeps, per example, exactly what jax's autodiff saves for the backward
  pass (equal to `jax.ad_checkpoint.print_saved_residuals`, tests/test_memory.py):

    per block   2·((12 + b)·L·D + 16·L)     two LayerNorms: x², x − mean, normalised x (fp32),
                                            the output (b bytes), four fp32 per-token statistics
              + 4b·L·A / t                  q, k, v and the attention output
              + (4 + b')·H·L² / t           attention='xla': the fp32 softmax output and,
                                            below fp32, its b-byte cast (b' = b if b < 4
                                            else 0); 'cudnn'
                                            (flash attention) keeps only the log-sum-exp,
                                            4·H·L / t (not checked here: needs a GPU)
              + 4b·L·F / t                  fc1 output, GELU's scaled input, erfc and output
    per example b·H·W·C + 12·L·D + 16·L + 4·D·k   normalised images (the patch conv's input),
                                            the final LayerNorm, k pooled features (k = 2 with a
                                            distillation token)
    train = B · (depth · block + per example)

  With activation checkpointing (`remat`, `jkd.models.vit.REMAT_POLICIES`) a block keeps less,
  and the backward pass recomputes one block at a time, holding that block's residuals:
    remat='full'  kept  b·L·D                    the block's input
    remat='dots'  kept  b·L·D + (b·L·(3A + D) + b·L·F) / t   input, q, k, v, the attention's
                                            output projection, fc1 (not fc2: the residual add
                                            does not need it)
    train = B · (depth · kept + (block − kept) + per example)

  Inference (a frozen teacher keeps nothing): the peak working set of one block, as XLA holds
  it on CPU (logits, exp and probabilities at once; fc1 output, erf and GELU output at once):
    B · max(b·L·(2D + 4A/t) + ((8 + b)·H·L² + 8·H·L)/t,  b·L·(2D + 3F/t))  (cuDNN: no L² term)

  The loss's own residuals (≤ 8 bytes per class and example) are left out.
  """
  if not all(hasattr(model, f) for f in ('width', 'depth', 'num_heads', 'patch_size')):
    return None
  h, w, c = image_shape
  k = 1 + bool(getattr(model, 'distill_token', False))
  n = (h // model.patch_size) * (w // model.patch_size) + (model.pool == 'token') + (k - 1)
  d, f, heads = model.width, model.mlp_dim or 4 * model.width, model.num_heads
  a = heads * (getattr(model, 'head_dim', None) or d // heads)
  b = jnp.dtype(model.dtype).itemsize
  t_heads = tensor if heads % tensor == 0 else 1  # The rules drop axes that do not divide.
  t_mlp = tensor if f % tensor == 0 else 1
  flash = model.attention == 'cudnn'
  if train:
    blocks = sum(_blocks_train_bytes(n, d, f, heads, b, model.depth,
                                     getattr(model, 'remat', 'none'), flash, tensor, a))
    per_example = blocks + b * h * w * c + 12 * n * d + 16 * n + 4 * d * k
  else:
    probs = 4 * heads * n if flash else (8 + b) * heads * n * n + 8 * heads * n
    per_example = max(b * n * (2 * d + 4 * a / t_heads) + probs / t_heads,
                      b * n * (2 * d + 3 * f / t_mlp))
  return int(local_batch * per_example)


def _blocks_train_bytes(n: int, d: int, f: int, heads: int, b: int, depth: int, remat: str,
                        flash: bool, tensor: int, a: int | None = None) -> tuple[float, float]:
  """Per example: (what `depth` pre-LN blocks on n tokens keep for the backward pass, what
  recomputing one of them adds while it runs: 0 without remat); `vit_activation_bytes`'s
  per-block terms. `a`: the heads' total width H·d (default d)."""
  a = d if a is None else a
  if not depth:
    return 0, 0
  t_heads = tensor if heads % tensor == 0 else 1  # The rules drop axes that do not divide.
  t_mlp = tensor if f % tensor == 0 else 1
  # jax.nn.softmax keeps only its fp32 output; below fp32 the b-byte probabilities too.
  probs = 4 * heads * n if flash else (4 + (b if b < 4 else 0)) * heads * n * n
  block = (2 * ((12 + b) * n * d + 16 * n) + (4 * b * n * a + probs) / t_heads
           + 4 * b * n * f / t_mlp)
  kept = {'none': block, 'full': b * n * d,
          'dots': b * n * d + b * n * (3 * a + d) / t_heads + b * n * f / t_mlp}[remat]
  return depth * kept, block - kept


def mim_activation_bytes(model: nn.Module, method: str, mask_ratio: float,
                         image_shape: Sequence[int], local_batch: int, tensor: int = 1) -> int:
  """Activation bytes of a SimMIM or MAE pretraining step on one device (`jkd pretrain`).

  The blocks as in `vit_activation_bytes` (remat included), on the tokens each part sees:

    MAE     encoder blocks on n = int(L·(1 − ratio)) [+ 1 class token] kept tokens (padded to
            `pad_tokens_to`, 8 with cuDNN), (12 + b)·n·D + 16·n its final LayerNorm feeding
            the decoder; decoder blocks (width Dd, MLP Fd) on L [+ 1] tokens, 12·L·Dd + 16·L
            their LayerNorm, 4·L·Dd its fp32 output into the prediction, 4·L·(p²C + 1) the
            norm-pix MSE, 4·(n + L) the gather and unshuffle indices;
    SimMIM  encoder blocks on all L tokens, 12·L·D + 16·L the final LayerNorm and 4·L·D its
            output cast to fp32 for the decoder, 2b·L the mask-token mix, H·W·C bytes (L1's
            sign) + 4·H·W (pixel mask) in the loss;
    both    b·H·W·C normalised images (the patch convolution's input);  × local batch B.

  With remat, the kept bytes of each block plus the larger of one encoder or one decoder
  block's recomputation; XLA then also holds the backward's working set, which this leaves out
  (its temporaries ran 1.2-1.4x this figure on CPU for configs/fashion_mnist/mae.py). Without remat, equal to `jax.ad_checkpoint.print_saved_residuals` of
  the pretraining loss at the sizes the tests try (tests/test_memory.py); cuDNN's flash attention is modelled as in
  `vit_activation_bytes` (not checked here: needs a GPU).
  """
  h, w, c = image_shape
  p, d, heads, b = model.patch_size, model.width, model.num_heads, jnp.dtype(model.dtype).itemsize
  f, remat, flash = model.mlp_dim or 4 * d, getattr(model, 'remat', 'none'), (
      model.attention == 'cudnn')
  num = (h // p) * (w // p)
  per_example = b * h * w * c
  if method == 'simmim':
    per_example += (sum(_blocks_train_bytes(num, d, f, heads, b, model.depth, remat, flash,
                                            tensor))
                    + 16 * num * d + 16 * num + 2 * b * num + h * w * c + 4 * h * w)
  else:
    keep = int(num * (1 - mask_ratio))
    cls = int(bool(model.cls_token))
    multiple = model.pad_tokens_to or (8 if flash else 1)
    n_enc = -(-(keep + cls) // multiple) * multiple
    n_dec = -(-(num + cls) // (8 if flash else 1)) * (8 if flash else 1)
    dd, fd = model.decoder_width, model.decoder_mlp_dim or 4 * model.decoder_width
    enc_kept, enc_recompute = _blocks_train_bytes(n_enc, d, f, heads, b, model.depth, remat,
                                                  flash, tensor)
    dec_kept, dec_recompute = _blocks_train_bytes(n_dec, dd, fd, model.decoder_heads, b,
                                                  model.decoder_depth, remat, flash, tensor)
    per_example += (
        enc_kept + dec_kept + max(enc_recompute, dec_recompute)  # One block recomputes at once.
        + (12 + b) * n_enc * d + 16 * n_enc
        + 12 * n_dec * dd + 16 * n_dec + 4 * num * dd + 4 * num * (p * p * c + 1)
        + 4 * (keep + num))
  return int(local_batch * per_example)
