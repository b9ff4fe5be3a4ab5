"""Model extraction: a query-counting victim, copycat training, exact ReLU recovery.

Three parts:

* `QueryInterface`: the victim as a black box. It counts queries on the host
  (one query = one input), enforces an optional budget and answers with
  logits, probabilities, rounded probabilities, the top-k probabilities or
  the label only. The last three are also the output DEFENCES whose cost an
  attack can be measured against. `as_logits_fn()` and `label_fn()` turn the
  interface into a jittable function (through `jax.pure_callback`), so that
  every black-box attack in certjax (Square, label-only membership, the
  extraction attacks below) runs through it and is counted.
* Learning-based extraction: `knockoff` queries the victim on surrogate
  inputs (the Knockoff Nets 'random' strategy, which is also the copycat
  network's) and trains a student on the answers; `budget_curve` does it
  for several budgets; `agreement` and `evaluate_copy` measure the copy.
* Functionally equivalent extraction of a one-hidden-layer ReLU network
  (`extract_one_hidden_layer`): the critical-point method, run on the host
  in float64 NumPy with every query going through the interface; and of a
  two-hidden-layer one with a contractive first layer
  (`extract_two_hidden_layers`: the first layer found and peeled off, the
  second extracted as a one-layer network in the first one's activations).

References:
  Tramer, Zhang, Juels, Reiter, Ristenpart. Stealing machine learning models
    via prediction APIs. USENIX Security 2016 (rounding as a defence).
  Correia-Silva, Berriel, Badue, de Souza, Oliveira-Santos. Copycat CNN:
    stealing knowledge by persuading confession with random non-labeled
    data. IJCNN 2018.
  Orekondy, Schiele, Fritz. Knockoff Nets: stealing functionality of
    black-box models. CVPR 2019.
  Jagielski, Carlini, Berthelot, Kurakin, Papernot. High accuracy and high
    fidelity extraction of neural networks. USENIX Security 2020.
  Carlini, Jagielski, Mironov. Cryptanalytic extraction of neural network
    models. CRYPTO 2020.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.types import Array, ArrayLike, LogitsFn, Params, PRNGKey
from certjax.validation import (
  check_choice,
  check_in_open_interval,
  check_int_at_least,
  check_positive,
)

OUTPUTS = ("logits", "probabilities", "rounded", "top_k", "label")
# A Jacobian change further than this from rank one (second over first singular
# value) is two hyperplanes met, or a spoiled measurement: no neuron.
_RANK_ONE_MAX = 1e-3


class QueryBudgetExceeded(ValueError):
  """A batch of queries would take the victim past its query budget."""


# ----------------------------------------------------------------- the victim


def _softmax64(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - np.max(z, axis=-1, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=-1, keepdims=True)


class QueryInterface:
  """A black-box victim: counts queries, enforces a budget, shapes its answers.

  The victim is a `logits_fn` (a JAX function, or any callable mapping a
  batch of inputs, batch first, to logits: a NumPy model or a remote API
  work too). One query is one input: a batch of B inputs costs B queries,
  whichever function asked. A batch that would take the count past `budget`
  is refused whole (not answered, not counted) with `QueryBudgetExceeded`.

  Answers (`query`), for logits z and p = softmax(z) computed in float64:
    'logits': z.
    'probabilities': p.
    'rounded': p rounded to `decimals` decimal places (NumPy's round half to
      even); rows need not sum to 1 and small probabilities become 0.
    'top_k': the `k` largest probabilities kept, the others set to 0 (not
      renormalised, as a prediction API returning its top k shows them).
    'label': the predicted class, argmax z (int64, shape (B,)).

  Attributes:
    logits_fn: the victim's own function, uncounted: for the experimenter's
      evaluation (test-set fidelity), never for the attacker.
    output, decimals, k, budget: the settings above.
    queries_used: queries answered so far.
  """

  def __init__(self, logits_fn: Callable[[Any], Any], *, output: str = "probabilities",
               decimals: int | None = None, k: int | None = None,
               budget: int | None = None, num_classes: int | None = None):
    """Wraps `logits_fn`.

    Args:
      logits_fn: inputs (batch first) -> logits (batch, num_classes).
      output: one of `OUTPUTS`.
      decimals: decimal places kept by output='rounded' (an integer >= 0);
        required by it and accepted by no other output.
      k: probabilities kept by output='top_k' (an integer >= 1); required by
        it and accepted by no other output.
      budget: the most queries the victim answers, or None for no limit.
      num_classes: the number of logits, needed by `as_logits_fn` only when
        `logits_fn` cannot be traced by `jax.eval_shape` (a NumPy model).

    Raises:
      ValueError: an unknown output, or a setting missing, out of range or
        given to an output that does not use it.
    """
    if not callable(logits_fn):
      raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    check_choice(output, "output", OUTPUTS)
    if output == "rounded":
      if decimals is None:
        raise ValueError("output='rounded' needs decimals, an integer >= 0 "
                         "(the decimal places kept).")
      check_int_at_least(decimals, "decimals", 0)
    elif decimals is not None:
      raise ValueError(f"decimals={decimals!r} applies only to output='rounded', "
                       f"not output={output!r}.")
    if output == "top_k":
      if k is None:
        raise ValueError("output='top_k' needs k, an integer >= 1 (the probabilities kept).")
      check_int_at_least(k, "k", 1)
    elif k is not None:
      raise ValueError(f"k={k!r} applies only to output='top_k', not output={output!r}.")
    if budget is not None:
      check_int_at_least(budget, "budget", 0)
    if num_classes is not None:
      check_int_at_least(num_classes, "num_classes", 1)
    self.logits_fn = logits_fn
    self.output = output
    self.decimals = None if decimals is None else int(decimals)
    self.k = None if k is None else int(k)
    self.budget = None if budget is None else int(budget)
    self.num_classes = None if num_classes is None else int(num_classes)
    self._used = 0

  def __repr__(self) -> str:
    setting = {"rounded": f", decimals={self.decimals}", "top_k": f", k={self.k}"}
    return (f"QueryInterface(output={self.output!r}{setting.get(self.output, '')}, "
            f"queries_used={self._used}, budget={self.budget})")

  @property
  def queries_used(self) -> int:
    return self._used

  @property
  def queries_left(self) -> int | None:
    """Queries the budget still allows (None without a budget)."""
    return None if self.budget is None else self.budget - self._used

  def _spend(self, count: int) -> None:
    if self.budget is not None and self._used + count > self.budget:
      raise QueryBudgetExceeded(
          f"Query budget exceeded: {self._used} of {self.budget} queries used, "
          f"a batch of {count} more was refused.")
    self._used += count

  def query(self, x: ArrayLike) -> np.ndarray:
    """The victim's answer to the batch `x` (batch first), counted.

    Returns:
      (batch, num_classes) float64 scores, or (batch,) int64 labels for
      output='label'.

    Raises:
      QueryBudgetExceeded: if the batch does not fit in what is left of the
        budget (nothing is answered or counted then).
    """
    shape = np.shape(x)
    if len(shape) < 1:
      raise ValueError(f"query takes a batch of inputs (batch first); got a scalar {x!r}.")
    self._spend(int(shape[0]))
    return self._answer(np.asarray(self.logits_fn(x)))

  def _answer(self, logits: np.ndarray) -> np.ndarray:
    if logits.ndim != 2:
      raise ValueError(f"The victim's logits_fn must return (batch, num_classes) logits; "
                       f"got shape {logits.shape}.")
    if self.output == "logits":
      return logits.astype(np.float64)
    if self.output == "label":
      return np.argmax(logits, axis=-1).astype(np.int64)
    probabilities = _softmax64(logits)
    if self.output == "rounded":
      return np.round(probabilities, self.decimals)
    if self.output == "top_k":
      kept = np.argsort(-probabilities, axis=-1, kind="stable")[:, :self.k]
      answer = np.zeros_like(probabilities)
      np.put_along_axis(answer, kept, np.take_along_axis(probabilities, kept, -1), -1)
      return answer
    return probabilities

  def _host_query(self, example_rank: int, x: np.ndarray) -> np.ndarray:
    """`query` for a callback: vmap adds leading axes, each of which adds queries."""
    lead = x.shape[:x.ndim - example_rank]
    answer = self.query(x.reshape((-1,) + x.shape[x.ndim - example_rank:]))
    return answer.reshape(lead + answer.shape[1:])

  def _num_classes(self, x: Any) -> tuple[int, Any]:
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if self.num_classes is not None:
      return self.num_classes, dtype
    try:
      spec = jax.eval_shape(self.logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    except Exception as error:  # a NumPy model or a remote API cannot be traced
      raise ValueError(
          "as_logits_fn/label_fn need the number of classes: logits_fn could not be "
          f"traced by jax.eval_shape ({type(error).__name__}); pass num_classes= to "
          "QueryInterface.") from error
    return int(spec.shape[-1]), dtype

  def as_logits_fn(self, *, floor: float = 1e-12) -> LogitsFn:
    """A jittable `logits_fn` answering through the interface, counted.

    Scores returned, per output:
      'logits': the logits.
      'probabilities', 'rounded', 'top_k': log(max(answer, floor)), the log
        of the answered probabilities with zeros (rounded away or outside
        the top k) floored. These are logits up to a per-input constant for
        'probabilities' and rounded or truncated ones otherwise.
      'label': log(max(one_hot(label), floor)): 0 for the answered class and
        log(floor) for the others, so a margin is +-log(1/floor) and an
        attack sees only whether the label changed.

    The call is a `jax.pure_callback` (vmap_method='expand_dims'; each
    vmapped input is a query). JAX treats it as pure, so XLA may drop a call
    whose scores are unused or merge identical ones (a loop-invariant query
    is asked once): the count is of the queries the victim actually
    answered. Inside compiled code a refused batch surfaces as the error
    JAX raises for a failed callback (`jax.errors.JaxRuntimeError`), whose
    message carries the `QueryBudgetExceeded` one.

    Args:
      floor: the probability given to zeros before the log, in (0, 1).
    """
    check_in_open_interval(floor, "floor", 0.0, 1.0)
    floor = float(floor)

    def scores_of(answer: np.ndarray, num_classes: int, dtype: Any) -> np.ndarray:
      if self.output == "logits":
        return answer.astype(dtype)
      if self.output == "label":
        answer = np.eye(num_classes)[answer]
      return np.log(np.maximum(answer, floor)).astype(dtype)

    def logits_fn(x: Array) -> Array:
      x = jnp.asarray(x)
      num_classes, dtype = self._num_classes(x)
      rank = x.ndim - 1

      def host(inputs):
        return scores_of(self._host_query(rank, np.asarray(inputs)), num_classes, dtype)

      return jax.pure_callback(host, jax.ShapeDtypeStruct((x.shape[0], num_classes), dtype),
                               x, vmap_method="expand_dims")

    return logits_fn

  def label_fn(self) -> Callable[[Array], Array]:
    """A jittable x -> int32 labels (batch,) answering through the interface, counted.

    The label is the argmax of the answer (the answer itself for
    output='label'; ties in rounded answers go to the lowest class). Same
    callback semantics as `as_logits_fn`.
    """
    def labels_fn(x: Array) -> Array:
      x = jnp.asarray(x)
      rank = x.ndim - 1

      def host(inputs):
        answer = self._host_query(rank, np.asarray(inputs))
        labels = answer if self.output == "label" else np.argmax(answer, axis=-1)
        return labels.astype(np.int32)

      return jax.pure_callback(host, jax.ShapeDtypeStruct((x.shape[0],), jnp.int32),
                               x, vmap_method="expand_dims")

    return labels_fn


def _check_victim(victim: Any) -> QueryInterface:
  if not isinstance(victim, QueryInterface):
    raise TypeError("victim must be a certjax.privacy.extraction.QueryInterface; "
                    f"got {type(victim).__name__}. Wrap a logits_fn with QueryInterface(fn).")
  return victim


# ------------------------------------------------------------------ fidelity


def _predictions(scores: ArrayLike, name: str) -> np.ndarray:
  a = np.asarray(scores)
  if a.ndim == 2:
    return np.argmax(a, axis=-1)
  if a.ndim == 1 and np.issubdtype(a.dtype, np.integer):
    return a
  raise ValueError(f"{name} must be (batch, num_classes) logits or (batch,) integer labels; "
                   f"got shape {a.shape} and dtype {a.dtype}.")


def agreement(logits_a: ArrayLike, logits_b: ArrayLike) -> float:
  """Fidelity: the fraction of inputs on which two models predict the same class.

  Args:
    logits_a, logits_b: (batch, num_classes) scores (argmax taken), or
      (batch,) integer labels.
  """
  a, b = _predictions(logits_a, "logits_a"), _predictions(logits_b, "logits_b")
  if a.shape != b.shape:
    raise ValueError(f"logits_a and logits_b cover different batches: {a.shape[0]} and "
                     f"{b.shape[0]} inputs.")
  if a.size == 0:
    raise ValueError("agreement needs at least one input; got an empty batch.")
  return float(np.mean(a == b))


class CopyMetrics(NamedTuple):
  """How well a copy matches its victim on a test set."""
  accuracy: float  # the copy's accuracy on the true labels
  victim_accuracy: float  # the victim's accuracy on the same inputs
  fidelity: float  # agreement between copy and victim


def _batched_logits(logits_fn: Callable[[Any], Any], x: np.ndarray,
                    batch_size: int) -> np.ndarray:
  """logits_fn over `x` in batches of one shape (the last padded), so one compile."""
  outputs = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    size = len(chunk)
    if size < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - size, 0)])
    outputs.append(np.asarray(logits_fn(chunk))[:size])
  return np.concatenate(outputs)


def evaluate_copy(copy_logits_fn: Callable[[Any], Any], victim_logits_fn: Callable[[Any], Any],
                  x: ArrayLike, y: ArrayLike, *, batch_size: int = 512) -> CopyMetrics:
  """Accuracy and fidelity of an extracted copy on a labelled test set.

  Evaluation is the experimenter's, not the attacker's: pass the victim's
  own function (`QueryInterface.logits_fn`), whose calls are not counted.

  Args:
    copy_logits_fn: the copy, x -> logits.
    victim_logits_fn: the victim, x -> logits.
    x: test inputs, batch first.
    y: (batch,) integer labels.
    batch_size: inputs per call (the last batch is padded to this size).
  """
  x, y = np.asarray(x), np.asarray(y)
  check_int_at_least(batch_size, "batch_size", 1)
  if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be (batch,) integer labels for the {len(x)} inputs; "
                     f"got shape {y.shape} and dtype {y.dtype}.")
  if len(x) == 0:
    raise ValueError("evaluate_copy needs at least one test input; got an empty batch.")
  copy = _predictions(_batched_logits(copy_logits_fn, x, batch_size), "copy logits")
  victim = _predictions(_batched_logits(victim_logits_fn, x, batch_size), "victim logits")
  return CopyMetrics(accuracy=float(np.mean(copy == y)),
                     victim_accuracy=float(np.mean(victim == y)),
                     fidelity=float(np.mean(copy == victim)))


# ------------------------------------------------- learning-based extraction


def soft_targets(answers: np.ndarray, output: str,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Training targets from victim answers: (targets (B, C), weights (B,)).

  Labels become one-hot targets (the copycat's hard labels); logits become
  their softmax; answered probabilities (full, rounded or top-k) are
  renormalised to sum to 1 (Knockoff's soft labels). A rounded answer that
  is all zeros carries no label: it gets weight 0.
  """
  check_choice(output, "output", OUTPUTS)
  if output == "label":
    return np.eye(num_classes)[answers], np.ones(len(answers))
  if output == "logits":
    return _softmax64(answers), np.ones(len(answers))
  total = np.sum(answers, axis=-1, keepdims=True)
  informative = total[:, 0] > 0
  targets = np.where(informative[:, None], answers / np.where(total > 0, total, 1.0), 0.0)
  return targets, informative.astype(np.float64)


