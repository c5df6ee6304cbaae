"""Fuzzing the readers of files from outside (issue 29): image files and CSV / JSONL lists.

A seeded mutator of our own (no Hypothesis) damages small valid files: truncations, byte flips,
inserted and repeated chunks, and edits of the header fields that size the decode (a JPEG's SOF
height and width, a PNG's IHDR size / bit depth / colour type with its CRC fixed so that the edit
reaches the decoder, a BMP's signed width / height / bits per pixel, a WebP's VP8 sizes); lists
get BOMs, invalid UTF-8, NULs, empty / negative / huge / float / sparse labels, duplicated lines,
huge lines, deep JSON nesting and JSON values of every type.

Each batch of cases runs in a child process under RLIMIT_AS (3 GiB) and a per-case alarm (a
case still running after `CASE_TIMEOUT_S` kills the child: a hang). The child calls the readers
directly (`jpeg.header`, `jpeg.decode`, `jpeg.eval_crop`, `jpeg.train_crop`,
`prepare.check_file`; `lists.read` and `lists.index`) and reports each case as
'ok' (a result of the promised type and shape), 'refused' (the documented refusal type:
`jpeg.ImageReadError` for images, `UserError` for lists), or 'error' (any other exception: a
traceback for the user). A child that dies by a signal during a case is a crash. The test
asserts 0 crashes, 0 hangs and 0 errors, and prints the counts.

Normal tier: 300 image cases (JPEG, 16-bit and 8-bit PNG, palette PNG, BMP, WebP, GIF) and 200
of each list kind; slow tier: 4000 images and 2000 of each list kind.
"""
import json
import os
import random
import resource
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

MEMORY_LIMIT = 3 << 30
CASE_TIMEOUT_S = 20

# ---------------------------------------------------------------- valid seeds


def _encode(image, fmt, **kwargs) -> bytes:
  """`image` (an array or a PIL image) encoded as `fmt`."""
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, fmt,
                                                                            **kwargs)
  return buffer.getvalue()


