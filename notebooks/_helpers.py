"""Helpers shared by the notebooks: scale settings, result files, tables and plots.

The notebooks import this module (it sits beside them); the logic lives here
so that tests/notebooks can test it without running a notebook. Nothing here
trains or certifies: the notebooks call certjax for that, and this module
reads the files certjax's runners and the benchmark scripts write.

Result files read:
  <workdir>/certify/<run>.json and <run>.tsv  (certjax.smoothing.certify_run,
      launch/certify.py): certified accuracy per image in Cohen et al.'s TSV;
  <workdir>/verify/results.json  (certjax.bounds.verify_run, launch/verify.py);
  <workdir>/config.json  (certjax.training, launch/train.py): the objective;
  benchmark JSON reports  (benchmarks/*.py via benchmarks.common).
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

SCALE_ENV = "CERTJAX_NOTEBOOK_SCALE"
DEFAULT_SCALE = "smoke"
CACHE_ENV = "CERTJAX_JAX_CACHE"


# ----------------------------------------------------------------------------
# Set-up: repository root, scale, compilation cache.


def repo_root(start: str | None = None) -> str:
  """The certjax checkout containing `start` (default: the working directory).

  Raises:
    FileNotFoundError: when no parent directory holds both certjax/ and configs/.
  """
  path = os.path.abspath(start or os.getcwd())
  while True:
    if (os.path.isdir(os.path.join(path, "certjax"))
        and os.path.isdir(os.path.join(path, "configs"))):
      return path
    parent = os.path.dirname(path)
    if parent == path:
      raise FileNotFoundError(
          f"No certjax checkout (a directory holding certjax/ and configs/) contains "
          f"{start or os.getcwd()!r}; start the notebook from the repository or its "
          "notebooks/ directory.")
    path = parent


def select_scale(settings: Mapping[str, Mapping[str, Any]],
                 scale: str | None = None) -> tuple[str, dict[str, Any]]:
  """(name, settings) of the scale chosen by $CERTJAX_NOTEBOOK_SCALE (default 'smoke').

  Raises:
    ValueError: for a scale the notebook does not define, naming the accepted ones.
  """
  name = scale if scale is not None else os.environ.get(SCALE_ENV, "") or DEFAULT_SCALE
  if name not in settings:
    raise ValueError(f"{SCALE_ENV}={name!r} is not a scale of this notebook; accepted: "
                     f"{', '.join(settings)}.")
  return name, dict(settings[name])


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache, as tests/conftest.py does.

  The directory is $CERTJAX_JAX_CACHE (default ~/.cache/certjax/jax_cache);
  re-running a notebook then skips most compilation. Child processes (the
  benchmark scripts) get the same cache through JAX's environment variables.

  Returns:
    The cache directory.
  """
  import jax  # pylint: disable=import-outside-toplevel
  cache = os.environ.setdefault(CACHE_ENV,
                                os.path.expanduser("~/.cache/certjax/jax_cache"))
  os.makedirs(cache, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache


def subprocess_env(root: str) -> dict[str, str]:
  """Environment for a benchmark script run from the notebook: the checkout on
  PYTHONPATH and the notebook's compilation cache."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  cache = env.setdefault(CACHE_ENV, os.path.expanduser("~/.cache/certjax/jax_cache"))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  return env


class _NoLibraryChatter:
  """Drops orbax's and absl's informational warnings (e.g. about read-only
  checkpoint managers when a model is restored); errors still show."""

  def filter(self, record) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return record.levelno >= 40 or "/orbax/" not in path


def quiet_library_logs() -> None:
  """Keeps library log chatter out of notebook outputs (certjax's own warnings stay)."""
  import logging  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  for handler in (absl_logging.get_absl_handler(), *logging.getLogger().handlers):
    if not any(isinstance(f, _NoLibraryChatter) for f in handler.filters):
      handler.addFilter(_NoLibraryChatter())
  logging.getLogger("absl").addFilter(_NoLibraryChatter())


def plot_style() -> None:
  """Compact, readable matplotlib defaults for the notebooks."""
  import matplotlib as mpl  # pylint: disable=import-outside-toplevel
  mpl.rcParams.update({
      "figure.dpi": 80, "savefig.dpi": 80, "axes.grid": True, "grid.alpha": 0.3,
      "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8,
      "axes.titlesize": 10, "figure.titlesize": 11,
  })


# ----------------------------------------------------------------------------
# Published numbers drawn beside ours.


class Anchor(NamedTuple):
  """Published accuracies at given radii, with where they come from.

  Attributes:
    label: legend text.
    kind: 'smoothing' (L2 radius, certified accuracy) or 'verified' (L-inf
      eps, verified accuracy).
    sigma: the noise level of a smoothing anchor (None for 'verified').
    x: radii or eps.
    accuracy: fractions in [0, 1], one per x.
    source: the citation, as stated where the number comes from.
  """
  label: str
  kind: str
  sigma: float | None
  x: tuple[float, ...]
  accuracy: tuple[float, ...]
  source: str


SMOOTHING_ANCHORS = (
    Anchor(
        label="Gaussian aug., published (MNIST, full test set)",
        kind="smoothing", sigma=0.25, x=(0.0, 0.25, 0.5, 0.75),
        accuracy=(0.992, 0.985, 0.967, 0.931),
        source=("MNIST Gaussian-augmentation baseline (Cohen et al. 2019 training) at "
                "sigma 0.25: 99.2 / 98.5 / 96.7 / 93.1 % certified at L2 radius "
                "0 / 0.25 / 0.5 / 0.75, full 10,000-image test set, N = 100,000, "
                "alpha = 0.001. Figures as quoted in certjax issue #6; they fit the "
                "Gaussian baselines reported beside consistency regularisation "
                "(Jeong & Shin, NeurIPS 2020), but the table was not re-checked here")),
)

VERIFY_ANCHORS = (
    # Both quoted from the config docstrings, which state the published figures.
    Anchor(
        label="IBP large CNN, published (Gowal et al. 2018)",
        kind="verified", sigma=None, x=(0.1,), accuracy=(1 - 0.0292,),
        source=("configs/mnist_ibp.py: 'Gowal et al. report IBP-verified test error "
                "2.92% at eps 0.1 (nominal error 1.06%) with the large model'")),
    Anchor(
        label="CROWN-IBP large CNN, published (Zhang et al. 2020)",
        kind="verified", sigma=None, x=(0.3,), accuracy=(1 - 0.0702,),
        source=("configs/mnist_crown_ibp.py: 'Zhang et al. report 7.02% IBP-verified "
                "test error at eps 0.3 with the large model'")),
)


def anchors_table(anchors: Iterable[Anchor]):
  """A DataFrame of the published numbers and their sources."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = [{"published": a.label,
           "at": ("L2 radius " if a.kind == "smoothing" else "L-inf eps ")
                 + " / ".join(f"{x:g}" for x in a.x),
           "accuracy %": " / ".join(f"{100 * acc:.2f}".rstrip("0").rstrip(".")
                                    for acc in a.accuracy),
           "source": a.source} for a in anchors]
  return pd.DataFrame(rows, columns=["published", "at", "accuracy %", "source"])


# ----------------------------------------------------------------------------
# Randomized smoothing: certify result files.


class CertifyRun(NamedTuple):
  """One certification read back from disk.

  Attributes:
    label: e.g. 'gaussian sigma=0.25' (plus the workdir name when ambiguous).
    objective: the training objective (settings.objective of the JSON).
    sigma: the noise level certified at.
    record: the JSON summary written by run_certification.
    results: the TSV's columns (certjax.smoothing.analysis.CertifyResults).
    json_path: where the summary was read from.
  """
  label: str
  objective: str
  sigma: float
  record: dict
  results: Any
  json_path: str


def _certify_json_paths(workdir: str) -> list[str]:
  if workdir.endswith(".json") and os.path.isfile(workdir):
    return [workdir]
  found = sorted(glob.glob(os.path.join(workdir, "certify", "*.json")))
  if not found:  # a certify output directory given directly
    found = sorted(glob.glob(os.path.join(workdir, "*.json")))
  return [p for p in found if os.path.exists(p[:-len(".json")] + ".tsv")]


def load_certify_runs(workdirs: Iterable[str]) -> list[CertifyRun]:
  """Every certification under each workdir's certify/ directory.

  Args:
    workdirs: training workdirs (with certify/ inside), certify output
      directories, or single certify JSON files.

  Returns:
    The runs, in the order found; workdirs without results contribute none.
  """
  from certjax.smoothing import analysis  # pylint: disable=import-outside-toplevel
  runs = []
  for workdir in workdirs:
    for path in _certify_json_paths(workdir):
      with open(path) as f:
        record = json.load(f)
      settings = record.get("settings", {})
      results = analysis.read_tsv(path[:-len(".json")] + ".tsv")
      objective = str(settings.get("objective", "?"))
      sigma = float(settings.get("sigma", float("nan")))
      runs.append(CertifyRun(f"{objective} sigma={sigma:g}", objective, sigma, record,
                             results, path))
  labels = [r.label for r in runs]
  return [r._replace(label=f"{r.label} ({_run_dir_name(r.json_path)})")
          if labels.count(r.label) > 1 else r for r in runs]


def _run_dir_name(json_path: str) -> str:
  directory = os.path.dirname(os.path.abspath(json_path))
  if os.path.basename(directory) == "certify":
    directory = os.path.dirname(directory)
  return os.path.basename(directory)


def certified_accuracy_curve(results, radii: Sequence[float]) -> np.ndarray:
  """Certified accuracy of a run at each radius (fraction of all its images)."""
  from certjax.smoothing import stats  # pylint: disable=import-outside-toplevel
  return stats.certified_accuracy(results.radius, results.correct, np.asarray(radii))


def certification_table(runs: Sequence[CertifyRun], radii: Sequence[float] = (
    0.0, 0.25, 0.5, 0.75, 1.0), anchors: Iterable[Anchor] = ()):
  """Certified accuracy (%) at `radii`, ACR and the settings: one row per run.

  Published anchors get a row each (ACR and settings they do not state are
  left empty).
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from certjax.smoothing import stats  # pylint: disable=import-outside-toplevel
  rows = []
  for run in runs:
    res, settings = run.results, run.record.get("settings", {})
    acc = certified_accuracy_curve(res, radii)
    row = {"run": run.label, "objective": run.objective, "sigma": run.sigma}
    row.update({f"r={r:g}": 100 * a for r, a in zip(radii, acc)})
    row.update({
        "ACR": stats.average_certified_radius(res.radius, res.correct),
        "abstain %": 100 * float(np.mean(res.predict == stats.ABSTAIN)),
        "images": int(res.radius.size), "n": settings.get("n"), "alpha": settings.get("alpha"),
        "s/image": float(np.mean(res.time)) if res.time.size else float("nan"),
        "source": "certjax (this run)",
    })
    rows.append(row)
  for a in anchors:
    row = {"run": a.label, "objective": "gaussian (published)", "sigma": a.sigma}
    published = dict(zip(a.x, a.accuracy))
    row.update({f"r={r:g}": 100 * published[r] if r in published else float("nan")
                for r in radii})
    row.update({"ACR": float("nan"), "abstain %": float("nan"), "images": 10_000,
                "n": 100_000, "alpha": 0.001, "s/image": float("nan"), "source": a.source})
    rows.append(row)
  return pd.DataFrame(rows)


def radius_cap(sigma: float, n: int, alpha: float) -> float:
  """The largest radius CERTIFY can return with n draws: sigma * Phi^-1(alpha^(1/n)),
  reached when all n noisy predictions agree (Cohen et al. 2019)."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(sigma * stats.norm.ppf(alpha ** (1.0 / n)))


def _n_alpha(run: CertifyRun) -> tuple[int, float] | None:
  settings = run.record.get("settings", {})
  if settings.get("n") is None or settings.get("alpha") is None:
    return None
  return int(settings["n"]), float(settings["alpha"])


def plot_certified_accuracy(runs: Sequence[CertifyRun], anchors: Iterable[Anchor] = (),
                            max_radius: float | None = None):
  """Certified accuracy against L2 radius, one panel per sigma, anchors dashed.

  Returns:
    The matplotlib Figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  anchors = list(anchors)
  sigmas = sorted({r.sigma for r in runs} | {a.sigma for a in anchors if a.sigma is not None})
  if not sigmas:
    raise ValueError("plot_certified_accuracy needs at least one run or anchor.")
  largest = max([float(r.results.radius.max(initial=0.0)) for r in runs]
                + [max(a.x) for a in anchors] + [0.1])
  right = max_radius or 1.05 * largest
  grid = np.linspace(0.0, right, 300)
  fig, axes = plt.subplots(1, len(sigmas), figsize=(4.2 * len(sigmas), 3.4), sharey=True,
                           squeeze=False)
  objectives = sorted({r.objective for r in runs})
  colors = {o: f"C{i}" for i, o in enumerate(objectives)}
  for ax, sigma in zip(axes[0], sigmas):
    for run in (r for r in runs if r.sigma == sigma):
      ax.plot(grid, certified_accuracy_curve(run.results, grid), color=colors[run.objective],
              label=f"{run.label} ({run.results.radius.size} img, "
                    f"n={run.record.get('settings', {}).get('n', '?')})")
    for a in (a for a in anchors if a.sigma == sigma):
      ax.plot(a.x, a.accuracy, "k--o", markersize=4, linewidth=1, label=a.label)
    for n, alpha in sorted({_n_alpha(r) for r in runs if r.sigma == sigma} - {None}):
      ax.axvline(radius_cap(sigma, n, alpha), color="gray", linestyle=":", linewidth=1,
                 label=f"largest radius n={n:,} can certify")
    ax.set_title(f"sigma = {sigma:g}")
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
  axes[0][0].set_ylabel("certified accuracy")
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------
# Bound propagation: verify result files.


def _objective_of(workdir: str) -> str:
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return str(json.load(f).get("objective", {}).get("name", "?"))
  except (OSError, ValueError, AttributeError):
    return "?"


def load_verify_results(workdirs: Iterable[str]):
  """Verified accuracy per (workdir, method, eps) as a long DataFrame.

  Reads <workdir>/verify/results.json (or a results.json path given
  directly); the training objective comes from <workdir>/config.json.
  Columns: run, model, objective, method, eps, verified_accuracy,
  clean_accuracy, images, seconds, workdir.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for workdir in workdirs:
    path = workdir if workdir.endswith(".json") else os.path.join(workdir, "verify",
                                                                  "results.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      summary = json.load(f)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    objective = _objective_of(run_dir)
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
  columns = ["run", "model", "objective", "method", "eps", "verified_accuracy",
             "clean_accuracy", "images", "seconds", "workdir"]
  return pd.DataFrame(rows, columns=columns)


def plot_verified_accuracy(frame, anchors: Iterable[Anchor] = ()):
  """Verified accuracy against L-inf eps: a colour per run, a line style per
  method, published anchors as black markers. Returns the Figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8.5, 3.8))
  styles = {"ibp": "-o", "crown_ibp": "--s", "crown": ":^"}
  for i, (run, group) in enumerate(frame.groupby("run", sort=False)):
    clean = float(group["clean_accuracy"].iloc[0])
    for method, part in group.groupby("method", sort=False):
      part = part.sort_values("eps")
      ax.plot([0.0] + list(part["eps"]), [clean] + list(part["verified_accuracy"]),
              styles.get(method, "-x"), color=f"C{i}", markersize=4,
              label=f"{run}: {method}")
  for marker, a in zip("*Dvp", anchors):
    ax.plot(a.x, a.accuracy, marker, color="k", markersize=9, linestyle="none",
            label=a.label)
  ax.set_xlabel("L-inf eps (pixels in [0, 1])")
  ax.set_ylabel("verified accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------
# Benchmarks: JSON reports of benchmarks/*.py.

BENCHMARK_KINDS = ("training", "attacks", "bounds", "smoothing", "smoothing_peers")


def benchmark_kind(report: Mapping[str, Any]) -> str:
  """Which benchmark script wrote `report` (one of BENCHMARK_KINDS, or 'other')."""
  name = str(report.get("benchmark", "")).lower()
  if name == "train_throughput":
    return "training"
  if name == "attacks":
    return "attacks"
  if name == "bounds":
    return "bounds"
  if name.startswith("smoothing.sample_counts") or name == "smoothing":
    return "smoothing"
  if "certify" in name and "art" in name or name == "smoothing_peers":
    return "smoothing_peers"
  return "other"


# The command that writes each kind of report, for the "missing" notes.
BENCHMARK_COMMANDS = {
    "training": "python -m benchmarks.train_throughput --out=<dir>/train_throughput.json",
    "attacks": "python -m benchmarks.attacks --out=<dir>/attacks.json",
    "attack peers (torchattacks, ART)": (
        "python -m benchmarks.attacks --peers --out=<dir>/attacks_peers.json  "
        "(needs the 'peers' extra: torch, torchattacks, adversarial-robustness-toolbox)"),
    "bounds": "python -m benchmarks.bounds --training --out=<dir>/bounds.json",
    "smoothing": "python -m benchmarks.smoothing --model ibp_small_mnist --batch 250 "
                 "--num 4000 --inputs 10 --out=<dir>/smoothing_ibp_small.json",
    "smoothing peers (ART)": ("python -m benchmarks.smoothing_peers "
                              "--out=<dir>/smoothing_peers.json  (needs the 'peers' extra)"),
}


def missing_note(kind: str, results_dir: str) -> str:
  """The line a notebook prints instead of a chart whose report is missing."""
  command = BENCHMARK_COMMANDS.get(kind)
  how = (f" Write it with: {command.replace('<dir>', results_dir)}" if command else
         " Run the benchmark scripts in benchmarks/ with --out into that directory.")
  return f"No {kind} report in {results_dir!r} (nor measured live): chart skipped.{how}"


class Report(NamedTuple):
  path: str
  kind: str
  data: dict
  source: str  # 'reference' or 'live' (or any tag the caller gives)


def load_benchmarks(directories: Mapping[str, str]) -> tuple[list[Report], list[str]]:
  """Reads every *.json benchmark report in each directory.

  Args:
    directories: tag -> directory, e.g. {'reference': RESULTS_DIR, 'live': tmp}.

  Returns:
    (reports, notes): the reports found; and one line for each directory
    that is missing and each file that is not a benchmark report. A missing
    directory is a note, never an error.
  """
  reports, notes = [], []
  for tag, directory in directories.items():
    if not directory or not os.path.isdir(directory):
      notes.append(f"{tag}: no directory {directory!r}; nothing read from it.")
      continue
    paths = sorted(glob.glob(os.path.join(directory, "*.json")))
    if not paths:
      notes.append(f"{tag}: {directory} holds no *.json report.")
    for path in paths:
      try:
        with open(path) as f:
          data = json.load(f)
      except (OSError, ValueError) as e:
        notes.append(f"{tag}: skipped {os.path.basename(path)} (not readable JSON: {e}).")
        continue
      if not isinstance(data, dict):
        notes.append(f"{tag}: skipped {os.path.basename(path)} (not a JSON object).")
        continue
      reports.append(Report(path, benchmark_kind(data), data, tag))
  return reports, notes


def _first(*values: Any) -> Any:
  for v in values:
    if v not in (None, "", {}):
      return v
  return None


def environment_of(report: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
  """Device, versions and date of a report, whichever schema its script uses.

  The date is the report's own time stamp, else the file's modification date.
  """
  env = report.get("environment") if isinstance(report.get("environment"), dict) else {}
  versions = _first(env.get("versions"), report.get("versions")) or {}
  device = report.get("device")
  if isinstance(device, dict):  # benchmarks/smoothing.py
    device = _first(device.get("kind"), device.get("platform"))
  device = _first(env.get("device_kind"), env.get("device"), report.get("device_kind"),
                  device, env.get("platform"), report.get("platform")) or "?"
  peers = report.get("peers")
  if str(device).startswith("see ") and isinstance(peers, dict):  # attacks.py --peers-only
    device = peers.get("device") or "?"
  jax_version = _first(versions.get("jax"), report.get("jax"))
  date = _first(env.get("time"), report.get("time"))
  if date:
    date = str(date)[:10]
  elif path and os.path.exists(path):
    date = datetime.date.fromtimestamp(os.path.getmtime(path)).isoformat()
  cpus = _first(env.get("cpu_count"), report.get("cpu_count"))
  return {"device": str(device), "cpu_count": None if cpus is None else int(cpus),
          "jax": jax_version, "torch": versions.get("torch"), "date": date}


def environment_caption(reports: Sequence[Report]) -> str:
  """Where and when the numbers of `reports` were measured, one clause per source.

  E.g. 'reference: cpu (2 CPUs), jax 0.10.2, torch 2.5.1, 2026-11-20 to 2026-11-22;
  live: cpu, jax 0.10.2, 2026-11-23'.
  """
  clauses = []
  for source in dict.fromkeys(r.source for r in reports):
    envs = [environment_of(r.data, r.path) for r in reports if r.source == source]

    def distinct(key, envs=envs):
      return list(dict.fromkeys(str(e[key]) for e in envs if e[key] not in (None, "?")))

    cpus = distinct("cpu_count")
    parts = [", ".join(distinct("device")) or "device ?"]
    if cpus:
      parts[0] += f" ({', '.join(cpus)} CPUs)"
    parts.append("jax " + (", ".join(distinct("jax")) or "?"))
    if distinct("torch"):
      parts.append("torch " + ", ".join(distinct("torch")))
    dates = sorted(distinct("date"))
    if dates:
      parts.append(dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
    clauses.append(f"{source}: " + ", ".join(parts))
  return "; ".join(clauses) or "no measurements"


def inventory_table(reports: Sequence[Report]):
  """One row per report read: its kind, file, source, device, versions, date."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    env = environment_of(r.data, r.path)
    rows.append({"kind": r.kind, "file": os.path.basename(r.path), "source": r.source,
                 "device": env["device"],
                 "CPUs": "" if env["cpu_count"] is None else str(env["cpu_count"]),
                 "jax": env["jax"] or "", "torch": env["torch"] or "", "date": env["date"] or ""})
  return pd.DataFrame(rows, columns=["kind", "file", "source", "device", "CPUs", "jax",
                                     "torch", "date"])


def _with_conv_impl(case: str, result: Mapping[str, Any]) -> str:
  # Reports written before conv_impl existed used nn.Conv ('xla').
  impl = result.get("conv_impl", "xla")
  return case if impl == "xla" else f"{case} ({impl})"


def training_table(reports: Sequence[Report]):
  """benchmarks/train_throughput.py: images/s of forward, fwd+bwd and train step."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    for res in r.data.get("results", []):
      rows.append({
          "case": _with_conv_impl(res.get("case", res.get("model", "?")), res),
          "batch": res.get("batch_size"), "dtype": res.get("compute_dtype", "float32"),
          "forward img/s": res.get("forward_images_per_s"),
          "fwd+bwd img/s": res.get("forward_backward_images_per_s"),
          "train step img/s": res.get("train_step_images_per_s"),
          "train step / fwd+bwd": res.get("train_step_vs_forward_backward"),
          "source": r.source,
      })
  return pd.DataFrame(rows)


def attack_table(reports: Sequence[Report]):
  """benchmarks/attacks.py, certjax side: images/s and ratio to 10 fwd+bwd per attack."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    for model, res in (r.data.get("certjax") or {}).items():
      if not isinstance(res, dict):
        continue
      ips = res.get("images_per_s", {})
      for attack, ratio in (res.get("ratio_to_fwd_bwd_x10") or {}).items():
        rows.append({
            "model": model, "attack": attack, "img/s": ips.get(attack),
            "fwd+bwd x10 img/s": ips.get("fwd_bwd_x10"),
            "ratio (median)": ratio,
            "ratio (best)": (res.get("ratio_to_fwd_bwd_x10_best") or {}).get(attack),
            "ratio (CPU time)": (res.get("ratio_to_fwd_bwd_x10_cpu_time") or {}).get(attack),
            "robust acc": (res.get("robust_accuracy") or {}).get(attack),
            "file": os.path.basename(r.path), "source": r.source,
        })
  return pd.DataFrame(rows)


def label_with_file(frame, column: str):
  """`frame[column]`, with ' [file]' appended when the rows come from several files.

  For charts, which draw one bar per (category, series) pair: two runs of the
  same benchmark (say on 2 cores and on 1) must not share a category.
  """
  labels = frame[column].astype(str)
  if "file" in frame and frame["file"].nunique() > 1:
    labels = labels + " [" + frame["file"].astype(str) + "]"
  return labels


def attack_peer_table(reports: Sequence[Report]):
  """benchmarks/attacks.py --peers: certjax PGD-10 against torchattacks and ART.

  Uses the report's own speed-up (same run) where present; for a peers-only
  report it divides by certjax's images/s from another attacks report of the
  same model, and says so in the 'from' column.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  ours = {}
  for r in reports:
    for model, res in (r.data.get("certjax") or {}).items():
      if isinstance(res, dict) and "pgd10" in res.get("images_per_s", {}):
        ours.setdefault(model, res["images_per_s"]["pgd10"])
  rows = []
  for r in reports:
    peers = r.data.get("peers")
    if not isinstance(peers, dict):
      continue
    for model, entry in peers.items():
      if not isinstance(entry, dict) or "images_per_s" not in entry:
        continue
      same_run = entry.get("certjax_pgd10_speedup") or {}
      for peer, ips in entry["images_per_s"].items():
        if peer == "fwd_bwd_x10":
          continue
        if peer in same_run:
          speedup, origin = same_run[peer], "same run"
        elif model in ours and ips:
          speedup, origin = ours[model] / ips, "separate runs"
        else:
          speedup, origin = float("nan"), "no certjax figure"
        rows.append({"model": model, "peer": peer, "peer img/s": ips,
                     "certjax PGD-10 speed-up": speedup, "from": origin,
                     "peer device": peers.get("device"), "file": os.path.basename(r.path),
                     "source": r.source})
  return pd.DataFrame(rows)


def bounds_table(reports: Sequence[Report]):
  """benchmarks/bounds.py: cost of each bound as a multiple of one forward pass."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    for res in r.data.get("results", []):
      memory = res.get("memory_bytes") or {}
      for method, rel in (res.get("relative_to_forward") or {}).items():
        if method == "forward":
          continue
        mem = memory.get(method)
        rows.append({"model": res.get("model", "?"), "batch": res.get("batch"),
                     "method": method, "x forward": rel,
                     "ms": 1e3 * (res.get("seconds") or {}).get(method, float("nan")),
                     "memory MiB": None if mem is None else mem / 2**20,
                     "source": r.source})
  return pd.DataFrame(rows)


def bounds_training_table(reports: Sequence[Report]):
  """benchmarks/bounds.py --training: certified-training step cost vs a standard step
  (the standard step itself, 1.0 by definition, is left out)."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    training = r.data.get("training_step")
    if not isinstance(training, dict):
      continue
    for objective, rel in (training.get("relative_to_standard") or {}).items():
      if objective == "standard":  # the baseline itself, 1.0 by definition
        continue
      rows.append({"objective": objective, "batch": training.get("batch"),
                   "x standard step": rel,
                   "ms": 1e3 * (training.get("seconds") or {}).get(objective, float("nan")),
                   "source": r.source})
  return pd.DataFrame(rows)


def smoothing_table(reports: Sequence[Report]):
  """benchmarks/smoothing.py: noisy forwards/s against the raw forward, one row per file."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    d = r.data
    # The overhead measure compares with a forward compiled with the counting
    # loop's own compiler options (older reports lack it: fall back to plain).
    same_options = d.get("ratio_smoothing_to_forward_same_compiler_options",
                         d.get("ratio_smoothing_to_forward"))
    rows.append({"model": _with_conv_impl(d.get("model", "?"), d), "batch": d.get("batch"),
                 "dtype": d.get("dtype", "float32"),
                 "forward img/s": d.get("forward_images_per_second"),
                 "smoothing forwards/s": d.get("smoothing_noisy_forwards_per_second"),
                 "smoothing / forward": d.get("ratio_smoothing_to_forward"),
                 "smoothing / forward (same options)": same_options,
                 "file": os.path.basename(r.path), "source": r.source})
  return pd.DataFrame(rows)


def smoothing_peers_table(reports: Sequence[Report]):
  """benchmarks/smoothing_peers.py: CERTIFY seconds per image, certjax against ART."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    for run in r.data.get("runs", []):
      ours, art = run.get("certjax", {}), run.get("art", {})
      rows.append({"batch": run.get("batch_size"), "n": r.data.get("n"),
                   "images": r.data.get("images"),
                   "certjax s/image": ours.get("seconds_per_image"),
                   "ART s/image": art.get("seconds_per_image"),
                   "certjax speed-up over ART": run.get("speedup_certjax_over_art"),
                   "source": r.source})
  return pd.DataFrame(rows)


def efficiency_summary(reports: Sequence[Report]):
  """One row per (algorithm, model): its throughput as a fraction of the raw limit.

  1.0 means the algorithm runs as fast as the forward(/backward) passes it
  cannot avoid: training step vs one fwd+bwd, a 10-step attack vs 10 chained
  fwd+bwd, smoothing's counting vs plain forward passes on the same batch.
  Rows measured live carry ' (live)' after the model.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  by_kind = {k: [r for r in reports if r.kind == k] for k in BENCHMARK_KINDS}
  rows = []

  def add(algorithm, model, value, limit, source):
    suffix = "" if source == "reference" else f" ({source})"
    rows.append({"algorithm": algorithm, "model": f"{model}{suffix}",
                 "fraction of raw limit": value, "raw limit": limit, "source": source})

  for _, row in training_table(by_kind["training"]).iterrows():
    add("train step", row["case"], row["train step / fwd+bwd"], "1 fwd+bwd", row["source"])
  attacks = attack_table(by_kind["attacks"])
  if not attacks.empty:
    attacks["model"] = label_with_file(attacks, "model")
  for _, row in attacks.iterrows():
    add(row["attack"], row["model"], row["ratio (median)"], "10 fwd+bwd", row["source"])
  for _, row in smoothing_table(by_kind["smoothing"]).iterrows():
    add("smoothing counts", f"{row['model']} b{row['batch']}",
        row["smoothing / forward (same options)"], "forward", row["source"])
  frame = pd.DataFrame(rows, columns=["algorithm", "model", "fraction of raw limit",
                                      "raw limit", "source"])
  frame["fraction of raw limit"] = pd.to_numeric(frame["fraction of raw limit"])
  return frame.dropna(subset=["fraction of raw limit"]).reset_index(drop=True)


def efficiency_chart(frame, title: str):
  """Horizontal bars, one per (algorithm, model) row of `efficiency_summary`,
  coloured by algorithm, with the raw limit (1.0) dashed. Returns the Figure."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  frame = frame.iloc[::-1]  # first row on top
  algorithms = list(dict.fromkeys(frame["algorithm"][::-1]))
  fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(frame)))
  colors = [f"C{algorithms.index(a) % 10}" for a in frame["algorithm"]]
  labels = [f"{a} | {m} (vs {limit})" for a, m, limit in
            zip(frame["algorithm"], frame["model"], frame["raw limit"])]
  values = [float(v) for v in frame["fraction of raw limit"]]
  bars = ax.barh(range(len(frame)), values, color=colors)
  ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=7, padding=2)
  ax.set_yticks(range(len(frame)), labels, fontsize=8)
  ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
  ax.set_xlabel("throughput / raw-limit throughput (1.0 = no overhead)")
  ax.set_title(title, fontsize=9)
  ax.grid(axis="y", visible=False)
  fig.tight_layout()
  return fig


