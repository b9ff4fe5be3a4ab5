"""Runs a Python script in a fresh process that sees several CPU devices.

JAX fixes its device count when its backend starts, so multi-device tests on
a CPU-only machine run their script in a subprocess with
`--xla_force_host_platform_device_count`.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_cpu_devices(script: str, num_devices: int,
                       timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -c script` from the repository root on `num_devices` CPU devices.

  The caller's XLA_FLAGS are kept (the device count is appended) and the
  repository root is put first on PYTHONPATH. Returns the completed process
  with its stdout and stderr as text; asserting on them is the caller's job.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={num_devices}").strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
