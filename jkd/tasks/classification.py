"""Image classification: one label per image, logits (B, K), accuracy and per-class counts."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def confusion_counts(labels, predictions, mask, num_classes: int):
  """[K, K] float32 counts: entry (i, j) sums `mask` over the rows of true class i predicted
  as j. A scatter-add (O(batch)), not a [B, K] x [B, K] product, so 1000 classes cost nothing."""
  return jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, predictions].add(
      mask.astype(jnp.float32))


def per_class(confusion, class_names: Sequence[str] | None = None) -> dict:
  """{'class_names', 'per_class_accuracy' (name -> accuracy, None for a class with no example),
  'confusion' (rows = true class, columns = predicted, integer counts)} from [K, K] counts."""
  counts = np.rint(np.asarray(confusion)).astype(np.int64)
  names = list(class_names or [])
  if len(names) != len(counts):  # runs saved before class names were recorded: numbers
    names = [str(i) for i in range(len(counts))]
  totals = counts.sum(1)
  return {'class_names': names,
          'per_class_accuracy': {n: (round(float(counts[i, i] / totals[i]), 6) if totals[i]
                                     else None) for i, n in enumerate(names)},
          'confusion': counts.tolist()}


class Classification:
  """The classification task.

  Outputs: logits (B, K) per image; targets: integer labels (B,) or soft (B, K) (mixup).
  Eval sums: `correct`, `loss` (cross-entropy) and `count` over valid rows, and the [K, K]
  `confusion` counts; the metric is accuracy = correct / count. An exported model maps uint8
  images (B, H, W, C) to float32 logits (B, K).
  """
  name = 'classification'
  metric = 'accuracy'          # The headline number, in eval results.
  summary_metric = 'test_accuracy'  # Its key in summary.json and eval.json.
  output = 'logits per image (B, K)'

  @staticmethod
  def eval_sums(logits, labels, mask, num_classes: int | None = None) -> dict[str, jax.Array]:
    """Per-batch sums over rows where `mask` is 1: correct predictions, cross-entropy, count,
    and with `num_classes` the confusion counts."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    predictions = jnp.argmax(logits, -1)
    correct = (predictions == labels).astype(jnp.float32)
    sums = {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
            'count': jnp.sum(mask)}
    if num_classes is not None:
      sums['confusion'] = confusion_counts(labels, predictions, mask, num_classes)
    return sums

  @staticmethod
  def results(out: dict[str, Any]) -> dict[str, Any]:
    """Eval results from sums already divided by the count: `correct` becomes `accuracy`."""
    if 'correct' in out:
      out['accuracy'] = out.pop('correct')
    return out

  def summary(self, results: Mapping[str, Any]) -> dict[str, Any]:
    """What summary.json and eval.json carry beside the results: the test accuracy."""
    return {self.summary_metric: results[self.metric]} if self.metric in results else {}

  @staticmethod
  def report(results: dict[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
    """`jkd eval`'s per-class additions: the confusion counts become per-class accuracy."""
    confusion = results.pop('confusion', None)
    return per_class(confusion, class_names) if confusion is not None else {}


TASK = Classification()
