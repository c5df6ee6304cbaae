"""List files of a folder dataset: `LIST.csv` (`path,label[,split]`, header optional) or
`LIST.jsonl` (one `{"path": ..., "label": ..., "split": ...}` per line), read and checked.

The text must be UTF-8 (an Excel byte-order mark is dropped); a line has at most 65,536
characters; paths are relative to the list's folder and must name existing regular files.
Labels are names, or integers numbering the classes from 0: below `MAX_CLASSES` and not sparse
(a stray 20000000 would build a head of that many outputs); with `config.data.classes` every
label is one of its names. A file listed twice counts once under one class and split and is
refused across them (`walk.unique`). Every refusal is a `UserError` naming the line.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re

from jkd.data import labelling, walk
from jkd.data.labelling import MAX_CLASSES
from jkd.errors import UserError

_MAX_LINE = 1 << 16  # characters in one line of a list: far more than a path and a label


def _decoded_list(path: str) -> str:
  """The text of a list file: UTF-8, a byte-order mark dropped (Excel writes one), or a
  UserError naming the line with the first byte that is not UTF-8."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise UserError(
        f'{path}, line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset '
        f'{e.start}). Save the list as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).') from None


def read(path: str) -> list[dict[str, str]]:
  """The rows of a CSV or JSONL list: {'path', 'label'[, 'split'], 'line': line number}."""
  text = _decoded_list(path)
  rows = []
  if path.lower().endswith('.jsonl'):
    for number, line in enumerate(text.split('\n'), 1):
      if not line.strip():
        continue
      if len(line) > _MAX_LINE:
        raise UserError(f'{path}, line {number}: {len(line):,} characters, more than a line of '
                        f'a list may have ({_MAX_LINE:,}).')
      try:
        row = json.loads(line)
      except (ValueError, RecursionError) as e:
        raise UserError(f'{path}, line {number}: not JSON ({type(e).__name__}: '
                        f'{str(e)[:200]}). Each line of a JSONL list is an object like '
                        '{"path": "a/1.jpg", "label": "cat"}.') from None
      if not isinstance(row, dict) or 'path' not in row or 'label' not in row:
        raise UserError(f'{path}, line {number}: needs "path" and "label" keys, got '
                        f'{line[:200]!r}.')
      for key in ('path', 'label', 'split'):
        value = row.get(key, '')
        if isinstance(value, bool) or not isinstance(value, (str, int)):
          raise UserError(f'{path}, line {number}: "{key}" is {str(value)[:100]!r}; it must be '
                          'a string (a label may be an integer).')
      rows.append({'path': str(row['path']), 'label': str(row['label']).strip(),
                   'split': str(row.get('split', '')).strip(), 'line': number})
    return rows
  reader = csv.reader(io.StringIO(text, newline=''))
  table = []
  try:
    for r in reader:
      if r and any(c.strip() for c in r):
        if sum(len(c) for c in r) > _MAX_LINE:
          raise UserError(f'{path}, line {reader.line_num}: more characters than a line of a '
                          f'list may have ({_MAX_LINE:,}).')
        table.append((reader.line_num, r))
  except csv.Error as e:
    raise UserError(f'{path}, line {reader.line_num}: not CSV ({e}). Write one "path,label" '
                    'line per image.') from None
  if not table:
    raise UserError(f'{path} is empty: write one "path,label" line per image.')
  header = [c.strip().lower() for c in table[0][1]]
  if 'path' in header and 'label' in header:
    columns, table = header, table[1:]
  else:
    columns = ['path', 'label', 'split'][:len(table[0][1])]
  for number, row in table:
    if len(row) != len(columns) or len(columns) < 2:
      raise UserError(f'{path}, line {number}: expected the columns {columns}, got '
                      f'{row[:5]}.')
    values = {k: v.strip() for k, v in zip(columns, row)}
    rows.append({'path': values['path'], 'label': values['label'],
                 'split': values.get('split', ''), 'line': number})
  return rows


