"""Label-flipping poisoning: random, pairwise (source -> target) and greedy flips.

Every function returns `(indices, new_labels)`: the sorted int32 indices of
the flipped training examples and their new labels (one per index, never an
example's own label), so the poisoned labels are
`labels.at[indices].set(new_labels)`. Counts are fixed by the rate or budget,
so a flip set is reproducible from its key and settings.

  random_flips    round(rate * N) examples, each to a uniformly random other class
                  (symmetric label noise, the baseline of Biggio et al. 2011).
  pairwise_flips  round(rate * N_source) examples OF THE SOURCE CLASS -> target
                  (the rate is a share of the source class, as in the literature).
  greedy_flips    `budget` flips chosen greedily against a surrogate multinomial
                  logistic regression to raise its loss on a validation set
                  (Paudice et al. 2018's greedy attack, scored by influence functions).

Random flips rarely change a regularised model, since every class gets noise
symmetrically; the greedy flips do damage at the same budget because they pick
the examples and the classes whose relabelling moves the decision boundary
most against the validation data.

References:
  Biggio, Nelson, Laskov. Support Vector Machines Under Adversarial Label
    Noise. ACML 2011.
  Xiao, Xiao, Eckert. Adversarial Label Flips Attack on Support Vector
    Machines. ECAI 2012.
  Paudice, Munoz-Gonzalez, Lupu. Label Sanitization against Label Flipping
    Poisoning Attacks. ECML PKDD Workshops 2018 (the greedy attack that
    retrains after each flip and maximises the validation loss).
  Koh, Liang. Understanding Black-box Predictions via Influence Functions.
    ICML 2017 (the first-order effect of reweighting a training example).
  Koh, Steinhardt, Liang. Stronger Data Poisoning Attacks Break Data
    Sanitization Defenses. Machine Learning 2022 (influence-based poisoning).
  Boehning. Multinomial logistic regression algorithm. Annals of the
    Institute of Statistical Mathematics 1992 (the Hessian bound).
  Nesterov. Introductory Lectures on Convex Optimization. 2004 (accelerated
    gradient for strongly convex functions).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_int_at_least, check_labels, is_concrete
from certjax.poisoning.triggers import check_class, check_rate, choose

__all__ = ["LogisticRegression", "fit_surrogate", "greedy_flips", "pairwise_flips",
           "random_flips"]


def _labels(labels: Any, num_classes: Optional[int]) -> Array:
  check_labels(labels, num_classes=num_classes, name="labels")
  return jnp.asarray(labels, jnp.int32)


def _concrete_labels(labels: Any, function: str) -> np.ndarray:
  if not is_concrete(labels):
    raise ValueError(
        f"{function} needs concrete labels (not traced under jit/vmap): the number of flips "
        "depends on the class sizes. Call it outside jit.")
  return np.asarray(labels)


def random_flips(key: PRNGKey, labels: ArrayLike, *, rate: float,
                 num_classes: int) -> Tuple[Array, Array]:
  """Flips round(rate * N) random examples, each to a uniformly random other class.

  Args:
    key: a `jax.random.key`.
    labels: the training labels (N,), integers in [0, num_classes).
    rate: the share of the training set flipped, in [0, 1].
    num_classes: the number of classes C (>= 2).

  Returns:
    (sorted int32 indices, new int32 labels), round(rate * N) of each (Python's
    `round`). Runs under `jit` with static rate and num_classes.

  Raises:
    ValueError: on rate outside [0, 1], num_classes < 2 or labels outside
      [0, C) (checked on concrete labels).
  """
  rate = check_rate(rate, meaning=" (the share of the training set flipped)")
  num_classes = check_int_at_least(num_classes, "num_classes", 2)
  labels = _labels(labels, num_classes)
  return _random_flips(key, labels, round(rate * labels.shape[0]), num_classes)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _random_flips(key: PRNGKey, labels: Array, count: int,
                  num_classes: int) -> Tuple[Array, Array]:
  k_pick, k_class = jax.random.split(key)
  indices = choose(k_pick, jnp.ones(labels.shape, bool), count)
  # An offset in 1..C-1 makes the new class uniform over the C - 1 others.
  offsets = jax.random.randint(k_class, (count,), 1, num_classes)
  return indices, (labels[indices] + offsets) % num_classes


def pairwise_flips(key: PRNGKey, labels: ArrayLike, *, rate: float, source: int,
                   target: int, num_classes: Optional[int] = None) -> Tuple[Array, Array]:
  """Relabels a `rate` share of the source class as the target class.

  The rate is a share of the SOURCE CLASS (round(rate * N_source) examples,
  drawn uniformly without replacement), the convention of pairwise
  label-flipping experiments, not of the whole training set.

  Args:
    key: a `jax.random.key`.
    labels: the training labels (N,), concrete (the count depends on them).
    rate: the share of the source class flipped, in [0, 1].
    source: the class whose examples are flipped.
    target: the class they are given (not `source`).
    num_classes: the number of classes, to check source, target and labels
      against (optional).

  Returns:
    (sorted int32 indices, new int32 labels, all equal to target).

  Raises:
    ValueError: on rate outside [0, 1], source == target, a class outside
      [0, num_classes - 1], or traced labels.
  """
  rate = check_rate(rate, meaning=" (the share of the source class flipped)")
  if num_classes is not None:
    num_classes = check_int_at_least(num_classes, "num_classes", 2)
  source = check_class(source, "source", num_classes)
  target = check_class(target, "target", num_classes)
  if source == target:
    raise ValueError(f"source and target must be different classes; both are {source}.")
  check_labels(labels, num_classes=num_classes, name="labels")
  values = _concrete_labels(labels, "pairwise_flips")
  count = round(rate * int(np.sum(values == source)))
  indices = choose(key, jnp.asarray(values == source), count)
  return indices, jnp.full((count,), target, jnp.int32)


# ----------------------------------------------------------------------------
# The surrogate: L2-regularised multinomial logistic regression.


class LogisticRegression(NamedTuple):
  """A multinomial logistic regression: logits = features @ weights + bias.

  Attributes:
    weights: (D, C).
    bias: (C,).
  """
  weights: Array
  bias: Array

  def logits(self, features: ArrayLike) -> Array:
    """Logits (N, C) of features (N, ...) (flattened to (N, D))."""
    features = jnp.asarray(features)
    return features.reshape(features.shape[0], -1) @ self.weights + self.bias


def _penalised_loss(params: LogisticRegression, x: Array, y: Array, l2: float) -> Array:
  """Mean cross-entropy plus (l2 / 2) ||params||^2; the bias is penalised too, so
  the Hessian is positive definite (the softmax is invariant to adding a constant
  to every class, a flat direction otherwise)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(params.logits(x), y)
  squares = sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params))
  return jnp.mean(ce) + 0.5 * l2 * squares


