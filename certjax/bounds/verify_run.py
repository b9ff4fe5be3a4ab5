"""`run_verification(config, workdir)`: verified accuracy of a trained model.

The library call behind `launch/verify.py`, usable from a notebook. It
restores the newest checkpoint of a training workdir, selects evaluation
images as Cohen et al.'s `certify.py` does (every `config.skip`-th image of
the split, below index `config.max`; -1 = all), and computes clean accuracy
and, for every eps in `config.verify.eps_list` and method in
`config.verify.methods`, the fraction of images verified robust. Results go
to `<workdir>/verify/results.json` and a Markdown table `results.md`.

Methods: 'ibp' (IBP with the last layer elided), 'crown_ibp' and 'crown'
(each as the elementwise max with IBP, see `verify.margin_lower_bounds`).
Full CROWN runs one backward pass per ReLU neuron, so it is skipped (and the
reason recorded) on networks with more than `verify.crown_max_neurons` ReLU
neurons per example, and computed `verify.crown_batch_size` images at a time.
Bounds are always computed in float32 (a model trained with
compute_dtype='bfloat16' is rebuilt in float32 for verification).

The run is data-parallel over every device of every host: each host reads
only its contiguous share of the selected images (`parallel.host_share`),
and global batch k joins the k-th local batch of every host into one array
sharded over the `data` mesh axis. `verify.batch_size` and
`verify.crown_batch_size` are global and rounded up to a multiple of the
device count; padding rows carry mask False, and the verified counts are
masked sums over the global batch, so every image counts exactly once
whatever the number of devices and hosts. Process 0 writes the files.

References:
  Gowal et al. 2018, https://arxiv.org/abs/1810.12715 (IBP verified accuracy).
  Zhang et al. 2020, https://arxiv.org/abs/1906.06316 (CROWN-IBP).
  Zhang et al. 2018, https://arxiv.org/abs/1811.00866 (CROWN).
  Cohen et al. 2019, https://arxiv.org/abs/1902.02918 (skip/max selection).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from certjax import data as data_lib
from certjax import models as models_lib
from certjax import parallel
from certjax import validation
from certjax.bounds import config as verify_config_lib
from certjax.bounds import graph as graph_lib
from certjax.bounds.verify import margin_lower_bounds

RESULTS_DIR = "verify"
RESULTS_JSON = "results.json"
RESULTS_TABLE = "results.md"


def relu_neurons_per_example(logits_fn, image_shape: tuple[int, ...]) -> int:
  """Number of ReLU units CROWN would relax, per example (traced, not run)."""
  graph = graph_lib.AffineGraph(logits_fn, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return sum(math.prod(graph.nodes[i].shape[1:]) for i in graph.relu_indices())


@dataclasses.dataclass
class VerificationResults:
  """What `run_verification` returns (and writes as JSON)."""
  summary: dict[str, Any]
  table: str
  json_path: str
  table_path: str


def _local_batches(x: np.ndarray, y: np.ndarray, num_batches: int, local_size: int):
  """This host's `num_batches` batches of `local_size` rows (zero padding, mask False)."""
  for k in range(num_batches):
    xb, yb = x[k * local_size:(k + 1) * local_size], y[k * local_size:(k + 1) * local_size]
    count = len(xb)
    mask = np.arange(local_size) < count
    if count < local_size:
      xb = np.concatenate([xb, np.zeros((local_size - count, *x.shape[1:]), x.dtype)])
      yb = np.concatenate([yb, np.zeros(local_size - count, y.dtype)])
    yield {"image": xb, "label": yb, "mask": mask}


