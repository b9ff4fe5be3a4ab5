"""'certified': certified accuracy of the smoothed classifier (Cohen et al.'s CERTIFY).

Settings: the `certify` section of a config (`default_config`). Every
selected image is certified with CERTIFY (`certjax.smoothing.certify`); image
`i` of the split uses the key `fold_in(stream_key(certify.seed, 'certify'), i)`
(`certjax.keys`: never a training key, whatever the seeds), so its
certificate depends neither on the selection (skip, max), nor on the grouping
of images into calls, nor on the devices. Writes to its output directory
(`<workdir>/certify/`, or `certify.output_dir`), under a run name that holds
every setting that changes the certificates (noise, sigma, n0, n, alpha,
seed, checkpoint step, split):

  <run>.tsv        Cohen's format `idx label predict radius correct time`,
                   readable by their `analyze.py`; `time` is the group's wall
                   time divided by its size (the first group includes
                   compilation);
  <run>.md         the summary: certified accuracy at `certify.radii`,
                   average certified radius (ACR), abstention rate;
  <run>.json       the same figures with the settings, for notebooks;
  <run>.png        certified accuracy against radius, with the largest radius
                   `n` draws can certify marked;
  <run>.log.jsonl  every image certified so far: an interrupted run resumes
                   after them, and a run with another selection reuses the
                   images the two share. (A TSV alone is not resumed from: it
                   does not say how its noise was keyed.)

sigma: `certify.sigma = -1` (the default) means the sigma the model was
trained with (`config.objective.sigma` of the smoothing objectives); a
positive value certifies at that sigma whatever the objective.

Multi-host: every host certifies a contiguous share of each group of
`certify.images_per_call` images on its own devices (the counting needs no
communication); the predictions and radii are gathered once per group and
process 0 appends them to the TSV.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (locuslab/smoothing `code/certify.py`, `analyze.py`).
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020
  (uniform noise, L1 radii).
  Zhai et al., "MACER", ICLR 2020 (average certified radius).
"""

from __future__ import annotations

import datetime
import functools
import glob
import os
import re
import time
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from certjax import keys
from certjax import parallel
from certjax import validation
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalResult, EvalSetup, register_evaluator
from certjax.runs import files
from certjax.smoothing import analysis
from certjax.smoothing import core
from certjax.smoothing import sampling
from certjax.smoothing import stats

NAME = "certified"
SECTION = "certify"
USE_OBJECTIVE_SIGMA = -1.0
TSV_HEADER = ("idx", "label", "predict", "radius", "correct", "time")

_TIMEDELTA = re.compile(
    r"^(?:(?P<days>-?\d+) days?, )?(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?)$")


def default_config() -> ml_collections.ConfigDict:
  """The certification settings (`config.certify`) and their defaults (Cohen et al.'s, where they have one).

  Fields:
    sigma: noise standard deviation in [0, 1] pixel units; -1 = the
      training objective's sigma.
    noise: 'gaussian' (L2 radii) or 'uniform' (L1 radii, Yang et al. 2020).
    n0: selection draws per image (Cohen: 100).
    n: estimation draws per image (Cohen: 100,000).
    alpha: failure probability per image (Cohen: 0.001).
    batch_size: noisy copies per forward pass on each device (Cohen's
      --batch, default 1000 there). On CPU keep it small enough that the
      convolutions' temporary buffers stay under glibc's 32 MB mmap
      threshold: above it every forward pass maps fresh pages (measured
      with ibp_small on MNIST at 1000: 25 page faults per noisy copy and as
      much kernel as user CPU time; at 250: none, about 1.5x less CPU).
    images_per_call: images counted together in one jitted call over all
      hosts; 0 = one per device. Results do not depend on it (each image's
      noise comes from its dataset index); it sets how often progress is
      reported and written, and how much work an interruption loses.
    split: the data split to certify ('' = config.data.eval_split).
    seed: seed of the certification noise (separate from config.seed).
    checkpoint_step: checkpoint to certify; -1 = the newest.
    radii: radii at which the summary reports certified accuracy.
    output_dir: where the TSV, summary and plot go; '' = <workdir>/certify.
  """
  return ml_collections.ConfigDict({
      "sigma": USE_OBJECTIVE_SIGMA,
      "noise": "gaussian",
      "n0": 100,
      "n": 100_000,
      "alpha": 0.001,
      "batch_size": 1000,
      "images_per_call": 0,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
      "radii": tuple(float(r) for r in np.arange(0.0, 2.0 + 1e-9, 0.25)),
      "output_dir": "",
  })