def _gram_top_eigenvalue(x: Array, num_iterations: int = 30) -> Array:
  """The largest eigenvalue of X'X / N for X = [x, 1] (power iteration from a
  fixed, generic start vector)."""
  def gram(v):
    return (x.T @ (x @ v[:-1] + v[-1]), jnp.sum(x @ v[:-1] + v[-1], keepdims=True))

  def step(_, v):
    w = jnp.concatenate(gram(v)) / x.shape[0]
    return w / jnp.linalg.norm(w)

  start = 1.0 + 0.5 * jnp.cos(jnp.arange(x.shape[1] + 1, dtype=x.dtype))
  v = lax.fori_loop(0, num_iterations, step, start / jnp.linalg.norm(start))
  return jnp.linalg.norm(jnp.concatenate(gram(v))) / x.shape[0]


@functools.partial(jax.jit, static_argnames=("l2", "num_steps"))
def _fit(params: LogisticRegression, x: Array, y: Array, l2: float,
         num_steps: int) -> LogisticRegression:
  """`num_steps` steps of Nesterov's accelerated gradient from `params`.

  The penalised loss is l2-strongly convex and L-smooth with
  L <= lambda_max(X'X / N) / 2 + l2 (Boehning's bound on the softmax
  cross-entropy Hessian, X = [x, 1]), so step 1 / L with momentum
  (1 - sqrt(q)) / (1 + sqrt(q)), q = l2 / L, converges linearly at rate
  1 - sqrt(q) (Nesterov 2004, section 2.2). A small program: it compiles in a
  fraction of L-BFGS's time, which dominates on small problems.
  """
  # 10% above the power-iteration estimate, which approaches lambda_max from below.
  smooth = 1.1 * 0.5 * _gram_top_eigenvalue(x) + l2
  rate = 1.0 / smooth
  root = jnp.sqrt(l2 * rate)
  momentum = (1.0 - root) / (1.0 + root)
  grad = jax.grad(_penalised_loss)

  def body(_, carry):
    params, previous = carry
    ahead = jax.tree_util.tree_map(lambda p, q: p + momentum * (p - q), params, previous)
    step = grad(ahead, x, y, l2)
    return jax.tree_util.tree_map(lambda a, g: a - rate * g, ahead, step), params

  params, _ = lax.fori_loop(0, num_steps, body, (params, params))
  return params


