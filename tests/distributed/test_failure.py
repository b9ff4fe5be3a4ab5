"""A process of a multi-process run that fails stops every process within seconds.

Two `launch.train` processes on localhost (2 CPU devices each) where one gets
an unknown data set name: it stops with its one-line error, and the other,
by then blocked in a collective, must print that message and stop as well,
rather than wait for a timeout (30 s for gloo, 5 min for jax.distributed's
shutdown barrier) and end with a C++ stack trace.
"""

import re
import subprocess
import sys
import time

from tests.distributed._util import ROOT, certjax_env, free_port, subprocess_env

TINY = ["--config=configs/mnist5k.py", "--config.model.name=mlp",
        "--config.num_train_steps=4", "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=0", "--config.batch_size=32",
        "--config.eval_batch_size=64"]
MESSAGE = "Unknown data set name 'mnsit'"
# Start-up of two JAX processes on a busy 2-core machine, plus a few seconds.
LIMIT_S = 60
# Between the ends of the two processes.
GAP_S = 10


def _run_pair(tmp_path, failing: int) -> list[tuple[int, str, float]]:
  """Runs processes 0 and 1; process `failing` gets a bad data set name.

  Returns:
    [(return code, stderr, seconds from the start to its end)] per process.
  """
  port = free_port()
  procs, logs = [], []
  start = time.perf_counter()
  for process_id in range(2):
    bad = ["--config.data.name=mnsit"] if process_id == failing else []
    env = subprocess_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        **certjax_env(COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES=2,
                      PROCESS_ID=process_id, DISTRIBUTED_TIMEOUT=60))
    logs.append(tmp_path / f"stderr{process_id}.txt")
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "launch.train", *TINY, *bad,
           f"--workdir={tmp_path / 'workdir'}"],
          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log))
  ended = [None, None]
  try:
    # Far above the limits asserted: without the fix a peer waits out a
    # timeout (gloo's 30 s, jax.distributed's 5 min shutdown barrier).
    while None in ended and time.perf_counter() - start < 400:
      for i, proc in enumerate(procs):
        if ended[i] is None and proc.poll() is not None:
          ended[i] = time.perf_counter() - start
      time.sleep(0.05)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  return [(proc.returncode, log.read_text(), seconds)
          for proc, log, seconds in zip(procs, logs, ended)]


def _check(results, failing: int) -> None:
  code, stderr, _ = results[failing]
  assert code == 1, stderr[-3000:]
  assert f"certjax error: {MESSAGE}" in stderr
  code, stderr, _ = results[1 - failing]
  assert code == 1, stderr[-3000:]
  assert f"certjax error on process {failing}: {MESSAGE}" in stderr, stderr[-3000:]
  # No traceback, no C++ abort (JAX's fatal errors print a stack trace).
  for noise in ("Traceback", "stack trace", "Check failed", "Terminating process"):
    assert noise not in stderr, stderr[-3000:]
  assert not re.search(r"^F\d{4} ", stderr, re.M), stderr[-3000:]  # absl FATAL lines
  # The two end together (the failing process 0 waits for its peer to read
  # the message), and long before any timeout even on a busy machine.
  (_, _, seconds0), (_, _, seconds1) = results
  assert seconds0 is not None and seconds1 is not None, (seconds0, seconds1)
  assert abs(seconds0 - seconds1) < GAP_S, (seconds0, seconds1)
  assert max(seconds0, seconds1) < LIMIT_S, (seconds0, seconds1)


def test_failure_of_process_1_stops_process_0_with_its_message(tmp_path):
  _check(_run_pair(tmp_path, failing=1), failing=1)


def test_failure_of_process_0_stops_process_1_with_its_message(tmp_path):
  _check(_run_pair(tmp_path, failing=0), failing=0)
