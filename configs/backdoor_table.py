r"""The attack x defence table (BackdoorBench's CA / ASR grid), as one sweep.

Argument (`--config=configs/backdoor_table.py:<data>[,smoke]`): data is one
of configs/backdoor.py's (mnist5k, mnist, fashion_mnist, cifar10).

Every poisoned run, retraining and evaluation it needs is trained and
evaluated by `certjax.training.backdoor_table` under --workdir, each skipped
when already done; the table lands in <workdir>/table.{md,json,png}.
Columns: no defence, Neural Cleanse (with unlearning), STRIP (with
rejection), fine-tuning and fine-pruning on 5% clean training data,
retraining without what spectral signatures and activation clustering
remove, and anti-backdoor learning (its own isolation-model run). Rows: the
attacks at 1% and 10% of the training set.

Command (full MNIST; Turner et al.'s clean-label poisons perturbed against an
adversarially trained model, e.g. configs/defences.py:mnist,pgd_at):
    python -m launch.backdoor_table --config=configs/backdoor_table.py:mnist \
        --config.surrogate_workdir=/tmp/certjax/defences_mnist_pgd_at \
        --workdir=/tmp/certjax/bd

Expected result and runtime: see the issue 13 closing note and README
("Data poisoning and backdoors"); 10 poisoned runs, 30 more training runs
and 40 evaluations, about 1.5 hours on 2 CPU cores.
"""

import ml_collections

DATA = ("mnist5k", "mnist", "fashion_mnist", "cifar10")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "mnist5k").split(",") if p]
  smoke = "smoke" in parts
  parts = [p for p in parts if p != "smoke"]
  if len(parts) > 1 or (parts and parts[0] not in DATA):
    raise ValueError(f"configs/backdoor_table.py takes '<data>[,smoke]' with data one of "
                     f"{DATA}; got {arg!r}.")
  config = ml_collections.ConfigDict({
      "run_config": "configs/backdoor.py",
      "data": parts[0] if parts else "mnist5k",
      "attacks": ("badnets", "blended", "wanet", "clean_label", "label_flip_pairwise"),
      "rates": (0.01, 0.1),
      "defences": ("none", "neural_cleanse", "strip", "fine_tuning", "fine_pruning",
                   "spectral", "activation_clustering", "abl"),
      "surrogate_workdir": "",
      "smoke": smoke,
      "skip": 10,
      "max": -1,
      "backdoor": ml_collections.ConfigDict(),
      "overrides": ml_collections.ConfigDict(),
  })
  if smoke:
    config.attacks = ("badnets", "label_flip_pairwise")
    config.rates = (0.1,)
    config.skip = 1
    config.backdoor = ml_collections.ConfigDict({
        "nc_epochs": 2, "nc_batches_per_epoch": 2, "strip_overlays": 2, "repair_epochs": 1,
        "clean_size": 50, "repair_fraction": 0.05})
  return config
