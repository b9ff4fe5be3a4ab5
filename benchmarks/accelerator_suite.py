r"""Every missing accelerator figure in one prepared run that fits a short lease.

    python -m benchmarks.accelerator_suite --out=$OUT             # on the GPU: at most ~8 min
    python -m benchmarks.accelerator_suite --smoke --out=/tmp/s   # CPU, toy sizes, < 1 min

An accelerator is lent for about 15 minutes in all, machine start included,
so nothing can be prepared once it is there: this one command measures, in
one process (compilation shared where programs coincide), every figure the
README lists as missing, each as a ratio against the same model's raw
forward (or forward/backward) measured in the same run, plus the absolute
rate:

  training:  forward, forward+backward and certjax's training step, images/s,
             float32 and bfloat16, for the quickstart model (IBP small CNN,
             28x28x1), ResNet-20 and WRN-28-10 (32x32x3);
  attacks:   PGD-10 and APGD-10 against 10 chained forward+backward passes,
             for the small CNN and ResNet-20;
  bounds:    IBP and CROWN-IBP against the forward, IBP small and large CNNs;
  smoothing: CERTIFY seconds per image for Cohen et al.'s CIFAR-10 ResNet-110
             at N = 100,000 (n0 = 100, alpha = 0.001; they report about 15 s
             per image on an RTX 2080 Ti), float32 and bfloat16, and the
             counting loop's noisy forwards/s against the raw forward.

No data set is read: inputs are random images of the right shapes (rates do
not depend on the values) and the models are freshly initialised. K-models
training and DP-SGD (issues still open) are not in certjax yet; the summary
says so instead of measuring them.

Time budget: `--budget_s` (default 420 s) is shared by the figures in order
of priority (smoothing ResNet-110 first, WRN-28-10 last); a figure starts only
while its share and the whole budget last, and one it cannot start is listed
as skipped, with the reason, rather than overrunning the lease. Compilation
counts against the budget and is recorded per figure.

Writes into `--out` (at most 8 files, all of which come back from a lease):
`training.json`, `attacks.json`, `bounds.json`, `smoothing_float32.json`,
`smoothing_bfloat16.json` in the schemas of benchmarks/train_throughput.py,
attacks.py, bounds.py and smoothing.py (so notebook 03 draws them beside the
CPU references), and `summary.md`. Each JSON records the device, versions,
dtype and the exact settings.

On the lent machine (no ml_collections, tensorflow-datasets, grain or mlxtend
there; see benchmarks/accelerator_wheels.py, which downloads exactly those
and what they need that the machine lacks, for Python 3.12):

    python -m benchmarks.accelerator_wheels           # here: fills .whl/
    # then, in the device run (carry .whl), from the repository root:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:. python3 -m benchmarks.accelerator_suite --out=$OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MNIST = ((28, 28, 1), (0.1307,), (0.3081,))
CIFAR = ((32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
NOT_YET = ("K-models training (the many-models trainer) and DP-SGD are not in certjax yet "
           "(open issues); their figures are not measured.")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The settings of a run: the full one for an accelerator, or the smoke one."""
  training_cases: tuple[tuple[str, str, tuple, int], ...]  # (case, model, data, batch)
  attack_cases: tuple[tuple[str, str, tuple, int], ...]
  bounds_cases: tuple[tuple[str, str, tuple, int], ...]
  smoothing_model: tuple[str, str, tuple]
  smoothing_batch: int
  certify_n0: int
  certify_n: int
  certify_images: int
  count_num: int
  repeats: int


FULL = Sizes(
    training_cases=(("quickstart_ibp_small", "ibp_small", MNIST, 1024),
                    ("resnet20_cifar", "resnet20", CIFAR, 512),
                    ("wrn28_10_cifar", "wrn28_10", CIFAR, 256)),
    attack_cases=(("ibp_small_mnist", "ibp_small", MNIST, 1024),
                  ("resnet20_cifar", "resnet20", CIFAR, 512)),
    bounds_cases=(("ibp_small_mnist", "ibp_small", MNIST, 1024),
                  ("ibp_large_cifar", "ibp_large", CIFAR, 256)),
    smoothing_model=("resnet110_cifar", "resnet110", CIFAR),
    smoothing_batch=1000, certify_n0=100, certify_n=100_000, certify_images=2,
    count_num=10_000, repeats=10)

