r"""Training throughput (images/s) against the raw forward/backward limit.

For each model, in one run and on the same batch:
  * forward: images/s of the jitted inference forward pass;
  * forward_backward: images/s of a jitted gradient of the cross-entropy
    with respect to the parameters (the raw limit of a training step);
  * train_step: images/s of certjax's own data-parallel training step
    (certjax.training.train.make_train_step: objective, gradient, optax
    update, metrics), and its ratio to forward_backward.

Models: the quickstart model (IBP small CNN, MNIST-shaped 28x28x1) and the
CIFAR ResNet-20 on CIFAR-shaped random input (32x32x3). `--conv_impls=xla,im2col`
also times each model with its convolutions computed as one matrix product
(`get_model(..., conv_impl='im2col')`, same parameters and result).

    python -m benchmarks.train_throughput --out=results/train_throughput.json
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from certjax import models as models_lib
from certjax import parallel
from certjax.training import objectives, optim
from certjax.training import config as config_lib
from certjax.training import train as train_lib

CASES = {
    # name: (model, image shape, mean, std)
    "quickstart_ibp_small": ("ibp_small", (28, 28, 1), (0.1307,), (0.3081,)),
    "resnet20_cifar": ("resnet20", (32, 32, 3), (0.4914, 0.4822, 0.4465),
                       (0.2470, 0.2435, 0.2616)),
}


def bench_case(name, batch_size, dtype, repeats, conv_impl="xla"):
  model_name, shape, mean, std = CASES[name]
  model = models_lib.get_model(model_name, num_classes=10, mean=mean, std=std,
                               dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                               conv_impl=conv_impl)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((batch_size, *shape), dtype=np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}
  batch = parallel.host_to_global(batch, mesh)
  cfg = config_lib.base_config().optimizer
  cfg.name, cfg.learning_rate, cfg.momentum = "sgd", 0.01, 0.9
  tx, _ = optim.make_optimizer(cfg, 1000)
  key = jax.random.key(0)

  class Info:  # the parts of DatasetInfo create_train_state reads
    image_shape = shape

  state = jax.jit(lambda k: train_lib.create_train_state(None, model, tx, Info, k))(key)
  ctx = objectives.ObjectiveContext(model.apply, 10, 1000, shape)
  loss_fn = objectives.get_objective({"name": "standard"}, ctx)

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))

  @jax.jit
  def forward_backward(params, model_state, batch):
    return jax.grad(lambda p: loss_fn(p, model_state, batch, key, 0)[0])(params)

  train_step = train_lib.make_train_step(loss_fn, tx, mesh)

  t_fwd = common.time_call(forward, state.variables, batch["image"], repeats=repeats)
  t_fb = common.time_call(forward_backward, state.params, state.model_state, batch,
                          repeats=repeats)
  # Warm up, then time consecutive steps (the realistic loop, state donated).
  for _ in range(2):
    state, metrics = train_step(state, batch, key)
  jax.block_until_ready(metrics)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = train_step(state, batch, key)
    jax.block_until_ready((state, metrics))
    samples.append(time.perf_counter() - start)
  t_step = float(np.median(samples))
  result = {
      "model": model_name, "input_shape": list(shape), "batch_size": batch_size,
      "compute_dtype": dtype, "conv_impl": conv_impl,
      "params": models_lib.count_params(state.variables),
      "forward_images_per_s": batch_size / t_fwd,
      "forward_backward_images_per_s": batch_size / t_fb,
      "train_step_images_per_s": batch_size / t_step,
      "train_step_vs_forward_backward": t_fb / t_step,
  }
  print(f"{name:24s} {conv_impl:6s} batch {batch_size:4d} {dtype:8s} | forward {result['forward_images_per_s']:9.0f} img/s"
        f" | fwd+bwd {result['forward_backward_images_per_s']:9.0f} img/s"
        f" | train step {result['train_step_images_per_s']:9.0f} img/s"
        f" ({result['train_step_vs_forward_backward']:.2f}x of fwd+bwd)")
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
  parser.add_argument("--conv_impls", default="xla",
                      help="comma-separated: xla,im2col (see certjax/models/layers.py)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="results/train_throughput.json")
  args = parser.parse_args()
  report = {"benchmark": "train_throughput", "kind": "training",
            "environment": common.environment(),
            "results": []}
  print(report["environment"])
  for name in args.cases.split(","):
    for dtype in args.dtypes.split(","):
      for conv_impl in args.conv_impls.split(","):
        report["results"].append({"case": name, **bench_case(
            name, args.batch_size, dtype, args.repeats, conv_impl)})
  common.write_report(args.out, report)


if __name__ == "__main__":
  main()