@functools.lru_cache(maxsize=16)
def _student_trainer(apply_fn: Callable[[Params, Array], Array],
                     optimizer: optax.GradientTransformation, batch_size: int,
                     num_epochs: int) -> Callable[..., Params]:
  """A jitted trainer, compiled once per (apply_fn, optimizer, sizes, data capacity).

  The data is padded to a capacity (a multiple of batch_size) and the number
  `n` of real examples is traced, so students trained on different budgets
  share one compiled program.
  """

  def loss_fn(params, x, targets, weights):
    log_probs = jax.nn.log_softmax(apply_fn(params, x), axis=-1)
    cross_entropy = -jnp.sum(targets * log_probs, axis=-1)
    return jnp.sum(weights * cross_entropy) / jnp.maximum(jnp.sum(weights), 1.0)

  @jax.jit
  def train(key, params, images, targets, weights, n):
    capacity = images.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    position = jnp.arange(capacity)

    def epoch(e, carry):
      # Examples beyond n sort last, so every epoch is a permutation of the n.
      draw = jax.random.uniform(jax.random.fold_in(key, e), (capacity,))
      order = jnp.argsort(jnp.where(position < n, draw, 2.0))

      def step(s, carry):
        params, opt_state = carry
        index = lax.dynamic_slice(order, (s * batch_size,), (batch_size,))
        real = (s * batch_size + jnp.arange(batch_size)) < n
        grads = jax.grad(loss_fn)(params, images[index], targets[index],
                                  weights[index] * real)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      return lax.fori_loop(0, steps_per_epoch, step, carry)

    params, _ = lax.fori_loop(0, num_epochs, epoch, (params, optimizer.init(params)))
    return params

  return train


@functools.lru_cache(maxsize=4)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  # One object per learning rate, so the trainer cache hits across calls.
  return optax.adam(learning_rate)


def _check_training(batch_size: int, num_epochs: int, optimizer: Any,
                    learning_rate: float) -> optax.GradientTransformation:
  check_int_at_least(batch_size, "batch_size", 1)
  check_int_at_least(num_epochs, "num_epochs", 1)
  if optimizer is None:
    check_positive(learning_rate, "learning_rate")
    return _adam(float(learning_rate))
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError("optimizer must be an optax.GradientTransformation (or None for "
                    f"optax.adam(learning_rate)); got {type(optimizer).__name__}.")
  return optimizer


