r"""Data-parallel scaling: throughput on 1, 2, 4, 8 devices at a fixed global batch.

For each device count, on a one-axis `data` mesh (`certjax.parallel.make_mesh`)
and the same global batch split evenly over the devices:
  * train_step: images/s of certjax's own data-parallel training step
    (`certjax.training.train.make_train_step`, standard objective, SGD with
    momentum, state donated), IBP-small CNN on 28x28x1 random images;
  * forward_backward: images/s of a jitted gradient of the same loss on the
    same sharded batch, gradients replicated (all-reduced) as in the step:
    the raw limit of a training step;
  * certification: noisy forward passes/s of `certjax.smoothing.sample_counts`
    counting `--num` draws for each of `--inputs` inputs sharded over the
    mesh, with device batch `--batch / devices` (so every device count does
    the same number of loop iterations on the same global work);
  * forward: images/s of the jitted inference forward of the global batch:
    the raw limit of certification.
Each figure is also given as a ratio to the smallest device count's figure
(normally 1 device).

Device counts are fixed when JAX starts, so every count runs in its own
subprocess (`--worker N`, which prints one JSON line). On CPU the parent sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` for it. Such forced host
devices share the machine's physical cores: on CPU the figures measure the
cost of partitioning (collectives, per-device dispatch, smaller per-device
batches), not a speed-up (see NOTE). When JAX's default backend is an
accelerator (GPU, TPU), the counts are instead 1, 2, 4, ... up to
`jax.device_count()`, each run on the first k devices (`--platform cpu` forces
the CPU path there).

Timing: `--warmup` untimed calls of each (compilation), then `--repeats`
interleaved rounds timing each of the four calls once (`common.time_call`,
looping a call for `--min_time` seconds when it is quicker), so that load from
other processes hits every figure alike; medians are reported, and every
sample is kept in the JSON (`samples_seconds`).

    python -m benchmarks.scaling --devices 1,2,4,8 --out results/scaling.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):
  # Run as `python benchmarks/scaling.py`: import this checkout's certjax and
  # benchmarks packages (the workers get the same through PYTHONPATH).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "SCALING_RESULT "
FORCE_FLAG = "--xla_force_host_platform_device_count"
NOTE = (
    "On CPU the devices are forced host-platform devices "
    "(XLA_FLAGS=--xla_force_host_platform_device_count=N) that all share the same "
    "physical cores: adding devices adds no compute, so these figures measure the "
    "overhead of partitioning the same global batch (gradient all-reduce, per-device "
    "dispatch, smaller per-device batches), not a speed-up. A ratio near 1.0 means "
    "little overhead. A ratio above 1.0 comes either from N device programs keeping "
    "the shared cores busier than one device's program does (bounded by the number of "
    "cores) or from other processes' load changing between the runs (each device "
    "count runs in its own process, one after the other); it is not scaling. Real "
    "scaling needs separate accelerators (this script's GPU/TPU path).")

# The quickstart model (IBP small CNN) on MNIST-shaped input, as in
# benchmarks/train_throughput.py.
MODEL = "ibp_small"
IMAGE_SHAPE = (28, 28, 1)
MEAN, STD = (0.1307,), (0.3081,)
# figure -> the short name of its ratio to the baseline, "<name>_vs_baseline".
FIGURES = {"train_step_images_per_s": "train_step",
           "forward_backward_images_per_s": "forward_backward",
           "certification_draws_per_s": "certification",
           "forward_images_per_s": "forward"}


# ------------------------------------------------------------------- worker


def _initial_state(model, tx):
  """A TrainState with LeCun-normal weights and zero biases drawn by numpy.

  Throughput does not depend on the weights' values, while XLA on CPU takes
  seconds to compile the model's jitted threefry initialiser (longer than
  every measured program together at smoke-test sizes).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from certjax.training import train as train_lib  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *IMAGE_SHAPE)), train=False))
  rng = np.random.default_rng(0)

  def draw(leaf):
    if len(leaf.shape) < 2:  # biases
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  variables = dict(jax.tree.map(draw, shapes))
  params = variables.pop("params")
  return train_lib.TrainState(step=np.zeros((), np.int32), params=params,
                              model_state=variables, opt_state=tx.init(params))


