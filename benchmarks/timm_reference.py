"""PyTorch/timm reference for `jkd bench`: the same train step, timed the same way.

  python benchmarks/timm_reference.py --model vit_b16 [--json OUT.json]

Needs a CUDA GPU, torch and timm (`pip install -e '.[torch]'`). For each model it builds the timm
equivalent of `configs/bench/<model>.py` — ViT-B/16 `vit_base_patch16_224`, ViT-S/16
`vit_small_patch16_224`, ResNet-50 `resnet50` in channels-last memory format — compiles it with
`torch.compile`, and times a full train step (forward and cross-entropy under bf16 autocast,
backward, fused AdamW lr 1e-3 weight decay 0.05, no clipping) on one synthetic batch of 256
224×224 images that stays on the GPU. As in `jkd bench`: `--warmup` untimed steps (these also
trigger compilation), then `--steps` steps timed `--repeats` times with a device sync at each
end; the median repeat is reported as img/s.

timm's ViTs have a class token (197 tokens) by default; jkd's bench ViTs pool the 196 patch
tokens (a length cuDNN attention accepts). `--gap` builds the timm ViT the jkd way
(`class_token=False, global_pool='avg'`); the difference in FLOPs is 0.5%.
"""
import argparse
import json
import statistics
import sys
import time

MODELS = {
    'vit_b16': ('vit_base_patch16_224', False),
    'vit_s16': ('vit_small_patch16_224', False),
    'resnet50': ('resnet50', True),  # (timm name, channels-last)
}


def _require_cuda():
  """Imports torch and timm, or exits with code 2 and what to install or where to run."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import timm  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    _fail(f'{e.name} is not installed. Install the PyTorch extras with '
          "`pip install -e '.[torch]'` (torch with CUDA, and timm) and run again.")
  if not torch.cuda.is_available():
    _fail(f'no CUDA GPU is visible to torch (torch {torch.__version__}, CUDA build '
          f'{torch.version.cuda}). The reference timings need an NVIDIA GPU; run this on the '
          'GPU machine.')
  return torch


def _fail(message: str):
  print(f'timm_reference.py: error: {message}', file=sys.stderr)
  sys.exit(2)


def bench_model(name: str, *, batch_size: int, warmup: int, steps: int, repeats: int,
                compile_model: bool, gap: bool) -> dict:
  """Times the timm train step of `name` (a key of MODELS); returns img/s and the details."""
  torch = _require_cuda()
  import timm  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  timm_name, channels_last = MODELS[name]
  kwargs = {'num_classes': 1000}
  if gap and timm_name.startswith('vit'):
    kwargs.update(class_token=False, global_pool='avg')
  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = True
  # TF32 for any fp32 matmul left outside autocast, as XLA's default precision on GPU does.
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  device = torch.device('cuda')
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = timm.create_model(timm_name, **kwargs).to(device, memory_format=memory_format)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
  forward = torch.compile(model) if compile_model else model

  images = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(
      memory_format=memory_format)
  labels = torch.randint(0, 1000, (batch_size,), device=device)

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = step()
  torch.cuda.synchronize()
  warmup_s = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = step()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - t0) / steps)
  step_s = statistics.median(times)
  return {
      'model': name,
      'timm_model': timm_name,
      'timm_kwargs': kwargs,
      'channels_last': channels_last,
      'compiled': compile_model,
      'batch_size': batch_size,
      'examples_per_sec': round(batch_size / step_s, 2),
      'step_ms': round(step_s * 1e3, 3),
      'step_ms_all': [round(t * 1e3, 3) for t in times],
      'peak_memory_bytes': int(torch.cuda.max_memory_allocated()),
      'warmup_s': round(warmup_s, 2),
      'final_loss': float(loss),
      'device': torch.cuda.get_device_name(),
      'torch_version': torch.__version__,
      'timm_version': timm.__version__,
      'input': 'one fixed synthetic batch resident on the GPU: input pipeline not measured',
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=[*MODELS, 'all'], default='all')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps, compilation included (jkd: config.bench.warmup_steps)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per repeat')
  parser.add_argument('--repeats', type=int, default=3, help='the median repeat is reported')
  parser.add_argument('--no-compile', action='store_true', help='eager mode, no torch.compile')
  parser.add_argument('--gap', action='store_true',
                      help='ViTs without class token, average-pooled (as jkd bench configs)')
  parser.add_argument('--json', help='write the results (a list) to this file')
  args = parser.parse_args(argv)
  _require_cuda()
  names = list(MODELS) if args.model == 'all' else [args.model]
  results = []
  for name in names:
    r = bench_model(name, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                    repeats=args.repeats, compile_model=not args.no_compile, gap=args.gap)
    results.append(r)
    print(f'{name:9s} timm {r["timm_model"]}: {r["examples_per_sec"]:,.1f} img/s, '
          f'{r["step_ms"]:.2f} ms/step (repeats {r["step_ms_all"]}), '
          f'peak {r["peak_memory_bytes"] / 2**30:.2f} GiB, {r["device"]}', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
