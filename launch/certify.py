r"""Certifies a trained model with randomized smoothing (Cohen et al.'s CERTIFY).

    python -m launch.certify --config=configs/mnist5k_smoothing.py \
        --workdir=/tmp/certjax/smoothing

Restores the newest checkpoint in --workdir (train it first with launch.train
and the same config), certifies every `skip`-th image of the test split up to
index `max` (`--config.skip=20 --config.max=1000`, as Cohen et al.'s
certify.py), and writes to <workdir>/certify/: a TSV in Cohen's format
(`idx label predict radius correct time`, readable by their analyze.py), a
summary table (.md) and JSON of certified accuracy per radius with the average
certified radius, and a PNG of certified accuracy against radius. The table
and the paths are printed.

Certification settings live in the config's `certify` section, e.g.
`--config.certify.n=10000 --config.certify.sigma=0.5 --config.certify.batch_size=400`;
`certify.sigma=-1` (the default) uses the training objective's sigma. See
certjax/evaluation/certified.py (`default_config`) for every field. Re-running an interrupted run
with the same settings resumes after the last image written.

Multi-host: start the same command in every process (see launch/README.md);
each host certifies its share of every group of `certify.images_per_call`
images on its own devices, and process 0 writes the gathered certificates.
They do not depend on the number of devices or hosts.

The same as `python -m launch.evaluate --evaluator=certified`.
"""

from absl import app, flags

from launch import common
from launch import run_evaluator

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Config file (the training config, with its certify section).",
    "Workdir of the training run (checkpoints/, config.json).")

main = run_evaluator.main_for("certified")

if __name__ == "__main__":
  app.run(main)
