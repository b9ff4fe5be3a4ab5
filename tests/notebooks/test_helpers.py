"""Tests of notebooks/_helpers.py: set-up, the published anchors, the table wrappers.

The readers and plots the notebooks call now live in certjax (tested under
tests/evaluation/) and benchmarks/reports.py (tests/benchmarks/test_reports.py);
here they are exercised only through the wrappers and anchors the notebooks
hand them.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")

import pytest  # pylint: disable=g-import-not-at-top

from certjax import smoothing  # pylint: disable=g-import-not-at-top
from certjax.evaluation import certified, plots  # pylint: disable=g-import-not-at-top
from certjax.smoothing import analysis  # pylint: disable=g-import-not-at-top
from tests._load import load_file  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


helpers = load_file(os.path.join("notebooks", "_helpers.py"), "notebook_helpers")


# ----------------------------------------------------------------------------
# Set-up.


def test_repo_root_from_the_notebooks_directory_and_below(tmp_path):
  assert helpers.repo_root(os.path.join(ROOT, "notebooks")) == ROOT
  assert helpers.repo_root(os.path.join(ROOT, "certjax", "smoothing")) == ROOT
  with pytest.raises(FileNotFoundError, match="certjax/ and configs/"):
    helpers.repo_root(str(tmp_path))


def test_select_scale_defaults_to_smoke_and_names_the_accepted(monkeypatch):
  settings = {"smoke": {"a": 1}, "small": {"a": 2}}
  monkeypatch.delenv(helpers.SCALE_ENV, raising=False)
  assert helpers.select_scale(settings) == ("smoke", {"a": 1})
  monkeypatch.setenv(helpers.SCALE_ENV, "small")
  assert helpers.select_scale(settings) == ("small", {"a": 2})
  with pytest.raises(ValueError, match="'huge'.*accepted: smoke, small"):
    helpers.select_scale(settings, "huge")


def test_add_root_to_path_puts_the_checkout_first_once(monkeypatch):
  monkeypatch.setattr(sys, "path", ["/elsewhere"])
  helpers.add_root_to_path("/repo")
  helpers.add_root_to_path("/repo")
  assert sys.path == ["/repo", "/elsewhere"]


def test_importing_the_helpers_imports_no_jax():
  # The notebook imports _helpers before putting the checkout on sys.path and
  # turning on the compilation cache: it must not pull in certjax (or JAX).
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ("import sys; sys.path.insert(0, 'notebooks'); import _helpers; "
          "print(sorted(m for m in ('jax', 'certjax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------
# Anchors: the published numbers must be the ones their sources state.


def test_verify_anchors_are_the_figures_quoted_in_the_config_docstrings():
  from configs import mnist_crown_ibp, mnist_ibp  # pylint: disable=import-outside-toplevel
  docs = {"configs/mnist_ibp.py": mnist_ibp.__doc__,
          "configs/mnist_crown_ibp.py": mnist_crown_ibp.__doc__}
  for anchor in helpers.VERIFY_ANCHORS:
    path, quote = anchor.source.split(": ", 1)
    quote = quote.strip("'")
    assert " ".join(quote.split()) in " ".join(docs[path].split()), anchor.label
    (error,) = re.findall(r"(\d+\.\d+)% (?:at eps|IBP-verified)", quote)
    (eps,) = anchor.x
    assert f"eps {eps:g}" in quote
    assert anchor.accuracy == pytest.approx((1 - float(error) / 100,))


def _stated(source: str) -> dict:
  """What a smoothing anchor's citation states: sigma, accuracies, radii, settings."""
  figures = re.search(r"at sigma ([\d.]+): ([\d. /]+?) % certified at L2 radius ([\d. /]+),",
                      source)
  assert figures, f"no 'at sigma S: A / B % certified at L2 radius R / S,' in {source!r}"
  sigma, accuracy, radii = figures.groups()
  numbers = {key: re.search(pattern, source) for key, pattern in (
      ("images", r"full ([\d,]+)-image test set"), ("n", r"N = ([\d,]+)"),
      ("alpha", r"alpha = ([\d.]*\d)"))}
  assert all(numbers.values()), f"settings missing from {source!r}"
  return {"sigma": float(sigma),
          "accuracy": tuple(float(a) / 100 for a in accuracy.split(" / ")),
          "x": tuple(float(r) for r in radii.split(" / ")),
          "settings": {k: float(m.group(1).replace(",", "")) for k, m in numbers.items()}}


def test_smoothing_anchors_draw_the_figures_their_sources_state():
  # The curve, its panel (sigma) and the table's columns are read back from
  # the citation text: editing one without the other fails here.
  assert helpers.SMOOTHING_ANCHORS
  for anchor in helpers.SMOOTHING_ANCHORS:
    stated = _stated(anchor.source)
    assert anchor.kind == "smoothing"
    assert anchor.sigma == stated["sigma"]
    assert anchor.x == pytest.approx(stated["x"])
    assert anchor.accuracy == pytest.approx(stated["accuracy"])
    assert {k: float(v) for k, v in anchor.settings.items()} == stated["settings"]
    assert anchor.reference == plots.Reference(anchor.label, anchor.x, anchor.accuracy,
                                               anchor.sigma)


def test_the_source_check_catches_a_drawn_figure_that_drifted():
  (anchor,) = helpers.SMOOTHING_ANCHORS
  drifted = anchor._replace(source=anchor.source.replace("96.7", "97.6"))
  assert drifted.accuracy != pytest.approx(_stated(drifted.source)["accuracy"])


