"""Tests of the generic training loop: outputs, learning, exact resume,
reproducibility, bad input and checkpoint safety."""

import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from certjax.training import metrics as metrics_lib
from certjax.training import train as train_lib
from tests.conftest import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  """configs/mnist5k.py at smoke scale: a 32-unit MLP, 60 steps, checkpoints every 20."""
  return smoke_config("mnist5k", overrides={
      "model.kwargs": {"hidden": (32,)}, "num_train_steps": 60, "log_every_steps": 20,
      "checkpoint_every_steps": 20, "optimizer.learning_rate": 3e-3,
      # A constant rate: a run stopped at step 40 then continued to 60 follows
      # the same schedule as one of 60 steps.
      "optimizer.schedule": "constant", **overrides})


def params_of(result):
  return jax.device_get(result.state.params)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return train_lib.train_and_evaluate(tiny_config(), workdir)


def test_run_learns_and_writes_outputs(full_run):
  workdir = full_run.workdir
  assert full_run.eval_metrics["num_examples"] == 1000
  # 60 steps of a 32-unit MLP on 4,000 digits: well above chance (10%).
  assert full_run.eval_metrics["accuracy"] > 0.8
  assert int(full_run.state.step) == 60

  records = metrics_lib.read_metrics(workdir)
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [20, 40, 60]
  assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0
             for r in records if r["split"] == "train")
  evals = [r for r in records if r["split"] == "eval"]
  assert evals[-1]["accuracy"] == pytest.approx(full_run.eval_metrics["accuracy"])
  # The loss went down over training.
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert train_losses[-1] < train_losses[0]

  tb_files = os.listdir(os.path.join(workdir, metrics_lib.TENSORBOARD_DIR))
  assert any("tfevents" in f for f in tb_files)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["name"] == "mlp" and saved["num_train_steps"] == 60
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert steps == [20, 40, 60]  # keep_checkpoints=3


def test_resume_is_exact_and_seed_reproducible(full_run, tmp_path):
  # Stop at step 40, then continue to 60 in the same workdir: the result must
  # equal the uninterrupted run bit for bit (data order, keys and optimizer
  # state all resume exactly).
  workdir = str(tmp_path / "resumed")
  train_lib.train_and_evaluate(tiny_config(num_train_steps=40), workdir)
  resumed = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert int(resumed.state.step) == 60
  assert_trees_equal(params_of(resumed), params_of(full_run))
  # The earlier config.json was kept when the config changed.
  assert os.path.exists(os.path.join(workdir, "config.1.json"))
  # A re-run of a finished workdir trains nothing and reports the same model.
  again = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert_trees_equal(params_of(again), params_of(full_run))


def test_other_seed_gives_other_model(full_run, tmp_path):
  other = train_lib.train_and_evaluate(tiny_config(seed=1, num_train_steps=20),
                                       str(tmp_path))
  first = jax.tree.leaves(params_of(full_run))[0]
  assert not np.allclose(jax.tree.leaves(params_of(other))[0], first)


def test_load_trained_gives_same_logits(full_run):
  from certjax import data as data_lib, models as models_lib
  model, variables, config, info = train_lib.load_trained(full_run.workdir)
  assert info.num_classes == 10 and config.model.name == "mlp"
  x, _ = data_lib.load_arrays(config.data, "test", 0, 16)
  ours = models_lib.make_logits_fn(model, variables)(x)
  np.testing.assert_allclose(ours, full_run.logits_fn()(x), rtol=1e-6, atol=1e-6)