SMOKE = Sizes(
    training_cases=(("quickstart_ibp_small", "ibp_small", MNIST, 8),),
    attack_cases=(("mlp_mnist", "mlp", MNIST, 8),),
    bounds_cases=(("ibp_small_mnist", "ibp_small", MNIST, 8),),
    smoothing_model=("mlp_cifar", "mlp", CIFAR),
    smoothing_batch=64, certify_n0=16, certify_n=256, certify_images=2, count_num=128,
    repeats=2)

# Figures in order of priority, with their share of the budget.
FAMILY_SHARES = {"smoothing": 0.40, "training": 0.30, "attacks": 0.15, "bounds": 0.15}


class Budget:
  """Wall-clock budget shared by families; a figure starts only while both last.

  Family k may run until the sum of the shares of families 1..k has elapsed:
  what an earlier family leaves unused passes on to the later ones.
  """

  def __init__(self, total_s: float):
    self.start = time.perf_counter()
    self.total_s = total_s
    self.skipped: list[str] = []
    self._family_end = self.start

  def open_family(self, name: str) -> None:
    cumulative = 0.0
    for family, share in FAMILY_SHARES.items():
      cumulative += share
      if family == name:
        break
    self._family_end = self.start + cumulative * self.total_s

  def allows(self, figure: str) -> bool:
    now = time.perf_counter()
    if now >= self.start + self.total_s:
      self.skipped.append(f"{figure}: the whole budget of {self.total_s:.0f} s was spent")
      return False
    if now >= self._family_end:
      self.skipped.append(f"{figure}: its family's share of the budget was spent")
      return False
    return True

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


def _model(name: str, data: tuple, dtype: str = "float32"):
  from certjax import models  # pylint: disable=import-outside-toplevel
  shape, mean, std = data
  model = models.get_model(name, num_classes=10, mean=mean, std=std, dtype=DTYPES[dtype])
  variables = models.init_variables(model, jax.random.key(0), (1, *shape))
  return model, variables, shape


def _images(batch: int, shape: tuple, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.random((batch, *shape), dtype=np.float32)),
          jnp.asarray(rng.integers(0, 10, batch).astype(np.int32)))


def _first_call_seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each call, and each first call's as `<name>_first_call`."""
  medians, first = common.interleaved_seconds(calls, repeats)
  return {**medians, **{f"{name}_first_call": s for name, s in first.items()}}


# ----------------------------------------------------------------------------- training


def training_case(case: str, model_name: str, data: tuple, batch: int, dtype: str,
                  repeats: int) -> dict[str, Any]:
  """Forward, forward+backward and certjax's training step on one batch (images/s)."""
  import optax  # pylint: disable=import-outside-toplevel
  from certjax import parallel  # pylint: disable=import-outside-toplevel
  from certjax.training import objectives  # pylint: disable=import-outside-toplevel
  from certjax.training import train as train_lib  # pylint: disable=import-outside-toplevel

  model, variables, shape = _model(model_name, data, dtype)
  mesh = parallel.make_mesh()
  x, y = _images(batch, shape)
  batch_data = parallel.host_to_global({"image": np.asarray(x), "label": np.asarray(y)}, mesh)
  tx = optax.sgd(0.01, momentum=0.9)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               model_state=model_state, opt_state=tx.init(params))
  # A copy: the training step donates its state, and placing arrays already on
  # the device may not copy them, while the forward passes below keep using
  # `variables` and `params`.
  state = parallel.replicate(jax.tree.map(jnp.copy, state), mesh)
  ctx = objectives.ObjectiveContext(model.apply, 10, 1000, shape)
  loss_fn = objectives.get_objective({"name": "standard"}, ctx)
  key = jax.random.key(1)
  forward = jax.jit(lambda v, images: model.apply(v, images, train=False))
  forward_backward = jax.jit(lambda p, s, b: jax.grad(
      lambda q: loss_fn(q, s, b, key, 0)[0])(p))
  train_step = train_lib.make_train_step(loss_fn, tx, mesh)
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch_data, key)
    return metrics

  times = _interleaved({
      "forward": lambda: forward(variables, batch_data["image"]),
      "forward_backward": lambda: forward_backward(params, model_state, batch_data),
      "train_step": step}, repeats)
  return {
      "case": case, "model": model_name, "input_shape": list(shape), "batch_size": batch,
      "compute_dtype": dtype, "conv_impl": "xla",
      "forward_images_per_s": batch / times["forward"],
      "forward_backward_images_per_s": batch / times["forward_backward"],
      "train_step_images_per_s": batch / times["train_step"],
      "train_step_vs_forward_backward": times["forward_backward"] / times["train_step"],
      "first_call_seconds": {k[:-len("_first_call")]: v for k, v in times.items()
                             if k.endswith("_first_call")},
  }