def _check_features(features: Any, name: str, num_examples: Optional[int] = None) -> Array:
  shape = np.shape(features)
  if len(shape) < 2:
    raise ValueError(f"{name} must have shape (N, ...) with one row per example; got "
                     f"{tuple(shape)}.")
  if num_examples is not None and shape[0] != num_examples:
    raise ValueError(f"{name} has {shape[0]} rows but there are {num_examples} labels; they "
                     "must match.")
  features = jnp.asarray(features)
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array; got dtype {features.dtype}.")
  if is_concrete(features) and not np.all(np.isfinite(np.asarray(features))):
    raise ValueError(f"{name} must be finite; it holds NaN or Inf values.")
  return features.reshape(shape[0], -1)


def _check_l2(l2: Any) -> float:
  if not (isinstance(l2, (int, float, np.integer, np.floating)) and math.isfinite(l2)
          and l2 > 0):
    raise ValueError(f"l2 must be a finite number > 0 (the surrogate's ridge penalty); got "
                     f"{l2!r}.")
  return float(l2)


def fit_surrogate(features: ArrayLike, labels: ArrayLike, *, num_classes: int,
                  l2: float = 1e-3, num_steps: int = 300,
                  init: Optional[LogisticRegression] = None) -> LogisticRegression:
  """Fits an L2-regularised multinomial logistic regression by full-batch descent.

  Minimises mean cross-entropy + (l2 / 2) (||W||^2 + ||b||^2) with
  Nesterov's accelerated gradient (step 1 / L from Boehning's bound on the
  Hessian) for `num_steps` steps in a `lax.fori_loop`, from `init` (warm
  start) or zeros. The objective is strongly convex, so the fit tends to its
  unique optimum; the error shrinks by about exp(-sqrt(l2 / L)) a step, L ~
  lambda_max(X'X / N) / 2: 300 steps reach a gradient norm ~1e-5 on 7x7
  digits (L ~ 1.8, l2 = 1e-3); 784-pixel digits (L ~ 20) need ~1,000.

  Args:
    features: (N, ...) float features (flattened to (N, D)), e.g. images in
      [0, 1] or a network's penultimate activations.
    labels: (N,) integer labels in [0, num_classes).
    num_classes: the number of classes C.
    l2: the ridge penalty (> 0).
    num_steps: gradient steps (>= 1).
    init: starting parameters.

  Returns:
    The fitted `LogisticRegression`.

  Raises:
    ValueError: on mismatched or non-finite features, labels out of range,
      l2 <= 0 or num_steps < 1.
  """
  num_classes = check_int_at_least(num_classes, "num_classes", 2)
  labels = _labels(labels, num_classes)
  x = _check_features(features, "features", labels.shape[0])
  l2 = _check_l2(l2)
  num_steps = check_int_at_least(num_steps, "num_steps", 1)
  if init is None:
    init = LogisticRegression(jnp.zeros((x.shape[1], num_classes), x.dtype),
                              jnp.zeros((num_classes,), x.dtype))
  return _fit(init, x, labels, l2, num_steps)