def image_seeds() -> dict[str, bytes]:
  """Small valid files of every kind the folder reader meets."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
  wide = (rng.integers(0, 65536, (24, 32), dtype=np.uint32)).astype(np.uint16)
  seeds = {
      'jpeg_rgb': _encode(rgb, 'JPEG', quality=90),
      'jpeg_gray': _encode(gray, 'JPEG'),
      'jpeg_progressive': _encode(rgb, 'JPEG', progressive=True),
      'png_rgb': _encode(rgb, 'PNG'),
      'png_gray': _encode(gray, 'PNG'),
      'png_16bit': _encode(wide, 'PNG'),
      'png_palette': _encode(Image.fromarray(rgb).convert('P'), 'PNG'),
      'bmp': _encode(rgb, 'BMP'),
      'webp': _encode(rgb, 'WEBP', quality=80),
      'gif': _encode(Image.fromarray(rgb).convert('P'), 'GIF'),
  }
  return seeds


LIST_ROWS = [('a/0.png', 'ant'), ('a/1.png', 'ant'), ('b/0.png', 'bee'), ('b/1.png', 'bee'),
             ('c/0.png', 'cat'), ('c/1.png', 'cat')]


def list_seed(kind: str, rng: random.Random) -> bytes:
  """A valid list of LIST_ROWS: CSV with or without header / split column, or JSONL."""
  labels = rng.random() < 0.3  # integer labels
  rows = [(p, str('abc'.index(p[0])) if labels else l) for p, l in LIST_ROWS]
  splits = rng.random() < 0.5
  if kind == 'jsonl':
    return ''.join(json.dumps({'path': p, 'label': int(l) if labels else l,
                               **({'split': 'train' if i % 2 else 'val'} if splits else {})}) +
                   '\n' for i, (p, l) in enumerate(rows)).encode()
  head = ('path,label,split\n' if splits else 'path,label\n') if rng.random() < 0.5 else ''
  return (head + ''.join(f'{p},{l}' + (f',{"train" if i % 2 else "val"}' if splits else '') +
                         '\n' for i, (p, l) in enumerate(rows))).encode()


# ---------------------------------------------------------------- the mutator

_HUGE = (0, 1, 2, 255, 256, 4095, 13500, 16383, 20000, 32767, 32768, 40000, 50000, 65500, 65535,
         65536, 1 << 20, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)


def _size(rng: random.Random) -> int:
  """A width or height: mostly extreme, sometimes small, rarely mid-sized (those decode)."""
  roll = rng.random()
  if roll < 0.7:
    return rng.choice(_HUGE)
  if roll < 0.95:
    return rng.randint(0, 64)
  return rng.randint(64, 4000)


def _png_chunk_fix(data: bytearray, start: int) -> None:
  """Recomputes the CRC of the PNG chunk at `start` (length, type, data, crc)."""
  length = struct.unpack('>I', data[start:start + 4])[0]
  end = start + 8 + length
  if end + 4 <= len(data):
    data[end:end + 4] = struct.pack('>I', zlib.crc32(bytes(data[start + 4:end])))


def _edit_header(data: bytearray, rng: random.Random) -> None:
  """Edits the fields that size the decode, in the format's own header."""
  if data[:2] == b'\xff\xd8':
    sof = [i for i in range(len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2)]
    if sof:
      i = rng.choice(sof)
      field = rng.choice(('h', 'w', 'both', 'square', 'components'))
      side = _size(rng) & 0xFFFF
      if field in ('h', 'both', 'square'):
        data[i + 5:i + 7] = struct.pack('>H', side)
      if field in ('w', 'both', 'square'):
        data[i + 7:i + 9] = struct.pack('>H', side if field == 'square' else _size(rng) & 0xFFFF)
      if field == 'components':
        data[i + 9] = rng.choice((0, 1, 2, 3, 4, 255))
  elif data[:8] == b'\x89PNG\r\n\x1a\n':
    field = rng.choice(('w', 'h', 'both', 'square', 'depth', 'colour'))
    side = _size(rng) & 0xFFFFFFFF
    if field in ('w', 'both', 'square'):
      data[16:20] = struct.pack('>I', side)
    if field in ('h', 'both', 'square'):
      data[20:24] = struct.pack('>I', side if field == 'square' else _size(rng) & 0xFFFFFFFF)
    if field == 'depth':
      data[24] = rng.choice((0, 1, 2, 4, 8, 16, 32, 255))
    if field == 'colour':
      data[25] = rng.choice((0, 2, 3, 4, 6, 7, 255))
    if rng.random() < 0.9:
      _png_chunk_fix(data, 8)
  elif data[:2] == b'BM':
    field = rng.choice(('w', 'h', 'bpp', 'offset', 'compression'))
    signed = lambda: rng.choice((-1, -(1 << 31), -40000)) if rng.random() < 0.3 else _size(rng)
    if field == 'w':
      data[18:22] = struct.pack('<i', max(min(signed(), (1 << 31) - 1), -(1 << 31)))
    elif field == 'h':
      data[22:26] = struct.pack('<i', max(min(signed(), (1 << 31) - 1), -(1 << 31)))
    elif field == 'bpp':
      data[28:30] = struct.pack('<H', rng.choice((0, 1, 4, 8, 16, 24, 32, 64, 65535)))
    elif field == 'offset':
      data[10:14] = struct.pack('<I', rng.choice((0, 14, 54, 1 << 20, (1 << 32) - 1)))
    else:
      data[30:34] = struct.pack('<I', rng.choice((0, 1, 2, 3, 4, 5, 6, 255)))
  elif data[:4] == b'RIFF' and data[8:12] == b'WEBP':
    i = data.find(b'VP8')
    if i >= 0 and len(data) > i + 30:
      j = rng.randint(i + 8, min(i + 30, len(data) - 2))
      data[j:j + 2] = struct.pack('<H', _size(rng) & 0xFFFF)
  elif data[:3] == b'GIF':
    data[6:10] = struct.pack('<HH', _size(rng) & 0xFFFF, _size(rng) & 0xFFFF)


