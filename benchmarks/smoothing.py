"""Randomized-smoothing throughput relative to the raw forward pass of the same model.

Measures, in one process and on one device:
  * raw forward throughput: images / s of `jit(logits_fn)` on a batch of
    `--batch` images (the best any Monte Carlo certifier can do);
  * smoothing throughput: noisy forward passes / s through
    `certjax.smoothing.sample_counts` with device batch `--batch`, counting
    `--num` draws for each of `--inputs` inputs (noise generation, argmax and
    count accumulation included, host validation included);
and reports their ratio (1.0 = smoothing costs nothing beyond the forward).

Also recorded, to say where the gap goes: the noise alone (`--batch` draws of
unit noise per call, the generator `sample_counts` uses) and the raw forward
compiled with the compiler options `sample_counts` uses on this platform (on
CPU: 512-bit vectors, and XLA's Eigen convolutions instead of YNNPACK's, which
makes small CNNs' forward up to 2x faster), so that the overhead of smoothing
can be told apart from a faster forward:
`ratio_smoothing_to_forward_same_compiler_options` is that overhead measure,
`ratio_smoothing_to_forward` compares with the forward as plain `jax.jit`
compiles it. The host's load average is recorded too:
on a shared machine the absolute rates move with it, the ratios much less.

Timing: one warm-up call of each (compilation), then `--repeats` interleaved
timings of each, ended with `block_until_ready`; medians are reported. The
forward timing dispatches as many batches as sample_counts has chunks, so both
cover the same device work. The ratio counts only the requested draws, so a
ragged last chunk (see `padded_fraction`) counts against smoothing.

`--certify_n N` also times `certjax.smoothing.certify` end to end (n0 = 100
selection draws, then N estimation draws, Clopper-Pearson, alpha = 0.001) on
the `--inputs` images, after one compiling call with another key, and reports
`certify_seconds_per_image`: Cohen et al.'s figure of merit (about 15 s per
CIFAR-10 image for ResNet-110 at N = 100,000 on an RTX 2080 Ti). On a GPU:
  python -m benchmarks.smoothing --model resnet110_cifar --batch 1000 --num 10000 \
      --inputs 10 --certify_n 100000 --dtype bfloat16 --out results/resnet110_bf16.json

Example (CPU, small):
  python -m benchmarks.smoothing --model cnn --batch 256 --num 2048 --inputs 4 \
      --out /tmp/smoothing_cnn.json
The model of the MNIST smoothing configs, at two device batch sizes (on CPU
the larger one runs slower: see `sample_counts_minor_page_faults_per_draw`):
  python -m benchmarks.smoothing --model ibp_small_mnist --batch 250 --num 4000 --inputs 10
  python -m benchmarks.smoothing --model ibp_small_mnist --batch 1000 --num 4000 --inputs 10
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib

from benchmarks import common
from certjax import smoothing
from certjax.smoothing import noise
from certjax.smoothing import sampling


class MLP(nn.Module):
  """Two hidden layers of 256 units (a typical MNIST/CIFAR baseline size)."""
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for width in (256, 256):
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
  """Small stride-2 conv net (conv 32, conv 64, dense 128), like IBP-small."""
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, dtype=self.dtype)(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, dtype=self.dtype)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def _registry_model(name: str, mean: tuple, std: tuple) -> Callable[..., nn.Module]:
  def make(dtype, conv_impl="xla"):
    from certjax import models  # pylint: disable=import-outside-toplevel
    return models.get_model(name, num_classes=10, mean=mean, std=std, dtype=dtype,
                            conv_impl=conv_impl)
  return make


# name -> (flax module factory taking dtype, input shape HWC). One line per model.
MODELS: dict[str, tuple[Callable[[jnp.dtype], nn.Module], tuple[int, int, int]]] = {
    "mlp": (lambda dtype: MLP(dtype=dtype), (32, 32, 3)),
    "cnn": (lambda dtype: CNN(dtype=dtype), (32, 32, 3)),
    # certjax's IBP small CNN on MNIST, the model of configs/mnist*_smoothing.py.
    "ibp_small_mnist": (_registry_model("ibp_small", (0.1307,), (0.3081,)), (28, 28, 1)),
    "resnet20_cifar": (_registry_model("resnet20", (0.4914, 0.4822, 0.4465),
                                       (0.2470, 0.2435, 0.2616)), (32, 32, 3)),
    # Cohen et al.'s CIFAR-10 model; for the seconds-per-image figure on a GPU.
    "resnet110_cifar": (_registry_model("resnet110", (0.4914, 0.4822, 0.4465),
                                        (0.2470, 0.2435, 0.2616)), (32, 32, 3)),
}

# The MODELS built by certjax.models.get_model (they take conv_impl).
REGISTRY_MODELS = ("ibp_small_mnist", "resnet20_cifar", "resnet110_cifar")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _timed(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _minor_faults_per_draw(fn: Callable[[], object], draws: int) -> float:
  # On CPU, device batches whose temporaries exceed glibc's 32 MB mmap
  # threshold fault in fresh pages at every forward pass; this exposes it.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(fn())
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / draws


def _forward_batches(forward: Callable[[jax.Array], jax.Array], batch: jax.Array,
                     count: int) -> Callable[[], list]:
  # `count` asynchronous dispatches, blocked on together: the same device work
  # as one sample_counts call with `count` chunks, timed over a similar span.
  return lambda: [forward(batch) for _ in range(count)]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
  parser.add_argument("--batch", type=int, default=256, help="device batch of noisy copies")
  parser.add_argument("--num", type=int, default=2048, help="noise draws per input")
  parser.add_argument("--inputs", type=int, default=4, help="inputs counted at once")
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--noise", choices=smoothing.NOISE_TYPES, default="gaussian")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="model compute dtype")
  parser.add_argument("--conv_impl", choices=("xla", "im2col"), default="xla",
                      help="convolutions of the certjax registry models (ibp_small_mnist, "
                      "resnet*_cifar): nn.Conv or one matrix product (certjax/models/layers.py)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--certify_n", type=int, default=0,
                      help="if > 0, also time certify(n0=100, n=certify_n) per image")
  parser.add_argument("--out", default="results/smoothing.json", help="JSON output path")
  args = parser.parse_args(argv)

  make_model, input_shape = MODELS[args.model]
  if args.conv_impl != "xla":
    if args.model not in REGISTRY_MODELS:
      parser.error(f"--conv_impl={args.conv_impl} applies only to the certjax registry "
                   f"models {REGISTRY_MODELS}, not to {args.model!r}.")
    model = make_model(DTYPES[args.dtype], conv_impl=args.conv_impl)
  else:
    model = make_model(DTYPES[args.dtype])
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + input_shape))
  logits_fn = functools.partial(model.apply, variables)
  if "batch_stats" in variables:
    logits_fn = functools.partial(model.apply, variables, train=False)

  draws = args.inputs * args.num
  # Ragged last chunk: the device evaluates ceil(draws / batch) full batches.
  chunks = -(-draws // args.batch)
  evaluated = chunks * args.batch

  load_at_start = os.getloadavg()
  forward_batch = jax.random.uniform(jax.random.key(1), (args.batch,) + input_shape)
  forward = _forward_batches(jax.jit(logits_fn), forward_batch, chunks)
  inputs = jax.random.uniform(jax.random.key(2), (args.inputs,) + input_shape)
  count = functools.partial(smoothing.sample_counts, jax.random.key(3), logits_fn, inputs,
                            args.sigma, args.num, args.batch, noise=args.noise)
  # The compiler options sample_counts uses for inputs on this device.
  options = sampling.compiler_options(jax.devices()[0].platform)
  forward_same_options = _forward_batches(jax.jit(logits_fn, compiler_options=options),
                                          forward_batch, chunks)
  noise_keys = jax.random.key_data(jax.random.split(jax.random.key(4), args.batch))
  noise_draws = jax.numpy.arange(args.batch, dtype=jax.numpy.uint32)
  make_noise = jax.jit(functools.partial(noise.draw_noise, shape=input_shape,
                                         noise=args.noise), compiler_options=options)
  noise_only = _forward_batches(lambda k: make_noise(k, noise_draws), noise_keys, chunks)
  timed_calls = {"forward": forward, "count": count,
                 "forward_same_options": forward_same_options, "noise": noise_only}
  for call in timed_calls.values():
    _timed(call)  # warm-up: compilation and first transfers
  # Interleaved so that load from other processes hits all alike.
  times = {name: [] for name in timed_calls}
  for _ in range(args.repeats):
    for name, call in timed_calls.items():
      times[name].append(_timed(call))
  forward_times, count_times = times["forward"], times["count"]
  forward_s = statistics.median(forward_times) / chunks
  forward_rate = args.batch / forward_s
  counts_s = statistics.median(count_times)
  smoothing_rate = draws / counts_s
  per_repeat_ratios = [(draws / c) / (chunks * args.batch / f)
                       for f, c in zip(forward_times, count_times)]
  faults_per_draw = _minor_faults_per_draw(count, draws)

  device = jax.devices()[0]
  result = {
      "benchmark": "smoothing.sample_counts vs raw forward",
      "kind": "smoothing",
      "model": args.model,
      "input_shape": list(input_shape),
      "dtype": args.dtype,
      "conv_impl": args.conv_impl,
      "noise": args.noise,
      "batch": args.batch,
      "num": args.num,
      "inputs": args.inputs,
      "sigma": args.sigma,
      "repeats": args.repeats,
      "device": {"platform": device.platform, "kind": device.device_kind,
                 "count": jax.device_count()},
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "python": platform.python_version(),
      "forward_seconds_per_batch": forward_s,
      "forward_images_per_second": forward_rate,
      "sample_counts_seconds": counts_s,
      "smoothing_noisy_forwards_per_second": smoothing_rate,
      "padded_fraction": 1.0 - draws / evaluated,
      "ratio_smoothing_to_forward": smoothing_rate / forward_rate,
      "ratio_median_of_repeats": statistics.median(per_repeat_ratios),
      "sample_counts_minor_page_faults_per_draw": faults_per_draw,
      "sample_counts_compiler_options": options,
      "forward_same_compiler_options_images_per_second": (
          args.batch * chunks / statistics.median(times["forward_same_options"])),
      "ratio_smoothing_to_forward_same_compiler_options": statistics.median(
          [(draws / c) / (chunks * args.batch / f)
           for f, c in zip(times["forward_same_options"], count_times)]),
      # Unit noise alone (threefry bits -> Gaussian/uniform), batch draws a call.
      "noise_draws_per_second": args.batch * chunks / statistics.median(times["noise"]),
      "noise_seconds_per_batch": statistics.median(times["noise"]) / chunks,
      "noise_to_forward_time": statistics.median(
          [n / f for n, f in zip(times["noise"], forward_times)]),
      "load_average_at_start": list(load_at_start),
      "load_average_at_end": list(os.getloadavg()),
  }
  if args.certify_n > 0:
    certify = functools.partial(smoothing.certify, logits_fn=logits_fn, x=inputs,
                                sigma=args.sigma, n0=100, n=args.certify_n, alpha=0.001,
                                batch_size=args.batch, noise=args.noise)
    compile_s = _timed(lambda: certify(jax.random.key(5)).radius)
    certify_s = _timed(lambda: certify(jax.random.key(6)).radius)
    result.update({
        "certify_n0": 100, "certify_n": args.certify_n, "certify_alpha": 0.001,
        "certify_first_call_seconds": compile_s,
        "certify_seconds": certify_s,
        "certify_seconds_per_image": certify_s / args.inputs,
    })
  print(json.dumps(result, indent=2))
  if args.out:
    common.write_report(args.out, result)
  return result


if __name__ == "__main__":
  main()
