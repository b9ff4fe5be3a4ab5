r"""Carlini-Wagner L2 throughput against the raw forward/backward rate, and torchattacks' CW.

The unit is the optimisation step: one example, one Adam iteration (one
forward and one backward pass of the model plus the attack's own work:
tanh, Adam moments, the best-so-far bookkeeping, the binary search). For
each model, on one batch and in one run:

  * fwd_bwd: N chained forward+backward passes (jax.grad of the
    cross-entropy with respect to the INPUT), the floor any N-step gradient
    attack pays;
  * pgd: certjax.attacks.pgd (L-inf, N steps), for scale (attacks.py
    measures it at about 0.85-1.0 of fwd_bwd);
  * tanh_adam: the floor of CW's step: N iterations of the CW gradient
    through tanh and one Adam update each, without the binary search, the
    abort check or the best-so-far bookkeeping;
  * cw_l2: certjax.attacks.cw_l2 with one search step of N iterations at a
    fixed c = 1 (torchattacks' setting), abort_early=False so that every
    call runs exactly N iterations;
  * cw_l2_search: the same N iterations as `search_steps` binary-search
    steps of N / search_steps each (the outer loop's cost);
  * steps/s = batch * N / seconds, and ratio = steps/s / fwd_bwd steps/s
    (1.0 = the attack costs nothing beyond the model's passes).

Timings alternate between the functions over `--repeats` rounds and report
the median, the best round and the process CPU time (see attacks.py for why
the last two are the better estimates on a shared CPU). The models, weights
and batches are those of benchmarks/attacks.py (random flax weights; labels
the clean predictions): the MLP 784-256-256-10 and the small CNN on 32x32x3,
each with its own batch size and N (`--mlp`, `--cnn`: batch,steps).

Peers (`--peers`): torchattacks 3.5.1's `CW(model, c=1, kappa=0, steps=N,
lr=0.01)` on the PyTorch twin of the same weights and batch (weights copied
as in attacks.py, checked on the clean logits). It has no binary search (a
fixed c) and stops the whole batch early when the summed loss rose since
its last check (every N/10 steps), so its steps are counted with a forward
hook, and the comparison is per optimisation step: steps/s on each side, and
certjax's cw_l2 steps/s over torchattacks'. Both optimise the same loss from
the same start with Adam at the same learning rate (torch's Adam adds its
epsilon before the bias correction, TensorFlow's and certjax's after it), so
the success rates and L2 norms of the two should be close; the report gives
both. The PyTorch side runs in its own environment (torch, torchattacks; no
JAX needed): `--peers` saves the weights and batches to a temporary .npz and
runs this script with `--peers-only` under `--peers-python`. Its threads: as
many as torch takes by default (`--torch-threads` to change), with
OMP_WAIT_POLICY=PASSIVE unless `--omp-wait-policy=''` (OpenMP threads that
spin-wait lose most of their time on a CPU shared with other jobs; see
smoothing_peers.py).

    python -m benchmarks.cw --out=results/cw.json
    python -m benchmarks.cw --peers --peers-python=/tmp/peers/bin/python \
        --out=results/cw_peers.json
    python -m benchmarks.cw --save-weights=/tmp/cw_bench.npz --out=results/cw.json
    /tmp/peers/bin/python -m benchmarks.cw --peers-only --weights=/tmp/cw_bench.npz \
        --out=results/cw_peers_only.json   # numpy, torch, torchattacks only

Reference (benchmarks/reference/cpu-2core/cw.json: 2 CPU cores, idle, load
average 0.8 at start, 7 rounds; 2026-12-03): ratio to fwd_bwd (median /
best / CPU time) for the MLP: cw_l2 0.728 / 0.768 / 0.720, tanh_adam floor
0.743 / 0.783 / 0.759, PGD 0.999 / 0.965 / 0.997; for the CNN: cw_l2
0.966 / 0.993 / 0.960, floor 0.947 / 0.988 / 0.931. CW-L2 runs within 2-4%
of its tanh+Adam floor: on the MLP the tanh and Adam arithmetic over
256 x 784 inputs costs a quarter of the model's own forward+backward, which
the CNN's heavier passes hide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Tuple

import numpy as np

from benchmarks import attacks as attack_bench
from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONST = 1.0          # torchattacks' default c
LEARNING_RATE = 0.01  # the reference's and torchattacks' default
SEARCH_STEPS = 4
PGD_EPS, PGD_STEP = 8 / 255, 2 / 255
DEFAULT_SIZES = {"mlp": "256,100", "cnn": "64,40"}
SUFFIXES = ("", "_best", "_cpu_time")


def _parse_size(text: str) -> Tuple[int, int]:
  batch, steps = (int(v) for v in text.split(","))
  if batch < 1 or steps < SEARCH_STEPS or steps % SEARCH_STEPS:
    raise ValueError(f"batch,steps must be positive with steps a multiple of {SEARCH_STEPS}; "
                     f"got {text!r}")
  return batch, steps


def _step_rates(seconds: Dict[str, Dict[str, float]], batch: int, steps: int,
                baseline: str = "fwd_bwd") -> Dict[str, Any]:
  """Optimisation steps/s (examples x iterations / s) and ratios to the baseline."""
  out = {}
  for stat, suffix in (("median", ""), ("min", "_best"), ("cpu", "_cpu_time")):
    rate = {k: batch * steps / max(v[stat], 1e-9) for k, v in seconds.items()}
    out["steps_per_s" + suffix] = rate
    out["ratio_to_fwd_bwd" + suffix] = {k: v / rate[baseline] for k, v in rate.items()
                                        if k != baseline}
  out["seconds_per_call"] = {k: v["median"] for k, v in seconds.items()}
  out["cpu_seconds_per_wall_second"] = {k: v["cpu_per_wall"] for k, v in seconds.items()}
  return out


def _l2(v: np.ndarray) -> np.ndarray:
  return np.sqrt(np.sum(np.asarray(v, np.float64).reshape(len(v), -1) ** 2, axis=1))


def _quality(x: np.ndarray, x_adv: np.ndarray, fooled: np.ndarray) -> Dict[str, Any]:
  sizes = _l2(x_adv - x)
  return {"success_rate": float(np.mean(fooled)),
          "median_l2_of_successes": float(np.median(sizes[fooled])) if fooled.any() else None,
          "mean_l2_of_successes": float(np.mean(sizes[fooled])) if fooled.any() else None}


# ----------------------------------------------------------------------------
# JAX / certjax side.


def run_certjax(sizes: Dict[str, Tuple[int, int]], warmup: int,
                repeats: int) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from jax import lax

  from certjax import attacks

  modules = attack_bench.flax_models()
  results, arrays = {}, {}
  for name, (batch, steps) in sizes.items():
    module, shape = modules[name], attack_bench.MODELS[name]
    x = np.random.default_rng(0).uniform(size=(batch, *shape)).astype(np.float32)
    variables = module.init(jax.random.key(0), x[:1])
    logits_fn = jax.tree_util.Partial(module.apply, variables)
    clean_logits = np.asarray(jax.jit(logits_fn)(x))
    y = clean_logits.argmax(-1).astype(np.int32)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def fwd_bwd(model, x, y):
      grad = jax.grad(lambda inputs: jnp.sum(attacks.cross_entropy(model(inputs), y)))
      # Each pass depends on the previous one so XLA cannot hoist it.
      return lax.fori_loop(0, steps, lambda i, xs: xs + 1e-6 * grad(xs), x)

    @jax.jit
    def pgd(model, key, x, y):
      return attacks.pgd(key, model, x, y, eps=PGD_EPS, num_steps=steps, step_size=PGD_STEP)

    @jax.jit
    def cw_l2(model, key, x, y):
      return attacks.cw_l2(key, model, x, y, initial_const=CONST, binary_search_steps=1,
                           num_steps=steps, learning_rate=LEARNING_RATE, abort_early=False,
                           return_info=True)

    @jax.jit
    def cw_l2_search(model, key, x, y):
      return attacks.cw_l2(key, model, x, y, initial_const=CONST,
                           binary_search_steps=SEARCH_STEPS, num_steps=steps // SEARCH_STEPS,
                           learning_rate=LEARNING_RATE, abort_early=False, return_info=True)

    @jax.jit
    def tanh_adam(model, x, y):
      # The floor of any tanh-space Adam attack: CW's own step (gradient of
      # ||x' - x||^2 - c * margin through tanh, one Adam update) without the
      # binary search, the abort check or the best-so-far bookkeeping.
      grad = jax.grad(lambda inputs: jnp.sum(attacks.cw_margin(model(inputs), y)))
      w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)

      def body(i, state):
        w, m, v = state
        th = jnp.tanh(w)
        x_new = (th + 1.0) / 2.0
        g = (2.0 * (x_new - x) - CONST * grad(x_new)) * (1.0 - th * th) / 2.0
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        t = (i + 1).astype(x.dtype)
        lr = LEARNING_RATE * jnp.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t)
        return w - lr * m / (jnp.sqrt(v) + 1e-8), m, v

      zeros = jnp.zeros_like(x)
      return lax.fori_loop(0, steps, body, (w0, zeros, zeros))[0]

    key = jax.random.key(1)
    start = time.perf_counter()
    seconds = attack_bench._interleaved_seconds(  # pylint: disable=protected-access
        {"fwd_bwd": lambda: fwd_bwd(logits_fn, x_dev, y_dev),
         "pgd": lambda: pgd(logits_fn, key, x_dev, y_dev),
         "cw_l2": lambda: cw_l2(logits_fn, key, x_dev, y_dev),
         "cw_l2_search": lambda: cw_l2_search(logits_fn, key, x_dev, y_dev),
         "tanh_adam": lambda: tanh_adam(logits_fn, x_dev, y_dev)},
        jax.block_until_ready, warmup, repeats)
    predict = jax.jit(lambda model, x: jnp.argmax(model(x), -1))
    quality = {}
    for label, fn in (("cw_l2", cw_l2), ("cw_l2_search", cw_l2_search)):
      x_adv, info = fn(logits_fn, key, x_dev, y_dev)
      fooled = np.asarray(predict(logits_fn, x_adv)) != y
      quality[label] = {**_quality(x, np.asarray(x_adv), fooled),
                        "reported_success_rate": float(np.mean(np.asarray(info.success)))}
    results[name] = {"input_shape": list(shape), "batch_size": batch, "steps": steps,
                     "search_steps": SEARCH_STEPS, **_step_rates(seconds, batch, steps),
                     "quality": quality, "seconds_total": time.perf_counter() - start}
    r = results[name]
    print(f"[certjax] {name} (batch {batch}, {steps} steps): fwd+bwd "
          f"{r['steps_per_s']['fwd_bwd']:.0f} steps/s; CW-L2 {r['steps_per_s']['cw_l2']:.0f} "
          f"steps/s, ratio (median / best / CPU time) "
          + " / ".join(f"{r['ratio_to_fwd_bwd' + s]['cw_l2']:.3f}" for s in SUFFIXES)
          + "; with search " + " / ".join(f"{r['ratio_to_fwd_bwd' + s]['cw_l2_search']:.3f}"
                                         for s in SUFFIXES)
          + "; PGD " + " / ".join(f"{r['ratio_to_fwd_bwd' + s]['pgd']:.3f}" for s in SUFFIXES)
          + "; tanh+Adam floor " + " / ".join(f"{r['ratio_to_fwd_bwd' + s]['tanh_adam']:.3f}"
                                             for s in SUFFIXES)
          + f"; CW success {quality['cw_l2']['success_rate']:.3f}, median L2 "
          f"{quality['cw_l2']['median_l2_of_successes']}", flush=True)
    arrays[f"{name}/x"], arrays[f"{name}/y"] = x, y
    arrays[f"{name}/clean_logits"] = clean_logits
    arrays[f"{name}/steps"] = np.asarray(steps)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
      arrays[f"{name}/params/" + "/".join(str(p.key) for p in path)] = np.asarray(leaf)
  return {"device": str(jax.devices()[0].device_kind), "results": results, "arrays": arrays}


# ----------------------------------------------------------------------------
# PyTorch side: numpy, torch and torchattacks only.


def run_peers(arrays: Dict[str, np.ndarray], warmup: int, repeats: int,
              torch_threads: int = 0) -> Dict[str, Any]:
  """torchattacks' CW on the PyTorch twins, per optimisation step."""
  try:
    import torch
    import torchattacks
  except ImportError as e:
    return {"skipped": f"torch / torchattacks not installed ({e})"}
  if torch_threads > 0:
    torch.set_num_threads(torch_threads)
  results = {"device": "cpu", "torch_threads": torch.get_num_threads(),
             "torch_interop_threads": torch.get_num_interop_threads(),
             "threads": attack_bench._thread_settings(),  # pylint: disable=protected-access
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
  for name, model in attack_bench._torch_models(arrays).items():  # pylint: disable=protected-access
    if f"{name}/steps" not in arrays:
      continue
    steps = int(arrays[f"{name}/steps"])
    x_np = arrays[f"{name}/x"].transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
    y_np = arrays[f"{name}/y"].astype(np.int64)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    batch = len(y_np)
    with torch.no_grad():
      logits = model(x).numpy()
    entry = {"batch_size": batch, "steps": steps,
             "max_abs_logit_diff_vs_flax": float(np.abs(logits
                                                        - arrays[f"{name}/clean_logits"]).max())}
    calls = [0]
    hook = model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))

    def fwd_bwd():
      xs = x.clone()
      for _ in range(steps):
        xs.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xs), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xs)
        xs = (xs + 1e-6 * grad).detach()
      return xs

    atk = torchattacks.CW(model, c=CONST, kappa=0, steps=steps, lr=LEARNING_RATE)
    # Steps actually run by one call (the batch may stop early).
    calls[0] = 0
    adv = atk(x, y)
    cw_steps = calls[0]
    seconds = attack_bench._interleaved_seconds(  # pylint: disable=protected-access
        {"fwd_bwd": fwd_bwd, "torchattacks_cw": lambda: atk(x, y)}, lambda out: out,
        warmup, repeats)
    hook.remove()
    rates = _step_rates(seconds, batch, steps)
    # torchattacks' rate per step it ran, not per step asked for.
    for stat in ("steps_per_s", "steps_per_s_best", "steps_per_s_cpu_time"):
      rates[stat]["torchattacks_cw"] *= cw_steps / steps
    for suffix in SUFFIXES:
      rates["ratio_to_fwd_bwd" + suffix]["torchattacks_cw"] = (
          rates["steps_per_s" + suffix]["torchattacks_cw"]
          / rates["steps_per_s" + suffix]["fwd_bwd"])
    with torch.no_grad():
      fooled = (model(adv).argmax(-1) == y).numpy() == 0
    entry.update(rates)
    entry["torchattacks_cw_steps_run"] = cw_steps
    entry["quality"] = {"torchattacks_cw": _quality(x_np, adv.numpy(), fooled)}
    results[name] = entry
    print(f"[peers] {name}: fwd+bwd {entry['steps_per_s']['fwd_bwd']:.0f} steps/s, "
          f"torchattacks CW {entry['steps_per_s']['torchattacks_cw']:.0f} steps/s "
          f"({cw_steps} of {steps} steps run); success {np.mean(fooled):.3f}", flush=True)
  return results


