r"""Attack throughput against the raw forward/backward limit, and PyTorch peers.

For each model, in one run, on the same batch and device:
  * fwd_bwd_x10: images/s of 10 chained forward+backward passes (jax.grad of
    the cross-entropy with respect to the INPUT), the floor any 10-step
    gradient attack has to pay;
  * pgd10: images/s of certjax.attacks.pgd (L-inf, 10 steps, random start);
  * apgd10: images/s of certjax.attacks.apgd (10 steps; it also evaluates
    the random start (forward and backward) and the clean point and the last
    iterate (forward only), so its ideal ratio is about 10/11.3, 0.88, with a
    backward pass costing two forward passes);
  * ratio = attack images/s / fwd_bwd_x10 images/s (1.0 = no overhead).
Timings alternate between the functions over `--repeats` rounds so that load
from other processes hits them alike; the report gives images/s and ratios
from the median round, from the best round and from the process CPU time (the
last two are the better estimates of the uncontended cost on a shared CPU).

Models (flax, defined here): an MLP 784-256-256-10 on 28x28x1 inputs and a
small CNN (two 3x3 stride-2 convolutions, 32 and 64 channels, dense 128, 10)
on 32x32x3 inputs, both with random weights; labels are the clean
predictions, so clean accuracy is 100% and robust accuracy is comparable
across implementations. `cnn_im2col` is the same CNN with the same weights
and batch, its convolutions written as one matrix product over the 9 strided
slices of the padded input (im2col, `certjax.models.layers.Im2colConv`, which
`get_model(..., conv_impl='im2col')` uses) instead of flax's nn.Conv. XLA:CPU
(jaxlib 0.10.2) runs these small convolutions through its Eigen convolution
at about half the speed of the matrix product (which it hands to YNNPACK),
on one core and on two; no XLA_FLAGS setting changed that: with
--xla_cpu_use_onednn, --xla_cpu_experimental_onednn_custom_call,
--xla_cpu_use_xnnpack, --xla_cpu_experimental_xnn_graph_fusion_mode=
XNN_GRAPH_FUSION_MODE_GREEDY, --xla_cpu_experimental_{xnn,onednn}_fusion_type,
--xla_cpu_enable_fast_math or --xla_cpu_multi_thread_eigen=false the
compiled program still holds plain `convolution` ops and the forward+backward
rate stays within noise; an NCHW layout is 5x slower and
lax.conv_general_dilated_patches (itself a convolution) gains nothing. The
headline comparison with the peers is the nn.Conv `cnn`; `cnn_im2col`
(JSON key "certjax_variants"; its peer ratios are the "_im2col" keys of
peers.cnn) shows what a CPU-minded model implementation gains
(`--no-im2col` leaves it out).

Threads: XLA:CPU runs on one intra-op pool of as many threads as the
process may use (2 on the reference machine) and PyTorch defaults to the same
number (torch.get_num_threads(), OpenMP); the JSON records the CPU count and
affinity, the thread settings of both sides and, per timed function, the
CPU seconds per wall second (how many cores it kept busy on average). On a
CPU shared with other jobs PyTorch's OpenMP threads spin-wait for each
other and its throughput collapses (several times below its single-thread
rate here), which flatters certjax: for a like-for-like comparison under load, also run
the whole benchmark on one core, where both sides use one thread:

    taskset -c 0 python -m benchmarks.attacks --peers --out=results/attacks_1core.json

Peers (`--peers`): the same architectures in PyTorch with the flax weights
copied over (checked on the clean logits), the same batch, torchattacks.PGD
and ART's ProjectedGradientDescent with the same eps, step and steps; the
report gives their images/s, certjax's speed ratio to them and all robust
accuracies. torch, torchattacks and adversarial-robustness-toolbox are not
in the certjax environment: install the `peers` extra in a separate one, or
save the weights and batch here and run the peers elsewhere without JAX:

    python -m benchmarks.attacks --out=results/attacks.json
    python -m benchmarks.attacks --peers --out=results/attacks_peers.json
    python -m benchmarks.attacks --save-weights=/tmp/attack_bench.npz
    python -m benchmarks.attacks --peers-only --weights=/tmp/attack_bench.npz \
        --out=results/attacks_peers_only.json   # needs numpy + torch only

AutoAttack against torchattacks (`--autoattack`): the benchmark's MLP
(784-256-256-10) adversarially trained here on the embedded MNIST digits
(PGD-AT, L-inf eps ramped to 0.3, `--aa-train-steps` Adam steps of 100
digits), then attacked on the first `--aa-examples` test digits at L-inf
eps 0.1 and 0.3 with certjax's AutoAttack standard version
(`attacks.standard_attacks`) and FAB-T alone; robust accuracy after each
attack and the per-example outcomes go to the report and, with
`--save-weights`, to an .npz from which `--autoattack-peers-only` runs
torchattacks on the PyTorch twin of the same weights: the same sequence
with the reference's settings (APGD, APGD-T, FAB multi-targeted: 100 steps;
Square: 5,000 queries, p_init 0.8, resc_schedule=False), torchattacks'
own AutoAttack(version='standard') (which uses 10 steps and a rescaled
Square schedule), and FAB-T alone, and counts the examples on which the
two sides disagree:

    python -m benchmarks.attacks --autoattack --save-weights=/tmp/aa.npz \
        --out=/tmp/autoattack_certjax.json
    python -m benchmarks.attacks --autoattack-peers-only --weights=/tmp/aa.npz \
        --out=/tmp/autoattack_peers.json   # numpy, torch, torchattacks
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Sequence

import numpy as np

from benchmarks import common

EPS = 8 / 255
STEP = 2 / 255  # = 2.5 * eps / 10, certjax's default for 10 steps
NUM_STEPS = 10
MODELS = {"mlp": (28, 28, 1), "cnn": (32, 32, 3), "cnn_im2col": (32, 32, 3)}
# Models that reuse another model's weights and batch (and its PyTorch peer).
SAME_WEIGHTS_AS = {"cnn_im2col": "cnn"}
SUFFIXES = ("", "_best", "_cpu_time")


def _thread_settings() -> Dict[str, Any]:
  """CPU count, affinity and the environment variables that set thread pools."""
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    affinity = os.cpu_count()
  env = {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
  return {"cpu_count": os.cpu_count(), "cpus_in_affinity": affinity, "env": env}


def _environment(device: str) -> Dict[str, Any]:
  return {"device": device, **common.host(), "threads": _thread_settings()}


def _interleaved_seconds(fns: Dict[str, Callable[[], Any]], sync: Callable[[Any], Any],
                         warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
  """Per-call seconds of each function, timed in alternating rounds.

  Returns the median and minimum wall time and the median process CPU time
  (all threads). On a shared CPU the minimum wall time and the CPU time are
  the better estimates of the uncontended cost; the median wall time is the
  typical cost under the load there was. CPU time means little on a GPU.
  """
  for fn in fns.values():
    for _ in range(warmup):
      sync(fn())
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      sync(fn())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: {"median": statistics.median(wall[name]), "min": min(wall[name]),
                 "cpu": statistics.median(cpu[name]),
                 "cpu_per_wall": sum(cpu[name]) / max(sum(wall[name]), 1e-9)}
          for name in fns}


def _rates(seconds: Dict[str, Dict[str, float]], batch_size: int,
           baseline: str = "fwd_bwd_x10") -> Dict[str, Any]:
  """images/s and ratios to the baseline, from median, best and CPU time."""
  out = {}
  for stat, suffix in (("median", ""), ("min", "_best"), ("cpu", "_cpu_time")):
    ips = {k: batch_size / max(v[stat], 1e-9) for k, v in seconds.items()}
    out["images_per_s" + suffix] = ips
    out["ratio_to_fwd_bwd_x10" + suffix] = {k: v / ips[baseline] for k, v in ips.items()
                                            if k != baseline}
  # CPU seconds per wall second while each function ran: the cores it used.
  out["cpu_seconds_per_wall_second"] = {k: v["cpu_per_wall"] for k, v in seconds.items()}
  return out


# ----------------------------------------------------------------------------
# JAX / certjax side.


def flax_models():
  """The benchmark's Flax models by name ('mlp', 'cnn', 'cnn_im2col'), unbound;
  benchmarks/cw.py and benchmarks/transforms.py time the same ones."""
  import flax.linen as nn

  from certjax.models.layers import Im2colConv

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(256, name="fc1")(x))
      x = nn.relu(nn.Dense(256, name="fc2")(x))
      return nn.Dense(10, name="fc3")(x)

  class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      # Explicit symmetric padding: 'SAME' with stride 2 pads asymmetrically,
      # which PyTorch's Conv2d cannot express.
      pad = ((1, 1), (1, 1))
      x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), padding=pad, name="conv1")(x))
      x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), padding=pad, name="conv2")(x))
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(128, name="fc1")(x))
      return nn.Dense(10, name="fc2")(x)

  class SmallCNNIm2col(nn.Module):
    @nn.compact
    def __call__(self, x):
      pad = ((1, 1), (1, 1))
      x = nn.relu(Im2colConv(32, (3, 3), strides=(2, 2), padding=pad, name="conv1")(x))
      x = nn.relu(Im2colConv(64, (3, 3), strides=(2, 2), padding=pad, name="conv2")(x))
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(128, name="fc1")(x))
      return nn.Dense(10, name="fc2")(x)

  return {"mlp": MLP(), "cnn": SmallCNN(), "cnn_im2col": SmallCNNIm2col()}


def run_certjax(batch_size: int, warmup: int, repeats: int,
                models: Sequence[str] = tuple(MODELS)) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from jax import lax

  from certjax import attacks

  results, arrays, state = {}, {}, {}
  for name, module in flax_models().items():
    if name not in models:
      continue
    shape = MODELS[name]
    extra = {}
    if name in SAME_WEIGHTS_AS:
      base = SAME_WEIGHTS_AS[name]
      if base not in state:
        raise ValueError(f"model {name!r} reuses the weights of {base!r}: run both.")
      variables, x, y, base_logits = state[base]
      logits_fn = jax.tree_util.Partial(module.apply, variables)
      clean_logits = np.asarray(jax.jit(logits_fn)(x))
      extra[f"max_abs_logit_diff_vs_{base}"] = float(np.abs(clean_logits - base_logits).max())
    else:
      x = np.random.default_rng(0).uniform(size=(batch_size, *shape)).astype(np.float32)
      variables = module.init(jax.random.key(0), x[:1])
      logits_fn = jax.tree_util.Partial(module.apply, variables)
      clean_logits = np.asarray(jax.jit(logits_fn)(x))
      y = clean_logits.argmax(-1).astype(np.int32)
      state[name] = (variables, x, y, clean_logits)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def fwd_bwd_x10(model, x, y):
      grad = jax.grad(lambda inputs: jnp.sum(attacks.cross_entropy(model(inputs), y)))
      # Each pass depends on the previous one so XLA cannot hoist it.
      return lax.fori_loop(0, NUM_STEPS, lambda i, xs: xs + 1e-6 * grad(xs), x)

    @jax.jit
    def pgd10(model, key, x, y):
      return attacks.pgd(key, model, x, y, eps=EPS, num_steps=NUM_STEPS, step_size=STEP)

    @jax.jit
    def apgd10(model, key, x, y):
      return attacks.apgd(key, model, x, y, eps=EPS, num_steps=NUM_STEPS)

    key = jax.random.key(1)
    seconds = _interleaved_seconds(
        {"fwd_bwd_x10": lambda: fwd_bwd_x10(logits_fn, x_dev, y_dev),
         "pgd10": lambda: pgd10(logits_fn, key, x_dev, y_dev),
         "apgd10": lambda: apgd10(logits_fn, key, x_dev, y_dev)},
        jax.block_until_ready, warmup, repeats)
    predict = jax.jit(lambda model, x: jnp.argmax(model(x), -1))
    robust = {k: float(np.mean(np.asarray(predict(logits_fn, f(logits_fn, key, x_dev, y_dev)))
                               == y)) for k, f in (("pgd10", pgd10), ("apgd10", apgd10))}
    results[name] = {"input_shape": list(shape), **_rates(seconds, batch_size),
                     "robust_accuracy": robust, **extra}
    r = results[name]
    print(f"[certjax] {name}: fwd+bwd x10 {r['images_per_s']['fwd_bwd_x10']:.0f} img/s, "
          f"PGD-10 {r['images_per_s']['pgd10']:.0f} img/s, APGD-10 "
          f"{r['images_per_s']['apgd10']:.0f} img/s; ratio to fwd+bwd x10 "
          f"(median wall / best wall / CPU time): PGD "
          + " / ".join(f"{r['ratio_to_fwd_bwd_x10' + s]['pgd10']:.3f}" for s in SUFFIXES)
          + ", APGD "
          + " / ".join(f"{r['ratio_to_fwd_bwd_x10' + s]['apgd10']:.3f}" for s in SUFFIXES)
          + f"; robust accuracy PGD "
          f"{robust['pgd10']:.3f}, APGD {robust['apgd10']:.3f}", flush=True)
    if name in SAME_WEIGHTS_AS:
      continue
    arrays[f"{name}/x"], arrays[f"{name}/y"] = x, y
    arrays[f"{name}/clean_logits"] = clean_logits
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
      arrays[f"{name}/params/" + "/".join(str(p.key) for p in path)] = np.asarray(leaf)
  device = str(jax.devices()[0].device_kind)
  return {"device": device, "results": results, "arrays": arrays}


AA_EPS = (0.1, 0.3)
AA_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


def _train_autoattack_mlp(steps: int, seed: int = 0):
  """The benchmark MLP, PGD-trained (L-inf, eps ramped 0 -> 0.3 over 40% of the steps)."""
  import jax
  import jax.numpy as jnp
  import optax

  from certjax import attacks
  from certjax import data as data_lib

  x_train, y_train = data_lib.load_arrays({"name": "mnist5k"}, "train", 0, 4000)
  module = flax_models()["mlp"]
  variables = module.init(jax.random.key(seed), x_train[:1])
  optimizer = optax.adam(1e-3)

  @jax.jit
  def step(variables, opt_state, key, xb, yb, eps):
    model = jax.tree_util.Partial(module.apply, variables)
    x_adv = attacks.pgd(key, model, xb, yb, eps=eps, num_steps=7, rel_step_size=2.5 / 7)

    def loss(params):
      logits = module.apply({"params": params}, x_adv)
      return jnp.mean(attacks.cross_entropy(logits, yb))

    grads = jax.grad(loss)(variables["params"])
    updates, opt_state = optimizer.update(grads, opt_state)
    return {"params": optax.apply_updates(variables["params"], updates)}, opt_state

  opt_state = optimizer.init(variables["params"])
  rng = np.random.default_rng(seed)
  for i in range(steps):
    batch = rng.choice(len(y_train), 100, replace=False)
    eps = np.float32(0.3 * min(1.0, i / (0.4 * steps)))
    variables, opt_state = step(variables, opt_state, jax.random.key(i), x_train[batch],
                                y_train[batch], eps)
  return module, variables


def run_autoattack_certjax(num_examples: int, train_steps: int) -> Dict[str, Any]:
  """certjax's AutoAttack standard version and FAB-T alone on the PGD-trained MLP."""
  import jax

  from certjax import attacks
  from certjax import data as data_lib

  start = time.perf_counter()
  module, variables = _train_autoattack_mlp(train_steps)
  train_seconds = time.perf_counter() - start
  x, y = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, num_examples)
  logits_fn = jax.tree_util.Partial(module.apply, variables)
  clean_logits = np.asarray(jax.jit(logits_fn)(x))
  report = {"model": "mlp 784-256-256-10, PGD-AT", "train_steps": train_steps,
            "train_seconds": train_seconds, "num_examples": num_examples,
            "clean_accuracy": float(np.mean(clean_logits.argmax(-1) == y)), "results": {}}
  arrays = {"mlp/x": x, "mlp/y": y.astype(np.int64), "mlp/clean_logits": clean_logits}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    arrays["mlp/params/" + "/".join(str(p.key) for p in path)] = np.asarray(leaf)
  for name, sequence, suite in (
      ("standard", attacks.standard_attacks("linf", num_classes=10), attacks.AUTOATTACK_STANDARD),
      ("fab_t_alone", [("fab-t", attacks.make_fab_targeted())], "")):
    start = time.perf_counter()
    result = attacks.robust_accuracy(jax.random.key(0), logits_fn, x, y, attacks=sequence,
                                     eps_list=AA_EPS, norm="linf", batch_size=num_examples,
                                     suite=suite, verbose=True)
    entry = result.to_dict()
    entry["seconds_total"] = time.perf_counter() - start
    report["results"][name] = entry
    for e, r in zip(AA_EPS, result.per_eps):
      arrays[f"ours/{name}/{e:g}/robust"] = r.robust.astype(np.int8)
    print(result.table(), flush=True)
  return {"report": report, "arrays": arrays}


