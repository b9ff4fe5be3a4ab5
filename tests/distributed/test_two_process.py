"""Two processes on localhost (2 forced CPU devices each, jax.distributed with a
local coordinator) train, certify, attack and verify together; the results must
equal a single-process run of the same config (tests/distributed/_worker.py).
Checkpoints restore onto whatever topology evaluates them: the two processes
certify the workdir the single process trained, and the single process
certifies the one the two processes trained.

The workers are started by conftest.py; the reference runs in this pytest
process (one device) while they run. Programs come from the persistent compilation
cache (tests/conftest.py); on CPU only process 0 can use it (JAX writes entries
from process 0 only, and process 1's cache keys differ), so process 1 compiles.
"""

import json
import time

import numpy as np
import pytest

from tests.distributed import _worker

# Three processes (the reference here, two workers) share the CPU for tens of seconds.
pytestmark = pytest.mark.slow
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(launched):
  """(reference, [process 0, process 1]) as (params, results) pairs."""
  assert len(launched.workers) == 2
  reference = _worker.run(str(launched.tmp / "reference"))
  deadline = time.time() + TIMEOUT_S
  outputs = []
  for process_id, (proc, log) in enumerate(launched.workers):
    try:
      proc.wait(timeout=max(1, deadline - time.time()))
    finally:
      log.flush()
    text = (launched.tmp / f"process{process_id}.log").read_text()
    assert proc.returncode == 0, f"process {process_id} failed:\n{text[-4000:]}"
    with np.load(launched.tmp / f"out{process_id}.npz") as data:
      params = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
      outputs.append((params, json.loads(str(data["summary"]))))
  return reference, outputs


def test_reference_is_single_process(runs):
  (_, ref), outputs = runs
  assert ref["process_count"] == 1
  for process_id, (_, out) in enumerate(outputs):
    assert (out["process_index"], out["process_count"], out["device_count"]) == (
        process_id, 2, 4)


def test_training_matches_single_process(runs):
  (ref_params, ref), outputs = runs
  for params, out in outputs:
    assert len(params) == len(ref_params)
    for got, want in zip(params, ref_params):
      # 4 devices sum the gradient in another order than 1 device.
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # 150 eval digits, last batch padded on every device: each counted once.
    assert out["eval"]["num_examples"] == ref["eval"]["num_examples"] == _worker.NUM_EVAL
    assert abs(out["eval"]["accuracy"] - ref["eval"]["accuracy"]) <= 1 / _worker.NUM_EVAL
    assert out["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-4)


def test_certification_matches_single_process_and_resumes(runs):
  (_, ref), outputs = runs
  expected_idx = list(range(0, _worker.MAX, _worker.SKIP))
  assert ref["certify"]["idx"] == expected_idx
  for _, out in outputs:
    got, want = out["certify"], ref["certify"]
    assert got["num_examples"] == len(expected_idx)
    # Image i's noise comes from fold_in(key, i) whichever host certifies it, so
    # the counts, hence predictions and radii (6 digits in the TSV), are equal.
    for field in ("idx", "label", "predict"):
      assert got[field] == want[field], field
    np.testing.assert_allclose(got["radius"], want["radius"], rtol=1e-6)
    assert any(p >= 0 for p in got["predict"])  # not all abstentions
    assert len(got["files"]) == 4  # tsv, md, json, png written once, by process 0
  # The second run of every process found all 7 images certified.
  for out in (ref, *[o for _, o in outputs]):
    assert len(out["resumed"]) == 1 and "7 of 7 images" in out["resumed"][0]


def test_checkpoints_restore_onto_another_topology(runs, launched):
  (_, ref), outputs = runs
  # Trained by one process, certified by two: the reference's own certificates.
  for _, out in outputs:
    foreign = out["certify_foreign"]
    for field in ("idx", "label", "predict"):
      assert foreign[field] == ref["certify"][field], field
    np.testing.assert_allclose(foreign["radius"], ref["certify"]["radius"], rtol=1e-6)
  # Trained by two processes, certified by one: the two processes' certificates.
  config = _worker.tiny_config()
  config.certify.output_dir = str(launched.tmp / "single_certifies_two")
  here = _worker.certify(config, str(launched.tmp / "workdir"))
  two = outputs[0][1]["certify"]
  for field in ("idx", "label", "predict"):
    assert here[field] == two[field], field
  np.testing.assert_allclose(here["radius"], two["radius"], rtol=1e-6)


def test_attack_and_verification_match_single_process(runs):
  (_, ref), outputs = runs
  for _, out in outputs:
    # FGSM is deterministic: the same images survive on 2 hosts as on one.
    assert out["attack"]["num_examples"] == ref["attack"]["num_examples"] == 7
    for field in ("correct", "robust", "robust_accuracy_after"):
      assert out["attack"][field] == ref["attack"][field], field
    assert out["verify"] == ref["verify"]
    # skip/max index the whole split (not the 150-image eval cap), as for the
    # attack: 7 images, 4 + 3 over the hosts, the second host padded to 4.
    assert out["verify"]["num_images"] == 7
  assert ref["attack"]["correct"] != ref["attack"]["robust"][-1]  # the attack bites


def test_batch_not_divisible_by_devices_is_a_clear_error(runs):
  _, outputs = runs
  for _, out in outputs:
    assert "batch_size=30 must be a positive multiple of the number of devices (4)" in (
        out["batch_error"])