def measure(num_devices: int, args: argparse.Namespace) -> dict[str, Any]:
  """Measures every figure on a mesh over the first `num_devices` devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from certjax import models as models_lib  # pylint: disable=g-import-not-at-top
  from certjax import parallel, smoothing  # pylint: disable=g-import-not-at-top
  from certjax.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from certjax.training import objectives, optim  # pylint: disable=g-import-not-at-top
  from certjax.training import train as train_lib  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  available = jax.device_count()
  if backend == "cpu" and available != num_devices:
    raise RuntimeError(
        f"worker for {num_devices} CPU device(s) sees {available}: XLA_FLAGS must hold "
        f"{FORCE_FLAG}={num_devices} before JAX is imported (run the script without "
        "--worker and let it start the workers).")
  if num_devices > available:
    # An accelerator host with fewer devices than the CPU list asked for: the
    # parent learns the backend from this and picks the host's own counts.
    return {"devices": num_devices, "devices_available": available, "platform": backend,
            "skipped": f"only {available} {backend} device(s)"}
  # The first k devices: on an accelerator host the smaller meshes use a prefix.
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  parallel.check_batch_size(args.batch, mesh, "--batch")
  parallel.check_batch_size(args.inputs, mesh, "--inputs")
  repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  model = models_lib.get_model(MODEL, num_classes=10, mean=MEAN, std=STD)
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((args.batch, *IMAGE_SHAPE), dtype=np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  batch = parallel.host_to_global(batch, mesh)
  cfg = config_lib.base_config().optimizer
  cfg.name, cfg.learning_rate, cfg.momentum = "sgd", 0.01, 0.9
  tx, _ = optim.make_optimizer(cfg, 1000)
  key = jax.random.key(0)

  state = jax.device_put(_initial_state(model, tx), repl)
  num_params = models_lib.count_params(state.variables)
  ctx = objectives.ObjectiveContext(model.apply, 10, 1000, IMAGE_SHAPE)
  loss_fn = objectives.get_objective({"name": "standard"}, ctx)

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                    in_shardings=(repl, sharded), out_shardings=sharded)

  def grads(params, model_state, batch):
    return jax.grad(lambda p: loss_fn(p, model_state, batch, key, 0)[0])(params)

  # Replicated gradients: the same all-reduce the training step performs.
  forward_backward = jax.jit(grads, in_shardings=(repl, repl, sharded),
                             out_shardings=repl)
  train_step = train_lib.make_train_step(loss_fn, tx, mesh)

  # Certification: inputs split over the mesh, each device classifying
  # batch / num_devices noisy copies per loop iteration.
  device_batch = args.batch // num_devices
  inputs = parallel.host_to_global(
      rng.random((args.inputs, *IMAGE_SHAPE), dtype=np.float32), mesh)
  logits_fn = models_lib.make_logits_fn(model, state.variables)
  count = functools.partial(smoothing.sample_counts, jax.random.key(3), logits_fn, inputs,
                            args.sigma, args.num, device_batch, mesh=mesh)
  draws = args.inputs * args.num

  counts = count()
  if (int(np.asarray(counts).sum()) != draws
      or len(counts.sharding.device_set) != num_devices):
    raise RuntimeError("sample_counts returned wrong totals or placement: "
                       f"{counts.sharding}")

  # The step donates its state: it gets its own copy, so the other calls keep theirs.
  holder = {"state": jax.device_put(_initial_state(model, tx), repl)}

  def step():
    # Consecutive steps, as in the training loop: the state is donated.
    holder["state"], metrics = train_step(holder["state"], batch, key)
    return holder["state"], metrics

  calls = {"forward": functools.partial(forward, state.variables, batch["image"]),
           "forward_backward": functools.partial(forward_backward, state.params,
                                                 state.model_state, batch),
           "sample_counts": count,
           "train_step": step}
  for fn in calls.values():
    for _ in range(args.warmup):
      jax.block_until_ready(fn())
  # Interleaved rounds, so that load from other processes hits every figure alike.
  samples = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, fn in calls.items():
      samples[name].append(common.time_call(fn, warmup=0, repeats=1,
                                            min_time=args.min_time))
  t_forward, t_fwd_bwd, t_count, t_step = (
      statistics.median(samples[name]) for name in calls)

  return {
      "devices": num_devices,
      "devices_available": available,
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "global_batch": args.batch,
      "per_device_batch": device_batch,
      "certification_inputs": args.inputs,
      "certification_inputs_per_device": args.inputs // num_devices,
      "certification_draws_per_call": draws,
      "train_step_seconds": t_step,
      "forward_backward_seconds": t_fwd_bwd,
      "sample_counts_seconds": t_count,
      "forward_seconds": t_forward,
      "train_step_images_per_s": args.batch / t_step,
      "forward_backward_images_per_s": args.batch / t_fwd_bwd,
      "certification_draws_per_s": draws / t_count,
      "forward_images_per_s": args.batch / t_forward,
      "train_step_vs_forward_backward": t_fwd_bwd / t_step,
      "certification_vs_forward": (draws / t_count) / (args.batch / t_forward),
      "params": num_params,
      "samples_seconds": samples,
      "environment": common.environment(),
  }


# ------------------------------------------------------------------- parent


def worker_env(num_devices: int, platform: str) -> dict[str, str]:
  """The environment of a worker measuring `num_devices` devices of `platform`."""
  env = dict(os.environ)
  # Any device-count flag already present would fight ours: replace it.
  flags = re.sub(rf"{FORCE_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join([*flags, f"{FORCE_FLAG}={num_devices}"])
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH")) if p)
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_worker(num_devices: int, args: argparse.Namespace) -> dict[str, Any]:
  command = [sys.executable, "-m", "benchmarks.scaling", "--worker", str(num_devices),
             "--batch", str(args.batch), "--inputs", str(args.inputs),
             "--num", str(args.num), "--sigma", str(args.sigma),
             "--warmup", str(args.warmup), "--repeats", str(args.repeats),
             "--min_time", str(args.min_time)]
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT, env=worker_env(num_devices, args.platform),
                        stdout=subprocess.PIPE, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if proc.returncode or not lines:
    raise RuntimeError(f"worker for {num_devices} device(s) failed (exit code "
                       f"{proc.returncode}); its stdout:\n{proc.stdout[-3000:]}")
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  result["worker_wall_seconds"] = time.perf_counter() - start
  return result


def run_workers(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One worker per device count: `--devices` on CPU, the host's own otherwise."""
  counts, results, first = list(args.devices), [], True
  while counts:
    n = counts.pop(0)
    result = _run_worker(n, args)
    if first and result["platform"] != "cpu":
      # An accelerator host: its own device counts replace the CPU list, and
      # this first result is kept only if it is the first of them.
      counts = [k for k in _powers_of_two_up_to(result["devices_available"])
                if args.batch % k == 0 and args.inputs % k == 0]
      print(f"{result['platform']} backend with {result['devices_available']} device(s): "
            f"measuring {counts} devices instead of --devices", flush=True)
      if "skipped" in result or counts[0] != n:
        first = False
        continue
      counts.pop(0)
    first = False
    results.append(result)
    print(f"  {n} device(s): done in {result['worker_wall_seconds']:.1f} s", flush=True)
  return results


