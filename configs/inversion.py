r"""Model inversion and gradient inversion: what a trained classifier and its gradient reveal.

Two models of one data set: the target (the quickstart's IBP-paper small CNN,
`configs/mnist5k.py`'s training) and, in another workdir, an evaluation
classifier of another architecture and seed (a 784-256-256-10 MLP, seed 1)
that never saw the target. The evaluator ('inversion', section
`config.inversion`, `certjax.evaluation.inversion`) then

  * inverts every class of the target (Fredrikson et al. 2015, the paper's
    cost 1 - p_c, 5,000 steps of 0.1 at most, patience 100) and reports the
    evaluation classifier's accuracy on the inversions;
  * attacks FedSGD gradients of the target (batch-mean cross-entropy at the
    final checkpoint) on 4 batches each of 1 and 4 test images: labels read
    off the head's gradient (iDLG for one image, LLG for four), then DLG with
    those labels (iDLG's form; 300 L-BFGS iterations), the original DLG with
    jointly optimised soft labels ('dlg_joint'), and Inverting Gradients
    (Geiping et al. 2020; 4,800 signed-Adam steps, TV 1e-4); PSNR/SSIM after
    Hungarian matching.

Argument (`--config=configs/inversion.py:<data>[,evaluator][,smoke]`):
  mnist5k (default): the embedded 5,000 digits (4,000 train / 1,000 test).
  mnist: full MNIST IDX from ../shared/data/mnist.
  fashion_mnist: Fashion-MNIST IDX from ../shared/data/fashion_mnist.
  evaluator: the evaluation classifier's training config (MLP, seed 1)
    instead of the target's.
  smoke: seconds on a CPU (what the tests run): the smoke model and a few
    steps of every attack.

Commands (mnist5k):
    python -m launch.train --config=configs/inversion.py --workdir=/tmp/certjax/inv_target
    python -m launch.train --config=configs/inversion.py:mnist5k,evaluator --workdir=/tmp/certjax/inv_evaluator
    python -m launch.evaluate --evaluator=inversion --config=configs/inversion.py --workdir=/tmp/certjax/inv_target --config.inversion.evaluation_workdir=/tmp/certjax/inv_evaluator

Measured (mnist5k, seed 0, 2026-12-03, 2 CPU cores shared with other jobs,
load average 2.4-3.8): the target reaches the quickstart's 96.8% test
accuracy (42.6 s wall), the evaluation MLP 94.3% (11.6 s wall).
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg

DATA = {
    # name: (data.name, manual_dir, batch_size, num_epochs, learning rate)
    "mnist5k": ("mnist5k", "", 100, 25.0, 2e-3),
    "mnist": ("mnist", "../shared/data/mnist", 128, 10.0, 1e-3),
    "fashion_mnist": ("fashion_mnist", "../shared/data/fashion_mnist", 128, 10.0, 1e-3),
}
EVALUATOR = "evaluator"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  rest, smoke = split_smoke_arg(arg)
  parts = [p for p in rest.split(",") if p]
  evaluator = EVALUATOR in parts
  parts = [p for p in parts if p != EVALUATOR]
  name = parts[0] if parts else "mnist5k"
  if len(parts) > 1 or name not in DATA:
    raise ValueError(f"configs/inversion.py takes one of {sorted(DATA)}, optionally "
                     f"'{EVALUATOR}' and 'smoke'; got {arg!r}.")
  data_name, manual_dir, batch_size, num_epochs, learning_rate = DATA[name]
  config = base_config()
  config.data.name = data_name
  config.data.manual_dir = manual_dir
  config.model.name = "ibp_small"
  config.batch_size = batch_size
  config.num_epochs = num_epochs
  config.eval_batch_size = 500
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  if evaluator:
    # Another architecture and another seed: it shares no weights, no
    # initialisation and no data order with the target.
    config.seed = 1
    config.model.name = "mlp"
  config.inversion.gradient_attacks = ("dlg", "dlg_joint", "inverting_gradients")
  config.inversion.gradient_batch_sizes = (1, 4)
  config.inversion.num_batches = 4
  if smoke:
    config = make_smoke(config)
    config.inversion.update({"classes": (0, 1), "num_steps": 5, "gradient_batch_sizes": (1,),
                             "num_batches": 1, "dlg_num_steps": 3, "ig_num_steps": 5})
  return config
