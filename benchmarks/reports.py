"""Reading the benchmark reports back: tables and charts of what benchmarks/*.py wrote.

The reader beside its writer (`common.write_report`): every script's JSON
report carries a `kind` (`common.KINDS`), and `load_benchmarks` files each
report under that kind. A report without a known kind is not guessed from its
free-text `benchmark` title: it comes back as a note, like a missing
directory or a file that is not JSON, and the caller prints the notes.

Each `*_table` turns the reports of one kind into a pandas DataFrame, one row
per measured figure, with the report's `source` tag (e.g. 'reference' for
benchmarks/reference/, 'live' for a measurement made now) and, where two runs
of one script must stay apart in a chart, its file name.
`efficiency_summary` gathers every ratio to the raw forward/backward limit
across kinds. The charts (`bar_chart`, `efficiency_chart`) draw on bare
matplotlib `Figure`s, as `certjax.evaluation.plots` does, so they neither
need nor disturb pyplot's global state; a notebook shows one by returning or
`display`ing it.

Used by notebooks/03_throughput.ipynb; tested in tests/benchmarks/test_reports.py.
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

from benchmarks.common import KINDS

# The command that writes each chart's report, for the notes printed in place
# of a chart whose report is missing ('<dir>' becomes the results directory).
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
    "scaling": "python -m benchmarks.scaling --devices 1,2,4,8 --out=<dir>/scaling.json",
}


def missing_note(chart: str, results_dir: str) -> str:
  """The line a notebook prints instead of a chart whose report is missing.

  Args:
    chart: a key of `BENCHMARK_COMMANDS` (any other text gets a generic hint).
    results_dir: the directory the reports were read from.
  """
  command = BENCHMARK_COMMANDS.get(chart)
  how = (f" Write it with: {command.replace('<dir>', results_dir)}" if command else
         " Run the benchmark scripts in benchmarks/ with --out into that directory.")
  return f"No {chart} report in {results_dir!r} (nor measured live): chart skipped.{how}"


class Report(NamedTuple):
  """One benchmark report read back.

  Attributes:
    path: the JSON file.
    kind: its `kind` key, one of `common.KINDS`.
    data: the parsed JSON object.
    source: the tag of the directory it came from ('reference', 'live', ...).
  """
  path: str
  kind: str
  data: dict
  source: str


def load_benchmarks(directories: Mapping[str, str]) -> tuple[list[Report], list[str]]:
  """Reads every *.json benchmark report in each directory.

  Args:
    directories: tag -> directory, e.g. {'reference': RESULTS_DIR, 'live': tmp}.

  Returns:
    (reports, notes): the reports found, in directory then file-name order;
    and one line for each directory that is missing or empty and each file
    that is not a benchmark report (not JSON, not an object, or no known
    `kind`). Nothing here raises for what is on disk.
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
      name = os.path.basename(path)
      try:
        with open(path) as f:
          data = json.load(f)
      except (OSError, ValueError) as e:
        notes.append(f"{tag}: skipped {name} (not readable JSON: {e}).")
        continue
      if not isinstance(data, dict):
        notes.append(f"{tag}: skipped {name} (not a JSON object).")
        continue
      kind = data.get("kind")
      if kind not in KINDS:
        # Guessing from the free-text title is what `kind` replaced: a report
        # from before it (or from another tool) is named, not misfiled.
        what = "has no 'kind' key" if kind is None else f"has an unknown kind {kind!r}"
        notes.append(f"{tag}: skipped {name} ({what}; benchmark "
                     f"{data.get('benchmark', '?')!r}). Reports name their script with "
                     f"'kind', one of {', '.join(KINDS)}: re-run the script, or add the key.")
        continue
      reports.append(Report(path, kind, data, tag))
  return reports, notes


def by_kind(reports: Sequence[Report]) -> dict[str, list[Report]]:
  """The reports of each kind of `common.KINDS` (every kind present, maybe empty)."""
  return {kind: [r for r in reports if r.kind == kind] for kind in KINDS}


# ---------------------------------------------------------------- environment


def _first(*values: Any) -> Any:
  for v in values:
    if v not in (None, "", {}):
      return v
  return None


