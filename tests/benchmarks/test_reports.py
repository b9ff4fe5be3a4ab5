"""Tests of benchmarks/reports.py (reading reports back) and of the `kind` every report carries."""

from __future__ import annotations

import json
import os
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # pylint: disable=g-import-not-at-top
import pandas as pd  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from benchmarks import reports  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_DIR = os.path.join(ROOT, "benchmarks", "reference", "cpu-2core")
# Which kind each script writes (and the scripts that write no report).
SCRIPT_KINDS = {"train_throughput.py": "training", "attacks.py": "attacks",
                "bounds.py": "bounds", "smoothing.py": "smoothing",
                "smoothing_peers.py": "smoothing_peers", "scaling.py": "scaling",
                "many_models.py": "many_models", "cw.py": "attacks",
                "transforms.py": "transforms", "neural_cleanse.py": "attacks",
                "poison_crafting.py": "attacks"}
# accelerator_suite.py writes reports of four kinds (checked by
# test_accelerator_suite.py); accelerator_wheels.py writes none.
NOT_SCRIPTS = {"__init__.py", "common.py", "reports.py", "accelerator_suite.py",
               "accelerator_wheels.py"}


# ----------------------------------------------------------------------------
# The `kind` key: written by every script, present in every committed report.


def test_every_script_builds_its_report_with_its_kind():
  scripts = sorted(p for p in os.listdir(os.path.join(ROOT, "benchmarks"))
                   if p.endswith(".py") and p not in NOT_SCRIPTS)
  assert scripts == sorted(SCRIPT_KINDS), "a new benchmark script: give it a kind"
  assert set(SCRIPT_KINDS.values()) == set(common.KINDS)
  for script, kind in SCRIPT_KINDS.items():
    with open(os.path.join(ROOT, "benchmarks", script)) as f:
      source = f.read()
    # The literal next to the report's "benchmark" title, where the dict is built.
    written = re.findall(r'"benchmark":[^\n]*\n?[^\n]*?"kind":\s*"(\w+)"', source)
    # A script may build several reports (attacks.py: --autoattack), all of its kind.
    assert written and set(written) == {kind}, (
        f"{script}: reports built with kinds {written}, expected {kind!r}")


def test_write_report_refuses_a_report_without_a_known_kind(tmp_path):
  with pytest.raises(ValueError, match="'kind' of training, attacks"):
    common.write_report(str(tmp_path / "r.json"), {"benchmark": "x"})
  with pytest.raises(ValueError, match="got 'trainig'"):
    common.write_report(str(tmp_path / "r.json"), {"kind": "trainig"})
  assert not (tmp_path / "r.json").exists()
  common.write_report(str(tmp_path / "r.json"), {"kind": "bounds", "b": 1, "a": 2})
  written = json.loads((tmp_path / "r.json").read_text())
  # Keys sorted; a report without a time stamp is dated when written.
  assert list(written) == ["a", "b", "kind", "time"]
  assert written["time"][:4].isdigit() and "T" in written["time"]
  common.write_report(str(tmp_path / "r.json"), {"kind": "bounds", "time": "2026-11-22"})
  assert json.loads((tmp_path / "r.json").read_text())["time"] == "2026-11-22"


def test_every_committed_reference_report_is_read_by_its_kind():
  found, notes = reports.load_benchmarks({"reference": REFERENCE_DIR})
  assert notes == []
  kinds = {os.path.basename(r.path): r.kind for r in found}
  assert kinds == {
      "attacks_peers.json": "attacks", "attacks_peers_1core.json": "attacks",
      "bounds.json": "bounds", "scaling.json": "scaling",
      "smoothing_cnn.json": "smoothing", "smoothing_ibp_small.json": "smoothing",
      "smoothing_mlp.json": "smoothing", "smoothing_resnet110.json": "smoothing",
      "smoothing_peers_omp_passive.json": "smoothing_peers",
      "smoothing_peers_torch_default.json": "smoothing_peers",
      "train_throughput.json": "training", "many_models.json": "many_models",
      "cw.json": "attacks", "cw_peers.json": "attacks", "transforms.json": "transforms",
      "neural_cleanse.json": "attacks", "poison_crafting.json": "attacks"}
  # Every kind has a reference report, so notebook 03 draws every chart.
  assert all(reports.by_kind(found).values())


# ----------------------------------------------------------------------------
# Reading.


TRAIN = {"benchmark": "train_throughput", "kind": "training",
         "environment": {"device_kind": "cpu", "cpu_count": 2, "time": "2026-01-02T03:04:05",
                         "versions": {"jax": "0.10.2"}},
         "results": [{"case": "quickstart_ibp_small", "batch_size": 128,
                      "forward_images_per_s": 4000.0, "forward_backward_images_per_s": 1000.0,
                      "train_step_images_per_s": 900.0, "train_step_vs_forward_backward": 0.9}]}
