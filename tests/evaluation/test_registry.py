"""The evaluator protocol: registry, settings, config.evals, and every evaluator on
in-memory arrays through the same `EvalContext`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import evaluation
from certjax.evaluation import common
from certjax.training import config as config_lib
from tests.conftest import smoke_config


def test_registry_names_sections_and_settings():
  names = evaluation.evaluator_names()
  assert names == tuple(sorted(names))
  sections = {"robust": "attack", "verified": "verify", "certified": "certify",
              "membership": "membership", "property": "property"}
  assert set(sections) <= set(names)
  for name, section in sections.items():
    assert evaluation.get_spec(name).section == section
    # Membership and property inference read the K models of a many-models run.
    assert evaluation.get_spec(name).many_models == (name in ("membership", "property"))
  assert evaluation.evaluator_defaults("robust").attacks == ("fgsm", "pgd")
  with pytest.raises(ValueError, match="evaluator.*'robustness'.*robust"):
    evaluation.get_spec("robustness")
  with pytest.raises(ValueError, match=r"Unknown setting 'eps' of evaluator 'robust' in "
                                       r"attack.*Did you mean 'eps_list'\?"):
    evaluation.merged_settings("robust", {"eps": 0.1})
  with pytest.raises(ValueError, match="attack.norm"):
    evaluation.get_evaluator("robust", {"norm": "l3"}, num_classes=10)


def test_the_whole_config_is_validated_up_front():
  config = smoke_config("mnist5k")
  config.certify.alpha = 2.0  # a section launch.train itself never reads
  with pytest.raises(ValueError, match="certify.alpha"):
    config_lib.validate_config(config)
  config = smoke_config("mnist5k")
  config.evals.pgd = {"type": "robust", "every_steps": 10, "eps_lsit": (0.1,)}
  with pytest.raises(ValueError, match="eps_lsit.*evals.pgd.*Did you mean 'eps_list'"):
    config_lib.validate_config(config)
  config.evals.pgd = {"type": "certify"}
  with pytest.raises(ValueError, match="evals.pgd.type.*certified"):
    config_lib.validate_config(config)
  config.evals.pgd = {"type": "robust", "checkpoint_step": 3}
  with pytest.raises(ValueError, match="evals.pgd.checkpoint_step has no meaning"):
    config_lib.validate_config(config)
  config.evals.pgd = {"every_steps": 3}
  with pytest.raises(ValueError, match="evals.pgd needs a 'type'"):
    config_lib.validate_config(config)
  # sigma -1 with an objective without sigma is fine until something certifies.
  config.evals = {}
  config_lib.validate_config(config)
  config.evals.cert = {"type": "certified"}
  with pytest.raises(ValueError, match="certify.sigma is -1.*'standard' has no sigma"):
    from certjax.training import train as train_lib  # pylint: disable=import-outside-toplevel
    train_lib.PeriodicEvals.build(config_lib.with_defaults(config),
                                  type("Info", (), {"num_classes": 10})(), None)


def relu_net(variables, x, train=False):
  del train
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ variables["w1"])
  return h @ variables["w2"]


@pytest.fixture(scope="module")
def tiny_context():
  rng = np.random.default_rng(0)
  x = rng.random((12, 3, 3, 1), dtype=np.float32)
  variables = {"w1": jnp.asarray(rng.normal(size=(9, 16)), jnp.float32),
               "w2": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}
  y = np.asarray(jnp.argmax(relu_net(variables, x), -1), np.int32)
  data = evaluation.EvalData.from_arrays(x, y, indices=np.arange(100, 112), name="toy")
  return evaluation.EvalContext(apply_fn=relu_net, variables=variables, data=data,
                                num_classes=4, step=7, metadata={"model": "relu_net"})


@pytest.mark.parametrize("name, settings", [
    ("robust", {"eps_list": (0.0, 0.3), "attacks": ("fgsm",), "batch_size": 8}),
    ("verified", {"eps_list": (0.001, 0.3), "methods": ("ibp", "crown"), "batch_size": 8}),
    ("certified", {"sigma": 0.1, "n0": 16, "n": 128, "alpha": 0.01, "batch_size": 64,
                   "images_per_call": 5, "radii": (0.0, 0.1)}),
])
def test_every_evaluator_runs_on_arrays_and_writes_md_json_png(tiny_context, tmp_path, name,
                                                                settings):
  evaluate = evaluation.get_evaluator(name, settings, num_classes=4)
  ctx = tiny_context.__class__(**{**tiny_context.__dict__, "output_dir": str(tmp_path)})
  result = evaluate(ctx)
  assert result.name == name
  # Labels are the model's own predictions: clean accuracy is 1 (the smoothed
  # classifier may abstain near a decision boundary).
  first = next(iter(result.metrics.values()))
  assert first == 1.0 if name != "certified" else first >= 0.75, result.metrics
  assert all(0.0 <= v <= 1.0 or k.startswith("average") for k, v in result.metrics.items())
  assert {"json", "md", "png"} <= set(result.artifacts)
  for path in result.artifacts.values():
    assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 0
  with open(result.artifacts["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(result.artifacts["json"]) as f:
    payload = json.load(f)
  text = json.dumps(payload)
  assert "relu_net" in text and '"checkpoint_step": 7' in text
  # Nothing is written without an output directory.
  silent = evaluate(tiny_context)
  assert silent.artifacts == {} and silent.metrics == result.metrics


def test_resume_log_keeps_units_under_one_fingerprint(tmp_path):
  path = str(tmp_path / "x.log.jsonl")
  log = common.ResumeLog(path, {"n": 1})
  assert log.completed == {}
  log.record("a", {"v": 1})
  log.record_many({"b": {"v": 2}, "c": {"v": 3}})
  again = common.ResumeLog(path, {"n": 1})
  assert {k: v["v"] for k, v in again.completed.items()} == {"a": 1, "b": 2, "c": 3}
  other = common.ResumeLog(path, {"n": 2})
  assert other.completed == {} and os.path.exists(path + ".stale")
  assert common.ResumeLog(None, {"n": 1}).completed == {}


@pytest.mark.parametrize("name, settings, units", [
    ("robust", {"eps_list": (0.05, 0.3), "attacks": ("fgsm", "pgd"), "num_steps": 2,
                "batch_size": 8}, 2),
    ("verified", {"eps_list": (0.001, 0.3), "methods": ("ibp",), "batch_size": 8}, 3),
])
def test_an_interrupted_run_resumes_after_its_last_unit(tiny_context, tmp_path, name,
                                                        settings, units):
  evaluate = evaluation.get_evaluator(name, settings, num_classes=4)
  ctx = tiny_context.__class__(**{**tiny_context.__dict__, "output_dir": str(tmp_path)})
  first = evaluate(ctx)
  log = tmp_path / "results.log.jsonl"
  lines = log.read_text().splitlines()
  assert len(lines) == 1 + units  # the fingerprint, then one line per finished unit
  # Killed after its first unit, with a line cut short.
  log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
  kept = json.loads(lines[1])
  resumed = evaluate(ctx)
  assert resumed.metrics == first.metrics
  after = [json.loads(line) for line in log.read_text().splitlines()]
  assert after[1] == kept  # reused, not recomputed
  assert [a["unit"] for a in after[1:]] == [json.loads(line)["unit"] for line in lines[1:]]
  # Another checkpoint step is another run: nothing is reused.
  other = tiny_context.__class__(**{**ctx.__dict__, "step": 8})
  evaluate(other)
  assert os.path.exists(str(log) + ".stale")


def test_a_plain_logits_fn_is_evaluated_like_a_model(tiny_context):
  variables = tiny_context.variables
  ctx = evaluation.EvalContext.from_logits_fn(lambda x: relu_net(variables, x),
                                              tiny_context.data, num_classes=4)
  settings = {"eps_list": (0.3,), "attacks": ("fgsm",), "batch_size": 8}
  plain = evaluation.get_evaluator("robust", settings, num_classes=4)(ctx)
  model = evaluation.get_evaluator("robust", settings, num_classes=4)(tiny_context)
  assert plain.metrics == model.metrics
  np.testing.assert_array_equal(plain.details.per_eps[0].robust, model.details.per_eps[0].robust)
  with pytest.raises(ValueError, match="logits_fn must be callable"):
    evaluation.EvalContext.from_logits_fn("model", tiny_context.data, num_classes=4)