def resolve_sigma(settings: Any, objective: Mapping[str, Any] | None) -> float:
  """The sigma to certify at: `certify.sigma`, or the training objective's when -1.

  Raises:
    ValueError: when sigma is -1 and the objective has no sigma, or sigma is
      neither -1 nor > 0.
  """
  sigma = float(settings.sigma)
  if sigma == USE_OBJECTIVE_SIGMA:
    objective = dict(objective or {})
    objective_sigma = objective.get("sigma")
    if objective_sigma is None:
      raise ValueError(
          f"certify.sigma is -1 (use the training objective's sigma) but objective "
          f"{objective.get('name', '(none)')!r} has no sigma; set --config.certify.sigma=0.25 "
          "(or the noise level to certify at).")
    sigma = float(objective_sigma)
  if not sigma > 0 or not np.isfinite(sigma):
    raise ValueError(f"certify.sigma must be > 0, or -1 for the training objective's sigma; "
                     f"got {settings.sigma!r}.")
  return sigma


def _objective_of(setup: EvalSetup | None) -> Mapping[str, Any] | None:
  run_config = None if setup is None else setup.run_config
  if run_config is not None and "objective" in run_config:
    return run_config["objective"]
  return None


def validate_settings(settings: Any, setup: EvalSetup | None = None) -> None:
  """Checks `config.certify` (whether sigma -1 can be resolved is checked when
  the evaluator is built: a config that never certifies may leave it at -1).

  Raises:
    ValueError: naming the bad field and the accepted values.
  """
  del setup
  c = settings
  sigma = c.sigma
  if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (
      sigma == USE_OBJECTIVE_SIGMA or (np.isfinite(sigma) and sigma > 0)):
    raise ValueError(f"certify.sigma must be > 0, or -1 for the training objective's sigma; "
                     f"got {sigma!r}.")
  validation.check_choice(c.noise, "certify.noise", sampling.NOISE_TYPES)
  validation.check_int_at_least(c.n0, "certify.n0", 1)
  validation.check_int_at_least(c.n, "certify.n", 1)
  validation.check_in_open_interval(c.alpha, "certify.alpha", 0.0, 1.0)
  smallest = stats.min_samples_to_certify(c.alpha)
  if c.n < smallest:
    raise ValueError(
        f"certify.n={c.n} can never certify at alpha={c.alpha} (every image would "
        f"abstain); use certify.n >= {smallest}.")
  validation.check_int_at_least(c.batch_size, "certify.batch_size", 1)
  validation.check_int_at_least(c.images_per_call, "certify.images_per_call", 0)
  validation.check_int_at_least(c.seed, "certify.seed", 0)
  common.check_selection_settings(c, SECTION)
  if not isinstance(c.output_dir, str):
    raise ValueError(f"certify.output_dir must be a directory or ''; got {c.output_dir!r}.")
  radii = np.asarray(tuple(c.radii), dtype=np.float64)
  if radii.ndim != 1 or radii.size == 0 or np.any(~np.isfinite(radii)) or np.any(radii < 0):
    raise ValueError(f"certify.radii must be a non-empty sequence of radii >= 0; got {c.radii!r}.")


# ------------------------------------------------------------------ TSV files


