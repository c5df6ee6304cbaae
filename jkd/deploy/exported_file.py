"""An exported FILE and its FILE.json, read and checked as untrusted input (files are shared
and downloaded); every failure is a `UserError` naming the file and the field (exit 2).

  fmt, data, info = read('student.onnx')     # FILE's bytes and FILE.json, both checked

- FILE and FILE.json must be regular files (not a directory, FIFO or device) of bounded size
  (`MAX_FILE_BYTES`, `MAX_SIDECAR_BYTES`), checked before reading and again on the open
  descriptor (`read_regular`); each is read once, into memory, and the runtime is built from
  those bytes (no second open of a path that may have changed meanwhile).
- The format comes from the bytes (`sniff`: TFLite's 'TFL3' identifier, ONNX's protobuf start,
  else a jax.export flatbuffer) and must agree with the suffix.
- FILE.json (`read_info`) is strict JSON (no NaN), an object whose fields have the types and
  ranges `jkd export` writes; its `sha256` and `bytes` must be FILE's: `jkd export` writes FILE
  first and FILE.json last, so FILE.json is the commit record of a complete export, and a FILE
  replaced after it (or a kill between the two writes) is refused here, never run with the
  wrong facts.
- A jax.export program's argument trees are walked with a node budget (`check_jax_trees`)
  before jax's deserializer recurses over them.
`jkd.deploy.runtime` runs what passes; `jkd.compress.export` reads its files with
`read_regular` too.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys

from jkd.errors import UserError

FORMATS = {'.onnx': 'onnx', '.tflite': 'tflite', '.stablehlo': 'stablehlo',
           '.jaxexport': 'stablehlo'}
NAMES = {'onnx': 'an ONNX model', 'tflite': 'a TFLite flatbuffer',
         'stablehlo': 'a jax.export (StableHLO) program'}
# Protobuf and flatbuffers both address at most 2 GiB: no valid file is larger.
MAX_FILE_BYTES = 2 << 30
MAX_SIDECAR_BYTES = 1 << 20
MAX_SIDE, MAX_CHANNELS, MAX_CLASSES = 16384, 64, 1_000_000
MAX_TREE_NODES = 10_000  # a jax.export program's argument / result trees (ours have 3 and 1)


def show(text) -> str:
  """`text` quoted, with control characters escaped (repr): safe to print in a terminal."""
  return repr(str(text))


def format_of(path: str) -> str:
  """'onnx', 'tflite' or 'stablehlo' from the file name; UserError for anything else."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise UserError(f'{show(path)}: jkd runs .onnx, .tflite and .stablehlo files (as written by '
                    '`jkd export`); name the file by its format.')
  return FORMATS[ext]


def sidecar(path: str) -> str:
  """The JSON that `jkd export` writes beside FILE: FILE.json."""
  return path + '.json'


# ---------------------------------------------------------------- FILE and FILE.json


def read(path: str) -> tuple[str, bytes, dict]:
  """(format, bytes, FILE.json) of an exported FILE: read once each, the suffix agreeing with
  the bytes, FILE.json's fields checked and its `sha256` / `bytes` matching FILE (a warning
  where a FILE.json from an older jkd lacks them)."""
  fmt = format_of(path)
  data = read_regular(path, MAX_FILE_BYTES, 'exported file',
                      fix=f'Write it with `jkd export --out {path}`.')
  check_format(path, data)
  info = read_info(path)
  side = sidecar(path)
  if info['format'] != fmt:
    raise _bad_info(side, 'format', f'says {info["format"]!r} for a {fmt} file')
  if 'sha256' not in info:
    print(f'warning: {show(side)} has no "sha256" (written by a jkd from before 2026-12): '
          f'nothing checks that it describes this {show(path)}. Export again to record it.',
          file=sys.stderr)
  elif info.get('bytes') != len(data) or info['sha256'] != hashlib.sha256(data).hexdigest():
    raise UserError(f'{show(side)} describes another file than {show(path)} (field '
                    f'"sha256"/"bytes": {info.get("bytes", 0):,} bytes recorded, {len(data):,} '
                    'found, checksums differ): FILE was replaced or changed after `jkd export` '
                    'wrote it, or an export was cut off between its two files. Export again.')
  return fmt, data, info


# ---------------------------------------------------------------- reading files safely