def _powers_of_two_up_to(n: int) -> list[int]:
  counts = [1]
  while counts[-1] * 2 <= n:
    counts.append(counts[-1] * 2)
  return counts


def _add_ratios(results: list[dict[str, Any]]) -> None:
  base = results[0]
  for r in results:
    r["baseline_devices"] = base["devices"]
    for figure, name in FIGURES.items():
      r[f"{name}_vs_baseline"] = r[figure] / base[figure]


def format_table(results: list[dict[str, Any]]) -> str:
  header = (f"{'devices':>7} {'global':>6} {'per-dev':>7} | {'train step img/s':>20} | "
            f"{'fwd+bwd img/s':>20} | {'certify draws/s':>20} | {'forward img/s':>20}")
  lines = [header, "-" * len(header)]
  for r in results:
    cells = [f"{r[figure]:>11.0f} ({r[name + '_vs_baseline']:4.2f}x)"
             for figure, name in FIGURES.items()]
    lines.append(f"{r['devices']:>7} {r['global_batch']:>6} {r['per_device_batch']:>7} | "
                 + " | ".join(f"{c:>20}" for c in cells))
  lines.append(f"(x: ratio to the {results[0]['devices']}-device figure)")
  return "\n".join(lines)


def _parse_counts(text: str) -> list[int]:
  try:
    counts = sorted({int(c) for c in text.split(",") if c.strip()})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1:
    raise argparse.ArgumentTypeError(
        f"--devices must be a comma-separated list of positive ints, e.g. 1,2,4,8; got {text!r}")
  return counts


def main(argv=None) -> dict[str, Any] | None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=_parse_counts, default=[1, 2, 4, 8],
                      help="CPU device counts (accelerators: powers of two up to all)")
  parser.add_argument("--platform", choices=("auto", "cpu"), default="auto",
                      help="'cpu' forces the CPU path on an accelerator host")
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch (training and noisy copies per loop step); "
                      "divisible by every device count")
  parser.add_argument("--inputs", type=int, default=8,
                      help="inputs certified at once; divisible by every device count")
  parser.add_argument("--num", type=int, default=1024, help="noise draws per input")
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--min_time", type=float, default=0.2,
                      help="seconds each timed sample loops for (quick calls)")
  parser.add_argument("--out", default="results/scaling.json", help="JSON output path")
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker is not None:
    print(RESULT_PREFIX + json.dumps(measure(args.worker, args)), flush=True)
    return None

  for name, value in (("--batch", args.batch), ("--inputs", args.inputs)):
    bad = [n for n in args.devices if value % n]
    if value < 1 or bad:
      parser.error(f"{name}={value} must be a positive multiple of every device count "
                   f"{args.devices} (not of {bad}).")

  results = run_workers(args)
  _add_ratios(results)

  platform = results[0]["platform"]
  environment = {k: v for k, v in results[0]["environment"].items() if k != "num_devices"}
  report = {
      "benchmark": "scaling",
      "kind": "scaling",
      "model": MODEL,
      "input_shape": list(IMAGE_SHAPE),
      "settings": {k: getattr(args, k) for k in
                   ("batch", "inputs", "num", "sigma", "warmup", "repeats", "min_time")},
      "environment": {**environment, "forced_host_devices": platform == "cpu"},
      "note": NOTE if platform == "cpu" else (
          f"{platform} devices: each device count uses the first k devices of the host."),
      "results": results,
  }
  print(format_table(results))
  print(report["note"])
  if args.out:
    common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
