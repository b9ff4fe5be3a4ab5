"""Timing and reporting helpers shared by the benchmark scripts.

Every benchmark prints its figures and writes them as JSON together with the
environment (device, versions), so numbers from different machines and runs
can be compared. Timings are medians over repeats of a warmed-up, jitted
function, synchronised with `block_until_ready`.

Every report names the script that wrote it in its `kind` key (one of
`KINDS`); `benchmarks/reports.py` reads the reports back by that key, never by
the free-text `benchmark` title.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reuse_freed_host_memory() -> bool:
  """`certjax.runs.environment.reuse_freed_host_memory`, loaded by path so that the
  PyTorch peers, which run without JAX (and so without the certjax package),
  are timed under the same malloc settings as certjax."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "certjax", "runs", "environment.py")
  spec = importlib.util.spec_from_file_location("_certjax_run_environment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.reuse_freed_host_memory()


# Every benchmark process, certjax's and the peers', keeps freed host memory
# for reuse before anything is timed (recorded in each report's `host`).
FREED_HOST_MEMORY_REUSED = _reuse_freed_host_memory()

# The `kind` of each script's report: what benchmarks/reports.py dispatches on.
KINDS = ("training",         # train_throughput.py
         "attacks",          # attacks.py (also --peers, --peers-only)
         "bounds",           # bounds.py
         "smoothing",        # smoothing.py
         "smoothing_peers",  # smoothing_peers.py
         "scaling",          # scaling.py
         "many_models",      # many_models.py
         "transforms")       # transforms.py


def versions() -> dict[str, str]:
  """Installed versions of the packages the benchmarks compare."""
  found = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "torchattacks",
              "adversarial-robustness-toolbox"):
    try:
      found[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def host() -> dict[str, Any]:
  """The machine and versions, without importing JAX (peers run without it)."""
  return {
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "versions": versions(),
      "freed_host_memory_reused": FREED_HOST_MEMORY_REUSED,
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
  }


def environment() -> dict[str, Any]:
  """Device and software versions, for the JSON record."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind,
          "num_devices": jax.device_count(), **host()}


def time_call(fn: Callable[..., Any], *args, warmup: int = 2, repeats: int = 7,
              min_time: float = 0.0) -> float:
  """Median seconds per call of `fn(*args)` (blocking on its outputs).

  Args:
    fn: a (jitted) function.
    *args: its arguments.
    warmup: untimed calls first (compilation, caches).
    repeats: timed calls; the median is returned.
    min_time: if > 0, each timed sample loops the call until this many seconds
      passed, for functions too quick to time singly.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    n, start = 0, time.perf_counter()
    while True:
      jax.block_until_ready(fn(*args))
      n += 1
      elapsed = time.perf_counter() - start
      if elapsed >= min_time:
        break
    samples.append(elapsed / n)
  return statistics.median(samples)


def interleaved_seconds(calls: dict[str, Callable[[], Any]], repeats: int
                        ) -> tuple[dict[str, float], dict[str, float]]:
  """Median seconds of each call, timed round-robin after one warm-up call each.

  Interleaving spreads other processes' load over all calls alike.

  Returns:
    (name -> median seconds, name -> seconds of the first call, compilation
    included).
  """
  import jax  # pylint: disable=g-import-not-at-top
  first = {}
  for name, call in calls.items():
    start = time.perf_counter()
    jax.block_until_ready(call())
    first[name] = time.perf_counter() - start
  samples = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(s) for name, s in samples.items()}, first


def write_report(path: str, report: dict[str, Any]) -> None:
  """Writes `report` as indented JSON with sorted keys, atomically.

  A report without a `time` gets the time of writing, so that readers date it
  by its measurement rather than by the file's modification time (which a
  fresh clone sets to the clone's).

  Raises:
    ValueError: when the report has no `kind` of `KINDS` (a reader could not
      tell which script wrote it).
  """
  if report.get("kind") not in KINDS:
    raise ValueError(f"A benchmark report needs a 'kind' of {', '.join(KINDS)}; "
                     f"got {report.get('kind')!r}.")
  report = dict(report)
  report.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
  # Atomic (temporary file + rename) without importing certjax, which the
  # PyTorch peers' environment may lack.
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
    f.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
  os.replace(f.name, path)
  print(f"wrote {path}")