def bar_chart(frame, *, category: str, series: str, value: str, title: str,
              ylabel: str, reference: float | None = 1.0, log: bool = False,
              ax=None):
  """Grouped bars: one group per `category`, one bar per `series` present in it.

  Args:
    frame: a DataFrame with the three columns; the first row of a
      (category, series) pair is drawn.
    reference: draws a dashed line at this value (e.g. 1.0 = the raw limit).
    log: logarithmic value axis.
    ax: axes to draw on (a new figure when None).

  Returns:
    The Figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  frame = frame.dropna(subset=[value])
  categories = [str(c) for c in dict.fromkeys(frame[category])]
  names = [str(n) for n in dict.fromkeys(frame[series])]
  if ax is None:
    _, ax = plt.subplots(figsize=(min(12.0, 2.5 + 0.45 * len(frame)), 3.4))
  drawn = set()
  for i, c in enumerate(categories):
    part = frame[frame[category].astype(str) == c].drop_duplicates(subset=[series])
    width = 0.8 / max(1, len(part))
    for j, (_, row) in enumerate(part.iterrows()):
      name = str(row[series])
      k = names.index(name)
      bars = ax.bar(i - 0.4 + width * (j + 0.5), float(row[value]), width, color=f"C{k % 10}",
                    label=None if name in drawn else name)
      drawn.add(name)
      ax.bar_label(bars, labels=[_short(float(row[value]))], fontsize=7, padding=1)
  if reference is not None:
    ax.axhline(reference, color="k", linestyle="--", linewidth=1)
  long_labels = max((len(c) for c in categories), default=0) > 12
  ax.set_xticks(range(len(categories)), categories, fontsize=8,
                rotation=20 if long_labels else 0, ha="right" if long_labels else "center")
  if log:
    ax.set_yscale("log")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(axis="x", visible=False)
  if len(names) > 1:
    ax.legend(fontsize=7)
  ax.figure.tight_layout()
  return ax.figure


def _short(value: float) -> str:
  if not math.isfinite(value):
    return ""
  if abs(value) >= 100:
    return f"{value:.0f}"
  if abs(value) >= 10:
    return f"{value:.1f}"
  return f"{value:.2f}"


def add_root_to_path(root: str) -> None:
  """Makes `import certjax`, `configs` and `benchmarks` resolve to this checkout."""
  if root not in sys.path:
    sys.path.insert(0, root)
