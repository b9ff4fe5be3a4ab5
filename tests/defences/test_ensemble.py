"""Ensembles: combination rules against NumPy, list vs stacked members, checks, BPDA on a vote."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from certjax.defences import ensemble

fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_combine(member_logits, method):
  z = np.asarray(member_logits, np.float64)
  if method == "logits":
    return z.mean(0)
  probs = _softmax(z)
  if method == "probabilities":
    return np.log(probs.mean(0))
  num_members, batch, num_classes = z.shape
  votes = np.zeros((batch, num_classes))
  for k in range(num_members):
    votes[np.arange(batch), z[k].argmax(-1)] += 1
  return votes / num_members, probs.mean(0)


def _numpy_vote_winner(votes, mean_probs):
  winners = []
  for v, p in zip(votes, mean_probs):
    tied = np.flatnonzero(v == v.max())
    winners.append(tied[np.argmax(p[tied])])
  return np.array(winners)


@pytest.mark.parametrize("method", ["logits", "probabilities"])
def test_combine_smooth_methods_match_numpy(method):
  z = np.random.default_rng(0).normal(size=(5, 8, 4)).astype(np.float32) * 3.0
  np.testing.assert_allclose(ensemble.combine(z, method), _numpy_combine(z, method),
                             rtol=1e-5, atol=1e-5)
  if method == "probabilities":
    np.testing.assert_allclose(jax.nn.softmax(ensemble.combine(z, method)),
                               _softmax(z).mean(0), rtol=1e-5)


def test_vote_matches_numpy_with_ties_broken_by_mean_probability():
  rng = np.random.default_rng(1)
  for num_members in (1, 2, 4, 5):
    z = rng.normal(size=(num_members, 300, 3)).astype(np.float32) * 2.0
    out = np.asarray(fast_jit(ensemble.combine, static_argnums=1)(z, "vote"))
    fractions, mean_probs = _numpy_combine(z, "vote")
    winner = _numpy_vote_winner(fractions, mean_probs)
    np.testing.assert_array_equal(out.argmax(-1), winner)
    # Log vote fractions (floored); only the winner is raised, by less than a vote level.
    expected = np.log(fractions + 1e-6)
    bump = out - expected
    np.testing.assert_allclose(np.delete(bump.ravel(), winner + 3 * np.arange(300)), 0.0,
                               atol=1e-5)
    chosen = bump[np.arange(300), winner]
    assert np.all((chosen > 0) & (chosen < np.log1p(1.0 / num_members)))
  # Two members, one vote each: class 1 has the higher mean probability (0.61) and wins,
  # where breaking the tie by index would pick class 0.
  z = np.array([[[0.0, 3.0]], [[1.0, 0.0]]], np.float32)
  assert int(np.argmax(ensemble.combine(z, "vote"), -1)[0]) == 1


def _members(seed, num_members=3, num_classes=4):
  rng = np.random.default_rng(seed)
  params = {
      "w1": rng.normal(size=(num_members, 49, 8)).astype(np.float32) / 7.0,
      "b1": rng.normal(size=(num_members, 8)).astype(np.float32),
      "w2": rng.normal(size=(num_members, 8, num_classes)).astype(np.float32),
      "b2": rng.normal(size=(num_members, num_classes)).astype(np.float32),
  }
  return params


def _apply(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _images(seed, n=16):
  return np.random.default_rng(seed).uniform(size=(n, 7, 7, 1)).astype(np.float32)


@pytest.mark.parametrize("method", ensemble.ENSEMBLE_METHODS)
def test_stacked_and_list_ensembles_agree(method):
  stacked = _members(0)
  listed = [jax.tree_util.Partial(_apply, jax.tree.map(lambda a, k=k: a[k], stacked))
            for k in range(3)]
  x = _images(1)
  from_list = fast_jit(ensemble.ensemble_logits_fn(listed, method))(x)
  from_stack = ensemble.stacked_ensemble_logits_fn(_apply, stacked, method)
  # The stacked ensemble is a pytree: its weights go into jit as arguments.
  stacked_out = fast_jit(lambda model, x: model(x))(from_stack, x)
  np.testing.assert_allclose(from_list, stacked_out, rtol=1e-5, atol=1e-5)
  member_logits = np.stack([np.asarray(f(x)) for f in listed])
  np.testing.assert_allclose(stacked_out, ensemble.combine(member_logits, method),
                             rtol=1e-5, atol=1e-5)


def test_vote_has_zero_gradient_and_bpda_has_the_probabilities_gradient():
  stacked = _members(2)
  x = _images(3, n=8)

  cotangent = np.random.default_rng(4).normal(size=(8, 4)).astype(np.float32)

  def grad_of(model):
    # A fixed cotangent on the logits: BPDA swaps the Jacobian, not the loss's own backward
    # (a CE loss would still see the vote's values, so its gradients would differ).
    return np.asarray(fast_jit(jax.grad(lambda v: jnp.sum(cotangent * model(v))))(x))

  vote = ensemble.stacked_ensemble_logits_fn(_apply, stacked, "vote")
  bpda = ensemble.stacked_ensemble_logits_fn(_apply, stacked, "vote", bpda=True)
  probabilities = ensemble.stacked_ensemble_logits_fn(_apply, stacked, "probabilities")
  np.testing.assert_array_equal(grad_of(vote), 0.0)
  smooth = grad_of(probabilities)
  assert np.abs(smooth).max() > 1e-3
  np.testing.assert_allclose(grad_of(bpda), smooth, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bpda(x), vote(x), rtol=1e-6, atol=1e-6)  # the vote's values

  member_logits = jax.vmap(lambda p: _apply(p, x))(stacked)
  np.testing.assert_allclose(ensemble.vote_with_bpda(member_logits),
                             ensemble.combine(member_logits, "vote"), rtol=1e-6, atol=1e-6)


def test_mismatched_members_and_bad_settings_raise():
  three = lambda x: jnp.zeros((x.shape[0], 3))
  four = lambda x: jnp.ones((x.shape[0], 4))
  x = _images(0, n=2)
  assert ensemble.check_members([three, three], x) == 3
  with pytest.raises(ValueError, match=r"member 0: \(2, 3\), member 1: \(2, 4\)"):
    ensemble.check_members([three, four], x)
  with pytest.raises(ValueError, match=r"member 1: \(2, 4\)"):
    ensemble.ensemble_logits_fn([three, four])(x)
  with pytest.raises(ValueError, match=r"member 1: \(2, 4\)"):
    jax.jit(ensemble.ensemble_logits_fn([three, four]))(x)
  with pytest.raises(ValueError, match="at least one"):
    ensemble.ensemble_logits_fn([])
  with pytest.raises(ValueError, match="Unknown method 'mean'"):
    ensemble.ensemble_logits_fn([three], "mean")
  with pytest.raises(ValueError, match="Unknown method"):
    ensemble.combine(np.zeros((2, 1, 3)), "votes")
  with pytest.raises(ValueError, match="vote"):
    ensemble.ensemble_logits_fn([three], "logits", bpda=True)
  with pytest.raises(ValueError, match=r"\[K, batch, classes\]"):
    ensemble.combine(np.zeros((2, 3)), "logits")
  with pytest.raises(ValueError, match="leading model axis"):
    ensemble.stacked_ensemble_logits_fn(_apply, {"w": np.zeros((2, 3)), "b": np.zeros((3,))})
