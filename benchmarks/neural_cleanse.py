r"""Neural Cleanse over all classes at once (vmapped) against one class at a time.

`certjax.poisoning.neural_cleanse` reverse-engineers one trigger per class.
The per-class optimisation of a small model is a long chain of small steps
that leaves the cores idle; the vmapped form runs all classes' steps as one
program, each step's matrix products K times larger. Measured in one process,
on the same model, images, keys and settings (early stopping off, so every
class runs the same number of epochs in both forms and they do the same
work):
  * vmapped: `neural_cleanse(..., batching='vmap')`, one compiled program;
  * loop: `batching='loop'`, the jitted single-class program called once per
    class from Python (what a per-class script does);
  * map: `batching='map'`, the classes one after the other inside one
    program (`lax.map`);
  * ratio loop / vmapped (the speed-up; the issue's aim: >= 1.5x on 2 CPU
    cores) and loop / map.
Timings are medians over `--repeats` interleaved rounds after one warm-up
call each (compilation, reported separately). Weights are random: with early
stopping off, the work does not depend on them. The report (kind 'attacks',
key 'neural_cleanse') records device, versions, the XLA options the programs
were compiled with and the load average before and after.

    python -m benchmarks.neural_cleanse --out=results/neural_cleanse.json
    python -m benchmarks.neural_cleanse --models=mlp256 --batchings=vmap,loop,map

Reference (benchmarks/reference/cpu-2core/neural_cleanse.json: 2 shared CPU
cores, load average 4-6 from other jobs, 10 classes, 3 epochs of 4 batches
of 32): loop / vmapped 1.9x for the 784-256-10 MLP, 1.0x for the IBP-small
CNN and 0.74x for the same CNN as im2col matrix products. A small model's
step leaves the cores idle and vmapping fills them; a CNN step already keeps
both cores busy, and ten classes' im2col patches at once (10 x 32 images)
no longer fit in cache. Without `neural_cleanse`'s XLA:CPU option (no
YNNPACK fusions) the MLP's vmapped program was about 2x slower and the ratio
about 1.0-1.2x on the same machine.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks import common
from certjax import data as data_lib
from certjax import models as models_lib
from certjax.poisoning import neural_cleanse as nc

MODELS = {  # name: (registered model, kwargs)
    "mlp256": ("mlp", {"hidden": (256,)}),
    # Each convolution as one matrix product: on XLA:CPU its input gradient
    # (what the trigger optimisation needs) is ~8x faster than the native one.
    "ibp_small_im2col": ("ibp_small", {"conv_impl": "im2col"}),
    "ibp_small": ("ibp_small", {}),
}


def measure(model_key: str, *, batchings: tuple[str, ...], num_images: int, num_epochs: int,
            batches_per_epoch: int, batch_size: int, repeats: int) -> dict:
  """In-process figures of one model (module docstring)."""
  name, kwargs = MODELS[model_key]
  model = models_lib.get_model(name, num_classes=10, mean=(0.1307,), std=(0.3081,), **kwargs)
  variables = models_lib.init_variables(model, jax.random.key(0), (1, 28, 28, 1))
  # One logits_fn object for every call: the jitted programs are cached on it.
  logits_fn = jax.tree_util.Partial(model.apply, variables, train=False)
  x, _ = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, num_images)
  settings = {"num_classes": 10, "num_epochs": num_epochs,
              "batches_per_epoch": batches_per_epoch, "batch_size": batch_size,
              "early_stop": False}
  key = jax.random.key(0)
  calls = {b: (lambda b=b: nc.neural_cleanse(key, logits_fn, x, batching=b, **settings))
           for b in batchings}
  seconds, first = common.interleaved_seconds(calls, repeats)
  results = {b: calls[b]() for b in ("vmap", "loop")}
  steps = 10 * num_epochs * batches_per_epoch
  row = {
      "model": model_key, "num_classes": 10, "num_images": num_images,
      "num_epochs": num_epochs, "batches_per_epoch": batches_per_epoch,
      "batch_size": batch_size, "repeats": repeats,
      "seconds": seconds, "first_call_seconds": first,
      "optimisation_steps_per_s": {b: steps / s for b, s in seconds.items()},
      "ratio_loop_over_vmap": seconds["loop"] / seconds["vmap"],
      "max_abs_mask_difference_vmap_loop": float(np.max(np.abs(
          np.asarray(results["vmap"].mask) - np.asarray(results["loop"].mask)))),
  }
  if "map" in seconds:
    row["ratio_loop_over_map"] = seconds["loop"] / seconds["map"]
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp256,ibp_small_im2col,ibp_small")
  parser.add_argument("--batchings", default="vmap,loop",
                      help="'vmap' and 'loop' are required; add 'map' for lax.map")
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--num_epochs", type=int, default=3)
  parser.add_argument("--batches_per_epoch", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  batchings = tuple(args.batchings.split(","))
  if not {"vmap", "loop"} <= set(batchings) <= set(nc.BATCHINGS):
    parser.error(f"--batchings must include vmap and loop, within {nc.BATCHINGS}.")
  load_before = list(os.getloadavg())
  rows = []
  for model_key in args.models.split(","):
    row = measure(model_key, batchings=batchings, num_images=args.num_images,
                  num_epochs=args.num_epochs, batches_per_epoch=args.batches_per_epoch,
                  batch_size=args.batch_size, repeats=args.repeats)
    timings = ", ".join(f"{b} {row['seconds'][b]:.3f} s" for b in batchings)
    print(f"{model_key}: {timings}; loop/vmapped {row['ratio_loop_over_vmap']:.2f}x "
          f"(compile+first call: vmapped {row['first_call_seconds']['vmap']:.1f} s, loop "
          f"{row['first_call_seconds']['loop']:.1f} s)")
    rows.append(row)
  report = {"benchmark": "neural cleanse: all classes vmapped vs one class at a time",
            "kind": "attacks", "environment": common.environment(),
            # XLA options neural_cleanse compiles its programs with on this backend.
            "compiler_options": dict(nc._compiler_options(jax.default_backend())),
            "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
            "neural_cleanse": rows}
  if args.out:
    common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
