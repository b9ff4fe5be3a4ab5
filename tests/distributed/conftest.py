"""Starts every subprocess of the distributed tests at once.

The two workers of the localhost cluster (test_two_process.py) and the
start-up failure cases (test_startup.py) are launched together by the first
test that needs any of them: the failure cases mostly wait on timeouts, so
running them beside the cluster keeps the directory's wall time down.
"""

import subprocess
import sys
import textwrap

import pytest

from tests.distributed._util import ROOT, certjax_env, free_port, subprocess_env

WORKER = f"{ROOT}/tests/distributed/_worker.py"

# The launchers' start-up (launch.common.start) alone, without a config.
START_ONLY = textwrap.dedent("""
    from absl import app
    from launch import common
    app.run(lambda argv: common.start(argv) or print("STARTED"))
""")

START_CASES = {
    # A port nobody listens on: process 1 cannot reach its coordinator.
    "unreachable": dict(DISTRIBUTED_TIMEOUT=2, NUM_PROCESSES=2, PROCESS_ID=1),
    # Process 0 is the coordinator, so it is reachable; its peer never comes.
    "missing_peer": dict(DISTRIBUTED_TIMEOUT=1, NUM_PROCESSES=2, PROCESS_ID=0),
    "malformed": dict(DISTRIBUTED_TIMEOUT=5, NUM_PROCESSES=2, PROCESS_ID=5),
    # No scheduler or TPU for jax.distributed.initialize() to detect.
    "auto_undetected": dict(DISTRIBUTED="auto", DISTRIBUTED_TIMEOUT=5, COORDINATOR_ADDRESS=""),
}


class Launched:
  """Handles of the running subprocesses.

  Attributes:
    tmp: directory of the workers' workdir, outputs and logs.
    workers: [(Popen, log file)] for process ids 0 and 1.
    start_cases: {case: (coordinator address, Popen)}.
  """

  def __init__(self, tmp, start_workers=True):
    self.tmp = tmp
    port = free_port()
    self.workers = []
    for process_id in range(2 if start_workers else 0):
      env = subprocess_env(
          XLA_FLAGS="--xla_force_host_platform_device_count=2",
          **certjax_env(COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=2,
                        PROCESS_ID=process_id, DISTRIBUTED_TIMEOUT=120))
      log = open(tmp / f"process{process_id}.log", "w")
      self.workers.append((subprocess.Popen(
          [sys.executable, WORKER, str(tmp / "workdir"), str(tmp / f"out{process_id}.npz"),
           str(tmp / "reference")],
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    self.start_cases = {}
    for name, variables in START_CASES.items():
      address = f"127.0.0.1:{free_port()}"
      self.start_cases[name] = (address, subprocess.Popen(
          [sys.executable, "-c", START_ONLY], cwd=ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True,
          env=subprocess_env(**certjax_env(**{"COORDINATOR_ADDRESS": address, **variables}))))

  def close(self):
    for proc, log in self.workers:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
    for _, proc in self.start_cases.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="session")
def launched(request, tmp_path_factory):
  # The workers only when a selected test needs them (not under -m "not slow").
  start_workers = any("runs" in item.fixturenames for item in request.session.items)
  handles = Launched(tmp_path_factory.mktemp("distributed"), start_workers)
  yield handles
  handles.close()
