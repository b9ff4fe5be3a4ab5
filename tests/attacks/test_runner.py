"""robust_accuracy: bookkeeping, masking between attacks, perturbation checks."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax import attacks
from certjax.attacks import runner as runner_lib


# The programs run for milliseconds: XLA's backend optimisations would only
# add compile time.
FAST = {"xla_backend_optimization_level": 0}
robust_accuracy = functools.partial(attacks.robust_accuracy, compiler_options=FAST)


@pytest.fixture(scope="module")
def data(mnist):
  return mnist["x_test"][:100], mnist["y_test"][:100]


@pytest.fixture(scope="module")
def cheap_attacks():
  return [("fgsm", attacks.make_fgm()), ("pgd", attacks.make_pgd(num_steps=5))]


def identity_attack(key, logits_fn, x, y, eps):
  return x


def test_counts_and_report(trained_mlp, data, cheap_attacks):
  model = trained_mlp[0]
  x, y = data
  result = robust_accuracy(jax.random.key(0), model, x, y, attacks=cheap_attacks,
                                   eps_list=[0.0, 0.02, 0.1], norm="linf", batch_size=64)
  correct = np.argmax(model(x), -1) == y
  assert result.clean_accuracy == pytest.approx(np.mean(correct))
  assert result.num_examples == 100 and result.attack_names == ("fgsm", "pgd")
  zero, small, large = result.per_eps
  assert zero.robust_accuracy == pytest.approx(result.clean_accuracy)  # eps = 0 changes nothing
  assert zero.max_perturbation == 0.0
  for r in result.per_eps:
    accs = [a for _, a in r.robust_accuracy_after]
    assert accs == sorted(accs, reverse=True) and accs[0] <= result.clean_accuracy
    assert r.robust_accuracy == accs[-1] == pytest.approx(np.mean(r.robust))
    assert not np.any(r.robust & ~correct)  # robust implies correctly classified
    assert r.max_perturbation <= r.eps * (1 + 1e-4) + 1e-6
  assert large.robust_accuracy < small.robust_accuracy < result.clean_accuracy
  report = json.loads(json.dumps(result.to_dict(include_masks=True)))
  assert report["results"][1]["robust_accuracy_after"]["pgd"] == small.robust_accuracy
  assert len(report["results"][2]["robust"]) == 100
  table = result.table()
  assert "fgsm" in table and "pgd" in table and f"{100 * large.robust_accuracy:.2f}" in table


def test_later_attacks_only_see_points_still_robust(trained_mlp, data):
  # A fooled point is never counted robust again: a second attack that returns
  # the clean (correctly classified) input must not restore it, and it must
  # receive exactly the points the first attack failed on.
  model = trained_mlp[0]
  x, y = data
  seen = []

  def recording_identity(key, logits_fn, x, y, eps):
    jax.debug.callback(lambda xb: seen.append(np.asarray(xb)), x)
    return x

  result = robust_accuracy(
      jax.random.key(0), model, x, y, eps_list=[0.03], norm="linf", batch_size=32,
      attacks=[("pgd", attacks.make_pgd(num_steps=5)), ("identity", recording_identity)])
  jax.effects_barrier()
  (r,) = result.per_eps
  after_pgd, after_identity = (a for _, a in r.robust_accuracy_after)
  assert after_identity == after_pgd < result.clean_accuracy
  received = {row.tobytes() for batch in seen for row in batch}
  assert received == {row.tobytes() for row in x[r.robust]}


def test_perturbation_check_catches_a_wrong_attack(trained_mlp, data):
  model = trained_mlp[0]
  x, y = data

  def overshoot(key, logits_fn, x, y, eps):  # forgets to project onto the ball
    return jnp.clip(x + 2 * eps * jnp.sign(x - 0.5), 0, 1)

  def unclipped(key, logits_fn, x, y, eps):  # inside the ball, outside the box
    return x + 0.5 * eps

  with pytest.raises(attacks.PerturbationError,
                     match=r"'overshoot' at eps=0.05 .*linf norm 0.1 > eps = 0.05"):
    robust_accuracy(jax.random.key(0), model, x, y, eps_list=[0.05], norm="linf",
                            attacks=[("overshoot", overshoot)])
  with pytest.raises(attacks.PerturbationError, match=r"outside the \[0, 1\] box"):
    robust_accuracy(jax.random.key(0), model, x, y, eps_list=[0.05], norm="linf",
                            attacks=[("unclipped", unclipped)])
  # The same check accepts a correct attack's output at the boundary.
  x_edge = np.clip(x + 0.05 * np.sign(x - 0.5), 0, 1).astype(np.float32)
  assert attacks.check_perturbation(x, x_edge, 0.05, "linf").max() <= 0.05 + 1e-6
  with pytest.raises(attacks.PerturbationError, match="l2 norm"):
    attacks.check_perturbation(x, x_edge, 0.05, "l2")


def test_standard_attacks_composition():
  names = lambda seq: [n for n, _ in seq]
  assert names(attacks.standard_attacks("linf")) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert names(attacks.standard_attacks("l2", num_classes=3)) == ["apgd-ce", "apgd-dlr",
                                                                  "fab-t", "square"]
  assert names(attacks.standard_attacks("l1", num_classes=2)) == ["apgd-ce", "apgd-cw",
                                                                  "fab-t"]
  assert names(attacks.standard_attacks("linf", square_queries=0, fab_t=False)) == [
      "apgd-ce", "apgd-t"]
  assert attacks.standard_attacks("l2")[1][1].config["num_target_classes"] == 9


def test_standard_attacks_end_to_end(trained_mlp, data):
  model = trained_mlp[0]
  x, y = data[0][:64], data[1][:64]
  sequence = attacks.standard_attacks("linf", num_classes=10, num_steps=5,
                                      num_target_classes=2, square_queries=30)
  result = robust_accuracy(jax.random.key(1), model, x, y, attacks=sequence,
                                   eps_list=[0.02], norm="linf", batch_size=64)
  (r,) = result.per_eps
  accs = [a for _, a in r.robust_accuracy_after]
  assert accs == sorted(accs, reverse=True)
  assert accs[-1] < result.clean_accuracy - 0.1
  assert "apgd-t" in str(result) and "fab-t" in str(result)
  # Without a suite name the result says none.
  assert result.suite == "" and result.to_dict()["suite"] == "" and "Suite:" not in str(result)


def test_partial_models_pass_their_weights_as_data(trained_mlp):
  # make_logits_fn returns functools.partial(apply, variables, train=False):
  # the runner turns it into a pytree so weights are inputs, not constants.
  import functools
  from tests.attacks.conftest import mlp_apply

  def apply(params, x, scale=1.0):
    return scale * mlp_apply(params, x)

  params = trained_mlp[1]
  model = runner_lib.as_pytree_model(functools.partial(apply, params, scale=2.0))
  assert isinstance(model, jax.tree_util.Partial)
  assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(params))
  x = np.zeros((2, 7, 7, 1), np.float32)
  np.testing.assert_allclose(model(x), 2.0 * mlp_apply(params, x), rtol=1e-6)
  plain = lambda x: x
  assert runner_lib.as_pytree_model(plain) is plain


def test_radii_run_alone_draw_the_randomness_of_the_joint_run(trained_mlp, data):
  # A resumed evaluation runs one radius at a time: with eps_key_index the
  # random starts of PGD are those of the call over all radii.
  model = trained_mlp[0]
  x, y = data
  suite = [("pgd", attacks.make_pgd(num_steps=2, random_start=True))]
  kwargs = dict(attacks=suite, norm="linf", batch_size=64)
  joint = robust_accuracy(jax.random.key(3), model, x, y, eps_list=[0.02, 0.05], **kwargs)
  for e, eps in enumerate([0.02, 0.05]):
    alone = robust_accuracy(jax.random.key(3), model, x, y, eps_list=[eps],
                            eps_key_index=[e], **kwargs)
    np.testing.assert_array_equal(alone.per_eps[0].robust, joint.per_eps[e].robust)
  # Without it the second radius draws other starts (index 0): some example differs.
  other = robust_accuracy(jax.random.key(3), model, x, y, eps_list=[0.05], **kwargs)
  assert other.per_eps[0].max_perturbation != joint.per_eps[1].max_perturbation or not (
      np.array_equal(other.per_eps[0].robust, joint.per_eps[1].robust))
  with pytest.raises(ValueError, match="eps_key_index must give one index per radius"):
    robust_accuracy(jax.random.key(3), model, x, y, eps_list=[0.05], eps_key_index=[0, 1],
                    **kwargs)