def _format_time(seconds: float) -> str:
  return str(datetime.timedelta(seconds=float(seconds)))


def _parse_time(text: str, where: str) -> float:
  text = text.strip()
  match = _TIMEDELTA.match(text)
  if match:
    days = int(match.group("days") or 0)
    return (days * 86400 + int(match.group("h")) * 3600 + int(match.group("m")) * 60
            + float(match.group("s")))
  try:
    return float(text)
  except ValueError:
    raise ValueError(
        f"{where}: time {text!r} is neither H:MM:SS[.ffffff] nor a number of seconds."
    ) from None


def tsv_lines(results: analysis.CertifyResults, header: bool = True) -> list[str]:
  """Rows of Cohen et al.'s certification TSV (radii with 6 significant digits)."""
  lines = ["\t".join(TSV_HEADER)] if header else []
  for i, y, p, r, c, t in zip(*results):
    lines.append(f"{i}\t{y}\t{p}\t{r:.6g}\t{int(c)}\t{_format_time(t)}")
  return lines


def write_tsv(path: str | os.PathLike, results: analysis.CertifyResults) -> None:
  """Writes results in Cohen et al.'s certification TSV format, atomically.

  One row per example: `idx label predict radius correct time`, `predict` -1
  on abstention, `correct` 0/1, `time` a `datetime.timedelta` string.
  """
  files.atomic_write_text(path, "\n".join(tsv_lines(results)) + "\n")


def read_tsv(path: str | os.PathLike) -> analysis.CertifyResults:
  """Reads a certification TSV (ours or one written by Cohen et al.'s certify.py).

  Raises:
    ValueError: on a wrong header or a malformed row, naming the line.
  """
  with open(path) as f:
    rows = [line.rstrip("\n").rstrip("\r") for line in f]
  rows = [row for row in rows if row.strip()]
  if not rows or tuple(rows[0].split("\t")) != TSV_HEADER:
    found = rows[0] if rows else "an empty file"
    raise ValueError(
        f"{path}: expected the tab-separated header {' '.join(TSV_HEADER)!r}; got {found!r}.")
  columns = [[] for _ in TSV_HEADER]
  for number, row in enumerate(rows[1:], start=2):
    fields = row.split("\t")
    where = f"{path}, line {number}"
    if len(fields) != len(TSV_HEADER):
      raise ValueError(f"{where}: expected {len(TSV_HEADER)} tab-separated fields, got "
                       f"{len(fields)}.")
    try:
      values = [int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]),
                int(fields[4])]
    except ValueError as e:
      raise ValueError(f"{where}: malformed field in {row!r} ({e}).") from None
    values.append(_parse_time(fields[5], where))
    for column, value in zip(columns, values):
      column.append(value)
  idx, label, predict, radius, correct, seconds = (np.asarray(c) for c in columns)
  return analysis.CertifyResults(idx.astype(np.int64), label.astype(np.int64),
                                 predict.astype(np.int64), radius.astype(np.float64),
                                 correct.astype(bool), seconds.astype(np.float64))


# ---------------------------------------------------------------- certifying


def run_name(sigma: float, settings: Any, step: int, split: str) -> str:
  """The file stem of a certification: every setting that changes the certificates."""
  noise = "" if settings.noise == "gaussian" else f"{settings.noise}_"
  split = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in split)
  return (f"{noise}sigma{sigma:g}_n0{settings.n0}_n{settings.n}_alpha{settings.alpha:g}"
          f"_seed{settings.seed}_step{step}_{split}")


class CertificationRun(NamedTuple):
  """The 'certified' evaluator's details (`EvalResult.details`).

  Attributes:
    results: the TSV's columns (`analysis.CertifyResults`), all images.
    summary: certified accuracy per radius, ACR, abstention rate.
    table: the summary as a Markdown table (what the launcher prints).
    sigma: the noise level certified at.
    name: the run name (file stem).
  """
  results: analysis.CertifyResults
  summary: analysis.Summary
  table: str
  sigma: float
  name: str


