r"""Inference-time defences and the adaptive attacks that break them (Athalye et al. 2018).

One config per data set, with a second argument choosing which model of the
study to train; the 'defences' evaluator (section `config.defence`) then
puts every row in one table: the undefended model, that model behind each
input transformation (bit depth, median, JPEG, TV minimisation, random
resize-and-pad), a defensively distilled student, a thermometer-encoded
model, an ensemble, and three detectors (feature squeezing, Mahalanobis,
STRIP-like), each under the naive attack (gradients of the defence as
written) and the adaptive one (BPDA, EOT, CW's margin loss, the joint loss
over classifier and detector), with the gradient-masking diagnostics.

Argument (`--config=configs/defences.py:<data>[,<model>][,smoke]`):
  data: mnist5k (default; the embedded digits), mnist (full MNIST IDX from
    ../shared/data/mnist, eps 0.3), fashion_mnist (IDX from
    ../shared/data/fashion_mnist, eps 0.1), cifar10 (TFDS when prepared,
    eps 8/255, ResNet-20).
  model: base (default; standard training), teacher (defensive
    distillation's teacher at T = 100), student (the distilled student; its
    teacher's workdir is `objective.teacher_workdir`, by default
    /tmp/certjax/defences_<data>_teacher), thermometer (trained behind a
    16-level thermometer encoding, Buckman et al.), ensemble (4 models at
    once with the many-models trainer), pgd_at (Madry et al.'s PGD
    training: the diagnostics must raise no warning on it).

Commands (full MNIST; each training run about 1-3 minutes on 2 CPU cores):
    for m in base teacher student thermometer ensemble; do
      python -m launch.train --config=configs/defences.py:mnist,$m \
          --workdir=/tmp/certjax/defences_mnist_$m; done
    python -m launch.evaluate --evaluator=defences --config=configs/defences.py:mnist \
        --workdir=/tmp/certjax/defences_mnist_base \
        --config.defence.models=distilled=/tmp/certjax/defences_mnist_student,thermometer=/tmp/certjax/defences_mnist_thermometer,ensemble=/tmp/certjax/defences_mnist_ensemble

Expected result (measured 2026-12-03, full MNIST, seed 0, 2 CPU cores under
load 3-6): clean test accuracy of the trained models: base 98.94%, teacher
97.74%, student 97.25%, thermometer 99.01%, ensemble 99.06% (member 0),
pgd_at 97.15%; training 153 / 113 / 96 / 120 / 329 / 800 s wall. The
evaluation above (200 images, `--config.skip=50`), accuracy at eps 0.1 / 0.2
/ 0.3, naive -> adaptive: none 42.5/0/0 -> 41.5/0/0; bit depth 99.5/99/99 ->
96/88.5/70; median 61.5/0.5/0 -> same; JPEG 100/99.5/98.5 -> 57/0/0; TV
minimisation 75/19.5/0 -> 69/4/0; resize-and-pad 75.5/7.5/0 -> 54/0.5/0;
distillation 93.5/92.5/90.5 -> 48.5/2/0; thermometer 99/99/96 -> 12.5/0/0;
ensemble vote 100/99.5/100 -> 80.5/3.5/0 (logit and probability averaging
78/1.5/0 and 78/4/0, no masking). The gradient-masking warnings fire on bit
depth, JPEG, distillation, thermometer and the vote (zero gradients, Square
beating PGD, accuracy far from 0 at eps 0.5) and on TV minimisation and
resize-and-pad (randomness), and on none of the undefended, median or
averaged-ensemble rows. Runtime: about 50 minutes for the rows above on the
loaded machine; the STRIP detector's joint attack (EOT x 16 overlays x PGD-40)
did not finish in 45 minutes there: run it alone with fewer overlays
(`--config.defence.strip_overlays=4 --config.defence.eot_samples=2`).
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg
from certjax.training.objectives import objective_defaults

DATA = {
    # name: (data.name, manual_dir, model, eps_list, large_eps, epochs)
    "mnist5k": ("mnist5k", "", "ibp_small", (0.1, 0.2, 0.3), 0.5, 20.0),
    "mnist": ("mnist", "../shared/data/mnist", "ibp_small", (0.1, 0.2, 0.3), 0.5, 4.0),
    "fashion_mnist": ("fashion_mnist", "../shared/data/fashion_mnist", "ibp_small",
                      (0.03, 0.06, 0.1), 0.5, 8.0),
    "cifar10": ("cifar10", "", "resnet20", (2 / 255, 4 / 255, 8 / 255), 0.5, 60.0),
}
MODELS = ("base", "teacher", "student", "thermometer", "ensemble", "pgd_at")
TEMPERATURE = 100.0
THERMOMETER_LEVELS = 16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  rest, smoke = split_smoke_arg(arg)
  parts = [p for p in rest.split(",") if p]
  if parts and parts[0] in MODELS:  # 'teacher' alone: the embedded digits
    parts = ["mnist5k"] + parts
  name = parts[0] if parts else "mnist5k"
  kind = parts[1] if len(parts) > 1 else "base"
  if name not in DATA or kind not in MODELS or len(parts) > 2:
    raise ValueError(f"configs/defences.py takes '<data>[,<model>][,smoke]' with data one of "
                     f"{sorted(DATA)} and model one of {MODELS}; got {arg!r}.")
  data_name, manual_dir, model, eps_list, large_eps, epochs = DATA[name]
  config = base_config()
  config.data.name = data_name
  config.data.manual_dir = manual_dir
  config.model.name = model
  config.batch_size = 128
  config.num_epochs = epochs
  config.eval_batch_size = 1000
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 200
  config.checkpoint_every_steps = 2000
  if name == "cifar10":
    config.data.augment = "crop_flip"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
  # The evaluation: 500 test images (every 20th), PGD-40, 8 EOT draws.
  config.skip = 20
  config.defence.eps_list = eps_list
  config.defence.large_eps = large_eps
  if name == "cifar10":
    config.defence.transform_kwargs.resize_pad = {"min_size": 29}  # 299 / 331 * 32
    config.defence.transform_kwargs.bit_depth = {"bits": 5}  # Xu et al.'s CIFAR-10 squeezer
  if kind in ("teacher", "student"):
    config.objective = ml_collections.ConfigDict({
        "name": "distillation", "temperature": TEMPERATURE,
        "teacher_workdir": "" if kind == "teacher" else f"/tmp/certjax/defences_{name}_teacher",
        "teacher_checkpoint_step": -1})
  elif kind == "thermometer":
    config.model.input_transform = "thermometer"
    config.model.input_transform_kwargs = ml_collections.ConfigDict(
        {"levels": THERMOMETER_LEVELS})
  elif kind == "ensemble":
    config.num_models = 4
    # vmapped XLA convolutions are slow on CPU; im2col gives the same models.
    config.model.conv_impl = "im2col"
  elif kind == "pgd_at":
    # Madry et al.'s MNIST recipe at a CPU budget: 7 steps of 2.5 / 7 * eps
    # from a random start, eps ramped up over the first 30% of the steps.
    config.objective = objective_defaults("pgd_at")
    config.objective.update({"eps": eps_list[-1], "num_steps": 7, "rel_step_size": 2.5 / 7,
                             "warmup_fraction": 0.3})
    config.num_epochs = epochs / 2  # each step costs 8 forward/backward passes
  if smoke:
    transform = (config.model.input_transform, config.model.input_transform_kwargs)
    config = make_smoke(config)
    config.model.input_transform, config.model.input_transform_kwargs = transform
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (32,)})
    config.num_train_steps = 60
    config.max = 63  # every 20th image up to index 63: 4 images
    config.defence.update({
        "eps_list": (0.1,), "num_steps": 3, "eot_samples": 2, "square_queries": 10,
        "cw_steps": 5, "calibration_size": 40, "strip_overlays": 2, "batch_size": 4,
        "transforms": ("bit_depth", "jpeg", "resize_pad"),
        "detectors": ("feature_squeezing",), "transform_kwargs": {
            **config.defence.transform_kwargs.to_dict(),
            "tvm": {"drop_probability": 0.5, "weight": 0.05, "num_steps": 3}}})
    if kind == "ensemble":
      config.num_models = 2
  return config
