"""Ensembles of classifiers as one logits function, and the adaptive attack on a vote.

  model = ensemble_logits_fn([f1, f2, f3], method="probabilities")
  model = stacked_ensemble_logits_fn(apply_fn, stacked_variables, method="vote")

Both return a `LogitsFn` (x -> (batch, C)) that every attack, certifier and
evaluator in certjax takes. The K members' logits [K, B, C] are combined by
`combine`:

  'logits':        mean_k Z_k (logit averaging).
  'probabilities': log mean_k softmax(Z_k) (probability averaging; its
                   softmax is the mean probability).
  'vote':          log of the vote fractions, floored at 1e-6 so that a class
                   without votes stays finite, the winner (most votes, ties
                   broken by the highest mean probability) raised by 1% of
                   the smallest gap between vote levels so that argmax is
                   the ensemble's decision.

A majority vote is piecewise constant in x: its gradient is zero almost
everywhere, so a gradient attack on it fails for no good reason (gradient
masking, Athalye et al. 2018). The adaptive attack differentiates through a
smooth surrogate with BPDA: forward = vote, backward = probability averaging,
the straight-through trick `p + stop_gradient(v - p)`. `vote_with_bpda` does
this on member logits and `bpda=True` does it in the two factories:

  attacked = ensemble_logits_fn(members, method="vote", bpda=True)
  x_adv = attacks.pgd(key, attacked, x, y, eps=eps)   # success judged by the vote

Stacked members (every parameter with a leading axis K, e.g. K models
trained at once) run as one `vmap`ped forward program.

Class counts must agree across members: the list form checks the members'
output shapes when first called (at trace time under `jit`, from static
shapes), and `check_members(logits_fns, example_x)` checks them up front with
`jax.eval_shape`, running nothing.

References:
  Tramer, Kurakin, Papernot, Goodfellow, Boneh, McDaniel. Ensemble
    Adversarial Training: Attacks and Defenses. ICLR 2018.
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security. ICML 2018 (BPDA).
  Tramer, Carlini, Brendel, Madry. On Adaptive Attacks to Adversarial Example
    Defenses. NeurIPS 2020.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.types import Array, ArrayLike, LogitsFn, Variables
from certjax.validation import check_choice

__all__ = [
    "ENSEMBLE_METHODS", "check_members", "combine", "ensemble_logits_fn",
    "stacked_ensemble_logits_fn", "vote_with_bpda",
]

ENSEMBLE_METHODS = ("logits", "probabilities", "vote")
# Vote fractions are floored before the log so classes without votes stay finite.
_VOTE_FLOOR = 1e-6


def _check_member_logits(member_logits: Array) -> None:
  if member_logits.ndim != 3:
    raise ValueError(f"member_logits must be [K, batch, classes]; got shape "
                     f"{member_logits.shape}.")
  if member_logits.shape[0] == 0:
    raise ValueError("member_logits must hold at least one member (K >= 1); got K = 0.")


def _vote(member_logits: Array) -> Array:
  num_members, _, num_classes = member_logits.shape
  votes = jnp.sum(jax.nn.one_hot(jnp.argmax(member_logits, axis=-1), num_classes), axis=0)
  mean_probs = jnp.mean(jax.nn.softmax(member_logits, axis=-1), axis=0)
  tied_best = votes == jnp.max(votes, axis=-1, keepdims=True)
  winner = jnp.argmax(jnp.where(tied_best, mean_probs, -jnp.inf), axis=-1)
  out = jnp.log(votes / num_members + _VOTE_FLOOR)
  # Adjacent vote levels are at least log1p(1 / K) apart in log space: 1% of that
  # breaks the tie without overtaking a class with more votes.
  bump = 0.01 * np.log1p(1.0 / num_members)
  return out + bump * jax.nn.one_hot(winner, num_classes, dtype=out.dtype)


def combine(member_logits: ArrayLike, method: str = "logits") -> Array:
  """Combines the logits of K members into one set of logits.

  Args:
    member_logits: [K, batch, C].
    method: 'logits' (mean logits), 'probabilities' (log of the mean
      softmax) or 'vote' (log of the vote fractions; see the module
      docstring). 'vote' has zero gradient: use `vote_with_bpda` to attack it.

  Returns:
    [batch, C] logits whose argmax is the ensemble's prediction.

  Raises:
    ValueError: unknown method or member_logits not [K >= 1, batch, C].
  """
  check_choice(method, "method", ENSEMBLE_METHODS)
  member_logits = jnp.asarray(member_logits)
  _check_member_logits(member_logits)
  if method == "logits":
    return jnp.mean(member_logits, axis=0)
  if method == "probabilities":
    log_probs = jax.nn.log_softmax(member_logits, axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(member_logits.shape[0])
  return _vote(member_logits)


def vote_with_bpda(member_logits: ArrayLike) -> Array:
  """Majority vote forward, probability averaging backward (BPDA).

  Returns p + stop_gradient(v - p) with v = combine(., 'vote') and
  p = combine(., 'probabilities'): the values (and so the predictions) of the
  vote, the Jacobian of the mean-probability ensemble. A loss on top is still
  evaluated (and its own gradient taken) at the vote's values; only the
  ensemble's backward pass is replaced. This is the adaptive attacker's view
  of a vote (Athalye et al. 2018).

  Args:
    member_logits: [K, batch, C].

  Returns:
    [batch, C].
  """
  member_logits = jnp.asarray(member_logits)
  _check_member_logits(member_logits)
  smooth = combine(member_logits, "probabilities")
  return smooth + lax.stop_gradient(_vote(member_logits) - smooth)


def _combiner(method: str, bpda: bool):
  check_choice(method, "method", ENSEMBLE_METHODS)
  if not isinstance(bpda, bool):
    raise ValueError(f"bpda must be True or False; got {bpda!r}.")
  if bpda and method != "vote":
    raise ValueError(f"bpda=True applies to method='vote' only (the other methods are "
                     f"differentiable); got method={method!r}.")
  return vote_with_bpda if bpda else functools.partial(combine, method=method)


def _check_callables(logits_fns: Any) -> tuple:
  if callable(logits_fns) or not isinstance(logits_fns, Sequence):
    raise ValueError("logits_fns must be a sequence (list or tuple) of logits functions; "
                     f"got {type(logits_fns).__name__}.")
  fns = tuple(logits_fns)
  if not fns:
    raise ValueError("logits_fns must hold at least one logits function; got an empty "
                     "sequence.")
  for i, fn in enumerate(fns):
    if not callable(fn):
      raise TypeError(f"logits_fns[{i}] must be a callable x -> logits; got "
                      f"{type(fn).__name__}.")
  return fns


def _check_shapes(shapes: Sequence[tuple]) -> int:
  """The common class count of member output shapes, or a ValueError naming them."""
  for i, shape in enumerate(shapes):
    if len(shape) != 2:
      raise ValueError(f"Ensemble member {i} must return (batch, classes) logits; got shape "
                       f"{tuple(shape)}.")
  if len({tuple(s) for s in shapes}) > 1:
    listed = ", ".join(f"member {i}: {tuple(s)}" for i, s in enumerate(shapes))
    raise ValueError(f"Ensemble members must return logits of one shape (the same classes); "
                     f"got {listed}.")
  return int(shapes[0][1])


def check_members(logits_fns: Sequence[LogitsFn], example_x: Any) -> int:
  """Checks that the members agree on their output shape, without running them.

  Args:
    logits_fns: the members.
    example_x: an input batch, or a `jax.ShapeDtypeStruct` of one.

  Returns:
    The number of classes.

  Raises:
    ValueError: empty, non-callable members, or members whose logits differ
      in shape (e.g. class count), naming each member's shape.
  """
  fns = _check_callables(logits_fns)
  spec = jax.ShapeDtypeStruct(np.shape(example_x), getattr(example_x, "dtype", jnp.float32))
  return _check_shapes([jax.eval_shape(fn, spec).shape for fn in fns])


def ensemble_logits_fn(logits_fns: Sequence[LogitsFn], method: str = "logits", *,
                       bpda: bool = False) -> LogitsFn:
  """One logits function from a list of members.

  The members run one after the other (each its own program inside a
  surrounding `jit`); for K copies of one architecture prefer
  `stacked_ensemble_logits_fn`.

  Args:
    logits_fns: K >= 1 callables x -> (batch, C), with the same C.
    method: 'logits', 'probabilities' or 'vote' (see `combine`).
    bpda: with method='vote', give the vote the gradient of 'probabilities'
      (the adaptive attack on a vote; see `vote_with_bpda`).

  Returns:
    x -> (batch, C) ensemble logits. It raises a ValueError when the members'
    outputs differ in shape (checked from static shapes, also under jit).

  Raises:
    ValueError: empty list, unknown method, bpda with another method.
  """
  fns = _check_callables(logits_fns)
  combiner = _combiner(method, bpda)

  def logits_fn(x: Array) -> Array:
    outputs = [fn(x) for fn in fns]
    _check_shapes([out.shape for out in outputs])
    return combiner(jnp.stack(outputs))

  return logits_fn


def _stacked_logits(variables: Variables, x: Array, *, apply_fn, combiner) -> Array:
  return combiner(jax.vmap(lambda v: apply_fn(v, x))(variables))


def stacked_ensemble_logits_fn(apply_fn: Any, stacked_variables: Variables,
                               method: str = "logits", *, bpda: bool = False) -> LogitsFn:
  """One logits function from K models of one architecture with stacked parameters.

  The forward pass is `vmap`ped over the model axis: one program for all K
  members. The result is a `jax.tree_util.Partial` holding the variables as
  pytree leaves, so it can be passed into a jitted function as an argument
  without baking the weights in as constants.

  Args:
    apply_fn: `(variables, x) -> (batch, C)` for one member, e.g.
      `lambda v, x: model.apply(v, x, train=False)`.
    stacked_variables: a pytree whose every leaf has a leading axis K >= 1.
    method: 'logits', 'probabilities' or 'vote' (see `combine`).
    bpda: with method='vote', give the vote the gradient of 'probabilities'.

  Returns:
    x -> (batch, C) ensemble logits.

  Raises:
    ValueError: no leaves, leaves that disagree on K, unknown method.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be a callable (variables, x) -> logits; got "
                    f"{type(apply_fn).__name__}.")
  combiner = _combiner(method, bpda)
  leaves = jax.tree_util.tree_leaves(stacked_variables)
  if not leaves:
    raise ValueError("stacked_variables must hold arrays with a leading model axis; got no "
                     "leaves.")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise ValueError(f"Every leaf of stacked_variables must have the same leading model axis "
                     f"K >= 1; got leading sizes {sorted(map(str, sizes))}.")
  forward = functools.partial(_stacked_logits, apply_fn=apply_fn, combiner=combiner)
  return jax.tree_util.Partial(forward, stacked_variables)