def read_regular(path: str, limit: int, what: str = 'file', fix: str = '') -> bytes:
  """The bytes of `path`, a regular file of at most `limit` bytes; UserError otherwise.

  Checked with stat before opening (a FIFO would block `open`, /dev/zero never ends), opened
  with O_NONBLOCK and checked again on the descriptor (a file swapped in between), and read up
  to `limit` + 1 bytes whatever the size claims (a file growing meanwhile).
  """
  name = show(path)
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise UserError(f'{what} {name} does not exist. {fix}'.strip()) from None
  except OSError as e:
    raise UserError(f'{what} {name} cannot be read ({e.strerror}). {fix}'.strip()) from None
  _check_stat(st, name, limit, what)
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
  except OSError as e:
    raise UserError(f'{what} {name} cannot be opened ({e.strerror}).') from None
  try:
    _check_stat(os.fstat(fd), name, limit, what)
    chunks, total = [], 0
    while total <= limit:
      chunk = os.read(fd, min(1 << 24, limit + 1 - total))
      if not chunk:
        break
      chunks.append(chunk)
      total += len(chunk)
  except OSError as e:
    raise UserError(f'{what} {name} cannot be read ({e.strerror}).') from None
  finally:
    os.close(fd)
  if total > limit:
    raise UserError(f'{what} {name} grew past {limit:,} bytes while being read.')
  return b''.join(chunks)


def _check_stat(st, name: str, limit: int, what: str) -> None:
  if stat.S_ISDIR(st.st_mode):
    raise UserError(f'{what} {name} is a directory, not a file.')
  if not stat.S_ISREG(st.st_mode):
    raise UserError(f'{what} {name} is not a regular file (a FIFO, socket or device): jkd reads '
                    'exported files from disk only.')
  if st.st_size > limit:
    raise UserError(f'{what} {name} is {st.st_size:,} bytes, more than the {limit:,} a file of '
                    'its kind can be: it is not one.')


def _no_constant(name: str):
  raise ValueError(f'{name} is not a JSON number')


def read_info(path: str) -> dict:
  """FILE.json: the export's facts (format, bytes, sha256, model, image shape, classes, data
  config...), every field `check_info` checks, or UserError naming the field."""
  side = sidecar(path)
  data = read_regular(side, MAX_SIDECAR_BYTES, 'export description',
                      fix=f'`jkd export` writes it beside {show(path)}; jkd reads the image '
                      'shape, classes and checksum there. Export the file again with `jkd '
                      'export`, or copy FILE.json with it.')
  try:
    info = json.loads(data.decode('utf-8'), parse_constant=_no_constant)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise _bad_info(side, None, f'is not valid JSON ({type(e).__name__}: '
                    f'{show(str(e)[:120])})') from None
  if not isinstance(info, dict):
    raise _bad_info(side, None, f'holds a {type(info).__name__}, not a JSON object')
  check_info(info, side)
  return info


def _bad_info(side: str, field: str | None, what: str) -> UserError:
  where = f'field {field!r} ' if field else ''
  return UserError(f'{show(side)}: {where}{what}. It is not the description `jkd export` '
                   'writes: export the file again (or restore FILE.json beside it).')


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _field(info: dict, side: str, key: str, ok, want: str, *, required: bool = True):
  if key not in info:
    if required:
      raise _bad_info(side, key, f'is missing ({want} expected)')
    return None
  value = info[key]
  if not ok(value):
    raise _bad_info(side, key, f'is {show(_short(value))}, not {want}')
  return value


def _short(value) -> str:
  text = json.dumps(value, default=str) if not isinstance(value, str) else value
  return text if len(text) <= 80 else text[:77] + '...'


def _finite_list(n: int, positive: bool = False):
  def ok(v):
    return (isinstance(v, list) and len(v) == n and all(
        (is_int(x) or (isinstance(x, float) and math.isfinite(x))) and abs(x) <= 1e6
        and (x > 0 or not positive) for x in v))
  return ok