# ------------------------------------------------------------------------------ attacks


def attack_case(case: str, model_name: str, data: tuple, batch: int,
                repeats: int) -> dict[str, Any]:
  """PGD-10 and APGD-10 against 10 chained forward+backward passes (images/s, ratios)."""
  from certjax import attacks  # pylint: disable=import-outside-toplevel
  model, variables, shape = _model(model_name, data)
  logits_fn = jax.tree_util.Partial(functools.partial(model.apply, train=False), variables)
  x, _ = _images(batch, shape)
  y = jnp.argmax(jax.jit(logits_fn)(x), -1)
  eps, steps = 8 / 255, 10

  @jax.jit
  def fwd_bwd_x10(fn, images, labels):
    grad = jax.grad(lambda z: jnp.sum(attacks.cross_entropy(fn(z), labels)))
    # Each pass depends on the previous one so XLA cannot hoist it.
    return lax.fori_loop(0, steps, lambda i, z: z + 1e-6 * grad(z), images)

  pgd = jax.jit(lambda fn, k, images, labels: attacks.pgd(
      k, fn, images, labels, eps=eps, num_steps=steps, step_size=eps / 4))
  apgd = jax.jit(lambda fn, k, images, labels: attacks.apgd(
      k, fn, images, labels, eps=eps, num_steps=steps))
  key = jax.random.key(2)
  times = _interleaved({"fwd_bwd_x10": lambda: fwd_bwd_x10(logits_fn, x, y),
                        "pgd10": lambda: pgd(logits_fn, key, x, y),
                        "apgd10": lambda: apgd(logits_fn, key, x, y)}, repeats)
  ips = {k: batch / times[k] for k in ("fwd_bwd_x10", "pgd10", "apgd10")}
  return {"input_shape": list(shape), "model": model_name, "batch_size": batch, "eps": eps,
          "images_per_s": ips,
          "ratio_to_fwd_bwd_x10": {k: ips[k] / ips["fwd_bwd_x10"] for k in ("pgd10", "apgd10")},
          "first_call_seconds": {k[:-len("_first_call")]: v for k, v in times.items()
                                 if k.endswith("_first_call")}}


# ------------------------------------------------------------------------------- bounds


def bounds_case(case: str, model_name: str, data: tuple, batch: int,
                repeats: int) -> dict[str, Any]:
  """IBP and CROWN-IBP margin bounds against the forward pass (seconds, ratios)."""
  from certjax import bounds  # pylint: disable=import-outside-toplevel
  model, variables, shape = _model(model_name, data)
  logits_fn = functools.partial(model.apply, variables, train=False)
  x, y = _images(batch, shape)
  eps = 2 / 255
  programs = {
      "forward": jax.jit(lambda images: logits_fn(images)),
      "ibp": jax.jit(lambda images, labels: bounds.margin_lower_bounds(
          logits_fn, images, labels, eps, "ibp")),
      "crown_ibp": jax.jit(lambda images, labels: bounds.margin_lower_bounds(
          logits_fn, images, labels, eps, "crown_ibp")),
  }
  times = _interleaved({"forward": lambda: programs["forward"](x),
                        "ibp": lambda: programs["ibp"](x, y),
                        "crown_ibp": lambda: programs["crown_ibp"](x, y)}, repeats)
  seconds = {k: times[k] for k in programs}
  return {"model": case, "registry_model": model_name, "batch": batch,
          "image_shape": list(shape), "eps": eps, "seconds": seconds,
          "relative_to_forward": {k: v / seconds["forward"] for k, v in seconds.items()},
          "first_call_seconds": {k[:-len("_first_call")]: v for k, v in times.items()
                                 if k.endswith("_first_call")}}


# ---------------------------------------------------------------------------- smoothing


