r"""Runs any registered evaluator on a trained workdir.

    python -m launch.evaluate --evaluator=robust --config=configs/mnist5k_pgd_at.py \
        --workdir=/tmp/certjax/mnist5k_pgd_at

Evaluators (`certjax.evaluation.evaluator_names()`), each reading its section
of the config:

  robust     (config.attack)   robust accuracy under a sequence of attacks
  verified   (config.verify)   verified accuracy under IBP / CROWN-IBP / CROWN
  certified  (config.certify)  certified accuracy of the smoothed classifier
  inversion  (config.inversion)  class inversion and gradient (DLG, Inverting
                               Gradients) inversion
  extraction (config.extraction) Knockoff, exact ReLU extraction and Square
                               through a counting query interface, per defence
  membership (config.membership) membership inference on the K models of a
                               many-models run (configs/membership.py)
  property   (config.property)   property inference on the shadow models of a
                               many-models run (configs/property.py)
  backdoor   (config.backdoor) clean accuracy, attack success and poison
                               detection of a run trained with config.poison
                               (configs/backdoor.py)
  defences   (config.defence)  inference-time defences (input transformations,
                               distillation, thermometer, ensembles, detectors)
                               under naive and adaptive attacks, with
                               gradient-masking diagnostics (configs/defences.py)

Give the config the model was trained with, plus overrides of that section
and of `config.skip` / `config.max` (every skip-th image of the split below
index max; -1: all), e.g. `--config.attack.eps_list='(0.1,0.3)' --config.skip=10`.
The newest checkpoint is evaluated unless `--config.<section>.checkpoint_step`
says otherwise. Results go to `<workdir>/<section>/` and the table and file
paths are printed. `launch.attack`, `launch.verify` and `launch.certify` are
this command with the evaluator fixed.

Multi-host: start the same command in every process (see launch/README.md);
each host evaluates its share of the images on its own devices and process
0 writes the gathered results.
"""

from absl import app, flags

from launch import common
from launch import run_evaluator

FLAGS = flags.FLAGS
common.define_config_and_workdir(
    "Config file (the training config, with the evaluator's section).",
    "Workdir of the training run (checkpoints/, config.json).")
# A string, checked against the registry when the run starts (an unknown name
# is one line listing the registered ones), so that new evaluation families
# need no change here.
flags.DEFINE_string("evaluator", None,
                    "The evaluator to run: a name from certjax.evaluation.evaluator_names(), "
                    "e.g. robust, verified, certified, membership.")
flags.mark_flag_as_required("evaluator")

main = run_evaluator.main_for(None)

if __name__ == "__main__":
  app.run(main)
