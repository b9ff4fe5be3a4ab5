"""'verified': verified accuracy under IBP, CROWN-IBP and CROWN, per L-inf radius.

Settings: the `verify` section of a config (`default_config`). For every eps
of `verify.eps_list` and method of `verify.methods`, the fraction of the
selected images that are correctly classified and whose every margin lower
bound over the eps-ball (intersected with [0, 1]) is positive
(`certjax.bounds.margin_lower_bounds`). Writes to its output directory
(`<workdir>/verify/` for `launch.verify` / `launch.evaluate --evaluator=verified`):

  results.json   the figures with the settings, checkpoint and images;
  results.md     one row per eps, verified accuracy (and error) per method;
  results.png    verified accuracy against eps, one line per method;
  results.log.jsonl  the (method, eps) pairs finished: an interrupted run resumes.

Methods: 'ibp' (IBP with the last layer elided), 'crown_ibp' and 'crown'
(each as the elementwise max with IBP). Full CROWN runs one backward pass
per ReLU neuron, so it is skipped (and the reason recorded) on networks with
more than `verify.crown_max_neurons` ReLU neurons per example, and computed
`verify.crown_batch_size` images at a time. Bounds are always computed in
float32: a model trained with compute_dtype='bfloat16' is evaluated through
its float32 twin (`EvalContext.float32_apply_fn`), and every matrix product
and convolution, of the bounds and of the clean prediction, runs at
`Precision.HIGHEST` whatever `jax.default_matmul_precision` says (TF32 on
GPUs and bfloat16 passes on TPUs are the defaults there). With
`verify.sound_rounding` every bound is also rounded outward so that the
verified images are robust for the float32 network itself, not only in exact
arithmetic (Jia & Rinard 2021; see `certjax.bounds.ibp` for what is covered).

Multi-host: each host bounds its share of the images on its own devices, in
batches of `verify.batch_size / num_processes` rounded up to its device
count (padding rows are masked); per-image verified flags are gathered, so
every image counts exactly once whatever the numbers of devices and hosts.

References:
  Gowal et al. 2018, https://arxiv.org/abs/1810.12715 (IBP verified accuracy).
  Zhang et al. 2020, https://arxiv.org/abs/1906.06316 (CROWN-IBP).
  Zhang et al. 2018, https://arxiv.org/abs/1811.00866 (CROWN).
  Cohen et al. 2019, https://arxiv.org/abs/1902.02918 (skip/max selection).
  Jia & Rinard 2021, "Exploiting Verified Neural Networks via Floating Point
  Numerical Error", https://arxiv.org/abs/2003.03021 (sound_rounding).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from certjax import parallel
from certjax import validation
from certjax.bounds import graph as graph_lib
from certjax.bounds.verify import METHODS, margin_lower_bounds
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalResult, EvalSetup, register_evaluator
from certjax.runs import checkpoints as runs_checkpoints
from certjax.runs import files

NAME = "verified"
SECTION = "verify"
RESULTS_STEM = "results"


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.verify`.

  Fields:
    eps_list: L-inf radii in [0, 1] pixel space to verify at.
    methods: any of 'ibp' (elided IBP), 'crown_ibp' (max of CROWN-IBP and
      IBP) and 'crown' (full CROWN; small networks only, see
      crown_max_neurons).
    batch_size: images per bound computation over all hosts (one compiled
      shape per host).
    split: split to verify on; '' means config.data.eval_split.
    crown_max_neurons: full CROWN runs one backward pass per ReLU neuron and
      example; it is skipped (with a note in the results) on networks with
      more ReLU neurons per example than this.
    crown_batch_size: images per full-CROWN computation (its memory grows
      with neurons x batch x layer size).
    checkpoint_step: checkpoint to restore; -1 = the newest.
    sound_rounding: round every bound outward (nextafter after each
      operation, Higham's gamma_n widening after each dot product or
      convolution) so that a verified image is robust for the float32
      network, not only in exact arithmetic (Jia & Rinard 2021). Off by
      default: it costs time (see benchmarks/bounds.py) and a little
      tightness.
  """
  return ml_collections.ConfigDict({
      "eps_list": (0.1,),
      "methods": ("ibp", "crown_ibp"),
      "batch_size": 500,
      "split": "",
      "crown_max_neurons": 5000,
      "crown_batch_size": 4,
      "checkpoint_step": -1,
      "sound_rounding": False,
  })