ATTACKS = {"benchmark": "attacks", "kind": "attacks",
           "environment": {"device": "cpu", "cpu_count": 2, "versions": {"jax": "0.10.2"},
                           "time": "2026-01-03T00:00:00"},
           "certjax": {"mlp": {"images_per_s": {"fwd_bwd_x10": 100.0, "pgd10": 95.0,
                                                "apgd10": 80.0},
                               "ratio_to_fwd_bwd_x10": {"pgd10": 0.95, "apgd10": 0.8}}}}
PEERS_ONLY = {"benchmark": "attacks", "kind": "attacks",
              "environment": {"device": "see peers.device"},
              "peers": {"device": "NVIDIA H100", "mlp": {"images_per_s": {
                  "fwd_bwd_x10": 60.0, "torchattacks_pgd10": 50.0, "art_pgd10": 19.0}}}}
SMOOTHING = {"benchmark": "smoothing.sample_counts vs raw forward", "kind": "smoothing",
             "model": "mlp", "batch": 64, "device": {"platform": "cpu", "kind": "cpu", "count": 1},
             "jax": "0.10.2", "forward_images_per_second": 1000.0,
             "smoothing_noisy_forwards_per_second": 800.0, "ratio_smoothing_to_forward": 0.8}


def _reports(tmp_path, named):
  for name, data in named.items():
    with open(tmp_path / name, "w") as f:
      json.dump(data, f)
  return reports.load_benchmarks({"reference": str(tmp_path)})


def test_missing_directories_and_unreadable_files_are_notes_not_errors(tmp_path):
  (tmp_path / "broken.json").write_text("{not json")
  (tmp_path / "list.json").write_text("[1, 2]")
  found, notes = reports.load_benchmarks({"reference": str(tmp_path / "absent"),
                                          "live": str(tmp_path)})
  assert found == []
  assert len(notes) == 3 and "no directory" in notes[0]
  assert "broken.json" in notes[1] and "list.json" in notes[2]
  note = reports.missing_note("bounds", "some/dir")
  assert "some/dir" in note and "python -m benchmarks.bounds" in note


def test_a_report_without_a_kind_is_a_note_never_a_guess(tmp_path):
  # The old title alone ("train_throughput") once sufficed; now it must not.
  untagged = {k: v for k, v in TRAIN.items() if k != "kind"}
  found, notes = _reports(tmp_path, {"old.json": untagged, "new.json": {**TRAIN, "kind": "gpu"},
                                     "ok.json": TRAIN})
  assert [os.path.basename(r.path) for r in found] == ["ok.json"]
  assert len(notes) == 2
  new_note, old_note = notes  # in file-name order
  assert "new.json" in new_note and "unknown kind 'gpu'" in new_note
  assert "old.json" in old_note and "no 'kind' key" in old_note
  assert "'train_throughput'" in old_note and "one of training, attacks" in old_note


def test_environment_is_read_from_every_schema(tmp_path):
  found, _ = _reports(tmp_path, {"t.json": TRAIN, "p.json": PEERS_ONLY, "s.json": SMOOTHING})
  env = {os.path.basename(r.path): reports.environment_of(r.data, r.path) for r in found}
  assert env["t.json"] == {"device": "cpu", "cpu_count": 2, "jax": "0.10.2", "torch": None,
                           "date": "2026-01-02"}
  assert env["p.json"]["device"] == "NVIDIA H100" and env["p.json"]["jax"] is None
  # benchmarks/smoothing.py writes no time stamp: the file's date stands in.
  assert re.fullmatch(r"\d{4}-\d\d-\d\d", env["s.json"]["date"])
  caption = reports.environment_caption(found)
  assert caption.startswith("reference: ") and "jax 0.10.2" in caption
  assert "NVIDIA H100" in caption and "2026-01-02 to " in caption
  assert list(reports.inventory_table(found)["kind"]) == ["attacks", "smoothing", "training"]


def test_efficiency_summary_collects_every_ratio_to_the_raw_limit(tmp_path):
  found, _ = _reports(tmp_path, {"t.json": TRAIN, "a.json": ATTACKS, "s.json": SMOOTHING})
  live = [r._replace(source="live") for r in found if r.kind == "smoothing"]
  frame = reports.efficiency_summary(found + live)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got == {("train step", "quickstart_ibp_small"): 0.9, ("pgd10", "mlp"): 0.95,
                 ("apgd10", "mlp"): 0.8, ("smoothing counts", "mlp b64"): 0.8,
                 ("smoothing counts", "mlp b64 (live)"): 0.8}
  fig = reports.efficiency_chart(frame, "title")
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
  found, _ = _reports(tmp_path, {"t.json": train, "s.json": smoothing})
  frame = reports.efficiency_summary(found)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got == {("train step", "quickstart_ibp_small"): 0.9,
                 ("train step", "quickstart_ibp_small (im2col)"): 1.05,
                 ("smoothing counts", "mlp (im2col) b64"): 0.91}


