"""certjax CERTIFY side by side with ART's PyTorchRandomizedSmoothing.certify.

Same architecture (the IBP-paper small CNN, written in Flax by certjax and in
PyTorch here), same weights (copied from Flax to PyTorch with the layout
transposes, logits checked to agree), same test images, same n0, n, alpha,
sigma, same machine, each side at each batch size of `--batches` (and the
best batch of each compared in `speedup_best_batch_each`). Reports seconds
per image and images/s for both, their ratio, and certified accuracy at
several radii for both
(different random streams, so they agree only up to sampling noise: the JSON
gives the binomial standard error for comparison).

ART's `certify` follows Cohen et al.: n0 = `sample_size` selection draws, n
fresh estimation draws, Gaussian noise added in input space with no clipping
(`_noisy_samples`), Clopper-Pearson bound via statsmodels'
`proportion_confint(alpha=2 * alpha, method='beta')`, radius `sigma *
Phi^-1(pA_lower)`. It certifies one image at a time with NumPy noise and
PyTorch forward passes of `batch_size`.

Run in an environment with torch and adversarial-robustness-toolbox (the
`peers` extra) plus certjax; from the repository root:

  python -m benchmarks.smoothing_peers --workdir /tmp/certjax/mnist_s025 \
      --images 50 --n 10000 --batches 250,1000,2500 --out results/smoothing_peers.json

`--workdir` is an ibp_small run of launch.train (e.g. configs/mnist_smoothing.py
or configs/mnist5k_smoothing.py); without it the weights are random (speed only).

Where the time goes. ART's side is split (by timing its own methods, in a
subclass that calls them unchanged) into noise generation (`_noisy_samples`:
NumPy float64 normals for all n copies, `np.repeat`, the add), the PyTorch
forward passes (`_predict_classifier`) and the rest (one-hot counting, the
bound). Both frameworks' raw forward throughput on the same model at each
batch size is measured as well (`raw_forward_images_per_second`: 'jax' as
plain `jax.jit` compiles it, 'jax_counting_compiler_options' as certjax's
counting loop compiles it, 'torch'), and with it
the largest speed-up certjax could show if its noise and counting were free:
ART's time over the time of certjax's bare forward passes for the same number
of noisy copies (`speedup_bound_if_certjax_were_forward_only`). On CPU, ART
spends most of its time in the torch forward, so this bound, not the noise,
limits the ratio.

Environment. On a machine shared with other processes (more runnable
threads than cores), PyTorch's OpenMP threads busy-wait at every barrier and
lose most of their time: measured here, the same torch forward ran at 2.6k
images/s with the default `OMP_WAIT_POLICY` and at 17-26k with
`OMP_WAIT_POLICY=PASSIVE`. glibc's malloc can also return and re-fault the
pages of large temporaries at every call (`MALLOC_TRIM_THRESHOLD_`,
`MALLOC_MMAP_MAX_`). Neither is ART's doing, so give torch its best setting
(run the script under each and take each side's best); the JSON records
these variables (`environment_variables`).

Timing, for each batch size: certjax is called once to compile (the same
shapes and n, so later calls reuse the compiled program), timed once before
and once after ART (their mean is reported, so load changes on a shared
machine hit both sides alike); ART is timed once (no compilation).
`torch.get_num_threads()` and JAX both use every core. System CPU time and
minor page faults are recorded too: on CPU, batches whose temporary buffers
exceed glibc's 32 MB mmap threshold fault in fresh pages at every forward pass
(both frameworks suffer; see certjax/evaluation/certified.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time

import jax
import numpy as np

from benchmarks import common
from certjax import data as data_lib
from certjax import models
from certjax import smoothing

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def torch_ibp_small(mean, std):
  """The IBP small CNN in PyTorch (NCHW), normalising inside like certjax's."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  class IBPSmall(nn.Module):

    def __init__(self):
      super().__init__()
      self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
      self.conv_0 = nn.Conv2d(len(mean), 16, 4, stride=2, padding=0)
      self.conv_1 = nn.Conv2d(16, 32, 4, stride=1, padding=0)
      self.dense_0 = nn.Linear(32 * 10 * 10, 100)
      self.head = nn.Linear(100, 10)

    def forward(self, x):
      x = (x - self.mean) / self.std
      x = torch.relu(self.conv_0(x))
      x = torch.relu(self.conv_1(x))
      x = torch.relu(self.dense_0(x.flatten(1)))
      return self.head(x)

  return IBPSmall()


