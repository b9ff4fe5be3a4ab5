"""The 'certified' evaluator on a trained workdir: Cohen's files, skip/max,
invariance to grouping, resume, the launch script, and an attack inside the
certified radii."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import data as data_lib
from certjax import evaluation
from certjax import models
from certjax import runs
from certjax import smoothing
from certjax.runs import provenance
from certjax.evaluation import certified
from tests.conftest import smoke_config, trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIGMA = 0.25
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
# Small certification: n=256 can certify radii up to sigma * Phi^-1(0.01 ** (1/256)).
CERTIFY = {"n0": 32, "n": 256, "alpha": 0.01, "batch_size": 256, "images_per_call": 5}


def small_config(**certify):
  """configs/mnist5k_smoothing.py at smoke scale (the default MLP, 100 steps)."""
  return smoke_config("mnist5k_smoothing", overrides={
      "data.num_eval_examples": 200, "objective.sigma": SIGMA,
      **{f"certify.{k}": v for k, v in {**CERTIFY, **certify}.items()}})


@pytest.fixture(scope="module")
def workdir():
  return trained_run("mnist5k_smoothing", overrides={"data.num_eval_examples": 200,
                                                      "objective.sigma": SIGMA})[0]


class Run:
  """What one certification wrote: the evaluator's result and its files."""

  def __init__(self, result):
    self.result = result
    self.results = result.details.results
    self.table = result.details.table
    self.tsv_path = result.artifacts["tsv"]
    self.json_path = result.artifacts["json"]
    self.summary_path = result.artifacts["md"]
    self.plot_path = result.artifacts["png"]


def run(workdir, output_dir, skip, max_index, **certify):
  config = small_config(output_dir=str(output_dir), **certify)
  config.skip, config.max = skip, max_index
  return Run(evaluation.evaluate_workdir(config, workdir, "certified"))


@pytest.fixture(scope="module")
def first_run(workdir, tmp_path_factory):
  return run(workdir, tmp_path_factory.mktemp("cert"), 40, 400)


def images_at(indices):
  return data_lib.load_examples({"name": "mnist5k"}, "test", indices)


def rows_without_time(results):
  return [tuple(col[i] for col in results[:5]) for i in range(results.idx.size)]