def _query_surrogates(key: PRNGKey, victim: QueryInterface, surrogate: np.ndarray,
                      budget: int, query_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Knockoff's 'random' strategy: `budget` surrogate inputs drawn without replacement."""
  if budget > len(surrogate):
    raise ValueError(f"budget ({budget}) exceeds the {len(surrogate)} surrogate inputs; "
                     "each is queried at most once.")
  left = victim.queries_left
  if left is not None and budget > left:
    raise QueryBudgetExceeded(
        f"Query budget exceeded: extraction needs {budget} queries but the victim has "
        f"{left} left ({victim.queries_used} of {victim.budget} used).")
  order = np.asarray(jax.random.permutation(key, len(surrogate)))[:budget]
  answers = [victim.query(surrogate[order[start:start + query_batch_size]])
             for start in range(0, budget, query_batch_size)]
  return order, np.concatenate(answers)


def _padded(array: np.ndarray, capacity: int) -> np.ndarray:
  pad = np.zeros((capacity - len(array),) + array.shape[1:], array.dtype)
  return np.concatenate([array, pad])


class KnockoffResult(NamedTuple):
  params: Params  # the trained student
  queries_used: int  # victim queries this extraction made
  indices: np.ndarray  # which surrogate inputs were queried, in order


def _num_classes_of(apply_fn: Callable[[Params, Array], Array], params: Params,
                    surrogate: np.ndarray) -> int:
  spec = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1,) + surrogate.shape[1:],
                                                               surrogate.dtype))
  if len(spec.shape) != 2:
    raise ValueError(f"apply_fn must return (batch, num_classes) logits; got shape {spec.shape}.")
  return int(spec.shape[-1])


def _check_surrogate(surrogate_images: ArrayLike) -> np.ndarray:
  surrogate = np.asarray(surrogate_images)
  if surrogate.ndim < 2 or not np.issubdtype(surrogate.dtype, np.floating):
    raise ValueError("surrogate_images must be a float array of inputs, batch first; got "
                     f"shape {surrogate.shape} and dtype {surrogate.dtype}.")
  return surrogate


