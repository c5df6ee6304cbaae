"""Classes and splits of labelled files, the same for class folders, split folders and lists.

The class list is `config.data.classes` when given (its order is the label order; every class
found must be in it), else the sorted folder names or label values, as torchvision's
`ImageFolder` numbers them; at most `MAX_CLASSES`. Without split folders or a split column, a
seeded fraction of each class is held out as `HOLDOUT_SPLIT`. Each split lists its files in a
fixed order seeded by (seed, split name), so a slice such as 'train[:10%]' samples every class.
Its own module so that `folder` and `lists` share it without importing each other.
"""
from __future__ import annotations

import zlib

import numpy as np

from jkd.errors import UserError

HOLDOUT_SPLIT = 'val'
# The most classes a dataset may have (ImageNet-21k has 21,841): integer labels must be below
# it, so that one stray label such as 20000000 cannot build a head of that many outputs.
MAX_CLASSES = 100_000


def _stable(text: str) -> int:
  return zlib.crc32(text.encode('utf-8'))


def ordered(paths: list[str], labels: list[int], seed: int, split: str):
  """Sorts a split by (label, path), then applies a permutation fixed by (seed, split name)."""
  pairs = sorted(zip(labels, paths))
  order = np.random.default_rng([seed, _stable(split)]).permutation(len(pairs))
  return (tuple(pairs[i][1] for i in order),
          np.array([pairs[i][0] for i in order], np.int32))


def holdout(by_class: dict[int, list[str]], fraction: float, seed: int, classes) -> dict:
  """Splits each class's sorted files into 'train' and 'val': round(fraction * n) of them
  (at least one when fraction > 0 and the class has two or more), drawn by (seed, class name)."""
  if not 0 <= fraction < 1:
    raise UserError(f'config.data.holdout={fraction} must be in [0, 1): the fraction of each '
                    "class held out as the 'val' split, e.g. 0.1.")
  out = {'train': ([], []), HOLDOUT_SPLIT: ([], [])}
  for label, files in sorted(by_class.items()):
    files = sorted(files)
    n = len(files)
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
      k = min(max(k, 1), n - 1)
    held = set(np.random.default_rng([seed, _stable(classes[label])]).permutation(n)[:k].tolist())
    for i, path in enumerate(files):
      split = out[HOLDOUT_SPLIT if i in held else 'train']
      split[0].append(path)
      split[1].append(label)
  return {name: split for name, split in out.items() if split[0]}


def named_classes(given, found: list[str], where: str) -> list[str]:
  """The class list: `config.data.classes` when given (its order is the label order; every
  class found must be in it), else the classes found, sorted.

  Args:
    given: `config.data.classes` (None or a sequence of names).
    found: the class names the data has (folder names or label values).
    where: what to name in the message for an unknown class (a folder or a list file).
  """
  if not given:
    return sorted(found)
  names = list(given) if isinstance(given, (list, tuple)) else None
  if names is None or not all(isinstance(n, str) and n for n in names):
    raise UserError(f'config.data.classes={given!r} must be a tuple of class names (non-empty '
                    "strings), e.g. \"('cat', 'dog')\"; its order is the label order.")
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise UserError(f'config.data.classes names {twice[:5]} more than once: each class once.')
  if len(names) > MAX_CLASSES:
    raise UserError(f'config.data.classes has {len(names):,} names, more than the '
                    f'{MAX_CLASSES:,} classes jkd trains.')
  unknown = sorted(set(found) - set(names))
  if unknown:
    raise UserError(f'{where} has the classes {unknown[:5]}, which config.data.classes '
                    f'({len(names)} names: {names[:5]}{" ..." if len(names) > 5 else ""}) lacks. '
                    'Add them to config.data.classes, or remove those images.')
  return names