def environment_of(report: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
  """Device, versions and date of a report, whichever schema its script uses.

  The scripts record their environment in three layouts (an `environment`
  block; top-level keys; smoothing.py's `device` dict and `jax`), and
  attacks.py --peers-only points at its peers' device.

  Args:
    report: the parsed JSON.
    path: its file, whose modification date stands in for a missing time stamp.

  Returns:
    {'device', 'cpu_count', 'jax', 'torch', 'date'}; unknown values are None
    ('?' for the device).
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


# --------------------------------------------------------------- per kind


def _with_conv_impl(case: str, result: Mapping[str, Any]) -> str:
  # Reports written before conv_impl existed used nn.Conv ('xla').
  impl = result.get("conv_impl", "xla")
  return case if impl == "xla" else f"{case} ({impl})"


def training_table(reports: Sequence[Report]):
  """'training' (train_throughput.py): images/s of forward, fwd+bwd and train step."""
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
  """'attacks' (attacks.py), certjax side: images/s and ratio to 10 fwd+bwd per attack."""
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
  """'attacks' with --peers: certjax PGD-10 against torchattacks and ART.

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
  """'bounds' (bounds.py): cost of each bound as a multiple of one forward pass."""
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
  """'bounds' with --training: certified-training step cost vs a standard step
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
  """'smoothing' (smoothing.py): noisy forwards/s against the raw forward, one row per file."""
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
                 # Cohen et al.'s figure of merit, where the report timed CERTIFY.
                 "certify s/image": d.get("certify_seconds_per_image"),
                 "certify n": d.get("certify_n"),
                 "file": os.path.basename(r.path), "source": r.source})
  return pd.DataFrame(rows)


def smoothing_peers_table(reports: Sequence[Report]):
  """'smoothing_peers' (smoothing_peers.py): CERTIFY seconds per image, certjax against ART."""
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


# scaling.py's figures: (JSON key of the rate, its '<name>_vs_baseline' prefix, column).
_SCALING_FIGURES = (("train_step_images_per_s", "train_step", "train step img/s"),
                    ("forward_backward_images_per_s", "forward_backward", "fwd+bwd img/s"),
                    ("certification_draws_per_s", "certification", "certify draws/s"),
                    ("forward_images_per_s", "forward", "forward img/s"))


def scaling_table(reports: Sequence[Report]):
  """'scaling' (scaling.py): each rate per device count, and its ratio to the fewest devices.

  On CPU the devices are forced host devices sharing the same cores (the
  report's `note` says so): the ratios measure partitioning overhead there,
  not a speed-up.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  rows = []
  for r in reports:
    for res in r.data.get("results", []):
      row = {"devices": res.get("devices"), "global batch": res.get("global_batch"),
             "per-device batch": res.get("per_device_batch"),
             "platform": res.get("platform")}
      for key, name, column in _SCALING_FIGURES:
        row[column] = res.get(key)
        row[f"{column} x baseline"] = res.get(f"{name}_vs_baseline")
      row.update({"file": os.path.basename(r.path), "source": r.source})
      rows.append(row)
  return pd.DataFrame(rows)


def efficiency_summary(reports: Sequence[Report]):
  """One row per (algorithm, model): its throughput as a fraction of the raw limit.

  1.0 means the algorithm runs as fast as the forward(/backward) passes it
  cannot avoid: training step vs one fwd+bwd, a 10-step attack vs 10 chained
  fwd+bwd, smoothing's counting vs plain forward passes on the same batch.
  Rows not from 'reference' carry their source after the model, e.g. ' (live)'.
  """
  import pandas as pd  # pylint: disable=import-outside-toplevel
  kinds = by_kind(reports)
  rows = []

  def add(algorithm, model, value, limit, source):
    suffix = "" if source == "reference" else f" ({source})"
    rows.append({"algorithm": algorithm, "model": f"{model}{suffix}",
                 "fraction of raw limit": value, "raw limit": limit, "source": source})

  for _, row in training_table(kinds["training"]).iterrows():
    add("train step", row["case"], row["train step / fwd+bwd"], "1 fwd+bwd", row["source"])
  attacks = attack_table(kinds["attacks"])
  if not attacks.empty:
    attacks["model"] = label_with_file(attacks, "model")
  for _, row in attacks.iterrows():
    add(row["attack"], row["model"], row["ratio (median)"], "10 fwd+bwd", row["source"])
  for _, row in smoothing_table(kinds["smoothing"]).iterrows():
    add("smoothing counts", f"{row['model']} b{row['batch']}",
        row["smoothing / forward (same options)"], "forward", row["source"])
  frame = pd.DataFrame(rows, columns=["algorithm", "model", "fraction of raw limit",
                                      "raw limit", "source"])
  frame["fraction of raw limit"] = pd.to_numeric(frame["fraction of raw limit"])
  return frame.dropna(subset=["fraction of raw limit"]).reset_index(drop=True)


# ------------------------------------------------------------------- charts


def figure(width: float, height: float):
  """A bare matplotlib `Figure` (no pyplot: a notebook's inline display stays its own)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=(width, height))


def _short(value: float) -> str:
  if not math.isfinite(value):
    return ""
  if abs(value) >= 100:
    return f"{value:.0f}"
  if abs(value) >= 10:
    return f"{value:.1f}"
  return f"{value:.2f}"


def efficiency_chart(frame, title: str):
  """Horizontal bars, one per (algorithm, model) row of `efficiency_summary`,
  coloured by algorithm, with the raw limit (1.0) dashed. Returns the Figure."""
  frame = frame.iloc[::-1]  # first row on top
  algorithms = list(dict.fromkeys(frame["algorithm"][::-1]))
  fig = figure(7.5, 0.9 + 0.32 * len(frame))
  ax = fig.add_subplot()
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
      (category, series) pair is drawn, rows without a value are not.
    category: the column naming the groups along the x axis.
    series: the column naming the bars within a group (one colour each).
    value: the column of bar heights.
    title: the axes title.
    ylabel: the value axis label.
    reference: draws a dashed line at this value (e.g. 1.0 = the raw limit).
    log: logarithmic value axis.
    ax: axes to draw on (a new `Figure` when None).

  Returns:
    The Figure.
  """
  frame = frame.dropna(subset=[value])
  categories = [str(c) for c in dict.fromkeys(frame[category])]
  names = [str(n) for n in dict.fromkeys(frame[series])]
  if ax is None:
    ax = figure(min(12.0, 2.5 + 0.45 * len(frame)), 3.4).add_subplot()
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
