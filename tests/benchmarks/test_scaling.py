"""Smoke test of benchmarks/scaling.py: one worker per forced CPU device count."""

import argparse
import json
import math
import os
import subprocess
import sys

import jax

from benchmarks import scaling

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "scaling.py")


def _run(args):
  # The workers inherit the tests' persistent compilation cache through these
  # variables, so a second run skips most of the compilation.
  cache = jax.config.jax_compilation_cache_dir
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_scaling_writes_positive_figures_per_device_count(tmp_path):
  out = tmp_path / "scaling.json"
  proc = _run(["--devices", "1,2", "--platform", "cpu", "--batch", "16", "--inputs", "2",
               "--num", "16", "--warmup", "1", "--repeats", "1", "--min_time", "0",
               "--out", str(out)])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["benchmark"] == "scaling" and report["model"] == "ibp_small"
  assert report["environment"]["platform"] == "cpu"
  assert report["environment"]["forced_host_devices"] is True
  assert report["environment"]["versions"]["jax"] == jax.__version__
  assert "same physical cores" in report["note"] and "not a speed-up" in report["note"]
  results = report["results"]
  assert [r["devices"] for r in results] == [1, 2]
  # Each worker really ran on its own number of devices.
  assert [r["devices_available"] for r in results] == [1, 2]
  assert [r["global_batch"] for r in results] == [16, 16]
  assert [r["per_device_batch"] for r in results] == [16, 8]
  assert [r["certification_inputs_per_device"] for r in results] == [2, 1]
  assert all(r["certification_draws_per_call"] == 32 for r in results)
  for r in results:
    assert r["baseline_devices"] == 1
    for figure, name in scaling.FIGURES.items():
      assert math.isfinite(r[figure]) and r[figure] > 0, (figure, r[figure])
      assert math.isclose(r[f"{name}_vs_baseline"], r[figure] / results[0][figure])
    assert math.isclose(r["train_step_images_per_s"], 16 / r["train_step_seconds"])
    assert r["params"] > 0
    assert all(len(v) == 1 for v in r["samples_seconds"].values())
    assert r["environment"]["num_devices"] == r["devices"]
  assert results[0]["train_step_vs_baseline"] == 1.0
  # The readable table: a row per device count, and the note.
  rows = [line.split() for line in proc.stdout.splitlines()]
  assert ["1", "16", "16"] in [row[:3] for row in rows]
  assert ["2", "16", "8"] in [row[:3] for row in rows]
  assert "not a speed-up" in proc.stdout


def test_scaling_rejects_batch_not_divisible_by_device_counts(tmp_path):
  proc = _run(["--devices", "1,2,4", "--batch", "18", "--out", str(tmp_path / "x.json")])
  assert proc.returncode == 2
  assert "--batch=18 must be a positive multiple of every device count" in proc.stderr
  assert "[4]" in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_worker_env_replaces_an_existing_device_count_flag(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3")
  env = scaling.worker_env(4, "cpu")
  assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1",
                                      "--xla_force_host_platform_device_count=4"]
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT


def _fake_worker(platform, available, started):
  def run(n, args):
    started.append(n)
    if n > available:
      return {"devices": n, "devices_available": available, "platform": platform,
              "skipped": "too few"}
    return {"devices": n, "devices_available": available, "platform": platform,
            "worker_wall_seconds": 0.0}
  return run


def test_accelerator_host_measures_its_own_power_of_two_counts(monkeypatch):
  args = argparse.Namespace(devices=[8, 16], batch=256, inputs=8)
  started = []
  monkeypatch.setattr(scaling, "_run_worker", _fake_worker("gpu", 4, started))
  results = scaling.run_workers(args)
  # The first (too large) request only reveals the backend; 1, 2, 4 are measured.
  assert started == [8, 1, 2, 4]
  assert [r["devices"] for r in results] == [1, 2, 4]

  started.clear()
  monkeypatch.setattr(scaling, "_run_worker", _fake_worker("gpu", 2, started))
  results = scaling.run_workers(argparse.Namespace(devices=[1, 2, 4, 8], batch=256,
                                                   inputs=8))
  assert started == [1, 2] and [r["devices"] for r in results] == [1, 2]


def test_cpu_host_measures_the_requested_counts(monkeypatch):
  started = []
  monkeypatch.setattr(scaling, "_run_worker", _fake_worker("cpu", 99, started))
  results = scaling.run_workers(argparse.Namespace(devices=[1, 2, 4, 8], batch=256,
                                                   inputs=8))
  assert started == [1, 2, 4, 8] and [r["devices"] for r in results] == [1, 2, 4, 8]