# ----------------------------------------------------------------------------
# Greedy flips.


@functools.partial(jax.jit, static_argnames=("budget", "chunk_size", "num_classes", "l2",
                                             "fit_steps", "refit_steps", "cg_steps"))
def _greedy(x: Array, y: Array, x_val: Array, y_val: Array, *, budget: int, chunk_size: int,
            num_classes: int, l2: float, fit_steps: int, refit_steps: int,
            cg_steps: int) -> Tuple[Array, Array]:
  num_chunks = -(-budget // chunk_size)
  init = LogisticRegression(jnp.zeros((x.shape[1], num_classes), x.dtype),
                            jnp.zeros((num_classes,), x.dtype))
  params = _fit(init, x, y, l2, fit_steps)
  rows = jnp.arange(x.shape[0])
  own = jax.nn.one_hot(y, num_classes, dtype=bool)

  def validation_loss(params):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(params.logits(x_val),
                                                                    y_val))

  def body(step, carry):
    params, current, flipped, picked, new_labels = carry
    train_grad = jax.grad(_penalised_loss)

    def hvp(v):
      return jax.jvp(lambda p: train_grad(p, x, current, l2), (params,), (v,))[1]

    # Influence of a relabelling (Koh & Liang 2017): giving example i class c
    # instead of y changes the training gradient by d = (x_i, 1) (e_y - e_c)^T / N
    # (the logistic gradient x (p - e_label)^T: p cancels), which moves the optimum
    # by -H^-1 d and the validation loss by -g_val^T H^-1 d. With v = H^-1 g_val
    # (one conjugate-gradient solve per chunk) and u_i = x_i V_W + v_b, that is
    # (u_ic - u_iy) / N for every (i, c) at once.
    v, _ = jax.scipy.sparse.linalg.cg(hvp, jax.grad(validation_loss)(params),
                                      maxiter=cg_steps)
    u = v.logits(x)
    gain = u - u[rows, current][:, None]
    gain = jnp.where(own | flipped[:, None] | ~jnp.isfinite(gain), -jnp.inf, gain)
    best_class = jnp.argmax(gain, axis=1).astype(jnp.int32)
    # Flips add up to first order, so the chunk's best set is the chunk_size
    # examples with the largest single gains (one flip per example).
    _, top = lax.top_k(jnp.max(gain, axis=1), chunk_size)
    top = top.astype(jnp.int32)
    current = current.at[top].set(best_class[top])
    flipped = flipped.at[top].set(True)
    picked = lax.dynamic_update_slice(picked, top, (step * chunk_size,))
    new_labels = lax.dynamic_update_slice(new_labels, best_class[top], (step * chunk_size,))
    params = _fit(params, x, current, l2, refit_steps)
    return params, current, flipped, picked, new_labels

  total = num_chunks * chunk_size
  carry = (params, y, jnp.zeros(y.shape, bool), jnp.zeros((total,), jnp.int32),
           jnp.zeros((total,), jnp.int32))
  _, _, _, picked, new_labels = lax.fori_loop(0, num_chunks, body, carry)
  # top_k lists a chunk best first, so when the last chunk is only partly within
  # the budget the flips kept are its best ones.
  picked, new_labels = picked[:budget], new_labels[:budget]
  order = jnp.argsort(picked)
  return picked[order], new_labels[order]


