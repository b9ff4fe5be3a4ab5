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
"""

from absl import app, flags, logging

from launch import common

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Configuration file (the training config).",
    "Training workdir holding checkpoints/.")


def main(argv):
  common.start(argv)
  from certjax.bounds import verify_run  # pylint: disable=g-import-not-at-top

  result = common.run_reporting_errors(
      lambda: verify_run.run_verification(FLAGS.config, FLAGS.workdir))
  logging.info("Wrote %s and %s", result.json_path, result.table_path)
  print(result.table, flush=True)


if __name__ == "__main__":
  app.run(main)