def _bombs(seeds: dict[str, bytes]) -> list[tuple[str, bytes]]:
  """Valid files whose header claims 40000 x 40000 pixels (a 1.6 G pixel decode, 4.8 GB as RGB:
  what `data prepare` used to allocate for a 25 MB JPEG), one per format, and 65535 x 65535."""
  out = []
  for name in ('jpeg_rgb', 'jpeg_progressive', 'png_rgb', 'png_16bit', 'bmp', 'gif'):
    for side in (40000, 65535):
      data = bytearray(seeds[name])
      if name.startswith('jpeg'):
        i = max(data.find(b'\xff\xc0'), data.find(b'\xff\xc2'))
        data[i + 5:i + 9] = struct.pack('>HH', side, side)
      elif name.startswith('png'):
        data[16:24] = struct.pack('>II', side, side)
        _png_chunk_fix(data, 8)
      elif name == 'bmp':
        data[18:26] = struct.pack('<ii', side, side)
      else:
        data[6:10] = struct.pack('<HH', side, side)
      out.append((f'{name}_bomb_{side}', bytes(data)))
  return out


def mutate_bytes(seed: bytes, rng: random.Random) -> bytes:
  """A header edit alone (30%: the file stays otherwise valid, so the decoder meets the edited
  size), or one to three random mutations of an image file."""
  data = bytearray(seed)
  if rng.random() < 0.3:
    _edit_header(data, rng)
    return bytes(data)
  for _ in range(rng.randint(1, 3)):
    op = rng.random()
    if op < 0.35:
      _edit_header(data, rng)
    elif op < 0.55 and data:
      del data[rng.randint(0, len(data) - 1):]  # truncation
    elif op < 0.8 and data:
      for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif op < 0.9 and data:
      i, n = rng.randrange(len(data)), rng.randint(1, 64)
      data[i:i] = data[i:i + n] * rng.randint(1, 50)  # a repeated chunk
    else:
      i = rng.randrange(len(data) + 1)
      data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
  return bytes(data)


_LABELS = ('', ' ', '-1', '-0', '+3', '20000000', '99999', '100000', '1' * 5000, '1.5', 'nan',
           'NaN', '1e9', '\u202e', '\x1b[31mred', 'ant', 'bee', 'zebra', '0', '1', '5000',
           '"quoted"', 'a,b', '\ufeffant', '\x00')


def mutate_list(seed: bytes, kind: str, rng: random.Random) -> bytes:
  """One to three random mutations of a CSV / JSONL list."""
  data = bytearray(seed)
  for _ in range(rng.randint(1, 3)):
    op = rng.random()
    lines = bytes(data).split(b'\n')
    if op < 0.25 and len(lines) > 1:  # a label (or a value) replaced
      i = rng.randrange(len(lines) - 1)
      label = rng.choice(_LABELS).encode('utf-8')
      if kind == 'jsonl':
        value = rng.choice((json.dumps(label.decode()), b'null', b'[]', b'{}', b'true', b'1e999',
                            b'-5', b'12345678901234567890', b'NaN', b'"' + b'x' * 70000 + b'"'))
        lines[i] = rng.choice((b'{"path": "a/0.png", "label": %s}',
                               b'{"path": %s, "label": "ant"}',
                               b'{"path": "b/1.png", "label": "bee", "split": %s}')) % (
                                   value if isinstance(value, bytes) else value.encode())
      else:
        lines[i] = lines[i].rsplit(b',', 1)[0] + b',' + label
      data = bytearray(b'\n'.join(lines))
    elif op < 0.35:
      data[0:0] = b'\xef\xbb\xbf' * rng.randint(1, 2)  # BOMs
    elif op < 0.45 and data:
      i = rng.randrange(len(data))
      data[i:i] = rng.choice((b'\xff', b'\xe9', b'\xc3', b'\xed\xa0\x80', b'\x00', b'\r',
                              b'\r\n', b'"', b'\\'))
    elif op < 0.55 and len(lines) > 1:
      i = rng.randrange(len(lines))
      lines.insert(i, lines[rng.randrange(len(lines))])  # a duplicated line
      data = bytearray(b'\n'.join(lines))
    elif op < 0.62:
      data += (b'b/0.png,' + b'x' * rng.choice((70000, 200000)) + b'\n' if kind == 'csv' else
               b'[' * rng.choice((1000, 50000, 70000)) + b'\n')  # a huge line / deep nesting
    elif op < 0.72 and data:
      del data[rng.randint(0, len(data) - 1):]
    elif op < 0.85 and data:
      for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    else:
      data += rng.choice((b'../../../../etc/passwd,ant\n', b'/dev/zero,ant\n', b'a,b,c,d,e\n',
                          b'c/0.png,ant,train,extra\n', b'{"path": "c/0.png"}\n', b'\n\n\n',
                          b'a/0.png,bee\n', b'c/1.png,5000\n', b'a/1.png,ant,test\n'))
  return bytes(data)