def greedy_flips(features: ArrayLike, labels: ArrayLike, *, budget: int, num_classes: int,
                 validation: Optional[Tuple[ArrayLike, ArrayLike]] = None,
                 chunk_size: Optional[int] = None, l2: float = 1e-3, fit_steps: int = 300,
                 refit_steps: int = 50, cg_steps: int = 100) -> Tuple[Array, Array]:
  """The `budget` most damaging label flips, found greedily against a surrogate.

  Paudice et al. (2018)'s greedy label-flipping attack, with the surrogate
  an L2-regularised multinomial logistic regression on `features` (flattened
  images, or a network's penultimate features for a transfer attack) and the
  exhaustive "flip, retrain, evaluate" search over every candidate replaced
  by its first-order estimate (an influence function, Koh & Liang 2017), so
  that one step costs one Hessian solve instead of N (C - 1) refits:

    1. fit the surrogate on the clean labels (`fit_steps` steps of `fit_surrogate`);
    2. estimate, for every unflipped example i and class c != y_i, how much
       relabelling i as c raises the surrogate's cross-entropy on the
       validation set after refitting (one conjugate-gradient solve,
       `cg_steps` iterations, with Hessian-vector products);
    3. flip the `chunk_size` examples with the largest estimated gains, each
       to its best class (to first order the gains add up, so this is the
       chunk's best set);
    4. refit from the current parameters (warm start, `refit_steps`
       steps) on the flipped labels, and repeat from 2 until `budget`
       flips are chosen.

  Chunking trades fidelity for time: chunk_size=1 is the fully greedy
  attack (a refit after every flip); the default, ceil(budget / 10), refits
  ten times whatever the budget. An example is flipped at most once. Runs as
  one compiled program (`lax.fori_loop` over chunks); the influence estimate
  assumes a converged fit, hence the full first fit.

  Args:
    features: training features (N, ...) (flattened to (N, D)).
    labels: training labels (N,) in [0, num_classes).
    budget: the number of flips, an integer in [0, N].
    num_classes: the number of classes C.
    validation: (features, labels) of a held-out set whose surrogate loss is
      maximised; default: the training set with its clean labels.
    chunk_size: flips chosen between refits (default ceil(budget / 10)).
    l2: the surrogate's ridge penalty.
    fit_steps: gradient steps of the first fit.
    refit_steps: gradient steps of each warm-started refit.
    cg_steps: conjugate-gradient iterations of each Hessian solve.

  Returns:
    (sorted int32 indices, new int32 labels), `budget` of each.

  Raises:
    ValueError: on a budget outside [0, N], mismatched shapes, labels out of
      range or invalid settings.
  """
  num_classes = check_int_at_least(num_classes, "num_classes", 2)
  labels = _labels(labels, num_classes)
  x = _check_features(features, "features", labels.shape[0])
  num_examples = labels.shape[0]
  if (isinstance(budget, bool) or not isinstance(budget, (int, np.integer))
      or not 0 <= budget <= num_examples):
    raise ValueError(f"budget must be an integer number of flips in [0, {num_examples}] (the "
                     f"training set size); got {budget!r}.")
  budget = int(budget)
  if validation is None:
    x_val, y_val = x, labels
  else:
    try:
      val_features, val_labels = validation
    except (TypeError, ValueError):
      raise ValueError("validation must be a (features, labels) pair; got "
                       f"{type(validation).__name__}.")
    y_val = _labels(val_labels, num_classes)
    x_val = _check_features(val_features, "validation features", y_val.shape[0])
    if x_val.shape[1] != x.shape[1]:
      raise ValueError(f"validation features have {x_val.shape[1]} dimensions per example but "
                       f"the training features {x.shape[1]}; they must match.")
  chunk_size = max(1, -(-budget // 10)) if chunk_size is None else check_int_at_least(
      chunk_size, "chunk_size", 1)
  l2 = _check_l2(l2)
  fit_steps = check_int_at_least(fit_steps, "fit_steps", 1)
  refit_steps = check_int_at_least(refit_steps, "refit_steps", 1)
  cg_steps = check_int_at_least(cg_steps, "cg_steps", 1)
  if budget == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32)
  return _greedy(x, labels, x_val.astype(x.dtype), y_val, budget=budget,
                 chunk_size=min(chunk_size, budget), num_classes=num_classes, l2=l2,
                 fit_steps=fit_steps, refit_steps=refit_steps, cg_steps=cg_steps)