def validate_settings(settings: Any, setup: EvalSetup | None = None) -> None:
  """Raises ValueError naming the first bad field of `config.verify`."""
  del setup
  eps_list = tuple(settings.eps_list)
  if not eps_list:
    raise ValueError("verify.eps_list must name at least one radius, e.g. (0.1,).")
  for eps in eps_list:
    validation.check_positive(eps, "verify.eps_list entry", allow_zero=True)
    if eps > 1:
      raise ValueError(f"verify.eps_list entries are L-inf radii in [0, 1] pixel space; "
                       f"got {eps!r}.")
  methods = tuple(settings.methods)
  if not methods:
    raise ValueError(f"verify.methods must name at least one of {METHODS}.")
  for method in methods:
    validation.check_choice(method, "verify.methods entry", METHODS)
  validation.check_int_at_least(settings.batch_size, "verify.batch_size", 1)
  validation.check_int_at_least(settings.crown_max_neurons, "verify.crown_max_neurons", 0)
  validation.check_int_at_least(settings.crown_batch_size, "verify.crown_batch_size", 1)
  sound_rounding = settings.get("sound_rounding", False)
  if not isinstance(sound_rounding, bool):
    raise ValueError(f"verify.sound_rounding must be True or False; got {sound_rounding!r}.")
  common.check_selection_settings(settings, SECTION)


