"""End-to-end tests through subprocesses: the launch script, SIGKILL resume,
and 8 forced CPU devices against 1 device."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(args, env_extra=None, **kwargs):
  env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, **kwargs)


TINY = ["--config=configs/mnist5k.py", "--config.model.name=mlp",
        "--config.num_train_steps=30", "--config.log_every_steps=10",
        "--config.checkpoint_every_steps=10"]


def test_launch_train_prints_accuracy(tmp_path):
  proc = run_python(["-m", "launch.train", *TINY, f"--workdir={tmp_path}"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Clean test accuracy:" in proc.stdout
  assert "on 1000 mnist5k test images" in proc.stdout
  # The progress line reports rate and ETA.
  assert "img/s" in proc.stderr and "ETA" in proc.stderr


# The launch modules that are programs (helpers such as common.py are not).
LAUNCHERS = sorted(p.stem for p in pathlib.Path(ROOT, "launch").glob("*.py")
                   if "app.run(" in p.read_text())


@pytest.mark.parametrize("launcher, path, parent, key, suggestion", [
    ("train", "optimizer.learnig_rate", "config.optimizer", "learnig_rate", "learning_rate"),
    ("train", "optimzer.learning_rate", "config", "optimzer", "optimizer"),
    # An abbreviation difflib alone would not match.
    ("attack", "attack.eps", "config.attack", "eps", "eps_list"),
])
def test_launch_rejects_config_typo_in_one_line(tmp_path, launcher, path, parent, key,
                                                suggestion):
  # Overrides are resolved while absl parses the flags, before main: this
  # used to end in a 55-line ml_collections traceback (a bare
  # `AttributeError: "'eps'"` for the attack).
  proc = run_python(["-m", f"launch.{launcher}", *TINY, f"--config.{path}=0.1",
                     f"--workdir={tmp_path}"], timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  line = lines[0]
  assert line.startswith(f"certjax error: --config.{path}: {parent} has no key {key!r}. "
                         f"Did you mean {suggestion!r}? Accepted keys of {parent}: "), line
  accepted = line.split(f"Accepted keys of {parent}: ", 1)[1].rstrip(".").split(", ")
  assert suggestion in accepted and key not in accepted and len(accepted) > 3, line
  assert not tmp_path.joinpath("config.json").exists()


def test_override_error_walks_the_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from launch import common  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "optimizer": {"learning_rate": 0.1, "warmup_steps": 0}, "steps": 3,
      "eps_list": (0.1, 0.3), "kwargs": None})
  for valid in ("optimizer.learning_rate", "steps", "eps_list", "eps_list[0]", "kwargs.x"):
    assert common.override_error(config, valid) is None, valid
  assert common.override_error(config, "optimizer.warmup") == (
      "--config.optimizer.warmup: config.optimizer has no key 'warmup'. Did you mean "
      "'warmup_steps'? Accepted keys of config.optimizer: learning_rate, warmup_steps.")
  assert common.override_error(config, "steps.x") == (
      "--config.steps.x: config.steps is 3 (int), not a group of keys, so it has no key 'x'.")
  assert "Did you mean" not in common.override_error(config, "zzz")


def test_launch_names_a_missing_config_file(tmp_path):
  proc = run_python(["-m", "launch.train", "--config=configs/mnist5kk.py",
                     f"--workdir={tmp_path}"], timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [(
      f"certjax error: --config=configs/mnist5kk.py: no config file 'configs/mnist5kk.py' "
      f"(from {ROOT}). Did you mean 'configs/mnist5k.py'?")]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_help_lists_its_flags(launcher):
  # absl's --help lists the main module's key flags only; the flags are
  # defined in launch/common.py, so they used to show under --helpfull alone.
  proc = run_python(["-m", f"launch.{launcher}", "--help"], timeout=120)
  assert proc.returncode == 1 and not proc.stderr, proc.stderr[-3000:]  # absl's --help exit
  flags_part = proc.stdout.split("\nflags:\n", 1)[-1]
  assert re.search(r"^  --config: \S", flags_part, re.M), proc.stdout[-3000:]
  assert re.search(r"^  --workdir: \S", flags_part, re.M), proc.stdout[-3000:]
  text = " ".join(flags_part.split())  # absl wraps the help lines
  assert "Override any of its keys with --config.<key>=<value>" in text
  assert "--[no]traceback: Show the full Python traceback" in text


def test_launch_reports_unknown_dataset_in_one_line(tmp_path):
  proc = run_python(["-m", "launch.train", *TINY, "--config.data.name=mnsit",
                     f"--workdir={tmp_path}"], timeout=120)
  assert proc.returncode == 1
  assert "certjax error:" in proc.stderr and "mnsit" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_sigkill_mid_training_resumes_and_finishes(tmp_path):
  workdir = tmp_path / "run"
  args = ["-m", "launch.train", "--config=configs/mnist5k.py", "--config.model.name=mlp",
          "--config.num_train_steps=400", "--config.log_every_steps=25",
          "--config.checkpoint_every_steps=25", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.time() + 240
  killed_after = None
  try:
    while time.time() < deadline and proc.poll() is None:
      # Finished checkpoints only: orbax writes into '<step>.orbax-checkpoint-tmp'
      # and renames it to '<step>' when complete.
      steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
      if steps:
        proc.send_signal(signal.SIGKILL)
        killed_after = max(steps)
        break
      time.sleep(0.05)
  finally:
    proc.kill()
    proc.wait()
  assert killed_after is not None and killed_after < 400, "no checkpoint before the kill"
  resumed = run_python(args, timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from checkpoint at step" in resumed.stderr
  final = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert final[-1] == 400
  assert "Clean test accuracy:" in resumed.stdout


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
  import sys
  import jax, numpy as np
  from certjax.training import train as train_lib
  from tests.conftest import smoke_config
  config = smoke_config("mnist5k", overrides={
      "model.kwargs": {"hidden": (64,)}, "batch_size": 64, "eval_batch_size": 200,
      "num_train_steps": 12, "log_every_steps": 4})
  result = train_lib.train_and_evaluate(config, sys.argv[1])
  leaves = jax.tree.leaves(jax.device_get(result.state.params))
  np.savez(sys.argv[2], *leaves, acc=result.eval_metrics["accuracy"],
           n=result.eval_metrics["num_examples"], devices=len(jax.devices()))
  if len(jax.devices()) > 1:
    config.batch_size = 60
    try:
      train_lib.train_and_evaluate(config, sys.argv[1] + "_bad")
    except ValueError as e:
      print("BATCH_ERROR:", e)
""")


@pytest.mark.slow
def test_eight_cpu_devices_match_one_device(tmp_path):
  script = tmp_path / "multi.py"
  script.write_text(MULTI_DEVICE_SCRIPT)
  outs = {}
  for devices in (1, 8):
    out = tmp_path / f"params{devices}.npz"
    flags = f"--xla_force_host_platform_device_count={devices}"
    proc = run_python([str(script), str(tmp_path / f"w{devices}"), str(out)],
                      env_extra={"XLA_FLAGS": flags}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs[devices] = (np.load(out), proc.stdout)
  one, eight = outs[1][0], outs[8][0]
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  assert int(one["n"]) == int(eight["n"]) == 1000
  keys = [k for k in one.files if k.startswith("arr_")]
  for k in keys:
    np.testing.assert_allclose(eight[k], one[k], rtol=2e-4, atol=2e-5)
  assert abs(float(one["acc"]) - float(eight["acc"])) <= 0.002
  assert "BATCH_ERROR:" in outs[8][1] and "multiple of the number of devices (8)" in outs[8][1]
