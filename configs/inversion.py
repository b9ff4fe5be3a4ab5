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
  cifar10: CIFAR-10 through TFDS when prepared (not measured here).
  evaluator: the evaluation classifier's training config (MLP, seed 1)
    instead of the target's.
  smoke: seconds on a CPU (what the tests run): the smoke model and a few
    steps of every attack.

Commands (mnist5k):
    python -m launch.train --config=configs/inversion.py --workdir=/tmp/certjax/inv_target
    python -m launch.train --config=configs/inversion.py:mnist5k,evaluator --workdir=/tmp/certjax/inv_evaluator
    python -m launch.evaluate --evaluator=inversion --config=configs/inversion.py --workdir=/tmp/certjax/inv_target --config.inversion.evaluation_workdir=/tmp/certjax/inv_evaluator

Expected result (measured on mnist5k, seed 0, 2026-12-03, 2 CPU cores shared
with other jobs at load average 2.4-6.9): the target reaches the quickstart's
96.8% test accuracy (42.6 s wall), the evaluation MLP 94.3% (11.6 s wall);
the evaluation takes 18m08s wall (class inversion 1.6 min, DLG 1.7/4.5 min,
original DLG 1.4/2.8 min, Inverting Gradients 1.7/4.3 min at B = 1/4).

  class inversion: the target's confidence 0.9999 on every class (all 5,000
  steps); the evaluation MLP classifies 10/10 inversions as their class
  (mean p 0.969). The inversions look like structured noise, not digits:
  the figure measures what transfers between the two models, not
  recognisability by eye.

  | B | attack              | PSNR (dB) | SSIM  | label recovery |
  |---|---------------------|-----------|-------|----------------|
  | 1 | dlg (iDLG labels)   |  7.43     | 0.314 | 100%  (iDLG)   |
  | 1 | dlg_joint           |  5.64     | -0.019| 0%             |
  | 1 | inverting_gradients | 26.29     | 0.795 | 100%  (iDLG)   |
  | 4 | dlg (LLG labels)    |  5.76     | 0.114 | 56.2% (LLG)    |
  | 4 | dlg_joint           |  5.44     | 0.041 | 25.0%          |
  | 4 | inverting_gradients | 11.38     | 0.274 | 56.2% (LLG)    |

  DLG fails on this trained ReLU CNN: the model is confident (p >= 0.998 on
  the four digits), so the shared gradient is tiny (squared norm 0.058,
  8e-10, 3e-7 and 2e-11) and DLG's absolute squared distance is nearly zero
  for any image (its loss 4.7e-10 against 7.9e-10 for the '8'), while
  ReLU's zero second derivative leaves L-BFGS little curvature; DLG's
  published results are on untrained sigmoid LeNets. Inverting Gradients'
  cosine distance does not depend on the scale: 3 of 4 single digits at
  25.7-41.7 dB (the '1', squared gradient norm 2e-11, at 5.4 dB). At B = 4
  LLG's counts assume near-uniform predictions and recover 56% of the labels
  of this confident model; IG then reconstructs one image per batch well
  (18-25 dB) and the rest poorly (medians 29.0 dB at B = 1, 8.8 dB at
  B = 4). The labels are not what limits it: given the true labels
  (`--config.inversion.label_source=true`, IG alone at B = 4: 3m39s wall,
  load 0.2-1.8) it reaches 12.46 dB, SSIM 0.321, still one image per batch
  (23-32 dB) and the rest at 4-12 dB. DLG on the trained evaluation MLP
  itself (`--config=configs/inversion.py:mnist5k,evaluator` on its workdir,
  dlg and dlg_joint only, 60 s wall) is no better: 8.47/8.07 dB with iDLG/LLG
  labels, 6.55/6.59 dB jointly at B = 1/4; so DLG's failure here comes from
  the trained model's tiny gradient more than from the convolutions.
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg

DATA = {
    # name: (data.name, manual_dir, batch_size, num_epochs, learning rate)
    "mnist5k": ("mnist5k", "", 100, 25.0, 2e-3),
    "mnist": ("mnist", "../shared/data/mnist", 128, 10.0, 1e-3),
    "fashion_mnist": ("fashion_mnist", "../shared/data/fashion_mnist", 128, 10.0, 1e-3),
    # Through TFDS when prepared (no download here); not measured on this machine.
    "cifar10": ("cifar10", "", 128, 30.0, 1e-3),
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