def relu_neurons_per_example(logits_fn: Callable[..., Any], image_shape: tuple[int, ...]) -> int:
  """Number of ReLU units CROWN would relax, per example (traced, not run)."""
  graph = graph_lib.AffineGraph(logits_fn, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return sum(math.prod(graph.nodes[i].shape[1:]) for i in graph.relu_indices())


@functools.lru_cache(maxsize=64)
def _compiled_steps(apply_fn: Callable[..., Any], method: str | None,
                    sound_rounding: bool = False):
  """Jitted (variables, images, labels, mask[, eps]) -> per-image flags, one per apply_fn."""

  def correct(variables, x, y, mask):
    logits_fn = functools.partial(apply_fn, variables, train=False)
    # The float32 prediction the bounds are about, not a TF32 / bfloat16 one.
    with jax.default_matmul_precision("float32"):
      return (jnp.argmax(logits_fn(x), axis=-1) == y) & mask

  def verified(variables, x, y, mask, eps):
    logits_fn = functools.partial(apply_fn, variables, train=False)
    lower = margin_lower_bounds(logits_fn, x, y, eps, method, sound_rounding)
    return correct(variables, x, y, mask) & jnp.all(lower > 0, axis=-1)

  return jax.jit(correct if method is None else verified)


def _flags(step: Callable[..., Any], variables: Any, share: common.HostShare, batch: int,
           mesh: Mesh, *extra: Any) -> np.ndarray:
  """Per-image flags of this host's share, in padded batches of `batch` (masked)."""
  out = np.zeros(len(share.indices), bool)
  sharding = parallel.batch_sharded(mesh)
  for part in common.batches(len(share.indices), batch):
    xb, yb = share.x[part], share.y[part]
    count = len(yb)
    mask = np.arange(batch) < count
    if count < batch:
      xb = np.concatenate([xb, np.zeros((batch - count, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros(batch - count, yb.dtype)])
    placed = jax.device_put((xb, yb, mask), sharding)
    out[part] = np.asarray(step(variables, *placed, *extra))[:count]
  return out


def _local_batch(global_batch: int, mesh: Mesh) -> int:
  per_host = -(-int(global_batch) // jax.process_count())
  devices = mesh.devices.size
  return -(-per_host // devices) * devices


def format_table(summary: dict[str, Any]) -> str:
  """Markdown table: one row per eps, verified accuracy (and error) per method."""
  methods = summary["methods"]
  lines = [
      f"Verified accuracy of {summary.get('model')} on {summary['num_images']} "
      f"{summary['dataset']} {summary['split']} images (checkpoint step "
      f"{summary['checkpoint_step']}, skip={summary.get('skip')}, max={summary.get('max')}).",
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
  if summary.get("verify_config", {}).get("sound_rounding"):
    lines.append("")
    lines.append("Bounds rounded outward (verify.sound_rounding): verified for the float32 "
                 "network, not only in exact arithmetic.")
  for note in summary["skipped"]:
    lines.append("")
    lines.append(f"{note['method']} skipped: {note['reason']}")
  seconds = {m: sum(r["seconds"] for r in summary["results"] if r["method"] == m)
             for m in methods}
  lines.append("")
  lines.append("Wall time per method (all eps, including compilation): " + ", ".join(
      f"{m} {s:.1f} s" for m, s in seconds.items() if s) + ".")
  return "\n".join(lines) + "\n"


def metrics_of(summary: dict[str, Any]) -> dict[str, float]:
  """Flat metrics for logging: clean accuracy and verified accuracy per method and eps."""
  metrics = {"clean_accuracy": float(summary["clean_accuracy"])}
  for r in summary["results"]:
    metrics[f"verified_accuracy/{r['method']}@{r['eps']:g}"] = float(r["verified_accuracy"])
  return metrics


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings, float32=True,
                    summary="verified accuracy under IBP / CROWN-IBP / CROWN bounds")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'verified' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  requested = list(dict.fromkeys(settings.methods))
  eps_list = [float(e) for e in settings.eps_list]
  sound_rounding = bool(settings.get("sound_rounding", False))

  def evaluate(ctx: EvalContext) -> EvalResult:
    apply_fn = ctx.float32_apply_fn or ctx.apply_fn
    mesh = parallel.local_mesh()
    share = common.HostShare(ctx.data)
    variables = common.local_variables(ctx.variables, mesh)
    methods, skipped = list(requested), []
    if "crown" in methods:
      image_shape = tuple(share.x.shape[1:]) if share.x is not None else None
      if image_shape is None:  # this host has no image: ask the data for one
        image_shape = tuple(ctx.data.load(ctx.data.indices[:1])[0].shape[1:])
      neurons = relu_neurons_per_example(functools.partial(apply_fn, variables, train=False),
                                         image_shape)
      if neurons > settings.crown_max_neurons:
        methods.remove("crown")
        skipped.append({"method": "crown", "reason": (
            f"the network has {neurons} ReLU neurons per example, more than "
            f"verify.crown_max_neurons={settings.crown_max_neurons} (full CROWN runs one "
            "backward pass per neuron); raise it to run anyway.")})
        common.report(ctx, f"Skipping full CROWN: {skipped[-1]['reason']}")
    batch = _local_batch(settings.batch_size, mesh)
    crown_batch = _local_batch(settings.crown_batch_size, mesh)
    fingerprint = {"evaluator": NAME, "step": int(ctx.step),
                   "indices": ctx.data.indices.tolist()}
    if sound_rounding:  # never resume plain results as sound ones (or back)
      fingerprint["sound_rounding"] = True
    log = common.ResumeLog(common.log_path(ctx, RESULTS_STEM), fingerprint)
    count = share.count

    def run_unit(unit: str, step, size: int, *extra) -> dict[str, Any]:
      if unit not in log.completed:
        start = time.perf_counter()
        flags = _flags(step, variables, share, size, mesh, *extra) if share.indices.size \
            else np.zeros(0, bool)
        flags = common.gather_shares(flags, share.size, share.count)
        log.record(unit, {"flags": flags.astype(int).tolist(),
                          "seconds": time.perf_counter() - start})
      return log.completed[unit]

    clean = run_unit("clean", _compiled_steps(apply_fn, None), batch)
    clean_correct = int(np.sum(clean["flags"]))
    counter = common.progress(len(methods) * len(eps_list), "bound", "verified")
    results = []
    for method in methods:
      step = _compiled_steps(apply_fn, method, sound_rounding)
      size = crown_batch if method == "crown" else batch
      for eps in eps_list:
        unit = run_unit(f"{method}@{eps!r}", step, size, np.float32(eps))
        verified = int(np.sum(unit["flags"]))
        results.append({"eps": eps, "method": method, "num_verified": verified,
                        "verified_accuracy": verified / count, "seconds": unit["seconds"]})
        done = len(results)
        if counter.due(done):
          common.report(ctx, counter.line(done, counter.update(done), {
              f"{method} eps {eps:g} verified %": 100.0 * verified / count}))
    summary = {**common.metadata_block(ctx), "num_images": int(count),
               "clean_accuracy": clean_correct / count, "eps_list": eps_list,
               "methods": requested, "results": results, "skipped": skipped,
               "verify_config": runs_checkpoints.config_to_dict(settings)}
    table = format_table(summary)
    figure = plots.verified_accuracy_figure(summary) if ctx.output_dir is not None else None
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, _json_safe(summary), table,
                                     figure=figure)
    return EvalResult(NAME, metrics_of(summary), artifacts, table, summary)

  return evaluate


def _json_safe(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def read_results(path: str) -> dict[str, Any]:
  """Reads results.json of this evaluator (a workdir, its verify/ directory or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)


def _objective_of_workdir(workdir: str) -> str:
  try:
    return str(files.read_json(os.path.join(workdir, "config.json"))
               .get("objective", {}).get("name", "?"))
  except (OSError, ValueError, AttributeError):
    return "?"


def result_rows(paths: Sequence[str] | str) -> list[dict[str, Any]]:
  """Verified accuracy per (run, method, eps), one dict per row, for tables and plots.

  Args:
    paths: workdirs (reading `<workdir>/verify/results.json`), or results.json
      files; paths without results contribute no row.

  Returns:
    Dicts with run, model, objective, method, eps, verified_accuracy,
    clean_accuracy, images, seconds, workdir.
  """
  if isinstance(paths, str):
    paths = [paths]
  rows = []
  for path in paths:
    json_path = path if path.endswith(".json") else os.path.join(path, SECTION,
                                                                 f"{RESULTS_STEM}.json")
    if not os.path.isfile(json_path):
      continue
    summary = files.read_json(json_path)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(json_path)))
    objective = summary.get("objective") or _objective_of_workdir(run_dir)
    model = summary.get("model", "?")
    for r in summary.get("results", []):
      rows.append({
          "run": f"{model} trained with {objective}", "model": model, "objective": objective,
          "method": r["method"], "eps": float(r["eps"]),
          "verified_accuracy": float(r["verified_accuracy"]),
          "clean_accuracy": float(summary.get("clean_accuracy", float("nan"))),
          "images": summary.get("num_images"), "seconds": r.get("seconds"),
          "workdir": run_dir,
      })
  return rows