def test_peer_speed_up_from_a_separate_peers_only_run(tmp_path):
  found, _ = _reports(tmp_path, {"a.json": ATTACKS, "p.json": PEERS_ONLY})
  frame = reports.attack_peer_table(found)
  got = {row["peer"]: (row["certjax PGD-10 speed-up"], row["from"]) for _, row in frame.iterrows()}
  assert got == {"torchattacks_pgd10": (pytest.approx(95 / 50), "separate runs"),
                 "art_pgd10": (pytest.approx(95 / 19), "separate runs")}


def test_peer_speed_up_of_the_same_run_is_used_as_written(tmp_path):
  same_run = json.loads(json.dumps(ATTACKS))
  same_run["peers"] = {"device": "cpu", "mlp": {
      "images_per_s": {"fwd_bwd_x10": 60.0, "torchattacks_pgd10": 50.0},
      "certjax_pgd10_speedup": {"torchattacks_pgd10": 1.7}}}
  found, _ = _reports(tmp_path, {"a.json": same_run})
  frame = reports.attack_peer_table(found)
  assert list(frame["certjax PGD-10 speed-up"]) == [1.7] and list(frame["from"]) == ["same run"]


def test_bounds_and_smoothing_peer_tables(tmp_path):
  bounds = {"benchmark": "bounds", "kind": "bounds", "results": [{
      "model": "small", "batch": 16, "relative_to_forward": {"forward": 1.0, "ibp": 1.7},
      "seconds": {"forward": 0.001, "ibp": 0.0017}, "memory_bytes": {"ibp": 2**20}}],
            "training_step": {"batch": 16, "relative_to_standard": {"standard": 1.0, "ibp": 1.8},
                              "seconds": {"standard": 0.01, "ibp": 0.018}}}
  peers = {"benchmark": "randomized smoothing CERTIFY: certjax vs ART", "kind": "smoothing_peers",
           "n": 1000, "images": 10,
           "runs": [{"batch_size": 250, "certjax": {"seconds_per_image": 0.1},
                     "art": {"seconds_per_image": 0.3}, "speedup_certjax_over_art": 3.0}]}
  found, _ = _reports(tmp_path, {"b.json": bounds, "p.json": peers})
  kinds = reports.by_kind(found)
  assert set(kinds) == set(common.KINDS) and not kinds["training"]
  table = reports.bounds_table(kinds["bounds"])
  assert list(table["method"]) == ["ibp"] and table.loc[0, "memory MiB"] == 1.0
  steps = reports.bounds_training_table(found)
  assert list(steps["objective"]) == ["ibp"]  # the standard baseline is left out
  art = reports.smoothing_peers_table(kinds["smoothing_peers"])
  assert art.loc[0, "certjax speed-up over ART"] == 3.0


def test_scaling_table_from_the_reference_report():
  (scaling,) = reports.by_kind(reports.load_benchmarks({"reference": REFERENCE_DIR})[0])[
      "scaling"]
  table = reports.scaling_table([scaling])
  assert list(table["devices"]) == [r["devices"] for r in scaling.data["results"]]
  first = table.iloc[0]
  assert first["train step img/s x baseline"] == 1.0  # the fewest devices, by definition
  assert first["certify draws/s"] == scaling.data["results"][0]["certification_draws_per_s"]
  assert table["source"].unique().tolist() == ["reference"]


def test_bar_chart_draws_one_labelled_bar_per_row_present():
  frame = pd.DataFrame({"group": ["a", "a", "b"], "kind": ["x", "y", "x"],
                        "value": [1.0, 2.0, np.nan]})
  fig = reports.bar_chart(frame, category="group", series="kind", value="value", title="t",
                          ylabel="v")
  ax = fig.axes[0]
  assert [p.get_height() for p in ax.patches] == [1.0, 2.0]  # the NaN row is not drawn
  assert [t.get_text() for t in ax.get_xticklabels()] == ["a"]
  # A bare Figure, which pyplot does not manage (nor show twice in a notebook).
  assert fig.canvas.manager is None


def test_two_runs_of_one_benchmark_stay_apart_in_charts(tmp_path):
  # A 2-core and a 1-core run of benchmarks/attacks.py: bar_chart draws one
  # bar per (category, series), so the file must be part of the category.
  one_core = json.loads(json.dumps(ATTACKS))
  one_core["certjax"]["mlp"]["ratio_to_fwd_bwd_x10"]["pgd10"] = 0.89
  found, _ = _reports(tmp_path, {"a.json": ATTACKS, "a1.json": one_core})
  frame = reports.efficiency_summary(found)
  got = {(row["algorithm"], row["model"]): row["fraction of raw limit"]
         for _, row in frame.iterrows()}
  assert got[("pgd10", "mlp [a.json]")] == 0.95 and got[("pgd10", "mlp [a1.json]")] == 0.89
  table = reports.attack_table([r for r in found if r.path.endswith("/a.json")])
  assert list(reports.label_with_file(table, "model").unique()) == ["mlp"]