def _certify_group(keys, logits_fn, x, sigma, settings, num_classes, mesh) -> core.Certificate:
  count = x.shape[0]
  if mesh is not None:
    # Every device gets the same number of images: pad with copies of the
    # last one (their certificates are dropped).
    devices = mesh.devices.size
    padded = -(-count // devices) * devices
    if padded != count:
      x = np.concatenate([x, np.repeat(x[-1:], padded - count, axis=0)])
      keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - count, axis=0)])
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS)))
  cert = core.certify(keys, logits_fn, x, sigma, settings.n0, settings.n, settings.alpha,
                      settings.batch_size, num_classes=num_classes, noise=settings.noise,
                      mesh=mesh)
  return core.Certificate(*(np.asarray(field)[:count] for field in cert))


def _summary_record(name: str, sigma: float, settings: Any, summary: analysis.Summary,
                    results: analysis.CertifyResults, metadata: Mapping[str, Any],
                    tsv_path: str | None) -> dict[str, Any]:
  norm = stats.NOISE_NORMS[settings.noise]
  return {
      "settings": {**{k: metadata.get(k) for k in ("data", "split", "model", "objective",
                                                   "checkpoint_step", "skip", "max")},
                   "noise": settings.noise, "sigma": sigma, "n0": int(settings.n0),
                   "n": int(settings.n), "alpha": float(settings.alpha),
                   "seed": int(settings.seed), "batch_size": int(settings.batch_size)},
      "name": name,
      "radii": [float(t) for t in summary.thresholds],
      "certified_accuracy": [float(a) for a in summary.certified_accuracy],
      "average_certified_radius": summary.average_certified_radius,
      "abstain_rate": summary.abstain_rate,
      "num_examples": summary.num_examples,
      "mean_seconds_per_image": summary.mean_time,
      "total_seconds": float(np.sum(results.time)),
      "max_certifiable_radius": stats.max_certifiable_radius(
          sigma, int(settings.n), float(settings.alpha), settings.noise),
      "norm": norm,
      "tsv": tsv_path,
      "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count()},
      "provenance": metadata.get("provenance"),
  }


def _markdown(name: str, record: Mapping[str, Any], summary: analysis.Summary,
              table: str) -> str:
  settings = record["settings"]
  norm = record["norm"].upper()
  return "\n".join([
      f"# Certification: {name}", "",
      ", ".join(f"{k}={v}" for k, v in settings.items()), "",
      f"Certified accuracy ({norm} radius) on {summary.num_examples} images; "
      f"ACR = average certified radius; {summary.mean_time:.3f} s per image; no radius can "
      f"exceed {record['max_certifiable_radius']:.4g} with n={settings['n']}.", "", table, ""])


