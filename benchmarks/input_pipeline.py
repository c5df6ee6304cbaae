r"""Host input speed: ImageNet's train transform from a folder of JPEG photos, jkd vs PyTorch.

  python benchmarks/input_pipeline.py --torch-python /work/venv-ref/bin/python --workers 2 \
      --out /tmp/input_pipeline.json

Measures images/s of the ImageNet train transform (random-resized crop to 224 + horizontal flip,
uint8 batches out) from one folder of real photographs at ImageNet's typical size, for:
  - `jkd_folder`: `jkd.data.make_train_iterator` on `config.data.name='folder'`, decoding in
    `--workers` Grain worker processes (`config.data.worker_processes`);
  - `jkd_shards`: the same on the ArrayRecord shards `jkd data prepare` made of the folder;
  - `jkd_folder_pillow`: `jkd_folder` with `config.data.train_resize='pillow'` (Pillow's
    antialiased bilinear resize of the crop, torchvision's pixels, instead of OpenCV's area
    average);
  - `torch`: torchvision `ImageFolder` + `DataLoader(num_workers=--workers)` with
    `RandomResizedCrop(224)`, `RandomHorizontalFlip()`, `PILToTensor()` (uint8), run by
    `--torch-python` (an interpreter with torch and torchvision; jkd's own does not need them);
  - `pillow_decode`: `Image.open(path).convert('RGB')` of the same files in a loop on one core,
    the ceiling of any pipeline that decodes every file at full size (torchvision's loader);
  - `simplejpeg_decode`: the same with simplejpeg (the decoder jkd uses), one core.
`--workers 0` also runs both loaders in the measuring process itself (one core each).

The photos: `--images` files made from the seven colour photographs that scikit-image ships in
its wheel (astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
immunohistochemistry; no download): for each file a random crop of 35-100% of the largest
region of a photo with the target aspect, resized (Lanczos) to 500x375 (60%), 500x333 (20%) or
375x500 (20%), mirrored at random, saved as JPEG quality 90 (4:2:0), in 10 class folders.
Made once in `--data` (`pip install scikit-image` where they are made).

Each measurement is its own process (one framework per process), run `--repeats` times with
the pipelines alternated; a run takes `--warmup` batches untimed (worker start-up) and times the
next `--batches`. Reported per pipeline: the median images/s, images/s per worker process
(÷ max(workers, 1)), and images per CPU-second (the CPU time of the measuring process and all
its descendants, read from /proc over the timed batches: the per-core figure that a machine
shared with other jobs disturbs least), with the 1-minute load average before each run. On a
busy machine the wall figures understate every pipeline; compare ratios, and re-measure on a
quiet machine for absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # This checkout's jkd, whatever is installed (children too).

SOURCES = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'retina',
           'immunohistochemistry')
SIZES = (((500, 375), 0.6), ((500, 333), 0.2), ((375, 500), 0.2))  # (width, height), share
CLASSES = 10
PIPELINES = ('jkd_folder', 'jkd_shards', 'jkd_folder_pillow', 'torch', 'pillow_decode',
             'simplejpeg_decode')
# Training speeds on one H100 that the host must feed (img/s): ViT-S/16 as the issue states,
# ViT-B/16 as timm measures it (docs/benchmarks.md).
GPU_RATES = {'ViT-S/16 (9,000 img/s)': 9000, 'ViT-B/16 (3,300 img/s)': 3300}


# ---------------------------------------------------------------- the photos


def make_photos(root: str, count: int, seed: int = 0, scale: float = 1.0) -> None:
  """Writes `count` JPEGs (quality 90) made from scikit-image's colour photos into
  root/class_k/, at `scale` times ImageNet's typical sizes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(getattr(skimage.data, name)()) for name in SOURCES]
  rng = np.random.default_rng(seed)
  sizes, shares = zip(*SIZES)
  for i in range(count):
    photo = photos[i % len(photos)]
    width, height = (int(round(v * scale)) for v in sizes[rng.choice(len(sizes), p=shares)])
    # The largest region of the photo with the target's aspect, then 35-100% of its area.
    zoom = min(photo.width / width, photo.height / height) * np.sqrt(rng.uniform(0.35, 1.0))
    w, h = width * zoom, height * zoom
    left, top = rng.uniform(0, photo.width - w), rng.uniform(0, photo.height - h)
    image = photo.resize((width, height), Image.LANCZOS, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    directory = os.path.join(root, f'class_{i % CLASSES}')
    os.makedirs(directory, exist_ok=True)
    image.save(os.path.join(directory, f'{i:06d}.jpg'), quality=90)


def _files(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if f.endswith('.jpg'))


# ---------------------------------------------------------------- measuring (child processes)


def _tree_cpu_seconds(pid: int) -> float:
  """utime + stime of `pid` and every live descendant, from /proc."""
  children: dict[int, list[int]] = {}
  times: dict[int, float] = {}
  tick = os.sysconf('SC_CLK_TCK')
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    children.setdefault(int(fields[1]), []).append(int(name))
    times[int(name)] = (int(fields[11]) + int(fields[12])) / tick
  total, todo = 0.0, [pid]
  while todo:
    p = todo.pop()
    total += times.get(p, 0.0)
    todo.extend(children.get(p, []))
  return total


def _time_batches(iterator, batch: int, warmup: int, batches: int) -> dict:
  for _ in range(warmup):
    next(iterator)
  cpu0, t0 = _tree_cpu_seconds(os.getpid()), time.perf_counter()
  for _ in range(batches):
    next(iterator)
  wall, cpu = time.perf_counter() - t0, _tree_cpu_seconds(os.getpid()) - cpu0
  images = batch * batches
  return {'images': images, 'wall_s': wall, 'cpu_s': cpu, 'img_per_s': images / wall,
          'img_per_cpu_s': images / cpu if cpu else None}


def _child_jkd(args) -> dict:
  from jkd import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config('folder')
  cfg.update(dir=args.dir, image_size=224, holdout=0.0, num_workers=0,
             worker_processes=args.workers, prefetch=2,
             train_resize='pillow' if args.child.endswith('_pillow') else 'opencv')
  iterator = data.make_train_iterator(cfg, global_batch_size=args.batch, seed=0,
                                      process_index=0, process_count=1)
  first = next(iterator)
  assert first['image'].shape == (args.batch, 224, 224, 3) and first['image'].dtype.name == 'uint8'
  out = _time_batches(iterator, args.batch, args.warmup, args.batches)
  iterator.close()
  return out


def _child_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top
  if args.workers == 0:  # as in its worker processes: one thread (more only contend here)
    torch.set_num_threads(1)
  transform = transforms.Compose([transforms.RandomResizedCrop(224),
                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
  dataset = datasets.ImageFolder(args.dir, transform=transform)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
      persistent_workers=args.workers > 0)

  def forever():
    while True:
      yield from loader
  iterator = forever()
  first = next(iterator)[0]
  assert tuple(first.shape) == (args.batch, 3, 224, 224) and first.dtype == torch.uint8
  return {**_time_batches(iterator, args.batch, args.warmup, args.batches),
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


def _child_decode(args, decoder: str) -> dict:
  files = _files(args.dir)
  if decoder == 'pillow':
    from PIL import Image  # pylint: disable=g-import-not-at-top

    def decode(path):
      with Image.open(path) as image:
        image.convert('RGB')
  else:
    import simplejpeg  # pylint: disable=g-import-not-at-top

    def decode(path):
      with open(path, 'rb') as f:
        simplejpeg.decode_jpeg(f.read(), 'RGB')
  for path in files[:20]:
    decode(path)
  count, cpu0, t0 = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - t0 < args.seconds:
    decode(files[count % len(files)])
    count += 1
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  return {'images': count, 'wall_s': wall, 'cpu_s': cpu, 'img_per_s': count / wall,
          'img_per_cpu_s': count / cpu}


def child_main(argv) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--child', required=True)
  parser.add_argument('--dir', required=True)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--warmup', type=int, default=4)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--seconds', type=float, default=5.0)
  args = parser.parse_args(argv)
  if args.child.startswith('jkd'):
    result = _child_jkd(args)
  elif args.child == 'torch':
    result = _child_torch(args)
  else:
    result = _child_decode(args, args.child.split('_')[0])
  print('RESULT ' + json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


def _prepare(folder: str, shards: str, python: str) -> None:
  if os.path.isfile(os.path.join(shards, 'dataset_info.json')):
    return
  subprocess.run([python, '-m', 'jkd.cli', 'data', 'prepare', '--dir', folder, '--out', shards,
                  '--config.data.holdout=0.0'], check=True,
                 env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                     [REPO, *filter(None, [os.environ.get('PYTHONPATH')])])))


def _run_child(python: str, name: str, args, directory: str, workers: int) -> dict:
  command = [python, os.path.abspath(__file__), '--child', name, '--dir', directory,
             '--workers', str(workers), '--batch', str(args.batch), '--warmup',
             str(args.warmup), '--batches', str(args.batches), '--seconds', str(args.seconds)]
  load = os.getloadavg()[0]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'{name} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return {**json.loads(lines[-1][len('RESULT '):]), 'load_before': round(load, 2),
          'load_after': round(os.getloadavg()[0], 2)}