# ---------------------------------------------------------------- the child that reads

CHILD = r'''
import os, signal, sys, traceback
import numpy as np
signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a case past its time kills the child: a hang
kind, folder_path, start, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from jkd.data import jpeg, labelling, lists, prepare
from jkd.errors import UserError
names = sorted(n for n in os.listdir(folder_path) if n.startswith('case_'))

def check_image(path, i):
  data = open(path, 'rb').read()
  mode = 'L' if i % 2 else 'RGB'
  channels = 1 if mode == 'L' else 3
  try:
    w, h, gray = jpeg.header(data)
    assert isinstance(w, int) and isinstance(h, int) and 1 <= w * h <= jpeg.MAX_PIXELS
    pixels = jpeg.decode(data, mode)
    assert pixels.dtype == np.uint8 and pixels.shape[2] == channels and pixels.ndim == 3
    crop = (jpeg.eval_crop(data, 16, mode) if i % 3 else
            jpeg.train_crop(data, np.random.default_rng(i), 16, mode, resizer='opencv'))
    assert crop.shape == (16, 16, channels) and crop.dtype == np.uint8
    result = 'ok'
  except jpeg.ImageReadError:
    result = 'refused'
  if i % 4 == 0:
    got, error, gray, stamp = prepare.check_file(path)
    assert (got is None) == (error is not None)
  return result

def check_list(path, i):
  given = ('ant', 'bee', 'cat') if i % 5 == 0 else None
  try:
    lists.read(path)
    layout, classes, splits = lists.index(path, 0.3, 0, given)
    assert 1 <= len(classes) <= labelling.MAX_CLASSES and all(isinstance(c, str) for c in classes)
    for paths, labels in splits.values():
      assert len(paths) == len(labels) and labels.dtype == np.int32
      assert ((labels >= 0) & (labels < len(classes))).all()
      assert all(os.path.isfile(p) for p in paths)
    return 'ok'
  except UserError as e:
    assert '\n' not in str(e)[:0] and str(e)
    return 'refused'

for i in range(start, len(names)):
  path = os.path.join(folder_path, names[i])
  print('S', i, flush=True)
  signal.alarm(timeout)
  try:
    result = check_image(path, i) if kind == 'image' else check_list(path, i)
  except BaseException as e:  # anything else reaches the user as a traceback
    result = 'error ' + repr(traceback.format_exception_only(type(e), e)[-1][:300])
  signal.alarm(0)
  print('R', i, result, flush=True)
print('DONE', flush=True)
'''


