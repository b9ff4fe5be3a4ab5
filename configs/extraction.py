r"""Model extraction: a one-hidden-layer MLP victim, then Knockoff, exact extraction and Square.

The victim is a 784-128-10 ReLU MLP (one hidden layer, so the exact
critical-point extraction applies) trained normally. The 'extraction'
evaluator (section `config.extraction`) puts it behind a query-counting
interface and, for each output mode (full probabilities, probabilities
rounded to 2 decimals, top-1 only, label only), measures
  * Knockoff/copycat: accuracy and fidelity of a 784-128-10 student against
    the query budget, the surrogate images being the first 10,000 train
    images (in-distribution and unlabelled: the attacker never sees a label);
  * exact extraction (Jagielski et al. 2020, Carlini et al. 2020): queries,
    neurons found, max |logit difference| over the test set and fidelity,
    against the model's float64 twin; refused for rounded, top-1 and label
    answers;
  * Square (linf, eps 0.1, 1,000 queries) on 100 test images through the
    interface;
and what each defence costs a legitimate user (answered-label accuracy, L1
distortion of the answer).

Argument (`--config=configs/extraction.py:<data>[_deep][,smoke]`):
  mnist5k (default): the embedded digits (test scale; 'smoke' is what the
    tests run: a 784-8-10 victim, tiny budgets, 20 Square queries).
  mnist: full MNIST IDX from ../shared/data/mnist (real scale).
  fashion_mnist: Fashion-MNIST IDX from ../shared/data/fashion_mnist.
  cifar10: CIFAR-10 through TFDS when prepared (not measured here).
  <data>_deep (e.g. mnist_deep): the same with a 784-32-16-10 victim (two
    hidden layers, contractive first layer), which the exact attack
    extracts with `extract_two_hidden_layers`.
Transfer-set Knockoff (the attacker holds other data): add
`--config.extraction.surrogate_data=fashion_mnist
--config.extraction.surrogate_manual_dir=../shared/data/fashion_mnist`.

Commands (full MNIST):
    python -m launch.train --config=configs/extraction.py:mnist --workdir=/tmp/certjax/extraction_mnist
    python -m launch.evaluate --evaluator=extraction --config=configs/extraction.py:mnist --workdir=/tmp/certjax/extraction_mnist

Expected results and runtimes (measured: full MNIST, seed 0, a 2-core CPU
shared with other jobs, load ~4.5):
training 21 s wall, victim test accuracy 98.08%; the evaluation 49 s wall
(data and Knockoff 18 s, exact extraction 11 s, Square 12 s). On the 10,000 test images:

  output (defence)      answer L1   Knockoff @10k queries   exact        Square (linf 0.1)
                                    fidelity / accuracy     extraction   robust accuracy
  probabilities         0           96.86% / 95.97%         128/128 *    17%
  rounded (2 decimals)  0.0028      96.84% / 96.04%         refused      41%
  top_k (k=1)           0.0181      96.27% / 95.46%         refused      18%
  label                 0.0362      96.27% / 95.46%         refused      98%

* Exact extraction through probabilities: 128 of 128 neurons, 159,150 queries,
max logit error 1.9e-8 over the test set (logits centred), fidelity 100%.
Square: 100 images (clean accuracy 100%), 1,000 queries each: 100,000
answered per output mode. Rounding to 2 decimals costs the user an L1 of
0.003 and more than doubles what Square leaves standing; label-only stops it.
Knockoff fidelity through probabilities against budget 100 / 300 / 1k / 3k /
10k: 65.8 / 83.7 / 90.5 / 94.0 / 96.9%. Top-1 and label answers give the
student the same one-hot targets, hence the same copies. With Fashion-MNIST
as the surrogate (the transfer-set command above; 21 s), soft labels matter:
fidelity at 10k queries 76.6% (probabilities), 76.3% (rounded), 59.2% (top-1
and label). Exact extraction through logits: 128/128 neurons, 156,667
queries, max logit error 1.0e-8. Against the float32 model itself
(`--config.extraction.exact_float64=False`) its rounding noise spoils the
measurements: 120 of 128 neurons after 793,772 queries (8.7 min), max logit
error 3.86, fidelity 99.1% (through logits: 115 of 128, error 5.79, 98.4%).

Two hidden layers (full MNIST, seed 0, the same shared 2-core CPU, load ~2):
    python -m launch.train --config=configs/extraction.py:mnist_deep --workdir=/tmp/certjax/extraction_mnist_deep
    python -m launch.evaluate --evaluator=extraction --config=configs/extraction.py:mnist_deep --workdir=/tmp/certjax/extraction_mnist_deep
training 14 s wall, victim 784-32-16-10 test accuracy 96.44%; the evaluation
23 s wall (exact extraction 7 s). Exact extraction through probabilities:
32/32 first-layer and 16/16 second-layer neurons, 1,485,540 queries
(1,459,461 finding the first layer, 26,079 the second in its activation
space), max logit error 5.1e-9 over the 10,000 test images (logits
centred), fidelity 100% (residuals: sign 5.7e-11 / 1.9e-11, fit 2.7e-11).
Through logits (`--config.extraction.outputs='("logits",)'`): 32/32, 16/16,
2,285,890 queries, max logit error 1.6e-9, fidelity 100%, 8 s. The other
columns: Knockoff fidelity @10k 97.31% (probabilities), 97.32% (rounded),
96.41% (top-1, label); Square robust accuracy 6 / 24 / 5 / 95%. A
784-64-32-10 victim (`--config.model.kwargs.hidden='(64,32)'`, 97.57%, 14 s
to train): 64/64, 32/32 through logits (2,226,121 queries, error 1.0e-8,
16 s) and probabilities (1,945,284 queries, error 1.2e-8, 15 s), fidelity
100%. With the default exact_patience of 8 the search stopped at 30 of 32
first-layer neurons (two sit ~4 pixel-units from the data, crossed by ~5%
of the lines); the second layer's residuals (0.3-0.4) showed it. The _deep
configs wait 32 idle lines. Against the float32 model itself
(`--config.extraction.exact_float64=False`, probabilities) the attack
fails: its rounding noise (relative ~1e-7) widens the on-plane test to
1e-3 of the line length, second-layer surfaces pass as first-layer neurons
(33 found in a direct run; first-layer sign residual 0.81 in the
evaluator's), and then no second-layer neuron is found (2,110,359 queries,
78 s; reported as failed with that message).
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg

DATA = {  # name: (data.name, manual_dir, Knockoff budgets)
    "mnist5k": ("mnist5k", "", (30, 100, 300, 1000, 3000)),
    "mnist": ("mnist", "../shared/data/mnist", (100, 300, 1000, 3000, 10000)),
    "fashion_mnist": ("fashion_mnist", "../shared/data/fashion_mnist",
                      (100, 300, 1000, 3000, 10000)),
    # Through TFDS when prepared (no download here); a 3072-128-10 victim, so
    # exact extraction applies; not measured on this machine.
    "cifar10": ("cifar10", "", (100, 300, 1000, 3000, 10000)),
}


# Victims deeper than the default 784-128-10: <data>_deep is a 784-32-16-10
# MLP (two hidden layers, contractive first layer), for the exact
# two-hidden-layer extraction.
DEEP_SUFFIX = "_deep"
DEEP_HIDDEN = (32, 16)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  rest, smoke = split_smoke_arg(arg)
  name = rest or "mnist5k"
  deep = name.endswith(DEEP_SUFFIX)
  if deep:
    name = name[:-len(DEEP_SUFFIX)]
  if name not in DATA:
    raise ValueError(f"configs/extraction.py takes one of {sorted(DATA)}, each optionally "
                     f"with '{DEEP_SUFFIX}' (and 'smoke'); got {arg!r}.")
  data_name, manual_dir, budgets = DATA[name]
  config = base_config()
  config.data.name = data_name
  config.data.manual_dir = manual_dir
  config.model.name = "mlp"
  config.model.kwargs = ml_collections.ConfigDict({"hidden": (128,)})
  config.batch_size = 128
  config.num_epochs = 10.0
  config.eval_batch_size = 1000
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 200
  config.checkpoint_every_steps = 0
  config.extraction.budgets = budgets
  if deep:
    config.model.kwargs = ml_collections.ConfigDict({"hidden": DEEP_HIDDEN})
    # Two first-layer neurons of the MNIST victim sit ~4 pixel-units from
    # the data, crossed by ~5% of the lines: 8 idle lines missed them
    # (30/32, flagged by second-layer residuals of 0.3-0.4); 32 found all.
    config.extraction.exact_patience = 32
  if smoke:
    config = make_smoke(config)
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (8, 6) if deep else (8,)})
    config.optimizer.learning_rate = 3e-3  # 100 steps: test accuracy ~80%
    config.optimizer.schedule = "constant"
    config.max = 200  # the first 200 test digits
    config.extraction.update({
        "budgets": (20, 60), "student_hidden": (16,), "knockoff_epochs": 1,
        "knockoff_batch_size": 20, "square_queries": 20, "square_images": 8,
        "batch_size": 200})
  return config
