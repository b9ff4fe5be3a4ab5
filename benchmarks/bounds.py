"""Cost of bound propagation relative to a forward pass of the same model.

Measures, for the IBP "small" and "large" CNNs of Gowal et al. (2018) at one
batch size, the median wall time of (all jitted, warmed up, timed with
block_until_ready, measurements interleaved round by round so that machine
load hits every method alike):

  forward     logits_fn(x)
  ibp         ibp(logits_fn, box): interval bounds of the logits
  ibp_margins ibp_margins(logits_fn, box, y): margins with the last layer elided
  crown_ibp   crown_ibp(logits_fn, box, margin_spec(y)): backward pass from 2 x 9
              margin functionals (lower and upper bounds)
  crown_ibp_lower  the same, lower bounds only (what verification and training need)
  ibp_sound, crown_ibp_sound  ibp and crown_ibp with sound_rounding=True (every
              bound rounded outward so that it holds for the float32 network)
  crown       full CROWN (one backward pass per neuron; small model, batch 1 only)

and reports each as a multiple of the forward pass, plus the compiled
programs' memory (`compiled.memory_analysis()`: temporaries + outputs), and the
device, versions and load average (timings on a shared machine are inflated).
The cost of floating-point soundness is reported as `sound_rounding_relative`:
ibp_sound / ibp and crown_ibp_sound / crown_ibp on the same model and batch.

With --training it also times one full training step (loss, gradient and Adam
update, jitted) of certjax's `ibp_small` model under the objectives
'standard' (the raw forward/backward baseline), 'ibp', and 'crown_ibp' inside
the eps ramp (beta > 0, CROWN-IBP computed) and after it (beta = 0, skipped),
each as a multiple of the standard step.

  python -m benchmarks.bounds --batch 128 --out bounds_benchmark.json
  python -m benchmarks.bounds --models small --no_crown --training
  python -m benchmarks.bounds --models small --no_crown --batch 100  # sound-rounding cost

(from the repository root).

References:
  Gowal et al. 2018, https://arxiv.org/abs/1810.12715 (model architectures).
  Zhang et al. 2020, https://arxiv.org/abs/1906.06316 (CROWN-IBP).
  Jia & Rinard 2021, https://arxiv.org/abs/2003.03021 (why sound rounding).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks import common

from certjax.bounds import crown, crown_ibp, ibp, ibp_margins, linf_ball, margin_spec


class IbpSmall(nn.Module):
  """Conv16 4x4 s2, Conv32 4x4 s1, FC100, FC10 (Gowal et al. 2018, 'small')."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (4, 4), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(32, (4, 4), strides=1, padding="SAME")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(self.num_classes)(x)