def _limit():
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cases(kind: str, directory: str) -> dict:
  """Runs every case_* file of `directory` through the readers in child processes; returns
  {'ok', 'refused', 'error', 'crash', 'hang'} -> list of case names (a dead child is restarted
  after the case that killed it)."""
  names = sorted(n for n in os.listdir(directory) if n.startswith('case_'))
  outcome = {k: [] for k in ('ok', 'refused', 'error', 'crash', 'hang')}
  start = 0
  while start < len(names):
    proc = subprocess.run(
        [sys.executable, '-c', CHILD, kind, directory, str(start), str(CASE_TIMEOUT_S)],
        cwd=REPO, capture_output=True, text=True, preexec_fn=_limit,
        timeout=CASE_TIMEOUT_S * 4 + 30 * len(names),
        env=dict(os.environ, OMP_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1'))
    last = None
    for line in proc.stdout.splitlines():
      parts = line.split(' ', 2)
      if parts[0] == 'S':
        last = int(parts[1])
      elif parts[0] == 'R':
        result = parts[2]
        key = result.split(' ', 1)[0]
        outcome[key].append(names[int(parts[1])] + ('' if key != 'error' else ': ' + result))
        last = None
    if 'DONE' in proc.stdout.splitlines():
      break
    if last is None:  # died before its first case: the harness itself is broken
      raise AssertionError(f'fuzz child failed to start: {proc.stderr[-3000:]}')
    killed = proc.returncode < 0 and -proc.returncode == 14  # SIGALRM: the case ran too long
    outcome['hang' if killed else 'crash'].append(
        f'{names[last]} (exit {proc.returncode}: {proc.stderr[-500:]})')
    start = last + 1
  return outcome


def _write_cases(directory, kind: str, count: int, seed: int) -> None:
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  if kind == 'image':
    seeds = image_seeds()
    names = sorted(seeds)
    directed = _bombs(seeds)
    for i in range(count):
      name = names[i % len(names)]
      if i < len(names):
        data = seeds[name]  # the valid seeds themselves
      elif i - len(names) < len(directed):
        name, data = directed[i - len(names)]
      else:
        data = mutate_bytes(seeds[name], rng)
      with open(os.path.join(directory, f'case_{i:05d}_{name}'), 'wb') as f:
        f.write(data)
    return
  for sub in 'abc':  # the files the lists name
    os.makedirs(os.path.join(directory, sub), exist_ok=True)
    for k in range(2):
      Image.fromarray(np.full((4, 4), k * 9, np.uint8)).save(
          os.path.join(directory, sub, f'{k}.png'))
  for i in range(count):
    data = list_seed(kind, rng)
    if i >= 4:
      data = mutate_list(data, kind, rng)
    with open(os.path.join(directory, f'case_{i:05d}.{kind}'), 'wb') as f:
      f.write(data)


def _fuzz(tmp_path, kind: str, count: int, seed: int) -> dict:
  directory = str(tmp_path / kind)
  _write_cases(directory, kind, count, seed)
  outcome = run_cases('list' if kind in ('csv', 'jsonl') else 'image', directory)
  counts = {k: len(v) for k, v in outcome.items()}
  print(f'fuzz {kind}: {counts}')
  assert outcome['crash'] == [] and outcome['hang'] == [] and outcome['error'] == [], {
      k: outcome[k][:10] for k in ('crash', 'hang', 'error')}
  assert counts['ok'] > 0 and counts['refused'] > 0  # the mutator reaches both outcomes
  return counts


@pytest.mark.parametrize('kind,count', [('image', 300), ('csv', 200), ('jsonl', 200)])
def test_fuzz_readers(tmp_path, kind, count):
  _fuzz(tmp_path, kind, count, seed=29)


@pytest.mark.slow
@pytest.mark.parametrize('kind,count', [('image', 4000), ('csv', 2000), ('jsonl', 2000)])
def test_fuzz_readers_thousands(tmp_path, kind, count):
  _fuzz(tmp_path, kind, count, seed=2029)


def test_mutator_is_seeded():
  a = mutate_bytes(image_seeds()['png_16bit'], random.Random(1))
  assert a == mutate_bytes(image_seeds()['png_16bit'], random.Random(1))