def knockoff(key: PRNGKey, victim: QueryInterface, surrogate_images: ArrayLike,
             apply_fn: Callable[[Params, Array], Array], init_params: Params, *,
             budget: int, batch_size: int = 64, num_epochs: int = 10,
             optimizer: optax.GradientTransformation | None = None,
             learning_rate: float = 1e-3, query_batch_size: int = 256) -> KnockoffResult:
  """Knockoff Nets / copycat extraction: query surrogate inputs, train a student.

  The victim answers `budget` surrogate inputs drawn uniformly without
  replacement (Knockoff's 'random' strategy; the copycat's random non-task
  data). The student is trained on the answers for `num_epochs` epochs of
  minibatch `optimizer` steps, in one jitted `lax` loop: soft-label cross
  entropy when the victim returns scores (probabilities, logits via their
  softmax, rounded or top-k probabilities renormalised), hard-label cross
  entropy when it returns labels (see `soft_targets`).

  Args:
    key: a `jax.random.key` (query selection and minibatch order).
    victim: the `QueryInterface` attacked; its count grows by `budget`.
    surrogate_images: the attacker's unlabelled inputs, batch first.
    apply_fn: (params, x) -> logits of the student.
    init_params: the student's initial parameters.
    budget: victim queries to spend (an integer >= 1, at most the number of
      surrogate inputs and of queries the victim has left).
    batch_size: student minibatch size.
    num_epochs: passes over the queried set.
    optimizer: an optax transformation; default optax.adam(learning_rate).
    learning_rate: Adam's learning rate when `optimizer` is None.
    query_batch_size: inputs sent to the victim per query call.

  Returns:
    `KnockoffResult(params, queries_used, indices)`.

  Raises:
    ValueError: on invalid settings; `QueryBudgetExceeded` when the victim
      has fewer than `budget` queries left (raised before any is made).

  References:
    Orekondy, Schiele, Fritz. Knockoff Nets. CVPR 2019.
    Correia-Silva et al. Copycat CNN. IJCNN 2018.
  """
  victim = _check_victim(victim)
  surrogate = _check_surrogate(surrogate_images)
  check_int_at_least(budget, "budget", 1)
  check_int_at_least(query_batch_size, "query_batch_size", 1)
  optimizer = _check_training(batch_size, num_epochs, optimizer, learning_rate)
  num_classes = _num_classes_of(apply_fn, init_params, surrogate)
  key_query, key_train = jax.random.split(key)
  before = victim.queries_used
  indices, answers = _query_surrogates(key_query, victim, surrogate, budget, query_batch_size)
  targets, weights = soft_targets(answers, victim.output, num_classes)
  capacity = -(-budget // batch_size) * batch_size
  train = _student_trainer(apply_fn, optimizer, int(batch_size), int(num_epochs))
  params = train(key_train, init_params, _padded(surrogate[indices], capacity),
                 _padded(targets.astype(surrogate.dtype), capacity),
                 _padded(weights.astype(surrogate.dtype), capacity), budget)
  return KnockoffResult(params=params, queries_used=victim.queries_used - before,
                        indices=indices)


class BudgetCurve(NamedTuple):
  """Accuracy and fidelity of Knockoff copies against the query budget (NumPy arrays)."""
  budgets: np.ndarray
  accuracy: np.ndarray  # each copy's test accuracy
  fidelity: np.ndarray  # each copy's test agreement with the victim
  victim_accuracy: float
  queries_used: int  # victim queries in all: the largest budget


def budget_curve(key: PRNGKey, victim: QueryInterface, surrogate_images: ArrayLike,
                 apply_fn: Callable[[Params, Array], Array], init_params: Params, *,
                 budgets: Sequence[int], test_images: ArrayLike, test_labels: ArrayLike,
                 batch_size: int = 64, num_epochs: int = 10,
                 optimizer: optax.GradientTransformation | None = None,
                 learning_rate: float = 1e-3, query_batch_size: int = 256,
                 eval_batch_size: int = 512) -> BudgetCurve:
  """`knockoff` at several budgets: accuracy and fidelity against queries.

  The victim is queried once, on max(budgets) surrogate inputs; the copy at
  budget b is trained on the first b of them (nested query sets, as an
  attacker spending a growing budget would have), from `init_params` with
  the same training key. All copies share one compiled training program
  (the data is padded to the largest budget). Fidelity and accuracy are
  measured on the test set with the victim's own, uncounted `logits_fn`.

  Args:
    key, victim, surrogate_images, apply_fn, init_params, batch_size,
      num_epochs, optimizer, learning_rate, query_batch_size: as `knockoff`.
    budgets: increasing query budgets (integers >= 1).
    test_images, test_labels: the labelled test set.
    eval_batch_size: inputs per evaluation call.

  Returns:
    A `BudgetCurve`.

  References:
    Orekondy, Schiele, Fritz. Knockoff Nets. CVPR 2019 (accuracy vs budget).
    Jagielski et al. USENIX Security 2020 (fidelity as the extraction goal).
  """
  victim = _check_victim(victim)
  surrogate = _check_surrogate(surrogate_images)
  budgets = [check_int_at_least(b, "budgets[i]", 1) for b in budgets]
  if not budgets or any(b >= c for b, c in itertools.pairwise(budgets)):
    raise ValueError(f"budgets must be a non-empty increasing sequence; got {budgets!r}.")
  check_int_at_least(query_batch_size, "query_batch_size", 1)
  optimizer = _check_training(batch_size, num_epochs, optimizer, learning_rate)
  num_classes = _num_classes_of(apply_fn, init_params, surrogate)
  key_query, key_train = jax.random.split(key)
  before = victim.queries_used
  indices, answers = _query_surrogates(key_query, victim, surrogate, budgets[-1],
                                       query_batch_size)
  targets, weights = soft_targets(answers, victim.output, num_classes)
  capacity = -(-budgets[-1] // batch_size) * batch_size
  images = _padded(surrogate[indices], capacity)
  targets = _padded(targets.astype(surrogate.dtype), capacity)
  weights = _padded(weights.astype(surrogate.dtype), capacity)
  train = _student_trainer(apply_fn, optimizer, int(batch_size), int(num_epochs))
  student = jax.jit(apply_fn)
  accuracy, fidelity, victim_accuracy = [], [], 0.0
  for budget in budgets:
    params = train(key_train, init_params, images, targets, weights, budget)
    metrics = evaluate_copy(functools.partial(student, params), victim.logits_fn,
                            test_images, test_labels, batch_size=eval_batch_size)
    accuracy.append(metrics.accuracy)
    fidelity.append(metrics.fidelity)
    victim_accuracy = metrics.victim_accuracy
  return BudgetCurve(budgets=np.asarray(budgets), accuracy=np.asarray(accuracy),
                     fidelity=np.asarray(fidelity), victim_accuracy=victim_accuracy,
                     queries_used=victim.queries_used - before)


# ------------------------------------------- functionally equivalent extraction


class ExtractedReLU(NamedTuple):
  """A one-hidden-layer ReLU network recovered from queries (float64 NumPy).

  logits(x) = relu(x @ w1 + b1) @ w2 + b2, for x flattened to (batch,
  input_dim). Hidden neurons come in the order found, each rescaled so its
  weight row has unit norm (the victim's neurons up to permutation and
  positive scaling, which the second layer absorbs).
  """
  w1: np.ndarray  # (input_dim, num_neurons)
  b1: np.ndarray  # (num_neurons,)
  w2: np.ndarray  # (num_neurons, num_classes)
  b2: np.ndarray  # (num_classes,)
  queries_used: int  # victim queries the extraction made
  num_neurons_found: int
  # True when extracted from probabilities: the logits are exact up to a
  # per-input constant (class 0's logit is fixed to 0), so softmax is exact.
  up_to_shift: bool
  # Relative residual of the second-layer least squares on the queried
  # points: about machine precision when every neuron was found.
  fit_residual: float
  # Largest distance of the sign indicators from {0, 1}, or the relative
  # part of the Jacobians' constant the jumps cannot produce (see the
  # extraction's docstring): near 0 when the signs are unambiguous and no
  # neuron is missing.
  sign_residual: float
  # Per neuron, how far from rank one its Jacobian change was (second over
  # first singular value): the precision its weight row was measured to.
  rank_one_residual: np.ndarray

  def logits(self, x: ArrayLike) -> np.ndarray:
    """The extracted network's logits for inputs `x` (batch first), float64."""
    flat = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    return np.maximum(flat @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

  def as_logits_fn(self) -> LogitsFn:
    """The copy as a jittable `logits_fn` in the inputs' dtype (e.g. to attack it)."""
    params = (self.w1, self.b1, self.w2, self.b2)

    def logits_fn(x: Array) -> Array:
      w1, b1, w2, b2 = (jnp.asarray(p, x.dtype) for p in params)
      return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2

    return logits_fn


class ExtractedReLU2(NamedTuple):
  """A two-hidden-layer ReLU network recovered from queries (float64 NumPy).

  logits(x) = relu(relu(x @ w1 + b1) @ w2 + b2) @ w3 + b3, for x flattened
  to (batch, input_dim). The neurons of each layer come in the order found,
  each rescaled so its incoming weight row has unit norm: the victim's
  neurons up to permutation and positive scaling per layer.
  """
  w1: np.ndarray  # (input_dim, h1)
  b1: np.ndarray  # (h1,)
  w2: np.ndarray  # (h1, h2)
  b2: np.ndarray  # (h2,)
  w3: np.ndarray  # (h2, num_classes)
  b3: np.ndarray  # (num_classes,)
  queries_used: int  # victim queries the extraction made, both layers
  # (layer 1, layer 2): queries spent finding each layer's neurons (the
  # second layer's include its last-layer fit, which needs none of its own).
  queries_per_layer: tuple[int, int]
  num_neurons_found: tuple[int, int]  # (h1, h2) found
  up_to_shift: bool  # as ExtractedReLU's: extracted from probabilities
  # Relative residual of the last-layer least squares (in the first layer's
  # activation space): about machine precision when every neuron was found.
  fit_residual: float
  # (layer 1, layer 2). Layer 1: the largest ratio, over neurons, of the
  # Jacobian along the neuron's own direction on its inactive side to that
  # on its active side (0 when every first-layer neuron was found). Layer 2:
  # ExtractedReLU's sign_residual, measured in activation space.
  sign_residual: tuple[float, float]
  # Per layer, per neuron: second over first singular value of its
  # Jacobian change (the precision its weight row was measured to).
  rank_one_residual: tuple[np.ndarray, np.ndarray]

  def logits(self, x: ArrayLike) -> np.ndarray:
    """The extracted network's logits for inputs `x` (batch first), float64."""
    flat = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    hidden = np.maximum(np.maximum(flat @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2, 0.0)
    return hidden @ self.w3 + self.b3

  def as_logits_fn(self) -> LogitsFn:
    """The copy as a jittable `logits_fn` in the inputs' dtype (e.g. to attack it)."""
    params = (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)

    def logits_fn(x: Array) -> Array:
      w1, b1, w2, b2, w3, b3 = (jnp.asarray(p, x.dtype) for p in params)
      hidden = jax.nn.relu(jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2)
      return hidden @ w3 + b3

    return logits_fn


class _Neuron(NamedTuple):
  normal: np.ndarray  # unit normal of the critical hyperplane, towards the + side
  offset: float  # normal . x + offset = 0 on the hyperplane
  jump: np.ndarray  # change of the Jacobian crossing to the + side: jump (x) normal
  quality: float  # second over first singular value of the Jacobian change
  # The Jacobian measured on the - side of the kink (the + side's is it plus
  # jump (x) normal): what a first-layer neuron's sign is read from.
  minus_jacobian: np.ndarray | None = None


def _scores_fn(victim: QueryInterface, input_shape: tuple[int, ...]) -> Callable:
  """Flat float64 points -> piecewise-linear scores from the victim, counted.

  Logits are used as they are; probabilities as log p[1:] - log p[0], the
  logit differences, which (unlike log p) are piecewise linear.
  """
  def scores(points: np.ndarray) -> np.ndarray:
    answer = victim.query(points.reshape((len(points),) + input_shape))
    if victim.output == "logits":
      return answer
    with np.errstate(divide="ignore"):
      log_p = np.log(answer)
    if not np.all(np.isfinite(log_p)):
      raise ValueError("A probability underflowed to 0, so its logit difference is lost; "
                       "shorten line_length (the search queries far from the data).")
    return log_p[:, 1:] - log_p[:, :1]
  return scores


def _line_kinks(scores: Callable, x0: np.ndarray, direction: np.ndarray, t_lo: float,
                t_hi: float, *, slope_step: float, tolerance: float, min_interval: float,
                rng: np.random.Generator, noise: float = 0.0,
                reference_length: float | None = None) -> tuple[list, list]:
  """All kinks of t -> scores(x0 + t direction) on [t_lo, t_hi].

  Carlini et al.'s search: an interval whose end slopes agree is linear; one
  whose end lines meet at t* and which the scores follow on both sides of t*
  holds a single kink at t*; any other is split (at a jittered midpoint,
  with the slopes measured on both sides of the cut) and searched again.
  The scores are only ever asked inside [t_lo, t_hi] (a line kept inside a
  region, such as the positive orthant of a layer's activations). A slope
  change below `tolerance` times the scores over `reference_length` (by
  default the interval's half-width) counts as none: a short window checked
  for a kink a long line found passes the long line's length, so that the
  window's shortness does not hide a weak neuron's kink.

  Returns:
    (sorted kink positions t, [(t, scores)] of the points queried, for the
    second-layer fit).
  """
  def at(ts):
    ts = np.asarray(ts, np.float64)
    return scores(x0[None, :] + ts[:, None] * direction[None, :])

  half_width = 0.5 * (t_hi - t_lo) if reference_length is None else reference_length
  ends = np.array([t_lo, t_lo + slope_step, t_hi - slope_step, t_hi])
  v = at(ends)
  seen = [(ends[0], v[0]), (ends[3], v[3])]
  # Each interval carries its end slopes and their error bounds, 2 noise /
  # step for a slope measured over `step`: the victim's rounding must never
  # pass for a kink (or the search would split intervals without end).
  slope_error = 2 * noise / slope_step
  stack = [(t_lo, t_hi, v[0], v[3], (v[1] - v[0]) / slope_step,
            (v[3] - v[2]) / slope_step, slope_error, slope_error)]
  kinks = []
  while stack:
    t_left, t_right, g_left, g_right, s_left, s_right, e_left, e_right = stack.pop()
    width = t_right - t_left
    value_scale = max(np.max(np.abs(g_left)), np.max(np.abs(g_right)), 1.0)
    slope_scale = max(np.max(np.abs(s_left)), np.max(np.abs(s_right)),
                      value_scale / half_width)
    jump = s_right - s_left
    if np.max(np.abs(jump)) <= tolerance * slope_scale + 4 * (e_left + e_right):
      continue  # linear (two kinks cancelling exactly has probability 0)
    tol_value = tolerance * value_scale + 8 * noise
    # Where the left and right lines meet (least squares over the outputs).
    tau = float(jump @ (g_left - g_right + s_right * width) / (jump @ jump))
    probe = 1e-2 * min(tau, width - tau)
    if probe > 0:
      t_star = t_left + tau
      g = at([t_star - probe, t_star + probe, t_star])
      seen += [(t_star - probe, g[0]), (t_star + probe, g[1]), (t_star, g[2])]
      # The scores must follow the left line up to t* and the right line
      # from t* on, and the two must meet at t*: two kinks close together
      # fail the last test (their outer lines miss each other, or meet off
      # the middle piece).
      at_kink = g_left + s_left * tau
      reach_left, reach_right = e_left * tau, e_right * (width - tau)
      single = (np.max(np.abs(g[0] - (g_left + s_left * (tau - probe))))
                <= tol_value + reach_left
                and np.max(np.abs(g[1] - (g_right + s_right * (tau + probe - width))))
                <= tol_value + reach_right
                and np.max(np.abs(g[2] - at_kink)) <= tol_value + reach_left
                and np.max(np.abs(g_right + s_right * (tau - width) - at_kink))
                <= tol_value + reach_left + reach_right)
      if single:
        # The end slopes fix t* only to within the test's tolerance over a
        # small slope jump (worse when a kink sits near an end, inside the
        # step its slope was measured over). Lines through two points on
        # each side of t* fix it to float precision, and accept it only if
        # the kink is between them with the interval's slope jump.
        outer = at([t_star - 2 * probe, t_star + 2 * probe])
        seen += [(t_star - 2 * probe, outer[0]), (t_star + 2 * probe, outer[1])]
        slope_in = (g[0] - outer[0]) / probe
        slope_out = (outer[1] - g[1]) / probe
        jump_local = slope_out - slope_in
        if (np.max(np.abs(jump_local - jump))
            <= 1e-3 * np.max(np.abs(jump)) + 4 * (e_left + e_right) + 16 * noise / probe):
          size = float(jump_local @ jump_local)
          shift = (float(jump_local @ (g[0] - g[1] + slope_out * 2 * probe)) / size
                   if size > 0 else -1.0)
          if 0.0 < shift < 2 * probe:
            kinks.append(t_star - probe + shift)
            continue
    if width < min_interval:
      continue  # kinks closer than the search resolves: left for another line
    t_mid = t_left + width * (0.5 + 0.1 * (rng.random() - 0.5))
    step = min(slope_step, width / 16)
    g = at([t_mid - step, t_mid, t_mid + step])
    seen.append((t_mid, g[1]))
    stack.append((t_left, t_mid, g_left, g[1], s_left, (g[1] - g[0]) / step,
                  e_left, 2 * noise / step))
    stack.append((t_mid, t_right, g[1], g_right, (g[2] - g[1]) / step, s_right,
                  2 * noise / step, e_right))
  return sorted(kinks), seen


def _segment_jacobian(scores: Callable, x0: np.ndarray, direction: np.ndarray, t_left: float,
                      t_right: float, fd_step: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(midpoint, scores there, Jacobian there) of the segment between two kinks.

  The coordinate steps are fd_step times the half-width over sqrt(d): a
  hyperplane crossed at distance r along the line (r >= the half-width for
  every one crossed on this line) is typically r / sqrt(d) away, so the steps
  stay inside the segment's linear region.
  """
  point = x0 + 0.5 * (t_left + t_right) * direction
  step = fd_step * 0.5 * (t_right - t_left) / math.sqrt(len(x0))
  value, jacobian = _jacobian(scores, point, step)
  return point, value, jacobian


def _noise_level(scores: Callable, centres: np.ndarray, rng: np.random.Generator,
                 step: float) -> tuple[float, float]:
  """(absolute noise, typical magnitude) of the scores, around 8 `centres`.

  The noise is the median second difference over 8 short random segments,
  on which the scores are linear (a kink within `step` has probability ~0),
  so it measures the victim's rounding alone: ~1e-16 |g| for float64 logits,
  ~1e-7 |g| for float32.
  """
  directions = rng.normal(size=centres.shape)
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  g = scores(np.concatenate([centres - step * directions, centres,
                             centres + step * directions])).reshape(3, len(centres), -1)
  second = np.max(np.abs(g[0] - 2 * g[1] + g[2]), axis=-1)
  return float(np.median(second)), float(max(np.median(np.abs(g[1])), 1e-300))


def _jacobian(scores: Callable, x: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
  """(scores(x), d scores / dx) by forward differences: exact inside a linear region."""
  points = np.concatenate([x[None, :], x[None, :] + step * np.eye(len(x))])
  g = scores(points)
  return g[0], ((g[1:] - g[0]) / step).T


def _assemble(neurons: list, jacobians: list, fit_points: list, fit_scores: list
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
  """The network from its measured neurons: (w1, b1, w2, b2, sign_residual, fit_residual).

  Signs from the constant part of the Jacobians (a 0/1 mix of the jumps),
  then the second layer by least squares on the queried points.
  """
  normals = np.stack([n.normal for n in neurons])  # (h, d)
  offsets = np.array([n.offset for n in neurons])
  jumps = np.stack([n.jump for n in neurons])  # (h, m)
  rank_ones = np.einsum("hm,hd->hmd", jumps, normals).reshape(len(neurons), -1)
  # The median over the measured Jacobians ignores one spoiled by a step
  # that crossed a hyperplane.
  constant = np.median([((normals @ point + offsets > 0).astype(np.float64) @ rank_ones)
                        - jac.ravel() for point, jac in jacobians], axis=0)
  negative = np.linalg.lstsq(rank_ones.T, constant, rcond=None)[0]
  # A missed neuron shows as indicators off {0, 1}, or as a constant the
  # jumps cannot produce.
  unexplained = (np.linalg.norm(rank_ones.T @ negative - constant)
                 / max(np.linalg.norm(constant), np.max(np.abs(rank_ones)), 1e-300))
  sign_residual = float(max(np.max(np.abs(negative - np.round(negative))), unexplained))
  signs = np.where(negative > 0.5, -1.0, 1.0)
  w1 = (normals * signs[:, None]).T
  b1 = offsets * signs
  points, targets = np.stack(fit_points), np.stack(fit_scores)
  features = np.concatenate([np.maximum(points @ w1 + b1, 0.0), np.ones((len(points), 1))], 1)
  solution = np.linalg.lstsq(features, targets, rcond=None)[0]
  fit_residual = float(np.linalg.norm(features @ solution - targets)
                       / max(np.linalg.norm(targets), 1e-300))
  return w1, b1, solution[:-1], solution[-1], sign_residual, fit_residual


def _with_reference_class(w: np.ndarray, b: np.ndarray,
                          up_to_shift: bool) -> tuple[np.ndarray, np.ndarray]:
  """The last layer with class 0's logit (fixed to 0) prepended when fitted to
  logit differences (probabilities), which are relative to class 0."""
  if not up_to_shift:
    return w, b
  return np.concatenate([np.zeros((len(w), 1)), w], 1), np.concatenate([[0.0], b])


def _input_space_search(key: PRNGKey, victim: QueryInterface, shape: tuple[int, ...],
                        tolerance: float, fd_step: float | None,
                        input_range: tuple[float, float], line_length: float | None) -> tuple:
  """What a critical-point search in input space starts from (checked settings).

  Returns (dim, low, high, line length, host rng, counted scores, the
  calibrated `_Search`, and `sample_line()`: a random line through a point
  of the input range, searched over [-length, length]). The calibration
  queries the victim.
  """
  check_in_open_interval(tolerance, "tolerance", 0.0, 1.0)
  if fd_step is not None:
    check_in_open_interval(fd_step, "fd_step", 0.0, 1.0)
  dim = int(np.prod(shape))
  low, high = float(input_range[0]), float(input_range[1])
  length = 2.0 * math.sqrt(dim) * (high - low) if line_length is None else line_length
  check_positive(length, "line_length")
  rng = _host_rng(key)
  scores = _scores_fn(victim, shape)
  search = _calibrate(scores, rng.uniform(low, high, (8, dim)), rng, length, tolerance,
                      fd_step)

  def sample_line():
    x0 = rng.uniform(low, high, dim)
    u = rng.normal(size=dim)
    return x0, u / np.linalg.norm(u), -length, length

  return dim, low, high, length, rng, scores, search, sample_line


def _check_extraction_settings(victim: QueryInterface, input_shape: Any, num_hidden: Any,
                               max_lines: int, patience: int,
                               input_range: tuple[float, float]) -> tuple[int, ...]:
  if victim.output not in ("logits", "probabilities"):
    raise ValueError(
        "Functionally equivalent extraction needs exact scores: the victim's output must "
        f"be 'logits' or 'probabilities', not {victim.output!r} (rounded, top-k and "
        "label-only answers are the defences that remove the finite differences it uses).")
  shape = tuple(int(s) for s in np.atleast_1d(input_shape))
  if not shape or any(s < 1 for s in shape):
    raise ValueError(f"input_shape must be a non-empty tuple of positive sizes; got "
                     f"{input_shape!r}.")
  if num_hidden is not None:
    check_int_at_least(num_hidden, "num_hidden", 1)
  check_int_at_least(max_lines, "max_lines", 1)
  check_int_at_least(patience, "patience", 1)
  low, high = input_range
  if not (math.isfinite(low) and math.isfinite(high) and low < high):
    raise ValueError(f"input_range must be (low, high) with low < high; got {input_range!r}.")
  return shape


class _Search(NamedTuple):
  """The critical-point search's settings, set by the scores' measured noise."""
  length: float  # the lines' length scale (half-length of a symmetric line)
  noise: float  # absolute rounding noise of the scores
  slope_step: float  # step of the end slopes in `_line_kinks`
  tolerance: float  # relative tolerance of the linearity tests
  fd_step: float  # relative finite-difference step of the Jacobians
  same_plane: float  # a kink this close (relative to length) to a known hyperplane is it
  good_quality: float  # a neuron measured worse is measured again when crossed again
  complete: float  # residuals below this: the neurons found explain the queries


def _calibrate(scores: Callable, centres: np.ndarray, rng: np.random.Generator, length: float,
               tolerance: float, fd_step: float | None) -> _Search:
  """The search's settings for `scores`, from their noise around `centres` (24 queries).

  The victim's rounding sets the finite-difference steps: a float32 model
  needs steps ~1e2 times longer than a float64 one, and the tests allow for
  its noise.
  """
  noise, magnitude = _noise_level(scores, centres, rng, 1e-6 * length)
  relative_noise = max(noise / magnitude, np.finfo(np.float64).eps)
  if fd_step is None:
    # Measured on 784-32-10 MLPs: 0.1 gives 1e-10 logit errors for float64
    # victims; float32 ones need the longest steps that stay inside the
    # region (0.9: 3e-3 instead of 1.2 at 0.1).
    fd_step = 0.1 if relative_noise <= 1e-12 else 0.9
  return _Search(
      length=length, noise=noise, tolerance=tolerance, fd_step=fd_step,
      slope_step=float(np.clip(1e2 * relative_noise, 1e-5, 1e-2)) * length,
      same_plane=float(np.clip(1e6 * relative_noise, 1e-6, 1e-3)),
      good_quality=float(np.clip(1e5 * relative_noise, 1e-9, 1e-3)),
      complete=float(np.clip(1e3 * relative_noise, 1e-7, 1e-2)))


class _Found(NamedTuple):
  """What the critical-point search measured (lists grown in place)."""
  neurons: list  # _Neuron per neuron found
  jacobians: list  # (point, Jacobian) of every segment measured, for the signs
  fit_points: list  # every point queried on the lines, with its scores
  fit_scores: list


def _search_line(scores: Callable, line: tuple, found: _Found, search: _Search,
                 rng: np.random.Generator, num_hidden: int | None,
                 accept: Callable | None) -> int:
  """Steps 1-2 of the extraction on one line: the new neurons it crosses, added to `found`.

  `line` is (x0, u, t_lo, t_hi). A kink on a known neuron's hyperplane is
  that neuron (measured again only if its measurement was poor); a new one
  whose Jacobian change is rank one is offered to `accept` (neuron, kink
  point) -> bool, when given, before it is kept.

  Returns:
    The number of new neurons kept.
  """
  x0, u, t_lo, t_hi = line
  length = search.length
  neurons = found.neurons
  kinks, seen = _line_kinks(scores, x0, u, t_lo, t_hi, slope_step=search.slope_step,
                            tolerance=search.tolerance, min_interval=1e-9 * length, rng=rng,
                            noise=search.noise)
  for t, g in seen:
    found.fit_points.append(x0 + t * u)
    found.fit_scores.append(g)
  bounds = [t_lo, *kinks, t_hi]
  segment_jacobians: dict = {}
  new = 0
  for index, t in enumerate(kinks):
    point = x0 + t * u
    known = [j for j, n in enumerate(neurons)
             if abs(n.normal @ point + n.offset) <= search.same_plane * length]
    if known and neurons[known[0]].quality <= search.good_quality:
      continue  # a known neuron's hyperplane, measured well enough already
    for segment in (index, index + 1):
      if segment not in segment_jacobians:
        point_mid, value, jac = _segment_jacobian(scores, x0, u, bounds[segment],
                                                  bounds[segment + 1], search.fd_step)
        segment_jacobians[segment] = jac
        found.jacobians.append((point_mid, jac))
        found.fit_points.append(point_mid)
        found.fit_scores.append(value)
    jump = segment_jacobians[index + 1] - segment_jacobians[index]
    _, singular, right = np.linalg.svd(jump, full_matrices=False)
    # How far from rank one the jump is: rounding noise, or a step that
    # crossed another hyperplane, or two hyperplanes meeting here.
    quality = float(singular[1] / singular[0]) if len(singular) > 1 else 0.0
    normal = right[0] if right[0] @ u > 0 else -right[0]
    # The normal points along u, so the - side is the segment before the kink.
    neuron = _Neuron(normal=normal, offset=float(-normal @ point), jump=jump @ normal,
                     quality=quality, minus_jacobian=segment_jacobians[index])
    if known:  # a second measurement of a poorly measured neuron
      if quality < neurons[known[0]].quality:
        neurons[known[0]] = neuron
      continue
    if quality > _RANK_ONE_MAX or (accept is not None and not accept(neuron, point)):
      continue
    neurons.append(neuron)
    new += 1
    if num_hidden is not None and len(neurons) >= num_hidden:
      break
  return new


def _search_neurons(scores: Callable, sample_line: Callable, search: _Search,
                    rng: np.random.Generator, *, num_hidden: int | None, max_lines: int,
                    patience: int, residual: Callable,
                    accept: Callable | None = None) -> _Found:
  """Lines from `sample_line()` until `num_hidden` neurons are found, or (without
  it) until `patience` lines in a row found none AND `residual(found)` (how
  badly the neurons found explain the queries) is at the noise level: a
  neuron that few lines cross would otherwise be missed."""
  found = _Found([], [], [], [])
  idle = 0
  for _ in range(max_lines):
    if num_hidden is not None and len(found.neurons) >= num_hidden:
      break
    new = _search_line(scores, sample_line(), found, search, rng, num_hidden, accept)
    idle = 0 if new else idle + 1
    if num_hidden is None and idle >= patience:
      if not found.neurons or residual(found) <= search.complete:
        break
      idle = 0
  return found


def _assembly_residual(found: _Found) -> float:
  """The larger of `_assemble`'s sign and fit residuals for the neurons found."""
  return max(_assemble(found.neurons, found.jacobians, found.fit_points, found.fit_scores)[4:])


def _host_rng(key: PRNGKey) -> np.random.Generator:
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def extract_one_hidden_layer(key: PRNGKey, victim: QueryInterface,
                             input_shape: Sequence[int], *, num_hidden: int | None = None,
                             max_lines: int = 64, patience: int = 8,
                             line_length: float | None = None,
                             input_range: tuple[float, float] = (0.0, 1.0),
                             tolerance: float = 1e-7,
                             fd_step: float | None = None) -> ExtractedReLU:
  """Functionally equivalent extraction of f(x) = A2 relu(A1 x + b1) + b2.

  The critical-point method (Jagielski et al. 2020, Section 6; Carlini et al.
  2020), on the host in float64:

  1. Critical points: along random lines x0 + t u (x0 uniform in
     `input_range`^d, u a random direction, |t| <= line_length), find every
     kink of the scores by the slope-matching search of `_line_kinks`. Each
     kink lies on one neuron's critical hyperplane A1_i x + b1_i = 0.
  2. Weights up to scale: the scores are linear between consecutive kinks,
     so their Jacobian there is exact by finite differences (input_dim + 1
     queries per segment, shared by the two kinks bounding it). Crossing
     neuron i's hyperplane changes the Jacobian by a rank-one matrix,
     +-A2[:, i] A1_i; its right singular vector is A1_i's direction, so the
     hyperplane is known (normal and offset through the kink). A kink lying
     on an already known hyperplane is the same neuron (deduplication): it
     costs no Jacobian, unless that neuron's change was measured far from
     rank one (`rank_one_residual`), when it is measured again and the
     better measurement kept.
  3. Signs: relu(z) and relu(-z) share a hyperplane. With every neuron
     found, each measured Jacobian J(x) equals sum_i [x on i's + side]
     jump_i - sum_{i active on its - side} jump_i, so the constant second
     sum is a 0/1 combination of the jumps: solved by least squares and
     rounded (no further queries).
  4. Second layer: least squares of the queried scores on the recovered
     hidden activations and a constant (no further queries).

  Stopping: with `num_hidden`, once that many neurons are found; without,
  once `patience` lines in a row found none AND the neurons found explain
  the queries (`sign_residual` and `fit_residual` at the victim's noise
  level), since a neuron that few lines cross would otherwise be missed.

  What the victim must return: output='logits' gives the logits exactly;
  output='probabilities' gives logits up to a per-input constant (the
  attack uses log p[1:] - log p[0], which is piecewise linear, and returns
  a network whose class-0 logit is 0). Rounded, top-k or label answers are
  refused. The search queries points far outside `input_range` (the victim
  must accept any real input) and assumes generic weights: no two neurons
  share a hyperplane, every hyperplane crosses the region searched, and
  the sign step needs num_hidden <= input_dim x (outputs used) (contractive
  or modestly expansive layers; 10-30-2 fails).

  Precision follows the victim's. The victim's rounding noise is measured
  first (second differences on 8 short segments, 24 queries) and sets the
  slope steps and test tolerances: float64 victims give ~1e-10 logit
  errors; a float32 784-32-10 MLP gave 3e-3 (fidelity 0.99), and a trained
  float32 784-128-10 one fails (1 of 128 neurons found, fidelity 0.10: its
  rounding noise swamps most Jacobian changes). Run float32 models in
  float64 (`jax.experimental.enable_x64`) to measure what the attack can do.

  Args:
    key: a `jax.random.key` (seeds the host's line sampling).
    victim: a `QueryInterface` with output 'logits' or 'probabilities'.
    input_shape: the shape of one input (e.g. (28, 28, 1) or (784,)).
    num_hidden: the hidden width if the attacker knows it: the search stops
      as soon as this many neurons are found.
    max_lines: the most lines searched.
    patience: without `num_hidden`, stop after this many consecutive lines
      find no new neuron. A line costs few queries unless it finds one (a
      trained 784-128-10 MLP had neurons crossed by only 6% of the lines).
    line_length: half-length of each line (default 2 sqrt(d) (high - low)).
    input_range: (low, high) of the line starts, the data's range.
    tolerance: relative tolerance of the linearity tests (on top of the
      measured noise).
    fd_step: finite-difference step of the Jacobians, relative to the
      half-width of the segment measured over sqrt(d), in (0, 1); default
      0.1 for a float64 victim and 0.9 for a noisier one.

  Returns:
    An `ExtractedReLU`.

  Raises:
    ValueError: on invalid settings, or a victim whose output is not
      'logits' or 'probabilities'; `QueryBudgetExceeded` when the victim's
      budget runs out.

  References:
    Jagielski, Carlini, Berthelot, Kurakin, Papernot. High accuracy and high
      fidelity extraction of neural networks. USENIX Security 2020.
    Carlini, Jagielski, Mironov. Cryptanalytic extraction of neural network
      models. CRYPTO 2020.
  """
  victim = _check_victim(victim)
  shape = _check_extraction_settings(victim, input_shape, num_hidden, max_lines, patience,
                                     input_range)
  before = victim.queries_used
  dim, low, high, length, rng, scores, search, sample_line = _input_space_search(
      key, victim, shape, tolerance, fd_step, input_range, line_length)
  found = _search_neurons(scores, sample_line, search, rng, num_hidden=num_hidden,
                          max_lines=max_lines, patience=patience, residual=_assembly_residual)
  queries = victim.queries_used - before
  if not found.neurons:
    raise ValueError(f"No critical point found on {max_lines} lines ({queries} queries): "
                     "the scores look linear; try a longer line_length.")
  w1, b1, w2, b2, sign_residual, fit_residual = _assemble(*found)
  up_to_shift = victim.output == "probabilities"
  w2, b2 = _with_reference_class(w2, b2, up_to_shift)
  return ExtractedReLU(w1=w1, b1=b1, w2=w2, b2=b2, queries_used=queries,
                       num_neurons_found=len(found.neurons), up_to_shift=up_to_shift,
                       fit_residual=fit_residual, sign_residual=sign_residual,
                       rank_one_residual=np.array([n.quality for n in found.neurons]))


def _kinks_on_plane(scores: Callable, neuron: _Neuron, points: list, search: _Search,
                    rng: np.random.Generator, window: float) -> bool:
  """Whether the scores have a kink exactly at each of `points` (on `neuron`'s plane).

  Searched along the normal in [-window, window], short enough to hold few
  other kinks, with the linearity test of the search lines (which found
  the candidate), not one scaled to the window.
  """
  for point in points:
    kinks, _ = _line_kinks(scores, point, neuron.normal, -window, window,
                           slope_step=min(search.slope_step, window / 64),
                           tolerance=search.tolerance, min_interval=1e-9 * search.length,
                           rng=rng, noise=search.noise, reference_length=search.length)
    if not any(abs(t) <= search.same_plane * search.length for t in kinks):
      return False
  return True


def _on_plane(neuron: _Neuron, point: np.ndarray, rng: np.random.Generator,
              distance: float) -> np.ndarray:
  """`point` moved `distance` along a random direction of `neuron`'s plane."""
  w = rng.normal(size=len(point))
  w -= (w @ neuron.normal) * neuron.normal
  return point + distance * w / np.linalg.norm(w)


def _is_first_layer(scores: Callable, neuron: _Neuron, point: np.ndarray, search: _Search,
                    rng: np.random.Generator, tests: int) -> bool:
  """Whether a candidate neuron's hyperplane is global (first layer) or bends (deeper).

  A first-layer neuron's critical set is the hyperplane A1_i x + b1_i = 0
  everywhere; a second-layer neuron's is that plane only within the first
  layer's activation region where it was measured, and bends wherever a
  first-layer hyperplane is crossed. So: step 1 to 2 line lengths from the
  kink along the candidate plane, in a random direction, and look for a
  kink exactly on the plane there (Carlini et al. 2020 tell the layers
  apart by whether a critical hyperplane continues). A bent surface passes
  exactly through such a point with probability ~0. The steps are long
  because the data region can sit inside one first-layer activation region
  (random 20-10-8-3 networks do: points projected from [0, 1]^20 let
  layer-2 surfaces pass), and a second-layer surface is tested on every
  line that crosses it. All `tests` points must show the kink; a
  first-layer neuron invisible at one (its every successor inactive there)
  is only missed on this line.
  """
  points = [_on_plane(neuron, point, rng, rng.uniform(1.0, 2.0) * search.length)
            for _ in range(tests)]
  return _kinks_on_plane(scores, neuron, points, search, rng, 1e-2 * search.length)


def _is_in_orthant_plane(scores: Callable, neuron: _Neuron, search: _Search,
                         rng: np.random.Generator, scale: float, tests: int) -> bool:
  """Whether an activation-space candidate's plane holds kinks elsewhere in the orthant.

  A finite-difference step that crosses the kink's own plane back (lines
  along an axis near the orthant's corner, where the second layer's planes
  crowd, do) measures a Jacobian change that is still rank one but tilted:
  a plane that is no neuron's. A real neuron's plane is global on the
  orthant, so it shows kinks at other points of it. Each is reached from a
  random interior point q (activations 0.5 to 2 `scale`) along a random
  direction d >= 0 that moves n.z + offset towards 0 (d only on the
  activations whose weight has the sign opposite to it at q): q + t d,
  t > 0, stays inside the orthant with room for the search window (5% of
  `scale` along the normal), however thin the wedge in which the plane
  meets the orthant.
  """
  normal = neuron.normal
  points = []
  for _ in range(tests):
    inside = rng.uniform(0.5, 2.0, len(normal)) * scale
    side = normal @ inside + neuron.offset
    support = normal < 0 if side > 0 else normal > 0
    if not support.any():
      return False  # the plane misses the orthant: no neuron here
    direction = rng.uniform(0.0, 1.0, len(normal)) * support
    points.append(inside - side / (normal @ direction) * direction)
  return _kinks_on_plane(scores, neuron, points, search, rng, 0.05 * scale)


def _first_layer_signs(neurons: list) -> tuple[np.ndarray, np.ndarray, float]:
  """(w1, b1, sign residual) of first-layer neurons measured in input space.

  relu(z) and relu(-z) share a hyperplane. v_i, the part of neuron i's
  normal orthogonal to every other first-layer normal (a column of the
  normals' pseudo-inverse; needs h1 < input_dim), changes neuron i's
  pre-activation alone, so the Jacobian along v_i is exactly 0 on the side
  where neuron i is inactive and not on its active side. Both sides were
  measured at the kink that found it (no further queries). The residual is
  the largest inactive-to-active ratio: ~0 unless a first-layer neuron is
  missing (v_i then also moves the missing one).
  """
  normals = np.stack([n.normal for n in neurons])  # (h1, d)
  offsets = np.array([n.offset for n in neurons])
  dual = np.linalg.pinv(normals)  # (d, h1): normals @ dual = identity
  signs, ratios = [], []
  for i, neuron in enumerate(neurons):
    v = dual[:, i]
    minus = np.linalg.norm(neuron.minus_jacobian @ v)
    plus = np.linalg.norm(neuron.minus_jacobian @ v + neuron.jump * (neuron.normal @ v))
    signs.append(1.0 if minus < plus else -1.0)
    ratios.append(min(minus, plus) / max(minus, plus, 1e-300))
  signs = np.array(signs)
  return (normals * signs[:, None]).T, offsets * signs, float(max(ratios))


def _check_widths(num_hidden: Any, dim: int) -> tuple[int | None, int | None]:
  if num_hidden is None:
    return None, None
  if isinstance(num_hidden, (str, int)) or len(num_hidden) != 2:
    raise ValueError(f"num_hidden must be None or the two hidden widths (h1, h2); got "
                     f"{num_hidden!r}.")
  h1 = check_int_at_least(num_hidden[0], "num_hidden[0]", 1)
  h2 = check_int_at_least(num_hidden[1], "num_hidden[1]", 1)
  if h1 >= dim:
    raise ValueError(f"num_hidden[0]={h1} >= input_dim={dim}: the extraction needs a "
                     "contractive first layer (h1 < input_dim) to peel it off.")
  return int(h1), int(h2)


def extract_two_hidden_layers(key: PRNGKey, victim: QueryInterface,
                              input_shape: Sequence[int], *,
                              num_hidden: tuple[int, int] | None = None,
                              max_lines: int = 64, patience: int = 8,
                              line_length: float | None = None,
                              input_range: tuple[float, float] = (0.0, 1.0),
                              tolerance: float = 1e-7, fd_step: float | None = None,
                              layer_tests: int = 3) -> ExtractedReLU2:
  """Functionally equivalent extraction of f(x) = A3 relu(A2 relu(A1 x + b1) + b2) + b3.

  The critical-point method extended one layer deeper (Carlini, Jagielski,
  Mironov 2020, Sections 4-6), on the host in float64, for a contractive
  first layer (h1 < input_dim):

  1. Critical points in input space along random lines, exactly as
     `extract_one_hidden_layer` finds them. Every kink's Jacobian change is
     rank one: for a first-layer neuron its right singular vector is A1_i
     (a global hyperplane); for a second-layer neuron it is A2_j D1(x) A1,
     which depends on the first layer's activation pattern D1(x).
  2. Layer test (`_is_first_layer`): a new candidate is a first-layer
     neuron iff a kink sits exactly on the extension of its hyperplane at
     `layer_tests` points 1 to 2 line lengths away along it (about 9
     queries each; 0 false layer-1 neurons of 823 candidates tested over
     12 random 20-10-8-3 networks).
     Second-layer candidates are discarded; first-layer ones are
     deduplicated as in the one-layer search.
  3. First-layer signs (`_first_layer_signs`): from the Jacobians on both
     sides of each neuron's kink along the part of its normal orthogonal to
     the other first-layer normals (no further queries).
  4. Peeling: with W1, b1 known up to positive per-neuron scale, the
     activations z = x W1 + b1 reach any point of R^h1 through x(z) =
     x_c + (z - z_c) pinv(W1). On the positive orthant every first-layer
     neuron is active, so z -> f(x(z)) is a ONE-hidden-layer network,
     extracted by the one-layer search on lines kept inside the orthant
     (z0 > 0, a direction with positive entries, mostly along one axis in
     turn, t from the orthant's boundary on); its sign solve and last-layer least squares apply
     unchanged. Candidates there must also show kinks at other points of
     their plane inside the orthant (`_is_in_orthant_plane`). The network
     only ever sees first-layer activations in the closed orthant and is
     continuous, so the composed copy equals the victim everywhere.

  Stopping, per layer: with `num_hidden`, once that many neurons are found;
  without, once `patience` lines in a row found none and the neurons found
  explain the queries (first layer: `sign_residual[0]`; second layer:
  `sign_residual[1]` and `fit_residual`).

  Assumptions, beyond `extract_one_hidden_layer`'s (exact scores, generic
  weights, any real input accepted): every second-layer neuron's hyperplane
  A2_j z + b2_j = 0 crosses the positive orthant of the first layer's
  activations (one that never does is constant on or off wherever the
  network is evaluated: always off it is invisible and harmless; always on
  it shows as large second-layer residuals), and every first-layer neuron
  feeds some second-layer neuron that is active where its hyperplane is
  crossed. The layer test queries up to 3 `line_length`s from the data;
  far enough for probabilities to underflow on some models (an error says
  so). Every query goes through `victim` and counts against its budget.
  A second-layer hyperplane that crosses the orthant only further out than
  the activation-space lines reach (4 sqrt(h1) times the activations'
  typical size) is missed; the residuals show it when the queries came
  near it, and the copy is then exact only where that neuron never
  switches.

  Measured (float64 twins of MNIST MLPs, configs/extraction.py:mnist_deep):
  784-32-16-10 exact to 5e-9 in the logits with 1.5M queries (7 s on 2 CPU
  cores), 784-64-32-10 to 1.2e-8 with 1.9M; on 12 random 20-10-8-3
  networks, 11 exact everywhere tested, 1 with a second-layer plane beyond
  the lines' reach, flagged by its residuals. Float32 victims fail: their
  rounding lets second-layer surfaces pass the layer test.

  In activation space a line costs ~h1 + 1 queries per kink, so that
  search waits at least 6 h1 idle lines (every axis twice from each start)
  and may run 12 h1 lines whatever `patience` and `max_lines` say.

  Args:
    key: a `jax.random.key` (seeds the host's line sampling).
    victim: a `QueryInterface` with output 'logits' or 'probabilities'.
    input_shape: the shape of one input (e.g. (28, 28, 1) or (784,)).
    num_hidden: (h1, h2) if the attacker knows the widths; h1 < input_dim.
    max_lines: the most lines searched, per layer (at least 12 h1 in
      activation space).
    patience: without `num_hidden`, stop a layer's search after this many
      consecutive lines find no new neuron of it (and the residuals agree).
    line_length: half-length of each input-space line (default 2 sqrt(d)
      (high - low)); the activation-space lines are scaled alike from the
      activations over `input_range`.
    input_range: (low, high) of the line starts, the data's range.
    tolerance: relative tolerance of the linearity tests.
    fd_step: finite-difference step of the Jacobians (see
      `extract_one_hidden_layer`).
    layer_tests: far points on a candidate's hyperplane that must all show
      its kink for it to count as a first-layer neuron.


  Returns:
    An `ExtractedReLU2`.

  Raises:
    ValueError: on invalid settings (h1 >= input_dim included), a victim
      whose output is not 'logits' or 'probabilities', no neuron found in a
      layer, or as many first-layer neurons as inputs;
      `QueryBudgetExceeded` when the victim's budget runs out.

  References:
    Carlini, Jagielski, Mironov. Cryptanalytic extraction of neural network
      models. CRYPTO 2020.
    Jagielski, Carlini, Berthelot, Kurakin, Papernot. High accuracy and high
      fidelity extraction of neural networks. USENIX Security 2020.
  """
  victim = _check_victim(victim)
  shape = _check_extraction_settings(victim, input_shape, None, max_lines, patience,
                                     input_range)
  h1, h2 = _check_widths(num_hidden, int(np.prod(shape)))
  check_int_at_least(layer_tests, "layer_tests", 1)
  before = victim.queries_used
  # Layer 1, in input space.
  dim, low, high, length, rng, scores, search, sample_line = _input_space_search(
      key, victim, shape, tolerance, fd_step, input_range, line_length)

  def first_layer_residual(found):
    return _first_layer_signs(found.neurons)[2] if len(found.neurons) < dim else math.inf

  first = _search_neurons(
      scores, sample_line, search, rng, num_hidden=h1, max_lines=max_lines, patience=patience,
      residual=first_layer_residual,
      accept=lambda neuron, point: _is_first_layer(scores, neuron, point, search, rng,
                                                   int(layer_tests)))
  queries_first = victim.queries_used - before
  if not first.neurons:
    raise ValueError(f"No first-layer neuron found on {max_lines} lines ({queries_first} "
                     "queries); try a longer line_length.")
  if len(first.neurons) >= dim:
    raise ValueError(f"{len(first.neurons)} first-layer neurons found for {dim} inputs: the "
                     "extraction needs a contractive first layer (h1 < input_dim).")
  w1, b1, first_sign_residual = _first_layer_signs(first.neurons)

  # Layer 2, in the first layer's activation space, on its positive orthant.
  width = w1.shape[1]
  inverse = np.linalg.pinv(w1)  # (h1, d): inverse @ w1 = identity
  centre = np.full(dim, 0.5 * (low + high))
  z_centre = centre @ w1 + b1

  def z_scores(z):
    return scores(centre + (z - z_centre) @ inverse)

  # The activations' typical size over the input range (no queries): the
  # orthant lines start within it and run 4 sqrt(h1) times it (twice the
  # input lines' 2 sqrt(d): a plane that meets the orthant only where one
  # activation is large lies far out).
  scale = float(np.median(np.abs(rng.uniform(low, high, (256, dim)) @ w1 + b1)))
  z_length = 4.0 * math.sqrt(width) * scale
  z_search = _calibrate(z_scores, rng.uniform(0.1 * scale, scale, (8, width)), rng, z_length,
                        tolerance, fd_step)

  lines = itertools.count()

  def sample_orthant_line():
    # The network sees relu(z): the closed orthant, faces included. A
    # second-layer hyperplane crosses it iff some weight A2_jk has the sign
    # opposite to its bias, and then the ray from (near) the origin along
    # axis k crosses it: two lines in three run mostly along an axis (in
    # turn), from near the origin or from the activations of a random input,
    # from the face where that activation is 0 outwards; the third runs in
    # a random positive direction from a random input's activations.
    index = next(lines)
    z0 = rng.uniform(0.0, 0.1 * scale, width)
    if index % 3:
      z0 += np.maximum(rng.uniform(low, high, dim) @ w1 + b1, 0.0)
    u = np.abs(rng.normal(size=width))
    if index % 3 < 2:
      u = 0.1 * u / math.sqrt(width)
      u[(index // 3) % width] = 1.0
    u /= np.linalg.norm(u)
    return z0, u, -float(np.min(z0 / u)), z_length

  # A line here costs ~h1 queries per kink, and an axis is visited every
  # 3 lines: wait for every axis twice before stopping without the widths.
  second = _search_neurons(
      z_scores, sample_orthant_line, z_search, rng, num_hidden=h2,
      max_lines=max(max_lines, 12 * width), patience=max(patience, 6 * width),
      residual=_assembly_residual,
      accept=lambda neuron, _: _is_in_orthant_plane(z_scores, neuron, z_search, rng, scale,
                                                    int(layer_tests)))
  queries = victim.queries_used - before
  if not second.neurons:
    raise ValueError(f"No second-layer neuron found on {max_lines} lines "
                     f"({queries - queries_first} queries): the network looks linear on the "
                     "first layer's positive orthant (first-layer sign residual "
                     f"{first_sign_residual:.2g}; a wrong first layer gives that too).")
  w2, b2, w3, b3, second_sign_residual, fit_residual = _assemble(*second)
  up_to_shift = victim.output == "probabilities"
  w3, b3 = _with_reference_class(w3, b3, up_to_shift)
  return ExtractedReLU2(
      w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3, queries_used=queries,
      queries_per_layer=(queries_first, queries - queries_first),
      num_neurons_found=(len(first.neurons), len(second.neurons)), up_to_shift=up_to_shift,
      fit_residual=fit_residual, sign_residual=(first_sign_residual, second_sign_residual),
      rank_one_residual=(np.array([n.quality for n in first.neurons]),
                         np.array([n.quality for n in second.neurons])))


def max_logit_difference(extracted_fn: Any, victim_fn: Callable[[Any], Any], x: ArrayLike, *,
                         up_to_shift: bool | None = None) -> float:
  """max |extracted logits - victim logits| over the inputs `x` (float64).

  Args:
    extracted_fn: x -> logits, or an `ExtractedReLU` / `ExtractedReLU2`
      (its `logits`).
    victim_fn: x -> logits.
    x: inputs, batch first.
    up_to_shift: compare logits centred per input (mean over classes
      removed), for a copy extracted from probabilities, whose logits are
      exact up to a per-input constant. Default: the copy's own
      `up_to_shift` when given a copy, else False.
  """
  if isinstance(extracted_fn, (ExtractedReLU, ExtractedReLU2)):
    if up_to_shift is None:
      up_to_shift = extracted_fn.up_to_shift
    extracted_fn = extracted_fn.logits
  a = np.asarray(extracted_fn(x), np.float64)
  b = np.asarray(victim_fn(x), np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"The two functions must return logits of one (batch, num_classes) "
                     f"shape; got {a.shape} and {b.shape}.")
  if up_to_shift:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
  return float(np.max(np.abs(a - b)))
