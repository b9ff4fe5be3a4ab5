r"""Cost of each input-transformation defence relative to one forward pass of a small CNN.

On a batch of `--batch_size` real MNIST digits (the embedded 'mnist5k' test
split, 28x28x1), in one process and on one device, times:
  * forward: one jitted forward pass of a small CNN (two 3x3 stride-2
    convolutions with 32 and 64 channels, dense 128, 10 classes; random
    weights, as benchmarks/attacks.py's `cnn`, here on 28x28x1 inputs);
  * each transform of `certjax.defences.transforms.TRANSFORM_NAMES` (plus
    the 3x3 median), jitted on its own, at `get_transform`'s default
    settings (recorded in the report): JPEG quality 75, the exact codec
    through a Pillow host callback and the differentiable JAX version; 5-bit
    depth reduction; 2x2 median; TVM with 50% pixel dropout and 40
    primal-dual steps; random resize to r in [25, 28] and pad (nearest);
    thermometer encoding with 16 levels;
  * bpda_grad_*: the gradient of a cross-entropy through the defended
    model with BPDA (`bpda_logits_fn`), for the three transforms whose
    gradient as written is zero (JPEG, bit depth, thermometer: the
    thermometer's model takes 16 input channels), and the plain
    forward+backward of the CNN beside them.
Reported per transform: seconds per batch and `ratio_to_forward` = transform
seconds / forward seconds (0.5: the defence costs half a forward pass).
Timings alternate between the functions over `--repeats` rounds
(`common.interleaved_seconds`) so that load from other processes hits them
alike; medians are reported, with the load average at start and end (what
`uptime` prints): on a shared CPU the absolute times move with it.

    python -m benchmarks.transforms --out=results/transforms.json
    python -m benchmarks.transforms --smoke      # a tiny run, nothing written
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Dict

from benchmarks import attacks as attack_bench
from benchmarks import common

# (label, transform name, settings): the defaults of get_transform, plus the 3x3 median.
CASES = (("identity", "identity", {}),
         ("jpeg", "jpeg", {}),
         ("jpeg_differentiable", "jpeg_differentiable", {}),
         ("bit_depth", "bit_depth", {}),
         ("median_2x2", "median", {}),
         ("median_3x3", "median", {"size": 3}),
         ("tvm", "tvm", {}),
         ("resize_pad", "resize_pad", {}),
         ("thermometer", "thermometer", {}))
# Transforms whose gradient as written is zero: BPDA's gradient is timed.
BPDA_CASES = ("jpeg", "bit_depth", "thermometer")


def run(batch_size: int, repeats: int) -> Dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from certjax import attacks  # pylint: disable=import-outside-toplevel
  from certjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from certjax.defences import bpda, transforms  # pylint: disable=import-outside-toplevel

  x, y = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, batch_size)
  x, y = jnp.asarray(x), jnp.asarray(y)
  module = attack_bench.flax_models()["cnn"]
  variables = module.init(jax.random.key(0), x[:1])
  model = jax.tree_util.Partial(module.apply, variables)
  key = jax.random.key(1)
  calls: Dict[str, Callable[[], Any]] = {}
  forward = jax.jit(lambda m, inputs: m(inputs))
  calls["forward"] = lambda: forward(model, x)

  def loss(m, inputs):
    return jnp.sum(attacks.cross_entropy(m(inputs), y))

  grad = jax.jit(jax.grad(loss, argnums=1))
  calls["forward_backward"] = lambda: grad(model, x)
  built = {}
  for label, name, settings in CASES:
    t = transforms.get_transform(name, **settings)
    built[label] = t
    fn = jax.jit(t.forward)
    calls[label] = functools.partial(fn, key, x)
  for label in BPDA_CASES:
    t = built[label]
    target = model
    if t.output_channels_factor > 1:  # a CNN for the encoded channels
      wide = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, t.output_channels_factor)))
      target = jax.tree_util.Partial(module.apply, wide)
    bpda_grad = jax.jit(jax.grad(
        lambda inputs, m, t=t: loss(lambda v: bpda.bpda_logits_fn(m, t)(key, v), inputs)))
    calls[f"bpda_grad_{label}"] = functools.partial(bpda_grad, x, target)
  seconds, first = common.interleaved_seconds(calls, repeats)
  base = seconds["forward"]
  results = {}
  for label, t in built.items():
    results[label] = {"settings": _settings(CASES, label), "seconds": seconds[label],
                      "first_call_seconds": first[label],
                      "ratio_to_forward": seconds[label] / base,
                      "randomized": t.randomized,
                      "output_channels_factor": t.output_channels_factor}
  bpda_results = {label: {"seconds": seconds[f"bpda_grad_{label}"],
                          "ratio_to_forward": seconds[f"bpda_grad_{label}"] / base,
                          "ratio_to_forward_backward": (seconds[f"bpda_grad_{label}"]
                                                        / seconds["forward_backward"])}
                  for label in BPDA_CASES}
  return {"forward_seconds": base, "forward_images_per_s": batch_size / base,
          "forward_backward_seconds": seconds["forward_backward"],
          "transforms": results, "bpda_gradient": bpda_results}


def _settings(cases, label: str) -> Dict[str, Any]:
  from certjax.defences import transforms  # pylint: disable=import-outside-toplevel
  for case_label, name, settings in cases:
    if case_label == label:
      return {"name": name, **transforms.DEFAULT_SETTINGS[name], **settings}
  raise KeyError(label)


def _pillow_version() -> str:
  """The codec of the exact JPEG transform (common.versions does not list it)."""
  import PIL  # pylint: disable=import-outside-toplevel
  return PIL.__version__


def main(argv=None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny run (batch 8, 2 repeats) that writes nothing")
  parser.add_argument("--out", default="results/transforms.json")
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch_size, args.repeats, args.out = 8, 2, ""
  load_at_start = list(os.getloadavg())
  measured = run(args.batch_size, args.repeats)
  report = {"benchmark": "input transformations vs one CNN forward pass", "kind": "transforms",
            "model": "small CNN (conv 32 s2, conv 64 s2, dense 128, 10), 28x28x1",
            "data": "mnist5k test digits", "batch_size": args.batch_size,
            "repeats": args.repeats, "environment": common.environment(),
            "pillow": _pillow_version(),
            "load_average_at_start": load_at_start, **measured,
            "load_average_at_end": list(os.getloadavg()),
            "note": "ratio_to_forward = transform seconds / CNN forward seconds, same batch; "
                    "medians of interleaved rounds; jpeg runs Pillow on the host, one image "
                    "at a time"}
  print(f"forward: {measured['forward_seconds'] * 1e3:.2f} ms per batch of "
        f"{args.batch_size} ({measured['forward_images_per_s']:.0f} img/s)")
  for label, r in measured["transforms"].items():
    print(f"  {label:20s} {r['seconds'] * 1e3:8.2f} ms  {r['ratio_to_forward']:7.2f} x forward")
  for label, r in measured["bpda_gradient"].items():
    print(f"  bpda grad {label:10s} {r['seconds'] * 1e3:8.2f} ms  "
          f"{r['ratio_to_forward_backward']:7.2f} x forward+backward")
  print(f"load average: {load_at_start} -> {report['load_average_at_end']}")
  if args.out:
    common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