def test_mismatched_checkpoint_is_reported_and_kept(full_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(full_run.workdir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match="does not match"):
    train_lib.train_and_evaluate(tiny_config(**{"model.kwargs": {"hidden": (16,)}}), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_diverging_run_keeps_checkpoints(full_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "diverge")
  shutil.copytree(full_run.workdir, workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config = tiny_config(num_train_steps=100, **{"optimizer.learning_rate": 1e30})
  with pytest.raises(FloatingPointError, match="NaN|nan|Inf|inf"):
    train_lib.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize("key, value, message", [
    ("data.name", "mnsit", "Unknown dataset|mnist"),
    ("model.name", "resnet21", "resnet20"),
    ("objective.name", "trades_typo", "Accepted values"),
    ("compute_dtype", "float16", "bfloat16"),
    ("optimizer.name", "adagrad", "sgd"),
])
def test_unknown_names_are_clear_errors(tmp_path, key, value, message):
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(tiny_config(**{key: value}), str(tmp_path))


def test_config_typo_is_rejected(tmp_path):
  config = tiny_config()
  config.optimizer.learnig_rate = 0.1
  with pytest.raises(ValueError, match="optimizer.learnig_rate.*learning_rate"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_missing_data_directory(tmp_path):
  config = tiny_config(**{"data.name": "mnist", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises((ValueError, FileNotFoundError), match="nope"):
    train_lib.train_and_evaluate(config, str(tmp_path / "w"))


def test_unknown_objective_hyperparameter(tmp_path):
  config = tiny_config()
  config.objective.beta = 1.0
  with pytest.raises(ValueError, match="beta.*label_smoothing"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_bfloat16_compute_trains(tmp_path):
  result = train_lib.train_and_evaluate(
      tiny_config(compute_dtype="bfloat16", num_train_steps=20, log_every_steps=10),
      str(tmp_path))
  params = jax.tree.leaves(result.state.params)
  assert all(p.dtype == np.float32 for p in params)
  assert result.eval_metrics["accuracy"] > 0.5


def test_import_certjax_alone_stays_light():
  script = ("import sys, certjax; print(sorted(m for m in sys.modules "
            "if m.startswith(('certjax.', 'jax', 'flax', 'orbax'))))")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout
  assert out.strip() == "[]", out


def _tensorboard_scalars(directory):
  """(tag, step) -> values as TensorBoard shows them: event files in order, and a
  SessionLog START at step s (a `purge_step`) hides earlier events of steps >= s."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = struct.unpack("<Q", data[offset:offset + 8])[0]
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
      for value in event.summary.value:
        scalars.setdefault((value.tag, event.step), []).append(value.simple_value)
  return scalars


def test_resumed_run_logs_every_step_once(full_run, tmp_path):
  # A run killed after its checkpoint at step 20 but after logging steps 40
  # and 60: the resumed run logs them again, and they must not appear twice.
  import shutil
  workdir = str(tmp_path / "killed")
  shutil.copytree(full_run.workdir, workdir)
  for step in ("40", "60"):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  before = metrics_lib.read_metrics(workdir)
  # TensorBoard orders event files by name, which starts with the creation
  # time in whole seconds: a real resume comes seconds after the first run.
  time.sleep(1.1)
  resumed = train_lib.train_and_evaluate(tiny_config(), workdir)
  assert_trees_equal(params_of(resumed), params_of(full_run))
  records = metrics_lib.read_metrics(workdir)
  pairs = [(r["step"], r["split"]) for r in records]
  assert sorted(pairs) == sorted(set(pairs)) == sorted(
      (r["step"], r["split"]) for r in before)
  # Step 20 is the killed run's record, steps 40 and 60 the resumed run's.
  old_time = {(r["step"], r["split"]): r["time"] for r in before}
  for r in records:
    same = r["time"] == old_time[(r["step"], r["split"])]
    assert same == (r["step"] <= 20), r
  tb = _tensorboard_scalars(os.path.join(workdir, metrics_lib.TENSORBOARD_DIR))
  assert {step for _, step in tb} == {20, 40, 60}
  assert all(len(values) == 1 for values in tb.values()), {
      k: v for k, v in tb.items() if len(v) > 1}
  assert tb["train/loss", 60] == [pytest.approx(
      [r["loss"] for r in records if r["split"] == "train" and r["step"] == 60][0])]
  # Started again once finished, the run logs nothing twice.
  train_lib.train_and_evaluate(tiny_config(), workdir)
  assert metrics_lib.read_metrics(workdir) == records


def test_config_evals_run_inside_training_and_are_logged(tmp_path):
  config = tiny_config(num_train_steps=40)
  config.evals.pgd = {"type": "robust", "every_steps": 20, "eps_list": (0.05,),
                      "attacks": ("pgd",), "num_steps": 2, "skip": 10, "max": 200}
  config.evals.ibp = {"type": "verified", "eps_list": (0.001,), "methods": ("ibp",),
                      "skip": 10, "max": 200}
  workdir = str(tmp_path)
  result = train_lib.train_and_evaluate(config, workdir)
  records = metrics_lib.read_metrics(workdir)
  logged = {(r["split"], r["step"]) for r in records if r["split"].startswith("evals/")}
  # every_steps=20: at 20 and at the end; every_steps=0 (the default): at the end.
  assert logged == {("evals/pgd", 20), ("evals/pgd", 40), ("evals/ibp", 40)}
  last = [r for r in records if r["split"] == "evals/pgd" and r["step"] == 40][0]
  assert 0.0 <= last["robust_accuracy@0.05"] <= last["clean_accuracy"] <= 1.0
  assert result.eval_metrics["evals/pgd/robust_accuracy@0.05"] == last["robust_accuracy@0.05"]
  # The evaluator's files of each step, and the robust accuracy the standalone
  # evaluator computes on the same checkpoint and images.
  for step in (20, 40):
    assert os.path.exists(os.path.join(workdir, "evals", "pgd", str(step), "results.json"))
  from certjax import evaluation  # pylint: disable=import-outside-toplevel
  config.attack.update({k: v for k, v in config.evals.pgd.items()
                        if k not in ("type", "every_steps", "skip", "max")})
  config.skip, config.max = 10, 200
  alone = evaluation.evaluate_workdir(config, workdir, "robust", verbose=False)
  assert alone.metrics["robust_accuracy@0.05"] == last["robust_accuracy@0.05"]
  assert alone.metrics["clean_accuracy"] == last["clean_accuracy"]


def _flip_shard_byte(step_dir):
  from certjax.runs import signing  # pylint: disable=import-outside-toplevel
  shard = sorted(n for n in signing.file_digests(step_dir) if "/d/" in n)[0]
  path = os.path.join(step_dir, shard)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    f.seek(0)
    f.write(bytes(data))
  return shard


def test_signed_training_signs_checkpoints_and_verifies_before_resuming(tmp_path, monkeypatch):
  import shutil
  from certjax import data as data_lib, evaluation, runs  # pylint: disable=import-outside-toplevel
  from certjax.runs import provenance, signing  # pylint: disable=import-outside-toplevel
  for name in list(os.environ):  # the user's own keys and trust store must not decide it
    if name.startswith("CERTJAX_") and name != "CERTJAX_JAX_CACHE":
      monkeypatch.delenv(name)
  monkeypatch.setenv(signing.ENV_TRUST_DIR, str(tmp_path / "trust"))
  key = str(tmp_path / "signing_key")
  fingerprint = signing.generate_key(key)
  signed = {"signing.key": key}
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(num_train_steps=40, **signed), workdir)
  ours = runs.policy_from_config(tiny_config(**signed))
  records = {step: runs.verify_checkpoint(workdir, step, ours) for step in (20, 40)}
  assert all(r["verified"] and r["key_fingerprint"] == fingerprint for r in records.values())
  history = provenance.read(workdir)["history"]
  assert len(history) == 1 and history[0]["end_step"] == 40
  assert history[0]["checkpoints"] == {str(s): r["sha256"] for s, r in records.items()}
  assert history[0]["data"]["train"]["examples_hashed"] == 4000
  assert history[0]["config_json_sha256"] == provenance.file_sha256(
      os.path.join(workdir, "config.json"))

  # A resumed run verifies the newest checkpoint before reading it: a flipped
  # byte stops it, naming the file, and nothing is written.
  tampered = str(tmp_path / "tampered")
  shutil.copytree(workdir, tampered)
  shard = _flip_shard_byte(runs.step_directory(tampered, 40))
  with pytest.raises(runs.CheckpointVerificationError,
                     match=rf"^checkpoint step 40 in {tampered}/checkpoints: hash mismatch for "
                           rf"'{shard}'"):
    train_lib.train_and_evaluate(tiny_config(**signed), tampered)
  assert len(provenance.read(tampered)["history"]) == 1
  assert runs.checkpoint_steps(tampered) == [20, 40]
  # Requiring signatures refuses an unsigned checkpoint, and a run without a key.
  os.remove(os.path.join(runs.step_directory(tampered, 40), signing.SIGNATURE_FILE))
  with pytest.raises(runs.CheckpointVerificationError, match="step 40 .*: not signed"):
    train_lib.train_and_evaluate(tiny_config(**signed, **{"signing.require": True}), tampered)
  with pytest.raises(ValueError, match="no signing key"):
    train_lib.train_and_evaluate(tiny_config(**{"signing.require": True}), tampered)

  resumed = train_lib.train_and_evaluate(tiny_config(**signed), workdir)
  assert int(resumed.state.step) == 60
  history = provenance.read(workdir)["history"]
  assert [h["start_step"] for h in history] == [0, 40]
  assert history[1]["resumed_from"] == {"step": 40, **{k: v for k, v in records[40].items()
                                                      if k != "step"}}
  assert list(history[1]["checkpoints"]) == ["60"]

  # An evaluator's result file names the checkpoint, the config and the images.
  config = tiny_config(**signed, **{"max": 20, "verify.methods": ("ibp",)})
  result = evaluation.evaluate_workdir(config, workdir, "verified", verbose=False)
  block = runs.read_json(result.artifacts["json"])["provenance"]
  assert block["checkpoint"] == runs.verify_checkpoint(workdir, 60, ours)
  assert block["checkpoint"]["sha256"] == history[1]["checkpoints"]["60"]
  assert block["config_sha256"] == provenance.config_sha256(config)
  selection = evaluation.EvalData.from_config(config.data, "test", 1, 20)
  assert block["data"]["sha256"] == provenance.examples_sha256(
      *data_lib.load_examples(config.data, "test", selection.indices))
  assert block["packages"]["certjax"] and block["environment"]["device_count"] >= 1
