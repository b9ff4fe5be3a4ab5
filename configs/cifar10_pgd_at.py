r"""Adversarial training on CIFAR-10 at L-infinity eps = 8/255.

`get_config()` / `get_config('pgd_at')`: PGD-AT (Madry et al. 2018) in the
setup of Rice et al. 2020: PreAct ResNet-18, PGD-7 with steps of 2/255 from a
random start in training, SGD lr 0.1 momentum 0.9, weight decay 5e-4, batch
128, 200 epochs with the learning rate divided by 10 at epochs 100 and 150,
random crop + flip.
`get_config('trades')`: TRADES (Zhang et al. 2019): beta 6, eps 0.031, 10
steps of 0.007, weight decay 2e-4, 100 epochs, lr divided by 10 at epochs 75
and 90 (the paper's WRN-34-10 is `--config.model.name=wrn34_10`).
`get_config('fast_at')`: FGSM with random start (Wong et al. 2020): alpha =
1.25 eps = 10/255, 15 epochs, triangular (cyclic) learning rate peaking at 0.2
halfway.

The data set must be prepared in TFDS's format (see configs/cifar10_resnet20.py).

Commands:
    python -m launch.train --config=configs/cifar10_pgd_at.py --workdir=/tmp/certjax/c10_at \
        --config.data.data_dir=$HOME/tensorflow_datasets
    python -m launch.attack --config=configs/cifar10_pgd_at.py --workdir=/tmp/certjax/c10_at \
        --config.data.data_dir=$HOME/tensorflow_datasets

Expected result: not measured here (no CIFAR-10 training set on the
reference machine; about a day of GPU time for PGD-AT on one older GPU, a
few hours on a modern one; impossible on 2 CPU cores). Literature
for PreAct ResNet-18: Rice et al. report about 82-85% clean and, under PGD-20
at 8/255, about 52% robust accuracy at the best checkpoint and about 45-47%
at the end of training (robust overfitting); Wong et al. report 83.8% clean
and 46.1% under PGD-50 with 10 restarts for fast_at (15 epochs); TRADES
reports 84.9% clean and 56.6% under PGD-20 for WRN-34-10. The attack
section evaluates PGD-20 with steps of 2/255 (`--config.attack.suite=autoattack`
runs AutoAttack's standard version instead, Croce & Hein 2020: typically 3-5
points lower).
"""

import math

import ml_collections

from certjax import validation
from certjax.training.config import base_config
from certjax.training.objectives import adversarial, objective_defaults

NUM_TRAIN = 50_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = validation.check_choice(arg or "pgd_at", "adversarial-training objective",
                                 adversarial.OBJECTIVE_NAMES)
  config = base_config()
  config.data.name = "cifar10"
  config.data.augment = "crop_flip"
  config.model.name = "preact_resnet18"
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "piecewise"
  config.optimizer.decay_factor = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.objective = objective_defaults(name)
  config.objective.eps = 8 / 255
  if name == "pgd_at":
    config.num_epochs = 200.0
    config.optimizer.decay_boundaries = (0.5, 0.75)
    config.objective.num_steps = 7
    config.objective.step_size = 2 / 255
  elif name == "trades":
    config.num_epochs = 100.0
    config.optimizer.weight_decay = 2e-4
    config.optimizer.decay_boundaries = (0.75, 0.9)
    config.objective.eps = 0.031
    config.objective.beta = 6.0
    config.objective.num_steps = 10
    config.objective.step_size = 0.007
  else:
    config.num_epochs = 15.0
    config.optimizer.learning_rate = 0.2
    config.optimizer.schedule = "linear"
    config.optimizer.warmup_steps = int(
        0.5 * math.ceil(config.num_epochs * NUM_TRAIN / config.batch_size))
    config.objective.rel_step_size = 1.25
  config.attack.norm = "linf"
  config.attack.eps_list = (8 / 255,)
  config.attack.attacks = ("fgsm", "pgd")
  config.attack.num_steps = 20
  config.attack.step_size = 2 / 255
  config.attack.batch_size = 500
  return config
