"""Certification results as columns, their summary (certified accuracy, ACR) and tables.

`CertifyResults` holds the columns of Cohen et al.'s certification TSV
(`idx label predict radius correct time`, one row per example); the TSV
files themselves are read and written by the 'certified' evaluator
(`certjax.evaluation.certified.read_tsv` / `write_tsv`), plots are drawn by
`certjax.evaluation.plots`.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (locuslab/smoothing `code/certify.py`,
  `code/analyze.py`).
  Zhai et al., "MACER", ICLR 2020 (average certified radius).
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from certjax.smoothing import stats


class CertifyResults(NamedTuple):
  """Columns of a certification TSV, as NumPy arrays of equal length."""
  idx: np.ndarray  # int64
  label: np.ndarray  # int64
  predict: np.ndarray  # int64, -1 = abstain
  radius: np.ndarray  # float64
  correct: np.ndarray  # bool
  time: np.ndarray  # float64 seconds


def make_results(label, predict, radius, *, idx=None, time=None) -> CertifyResults:
  """Builds `CertifyResults` from predictions (e.g. a `Certificate`) and labels.

  Args:
    label: [N] integer labels.
    predict: [N] predictions, -1 for abstention.
    radius: [N] certified radii.
    idx: [N] example indices (default 0..N-1).
    time: [N] seconds spent per example, or a scalar applied to every row
      (default 0).

  Returns:
    `CertifyResults` with `correct = predict == label`.
  """
  label = np.asarray(label, dtype=np.int64).reshape(-1)
  predict = np.asarray(predict, dtype=np.int64).reshape(-1)
  radius = np.asarray(radius, dtype=np.float64).reshape(-1)
  n = label.shape[0]
  idx = np.arange(n, dtype=np.int64) if idx is None else np.asarray(idx, np.int64).reshape(-1)
  time = np.broadcast_to(np.asarray(0.0 if time is None else time, np.float64), (n,)).copy()
  for name, column in (("predict", predict), ("radius", radius), ("idx", idx)):
    if column.shape[0] != n:
      raise ValueError(f"{name} has {column.shape[0]} entries but label has {n}; they must match.")
  if np.any(radius < 0) or not np.all(np.isfinite(radius)):
    raise ValueError("radius must hold finite values >= 0.")
  return CertifyResults(idx, label, predict, radius, predict == label, time)


def default_thresholds(results: CertifyResults, step: float = 0.25) -> np.ndarray:
  """Radii 0, step, 2 step, ... through the first multiple of step >= every radius (>= 1)."""
  top = max(1.0, math.ceil(float(results.radius.max(initial=0.0)) / step) * step)
  return np.arange(0.0, top + 1e-9, step)


class Summary(NamedTuple):
  thresholds: np.ndarray
  certified_accuracy: np.ndarray
  average_certified_radius: float
  abstain_rate: float
  num_examples: int
  mean_time: float


def summarize(results: CertifyResults, thresholds: Sequence[float] | None = None) -> Summary:
  """Certified accuracy at each radius threshold, ACR, abstention rate."""
  if results.radius.size == 0:
    raise ValueError("cannot summarise an empty result set.")
  thresholds = default_thresholds(results) if thresholds is None else np.asarray(
      thresholds, dtype=np.float64)
  return Summary(
      thresholds=thresholds,
      certified_accuracy=stats.certified_accuracy(results.radius, results.correct, thresholds),
      average_certified_radius=stats.average_certified_radius(results.radius, results.correct),
      abstain_rate=float(np.mean(results.predict == stats.ABSTAIN)),
      num_examples=int(results.radius.size),
      mean_time=float(np.mean(results.time)))


def format_summary(summaries: Mapping[str, Summary] | Summary) -> str:
  """A Markdown table: one row per run, one column per radius, then ACR.

  All summaries must share the same thresholds.
  """
  if isinstance(summaries, Summary):
    summaries = {"": summaries}
  if not summaries:
    raise ValueError("format_summary needs at least one summary.")
  first = next(iter(summaries.values()))
  for name, summary in summaries.items():
    if not np.array_equal(summary.thresholds, first.thresholds):
      raise ValueError(f"summary {name!r} uses different thresholds; pass the same to summarize.")
  head = ["run"] + [f"r={t:g}" for t in first.thresholds] + ["ACR", "abstain", "n"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, s in summaries.items():
    cells = ([name or "-"] + [f"{a:.3f}" for a in s.certified_accuracy]
             + [f"{s.average_certified_radius:.3f}", f"{s.abstain_rate:.3f}", str(s.num_examples)])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