def run_autoattack_peers(arrays: Dict[str, np.ndarray], torch_threads: int = 0) -> Dict[str, Any]:
  """torchattacks on the PyTorch twin: the reference settings, its own 'standard', FAB-T."""
  try:
    import torch
    import torchattacks
  except ImportError as e:
    return {"skipped": f"torch / torchattacks not installed ({e})"}
  if torch_threads > 0:
    torch.set_num_threads(torch_threads)
  model = _torch_models(arrays)["mlp"]
  x = torch.from_numpy(arrays["mlp/x"].transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(arrays["mlp/y"].astype(np.int64))
  with torch.no_grad():
    logits = model(x)
    correct = (logits.argmax(-1) == y).numpy()
  out = {"max_abs_logit_diff_vs_flax": float(np.abs(logits.numpy()
                                                    - arrays["mlp/clean_logits"]).max()),
         "clean_accuracy": float(correct.mean()), "torch_threads": torch.get_num_threads(),
         "results": {}}

  def reference_settings(eps):
    common_args = dict(norm="Linf", eps=eps, seed=0)
    return [("apgd-ce", torchattacks.APGD(model, steps=100, n_restarts=1, loss="ce",
                                          **common_args)),
            ("apgd-t", torchattacks.APGDT(model, steps=100, n_restarts=1, n_classes=10,
                                          **common_args)),
            ("fab-t", torchattacks.FAB(model, steps=100, n_restarts=1, multi_targeted=True,
                                       n_classes=10, **common_args)),
            ("square", torchattacks.Square(model, n_queries=5000, n_restarts=1, p_init=0.8,
                                           resc_schedule=False, **common_args))]

  def sequence(attacks_list, eps):
    robust = correct.copy()
    after, seconds = {}, {}
    for name, atk in attacks_list:
      start = time.perf_counter()
      idx = np.nonzero(robust)[0]
      if idx.size:
        adv = atk(x[idx], y[idx]).detach()
        with torch.no_grad():
          fooled = (model(adv).argmax(-1) != y[idx]).numpy()
        linf = (adv - x[idx]).abs().reshape(len(idx), -1).max(1)[0].numpy()
        if np.any(linf[fooled] > eps * (1 + 1e-4) + 1e-6) or adv.min() < 0 or adv.max() > 1:
          raise ValueError(f"torchattacks {name} left the ball or the box at eps={eps}")
        robust[idx[fooled]] = False
      after[name] = float(robust.mean())
      seconds[name] = time.perf_counter() - start
    return robust, after, seconds

  for eps in AA_EPS:
    entry = {}
    for name, attacks_list in (
        ("standard", reference_settings(eps)),
        ("fab_t_alone", [a for a in reference_settings(eps) if a[0] == "fab-t"]),
        ("torchattacks_autoattack_standard", [("autoattack", torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0))])):
      robust, after, seconds = sequence(attacks_list, eps)
      entry[name] = {"robust_accuracy_after": after, "seconds": seconds,
                     "robust_accuracy": float(robust.mean())}
      ours_key = f"ours/{name}/{eps:g}/robust"
      if ours_key in arrays:
        ours = arrays[ours_key].astype(bool)
        entry[name]["disagreements_with_certjax"] = {
            "robust_here_broken_by_certjax": int(np.sum(robust & ~ours)),
            "broken_here_robust_for_certjax": int(np.sum(~robust & ours))}
      print(f"[torchattacks] eps={eps:g} {name}: " + ", ".join(
          f"{k} {100 * v:.1f}%" for k, v in after.items())
            + (f"; disagreements {entry[name].get('disagreements_with_certjax')}"
               if ours_key in arrays else ""), flush=True)
    out["results"][f"{eps:g}"] = entry
  return out


