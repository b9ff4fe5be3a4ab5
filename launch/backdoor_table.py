r"""Trains and evaluates every run of the attack x defence table, then writes it.

    python -m launch.backdoor_table --config=configs/backdoor_table.py:mnist \
        --workdir=/tmp/certjax/bd

Re-running with the same --workdir skips what is done. The table lands in
<workdir>/table.{md,json,png}; each run in <workdir>/<attack>_<rate>[-...].
"""

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Table configuration file (configs/backdoor_table.py).",
    "Directory holding every run of the table and the table itself.")


def main(argv):
  common.start(argv)
  from certjax.training import backdoor_table  # pylint: disable=g-import-not-at-top

  payload = common.run_reporting_errors(
      lambda: backdoor_table.run_table(FLAGS.config, FLAGS.workdir))
  print(backdoor_table.table_markdown(payload["rows"], tuple(FLAGS.config.defences),
                                      FLAGS.config), flush=True)


if __name__ == "__main__":
  app.run(main)
