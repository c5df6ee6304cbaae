"""Input pipeline: datasets (Fashion-MNIST IDX, TFDS, synthetic, the user's image folders) through
Grain, and augmentation.

Host side (numpy, in Grain): `make_train_iterator` (infinite, shuffled, augmented,
checkpointable), `make_eval_iterator` (one padded pass with a mask), `synthetic_batches`.
Device side (jax, in the step): `normalize`, `mixup`, `cutmix`, `rand_augment`,
`random_erasing`.
Folders of image files: `jkd.data.folder` (layouts), `jkd.data.jpeg` (decoding straight to the
crop), `jkd.data.prepare` (`jkd data prepare`: ArrayRecord shards).
"""
from jkd.data.augment import cutmix
from jkd.data.augment import mixup
from jkd.data.augment import normalize
from jkd.data.randaugment import rand_augment
from jkd.data.randaugment import random_erasing
from jkd.data.pipeline import default_data_config
from jkd.data.pipeline import EvalIterable
from jkd.data.pipeline import make_eval_iterator
from jkd.data.pipeline import make_train_iterator
from jkd.data.pipeline import synthetic_batches
from jkd.data.pipeline import SyntheticIterator
from jkd.data.pipeline import TrainIterator
from jkd.data.sources import DatasetInfo
from jkd.data.sources import get_info
from jkd.data.sources import load_fashion_mnist
from jkd.data.sources import read_idx

__all__ = [
    'DatasetInfo', 'EvalIterable', 'SyntheticIterator', 'TrainIterator', 'cutmix',
    'default_data_config', 'get_info', 'load_fashion_mnist', 'make_eval_iterator',
    'make_train_iterator', 'mixup', 'normalize', 'rand_augment', 'random_erasing', 'read_idx',
    'synthetic_batches',
]
