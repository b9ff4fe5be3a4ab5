"""CI executes every notebook in notebooks/ at its smallest scale ('smoke').

Each notebook runs top to bottom in a fresh python3 kernel (nbclient) from its
own directory, as Jupyter would start it; any cell that raises fails the test.
The executed copy goes to pytest's tmp_path, never into the repository. A
cell appended here prints the notebook's `summary` dict as JSON, and the test
checks that its numbers are consistent (e.g. verified <= attacked <= clean)
and that the plots were drawn.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
SUMMARY_MARK = "NOTEBOOK-SUMMARY "
CELL_TIMEOUT_S = 300


def test_the_three_notebooks_exist():
  assert NOTEBOOKS == ["01_tour.ipynb", "02_certified_accuracy.ipynb", "03_throughput.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_valid_and_has_no_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [], f"{name}: a code cell has committed outputs"
    assert cell.execution_count is None, f"{name}: a code cell has an execution count"
  # The first code cell is the configuration: scales chosen by one variable.
  assert "SCALE_SETTINGS" in code[0].source and '"smoke"' in code[0].source
  assert "CERTJAX_NOTEBOOK_SCALE" in code[0].source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_readme_describes_every_notebook(name):
  with open(os.path.join(NOTEBOOK_DIR, "README.md")) as f:
    assert name in f.read()


def _execute(name: str, tmp_path, monkeypatch) -> tuple[nbformat.NotebookNode, dict, float]:
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(
      f"import json as _json\nprint({SUMMARY_MARK!r} + _json.dumps(summary, default=float))"))
  # The kernel inherits this environment: the smallest scale, a scratch
  # workdir, and the test session's persistent compilation cache.
  monkeypatch.delenv("CERTJAX_NOTEBOOK_SCALE", raising=False)
  monkeypatch.delenv("CERTJAX_RESULT_WORKDIRS", raising=False)
  monkeypatch.delenv("CERTJAX_BENCHMARK_RESULTS", raising=False)
  monkeypatch.setenv("CERTJAX_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  start = time.perf_counter()
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": NOTEBOOK_DIR}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(tmp_path / name))  # for inspection; outside the repository
  seconds = time.perf_counter() - start
  print(f"{name}: executed in {seconds:.1f} s (kernel start included)")
  text = _stream_text(nb.cells[-1])
  assert SUMMARY_MARK in text, f"no summary printed by {name}"
  summary = json.loads(text.split(SUMMARY_MARK, 1)[1].strip())
  return nb, summary, seconds


def _stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _all_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.output_type == "stream":
        parts.append(o.text)
      elif "data" in o:
        parts.append(o.data.get("text/plain", ""))
        parts.append(o.data.get("text/html", ""))
  return "\n".join(parts)


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _close(a, b, tol=1e-6):
  return a <= b + tol


def test_01_tour(tmp_path, monkeypatch):
  nb, s, _ = _execute("01_tour.ipynb", tmp_path, monkeypatch)
  # Training curves, adversarial examples, the bounds sandwich, smoothing.
  assert _images(nb) >= 4
  assert s["scale"] == "smoke"
  assert 0.3 < s["clean_accuracy"] <= 1.0  # learned something (chance: 0.1)
  n = len(s["eps_list"])
  assert len(s["robust_accuracy"]) == len(s["verified_ibp"]) == len(s["verified_crown_ibp"]) == n
  for i in range(n):
    # Soundness: a verified digit cannot be broken by an attack, and CROWN-IBP
    # (max with IBP) verifies at least what IBP does.
    assert _close(s["verified_ibp"][i], s["verified_crown_ibp"][i])
    assert _close(s["verified_crown_ibp"][i], s["robust_accuracy"][i])
    assert _close(s["robust_accuracy"][i], s["subset_clean_accuracy"])
  # Interval bounds grow with eps, so IBP verifies fewer digits at larger eps.
  assert all(_close(b, a) for a, b in zip(s["verified_ibp"], s["verified_ibp"][1:]))
  assert s["verified_ibp"][-1] < s["subset_clean_accuracy"]
  cap = s["smoothing_sigma"] * _normal_ppf(0.001 ** (1 / s["smoothing_n"]))
  assert 0.0 <= s["average_certified_radius"] <= cap
  assert 0.0 < s["certified_accuracy_r0"] <= 1.0
  assert 0.0 <= s["abstain_rate"] < 1.0


def test_02_certified_accuracy(tmp_path, monkeypatch):
  nb, s, _ = _execute("02_certified_accuracy.ipynb", tmp_path, monkeypatch)
  # Certified-accuracy curves, the ACR bars, verified accuracy against eps.
  assert _images(nb) >= 3
  runs = s["certify_runs"]
  assert len({r["objective"] for r in runs}) >= 2 and len({r["sigma"] for r in runs}) >= 2
  for r in runs:
    acc = r["certified_accuracy"]
    assert all(0.0 <= a <= 1.0 for a in acc)
    assert all(_close(b, a) for a, b in zip(acc, acc[1:])), f"{r['label']}: not non-increasing"
    assert 0.0 <= r["acr"] < 4 * r["sigma"]
    assert r["images"] >= 10
  # The published anchors are in the table next to ours.
  assert "Gaussian aug., published" in _all_text(nb)
  verify = s["verify"]
  methods = {v["method"] for v in verify}
  assert methods == {"ibp", "crown_ibp"}
  by_key = {(v["run"], v["eps"], v["method"]): v for v in verify}
  for (run, eps, method), v in by_key.items():
    assert _close(v["verified_accuracy"], v["clean_accuracy"])
    if method == "ibp":
      assert _close(v["verified_accuracy"], by_key[(run, eps, "crown_ibp")]["verified_accuracy"])
  assert len({v["run"] for v in verify}) >= 2


def test_03_throughput(tmp_path, monkeypatch):
  nb, s, _ = _execute("03_throughput.ipynb", tmp_path, monkeypatch)
  # The live smoothing measurement was written, read back and drawn.
  assert "smoothing" in s["kinds_found"]
  assert s["live_reports"] == ["smoothing.json"]
  (ratio,) = s["live_smoothing_ratio"]
  assert 0.0 < ratio < 10.0 and math.isfinite(ratio)
  assert any(row["algorithm"] == "smoothing counts" and row["source"] == "live"
             for row in s["efficiency"])
  assert _images(nb) >= 2  # the summary chart and the smoothing chart
  # Every committed reference report carries its kind: all are read, none is a note.
  assert s["notes"] == []
  # Every kind without a report says so instead of failing.
  text = _all_text(nb)
  assert sorted(s["kinds_found"] + s["kinds_missing"]) == sorted(
      ["attacks", "bounds", "many_models", "scaling", "smoothing", "smoothing_peers",
       "training", "transforms"])
  for kind in s["kinds_missing"]:
    label = {"smoothing_peers": "smoothing peers (ART)"}.get(kind, kind)
    assert f"No {label} report" in text


def _normal_ppf(p: float) -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.norm.ppf(p))