def _numeric_labels(rows, path: str) -> list[int] | None:
  """The labels as integers when every label is one (class i is label i), else None.

  Raises:
    UserError: a negative label, one of `MAX_CLASSES` or more, or sparse labels (far fewer
      distinct values than the largest + 1: a model with that many outputs would be built).
  """
  if not all(re.fullmatch(r'[+-]?\d+', r['label']) for r in rows):
    return None
  labels = []
  for r in rows:
    digits = r['label'].lstrip('+-').lstrip('0') or '0'
    value = int(digits) if len(digits) <= 9 else MAX_CLASSES  # no 10**4300-digit int()
    if r['label'].startswith('-') and value:
      value = -value
    if value < 0 or value >= MAX_CLASSES:
      raise UserError(
          f'{path}, line {r["line"]}: label {r["label"][:30]!r} is not a class id in [0, '
          f'{MAX_CLASSES:,}). Integer labels number the classes from 0; use names instead, or '
          'renumber them.')
    labels.append(value)
  count, distinct = max(labels) + 1, len(set(labels))
  if count > max(2 * distinct, distinct + 100):
    raise UserError(
        f'{path}: the integer labels are sparse: {distinct} distinct values up to '
        f'{count - 1}, which would make a {count}-class model. Renumber the classes 0..'
        f'{distinct - 1}, or name them all with --config.data.classes (then a label is one of '
        'those names).')
  return labels


def index(path: str, holdout: float, seed: int, given):
  """('list', classes, splits) of the list file `path`: its own split column, else a held-out
  fraction `holdout` of each class (`labelling.holdout`); `given` is `config.data.classes`."""
  rows = read(path)
  if not rows:
    raise UserError(f'{path} lists no images: write one "path,label" line per image.')
  for r in rows:
    if not r['path'] or not r['label']:
      raise UserError(f'{path}, line {r["line"]}: the {"path" if not r["path"] else "label"} '
                      'is empty. Every line names a file and its class.')
  base = os.path.dirname(os.path.abspath(path))
  paths = [os.path.normpath(os.path.join(base, os.path.expanduser(r['path']))) for r in rows]
  for p, r in zip(paths, rows):
    if '\0' in p:
      raise UserError(f'{path}, line {r["line"]}: the path has a NUL character.')
  missing = [(p, r['line']) for p, r in zip(paths, rows) if not os.path.isfile(p)]
  if missing:
    raise UserError(
        f'{path} names {len(missing)} files that do not exist (or are not regular files), e.g. '
        f'{[p for p, _ in missing[:3]]} (line {missing[0][1]}; paths are relative to the list '
        'file\'s folder). Fix the paths or remove those lines.')
  names = [r['label'] for r in rows]
  numeric = None if given else _numeric_labels(rows, path)
  if numeric is not None:
    classes = [str(i) for i in range(max(numeric) + 1)]
    labels = numeric
  else:
    known = set(given or ())
    for r in rows:
      if given and r['label'] not in known:
        raise UserError(
            f'{path}, line {r["line"]}: label {r["label"][:60]!r} is not one of '
            f'config.data.classes ({len(given)} names: {list(given)[:5]}'
            f'{" ..." if len(given) > 5 else ""}). Fix the label or add the class.')
    classes = labelling.named_classes(given, sorted(set(names)), path)
    position = {c: i for i, c in enumerate(classes)}
    labels = [position[n] for n in names]
  split_of = [r['split'] or '' for r in rows]
  with_splits = all(split_of)
  owner: dict[str, tuple[str, str, str]] = {}
  kept = []
  for p, l, s, r in zip(paths, labels, split_of, rows):
    shown = [f'{path}, line {r["line"]} ({p!r})']
    if walk.unique([p], owner, classes[l], s if with_splits else '', shown) == [p]:
      kept.append((p, l, s))
  if with_splits:
    grouped: dict[str, tuple[list, list]] = {}
    for p, l, s in kept:
      grouped.setdefault(s, ([], []))
      grouped[s][0].append(p)
      grouped[s][1].append(l)
  else:
    by_class: dict[int, list[str]] = {}
    for p, l, _ in kept:
      by_class.setdefault(l, []).append(p)
    grouped = labelling.holdout(by_class, holdout, seed, classes)
  splits = {name: labelling.ordered(ps, ls, seed, name) for name, (ps, ls) in grouped.items()}
  return 'list', classes, splits
