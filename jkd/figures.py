"""PNG figures written by the trainers and the demo.

Each function here is self-contained: it takes numpy arrays, writes one PNG and returns its
path. Figures are drawn with matplotlib's object API on an Agg canvas (never `pyplot`), so they
work without a display and never touch global matplotlib state of the caller.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def save_reconstructions(path: str, originals: np.ndarray, masked: np.ndarray,
                         recons: np.ndarray, *, title: str = '',
                         predictions: np.ndarray | None = None,
                         row_labels: Sequence[str] | None = None) -> str:
  """A grid of masked-image-modeling reconstructions: one column per example.

  Rows, top to bottom: originals, masked inputs, raw predictions (optional), reconstructions.

  Args:
    path: the PNG to write.
    originals: (N, H, W, C) floats in [0, 1] (C = 1 is drawn in grey, C = 3 as RGB).
    masked: (N, H, W, C) the model's view, masked patches already marked by the caller (its C
      may differ from the other rows', e.g. RGB marks on grey images).
    recons: (N, H, W, C) reconstructions, e.g. predicted masked patches pasted into the visible
      ones.
    title: figure title (method, step, loss...).
    predictions: optional (N, H, W, C) raw model output everywhere, shown between the two.
    row_labels: names of the rows; default 'original', 'masked', ['prediction',]
      'reconstruction'.

  Returns:
    `path`.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Lazy: matplotlib is slow.
  from matplotlib.figure import Figure

  rows = [originals, masked] + ([predictions] if predictions is not None else []) + [recons]
  labels = list(row_labels or ['original', 'masked'] +
                (['prediction'] if predictions is not None else []) + ['reconstruction'])
  n = originals.shape[0]
  fig = Figure(figsize=(1.3 * n + 1.2, 1.35 * len(rows) + (0.4 if title else 0)), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(rows), n, squeeze=False)
  for r, (images, label) in enumerate(zip(rows, labels)):
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    for i in range(n):
      ax = axes[r, i]
      image = images[i]
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest')
      else:
        ax.imshow(image, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_ylabel(label, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  return path
