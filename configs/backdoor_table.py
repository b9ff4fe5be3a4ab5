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

Expected result (measured 2026-12-03, full MNIST, ibp_small, 4 epochs of
Adam per run, 1,000 test images; CA / ASR in %):

| attack | rate | none | NC | STRIP | FT | FP | spectral | AC | ABL |
|---|---|---|---|---|---|---|---|---|---|
| badnets | 1% | 99.0/99.7 | 98.8/0.2 | 98.0/59.2 | 99.2/96.0 | 98.5/2.7 | 98.1/97.9 | 96.9/10.8 | 96.9/96.8 |
| badnets | 10% | 99.0/100 | 98.5/0.2 | 98.0/15.9 | 98.7/99.3 | 98.4/23.1 | 94.8/97.7 | 98.2/100 | 97.8/100 |
| blended | 1% | 98.9/98.1 | 99.1/0.4 | 97.9/98.1 | 99.2/88.6 | 99.0/35.6 | 98.0/6.4 | 97.2/3.3 | 97.3/9.6 |
| blended | 10% | 98.7/100 | 98.3/1.7 | 97.7/100 | 98.5/99.0 | 98.4/65.8 | 93.8/90.5 | 97.8/100 | 97.2/100 |
| wanet | 10% | 98.0/91.9 | 98.0/91.9 | 97.0/88.8 | 98.1/1.3 | 98.1/0.1 | 91.7/4.5 | 97.3/89.9 | 95.6/81.2 |
| label flip 1->0 | 10% | 87.4/100 | 97.7/0.0 | n/a | 98.8/0.0 | 98.4/0.0 | 91.9/0.0 | 96.2/4.4 | 86.1/100 |

WaNet at 1% (ASR 0.9%) and Turner et al.'s clean-label backdoor (eps 0.3
against a PGD-trained surrogate; ASR 0.7% at 1%, 0.0% at 10%) did not
implant. About 1.5 hours on 2 CPU cores for the 40 training runs and 40
evaluations (most of it Neural Cleanse, ~3 minutes per poisoned run).
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
