"""Multi-process start-up errors and the host-sharing helpers of certjax.parallel."""

import subprocess
import time

import numpy as np
import pytest

from certjax import parallel
from tests.distributed._util import certjax_env


def test_settings_from_explicit_variables():
  assert parallel.distributed_settings({}) is None
  settings = parallel.distributed_settings(
      certjax_env(COORDINATOR_ADDRESS="10.0.0.1:1234", NUM_PROCESSES=4, PROCESS_ID=3))
  assert settings == parallel.DistributedSettings("10.0.0.1:1234", 4, 3, 300)
  settings = parallel.distributed_settings(
      certjax_env(COORDINATOR_ADDRESS="[::1]:99", NUM_PROCESSES=2, PROCESS_ID=0,
          DISTRIBUTED_TIMEOUT=7))
  assert settings.timeout_s == 7
  # Clusters that jax.distributed.initialize() detects itself.
  auto = parallel.DistributedSettings(None, None, None, 300)
  for variables in ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"},
                    {"OMPI_COMM_WORLD_SIZE": "2"}, {"TPU_WORKER_HOSTNAMES": "a,b"},
                    {"CERTJAX_DISTRIBUTED": "auto"}):
    assert parallel.distributed_settings(variables) == auto, variables
  # One task, or outside an srun step, or switched off: a single process.
  for variables in ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {"SLURM_NTASKS": "8"},
                    {"TPU_WORKER_HOSTNAMES": "a"},
                    {"CERTJAX_DISTRIBUTED": "off", "OMPI_COMM_WORLD_SIZE": "2"}):
    assert parallel.distributed_settings(variables) is None, variables


@pytest.mark.parametrize("variables, message", [
    (certjax_env(COORDINATOR_ADDRESS="h:1", PROCESS_ID=0), "CERTJAX_NUM_PROCESSES is not set"),
    (certjax_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2), "CERTJAX_PROCESS_ID is not set"),
    (certjax_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES="two", PROCESS_ID=0),
     "CERTJAX_NUM_PROCESSES must be an integer >= 1; got 'two'"),
    (certjax_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=2),
     r"CERTJAX_PROCESS_ID=2 is out of range: .* ids are 0..1"),
    (certjax_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=-1),
     "CERTJAX_PROCESS_ID must be an integer >= 0"),
    (certjax_env(COORDINATOR_ADDRESS="localhost", NUM_PROCESSES=2, PROCESS_ID=0),
     "must be 'host:port'"),
    (certjax_env(COORDINATOR_ADDRESS="h:1", NUM_PROCESSES=2, PROCESS_ID=0, DISTRIBUTED_TIMEOUT=0),
     "CERTJAX_DISTRIBUTED_TIMEOUT must be an integer >= 1"),
    (certjax_env(NUM_PROCESSES=2, PROCESS_ID=0), "set without CERTJAX_COORDINATOR_ADDRESS"),
    (certjax_env(DISTRIBUTED="yes"), "CERTJAX_DISTRIBUTED must be 'auto' .* or 'off'"),
])
def test_malformed_variables_are_named(variables, message):
  with pytest.raises(ValueError, match=message):
    parallel.distributed_settings(variables)


@pytest.fixture(scope="module")
def start_only(launched):
  """{case: (address, completed process, seconds)} for conftest.START_CASES."""
  done = {}
  start = time.perf_counter()
  for name, (address, proc) in launched.start_cases.items():
    stdout, stderr = proc.communicate(timeout=120)
    done[name] = (address, subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                                       stderr), time.perf_counter() - start)
  return done


def test_unreachable_coordinator_fails_fast_with_a_clear_message(start_only):
  address, proc, elapsed = start_only["unreachable"]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert f"certjax error: Could not reach the coordinator at {address} within 2 s" in (
      proc.stderr)
  assert "process 1 of 2" in proc.stderr and "CERTJAX_DISTRIBUTED_TIMEOUT" in proc.stderr
  assert "Traceback" not in proc.stderr and "STARTED" not in proc.stdout
  assert elapsed < 30  # interpreter start-up plus the 2 s timeout, on a loaded machine


def test_missing_peer_ends_the_coordinator_within_the_timeout(start_only):
  # JAX ends the process (DEADLINE_EXCEEDED, about 5 s after the timeout)
  # following certjax's line that names the address and what to check.
  address, proc, elapsed = start_only["missing_peer"]
  assert proc.returncode != 0 and "STARTED" not in proc.stdout
  assert f"Process 0 of 2: connecting to the coordinator at {address}" in proc.stderr
  assert "DEADLINE_EXCEEDED" in proc.stderr
  assert elapsed < 30


def test_malformed_variables_end_the_launcher_with_one_line(start_only):
  _, proc, _ = start_only["malformed"]
  assert proc.returncode == 1
  assert "certjax error: CERTJAX_PROCESS_ID=5 is out of range" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_undetected_cluster_is_named(start_only):
  _, proc, _ = start_only["auto_undetected"]
  assert proc.returncode == 1
  assert "certjax error: jax.distributed.initialize() could not detect the cluster" in (
      proc.stderr)
  assert "CERTJAX_COORDINATOR_ADDRESS" in proc.stderr and "Traceback" not in proc.stderr


def test_host_shares_tile_the_items_in_order():
  for count in (0, 1, 3, 7, 8):
    for hosts in (1, 2, 3):
      shares = [parallel.host_share(count, h, hosts) for h in range(hosts)]
      size = shares[0][1]
      assert size == -(-count // hosts)
      covered = np.concatenate([np.arange(count)[s] for s, _ in shares])
      np.testing.assert_array_equal(covered, np.arange(count))  # each item exactly once
      padded = np.stack([parallel.pad_rows(np.arange(count)[s] + 100, size)
                         for s, _ in shares])
      np.testing.assert_array_equal(parallel.unpad_shares(padded, count),
                                    np.arange(count) + 100)


def test_single_process_gather_and_broadcast_keep_dtypes():
  tree = {"a": np.arange(3, dtype=np.int64) << 40, "b": np.array([0.1, 2.0 ** -60]),
          "c": np.array([True, False])}
  gathered = parallel.process_allgather(tree)
  broadcast = parallel.broadcast_from_main(tree)
  for k, v in tree.items():
    assert gathered[k].shape == (1, *v.shape) and gathered[k].dtype == v.dtype
    np.testing.assert_array_equal(gathered[k][0], v)
    np.testing.assert_array_equal(broadcast[k], v)
  # The uint32 encoding used between hosts is bit-exact.
  for v in tree.values():
    np.testing.assert_array_equal(parallel.from_words(parallel.to_words(v), v), v)