def _summarise(runs: list[dict], workers: int) -> dict:
  med = lambda key: statistics.median(r[key] for r in runs if r.get(key))  # noqa: E731
  rate = med('img_per_s')
  return {'workers': workers, 'img_per_s': round(rate, 1),
          'img_per_s_per_worker': round(rate / max(workers, 1), 1),
          'img_per_cpu_s': round(med('img_per_cpu_s'), 1),
          'img_per_s_all': [round(r['img_per_s'], 1) for r in runs],
          'load_before': [r['load_before'] for r in runs]}


def main() -> None:
  if '--child' in sys.argv:
    child_main(sys.argv[1:])
    return
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default='/tmp/jkd_input_bench',
                      help='where the photos (photos/) and their shards (shards/) are kept')
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--scale', type=float, default=1.0,
                      help="photo size in units of ImageNet's typical 500x375 (e.g. 4: phone "
                           'photos of 2000x1500, where decoding at reduced size pays most)')
  parser.add_argument('--workers', type=int, nargs='+', default=[2],
                      help='worker processes of both loaders; several values run each')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--warmup', type=int, default=4, help='untimed batches first')
  parser.add_argument('--batches', type=int, default=24, help='timed batches per run')
  parser.add_argument('--seconds', type=float, default=6.0, help='decode-only timing per run')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--torch-python', default=None,
                      help='interpreter with torch + torchvision (default: skip PyTorch)')
  parser.add_argument('--pipelines', nargs='+', default=list(PIPELINES), choices=PIPELINES)
  parser.add_argument('--out', default=None, help='JSON file for every figure')
  args = parser.parse_args()

  photos, shards = os.path.join(args.data, 'photos'), os.path.join(args.data, 'shards')
  made = os.path.join(args.data, 'made.json')
  wanted = {'images': args.images, 'scale': args.scale}
  if not os.path.isfile(made) or json.load(open(made)) != wanted:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(args.data, ignore_errors=True)
    print(f'making {args.images} photos in {photos} ...', flush=True)
    make_photos(photos, args.images, scale=args.scale)
    with open(made, 'w') as f:
      json.dump(wanted, f)
  if 'jkd_shards' in args.pipelines:
    _prepare(photos, shards, sys.executable)
  pipelines = [p for p in args.pipelines if p != 'torch' or args.torch_python]
  plan = [(p, w) for w in args.workers for p in pipelines if not p.endswith('_decode')]
  plan += [(p, 0) for p in pipelines if p.endswith('_decode')]  # one core, no workers
  runs: dict[tuple[str, int], list[dict]] = {key: [] for key in plan}
  for r in range(args.repeats):
    for name, workers in plan[r % len(plan):] + plan[:r % len(plan)]:  # alternate the order
      python = args.torch_python if name == 'torch' else sys.executable
      directory = shards if name == 'jkd_shards' else photos
      result = _run_child(python, name, args, directory, workers)
      runs[(name, workers)].append(result)
      print(f'repeat {r + 1}/{args.repeats} {name:18s} workers={workers}: '
            f'{result["img_per_s"]:7.1f} img/s, {result["img_per_cpu_s"] or 0:6.1f} img/CPU-s '
            f'(load {result["load_before"]})', flush=True)
  summary = {f'{n}@{w}': _summarise(v, w) for (n, w), v in runs.items()}
  report = {'command': ' '.join([os.path.basename(sys.executable), *sys.argv]),
            'cpus': os.cpu_count(), 'images': args.images, 'scale': args.scale,
            'batch': args.batch,
            'sources': list(SOURCES), 'results': summary, 'h100_cores': _cores(summary),
            'runs': {f'{n}@{w}': v for (n, w), v in runs.items()}}
  print(_table(report))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)