def test_anchors_table_has_one_row_per_anchor_with_its_source():
  anchors = helpers.SMOOTHING_ANCHORS + helpers.VERIFY_ANCHORS
  table = helpers.anchors_table(anchors)
  assert len(table) == len(anchors)
  assert table.loc[0, "accuracy %"] == "99.2 / 98.5 / 96.7 / 93.1"
  assert table.loc[0, "at"] == "L2 radius 0 / 0.25 / 0.5 / 0.75"
  assert table.loc[1, "accuracy %"] == "97.08" and table.loc[1, "at"] == "L-inf eps 0.1"
  assert list(table["source"]) == [a.source for a in anchors]


# ----------------------------------------------------------------------------
# The table wrappers, on files in the format the evaluators write.


def _write_certification(workdir, objective, sigma, label, predict, radius, n=500):
  out = os.path.join(workdir, "certify")
  os.makedirs(out, exist_ok=True)
  name = f"sigma{sigma:g}_n050_n{n}_alpha0.001_seed0_step100_test"
  certified.write_tsv(os.path.join(out, name + ".tsv"),
                      analysis.make_results(label, predict, radius, time=0.5))
  record = {"settings": {"objective": objective, "sigma": sigma, "n0": 50, "n": n,
                         "alpha": 0.001, "model": "mlp"}}
  with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(record, f)


def test_certification_table_puts_the_published_rows_under_ours(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  # 4 images: correct with radii 0.1 and 0.6, wrong with radius 0.9, abstained.
  _write_certification(a, "gaussian", 0.25, [1, 2, 3, 4], [1, 2, 0, -1], [0.1, 0.6, 0.9, 0.0])
  _write_certification(b, "consistency", 0.5, [1, 2], [1, 2], [0.3, 1.2])
  runs = certified.read_results([a, b])
  table = helpers.certification_table(runs, radii=(0.0, 0.25), anchors=helpers.SMOOTHING_ANCHORS)
  assert list(table["run"]) == ["gaussian sigma=0.25", "consistency sigma=0.5",
                                helpers.SMOOTHING_ANCHORS[0].label]
  first = table.iloc[0]
  assert first["r=0"] == 50.0 and first["r=0.25"] == 25.0
  assert first["ACR"] == pytest.approx((0.1 + 0.6) / 4)
  assert first["abstain %"] == 25.0 and first["images"] == 4 and first["n"] == 500
  published = table.iloc[-1]
  assert published["r=0.25"] == pytest.approx(98.5) and math.isnan(published["ACR"])
  assert published["images"] == 10_000 and published["n"] == 100_000
  assert published["source"] == helpers.SMOOTHING_ANCHORS[0].source
  # A radius the publication does not state is left empty, not zero.
  wider = helpers.certification_table([], radii=(0.25, 1.0), anchors=helpers.SMOOTHING_ANCHORS)
  assert math.isnan(wider.loc[0, "r=1"])
  # The anchors' references go to the library's panels, one per sigma.
  fig = plots.certified_accuracy_panels(runs, helpers.references(helpers.SMOOTHING_ANCHORS))
  assert len(fig.axes) == 2
  assert any(line.get_label() == helpers.SMOOTHING_ANCHORS[0].label
             for line in fig.axes[0].get_lines())


def _write_verification(workdir, objective, results, clean=0.9):
  os.makedirs(os.path.join(workdir, "verify"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"objective": {"name": objective}, "model": {"name": "mlp"}}, f)
  summary = {"model": "mlp", "num_images": 100, "clean_accuracy": clean,
             "results": [{"eps": e, "method": m, "verified_accuracy": v, "seconds": 1.0}
                         for e, m, v in results]}
  with open(os.path.join(workdir, "verify", "results.json"), "w") as f:
    json.dump(summary, f)


def test_verification_frame_has_one_row_per_method_and_eps(tmp_path):
  _write_verification(str(tmp_path / "ibp"), "ibp",
                      [(0.1, "ibp", 0.5), (0.1, "crown_ibp", 0.6), (0.2, "ibp", 0.2)])
  frame = helpers.verification_frame([str(tmp_path / "ibp"), str(tmp_path / "none")])
  assert len(frame) == 3 and list(frame.columns) == list(helpers.VERIFY_COLUMNS)
  assert set(frame["run"]) == {"mlp trained with ibp"}
  row = frame[(frame["eps"] == 0.1) & (frame["method"] == "crown_ibp")].iloc[0]
  assert row["verified_accuracy"] == 0.6 and row["clean_accuracy"] == 0.9
  fig = plots.verified_accuracy_comparison(frame.to_dict("records"),
                                           helpers.references(helpers.VERIFY_ANCHORS))
  labels = [line.get_label() for line in fig.axes[0].get_lines()]
  assert "mlp trained with ibp: ibp" in labels and helpers.VERIFY_ANCHORS[0].label in labels


def test_verification_frame_without_results_is_empty_with_its_columns(tmp_path):
  frame = helpers.verification_frame([str(tmp_path)])
  assert frame.empty and "verified_accuracy" in frame.columns


def test_the_radius_cap_the_notebooks_draw_matches_the_caps_stated_in_the_configs():
  # configs/mnist5k_smoothing.py: sigma * Phi^-1(0.001 ** (1 / 5000)) = 0.748 at sigma 0.25;
  # configs/mnist_smoothing.py: 2.99 sigma at n = 5,000 and 3.8 sigma at n = 100,000.
  assert smoothing.max_certifiable_radius(0.25, 5_000, 0.001) == pytest.approx(0.748, abs=2e-3)
  assert smoothing.max_certifiable_radius(1.0, 5_000, 0.001) == pytest.approx(2.99, abs=5e-3)
  assert smoothing.max_certifiable_radius(1.0, 100_000, 0.001) == pytest.approx(3.8, abs=0.05)