# ----------------------------------------------------------------------------
# PyTorch side: needs numpy, torch and (optionally) torchattacks / ART only.


def _torch_models(arrays: Dict[str, np.ndarray]):
  import torch
  from torch import nn

  def dense(prefix, n_in, n_out):
    layer = nn.Linear(n_in, n_out)
    layer.weight.data = torch.from_numpy(arrays[prefix + "/kernel"].T.copy())
    layer.bias.data = torch.from_numpy(arrays[prefix + "/bias"].copy())
    return layer

  def conv(prefix, c_in, c_out):
    layer = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
    # flax HWIO -> torch OIHW
    layer.weight.data = torch.from_numpy(arrays[prefix + "/kernel"].transpose(3, 2, 0, 1).copy())
    layer.bias.data = torch.from_numpy(arrays[prefix + "/bias"].copy())
    return layer

  class NHWCFlatten(nn.Module):
    """Flattens NCHW activations in flax's NHWC order."""

    def forward(self, x):
      return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

  models = {}
  # Only the models whose weights were saved (--autoattack saves the MLP's).
  if "mlp/params/fc1/kernel" in arrays:
    models["mlp"] = nn.Sequential(NHWCFlatten(), dense("mlp/params/fc1", 784, 256), nn.ReLU(),
                                  dense("mlp/params/fc2", 256, 256), nn.ReLU(),
                                  dense("mlp/params/fc3", 256, 10)).eval()
  if "cnn/params/conv1/kernel" in arrays:
    models["cnn"] = nn.Sequential(conv("cnn/params/conv1", 3, 32), nn.ReLU(),
                                  conv("cnn/params/conv2", 32, 64), nn.ReLU(), NHWCFlatten(),
                                  dense("cnn/params/fc1", 8 * 8 * 64, 128), nn.ReLU(),
                                  dense("cnn/params/fc2", 128, 10)).eval()
  return models