def check_info(info: dict, side: str) -> None:
  """Checks the fields of FILE.json that jkd reads (types and sane ranges)."""
  _field(info, side, 'format', lambda v: isinstance(v, str) and v in NAMES,
         f'one of {sorted(NAMES)}')
  # Optional only for files exported before FILE.json recorded them (the reader warns).
  _field(info, side, 'bytes', lambda v: is_int(v) and 0 < v <= MAX_FILE_BYTES,
         'the size of FILE in bytes', required=False)
  _field(info, side, 'sha256', lambda v: isinstance(v, str) and re.fullmatch(
      '[0-9a-f]{64}', v) is not None, "FILE's sha256 as 64 hex digits (`jkd export` writes it)",
      required=False)
  shape = _field(info, side, 'image_shape', lambda v: isinstance(v, list) and len(v) == 3 and all(
      is_int(d) for d in v) and 1 <= v[0] <= MAX_SIDE and 1 <= v[1] <= MAX_SIDE
      and 1 <= v[2] <= MAX_CHANNELS,
      f'[H, W, C] with sides 1..{MAX_SIDE} and 1..{MAX_CHANNELS} channels')
  _field(info, side, 'num_classes', lambda v: is_int(v) and 1 <= v <= MAX_CLASSES,
         f'a class count in 1..{MAX_CLASSES}')
  _field(info, side, 'int8', lambda v: isinstance(v, bool), 'true or false')
  _field(info, side, 'model', lambda v: isinstance(v, str) and 0 < len(v) <= 200,
         'a model name')
  _field(info, side, 'params', lambda v: is_int(v) and 0 <= v < 1 << 40, 'a parameter count',
         required=False)
  _field(info, side, 'mean', _finite_list(shape[2]),
         f'{shape[2]} finite per-channel means', required=False)
  _field(info, side, 'std', _finite_list(shape[2], positive=True),
         f'{shape[2]} positive finite per-channel deviations', required=False)
  _field(info, side, 'data', lambda v: isinstance(v, dict), 'a data config object',
         required=False)
  _field(info, side, 'batch', lambda v: is_int(v) and 1 <= v <= 65536,
         "the TFLite signature's batch (1..65536)", required=False)


# ---------------------------------------------------------------- the format of the bytes


def sniff(data: bytes) -> str | None:
  """The format the bytes hold: 'tflite' (flatbuffer identifier 'TFL3'), 'onnx' (a protobuf
  whose first field is ModelProto.ir_version, tag 0x08), 'stablehlo' (a flatbuffer whose root
  offset lies inside the file), or None."""
  if len(data) >= 8 and data[4:8] == b'TFL3':
    return 'tflite'
  if len(data) >= 2 and data[0] == 0x08:
    return 'onnx'
  if len(data) >= 8 and 8 <= int.from_bytes(data[:4], 'little') < len(data):
    return 'stablehlo'
  return None


def check_format(path: str, data: bytes) -> str:
  """The file's format from its suffix, checked against its bytes; UserError on a mismatch."""
  fmt = format_of(path)
  if not data:
    raise UserError(f'{show(path)} is empty (0 bytes): an interrupted copy or export? Export '
                    'it again with `jkd export`.')
  found = sniff(data)
  if found != fmt:
    holds = NAMES[found] if found else 'none of the formats jkd runs'
    fix = (f' (rename it to {next(e for e, f in FORMATS.items() if f == found)})'
           if found and found != 'stablehlo' else '')
    raise UserError(f'{show(path)} is named as {NAMES[fmt]}, but its bytes hold {holds}'
                    f'{fix}. jkd runs files that `jkd export` wrote, under their own suffix.')
  return fmt


# ---------------------------------------------------------------- a damaged file


def bad_file(path: str, fmt: str, error: BaseException | str) -> UserError:
  """The UserError for a FILE that its runtime (or a check before it) cannot use."""
  detail = error if isinstance(error, str) else f'{type(error).__name__}: {str(error)[:200]}'
  return UserError(f'{show(path)} is damaged: it is not {NAMES[fmt]} that jkd can run '
                   f'({show(detail)}). Export it again with `jkd export`.')


def check_jax_trees(path: str, data: bytes) -> None:
  """Counts the nodes of a jax.export program's argument and result trees (with a budget)
  before jax rebuilds them: its deserializer recurses over them without a limit, so an edited
  child offset could make a tree that takes forever to walk."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from jax._src.export import serialization_generated as ser
    exp = ser.Exported.GetRootAsExported(bytearray(data), 0)
    budget = [MAX_TREE_NODES]
    for tree in (exp.InTree(), exp.OutTree()):
      stack = [tree] if tree is not None else []
      while stack:
        node = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
          raise ValueError(f'its argument trees have more than {MAX_TREE_NODES} nodes')
        stack.extend(node.Children(i) for i in range(node.ChildrenLength()))
  except ImportError:
    return  # Another jax layout: its own deserializer's checks apply.
  except Exception as e:  # pylint: disable=broad-except  (struct / index errors of a bad buffer)
    raise bad_file(path, 'stablehlo', e) from None