def test_writes_cohen_tsv_summary_and_plot(first_run):
  with open(first_run.tsv_path) as f:
    lines = f.read().splitlines()
  assert lines[0] == HEADER
  results = first_run.results
  # skip=40, max=400: indices 0, 40, ..., 360 as in Cohen's certify.py.
  np.testing.assert_array_equal(results.idx, np.arange(0, 400, 40))
  assert len(lines) == 1 + 10
  _, labels = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, 400)
  np.testing.assert_array_equal(results.label, labels[::40])
  np.testing.assert_array_equal(results.correct, results.predict == results.label)
  abstain = results.predict == -1
  assert np.all(results.radius[abstain] == 0) and np.all(results.radius[~abstain] > 0)
  # A briefly trained model: most digits certified, none beyond the n=256 cap.
  assert results.correct.mean() >= 0.6
  cap = SIGMA * float(jax.scipy.stats.norm.ppf(0.01 ** (1 / 256)))
  assert results.radius.max() <= cap + 1e-6
  assert np.all(results.time > 0)

  with open(first_run.json_path) as f:
    record = json.load(f)
  radii = np.arange(0.0, 2.01, 0.25)
  np.testing.assert_allclose(record["radii"], radii)
  np.testing.assert_allclose(record["certified_accuracy"],
                             smoothing.certified_accuracy(results.radius, results.correct, radii))
  np.testing.assert_allclose(record["average_certified_radius"],
                             np.mean(np.where(results.correct, results.radius, 0.0)), rtol=1e-6)
  assert record["settings"]["sigma"] == SIGMA and record["settings"]["n"] == 256
  with open(first_run.summary_path) as f:
    summary = f.read()
  assert "| sigma=0.25 |" in summary and "ACR" in summary
  assert "| sigma=0.25 |" in first_run.table
  with open(first_run.plot_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Cohen's analysis reader (ours) reads it back, and so does the notebooks' reader.
  assert certified.read_tsv(first_run.tsv_path).idx.size == 10
  (record,) = certified.read_results(first_run.json_path)
  assert record.sigma == SIGMA and record.objective == "gaussian"
  # The TSV holds radii to 6 significant digits.
  np.testing.assert_allclose(record.results.radius, results.radius, rtol=1e-5)
  # The largest radius n allows is in the JSON and on the plot's legend.
  assert record.record["max_certifiable_radius"] == pytest.approx(cap, rel=1e-6)
  # Its provenance names the images certified, hashed as they were loaded.
  data = record.record["provenance"]["data"]
  assert (data["examples_hashed"], data["examples_reread"]) == (10, 0)
  assert data["sha256"] == provenance.examples_sha256(*images_at(results.idx))


def test_certificates_do_not_depend_on_grouping_or_selection(workdir, first_run, tmp_path):
  # Every 80th image: one group (0, 80, ..., 320) where the first run had
  # groups (0, 40, ..., 160) and (200, ..., 360): same certificates.
  subset = run(workdir, tmp_path / "b", 80, 400)
  np.testing.assert_array_equal(subset.results.idx, np.arange(0, 400, 80))
  assert rows_without_time(subset.results) == rows_without_time(first_run.results)[::2]


def test_interrupted_run_resumes_after_its_last_row(workdir, first_run, tmp_path):
  # A run killed after its first group of 5: its log holds those 5 images and
  # a line cut short by the kill.
  output = tmp_path / "resume"
  os.makedirs(output)
  log = first_run.tsv_path[:-len(".tsv")] + ".log.jsonl"
  partial_log = os.path.join(output, os.path.basename(log))
  with open(log) as f:
    lines = f.read().splitlines()
  with open(partial_log, "w") as f:
    f.write("\n".join(lines[:6]) + "\n" + lines[6][:20])  # fingerprint, 5 rows, a torn line
  resumed = run(workdir, output, 40, 400)
  assert os.path.dirname(resumed.tsv_path) == str(output)
  assert rows_without_time(resumed.results) == rows_without_time(first_run.results)
  # The first five rows were kept, not recomputed (their times are unchanged)...
  np.testing.assert_array_equal(resumed.results.time[:5], first_run.results.time[:5])
  # ...and the other five were (a fresh measurement of the time).
  assert not np.array_equal(resumed.results.time[5:], first_run.results.time[5:])
  with open(partial_log) as f:
    assert len([line for line in f.read().splitlines() if line.strip()]) == 1 + 10


def test_a_tsv_without_log_is_certified_again(workdir, first_run, tmp_path):
  # A TSV of the same run name but no log (an earlier certjax keyed its noise
  # otherwise): its rows are not trusted, every image is certified again.
  output = tmp_path / "old"
  os.makedirs(output)
  partial = os.path.join(output, os.path.basename(first_run.tsv_path))
  with open(first_run.tsv_path) as f:
    lines = f.read().splitlines()
  with open(partial, "w") as f:
    f.write("\n".join([lines[0]] + [line.replace("\t0.", "\t9.") for line in lines[1:6]]) + "\n")
  resumed = run(workdir, output, 40, 400)
  assert resumed.tsv_path == partial
  assert rows_without_time(resumed.results) == rows_without_time(first_run.results)


def test_a_log_of_other_settings_is_set_aside(workdir, first_run, tmp_path):
  output = tmp_path / "stale"
  os.makedirs(output)
  log = os.path.join(output, os.path.basename(first_run.tsv_path)[:-len(".tsv")] + ".log.jsonl")
  with open(log, "w") as f:
    f.write(json.dumps({"fingerprint": {"n": 1}}) + "\n"
            + json.dumps({"unit": "0", "label": 0, "predict": 0, "radius": 9.0, "time": 1.0}))
  resumed = run(workdir, output, 40, 400)
  assert rows_without_time(resumed.results) == rows_without_time(first_run.results)
  assert os.path.exists(log + ".stale")


def test_bad_settings_are_named(workdir, tmp_path):
  config = small_config(output_dir=str(tmp_path))
  config.objective = {"name": "standard"}
  with pytest.raises(ValueError, match="certify.sigma"):
    evaluation.evaluate_workdir(config, workdir, "certified")
  with pytest.raises(ValueError, match="certify.n=5 can never certify"):
    evaluation.evaluate_workdir(small_config(n=5, alpha=0.001), workdir, "certified")
  config = small_config()
  config.skip = 0
  with pytest.raises(ValueError, match="skip must be an integer >= 1"):
    evaluation.evaluate_workdir(config, workdir, "certified")
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    evaluation.evaluate_workdir(small_config(), str(tmp_path / "empty"), "certified")


def test_launch_certify_prints_table_and_paths(workdir, first_run):
  overrides = [f"--config.certify.{k}={v}" for k, v in CERTIFY.items()]
  # The subprocess shares the tests' persistent compilation cache; with
  # groups of 5 images, as in first_run, it reuses their compiled programs.
  cache = jax.config.jax_compilation_cache_dir
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.certify", "--config=configs/mnist5k_smoothing.py",
       f"--workdir={workdir}", "--config.skip=100", "--config.max=500",
       "--config.objective.sigma=0.25", "--config.model.name=mlp",
       "--config.model.kwargs={}", *overrides],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Certified accuracy (sigma=0.25, 5 images" in proc.stdout
  assert "| sigma=0.25 |" in proc.stdout
  tsv = [line.split(None, 1)[1] for line in proc.stdout.splitlines() if line.startswith("TSV:")]
  assert tsv and os.path.dirname(tsv[0]) == os.path.join(workdir, "certify")
  with open(tsv[0]) as f:
    lines = f.read().splitlines()
  assert lines[0] == HEADER
  assert [line.split("\t")[0] for line in lines[1:]] == ["0", "100", "200", "300", "400"]


def test_eot_attack_inside_certified_radius_does_not_flip(workdir, first_run):
  """Soundness: an L2 PGD attack with EOT on the smoothed classifier, kept
  inside each image's certified radius, never changes the smoothed prediction.

  At three times the radius the same attack does change some, so it would
  reveal certificates that overstate the radius by that much (measured: at
  twice the radius it already flips 4 of 10).
  """
  model, variables, _, _ = runs.load_trained(workdir)
  logits_fn = models.make_logits_fn(model, variables)
  results = first_run.results
  certified = results.predict >= 0
  assert certified.sum() >= 5
  idx = results.idx[certified]
  images, _ = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, 400)
  x = jnp.asarray(images[idx])
  predicted = jnp.asarray(results.predict[certified], jnp.int32)
  radius = jnp.asarray(results.radius[certified], jnp.float32)

  @jax.jit
  def attack(eps):
    return smoothing.smoothadv_pgd(
        jax.random.key(7), logits_fn, x, predicted, eps=eps, num_steps=5, sigma=SIGMA,
        num_noise=16, resample_noise=True)

  def smoothed_prediction(points):
    # Cohen's PREDICT with many draws: wrong (not abstaining) with prob <= alpha.
    return smoothing.predict(jax.random.key(8), logits_fn, points, SIGMA, n=2000,
                             alpha=0.001, batch_size=1000)

  inside = attack(0.95 * radius)
  norms = jnp.sqrt(jnp.sum((inside - x) ** 2, axis=(1, 2, 3)))
  assert bool(jnp.all(norms <= 0.95 * radius + 1e-4))
  after = smoothed_prediction(inside)
  flipped = (after != -1) & (after != np.asarray(predicted))
  assert not flipped.any(), (after, predicted, radius)

  outside = smoothed_prediction(attack(3.0 * radius))
  assert ((outside != -1) & (outside != np.asarray(predicted))).sum() >= 1