def _global_batches(x, y, share_size: int, batch_size: int, mesh):
  """Global sharded batches of `batch_size` over all hosts' shares (padded, masked).

  Every host yields the same number of batches, as the SPMD programs need.
  """
  local_size = batch_size // jax.process_count()
  num_batches = max(1, -(-share_size // local_size))
  for batch in _local_batches(x, y, num_batches, local_size):
    yield parallel.host_to_global(batch, mesh)


def _make_steps(model, methods, mesh):
  """Jitted (variables, batch[, eps]) -> count of correct / verified real images."""

  def logits_fn_of(variables):
    return functools.partial(model.apply, variables, train=False)

  def correct_count(variables, batch):
    correct = jnp.argmax(logits_fn_of(variables)(batch["image"]), axis=-1) == batch["label"]
    return jnp.sum(correct & batch["mask"])

  def verified_count(method, variables, batch, eps):
    logits_fn = logits_fn_of(variables)
    lower = margin_lower_bounds(logits_fn, batch["image"], batch["label"], eps, method)
    correct = jnp.argmax(logits_fn(batch["image"]), axis=-1) == batch["label"]
    return jnp.sum(correct & jnp.all(lower > 0, axis=-1) & batch["mask"])

  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  count_clean = jax.jit(correct_count, in_shardings=(repl, sharded), out_shardings=repl)
  steps = {m: jax.jit(functools.partial(verified_count, m),
                      in_shardings=(repl, sharded, repl), out_shardings=repl)
           for m in methods}
  return count_clean, steps


def format_table(summary: dict[str, Any]) -> str:
  """Markdown table: one row per eps, verified accuracy (and error) per method."""
  methods = summary["methods"]
  lines = [
      f"Verified accuracy of {summary['model']} on {summary['num_images']} "
      f"{summary['dataset']} {summary['split']} images (checkpoint step "
      f"{summary['checkpoint_step']}, skip={summary['skip']}, max={summary['max']}).",
      f"Clean accuracy: {summary['clean_accuracy']:.2%} "
      f"(error {1 - summary['clean_accuracy']:.2%}).",
      "",
      "| eps | " + " | ".join(f"{m} verified acc (err)" for m in methods) + " |",
      "|---|" + "---|" * len(methods),
  ]
  by_key = {(r["eps"], r["method"]): r for r in summary["results"]}
  for eps in summary["eps_list"]:
    cells = []
    for m in methods:
      r = by_key.get((eps, m))
      cells.append("skipped" if r is None else
                   f"{r['verified_accuracy']:.2%} ({1 - r['verified_accuracy']:.2%})")
    lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
  for note in summary["skipped"]:
    lines.append("")
    lines.append(f"{note['method']} skipped: {note['reason']}")
  seconds = {m: sum(r["seconds"] for r in summary["results"] if r["method"] == m)
             for m in methods}
  lines.append("")
  lines.append("Wall time per method (all eps, including compilation): " + ", ".join(
      f"{m} {s:.1f} s" for m, s in seconds.items() if s) + ".")
  return "\n".join(lines) + "\n"


def run_verification(config: ml_collections.ConfigDict, workdir: str) -> VerificationResults:
  """Verified accuracy per eps and method of the model trained in `workdir`.

  Args:
    config: the config the model was trained with, plus evaluation overrides
      (`config.verify`, `config.skip`, `config.max`); usually the same
      `configs/*.py` file given to `launch.train`.
    workdir: the training workdir (holds checkpoints/); results are written
      to `<workdir>/verify/`.

  Returns:
    `VerificationResults` with the summary dict (also written as JSON), the
    Markdown table and the paths written.

  Raises:
    ValueError: invalid config fields, or a selection holding no image.
    FileNotFoundError: no checkpoint in `workdir`.
  """
  from certjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from certjax.training import train as train_lib  # pylint: disable=g-import-not-at-top
  from certjax.training import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top

  config_lib.validate_config(config)
  cfg = config.verify
  verify_config_lib.validate(cfg)
  validation.check_int_at_least(config.skip, "skip", 1)
  validation.check_int_at_least(config.max, "max", -1)
  if config.compute_dtype != "float32":
    # Bounds computed in bfloat16 can be unsound by rounding; certify in float32.
    logging.info("Verifying in float32 (the model was configured with compute_dtype=%s).",
                 config.compute_dtype)
    config = config.copy_and_resolve_references()
    config.compute_dtype = "float32"
  model, variables, config, info = train_lib.load_trained(workdir, config=config)
  step = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints,
                               read_only=True).latest_step()
  split = cfg.split or config.data.eval_split
  indices = data_lib.select_split_indices(config.data, split, int(config.skip), int(config.max))
  share, share_size = parallel.host_share(indices.size)
  x_all, y_all = data_lib.load_examples(config.data, split, indices[share])
  logging.info("Verifying %s on %d %s %s images at eps %s with %s (%d here, %d device(s) "
               "of %d host(s))", config.model.name, len(indices), info.name, split,
               tuple(cfg.eps_list), tuple(cfg.methods), len(x_all), jax.device_count(),
               jax.process_count())

  methods = list(dict.fromkeys(cfg.methods))
  eps_list = [float(e) for e in cfg.eps_list]
  skipped = []
  if "crown" in methods:
    neurons = relu_neurons_per_example(models_lib.make_logits_fn(model, variables),
                                       tuple(info.image_shape))
    if neurons > cfg.crown_max_neurons:
      methods.remove("crown")
      skipped.append({"method": "crown", "reason": (
          f"the network has {neurons} ReLU neurons per example, more than "
          f"verify.crown_max_neurons={cfg.crown_max_neurons} (full CROWN runs one backward "
          "pass per neuron); raise it to run anyway.")})
      logging.warning("Skipping full CROWN: %s", skipped[-1]["reason"])

  mesh = parallel.make_mesh()
  batch_sizes = {"batch_size": parallel.round_up_batch(cfg.batch_size, mesh,
                                                       "verify.batch_size")}
  if "crown" in methods:
    batch_sizes["crown"] = parallel.round_up_batch(cfg.crown_batch_size, mesh,
                                                   "verify.crown_batch_size")
  count_clean, steps = _make_steps(model, methods, mesh)
  variables = parallel.replicate(jax.device_get(variables), mesh)
  clean_correct = 0
  for batch in _global_batches(x_all, y_all, share_size, batch_sizes["batch_size"], mesh):
    clean_correct += int(count_clean(variables, batch))
  results = []
  for method in methods:
    batch_size = batch_sizes["crown" if method == "crown" else "batch_size"]
    for eps in eps_list:
      start = time.perf_counter()
      verified = 0
      for batch in _global_batches(x_all, y_all, share_size, batch_size, mesh):
        verified += int(steps[method](variables, batch, np.float32(eps)))
      seconds = time.perf_counter() - start
      results.append({"eps": eps, "method": method, "num_verified": verified,
                      "verified_accuracy": verified / len(indices), "seconds": seconds})
      logging.info("eps %g %s: verified %d / %d (%.2f%%) in %.1f s", eps, method, verified,
                   len(indices), 100 * verified / len(indices), seconds)

  summary = {
      "workdir": os.path.abspath(workdir), "checkpoint_step": step,
      "model": config.model.name, "dataset": info.name, "split": split,
      "skip": int(config.skip), "max": int(config.max), "num_images": int(len(indices)),
      "clean_accuracy": clean_correct / len(indices), "eps_list": eps_list,
      "methods": list(dict.fromkeys(cfg.methods)), "results": results, "skipped": skipped,
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "num_processes": jax.process_count(), "platform": platform.platform(),
      "jax_version": jax.__version__,
  }
  table = format_table(summary)
  out_dir = os.path.join(workdir, RESULTS_DIR)
  json_path, table_path = os.path.join(out_dir, RESULTS_JSON), os.path.join(out_dir, RESULTS_TABLE)
  if parallel.is_main_process():
    os.makedirs(out_dir, exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(summary, f, indent=2)
    with open(table_path, "w") as f:
      f.write(table)
  return VerificationResults(summary, table, json_path, table_path)