def smoothing_case(sizes: Sizes, dtype: str, repeats: int, budget: Budget) -> dict[str, Any]:
  """The counting loop against the raw forward, and CERTIFY seconds per image."""
  from certjax import smoothing  # pylint: disable=import-outside-toplevel
  case, model_name, data = sizes.smoothing_model
  model, variables, shape = _model(model_name, data, dtype)
  logits_fn = functools.partial(model.apply, variables, train=False)
  batch, num = sizes.smoothing_batch, sizes.count_num
  x, _ = _images(batch, shape)
  inputs, _ = _images(1, shape, seed=1)
  forward = jax.jit(logits_fn)
  chunks = -(-num // batch)

  def forward_chunks():
    return [forward(x) for _ in range(chunks)]

  def count():
    return smoothing.sample_counts(jax.random.key(3), logits_fn, inputs, 0.25, num, batch)

  times = _interleaved({"forward": forward_chunks, "count": count}, repeats)
  forward_rate = batch * chunks / times["forward"]
  count_rate = num / times["count"]
  result = {
      "benchmark": "accelerator_suite smoothing", "kind": "smoothing", "model": case,
      "registry_model": model_name, "input_shape": list(shape), "dtype": dtype,
      "conv_impl": "xla", "noise": "gaussian", "batch": batch, "num": num, "inputs": 1,
      "sigma": 0.25, "repeats": repeats,
      "forward_images_per_second": forward_rate,
      "smoothing_noisy_forwards_per_second": count_rate,
      "ratio_smoothing_to_forward": count_rate / forward_rate,
      "first_call_seconds": {"forward": times["forward_first_call"],
                             "count": times["count_first_call"]},
  }
  figure = f"smoothing {case} {dtype}: certify at n={sizes.certify_n}"
  if budget.allows(figure):
    images, _ = _images(sizes.certify_images, shape, seed=2)
    certify = functools.partial(
        smoothing.certify, logits_fn=logits_fn, x=images, sigma=0.25, n0=sizes.certify_n0,
        n=sizes.certify_n, alpha=0.001, batch_size=batch)
    first = _first_call_seconds(lambda: certify(jax.random.key(5)).radius)
    seconds = _first_call_seconds(lambda: certify(jax.random.key(6)).radius)
    result.update({
        "certify_n0": sizes.certify_n0, "certify_n": sizes.certify_n, "certify_alpha": 0.001,
        "certify_images": sizes.certify_images, "certify_first_call_seconds": first,
        "certify_seconds": seconds,
        "certify_seconds_per_image": seconds / sizes.certify_images,
        # Cohen et al.'s figure for the same model, n and alpha on an RTX 2080 Ti.
        "cohen_et_al_seconds_per_image_rtx2080ti": 15.0,
    })
  return result


# ------------------------------------------------------------------------------- driver


def _report(kind: str, benchmark: str, sizes_name: str, extra: dict[str, Any]) -> dict:
  return {"benchmark": benchmark, "kind": kind, "suite": "accelerator_suite",
          "sizes": sizes_name, "environment": common.environment(), **extra}


def _attempt(figure: str, budget: Budget, errors: list[str], fn: Callable[[], Any]):
  """Runs one figure if the budget allows; an error is recorded, not fatal."""
  if not budget.allows(figure):
    return None
  start = time.perf_counter()
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except
    # One figure failing (e.g. out of memory) must not lose the others of the lease.
    errors.append(f"{figure}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    traceback.print_exc()
    return None
  print(f"[suite] {figure}: {time.perf_counter() - start:.1f} s "
        f"(total {budget.elapsed():.0f} s)", flush=True)
  return out


def run(out_dir: str, sizes: Sizes, sizes_name: str, budget_s: float,
        dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, Any]:
  """Measures every family into `out_dir`; returns {file name: report}."""
  os.makedirs(out_dir, exist_ok=True)
  budget = Budget(budget_s)
  errors: list[str] = []
  written: dict[str, dict] = {}

  budget.open_family("smoothing")
  for dtype in dtypes:
    figure = f"smoothing {sizes.smoothing_model[0]} {dtype}"
    result = _attempt(figure, budget, errors,
                      lambda dtype=dtype: smoothing_case(sizes, dtype, sizes.repeats, budget))
    if result is not None:
      result = {**result, "suite": "accelerator_suite", "sizes": sizes_name,
                "environment": common.environment()}
      written[f"smoothing_{dtype}.json"] = result

  budget.open_family("training")
  training = []
  for dtype in dtypes:
    for case, model_name, data, batch in sizes.training_cases:
      result = _attempt(f"training {case} {dtype}", budget, errors,
                        lambda c=case, m=model_name, d=data, b=batch, t=dtype: training_case(
                            c, m, d, b, t, sizes.repeats))
      if result is not None:
        training.append(result)
  if training:
    written["training.json"] = _report("training", "train_throughput", sizes_name,
                                       {"results": training})

  budget.open_family("attacks")
  certjax_attacks = {}
  for case, model_name, data, batch in sizes.attack_cases:
    result = _attempt(f"attacks {case}", budget, errors,
                      lambda c=case, m=model_name, d=data, b=batch: attack_case(
                          c, m, d, b, sizes.repeats))
    if result is not None:
      certjax_attacks[case] = result
  if certjax_attacks:
    written["attacks.json"] = _report("attacks", "attacks", sizes_name,
                                      {"certjax": certjax_attacks})

  budget.open_family("bounds")
  bound_results = []
  for case, model_name, data, batch in sizes.bounds_cases:
    result = _attempt(f"bounds {case}", budget, errors,
                      lambda c=case, m=model_name, d=data, b=batch: bounds_case(
                          c, m, d, b, sizes.repeats))
    if result is not None:
      bound_results.append(result)
  if bound_results:
    written["bounds.json"] = _report("bounds", "bounds", sizes_name, {"results": bound_results})

  for name, report in written.items():
    report["skipped"], report["errors"] = list(budget.skipped), list(errors)
    common.write_report(os.path.join(out_dir, name), report)
  summary = format_summary(written, budget, errors, sizes_name)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary)
  print(summary, flush=True)
  return written


def _ratio(value: Any) -> str:
  return "-" if value is None else f"{value:.3f}"


def format_summary(written: dict[str, dict], budget: Budget, errors: list[str],
                   sizes_name: str) -> str:
  """The run in one Markdown page: every figure, what was skipped and why."""
  env = common.environment()
  lines = [f"# Accelerator suite ({sizes_name})", "",
           f"{env['device_kind']} x{env['num_devices']} ({env['platform']}), jax "
           f"{env['versions'].get('jax', '?')}, {budget.elapsed():.0f} s of a "
           f"{budget.total_s:.0f} s budget, {env['time']}.", ""]
  for dtype in DTYPES:
    report = written.get(f"smoothing_{dtype}.json")
    if report:
      per_image = report.get("certify_seconds_per_image")
      lines.append(
          f"* smoothing {report['model']} {dtype}: certify "
          + (f"{per_image:.2f} s/image at n={report['certify_n']:,} (Cohen et al.: about "
             "15 s on an RTX 2080 Ti)" if per_image is not None else "skipped")
          + f"; counting {report['smoothing_noisy_forwards_per_second']:.0f} noisy forwards/s"
          f" = {_ratio(report['ratio_smoothing_to_forward'])} x the raw forward.")
  for r in written.get("training.json", {}).get("results", []):
    lines.append(f"* training {r['case']} {r['compute_dtype']} batch {r['batch_size']}: "
                 f"step {r['train_step_images_per_s']:.0f} img/s = "
                 f"{_ratio(r['train_step_vs_forward_backward'])} x fwd+bwd "
                 f"({r['forward_backward_images_per_s']:.0f} img/s); forward "
                 f"{r['forward_images_per_s']:.0f} img/s.")
  for case, r in written.get("attacks.json", {}).get("certjax", {}).items():
    lines.append(f"* attacks {case} batch {r['batch_size']}: PGD-10 "
                 f"{r['images_per_s']['pgd10']:.0f} img/s = "
                 f"{_ratio(r['ratio_to_fwd_bwd_x10']['pgd10'])} x 10 fwd+bwd; APGD-10 "
                 f"{_ratio(r['ratio_to_fwd_bwd_x10']['apgd10'])} x.")
  for r in written.get("bounds.json", {}).get("results", []):
    rel = r["relative_to_forward"]
    lines.append(f"* bounds {r['model']} batch {r['batch']}: IBP {_ratio(rel['ibp'])} x "
                 f"forward, CROWN-IBP {_ratio(rel['crown_ibp'])} x forward.")
  lines += ["", NOT_YET, ""]
  if budget.skipped:
    lines += ["Skipped (budget):", *[f"* {s}" for s in budget.skipped], ""]
  if errors:
    lines += ["Errors:", *[f"* {e}" for e in errors], ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory for the JSONs and summary.md")
  parser.add_argument("--smoke", action="store_true",
                      help="toy sizes on any device in well under a minute (CI runs this)")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="wall-clock budget in seconds (default 420, smoke 120)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args(argv)
  sizes, name = (SMOKE, "smoke") if args.smoke else (FULL, "full")
  budget_s = args.budget_s if args.budget_s is not None else (120.0 if args.smoke else 420.0)
  dtypes = tuple(d for d in args.dtypes.split(",") if d)
  for dtype in dtypes:
    if dtype not in DTYPES:
      parser.error(f"--dtypes takes {', '.join(DTYPES)}; got {dtype!r}.")
  return run(args.out, sizes, name, budget_s, dtypes)


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)
