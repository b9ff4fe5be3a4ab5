"""Progress lines with rate and ETA, for training steps and evaluated examples.

    step 120/1000 (12%) | loss 0.31 | 850 img/s | 6.6 step/s | ETA 0:02:13
    certify 40/100 images (40%) | 0.67 s/image | ETA 0:00:40

The rate is measured over the interval since the previous report, so the
compilation of the first call is reported once and then stops distorting the
ETA.
"""

from __future__ import annotations

import datetime
import time
from typing import Mapping


def format_eta(seconds: float) -> str:
  if not seconds >= 0 or seconds == float("inf"):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
  """Counts `total` units (training steps, or examples) and formats progress lines.

  Args:
    total: number of units of the whole loop.
    start: units already done (a resumed run).
    unit: what is counted ('step', 'image', ...).
    images_per_unit: images per unit for the img/s figure of training steps
      (the global batch size); None for loops over examples.
    label: prefix of the line (default: the unit, e.g. 'step').
    min_interval_s: `due()` is True at most this often (and at the end).
  """

  def __init__(self, total: int, batch_size: int | None = None, start_step: int = 0, *,
               unit: str = "step", label: str | None = None, min_interval_s: float = 0.0):
    self.total = int(total)
    self.images_per_unit = batch_size
    self.unit = unit
    self.label = label if label is not None else unit
    self.min_interval_s = float(min_interval_s)
    self._last_done = int(start_step)
    self._last_time = time.perf_counter()
    self._last_report = float("-inf")

  def due(self, done: int) -> bool:
    """Whether a line should be printed now: at the end, or min_interval_s after the last."""
    now = time.perf_counter()
    if done >= self.total or now - self._last_report >= self.min_interval_s:
      self._last_report = now
      return True
    return False

  def update(self, done: int) -> dict[str, float]:
    """Rates over the interval since the previous update."""
    now = time.perf_counter()
    elapsed = max(now - self._last_time, 1e-9)
    per_s = (done - self._last_done) / elapsed
    self._last_done, self._last_time = done, now
    rates = {f"{self.unit}s_per_s": per_s}
    if self.images_per_unit is not None:
      rates["images_per_s"] = per_s * self.images_per_unit
    return rates

  def line(self, done: int, rates: Mapping[str, float],
           metrics: Mapping[str, float] | None = None) -> str:
    per_s = rates[f"{self.unit}s_per_s"]
    remaining = self.total - done
    eta = format_eta(remaining / per_s) if per_s > 0 else "?"
    pct = 100.0 * done / max(self.total, 1)
    parts = [f"{self.label} {done}/{self.total}"
             + ("" if self.unit == "step" else f" {self.unit}s") + f" ({pct:.0f}%)"]
    if metrics:
      parts.append(" | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if self.images_per_unit is not None:
      parts.append(f"{rates['images_per_s']:.0f} img/s")
      parts.append(f"{per_s:.2f} {self.unit}/s")
    elif 0 < per_s < 1:
      parts.append(f"{1.0 / per_s:.3g} s/{self.unit}")
    else:
      parts.append(f"{per_s:.3g} {self.unit}/s")
    parts.append(f"ETA {eta}")
    return " | ".join(parts)