class IbpLarge(nn.Module):
  """Conv64, Conv64, Conv128 s2, Conv128, Conv128 (3x3), FC512, FC10 ('large')."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for features, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (128, 1)):
      x = nn.relu(nn.Conv(features, (3, 3), strides=stride, padding="SAME")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x)


def _memory_bytes(jitted, *args) -> int | None:
  """Temporaries + outputs of the compiled program, if the backend reports them."""
  try:
    analysis = jitted.lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _interleaved_medians(programs: dict, repeats: int) -> dict:
  """Median seconds per (function, arguments) program (`common.interleaved_seconds`)."""
  return common.interleaved_seconds(
      {name: functools.partial(fn, *args) for name, (fn, args) in programs.items()},
      repeats)[0]


def benchmark_model(name: str, model: nn.Module, batch: int, image_shape, eps: float,
                    repeats: int, with_crown: bool, with_sound: bool = True) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(batch,) + tuple(image_shape)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  logits_fn = functools.partial(model.apply, variables)
  spec = margin_spec(y, 10)
  box = linf_ball(x, eps)

  programs = {
      "forward": (jax.jit(logits_fn), (x,)),
      "ibp": (jax.jit(lambda b: ibp(logits_fn, b)), (box,)),
      "ibp_margins": (jax.jit(lambda b, labels: ibp_margins(logits_fn, b, labels)), (box, y)),
      "crown_ibp": (jax.jit(lambda b, s: crown_ibp(logits_fn, b, s)), (box, spec)),
      "crown_ibp_lower": (jax.jit(lambda b, s: crown_ibp(logits_fn, b, s, upper=False)),
                          (box, spec)),
  }
  if with_sound:
    programs["ibp_sound"] = (jax.jit(lambda b: ibp(logits_fn, b, sound_rounding=True)), (box,))
    programs["crown_ibp_sound"] = (
        jax.jit(lambda b, s: crown_ibp(logits_fn, b, s, sound_rounding=True)), (box, spec))
  medians = _interleaved_medians(programs, repeats)
  result = {
      "model": name, "batch": batch, "image_shape": list(image_shape), "eps": eps,
      "params": int(sum(np.size(p) for p in jax.tree.leaves(variables))),
      "seconds": medians,
      "relative_to_forward": {k: v / medians["forward"] for k, v in medians.items()},
      "crown_ibp_relative_to_ibp": medians["crown_ibp"] / medians["ibp"],
      "memory_bytes": {k: _memory_bytes(fn, *args) for k, (fn, args) in programs.items()},
  }
  if with_sound:
    result["sound_rounding_relative"] = {
        "ibp": medians["ibp_sound"] / medians["ibp"],
        "crown_ibp": medians["crown_ibp_sound"] / medians["crown_ibp"]}
  if with_crown:
    x1, y1 = x[:1], y[:1]
    box1, spec1 = linf_ball(x1, eps), margin_spec(y1, 10)
    single = {
        "forward_b1": (jax.jit(logits_fn), (x1,)),
        "crown_ibp_b1": (jax.jit(lambda b, s: crown_ibp(logits_fn, b, s)), (box1, spec1)),
        "crown_b1": (jax.jit(lambda b, s: crown(logits_fn, b, s)), (box1, spec1)),
    }
    single_medians = _interleaved_medians(single, max(3, repeats // 5))
    result["crown_batch1"] = {
        "seconds": single_medians,
        "crown_relative_to_crown_ibp": single_medians["crown_b1"] / single_medians["crown_ibp_b1"],
        "memory_bytes": {k: _memory_bytes(fn, *args) for k, (fn, args) in single.items()},
    }
  return result


def benchmark_training(batch: int, image_shape, repeats: int) -> dict:
  """Seconds per training step of ibp_small for each certified objective."""
  import optax  # pylint: disable=g-import-not-at-top
  from certjax import models  # pylint: disable=g-import-not-at-top
  from certjax.training import objectives  # pylint: disable=g-import-not-at-top

  channels = image_shape[-1]
  model = models.get_model("ibp_small", num_classes=10, mean=(0.5,) * channels,
                           std=(0.5,) * channels)
  rng = np.random.default_rng(0)
  batch_data = {"image": jnp.asarray(rng.uniform(size=(batch,) + tuple(image_shape)),
                                     jnp.float32),
                "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
  params = models.init_variables(model, jax.random.key(0), (1,) + tuple(image_shape))["params"]
  tx = optax.adam(1e-3)
  ctx = objectives.ObjectiveContext(apply_fn=model.apply, num_classes=10, total_steps=1000,
                                    input_shape=tuple(image_shape))
  schedule = {"warmup_steps": 0.1, "ramp_steps": 0.5, "train_eps": 0.1}
  setups = {  # name: (objective config, step at which it is timed)
      "standard": ({"name": "standard"}, 0),
      "ibp": ({"name": "ibp", **schedule}, 300),
      "crown_ibp_ramp": ({"name": "crown_ibp", **schedule}, 300),
      "crown_ibp_after_ramp": ({"name": "crown_ibp", **schedule}, 900),
  }
  programs = {}
  for name, (cfg, step) in setups.items():
    loss_fn = objectives.get_objective(cfg, ctx)

    def train_step(p, opt_state, loss_fn=loss_fn, step=step):
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          p, {}, batch_data, jax.random.key(0), jnp.int32(step))
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    programs[name] = (jax.jit(train_step), (params, tx.init(params)))
  medians = _interleaved_medians(programs, repeats)
  return {"model": "ibp_small (certjax.models)", "batch": batch, "seconds": medians,
          "relative_to_standard": {k: v / medians["standard"] for k, v in medians.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
  parser.add_argument("--eps", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--models", default="small,large")
  parser.add_argument("--no_crown", action="store_true", help="skip full CROWN (small, batch 1)")
  parser.add_argument("--no_sound", action="store_true",
                      help="skip the sound_rounding variants of ibp and crown_ibp")
  parser.add_argument("--training", action="store_true",
                      help="also time training steps of the certified objectives")
  parser.add_argument("--out", default="results/bounds.json")
  args = parser.parse_args()

  image_shape = (28, 28, 1) if args.dataset == "mnist" else (32, 32, 3)
  models = {"small": IbpSmall(), "large": IbpLarge()}
  report = {
      "benchmark": "bounds",
      "kind": "bounds",
      "device": str(jax.devices()[0]),
      "device_kind": jax.devices()[0].device_kind,
      "platform": jax.default_backend(),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "load_average_start": os.getloadavg(),
      "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
      "dataset_shape": args.dataset,
      "results": [],
  }
  for name in args.models.split(","):
    result = benchmark_model(name, models[name], args.batch, image_shape, args.eps,
                             args.repeats, with_crown=(name == "small" and not args.no_crown),
                             with_sound=not args.no_sound)
    report["results"].append(result)
    rel = result["relative_to_forward"]
    print(f"[{name}] forward {result['seconds']['forward'] * 1e3:.2f} ms | x forward: "
          + ", ".join(f"{k} {v:.2f}" for k, v in rel.items() if k != "forward")
          + f" | crown_ibp/ibp {result['crown_ibp_relative_to_ibp']:.2f}")
    mem = {k: (None if v is None else round(v / 2**20, 1))
           for k, v in result["memory_bytes"].items()}
    print(f"[{name}] memory MiB (temp + output): {mem}")
    if "sound_rounding_relative" in result:
      sound = result["sound_rounding_relative"]
      print(f"[{name}] sound_rounding cost: ibp x{sound['ibp']:.2f}, "
            f"crown_ibp x{sound['crown_ibp']:.2f} (same model and batch)")
    if "crown_batch1" in result:
      c = result["crown_batch1"]
      print(f"[{name}] batch 1: " + ", ".join(f"{k} {v * 1e3:.1f} ms"
                                              for k, v in c["seconds"].items())
            + f" | crown/crown_ibp {c['crown_relative_to_crown_ibp']:.1f}")
  if args.training:
    training = benchmark_training(args.batch, image_shape, args.repeats)
    report["training_step"] = training
    print(f"[training ibp_small, batch {args.batch}] standard step "
          f"{training['seconds']['standard'] * 1e3:.1f} ms | x standard: " + ", ".join(
              f"{k} {v:.2f}" for k, v in training["relative_to_standard"].items()
              if k != "standard"))
  report["load_average_end"] = os.getloadavg()
  common.write_report(args.out, report)


if __name__ == "__main__":
  main()
