"""Calibration data for static int8: N batches of the training set, the same on every call.

The batches come from jkd's own train iterator with augmentation off and a fixed shuffle seed,
so two exports of one workdir (and the PyTorch comparison, which reads the same arrays) see
exactly the same images. A converter then computes each tensor's range from them (min/max, or a
percentile of the |values| histogram), which fixes its int8 scale and zero point.
"""
from __future__ import annotations

import numpy as np

from jkd.errors import UserError

METHODS = ('minmax', 'percentile')


def calibration_pixels(data_config, *, num_batches: int = 8, batch_size: int = 32,
                       seed: int = 0, split: str | None = None) -> np.ndarray:
  """(num_batches * batch_size, H, W, C) float32 pixels in [0, 255] from the training split.

  Deterministic: the same config, counts and seed give the same array (a seeded permutation of
  the split, no augmentation). Raises UserError when the split cannot give that many images.
  """
  from jkd import data, interrupt
  if num_batches < 1:
    raise UserError(f'--calibration-batches {num_batches}: static int8 needs calibration data; '
                    'pass --calibration-batches N with N >= 1 (default 8).')
  if batch_size < 1:
    raise UserError(f'--calibration-batch-size {batch_size}: a calibration batch holds at least '
                    'one image; pass --calibration-batch-size N with N >= 1 (default 32).')
  cfg = data_config.copy_and_resolve_references() if hasattr(
      data_config, 'copy_and_resolve_references') else data_config
  with cfg.unlocked() if hasattr(cfg, 'unlocked') else _null():
    cfg.crop_padding = 0
    cfg.flip = False
    cfg.num_workers = 0
    if split:
      cfg.train_split = split
  try:
    it = data.make_train_iterator(cfg, global_batch_size=batch_size, seed=seed,
                                  process_index=0, process_count=1)
    batches = []
    for _ in range(num_batches):  # Between batches: a safe point for SIGTERM / SIGINT.
      interrupt.check('while reading calibration images; nothing was written')
      batches.append(next(it)['image'])
  except UserError as e:
    raise UserError(f'No calibration data: {e} Static int8 reads {num_batches} batches of '
                    f'{batch_size} training images; point config.data at the training set or '
                    'lower --calibration-batches.') from None
  return np.concatenate(batches).astype(np.float32)


def check_method(method: str) -> str:
  """The method name, or UserError listing the valid ones."""
  if method not in METHODS:
    raise UserError(f'calibration method {method!r} is unknown: use {" or ".join(METHODS)}.')
  return method


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False
