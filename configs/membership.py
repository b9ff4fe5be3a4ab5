r"""Membership inference: K shadow models on random halves, then LiRA, RMIA, Shokri, thresholds.

The LiRA protocol (Carlini et al. 2022) at MNIST scale: `num_models` models
of one architecture, each trained on a random half of a training pool (each
example in exactly half of the models, `data.membership='random_half'`), in
one vmapped program (`certjax.training.many`). The evaluator ('membership',
section `config.membership`) takes model 0..T-1 as the target in turn, the
others as its shadows, and reports every attack's AUC and TPR at 0.1% and 1%
FPR with a log-log ROC chart.

The target is deliberately overfit: a 784-256-10 MLP trained for 60 epochs
on its 2,000 to 5,000 examples with no weight decay or augmentation reaches
100% training accuracy, so what it memorised shows in its logits.

Argument (`--config=configs/membership.py:<data>[,smoke]`):
  mnist5k (default): the embedded digits, a pool of the 4,000 train digits
    (test scale: what the tests run at 'smoke').
  mnist: full MNIST IDX from ../shared/data/mnist, a pool of the first
    10,000 train digits.
  fashion_mnist: Fashion-MNIST IDX from ../shared/data/fashion_mnist, a pool
    of the first 10,000 train images (harder, so more overfit: the stronger
    attack signal).
  cifar10: CIFAR-10 through TFDS (when prepared), the whole 50,000 train
    split, the IBP-paper medium CNN with crop/flip, flip queries.

Commands (Fashion-MNIST, 32 models):
    python -m launch.train --config=configs/membership.py:fashion_mnist --workdir=/tmp/certjax/mia_fmnist
    python -m launch.evaluate --evaluator=membership --config=configs/membership.py:fashion_mnist --workdir=/tmp/certjax/mia_fmnist

Expected result (measured on Fashion-MNIST, seed 0, 2026-12-03, 2 CPU cores at load 1.5-2,
with the CPU defaults of blocks of 8 models and freed memory kept for reuse):
32 models of 2,344 steps (60 epochs of ~5,000 images each) in 89 s of
training (94 s wall with start-up and compilation; 459 s under load 3-5
before those two defaults); every model 100% on its own training images,
84.7% mean test accuracy (84.2-85.2%). The evaluation (4 targets in turn, 31
shadows each, 5 shift queries per image, 10,000 candidates) took 34 s. TPR at
0.1% FPR: LiRA online fixed-variance 4.18%, online 3.41%, offline fixed
1.16%, offline 0.90%, RMIA online 0.98%, offline 0.71%, class-wise loss
0.20%, Shokri 0.11%, global threshold 0.10%, label-only 0.00% (AUC 0.66 /
0.69 / 0.55 / 0.55 / 0.64 / 0.62 / 0.65 / 0.66 / 0.53 / 0.52). With 16
shadows (`--config.membership.num_shadows=16`, 30 s): online fixed 3.56% >
offline fixed 1.11% > online 0.49% > offline 0.28% > global 0.10%, the
published ordering except that per-example online falls below offline
fixed: 8 IN and 8 OUT models give noisy per-example variances.
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg

DATA = {
    # name: (data.name, manual_dir, train_split, num_models, model, kwargs)
    "mnist5k": ("mnist5k", "", "train", 16, "mlp", {"hidden": (256,)}),
    "mnist": ("mnist", "../shared/data/mnist", "train[:10000]", 32, "mlp", {"hidden": (256,)}),
    "fashion_mnist": ("fashion_mnist", "../shared/data/fashion_mnist", "train[:10000]", 32,
                      "mlp", {"hidden": (256,)}),
    "cifar10": ("cifar10", "", "train", 32, "ibp_medium", {}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  rest, smoke = split_smoke_arg(arg)
  name = rest or "mnist5k"
  if name not in DATA:
    raise ValueError(f"configs/membership.py takes one of {sorted(DATA)} (and 'smoke'); "
                     f"got {arg!r}.")
  data_name, manual_dir, train_split, num_models, model, kwargs = DATA[name]
  config = base_config()
  config.data.name = data_name
  config.data.manual_dir = manual_dir
  config.data.train_split = train_split
  config.data.membership = "random_half"
  config.num_models = num_models
  config.model.name = model
  config.model.kwargs = ml_collections.ConfigDict(kwargs)
  config.batch_size = 128
  config.num_epochs = 60.0
  config.eval_batch_size = 1000
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  config.log_every_steps = 200
  config.checkpoint_every_steps = 1000
  config.membership.num_targets = 4
  config.membership.augmentations = "shift"
  config.membership.population_size = 2000
  if name == "cifar10":
    config.data.augment = "crop_flip"
    config.membership.augmentations = "flip"
  if smoke:
    config = make_smoke(config)
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (32,)})
    config.num_models = 8
    config.num_train_steps = 60
    config.data.train_split = "train[:1000]" if name == "mnist5k" else config.data.train_split
    config.membership.update({"num_targets": 2, "augmentations": "none",
                              "population_size": 200, "batch_size": 500,
                              "label_only_queries": 4})
  return config