def run_peers(arrays: Dict[str, np.ndarray], warmup: int, repeats: int,
              torch_threads: int = 0) -> Dict[str, Any]:
  """torchattacks / ART PGD on the same models, weights and batches."""
  try:
    import torch
  except ImportError as e:
    return {"skipped": f"torch is not installed ({e}); install the 'peers' extra"}
  if torch_threads > 0:
    torch.set_num_threads(torch_threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  try:
    import torchattacks
  except ImportError:
    torchattacks = None
  try:
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier
  except ImportError:
    ProjectedGradientDescent = None

  sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: out)
  results = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
             or "cpu", "torch_threads": torch.get_num_threads(),
             "torch_interop_threads": torch.get_num_interop_threads(),
             "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
             "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
             "threads": _thread_settings()}
  for name, model in _torch_models(arrays).items():
    model = model.to(device)
    x_np = arrays[f"{name}/x"].transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
    y_np = arrays[f"{name}/y"].astype(np.int64)
    x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)
    batch_size = len(y_np)
    with torch.no_grad():
      logits = model(x).cpu().numpy()
    entry = {"max_abs_logit_diff_vs_flax": float(np.abs(logits - arrays[f"{name}/clean_logits"]).max())}

    def fwd_bwd_x10():
      xs = x.clone()
      for _ in range(NUM_STEPS):
        xs.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xs), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xs)
        xs = (xs + 1e-6 * grad).detach()
      return xs

    fns = {"fwd_bwd_x10": fwd_bwd_x10}
    adversarial = {}
    if torchattacks is not None:
      atk = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=NUM_STEPS, random_start=True)
      fns["torchattacks_pgd10"] = lambda: atk(x, y)
    else:
      entry["torchattacks"] = "not installed"
    if ProjectedGradientDescent is not None:
      classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(),
                                     input_shape=x_np.shape[1:], nb_classes=10,
                                     clip_values=(0.0, 1.0), device_type="gpu" if device == "cuda" else "cpu")
      art_pgd = ProjectedGradientDescent(classifier, norm=np.inf, eps=EPS, eps_step=STEP,
                                         max_iter=NUM_STEPS, num_random_init=1,
                                         batch_size=batch_size, verbose=False)
      fns["art_pgd10"] = lambda: art_pgd.generate(x_np, y=y_np)
    else:
      entry["art"] = "not installed"
    entry.update(_rates(_interleaved_seconds(fns, sync, warmup, repeats), batch_size))
    for k, fn in fns.items():
      if k == "fwd_bwd_x10":
        continue
      out = fn()
      out = torch.as_tensor(out).to(device)
      with torch.no_grad():
        adversarial[k] = float((model(out).argmax(-1) == y).float().mean())
      linf = float((out - x).abs().max())
      entry.setdefault("max_linf", {})[k] = linf
    entry["robust_accuracy"] = adversarial
    results[name] = entry
    print(f"[peers] {name}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in
                                           entry["images_per_s"].items())
          + f"; robust accuracy {adversarial}", flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default="results/attacks.json")
  parser.add_argument("--peers", action="store_true",
                      help="also run torchattacks / ART PGD (needs torch)")
  parser.add_argument("--save-weights", default=None,
                      help="save the flax weights and batches as .npz for --peers-only")
  parser.add_argument("--peers-only", action="store_true",
                      help="run only the PyTorch peers from --weights (no JAX needed)")
  parser.add_argument("--weights", default=None, help=".npz written by --save-weights")
  parser.add_argument("--no-im2col", action="store_true",
                      help="leave out cnn_im2col (the CNN with im2col convolutions)")
  parser.add_argument("--autoattack", action="store_true",
                      help="AutoAttack standard (certjax) on a PGD-trained MLP; with "
                           "--save-weights, the .npz for --autoattack-peers-only")
  parser.add_argument("--autoattack-peers-only", action="store_true",
                      help="torchattacks' AutoAttack on the twin of --weights (no JAX)")
  parser.add_argument("--aa-examples", type=int, default=200)
  parser.add_argument("--aa-train-steps", type=int, default=1000)
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads for the peers (0: torch's default). On an "
                           "oversubscribed CPU, 1 avoids OpenMP spin-waiting.")
  args = parser.parse_args()

  report: Dict[str, Any] = {
      "benchmark": "attacks", "kind": "attacks", "batch_size": args.batch_size, "eps": EPS,
      "step_size": STEP, "num_steps": NUM_STEPS, "repeats": args.repeats,
      "note": "ratio = attack images/s / (10 chained fwd+bwd w.r.t. the input) images/s, "
              "same batch, same run; on a shared CPU, timings carry other processes' load",
  }
  if args.autoattack or args.autoattack_peers_only:
    report = {"benchmark": "AutoAttack standard: certjax vs torchattacks", "kind": "attacks",
              "eps": list(AA_EPS), "norm": "linf"}
    if args.autoattack_peers_only:
      if not args.weights:
        parser.error("--autoattack-peers-only needs --weights (from --autoattack --save-weights)")
      report["environment"] = _environment("cpu (torch)")
      report["autoattack_peers"] = run_autoattack_peers(dict(np.load(args.weights)),
                                                        args.torch_threads)
    else:
      import jax  # pylint: disable=import-outside-toplevel
      ours = run_autoattack_certjax(args.aa_examples, args.aa_train_steps)
      report["environment"] = _environment(str(jax.devices()[0].device_kind))
      report["autoattack_certjax"] = ours["report"]
      if args.save_weights:
        np.savez(args.save_weights, **ours["arrays"])
        print(f"saved weights, digits and outcomes to {args.save_weights}")
    common.write_report(args.out, report)
    return
  if args.peers_only:
    if not args.weights:
      parser.error("--peers-only needs --weights (an .npz from --save-weights)")
    arrays = dict(np.load(args.weights))
    report["environment"] = _environment("see peers.device")
    report["peers"] = run_peers(arrays, args.warmup, args.repeats, args.torch_threads)
  else:
    models = [m for m in MODELS if not (args.no_im2col and m == "cnn_im2col")]
    certjax_results = run_certjax(args.batch_size, args.warmup, args.repeats, models)
    arrays = certjax_results.pop("arrays")
    report["environment"] = _environment(certjax_results["device"])
    # Variants with another model's weights go under their own key, so that
    # "certjax" keeps one entry per PyTorch peer model.
    report["certjax"] = {k: v for k, v in certjax_results["results"].items()
                         if k not in SAME_WEIGHTS_AS}
    report["certjax_variants"] = {k: v for k, v in certjax_results["results"].items()
                                  if k in SAME_WEIGHTS_AS}
    if args.save_weights:
      np.savez(args.save_weights, **arrays)
      print(f"saved weights and batches to {args.save_weights}")
    if args.peers:
      peers = run_peers(arrays, args.warmup, args.repeats, args.torch_threads)
      report["peers"] = peers
      for name, entry in peers.items():
        if not isinstance(entry, dict) or "images_per_s" not in entry:
          continue
        # The same weights run by other certjax implementations (cnn_im2col).
        variants = [("", report["certjax"][name])] + [
            ("_" + m.split("_", 1)[1], result)
            for m, result in report["certjax_variants"].items() if SAME_WEIGHTS_AS[m] == name]
        for tag, ours_result in variants:
          for stat in ("images_per_s", "images_per_s_best", "images_per_s_cpu_time"):
            suffix = stat[len("images_per_s"):]
            ours = ours_result[stat]
            entry["certjax_pgd10_speedup" + tag + suffix] = {
                k: ours["pgd10"] / v for k, v in entry[stat].items() if k != "fwd_bwd_x10"}
            entry["certjax_fwd_bwd_x10_speedup" + tag + suffix] = (
                ours["fwd_bwd_x10"] / entry[stat]["fwd_bwd_x10"])
          print(f"[compare] {name}: certjax{tag} PGD-10 speed-up (median) "
                + ", ".join(f"{k} x{v:.2f}" for k, v in
                            entry["certjax_pgd10_speedup" + tag].items())
                + f"; fwd+bwd x10 jax/torch x{entry['certjax_fwd_bwd_x10_speedup' + tag]:.2f}",
                flush=True)
  common.write_report(args.out, report)


if __name__ == "__main__":
  main()
