"""Tests of notebooks/_helpers.py: result-file readers, tables, anchors, charts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from certjax.smoothing import analysis  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_helpers():
  spec = importlib.util.spec_from_file_location(
      "notebook_helpers", os.path.join(ROOT, "notebooks", "_helpers.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


helpers = _load_helpers()


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


def test_subprocess_env_puts_the_checkout_first_and_keeps_the_cache(monkeypatch):
  monkeypatch.setenv("PYTHONPATH", "/elsewhere")
  monkeypatch.setenv(helpers.CACHE_ENV, "/cache/dir")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  env = helpers.subprocess_env("/repo")
  assert env["PYTHONPATH"].split(os.pathsep) == ["/repo", "/elsewhere"]
  assert env["JAX_COMPILATION_CACHE_DIR"] == "/cache/dir"


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


def test_smoothing_anchor_is_the_published_mnist_gaussian_baseline():
  (anchor,) = helpers.SMOOTHING_ANCHORS
  assert anchor.sigma == 0.25 and anchor.x == (0.0, 0.25, 0.5, 0.75)
  assert anchor.accuracy == (0.992, 0.985, 0.967, 0.931)
  for text in ("99.2 / 98.5 / 96.7 / 93.1", "N = 100,000", "alpha = 0.001", "full"):
    assert text in anchor.source


def test_anchors_table_has_one_row_per_anchor_with_its_source():
  anchors = helpers.SMOOTHING_ANCHORS + helpers.VERIFY_ANCHORS
  table = helpers.anchors_table(anchors)
  assert len(table) == len(anchors)
  assert table.loc[0, "accuracy %"] == "99.2 / 98.5 / 96.7 / 93.1"
  assert table.loc[1, "accuracy %"] == "97.08" and table.loc[1, "at"] == "L-inf eps 0.1"
  assert list(table["source"]) == [a.source for a in anchors]


# ----------------------------------------------------------------------------
# Certification files (the format run_certification writes).


def _write_certification(workdir, objective, sigma, label, predict, radius, n=500):
  out = os.path.join(workdir, "certify")
  os.makedirs(out, exist_ok=True)
  name = f"sigma{sigma:g}_n050_n{n}_alpha0.001_seed0_step100_test"
  results = analysis.make_results(label, predict, radius, time=0.5)
  analysis.write_tsv(os.path.join(out, name + ".tsv"), results)
  record = {"settings": {"objective": objective, "sigma": sigma, "n0": 50, "n": n,
                         "alpha": 0.001, "model": "mlp"},
            "average_certified_radius": 0.0, "num_examples": len(label)}
  with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump(record, f)
  # Without a TSV beside it a JSON is not a certification run.
  with open(os.path.join(out, "notes.json"), "w") as f:
    json.dump({}, f)


def test_certification_runs_are_read_back_with_their_numbers(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  # 4 images: correct with radii 0.1 and 0.6, wrong with radius 0.9, abstained.
  _write_certification(a, "gaussian", 0.25, [1, 2, 3, 4], [1, 2, 0, -1], [0.1, 0.6, 0.9, 0.0])
  _write_certification(b, "consistency", 0.5, [1, 2], [1, 2], [0.3, 1.2])
  runs = helpers.load_certify_runs([a, b, str(tmp_path / "missing")])
  assert [r.label for r in runs] == ["gaussian sigma=0.25", "consistency sigma=0.5"]
  np.testing.assert_allclose(helpers.certified_accuracy_curve(runs[0].results, [0, 0.25, 1.0]),
                             [0.5, 0.25, 0.0])
  table = helpers.certification_table(runs, radii=(0.0, 0.25), anchors=helpers.SMOOTHING_ANCHORS)
  first = table.iloc[0]
  assert first["r=0"] == 50.0 and first["r=0.25"] == 25.0
  assert first["ACR"] == pytest.approx((0.1 + 0.6) / 4)
  assert first["abstain %"] == 25.0 and first["images"] == 4 and first["n"] == 500
  published = table.iloc[-1]
  assert published["r=0.25"] == pytest.approx(98.5) and math.isnan(published["ACR"])
  fig = helpers.plot_certified_accuracy(runs, helpers.SMOOTHING_ANCHORS)
  assert len(fig.axes) == 2  # one panel per sigma
  assert any(line.get_label().startswith("Gaussian aug., published")
             for line in fig.axes[0].get_lines())


def test_the_same_run_label_twice_gets_the_workdir_name(tmp_path):
  for name in ("run1", "run2"):
    _write_certification(str(tmp_path / name), "gaussian", 0.25, [1], [1], [0.2])
  labels = [r.label for r in helpers.load_certify_runs(
      [str(tmp_path / "run1"), str(tmp_path / "run2")])]
  assert labels == ["gaussian sigma=0.25 (run1)", "gaussian sigma=0.25 (run2)"]


# ----------------------------------------------------------------------------
# Verification files (the format run_verification writes).


def _write_verification(workdir, objective, results, clean=0.9):
  os.makedirs(os.path.join(workdir, "verify"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"objective": {"name": objective}, "model": {"name": "mlp"}}, f)
  summary = {"model": "mlp", "num_images": 100, "clean_accuracy": clean,
             "results": [{"eps": e, "method": m, "verified_accuracy": v, "seconds": 1.0}
                         for e, m, v in results]}
  with open(os.path.join(workdir, "verify", "results.json"), "w") as f:
    json.dump(summary, f)


def test_verification_results_become_one_row_per_method_and_eps(tmp_path):
  _write_verification(str(tmp_path / "ibp"), "ibp",
                      [(0.1, "ibp", 0.5), (0.1, "crown_ibp", 0.6), (0.2, "ibp", 0.2)])
  frame = helpers.load_verify_results([str(tmp_path / "ibp"), str(tmp_path / "none")])
  assert len(frame) == 3
  assert set(frame["run"]) == {"mlp trained with ibp"}
  row = frame[(frame["eps"] == 0.1) & (frame["method"] == "crown_ibp")].iloc[0]
  assert row["verified_accuracy"] == 0.6 and row["clean_accuracy"] == 0.9
  fig = helpers.plot_verified_accuracy(frame, helpers.VERIFY_ANCHORS)
  labels = [line.get_label() for line in fig.axes[0].get_lines()]
  assert "mlp trained with ibp: ibp" in labels and helpers.VERIFY_ANCHORS[0].label in labels


def test_verification_without_results_is_an_empty_frame(tmp_path):
  frame = helpers.load_verify_results([str(tmp_path)])
  assert frame.empty and "verified_accuracy" in frame.columns


# ----------------------------------------------------------------------------
# Benchmark reports.


def _benchmark_names_in_scripts() -> dict[str, str]:
  """The "benchmark" value each script in benchmarks/ writes, read from its source."""
  names = {}
  for script in os.listdir(os.path.join(ROOT, "benchmarks")):
    if not script.endswith(".py") or script in ("__init__.py", "common.py"):
      continue
    with open(os.path.join(ROOT, "benchmarks", script)) as f:
      found = re.findall(r'"benchmark":\s*\n?\s*"([^"]+)"', f.read())
    if found:
      names[script] = found[0]
  return names


def test_every_benchmark_script_writes_a_kind_the_notebook_knows():
  expected = {"train_throughput.py": "training", "attacks.py": "attacks", "bounds.py": "bounds",
              "smoothing.py": "smoothing", "smoothing_peers.py": "smoothing_peers"}
  names = _benchmark_names_in_scripts()
  for script, kind in expected.items():
    assert helpers.benchmark_kind({"benchmark": names[script]}) == kind, script
  assert helpers.benchmark_kind({"benchmark": "something new"}) == "other"


TRAIN = {"benchmark": "train_throughput",
         "environment": {"device_kind": "cpu", "cpu_count": 2, "time": "2026-01-02T03:04:05",
                         "versions": {"jax": "0.10.2"}},
         "results": [{"case": "quickstart_ibp_small", "batch_size": 128,
                      "forward_images_per_s": 4000.0, "forward_backward_images_per_s": 1000.0,
                      "train_step_images_per_s": 900.0, "train_step_vs_forward_backward": 0.9}]}
ATTACKS = {"benchmark": "attacks", "environment": {"device": "cpu", "cpu_count": 2,
                                                   "versions": {"jax": "0.10.2"},
                                                   "time": "2026-01-03T00:00:00"},
           "certjax": {"mlp": {"images_per_s": {"fwd_bwd_x10": 100.0, "pgd10": 95.0,
                                                "apgd10": 80.0},
                               "ratio_to_fwd_bwd_x10": {"pgd10": 0.95, "apgd10": 0.8}}}}
PEERS_ONLY = {"benchmark": "attacks", "environment": {"device": "see peers.device"},
              "peers": {"device": "NVIDIA H100", "mlp": {"images_per_s": {
                  "fwd_bwd_x10": 60.0, "torchattacks_pgd10": 50.0, "art_pgd10": 19.0}}}}
SMOOTHING = {"benchmark": "smoothing.sample_counts vs raw forward", "model": "mlp",
             "batch": 64, "device": {"platform": "cpu", "kind": "cpu", "count": 1},
             "jax": "0.10.2", "forward_images_per_second": 1000.0,
             "smoothing_noisy_forwards_per_second": 800.0, "ratio_smoothing_to_forward": 0.8}


def _reports(tmp_path, named):
  for name, data in named.items():
    with open(tmp_path / name, "w") as f:
      json.dump(data, f)
  return helpers.load_benchmarks({"reference": str(tmp_path)})


def test_missing_directories_and_unreadable_files_are_notes_not_errors(tmp_path):
  (tmp_path / "broken.json").write_text("{not json")
  (tmp_path / "list.json").write_text("[1, 2]")
  reports, notes = helpers.load_benchmarks({"reference": str(tmp_path / "absent"),
                                            "live": str(tmp_path)})
  assert reports == []
  assert len(notes) == 3 and "no directory" in notes[0]
  assert "broken.json" in notes[1] and "list.json" in notes[2]
  note = helpers.missing_note("bounds", "some/dir")
  assert "some/dir" in note and "python -m benchmarks.bounds" in note


def test_environment_is_read_from_every_schema(tmp_path):
  reports, _ = _reports(tmp_path, {"t.json": TRAIN, "p.json": PEERS_ONLY, "s.json": SMOOTHING})
  env = {os.path.basename(r.path): helpers.environment_of(r.data, r.path) for r in reports}
  assert env["t.json"] == {"device": "cpu", "cpu_count": 2, "jax": "0.10.2", "torch": None,
                           "date": "2026-01-02"}
  assert env["p.json"]["device"] == "NVIDIA H100" and env["p.json"]["jax"] is None
  # benchmarks/smoothing.py writes no time stamp: the file's date stands in.
  assert re.fullmatch(r"\d{4}-\d\d-\d\d", env["s.json"]["date"])
  caption = helpers.environment_caption(reports)
  assert caption.startswith("reference: ") and "jax 0.10.2" in caption
  assert "NVIDIA H100" in caption and "2026-01-02 to " in caption
  assert list(helpers.inventory_table(reports)["kind"]) == ["attacks", "smoothing", "training"]


def test_efficiency_summary_collects_every_ratio_to_the_raw_limit(tmp_path):
  reports, _ = _reports(tmp_path, {"t.json": TRAIN, "a.json": ATTACKS, "s.json": SMOOTHING})
  live = [r._replace(source="live") for r in reports if r.kind == "smoothing"]
  frame = helpers.efficiency_summary(reports + live)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got == {("train step", "quickstart_ibp_small"): 0.9, ("pgd10", "mlp"): 0.95,
                 ("apgd10", "mlp"): 0.8, ("smoothing counts", "mlp b64"): 0.8,
                 ("smoothing counts", "mlp b64 (live)"): 0.8}
  fig = helpers.efficiency_chart(frame, "title")
  assert len(fig.axes[0].patches) == len(frame)


def test_efficiency_uses_the_same_options_ratio_and_names_im2col(tmp_path):
  # Newer reports: smoothing's overhead is measured against a forward compiled
  # with the counting loop's options, and im2col runs are labelled apart.
  smoothing = {**SMOOTHING, "conv_impl": "im2col",
               "ratio_smoothing_to_forward": 2.3,
               "ratio_smoothing_to_forward_same_compiler_options": 0.91}
  train = json.loads(json.dumps(TRAIN))
  train["results"].append({**train["results"][0], "conv_impl": "im2col",
                           "train_step_vs_forward_backward": 1.05})
  reports, _ = _reports(tmp_path, {"t.json": train, "s.json": smoothing})
  frame = helpers.efficiency_summary(reports)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got == {("train step", "quickstart_ibp_small"): 0.9,
                 ("train step", "quickstart_ibp_small (im2col)"): 1.05,
                 ("smoothing counts", "mlp (im2col) b64"): 0.91}


def test_peer_speed_up_from_a_separate_peers_only_run(tmp_path):
  reports, _ = _reports(tmp_path, {"a.json": ATTACKS, "p.json": PEERS_ONLY})
  frame = helpers.attack_peer_table(reports)
  got = {row["peer"]: (row["certjax PGD-10 speed-up"], row["from"]) for _, row in frame.iterrows()}
  assert got == {"torchattacks_pgd10": (pytest.approx(95 / 50), "separate runs"),
                 "art_pgd10": (pytest.approx(95 / 19), "separate runs")}


def test_peer_speed_up_of_the_same_run_is_used_as_written(tmp_path):
  same_run = json.loads(json.dumps(ATTACKS))
  same_run["peers"] = {"device": "cpu", "mlp": {
      "images_per_s": {"fwd_bwd_x10": 60.0, "torchattacks_pgd10": 50.0},
      "certjax_pgd10_speedup": {"torchattacks_pgd10": 1.7}}}
  reports, _ = _reports(tmp_path, {"a.json": same_run})
  frame = helpers.attack_peer_table(reports)
  assert list(frame["certjax PGD-10 speed-up"]) == [1.7] and list(frame["from"]) == ["same run"]


def test_bounds_and_smoothing_peer_tables(tmp_path):
  bounds = {"benchmark": "bounds", "results": [{
      "model": "small", "batch": 16, "relative_to_forward": {"forward": 1.0, "ibp": 1.7},
      "seconds": {"forward": 0.001, "ibp": 0.0017}, "memory_bytes": {"ibp": 2**20}}],
            "training_step": {"batch": 16, "relative_to_standard": {"standard": 1.0, "ibp": 1.8},
                              "seconds": {"standard": 0.01, "ibp": 0.018}}}
  peers = {"benchmark": "randomized smoothing CERTIFY: certjax vs ART", "n": 1000,
           "images": 10, "runs": [{"batch_size": 250, "certjax": {"seconds_per_image": 0.1},
                                   "art": {"seconds_per_image": 0.3},
                                   "speedup_certjax_over_art": 3.0}]}
  reports, _ = _reports(tmp_path, {"b.json": bounds, "p.json": peers})
  table = helpers.bounds_table([r for r in reports if r.kind == "bounds"])
  assert list(table["method"]) == ["ibp"] and table.loc[0, "memory MiB"] == 1.0
  steps = helpers.bounds_training_table(reports)
  assert list(steps["objective"]) == ["ibp"]  # the standard baseline is left out
  art = helpers.smoothing_peers_table([r for r in reports if r.kind == "smoothing_peers"])
  assert art.loc[0, "certjax speed-up over ART"] == 3.0


def test_bar_chart_draws_one_labelled_bar_per_row_present():
  import pandas as pd  # pylint: disable=import-outside-toplevel
  frame = pd.DataFrame({"group": ["a", "a", "b"], "kind": ["x", "y", "x"],
                        "value": [1.0, 2.0, np.nan]})
  fig = helpers.bar_chart(frame, category="group", series="kind", value="value", title="t",
                          ylabel="v")
  ax = fig.axes[0]
  assert [p.get_height() for p in ax.patches] == [1.0, 2.0]  # the NaN row is not drawn
  assert [t.get_text() for t in ax.get_xticklabels()] == ["a"]


def test_radius_cap_matches_the_caps_stated_in_the_configs():
  # configs/mnist5k_smoothing.py: sigma * Phi^-1(0.001 ** (1 / 5000)) = 0.749 at sigma 0.25;
  # configs/mnist_smoothing.py: 2.99 sigma at n = 5,000 and 3.8 sigma at n = 100,000.
  assert helpers.radius_cap(0.25, 5_000, 0.001) == pytest.approx(0.749, abs=1e-3)
  assert helpers.radius_cap(1.0, 5_000, 0.001) == pytest.approx(2.99, abs=5e-3)
  assert helpers.radius_cap(1.0, 100_000, 0.001) == pytest.approx(3.8, abs=0.05)


def test_two_runs_of_one_benchmark_stay_apart_in_charts(tmp_path):
  # A 2-core and a 1-core run of benchmarks/attacks.py: bar_chart draws one
  # bar per (category, series), so the file must be part of the category.
  one_core = json.loads(json.dumps(ATTACKS))
  one_core["certjax"]["mlp"]["ratio_to_fwd_bwd_x10"]["pgd10"] = 0.89
  reports, _ = _reports(tmp_path, {"a.json": ATTACKS, "a1.json": one_core})
  frame = helpers.efficiency_summary(reports)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got[("pgd10", "mlp [a.json]")] == 0.95 and got[("pgd10", "mlp [a1.json]")] == 0.89
  table = helpers.attack_table([r for r in reports if r.path.endswith("/a.json")])
  assert list(helpers.label_with_file(table, "model").unique()) == ["mlp"]
