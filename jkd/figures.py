"""PNG figures written by the trainers and the demo.

Each function here is self-contained: it takes numpy arrays, writes one PNG and returns its
path. Figures are drawn with matplotlib's object API on an Agg canvas (never `pyplot`), so they
work without a display and never touch global matplotlib state of the caller.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jkd import storage


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
  return storage.save_figure(fig, path)


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(fig)
  return fig


def save_training_curves(path: str, metrics_files: dict[str, str]) -> str:
  """One panel per run: train loss (and eval accuracy on a second axis) against step.

  Args:
    metrics_files: run name -> its `metrics.jsonl`; missing files are skipped.
  """
  import json
  runs = {n: p for n, p in metrics_files.items() if storage.exists(p)}
  fig = _figure(3.2 * max(len(runs), 1), 2.8)
  for i, (name, file) in enumerate(runs.items(), 1):
    lines = [json.loads(l) for l in storage.read_text(file).splitlines() if l.strip()]
    train = [(l['step'], l['loss']) for l in lines if 'loss' in l and 'split' not in l
             and isinstance(l['loss'], (int, float))]
    evals = [(l['step'], l['accuracy']) for l in lines if 'accuracy' in l]
    ax = fig.add_subplot(1, len(runs), i)
    if train:
      ax.plot(*zip(*train), color='tab:blue', label='train loss')
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    if evals:
      ax2 = ax.twinx()
      ax2.plot(*zip(*evals), 'o-', color='tab:orange', label='test accuracy')
      ax2.set_ylim(0, 1)
      ax2.tick_params(labelsize=7, colors='tab:orange')
      # The final accuracy as text: one eval point on a 0-1 axis is hard to read off.
      step, acc = evals[-1]
      ax2.annotate(f'{100 * acc:.1f}%', (step, acc), textcoords='offset points', xytext=(-4, -12),
                   ha='right', fontsize=8, color='tab:orange')
      if i == len(runs):
        ax2.set_ylabel('test accuracy', fontsize=8, color='tab:orange')
    if i == 1:
      ax.set_ylabel('train loss', fontsize=8, color='tab:blue')
  fig.tight_layout()
  return storage.save_figure(fig, path)


def save_accuracy_vs_size(path: str, points: dict[str, dict]) -> str:
  """Test accuracy against stored bytes (log scale), one labelled point per model.

  Args:
    points: name -> {'test_accuracy': float, 'bytes': int}.
  """
  from matplotlib import ticker
  fig = _figure(5.0, 3.4)
  ax = fig.add_subplot(1, 1, 1)
  sizes = set()
  for name, p in points.items():
    if p.get('test_accuracy') is None:
      continue
    acc = 100 * p['test_accuracy']
    # A legend, not labels beside the points: models of one size (scratch and KD students)
    # sit on top of each other.
    ax.scatter(p['bytes'], acc, s=40, label=f'{name}: {acc:.1f}%, {p["bytes"] / 1000:,.0f} kB')
    sizes.add(p['bytes'])
  ax.set_xscale('log')
  # Ticks at the models' own sizes, in kB: log-scale defaults crowd or vanish over a 10x range.
  ax.set_xticks(sorted(sizes))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f'{x / 1000:,.0f} kB'))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.margins(x=0.15, y=0.15)
  ax.legend(fontsize=7, loc='best')
  ax.set_xlabel('stored weights (log scale)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('Accuracy vs size', fontsize=10)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  return storage.save_figure(fig, path)


def save_confusion_matrix(path: str, confusion: np.ndarray, class_names: Sequence[str],
                          *, title: str = '') -> str:
  """The confusion matrix as a heat map: row i is true class i, column j the predicted class,
  each row normalised to sum to 1 (so a row reads as "where class i's images went"); the
  diagonal is the per-class accuracy, written in the cells up to 20 classes.

  Args:
    confusion: [K, K] counts, rows = true labels, columns = predictions.
    class_names: K names (tick labels up to 50 classes; beyond that only the colours).
  """
  confusion = np.asarray(confusion, np.float64)
  k = len(confusion)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  side = min(max(3.5, 0.32 * k + 2.0), 14.0)
  fig = _figure(side + 1.0, side)
  ax = fig.add_subplot(1, 1, 1)
  image = ax.imshow(rates, vmin=0, vmax=1, cmap='Blues', interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  if k <= 50:
    names = [str(n)[:18] for n in class_names]
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          ax.text(j, i, f'{rates[i, j]:.2f}'.lstrip('0'), ha='center', va='center', fontsize=6,
                  color='white' if rates[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title or f'Confusion matrix ({int(confusion.sum())} images)', fontsize=10)
  fig.tight_layout()
  return storage.save_figure(fig, path)
