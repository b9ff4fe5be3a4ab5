"""Metric writers: JSON lines plus TensorBoard, written by process 0, never duplicated.

Each line of `<workdir>/metrics.jsonl` is one JSON object
`{"step": int, "split": "train"|"eval"|"evals/<name>", "time": unix seconds, <name>: float}`.

A resumed run continues from its newest checkpoint, so whatever a killed run
logged after that checkpoint is logged again. `MetricWriter(resume_step=s)`
therefore drops the records of steps after `s` from metrics.jsonl (rewritten
atomically) and opens TensorBoard with `purge_step=s + 1`, which hides the
killed run's events from those steps on; and it never writes a second record
for a (step, split) pair the file already holds (a finished run started
again re-runs its final evaluation). So every logged step appears exactly
once, with the values of the run that continued.
"""

from __future__ import annotations

import os
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging

from certjax.runs import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard; process 0 only.

  Args:
    workdir: the run's workdir.
    enabled: write (default: on process 0 only).
    resume_step: the step the run starts from (its newest checkpoint; 0 for
      a fresh run): records of later steps are dropped (see the module doc).
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._path = os.path.join(workdir, METRICS_FILE)
    self._logged: set[tuple[int, str]] = set()
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    records = files.read_jsonl(self._path)
    kept = [r for r in records if int(r.get("step", 0)) <= resume_step]
    if len(kept) != len(records) or (records and not _ends_with_newline(self._path)):
      files.rewrite_jsonl(self._path, kept)
      if len(kept) != len(records):
        logging.info("Dropped %d metric records after step %d logged by an interrupted run; "
                     "the resumed run logs those steps again.", len(records) - len(kept),
                     resume_step)
    self._logged = {(int(r["step"]), str(r.get("split"))) for r in kept}
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      purge = {"purge_step": resume_step + 1} if records else {}
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), **purge)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard event files.")

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    if (int(step), split) in self._logged:
      logging.info("Metrics of step %d (%s) were logged by an earlier run; not logging them "
                   "twice.", step, split)
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, "time": time.time(), **values}
    files.append_jsonl(self._path, [record])
    self._logged.add((int(step), split))
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(workdir: str) -> list[dict]:
  """All records of a workdir's metrics.jsonl, in order."""
  return files.read_jsonl(os.path.join(workdir, METRICS_FILE))


def mean_metrics(history: list[Mapping[str, jax.Array]]) -> dict[str, float]:
  """Averages a list of per-step metric dicts (fetched from device once)."""
  if not history:
    return {}
  fetched = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0]}


def log_training_interval(writer: MetricWriter, progress, step: int, history: list,
                          learning_rate: float, worst_loss_key: str = "loss") -> None:
  """Averages and logs the metrics of one logging interval (a line, metrics.jsonl, TensorBoard).

  Args:
    writer: the run's `MetricWriter`.
    progress: the run's `runs.Progress`.
    step: the step just taken.
    history: the interval's per-step metric dicts (device arrays), consumed.
    learning_rate: the schedule's rate at this step.
    worst_loss_key: the metric whose non-finite value stops the run ('loss';
      the many-models trainer passes its worst model's loss).

  Raises:
    FloatingPointError: a NaN/Inf loss; the caller writes no checkpoint.
  """
  train_metrics = mean_metrics(history)
  if not np.isfinite(train_metrics[worst_loss_key]):
    raise FloatingPointError(
        f"Training {worst_loss_key.replace('_', ' ')} is {train_metrics[worst_loss_key]} at "
        f"step {step}; stopping without writing a checkpoint (existing ones are kept). Lower "
        "optimizer.learning_rate or set optimizer.grad_clip_norm.")
  train_metrics["learning_rate"] = float(learning_rate)
  rates = progress.update(step)
  writer.write(step, "train", {**train_metrics, **rates})
  logging.info("%s", progress.line(step, rates, {
      "loss": train_metrics["loss"], "acc": train_metrics.get("accuracy", np.nan)}))