def _cores(summary: dict) -> dict:
  """Cores an H100 needs at each training speed, from each loader's images per CPU-second."""
  out = {}
  for key, s in summary.items():
    if key.startswith(('jkd', 'torch')) and s['img_per_cpu_s']:
      out[key] = {gpu: round(rate / s['img_per_cpu_s'], 1) for gpu, rate in GPU_RATES.items()}
  return out


def _table(report: dict) -> str:
  rows = ['| pipeline | workers | img/s | img/s per worker | img per CPU-s | runs (img/s) | '
          'load before |', '|---|---:|---:|---:|---:|---|---|']
  for key, s in report['results'].items():
    rows.append(f'| {key.split("@")[0]} | {s["workers"]} | {s["img_per_s"]:,.0f} | '
                f'{s["img_per_s_per_worker"]:,.0f} | {s["img_per_cpu_s"]:,.0f} | '
                f'{", ".join(f"{v:.0f}" for v in s["img_per_s_all"])} | '
                f'{", ".join(str(v) for v in s["load_before"])} |')
  res = report['results']
  for w in sorted({s['workers'] for k, s in res.items() if k.startswith('torch')}):
    torch = res.get(f'torch@{w}')
    for name in ('jkd_folder', 'jkd_shards', 'jkd_folder_pillow'):
      jkd = res.get(f'{name}@{w}')
      if jkd and torch:
        rows.append(f'\n{name} / torch DataLoader at {w} workers: '
                    f'{jkd["img_per_s"] / torch["img_per_s"]:.2f}x img/s, '
                    f'{jkd["img_per_cpu_s"] / torch["img_per_cpu_s"]:.2f}x img per CPU-s')
  for key, cores in report['h100_cores'].items():
    rows.append(f'\ncores an H100 needs with {key}: ' + ', '.join(
        f'{gpu}: {c}' for gpu, c in cores.items()))
  return '\n'.join(rows)


if __name__ == '__main__':
  main()
