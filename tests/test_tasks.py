"""jkd.tasks: the task axis (config.task) and the classification task's sums and metric."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jkd import tasks, validate
from jkd.errors import UserError
from jkd.tasks.classification import Classification


def test_config_task_picks_the_task_and_old_configs_get_classification():
  assert tasks.get(ml_collections.ConfigDict({'task': 'classification'})) is tasks.get()
  assert isinstance(tasks.get(ml_collections.ConfigDict({'seed': 0})), Classification)
  with pytest.raises(UserError, match="config.task='segmentation' is not a task"):
    tasks.get('segmentation')


def test_validation_names_the_tasks():
  from jkd.config import load_config
  config = load_config('configs/fashion_mnist/supervised.py:tiny', ['task=detection'])
  with pytest.raises(UserError, match=r"config\.task.*'detection'.*classification"):
    validate.check(config, 'train')


def test_classification_sums_and_metric():
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
  labels = jnp.array([0, 2, 2, 1])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # The last row is padding.
  task = tasks.get()
  sums = task.eval_sums(logits, labels, mask, num_classes=3)
  assert float(sums['correct']) == 2 and float(sums['count']) == 3
  expected_loss = -sum(np.log(np.exp(l[y]) / np.exp(l).sum())
                       for l, y in zip(np.asarray(logits)[:3], [0, 2, 2]))
  assert float(sums['loss']) == pytest.approx(expected_loss, rel=1e-6)
  # Row 1 (true 2) predicted as 1; padding counts nowhere.
  assert np.asarray(sums['confusion']).tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
  results = task.results({'correct': 2 / 3, 'loss': 0.5})
  assert results == {'accuracy': 2 / 3, 'loss': 0.5}
  assert task.summary(results) == {'test_accuracy': 2 / 3}
  report = task.report({'confusion': sums['confusion']}, ['a', 'b', 'c'])
  assert report['per_class_accuracy'] == {'a': 1.0, 'b': None, 'c': 0.5}