def metrics_of(summary: analysis.Summary) -> dict[str, float]:
  """Flat metrics for logging: certified accuracy per radius, ACR, abstention rate."""
  metrics = {f"certified_accuracy@{t:g}": float(a)
             for t, a in zip(summary.thresholds, summary.certified_accuracy)}
  metrics["average_certified_radius"] = summary.average_certified_radius
  metrics["abstain_rate"] = summary.abstain_rate
  return metrics


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings,
                    summary="certified accuracy of the smoothed classifier (CERTIFY)")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'certified' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  sigma = resolve_sigma(settings, _objective_of(setup))
  num_classes = setup.num_classes
  thresholds = tuple(float(r) for r in settings.radii)

  def evaluate(ctx: EvalContext) -> EvalResult:
    devices = jax.local_device_count()
    mesh = parallel.local_mesh() if devices > 1 else None
    variables = (common.local_variables(ctx.variables, mesh) if mesh is not None
                 else jax.device_put(jax.device_get(ctx.variables), jax.local_devices()[0]))
    logits_fn = functools.partial(ctx.apply_fn, variables, train=False)
    indices = ctx.data.indices
    name = run_name(sigma, settings, int(ctx.step), ctx.data.split)
    output_dir = ctx.output_dir
    fingerprint = {"evaluator": NAME, "name": name, "dataset": ctx.data.name,
                   "split": ctx.data.split, "step": int(ctx.step), "noise": settings.noise,
                   "sigma": sigma, "n0": int(settings.n0), "n": int(settings.n),
                   "alpha": float(settings.alpha), "seed": int(settings.seed),
                   # The key derivation: certificates of another one differ.
                   "noise_stream": keys.CERTIFY, "num_classes": int(num_classes)}
    log = common.ResumeLog(common.log_path(ctx, name), fingerprint)
    tsv_path = None if output_dir is None else os.path.join(output_dir, f"{name}.tsv")
    main = parallel.is_main_process()
    done = [i for i in indices if str(int(i)) in log.completed]
    todo = np.asarray([i for i in indices if str(int(i)) not in log.completed], np.int64)
    if done:  # on every process: each skips the same images
      logging.info("Resuming %s: %d of %d images already certified.", name, len(done),
                   len(indices))
    if tsv_path is not None and main:
      rows = _rows(log.completed, np.asarray(done, np.int64))
      files.atomic_write_text(tsv_path, "\n".join(tsv_lines(rows)) + "\n")
    key = keys.stream_key(int(settings.seed), keys.CERTIFY)
    group = int(settings.images_per_call) or jax.device_count()
    counter = common.progress(len(indices), "image", "certify")
    counter.update(len(done))
    for first in range(0, todo.size, group):
      idx = todo[first:first + group]
      tic = time.perf_counter()
      share, size = parallel.host_share(idx.size)
      mine = idx[share]
      labels = np.zeros(mine.size, np.int32)
      prediction = np.zeros(mine.size, np.int32)
      radius = np.zeros(mine.size, np.float32)
      if mine.size:
        x, y = ctx.data.load(mine)
        common.note_loaded(ctx.data, mine, x, y)
        image_keys = sampling.keys_for_indices(key, mine)
        cert = _certify_group(image_keys, logits_fn, x, sigma, settings, num_classes, mesh)
        labels, prediction, radius = y.astype(np.int32), cert.prediction, cert.radius
      labels, prediction, radius = common.gather_shares((labels, prediction, radius), size,
                                                        idx.size)
      seconds = (time.perf_counter() - tic) / idx.size
      # Radii as the TSV holds them (6 significant digits), so that a resumed
      # run and a fresh one report the same figures.
      log.record_many({str(int(i)): {"label": int(y_i), "predict": int(p_i),
                                     "radius": float(f"{r_i:.6g}"), "time": seconds}
                       for i, y_i, p_i, r_i in zip(idx, labels, prediction, radius)})
      if tsv_path is not None and main:
        with open(tsv_path, "a") as f:
          f.write("\n".join(tsv_lines(_rows(log.completed, idx), header=False)) + "\n")
      finished = len(done) + first + idx.size
      if counter.due(finished):
        common.report(ctx, counter.line(finished, counter.update(finished)))
    results = _rows(log.completed, indices)
    summary = analysis.summarize(results, thresholds=thresholds)
    table = analysis.format_summary({f"sigma={sigma:g}": summary})
    metadata = common.metadata_block(ctx)
    record = _summary_record(name, sigma, settings, summary, results, metadata, tsv_path)
    if tsv_path is not None and main:
      write_tsv(tsv_path, results)  # in selection order, whatever was resumed
    figure = None
    if output_dir is not None:
      norm = stats.NOISE_NORMS[settings.noise].upper()
      cap = record["max_certifiable_radius"]
      figure = plots.certified_accuracy_figure(
          {f"sigma={sigma:g}": results}, norm=norm,
          max_radius=max(float(np.max(thresholds)), float(results.radius.max(initial=0.0)),
                         cap, 0.1) * 1.05,
          radius_caps={f"largest radius n={settings.n:,} can certify": cap},
          title=f"{metadata.get('dataset')} {metadata.get('model')} "
                f"({metadata.get('objective')}), n={settings.n}")
    artifacts = common.write_results(output_dir, name, record,
                                     _markdown(name, record, summary, table), figure=figure)
    if tsv_path is not None:
      artifacts = {"tsv": tsv_path, **artifacts}
    heading = (f"Certified accuracy (sigma={sigma:g}, {summary.num_examples} images, "
               f"{summary.mean_time:.3f} s/image):")
    return EvalResult(NAME, metrics_of(summary), artifacts, f"{heading}\n{table}",
                      CertificationRun(results, summary, table, sigma, name))

  return evaluate