def copy_flax_to_torch(params, net) -> None:
  """Flax HWIO conv kernels -> torch OIHW; the first Dense sees NHWC-flattened
  features in Flax and NCHW-flattened ones in torch, so its rows are permuted."""
  import torch  # pylint: disable=import-outside-toplevel

  def t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))

  with torch.no_grad():
    for name in ("conv_0", "conv_1"):
      getattr(net, name).weight.copy_(t(np.transpose(params[name]["kernel"], (3, 2, 0, 1))))
      getattr(net, name).bias.copy_(t(params[name]["bias"]))
    kernel = np.asarray(params["dense_0"]["kernel"])  # [(h, w, c), out]
    h, w, c = 10, 10, 32
    kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    net.dense_0.weight.copy_(t(kernel.T))
    net.dense_0.bias.copy_(t(params["dense_0"]["bias"]))
    net.head.weight.copy_(t(np.asarray(params["head"]["kernel"]).T))
    net.head.bias.copy_(t(params["head"]["bias"]))


def _art_without_statsmodels(base):
  """ART computes its Clopper-Pearson bound with statsmodels, which the peers
  environment may lack; this subclass computes the same number,
  `proportion_confint(k, n, alpha=2 * alpha, method='beta')[0]`, which is
  `beta.ppf(alpha, k, n - k + 1)` (0 for k = 0), with SciPy. Counting, the
  part that is timed, stays ART's own."""
  from scipy import stats  # pylint: disable=import-outside-toplevel

  class ARTRandomizedSmoothing(base):

    def _lower_confidence_bound(self, n_class_samples, n_total_samples):
      if n_class_samples == 0:
        return 0.0
      return float(stats.beta.ppf(self.alpha, n_class_samples,
                                  n_total_samples - n_class_samples + 1))

  return ARTRandomizedSmoothing


def _timing_subclass(base):
  """ART's estimator with its noise and forward methods timed (not changed)."""

  class TimedART(base):
    seconds = {"noise": 0.0, "forward": 0.0}

    def _noisy_samples(self, x, n=None):
      start = time.perf_counter()
      try:
        return super()._noisy_samples(x, n=n)
      finally:
        self.seconds["noise"] += time.perf_counter() - start

    def _predict_classifier(self, x, batch_size, training_mode, **kwargs):
      start = time.perf_counter()
      try:
        return super()._predict_classifier(x, batch_size, training_mode, **kwargs)
      finally:
        self.seconds["forward"] += time.perf_counter() - start

  return TimedART


def raw_forward_rates(logits_fn, net, image_shape, batch: int, seconds: float = 3.0) -> dict:
  """Images/s of the bare jitted Flax forward and the torch forward at `batch`.

  The JAX forward is compiled twice: plainly and with the compiler options
  certjax's counting loop uses on this platform. Torch runs under no_grad
  with its default threads. Alternated in short rounds; medians reported."""
  import statistics  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from certjax.smoothing import sampling  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(batch,) + tuple(image_shape)).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  options = sampling.compiler_options(jax.devices()[0].platform)
  calls = {
      "jax": jax.jit(logits_fn),
      "jax_counting_compiler_options": jax.jit(logits_fn, compiler_options=options),
  }
  rates = {name: [] for name in (*calls, "torch")}
  with torch.no_grad():
    for fn in calls.values():
      jax.block_until_ready(fn(x_jax))
    net(x_torch)
    reps = max(1, int(4000 / batch))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or not rates["torch"]:
      for name, fn in calls.items():
        start = time.perf_counter()
        jax.block_until_ready([fn(x_jax) for _ in range(reps)])
        rates[name].append(reps * batch / (time.perf_counter() - start))
      start = time.perf_counter()
      for _ in range(reps):
        net(x_torch)
      rates["torch"].append(reps * batch / (time.perf_counter() - start))
  return {name: statistics.median(r) for name, r in rates.items()}


