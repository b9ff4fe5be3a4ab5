r"""Robust accuracy of a model trained by launch/train.py, per attack and eps.

    python -m launch.attack --config=configs/mnist5k_pgd_at.py \
        --workdir=/tmp/certjax/mnist5k_pgd_at

Use the config the model was trained with; the attack settings are
`config.attack.*` (see certjax/evaluation/robust.py) and the images every
`config.skip`-th of the split below index `config.max` (-1: all), e.g.
`--config.attack.suite=autoattack --config.attack.eps_list='(0.1,0.3)'
--config.skip=10 --config.max=1000` for AutoAttack's standard version, or
`--config.attack.attacks='("pgd","autoattack_custom")'` for a configurable one. Writes <workdir>/attack/results.json and
results.md and prints the table.

Multi-host: start the same command in every process (see launch/README.md);
each host attacks only its share of the images and process 0 writes the
gathered results.

The same as `python -m launch.evaluate --evaluator=robust`.
"""

from absl import app, flags

from launch import common
from launch import run_evaluator

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Config file (the training config, with its attack section).",
    "Workdir of the training run (checkpoints/, config.json).")

main = run_evaluator.main_for("robust")

if __name__ == "__main__":
  app.run(main)
