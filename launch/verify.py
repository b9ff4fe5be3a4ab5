r"""Verified accuracy (IBP, CROWN-IBP, CROWN) of a trained model.

    python -m launch.verify --config=configs/mnist5k_ibp.py --workdir=/tmp/certjax/mnist5k_ibp

Give the same --config and --workdir as to launch.train; the newest checkpoint
there is restored. Evaluation settings live in `config.verify` (eps_list,
methods, batch_size, split) and `config.skip` / `config.max` (every skip-th
image, below index max; -1 = all), e.g.
`--config.verify.eps_list='(0.1,0.3)' --config.verify.methods='("ibp","crown_ibp","crown")'
--config.skip=10`. Results: <workdir>/verify/results.json and results.md,
and the table is printed.

Multi-host: start the same command in every process (see launch/README.md);
bounds run data-parallel over all devices of all hosts, each host reading
only its share of the images; `verify.batch_size` is global, and process 0
writes the results.

The same as `python -m launch.evaluate --evaluator=verified`.
"""

from absl import app, flags

from launch import common
from launch import run_evaluator

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Config file (the training config, with its verify section).",
    "Workdir of the training run (checkpoints/, config.json).")

main = run_evaluator.main_for("verified")

if __name__ == "__main__":
  app.run(main)