def _peers_in_subprocess(arrays: Dict[str, np.ndarray], args: argparse.Namespace
                         ) -> Dict[str, Any]:
  """run_peers under `--peers-python` (its own environment), through an .npz."""
  with tempfile.TemporaryDirectory() as tmp:
    weights, out = os.path.join(tmp, "weights.npz"), os.path.join(tmp, "peers.json")
    np.savez(weights, **arrays)
    env = dict(os.environ)
    if args.omp_wait_policy:
      env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    command = [args.peers_python, "-m", "benchmarks.cw", "--peers-only", f"--weights={weights}",
               f"--out={out}", f"--warmup={args.warmup}", f"--repeats={args.repeats}",
               f"--torch-threads={args.torch_threads}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, check=False, capture_output=True,
                          text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
      return {"skipped": f"{' '.join(command)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}"}
    with open(out) as f:
      report = json.load(f)
  return {**report["peers_cw"], "environment": report["environment"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mlp", default=DEFAULT_SIZES["mlp"],
                      help="batch,steps for the MLP ('' to skip)")
  parser.add_argument("--cnn", default=DEFAULT_SIZES["cnn"],
                      help="batch,steps for the CNN ('' to skip)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--out", default="results/cw.json")
  parser.add_argument("--peers", action="store_true",
                      help="also run torchattacks' CW under --peers-python")
  parser.add_argument("--peers-python", default=sys.executable,
                      help="python of an environment with torch and torchattacks")
  parser.add_argument("--peers-only", action="store_true",
                      help="run only the PyTorch side from --weights (no JAX needed)")
  parser.add_argument("--weights", default=None, help=".npz written by --save-weights")
  parser.add_argument("--save-weights", default=None,
                      help="save the flax weights and batches as .npz for --peers-only")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch.set_num_threads for the peers (0: torch's default)")
  parser.add_argument("--omp-wait-policy", default="PASSIVE",
                      help="OMP_WAIT_POLICY of the --peers subprocess ('' leaves it unset)")
  args = parser.parse_args()

  report: Dict[str, Any] = {
      "benchmark": "cw", "kind": "attacks", "const": CONST, "learning_rate": LEARNING_RATE,
      "search_steps": SEARCH_STEPS, "repeats": args.repeats,
      "note": "steps/s = examples x Adam iterations / s; ratio = attack steps/s / (chained "
              "fwd+bwd w.r.t. the input) steps/s, same model, batch and run",
  }
  if args.peers_only:
    if not args.weights:
      parser.error("--peers-only needs --weights (an .npz from --save-weights)")
    environment = attack_bench._environment  # pylint: disable=protected-access
    report["environment"] = environment("cpu (torch)")
    report["peers_cw"] = run_peers(dict(np.load(args.weights)), args.warmup, args.repeats,
                                   args.torch_threads)
    common.write_report(args.out, report)
    return
  sizes = {name: _parse_size(text) for name, text in (("mlp", args.mlp), ("cnn", args.cnn))
           if text}
  report["load_average_before"] = list(os.getloadavg())
  ours = run_certjax(sizes, args.warmup, args.repeats)
  arrays = ours.pop("arrays")
  environment = attack_bench._environment  # pylint: disable=protected-access
  report["environment"] = environment(ours["device"])
  report["certjax_cw"] = ours["results"]
  if args.save_weights:
    np.savez(args.save_weights, **arrays)
    print(f"saved weights and batches to {args.save_weights}")
  if args.peers:
    peers = _peers_in_subprocess(arrays, args)
    report["peers_cw"] = peers
    for name, entry in peers.items():
      if not isinstance(entry, dict) or "steps_per_s" not in entry:
        continue
      mine = report["certjax_cw"][name]
      for suffix in SUFFIXES:
        stat = "steps_per_s" + suffix
        entry["certjax_cw_l2_speedup" + suffix] = (
            mine[stat]["cw_l2"] / entry[stat]["torchattacks_cw"])
        entry["certjax_fwd_bwd_speedup" + suffix] = (
            mine[stat]["fwd_bwd"] / entry[stat]["fwd_bwd"])
      print(f"[compare] {name}: certjax CW-L2 / torchattacks CW per step (median / best / "
            "CPU time) " + " / ".join(f"x{entry['certjax_cw_l2_speedup' + s]:.2f}"
                                      for s in SUFFIXES)
            + f"; fwd+bwd jax/torch x{entry['certjax_fwd_bwd_speedup']:.2f}", flush=True)
  report["load_average_after"] = list(os.getloadavg())
  common.write_report(args.out, report)


if __name__ == "__main__":
  main()
