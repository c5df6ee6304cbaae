"""Times every jkd.losses loss, jitted, at realistic sizes.

Run: `python benchmarks/bench_losses.py [--repeats 5] [--scale 1.0]`.

Each loss is timed forward only and as `value_and_grad` with respect to the
student input (what a train step pays), as the median over `--repeats` runs
after one warm-up (compile) run. For scale, a ViT-S/16 MLP block's two
matmuls at batch 256, `(B, 196, 384) x (384, 1536) x (1536, 384)`, are timed
the same way. `--scale` multiplies every batch size (use 0.25 on a laptop).
Prints a markdown table.
"""
import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from jkd import losses


def _normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, dtype)


def _mask(key, shape, ratio):
  return (jax.random.uniform(key, shape) < ratio).astype(jnp.float32)


def _cases(scale):
  """(name, size, fn, args) with the student input first."""
  keys = iter(jax.random.split(jax.random.key(0), 64))
  n = lambda b: max(2, int(b * scale))  # noqa: E731
  b_logit, classes = n(1024), 1000
  b_feat = n(256)
  logits = (_normal(next(keys), (b_logit, classes)) * 3,
            _normal(next(keys), (b_logit, classes)) * 3)
  labels = jax.random.randint(next(keys), (b_logit,), 0, classes)
  tokens = (_normal(next(keys), (b_feat, 196, 768)),
            _normal(next(keys), (b_feat, 196, 768)))
  token_mask = _mask(next(keys), (b_feat, 196), 0.75)
  stages = [(56, 64), (28, 128), (14, 256), (7, 512)]
  maps_s = [_normal(next(keys), (b_feat, hw, hw, c)) for hw, c in stages]
  maps_t = [_normal(next(keys), (b_feat, hw, hw, 4 * c)) for hw, c in stages]
  emb = (_normal(next(keys), (b_feat, 512)),
         _normal(next(keys), (b_feat, 2048)))
  images = (_normal(next(keys), (b_feat, 224, 224, 3)),
            _normal(next(keys), (b_feat, 224, 224, 3)))
  pixel_mask = _mask(next(keys), (b_feat, 7, 7), 0.6)  # 32x32 mask patches
  qkv_s = tuple(_normal(next(keys), (b_feat, 6, 197, 64)) for _ in range(3))
  qkv_t = tuple(_normal(next(keys), (b_feat, 6, 197, 128)) for _ in range(3))
  lg = f"{b_logit}x{classes}"
  return [
      ("kd", lg, losses.kd, logits),
      ("dkd", lg, losses.dkd, logits + (labels,)),
      ("dist", lg, losses.dist, logits),
      ("kd_logit_std", lg, losses.kd_logit_std, logits),
      ("deit_hard", lg, losses.deit_hard, logits),
      ("deit_soft", lg, losses.deit_soft, logits),
      ("fitnet", f"{b_feat}x196x768", losses.fitnet, tokens),
      ("masked_feature_distill (smooth_l1)", f"{b_feat}x196x768",
       losses.masked_feature_distill, tokens + (token_mask,)),
      ("masked_feature_distill (cosine)", f"{b_feat}x196x768",
       functools.partial(losses.masked_feature_distill, kind="cosine"),
       tokens + (token_mask,)),
      ("mae_mse", f"{b_feat}x196x768", losses.mae_mse, tokens + (token_mask,)),
      ("simmim_l1", f"{b_feat}x224x224x3", losses.simmim_l1,
       images + (pixel_mask,)),
      ("attention_transfer (4 ResNet stages)", f"{b_feat}x56x56x64..7x7x512",
       losses.attention_transfer, (maps_s, maps_t)),
      ("similarity_preserving", f"{b_feat}x7x7x512 vs x2048",
       losses.similarity_preserving, (maps_s[-1], maps_t[-1])),
      ("rkd", f"{b_feat}x512 vs x2048", losses.rkd, emb),
      ("pkt", f"{b_feat}x512 vs x2048", losses.pkt, emb),
      ("tinymim_relation", f"{b_feat}x6x197x64 vs x128",
       losses.tinymim_relation, (qkv_s, qkv_t)),
  ]


def _stand_in(scale):
  """A ViT-S/16 MLP block's matmuls at batch 256, for scale."""
  keys = jax.random.split(jax.random.key(1), 3)
  b = max(2, int(256 * scale))
  x = _normal(keys[0], (b, 196, 384))
  w1 = _normal(keys[1], (384, 1536)) * 0.05
  w2 = _normal(keys[2], (1536, 384)) * 0.05
  fn = lambda x, w1, w2: jnp.sum(  # noqa: E731
      jnp.matmul(jax.nn.gelu(jnp.matmul(x, w1)), w2))
  return (f"stand-in: (B,196,384)x(384,1536)x(1536,384) matmuls", f"{b}",
          fn, (x, w1, w2))


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--only", default="", help="substring of loss names")
  args = parser.parse_args()

  device = jax.devices()[0]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"device {device.device_kind}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, repeats {args.repeats}, "
        f"scale {args.scale}\n")
  print("| loss | size | forward ms | value_and_grad ms |")
  print("|---|---|---:|---:|")
  for name, size, fn, fn_args in _cases(args.scale) + [_stand_in(args.scale)]:
    if args.only not in name:
      continue
    forward = jax.jit(fn)
    backward = jax.jit(jax.value_and_grad(fn))
    fwd = _median_ms(forward, fn_args, args.repeats)
    bwd = _median_ms(backward, fn_args, args.repeats)
    print(f"| {name} | {size} | {fwd:.2f} | {bwd:.2f} |", flush=True)


if __name__ == "__main__":
  main()
