r"""Trains a model from a config file.

    python -m launch.train --config=configs/mnist5k.py --workdir=/tmp/certjax/mnist5k

Override any config key on the command line, e.g.
`--config.optimizer.learning_rate=0.01 --config.num_epochs=5`. Re-running with
the same --workdir resumes from the newest checkpoint there.

Multi-host (GPU cluster or TPU pod slice): start the same command in every
process. Under SLURM/Open MPI `jax.distributed.initialize()` finds its peers
itself; on Cloud TPU VMs add CERTJAX_DISTRIBUTED=auto; elsewhere set
CERTJAX_COORDINATOR_ADDRESS=host:port, CERTJAX_NUM_PROCESSES and
CERTJAX_PROCESS_ID in each process. config.batch_size and eval_batch_size are
global (over all devices of all hosts) and must be multiples of the device
count; each host reads only its slice of every batch. launch/README.md has
the commands for each kind of cluster and where the results land.
"""

from absl import app, flags, logging

from launch import common

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Training configuration file.",
    "Directory for checkpoints, metrics and config.json.")


def main(argv):
  common.start(argv)
  from certjax.training import train_and_evaluate  # pylint: disable=g-import-not-at-top

  result = common.run_reporting_errors(lambda: train_and_evaluate(FLAGS.config, FLAGS.workdir))
  m = result.eval_metrics
  summary = (f"Clean test accuracy: {m['accuracy']:.2%} on {int(m['num_examples'])} "
             f"{result.info.name} test images ({FLAGS.workdir})")
  logging.info(summary)
  print(summary, flush=True)


if __name__ == "__main__":
  app.run(main)