def _rows(completed: Mapping[str, Mapping[str, Any]], indices: np.ndarray
          ) -> analysis.CertifyResults:
  """The certified rows of `indices`, in that order, from the run's log."""
  rows = [completed[str(int(i))] for i in indices]
  return analysis.make_results(
      [r["label"] for r in rows], [r["predict"] for r in rows], [r["radius"] for r in rows],
      idx=np.asarray(indices, np.int64), time=np.asarray([r["time"] for r in rows], np.float64))


# ------------------------------------------------------------------- readers


class CertifyRecord(NamedTuple):
  """One certification read back from disk.

  Attributes:
    label: e.g. 'gaussian sigma=0.25' (plus the workdir name when ambiguous).
    objective: the training objective (settings.objective of the JSON).
    sigma: the noise level certified at.
    record: the JSON summary.
    results: the TSV's columns (`analysis.CertifyResults`).
    json_path: where the summary was read from.
  """
  label: str
  objective: str
  sigma: float
  record: dict
  results: analysis.CertifyResults
  json_path: str


def _json_paths(path: str) -> list[str]:
  if path.endswith(".json") and os.path.isfile(path):
    return [path]
  found = sorted(glob.glob(os.path.join(path, SECTION, "*.json")))
  if not found:  # a certify output directory given directly
    found = sorted(glob.glob(os.path.join(path, "*.json")))
  return [p for p in found if os.path.exists(p[:-len(".json")] + ".tsv")]


def _run_dir_name(json_path: str) -> str:
  directory = os.path.dirname(os.path.abspath(json_path))
  if os.path.basename(directory) == SECTION:
    directory = os.path.dirname(directory)
  return os.path.basename(directory)


def read_results(paths: Iterable[str] | str) -> list[CertifyRecord]:
  """Every certification under each path (workdirs, certify/ directories or JSON files).

  Returns:
    The runs, in the order found; paths without results contribute none.
    Labels that would repeat get the workdir's name appended.
  """
  if isinstance(paths, str):
    paths = [paths]
  runs = []
  for path in paths:
    for json_path in _json_paths(path):
      record = files.read_json(json_path)
      settings = record.get("settings", {})
      results = read_tsv(json_path[:-len(".json")] + ".tsv")
      objective = str(settings.get("objective", "?"))
      sigma = float(settings.get("sigma", float("nan")))
      runs.append(CertifyRecord(f"{objective} sigma={sigma:g}", objective, sigma, record,
                                results, json_path))
  labels = [r.label for r in runs]
  return [r._replace(label=f"{r.label} ({_run_dir_name(r.json_path)})")
          if labels.count(r.label) > 1 else r for r in runs]


def certification_rows(runs: Sequence[CertifyRecord],
                       radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> list[dict]:
  """Certified accuracy (%) at `radii`, ACR and the settings: one dict per run."""
  rows = []
  for run in runs:
    res, settings = run.results, run.record.get("settings", {})
    acc = stats.certified_accuracy(res.radius, res.correct, np.asarray(radii))
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
  return rows
