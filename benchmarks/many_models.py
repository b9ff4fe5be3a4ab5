r"""K models trained at once (one vmapped program) against K models trained one by one.

The many-models trainer (`certjax.training.many`) trains shadow, reference and
ensemble models as one jitted program `vmap`ped over a stacked state. Its
claim is utilisation: a small model leaves the cores (or an accelerator)
idle, K of them in one program do not. Measured on the same machine, in one
process, with the same model, batch and optimizer:
  * vmapped: steps/s of the K-model step (`many.make_many_step`: on-device
    gather of each model's batch, objective, gradient, optax update), as
    images/s = K * batch / t, in the trainer's blocks of models
    (`many.models_per_block`; `vmapped_one_block`: all K as one vmap);
  * loop: K calls of the jitted single-model step (`state.train_step_fn`,
    what `train_and_evaluate` runs) per round, the same FLOPs;
  * fwd_bwd_limit: images/s of the vmapped gradient alone (no optimizer, no
    gather), the raw limit of the same K models;
  * ratio vmapped / loop (the utilisation gain) and vmapped / fwd_bwd_limit;
  * GFLOP/s of each (XLA's count of the forward and backward passes), beside
    the device's sustained peak, a 2048^3 float32 matrix product: a loop
    already near the peak leaves batching little to gain.
Rows: the shadow-model configs as their runs train (`--configs`: model,
optimizer, objective, num_models and batch_size of configs/membership.py and
configs/property.py), then the models of `--models` at `--num_models` and
`--batch_size` with adam.
With `--separate_runs R > 0` it also launches (for mlp256, through
configs/membership.py) R separate single-model `launch.train` processes and
one `launch.train` of K models, each of `--steps` steps, start-up and compilation included (what a user launching
K runs pays); the K-run wall time is R runs' mean times K, an extrapolation
that the report labels as such.

    python -m benchmarks.many_models --num_models=16 --out=results/many_models.json
    python -m benchmarks.many_models --num_models=16 --separate_runs=2 --steps=200
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from certjax import data as data_lib
from certjax import models as models_lib
from certjax import parallel
from certjax.data.idx import IdxFormatError
from certjax.training import many as many_lib
from certjax.training import objectives
from certjax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name: (model, kwargs)
    "mlp256": ("mlp", {"hidden": (256,)}),
    "ibp_small": ("ibp_small", {}),
    # The same CNN with each convolution as one matrix product: vmapped over
    # models it stays a batched matmul instead of a grouped convolution.
    "ibp_small_im2col": ("ibp_small", {"conv_impl": "im2col"}),
}


class _Info:
  image_shape = (28, 28, 1)
  num_classes = 10


def measure(model_key: str, num_models: int, batch_size: int, repeats: int) -> dict:
  """In-process figures for K models of `model_key` (module docstring)."""
  name, kwargs = MODELS[model_key]
  model = models_lib.get_model(name, num_classes=10, mean=(0.1307,), std=(0.3081,), **kwargs)
  tx = optax.adam(1e-3)
  ctx = objectives.ObjectiveContext(model.apply, 10, 1000, _Info.image_shape)
  loss_fn = objectives.get_objective(objectives.objective_defaults("standard"), ctx)
  row = _measure(model, tx, loss_fn, _Info, num_models, batch_size, repeats)
  return {"model": model_key, **row}


def measure_config(spec: str, repeats: int) -> dict:
  """The same figures for a shadow-model config as its runs train: its model,
  optimizer, objective, `num_models` and `batch_size` (`spec`: 'membership:fashion_mnist')."""
  name, _, arg = spec.partition(":")
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  shapes_from = config.data.name
  try:
    info = data_lib.get_info(config.data)
  except IdxFormatError:
    # The timed images are random; only the shapes matter. The IDX data sets
    # share the embedded digits' (28x28x1, 10 classes), so a machine without
    # ../shared/data still measures the config's models and optimizer.
    info = data_lib.get_info({"name": "mnist5k"})
    shapes_from = f"mnist5k ({config.data.name} not found at {config.data.manual_dir!r})"
  model, tx, _, loss_fn = state_lib.model_and_objective(config, info, 1000)
  row = _measure(model, tx, loss_fn, info, int(config.num_models), int(config.batch_size),
                 repeats)
  return {"model": f"{config.model.name} {dict(config.model.kwargs)}", "config": spec,
          "optimizer": config.optimizer.name, "shapes_from": shapes_from, **row}


def _measure(model, tx, loss_fn, info, num_models: int, batch_size: int, repeats: int) -> dict:
  create = lambda key: state_lib.create_train_state(None, model, tx, info, key)  # noqa: E731
  mesh = parallel.make_mesh()
  state_sharding, index_sharding = many_lib._shardings(mesh, num_models, batch_size)
  init_keys = many_lib.model_keys(jax.random.key(0), num_models)
  step_keys = many_lib.model_keys(jax.random.key(1), num_models)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4096, *info.image_shape), np.uint8)
  labels = rng.integers(0, 10, 4096).astype(np.int32)
  indices = rng.integers(0, 4096, (num_models, batch_size)).astype(np.int32)

  # The trainer's program: blocks of models on a one-device CPU
  # (`many.models_per_block`), and the same K models as one vmap beside it.
  block = many_lib.models_per_block(0, num_models, mesh)
  block = block if block < num_models else 0

  def make_vmapped(block):
    step = many_lib.make_many_step(loss_fn, tx, False, state_sharding, index_sharding, mesh,
                                   block)
    state = jax.jit(jax.vmap(create))(init_keys)
    held = {"state": many_lib.split_models(state, block) if block else state}

    def call():
      held["state"], metrics = step(held["state"], images, labels, indices, step_keys,
                                    step_keys)
      return metrics
    return call

  calls = {"vmapped": make_vmapped(block)}
  if block:
    calls["vmapped_one_block"] = make_vmapped(0)

  single_step = jax.jit(state_lib.train_step_fn(loss_fn, tx), donate_argnums=(0,))
  singles = [create(k) for k in init_keys]
  batches = [{"image": data_lib.pipeline.to_float(images[i]), "label": labels[i]}
             for i in indices]

  def loop():
    out = None
    for k in range(num_models):
      singles[k], out = single_step(singles[k], batches[k], step_keys[k])
    return out

  stacked_batch = {"image": jnp.stack([b["image"] for b in batches]),
                   "label": jnp.stack([b["label"] for b in batches])}
  params = jax.vmap(create)(init_keys).params

  def grads_only(params, batch):
    def one(p, b, key):
      return jax.grad(lambda q: loss_fn(q, {}, b, key, 0)[0])(p)
    return jax.vmap(one)(params, batch, step_keys)

  grads_fn = jax.jit(grads_only)
  # The useful work of a round: XLA's count of the K models' forward and
  # backward passes (the optimizer's elementwise update adds < 1%).
  flops = float(grads_fn.lower(params, stacked_batch).compile().cost_analysis()["flops"])
  seconds, first = common.interleaved_seconds(
      {**calls, "loop": loop, "fwd_bwd_limit": lambda: grads_fn(params, stacked_batch)},
      repeats)
  images_per_step = num_models * batch_size
  ips = {k: images_per_step / v for k, v in seconds.items()}
  return {
      "num_models": num_models, "batch_size": batch_size,
      "models_per_block": block or num_models,
      "seconds_per_round": seconds, "first_call_seconds": first,
      "images_per_s": ips,
      "fwd_bwd_flops_per_round": flops,
      "gflops_per_s": {k: flops / v / 1e9 for k, v in seconds.items()},
      "ratio_vmapped_over_loop": seconds["loop"] / seconds["vmapped"],
      "ratio_vmapped_over_fwd_bwd_limit": ips["vmapped"] / ips["fwd_bwd_limit"],
  }


def gemm_peak_gflops(repeats: int, size: int = 2048) -> float:
  """GFLOP/s of one large float32 matrix product: what the device sustains at best.

  A loop of single-model steps already running near it has no idle
  capacity for batching K models to fill, whatever the program (the
  ceiling of vmapped / loop is this over the loop's GFLOP/s).
  """
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(size, size)), jnp.float32)
  product = jax.jit(jnp.matmul)
  seconds = common.time_call(product, a, b, repeats=repeats)
  return 2.0 * size ** 3 / seconds / 1e9


def _launch_seconds(overrides: list[str], workdir: str) -> float:
  command = [sys.executable, "-m", "launch.train", "--config=configs/membership.py",
             f"--workdir={workdir}", *overrides]
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, check=False, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  return time.perf_counter() - start


def separate_runs(num_models: int, batch_size: int, steps: int, runs: int, tmp: str) -> dict:
  """Wall seconds of launch.train processes of configs/membership.py (784-256-10 MLP):
  R single-model runs (extrapolated to K) against one run of K models."""
  common_overrides = [f"--config.num_train_steps={steps}", f"--config.batch_size={batch_size}",
                      "--config.checkpoint_every_steps=0", f"--config.log_every_steps={steps}"]
  single = [_launch_seconds(common_overrides + [
      f"--config.seed={r}", "--config.num_models=1", "--config.data.membership=all"],
      os.path.join(tmp, f"single{r}")) for r in range(runs)]
  together = _launch_seconds(common_overrides + [f"--config.num_models={num_models}"],
                             os.path.join(tmp, "many"))
  per_run = float(np.mean(single))
  return {"config": "configs/membership.py (mnist5k, mlp 784-256-10)", "steps": steps,
          "measured_single_runs": runs, "single_run_seconds": single,
          "k_separate_runs_seconds_extrapolated": per_run * num_models,
          "one_k_model_run_seconds": together,
          "ratio_separate_over_together": per_run * num_models / together}


def _print_row(label: str, row: dict) -> None:
  gflops = row["gflops_per_s"]
  print(f"{label} K={row['num_models']} batch {row['batch_size']}: vmapped "
        f"{row['images_per_s']['vmapped']:.0f} img/s, loop {row['images_per_s']['loop']:.0f} "
        f"img/s, fwd+bwd limit {row['images_per_s']['fwd_bwd_limit']:.0f} img/s; "
        f"vmapped/loop {row['ratio_vmapped_over_loop']:.2f}x, vmapped/limit "
        f"{row['ratio_vmapped_over_fwd_bwd_limit']:.2f}; GFLOP/s vmapped {gflops['vmapped']:.0f}, "
        f"loop {gflops['loop']:.0f}")
  if "vmapped_one_block" in row["images_per_s"]:
    print(f"  in blocks of {row['models_per_block']}; as one vmap of {row['num_models']}: "
          f"{row['images_per_s']['vmapped_one_block']:.0f} img/s")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp256,ibp_small,ibp_small_im2col")
  parser.add_argument("--configs", default="membership:fashion_mnist,property:fashion_mnist",
                      help="shadow-model configs measured as their runs train ('' for none)")
  parser.add_argument("--num_models", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--separate_runs", type=int, default=0)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  peak = gemm_peak_gflops(args.repeats)
  print(f"float32 2048^3 matrix product: {peak:.0f} GFLOP/s (the device's sustained peak)")
  rows = []
  for spec in [c for c in args.configs.split(",") if c]:
    row = measure_config(spec, args.repeats)
    _print_row(f"{spec} ({row['model']}, {row['optimizer']})", row)
    rows.append(row)
  for model_key in [m for m in args.models.split(",") if m]:
    row = measure(model_key, args.num_models, args.batch_size, args.repeats)
    _print_row(model_key, row)
    if args.separate_runs > 0 and model_key == "mlp256":
      import tempfile  # pylint: disable=g-import-not-at-top
      with tempfile.TemporaryDirectory() as tmp:
        row["launches"] = separate_runs(args.num_models, args.batch_size, args.steps,
                                        args.separate_runs, tmp)
      launches = row["launches"]
      print(f"  launch.train: {args.num_models} separate runs ~"
            f"{launches['k_separate_runs_seconds_extrapolated']:.0f} s (extrapolated from "
            f"{args.separate_runs}), one {args.num_models}-model run "
            f"{launches['one_k_model_run_seconds']:.0f} s: "
            f"{launches['ratio_separate_over_together']:.2f}x")
    rows.append(row)
  report = {"benchmark": "many models at once vs one at a time", "kind": "many_models",
            "environment": common.environment(), "load_average": os.getloadavg(),
            "gemm_peak_gflops": peak, "rows": rows}
  if args.out:
    common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
