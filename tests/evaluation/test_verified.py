"""launch/verify.py (the 'verified' evaluator) end to end: selection, guard and errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from certjax import data as data_lib
from certjax import evaluation
from certjax.bounds import verified_accuracy
from certjax.evaluation import verified as verify_config
from certjax.training import config as config_lib
from tests.bounds.test_training import trained_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP, MAX = 5, 200  # images 0, 5, ..., 195 of the 1,000 mnist5k test digits


@pytest.fixture(scope="module")
def ibp_run(tmp_path_factory):
  return trained_runs(tmp_path_factory)["ibp"]


def test_launch_verify_writes_json_and_table(ibp_run):
  run, _ = ibp_run
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "launch.verify", "--config=configs/mnist5k_ibp.py:tiny,smoke",
       f"--workdir={run.workdir}", f"--config.skip={SKIP}", f"--config.max={MAX}",
       "--config.verify.eps_list=(0.05,0.1)", "--config.verify.batch_size=16"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out_dir = os.path.join(run.workdir, "verify")
  with open(os.path.join(out_dir, "results.json")) as f:
    summary = json.load(f)
  with open(os.path.join(out_dir, "results.md")) as f:
    table = f.read()
  assert table.strip() in proc.stdout
  assert "| 0.05 |" in table and "| 0.1 |" in table
  assert summary["num_images"] == MAX // SKIP and (summary["skip"], summary["max"]) == (SKIP, MAX)
  assert summary["checkpoint_step"] == int(run.state.step)
  assert summary["methods"] == ["ibp", "crown_ibp", "crown"] and not summary["skipped"]
  results = {(r["eps"], r["method"]): r["verified_accuracy"] for r in summary["results"]}
  assert set(results) == {(e, m) for e in (0.05, 0.1) for m in summary["methods"]}

  # The same numbers computed here on the same images (0, 5, ..., 195).
  config = ibp_run[1]
  x, y = data_lib.load_arrays(config.data, "test", 0, MAX)
  x, y = x[::SKIP], y[::SKIP]
  logits_fn = run.logits_fn()
  clean = float(np.mean(np.argmax(np.asarray(jax.jit(logits_fn)(x)), -1) == y))
  assert summary["clean_accuracy"] == pytest.approx(clean)
  for eps in (0.05, 0.1):
    expected = float(verified_accuracy(logits_fn, x, y, eps, "ibp").accuracy)
    assert results[eps, "ibp"] == pytest.approx(expected)
    # CROWN-IBP and CROWN are combined with IBP: never fewer verified images.
    assert results[eps, "crown_ibp"] >= results[eps, "ibp"]
    assert results[eps, "crown"] >= results[eps, "ibp"]
  assert results[0.05, "ibp"] >= results[0.1, "ibp"] > 0


def test_crown_guard_and_errors(ibp_run, tmp_path):
  run, config = ibp_run
  config = config_lib.with_defaults(config)
  config.skip, config.max = 100, -1
  config.compute_dtype = "bfloat16"  # verification rebuilds the model in float32
  config.verify.methods = ("ibp", "crown")
  config.verify.crown_max_neurons = 50  # the tiny MLP has 100 ReLUs
  result = evaluation.evaluate_workdir(config, run.workdir, "verified")
  summary = result.details
  assert summary["num_images"] == 10
  assert [r["method"] for r in summary["results"]] == ["ibp"]
  assert "100 ReLU neurons" in summary["skipped"][0]["reason"]
  assert "crown skipped" in result.table
  assert 0.5 < summary["clean_accuracy"] <= 1
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    evaluation.evaluate_workdir(config, str(tmp_path), "verified")
  config.verify.methods = ("ibp", "lp")
  with pytest.raises(ValueError, match="verify.methods"):
    verify_config.validate_settings(config.verify)
  config.verify.methods = ("ibp",)
  config.max = 0
  with pytest.raises(ValueError, match="select no image"):
    evaluation.evaluate_workdir(config, run.workdir, "verified")