def _timed(fn) -> dict:
  """Wall seconds, system CPU seconds and minor page faults of `fn()`.

  Page faults matter on CPU: above glibc's 32 MB mmap threshold, temporary
  buffers are mapped afresh at every forward pass."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  result = fn()
  jax.block_until_ready(result) if isinstance(result, jax.Array) else None
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  return {"result": result, "seconds": seconds,
          "system_seconds": after.ru_stime - before.ru_stime,
          "minor_page_faults": after.ru_minflt - before.ru_minflt}


def summary(pred, radius, labels):
  correct = pred == labels
  acc = smoothing.certified_accuracy(radius, correct, RADII)
  return {"certified_accuracy": {f"{r:g}": float(a) for r, a in zip(RADII, acc)},
          "average_certified_radius": smoothing.average_certified_radius(radius, correct),
          "abstain_rate": float(np.mean(pred == -1))}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None, help="ibp_small training workdir")
  parser.add_argument("--images", type=int, default=50, help="test images certified")
  parser.add_argument("--skip", type=int, default=20, help="every skip-th test image")
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--n", type=int, default=10_000)
  parser.add_argument("--alpha", type=float, default=0.001)
  parser.add_argument("--batches", type=lambda t: [int(b) for b in t.split(",")],
                      default=[250, 1000, 2500],
                      help="comma-separated noisy copies per forward pass, each run on both")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--conv_impl", choices=("xla", "im2col"), default="xla",
                      help="certjax's convolutions: nn.Conv or one matrix product "
                      "(certjax/models/layers.py); same weights and logits")
  parser.add_argument("--out", default="results/smoothing_peers.json")
  args = parser.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

  if args.workdir:
    from certjax.training import load_trained  # pylint: disable=import-outside-toplevel
    model, variables, config, info = load_trained(args.workdir)
    model = model.clone(conv_impl=args.conv_impl)
    if config.model.name != "ibp_small":
      raise ValueError(f"--workdir holds a {config.model.name!r} model; this benchmark "
                       "mirrors ibp_small in PyTorch.")
    data_config = config.data
  else:
    data_config = data_lib.default_data_config()
    info = data_lib.get_info(data_config)
    model = models.get_model("ibp_small", num_classes=10, mean=info.mean, std=info.std,
                             conv_impl=args.conv_impl)
    variables = models.init_variables(model, jax.random.key(0), (1, 28, 28, 1))
  logits_fn = models.make_logits_fn(model, variables)
  stop = min(args.images * args.skip, info.num_eval)
  images, labels = data_lib.load_arrays(data_config, data_config.eval_split, 0, stop)
  images, labels = images[::args.skip][:args.images], labels[::args.skip][:args.images]

  net = torch_ibp_small(info.mean, info.std).eval()
  copy_flax_to_torch(jax.device_get(variables["params"]), net)
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  jax_logits = np.asarray(jax.jit(logits_fn)(images))
  max_logit_diff = float(np.max(np.abs(torch_logits - jax_logits)))
  print(f"max |logits_torch - logits_flax| = {max_logit_diff:.2e}")
  if max_logit_diff > 1e-3:
    raise AssertionError("the PyTorch copy does not reproduce the Flax model")

  art_class = PyTorchRandomizedSmoothing
  try:
    import statsmodels  # pylint: disable=import-outside-toplevel,unused-import
    bound_from = "statsmodels (ART's own code)"
  except ImportError:
    art_class = _art_without_statsmodels(PyTorchRandomizedSmoothing)
    bound_from = "scipy.stats.beta.ppf (statsmodels missing; same formula)"
  art_class = _timing_subclass(art_class)
  art_model = art_class(
      model=net, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
      sample_size=args.n0, scale=args.sigma, alpha=args.alpha, device_type="cpu")
  images_nchw = images.transpose(0, 3, 1, 2).copy()
  k = len(labels)
  forwards = k * (args.n0 + args.n)

  def compare(batch: int) -> dict:
    def run_certjax(seed):
      return smoothing.certify(jax.random.key(seed), logits_fn, images, args.sigma, args.n0,
                               args.n, args.alpha, batch)

    cold = _timed(lambda: run_certjax(args.seed + 1000))  # compiles for this batch size
    first = _timed(lambda: run_certjax(args.seed))
    cert = first["result"]
    np.random.seed(args.seed)  # ART draws its noise from NumPy's global generator
    art_model.seconds.update(noise=0.0, forward=0.0)
    art = _timed(lambda: art_model.certify(images_nchw, n=args.n, batch_size=batch))
    art_parts = dict(art_model.seconds)
    # certjax timed again after ART, so that load changes hit both sides alike.
    second = _timed(lambda: run_certjax(args.seed + 1))
    certjax_s = (first["seconds"] + second["seconds"]) / 2
    art_pred, art_radius = (np.asarray(a) for a in art["result"])
    both = (cert.prediction >= 0) & (art_pred >= 0)
    raw = raw_forward_rates(logits_fn, net, images.shape[1:], batch)
    certjax_summary = summary(cert.prediction, cert.radius, labels)
    art_summary = summary(art_pred, art_radius, labels)
    accuracy_gap = max(abs(certjax_summary["certified_accuracy"][r] -
                           art_summary["certified_accuracy"][r])
                       for r in certjax_summary["certified_accuracy"])
    side = lambda t, extra: {  # noqa: E731
        "seconds": t, "seconds_per_image": t / k, "images_per_second": k / t,
        "noisy_forwards_per_second": forwards / t, **extra}
    return {
        "batch_size": batch,
        "certjax": side(certjax_s, {
            "seconds_each_run": [first["seconds"], second["seconds"]],
            "first_call_seconds_incl_compile": cold["seconds"],
            "minor_page_faults": first["minor_page_faults"],
            "system_cpu_seconds": first["system_seconds"],
            **certjax_summary}),
        "art": side(art["seconds"], {
            "minor_page_faults": art["minor_page_faults"],
            "system_cpu_seconds": art["system_seconds"],
            "seconds_noise": art_parts["noise"],
            "seconds_forward": art_parts["forward"],
            "seconds_other": art["seconds"] - art_parts["noise"] - art_parts["forward"],
            **art_summary}),
        "speedup_certjax_over_art": art["seconds"] / certjax_s,
        "raw_forward_images_per_second": raw,
        "raw_forward_torch_over_jax": raw["torch"] / raw["jax"],
        # certjax's bare forward passes for the same noisy copies, no noise or
        # counting: the speed-up certjax would show if those cost nothing.
        "speedup_bound_if_certjax_were_forward_only": (
            art["seconds"] / (forwards / raw["jax_counting_compiler_options"])),
        "certjax_fraction_of_own_forward_rate": (
            forwards / certjax_s / raw["jax_counting_compiler_options"]),
        "certified_accuracy_max_abs_difference": accuracy_gap,
        "prediction_agreement": float(np.mean(cert.prediction == art_pred)),
        "mean_abs_radius_difference_where_both_certify": (
            float(np.mean(np.abs(cert.radius[both] - art_radius[both]))) if both.any()
            else None),
    }

  load_at_start = list(os.getloadavg())
  runs = []
  for batch in args.batches:
    runs.append(compare(batch))
    r = runs[-1]
    print(f"batch {batch}: certjax {r['certjax']['seconds_per_image']:.3f} s/image, ART "
          f"{r['art']['seconds_per_image']:.3f} s/image, speed-up "
          f"{r['speedup_certjax_over_art']:.2f}x (ART: noise {r['art']['seconds_noise']:.1f} s, "
          f"torch forward {r['art']['seconds_forward']:.1f} s of {r['art']['seconds']:.1f} s; "
          f"raw forward images/s {r['raw_forward_images_per_second']})", flush=True)
  best_certjax = min(r["certjax"]["seconds"] for r in runs)
  best_art = min(r["art"]["seconds"] for r in runs)
  best_jax_forward = max(r["raw_forward_images_per_second"]["jax_counting_compiler_options"]
                         for r in runs)
  report = {
      "benchmark": "randomized smoothing CERTIFY: certjax vs ART PyTorchRandomizedSmoothing",
      "kind": "smoothing_peers",
      "environment": common.environment(),
      "torch_threads": torch.get_num_threads(),
      "load_average_at_end": list(os.getloadavg()),
      "model": "ibp_small", "conv_impl": args.conv_impl,
      "weights": args.workdir or "random init",
      "data": data_config.name, "images": k, "skip": args.skip,
      "sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
      "art_clopper_pearson_from": bound_from,
      "max_abs_logit_difference": max_logit_diff,
      "runs": runs,
      "speedup_best_batch_each": best_art / best_certjax,
      "speedup_bound_best_batch_each_if_certjax_were_forward_only": (
          best_art / (forwards / best_jax_forward)),
      "best_batch_certjax": min(runs, key=lambda r: r["certjax"]["seconds"])["batch_size"],
      "best_batch_art": min(runs, key=lambda r: r["art"]["seconds"])["batch_size"],
      "load_average_at_start": load_at_start,
      "environment_variables": {
          name: os.environ.get(name) for name in (
              "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "XLA_FLAGS")},
      # Binomial standard error of a certified accuracy near 0.5 on k images:
      # the scale of disagreement expected from independent random streams.
      "sampling_standard_error_at_p0.5": math.sqrt(0.25 / k),
  }
  print(json.dumps(report, indent=2))
  common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
