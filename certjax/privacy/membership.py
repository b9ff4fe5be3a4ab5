"""Membership inference: scores from cached logits and membership masks, and their metrics.

One interface for every attack. Logits are computed once, elsewhere (by the
'membership' evaluator, or by a user on their own models), and held in a
`MembershipInputs`:

    inputs = MembershipInputs(target_logits, labels,           # [N, A, C], [N]
                              shadow_logits, shadow_masks)     # [K, N, A, C], [K, N]
    scores = score('lira_online', inputs)                      # [N], higher = member
    summarize(scores, is_member)          # AUC, accuracy, TPR at 0.1% and 1% FPR

A is the number of queries per example: the first is the example itself,
the others augmented copies (LiRA queries flips and shifts). Scoring is cheap
and its answers are read at FPRs of 1e-3 over tens of thousands of examples,
where one mis-rounded tie moves the TPR: the scorers run in float64
NumPy/SciPy on the host. Only Shokri's attack classifiers are trained in JAX,
in one jitted, vmapped program.

Attacks (`ATTACKS`; `required_shadow_models(attack)` says how many shadow
models each needs; settings are keyword arguments of `score`):

* 'loss', 'confidence' (Yeom et al. 2018): minus the cross-entropy loss, or
  the true-class probability, of the target model on the un-augmented query.
* 'global_threshold': the LiRA paper's global-threshold baseline, the scaled
  logit (`scaled_logit`) averaged over the A queries (`generate_global` of the
  official `plot.py`).
* 'loss_classwise': the loss with one threshold per class, learnt from the
  shadow models (their losses on the candidates of that class, labelled by
  their masks). Yeom et al.'s adversary predicts "member" when the loss is
  below the expected training loss; Song and Mittal (2021) choose one such
  threshold per class. The score is tau_c - loss, so "member" at score >= 0 is
  exactly the class-wise threshold rule, and a sweep over a common offset
  gives the ROC. Setting `calibration`: 'best_accuracy' (default; Song and
  Mittal: tau_c maximises the balanced accuracy of "loss <= tau_c" on the
  shadow models' member/non-member losses of class c) or 'member_mean'
  (Yeom et al.: tau_c is the shadow members' mean loss of class c).
* 'shokri' (Shokri et al. 2017): one attack classifier per class, trained on
  the shadow models' probability vectors (un-augmented query) of the
  candidates of that class, labelled in/out by the masks; the target's
  probability vector goes to the classifier of its true class. Each is an MLP
  with one ReLU hidden layer (`hidden_units`, 64 as in the paper), trained by
  Adam on minibatches drawn with replacement, all classes at once
  (`jax.vmap` inside a jitted `lax.fori_loop`). Settings: `key` (required),
  `num_steps`, `batch_size`, `learning_rate`, `hidden_units`. The score is
  the classifier's member log-odds, which ranks as its member probability does
  but does not round to 1.0 in float32 (ties at the top would blur the ROC
  at low FPR).
* LiRA (Carlini et al. 2022), on the scaled logit of every query, exactly as
  the official `research/mi_lira_2021/plot.py` (`generate_ours`,
  `generate_ours_offline`) scores them:
  - 'lira_online': per example and query, the *median* (the official code's
    location estimate) and std of the IN and the OUT shadow statistics; score
    = mean over queries of logpdf_in - logpdf_out (normal densities, std +
    1e-30). Needs >= 2 IN and >= 2 OUT models per example.
  - 'lira_online_fixed': the same with one global std (`fix_variance=True`),
    that of all IN statistics, used for IN and for OUT as the official code
    does (`std_out = np.std(dat_in)`). Needs >= 1 IN and >= 1 OUT per example.
  - 'lira_offline': OUT models only; score = -(mean over queries of
    logpdf_out), the official code's (two-sided) density. Setting
    `offline_test='one_sided'` scores mean over queries of -log Pr[Z > s] with
    Z ~ N(median_out, std_out), the one-sided test of the paper's Algorithm 1.
    Needs >= 2 OUT models per example.
  - 'lira_offline_fixed': one global std of the OUT statistics; >= 1 OUT.
  Setting `equal_counts` (default False) truncates, as the official code does,
  every example's IN (and OUT) models to the first m in model order, m the
  smallest count over the examples. With the official masks (every example in
  exactly half the models, LiRA's `train.py`) this changes nothing; with
  independent random masks it throws data away, hence the default.
* RMIA (Zarifzadeh et al. 2024): Pr(x|theta) is the true-class probability
  (softmax at `temperature`); Pr(x) averages it over the reference (shadow)
  models: 'rmia_online' over all K of them (half of which, in the paper's
  set-up, trained on x); 'rmia_offline' over the OUT models only, through the
  paper's linear approximation Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2 with
  a = `offline_a` (default 0.3; the authors tune it on a paired model). The
  population examples z, on which no model trained, get the same Pr(z)
  (online: the mean over all models; offline: the approximation applied to
  that mean), as in the authors' `ml_privacy_meter`. The score is the
  fraction of z with LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z))
  > `gamma` (default 1, as `ml_privacy_meter`), computed for each query
  (query a of x against query a of z) and averaged over the queries. All in
  log space: a true-class probability that underflows gives no NaN.

`label_only_scores` (Choquette-Choo et al. 2021) is not a `score` attack: it
queries a black-box `label_fn` (labels only) on Gaussian-noised, optionally
translated copies of each image and scores the fraction still classified
correctly.

Metrics follow the LiRA paper: `roc_curve` (exact, one point per distinct
score, ties on one segment), `auc`, `balanced_accuracy` (its "accuracy", the
best (TPR + TNR) / 2 over thresholds), `tpr_at_fpr` (the largest TPR at an
FPR <= the target; `strict=True` gives `plot.py`'s `fpr < target`) and
`summarize`.

References:
  Yeom, Giacomelli, Fredrikson, Jha. Privacy risk in machine learning:
    analyzing the connection to overfitting. CSF 2018.
  Shokri, Stronati, Song, Shmatikov. Membership inference attacks against
    machine learning models. IEEE S&P 2017.
  Song, Mittal. Systematic evaluation of privacy risks of machine learning
    models. USENIX Security 2021.
  Carlini, Chien, Nasr, Song, Terzis, Tramer. Membership inference attacks
    from first principles. IEEE S&P 2022 (LiRA; code:
    tensorflow/privacy research/mi_lira_2021).
  Zarifzadeh, Liu, Shokri. Low-cost high-power membership inference attacks.
    ICML 2024 (RMIA; code: privacytrustlab/ml_privacy_meter).
  Choquette-Choo, Tramer, Carlini, Papernot. Label-only membership inference
    attacks. ICML 2021.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from scipy import special, stats

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (
  check_choice,
  check_images,
  check_in_open_interval,
  check_int_at_least,
  check_labels,
  check_positive,
  closest,
)

__all__ = [
    "ATTACKS", "MembershipInputs", "auc", "balanced_accuracy", "label_only_scores",
    "lira_offline_scores", "lira_online_scores", "required_shadow_models", "rmia_scores",
    "roc_curve", "scaled_logit", "score", "summarize", "tpr_at_fpr",
]

ATTACKS = ("loss", "confidence", "global_threshold", "loss_classwise", "shokri",
           "lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed",
           "rmia_online", "rmia_offline")
CLASSWISE_CALIBRATIONS = ("best_accuracy", "member_mean")
OFFLINE_TESTS = ("logpdf", "one_sided")

# The official code adds this to every std so that a zero std gives no NaN.
_LIRA_STD_FLOOR = 1e-30

# Settings each attack accepts, with their defaults (None: required).
_SETTINGS: dict[str, dict[str, Any]] = {
    "loss": {},
    "confidence": {},
    "global_threshold": {},
    "loss_classwise": {"calibration": "best_accuracy"},
    "shokri": {"key": None, "num_steps": 1000, "batch_size": 128, "learning_rate": 1e-3,
               "hidden_units": 64},
    "lira_online": {"equal_counts": False},
    "lira_online_fixed": {"equal_counts": False},
    "lira_offline": {"equal_counts": False, "offline_test": "logpdf"},
    "lira_offline_fixed": {"equal_counts": False, "offline_test": "logpdf"},
    "rmia_online": {"gamma": 1.0, "temperature": 1.0},
    "rmia_offline": {"gamma": 1.0, "temperature": 1.0, "offline_a": 0.3},
}

_REQUIRED_SHADOW_MODELS = {
    "loss": 0, "confidence": 0, "global_threshold": 0,
    "loss_classwise": 1,      # one model trained on half the candidates: IN and OUT per class
    "shokri": 1,
    "lira_online": 4,         # >= 2 IN and >= 2 OUT per example for a per-example std
    "lira_online_fixed": 2,   # >= 1 IN and >= 1 OUT per example
    "lira_offline": 2,        # >= 2 OUT per example
    "lira_offline_fixed": 1,  # >= 1 OUT per example
    "rmia_online": 2,         # a pair, one trained on x: the paper's smallest online set-up
    "rmia_offline": 1,
}
# Attacks that read which shadow model trained on which candidate.
_NEEDS_MASKS = ("loss_classwise", "shokri", "lira_online", "lira_online_fixed",
                "lira_offline", "lira_offline_fixed", "rmia_offline")
_NEEDS_POPULATION = ("rmia_online", "rmia_offline")


# ------------------------------------------------------------------------ inputs


def _floating_array(value: Any, name: str, rank: int, layout: str) -> np.ndarray:
  """`value` as a NumPy array after checking its rank, float dtype and finiteness."""
  array = np.asarray(value)
  if array.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}; got shape {array.shape}.")
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{name} must be a floating-point array of logits; got dtype {array.dtype}.")
  if not np.all(np.isfinite(array)):
    bad = int(np.sum(~np.isfinite(array)))
    raise ValueError(f"{name} contains {bad} NaN/Inf value(s); logits must be finite.")
  return array


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no single truth value
class MembershipInputs:
  """Cached logits and membership masks, the one input of every `score` attack.

  Attributes:
    target_logits: [N, A, C] logits of the target model on N candidate
      examples under A >= 1 queries (the first is the un-augmented example,
      the others augmented copies, the same augmentations for every model),
      C >= 2 classes.
    labels: [N] integer true labels in [0, C).
    shadow_logits: [K, N, A, C] logits of K shadow (reference) models on the
      same queries, or None for attacks that need none.
    shadow_masks: [K, N] bool, whether candidate n was in shadow model k's
      training set; or None (only 'rmia_online' reads shadow logits without).
    population_target_logits: [Z, A, C] logits of the target model on Z
      population examples that no model trained on (RMIA), or None.
    population_shadow_logits: [K, Z, A, C] the shadow models' logits on them.
    population_labels: [Z] integer labels of the population examples.

  Raises (on construction, through `validate`):
    ValueError: a shape, dtype or value that does not fit, named.
  """
  target_logits: ArrayLike
  labels: ArrayLike
  shadow_logits: ArrayLike | None = None
  shadow_masks: ArrayLike | None = None
  population_target_logits: ArrayLike | None = None
  population_shadow_logits: ArrayLike | None = None
  population_labels: ArrayLike | None = None

  def __post_init__(self) -> None:
    self.validate()

  @property
  def num_examples(self) -> int:
    return int(np.shape(self.target_logits)[0])

  @property
  def num_queries(self) -> int:
    return int(np.shape(self.target_logits)[1])

  @property
  def num_classes(self) -> int:
    return int(np.shape(self.target_logits)[2])

  @property
  def num_shadow_models(self) -> int:
    return 0 if self.shadow_logits is None else int(np.shape(self.shadow_logits)[0])

  @property
  def has_population(self) -> bool:
    return self.population_target_logits is not None

  def validate(self) -> None:
    """Checks every shape, dtype and value; raises a one-line ValueError naming the problem."""
    target = _floating_array(self.target_logits, "target_logits", 3,
                             "(examples, queries, classes)")
    n, a, c = target.shape
    if n < 1 or a < 1:
      raise ValueError(
          f"target_logits needs >= 1 example and >= 1 query; got shape {target.shape}.")
    if c < 2:
      raise ValueError(f"target_logits needs >= 2 classes (last axis); got shape {target.shape}.")
    check_labels(np.asarray(self.labels), num_classes=c, batch_size=n, name="labels")
    if self.shadow_logits is None:
      if self.shadow_masks is not None:
        raise ValueError("shadow_masks were given without shadow_logits; give both or neither.")
      if self.population_shadow_logits is not None:
        raise ValueError("population_shadow_logits were given without shadow_logits; "
                         "they are the same shadow models' logits on the population.")
    else:
      shadow = _floating_array(self.shadow_logits, "shadow_logits", 4,
                               "(models, examples, queries, classes)")
      k = shadow.shape[0]
      if k < 1 or shadow.shape[1:] != (n, a, c):
        raise ValueError(
            f"shadow_logits must have shape (K >= 1, {n}, {a}, {c}) to match target_logits "
            f"{target.shape} (same examples, queries and classes); got {shadow.shape}.")
      if self.shadow_masks is not None:
        masks = np.asarray(self.shadow_masks)
        if masks.shape != (k, n):
          raise ValueError(
              f"shadow_masks must have shape (K, N) = ({k}, {n}), one row per shadow model and "
              f"one column per candidate; got {masks.shape}.")
        if masks.dtype != np.bool_:
          raise ValueError(f"shadow_masks must be a bool array (True: the model trained on the "
                           f"candidate); got dtype {masks.dtype}.")
    if (self.population_target_logits is None) != (self.population_labels is None):
      raise ValueError("population_target_logits and population_labels come together; "
                       "give both or neither.")
    if self.population_target_logits is None:
      if self.population_shadow_logits is not None:
        raise ValueError("population_shadow_logits were given without population_target_logits.")
      return
    population = _floating_array(self.population_target_logits, "population_target_logits", 3,
                                 "(population examples, queries, classes)")
    z = population.shape[0]
    if z < 1 or population.shape[1:] != (a, c):
      raise ValueError(
          f"population_target_logits must have shape (Z >= 1, {a}, {c}) (the queries and classes "
          f"of target_logits); got {population.shape}.")
    check_labels(np.asarray(self.population_labels), num_classes=c, batch_size=z,
                 name="population_labels")
    if self.population_shadow_logits is not None:
      population_shadow = _floating_array(
          self.population_shadow_logits, "population_shadow_logits", 4,
          "(models, population examples, queries, classes)")
      expected = (self.num_shadow_models, z, a, c)
      if population_shadow.shape != expected:
        raise ValueError(f"population_shadow_logits must have shape {expected} (the shadow models "
                         f"and population examples); got {population_shadow.shape}.")


# -------------------------------------------------------------------- statistics


def _scaled_logit(xp: Any, logits: Any, labels: Any) -> Any:
  """log p_y - log(sum_{y' != y} p_y') = z_y - logsumexp_{y' != y} z_y', in module xp."""
  labels = xp.broadcast_to(labels, logits.shape[:-1])
  is_true = xp.arange(logits.shape[-1]) == labels[..., None]
  true_logit = xp.sum(xp.where(is_true, logits, 0.0), axis=-1)
  others = xp.where(is_true, -xp.inf, logits)
  # C >= 2, so the largest other logit is finite and exp(others - top) has a 1 in it.
  top = xp.max(others, axis=-1, keepdims=True)
  log_others = top[..., 0] + xp.log(xp.sum(xp.exp(others - top), axis=-1))
  return true_logit - log_others


def scaled_logit(logits: ArrayLike, labels: ArrayLike) -> Array:
  """LiRA's statistic: the scaled logit of the true-class confidence.

  phi(p_y) = log(p_y / (1 - p_y)) = log p_y - log(sum_{y' != y} p_y'), computed
  from the logits as z_y - logsumexp_{y' != y} z_y', which neither underflows
  nor cancels (1 - p_y is never formed). The official `score.py` computes it
  from float64 probabilities with a 1e-45 floor; the two agree wherever those
  probabilities do not underflow, and this one stays exact beyond.

  Works under `jit` and `vmap`; the dtype follows `logits`.

  Args:
    logits: [..., C] logits, C >= 2.
    labels: integer true labels, broadcastable to logits.shape[:-1] (e.g. [N, 1]
      for logits [N, A, C]).

  Returns:
    logits.shape[:-1] scaled logits.

  References:
    Carlini et al. Membership inference attacks from first principles. S&P 2022.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 1 or logits.shape[-1] < 2:
    raise ValueError(f"logits must have >= 2 classes on the last axis; got shape {logits.shape}.")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be a floating-point array; got dtype {logits.dtype}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must hold integer class labels; got dtype {labels.dtype}.")
  try:
    np.broadcast_shapes(labels.shape, logits.shape[:-1])
  except ValueError:
    raise ValueError(f"labels of shape {labels.shape} do not broadcast to the logits' leading "
                     f"shape {logits.shape[:-1]} (logits {logits.shape}).") from None
  if np.broadcast_shapes(labels.shape, logits.shape[:-1]) != logits.shape[:-1]:
    raise ValueError(f"labels of shape {labels.shape} would broadcast the logits' leading shape "
                     f"{logits.shape[:-1]} to a larger one; give one label per logit vector.")
  return _scaled_logit(jnp, logits, labels)


def _log_true_probability(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
                          ) -> np.ndarray:
  """float64 log softmax(logits / temperature)[label]; labels broadcast to logits.shape[:-1]."""
  z = np.asarray(logits, np.float64) / temperature
  labels = np.broadcast_to(labels, z.shape[:-1])
  true_logit = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
  return true_logit - special.logsumexp(z, axis=-1)


def _per_model(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], logits: Any,
               labels: np.ndarray) -> np.ndarray:
  """fn(logits[k], labels[:, None]) stacked over the leading model axis.

  One model at a time: the float64 copy of all K models' logits at once would
  be twice the size of the (float32) logits themselves.
  """
  return np.stack([fn(np.asarray(logits[k]), labels[:, None]) for k in range(np.shape(logits)[0])])


def _scaled_logit_host(logits: Any, labels: np.ndarray) -> np.ndarray:
  return _scaled_logit(np, np.asarray(logits, np.float64), labels)


# ---------------------------------------------------------------------- LiRA


def _check_lira_arrays(target_stats: ArrayLike, shadow_stats: ArrayLike, shadow_masks: ArrayLike
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  target = np.asarray(target_stats, np.float64)
  shadow = np.asarray(shadow_stats, np.float64)
  masks = np.asarray(shadow_masks)
  if target.ndim != 2:
    raise ValueError(f"target_stats must have shape (examples, queries); got {target.shape}.")
  if shadow.ndim != 3 or shadow.shape[1:] != target.shape:
    raise ValueError(f"shadow_stats must have shape (K, {target.shape[0]}, {target.shape[1]}); "
                     f"got {shadow.shape}.")
  if masks.shape != shadow.shape[:2] or masks.dtype != np.bool_:
    raise ValueError(f"shadow_masks must be a bool array of shape {shadow.shape[:2]}; "
                     f"got {masks.dtype} {masks.shape}.")
  if not (np.all(np.isfinite(target)) and np.all(np.isfinite(shadow))):
    raise ValueError("LiRA statistics must be finite; got NaN or Inf.")
  return target, shadow, masks


def _chosen_models(chosen: np.ndarray, equal_counts: bool) -> np.ndarray:
  """[K, N] mask of the models used per example; with equal_counts the first m of each."""
  if not equal_counts:
    return chosen
  smallest = int(chosen.sum(axis=0).min())
  # The official code keeps scores[keep[:, j], j][:size]: the first `size` in model order.
  return chosen & (np.cumsum(chosen, axis=0) <= smallest)


def _require_counts(chosen: np.ndarray, minimum: int, side: str, attack: str, advice: str) -> None:
  counts = chosen.sum(axis=0)
  if counts.min() < minimum:
    example = int(np.argmin(counts))
    raise ValueError(
        f"{attack} needs >= {minimum} {side} shadow model(s) per example; example {example} has "
        f"{int(counts[example])} (of {chosen.shape[0]} models). {advice}")


def _gaussian(shadow: np.ndarray, chosen: np.ndarray, fixed_variance: bool
              ) -> tuple[np.ndarray, np.ndarray]:
  """(median, std) per example and query of the chosen models' statistics; std pooled if fixed."""
  values = np.where(chosen[..., None], shadow, np.nan)
  location = np.nanmedian(values, axis=0)
  if fixed_variance:
    spread = np.full_like(location, np.std(shadow[chosen]))
  else:
    spread = np.nanstd(values, axis=0)
  return location, spread + _LIRA_STD_FLOOR


def lira_online_scores(target_stats: ArrayLike, shadow_stats: ArrayLike, shadow_masks: ArrayLike,
                       *, fixed_variance: bool = False, equal_counts: bool = False) -> np.ndarray:
  """Online LiRA over per-query statistics (the official `plot.py`'s `generate_ours`).

  Args:
    target_stats: [N, A] the target model's statistic (the scaled logit) per query.
    shadow_stats: [K, N, A] the shadow models' statistics.
    shadow_masks: [K, N] bool, True where the shadow model trained on the example.
    fixed_variance: one std for all examples (the std of all IN statistics,
      used for IN and OUT as the official code does) instead of per example
      and query.
    equal_counts: keep only the first m IN (and OUT) models of every example,
      m the smallest count, as the official code does.

  Returns:
    [N] float64 scores, mean over queries of log N(s; median_in, std_in) -
    log N(s; median_out, std_out); higher = more likely a member.

  Raises:
    ValueError: shapes, or fewer IN/OUT models than the estimate needs
      (2 each per example, 1 each with fixed_variance).

  References:
    Carlini et al. Membership inference attacks from first principles. S&P 2022.
  """
  target, shadow, masks = _check_lira_arrays(target_stats, shadow_stats, shadow_masks)
  chosen_in = _chosen_models(masks, equal_counts)
  chosen_out = _chosen_models(~masks, equal_counts)
  minimum = 1 if fixed_variance else 2
  advice = ("Train more shadow models." if fixed_variance else
            "Use fixed_variance=True ('lira_online_fixed') or more shadow models.")
  attack = "lira_online_fixed" if fixed_variance else "lira_online"
  _require_counts(chosen_in, minimum, "IN", attack, advice)
  _require_counts(chosen_out, minimum, "OUT", attack, advice)
  median_in, std_in = _gaussian(shadow, chosen_in, fixed_variance)
  median_out, std_out = _gaussian(shadow, chosen_out, fixed_variance)
  if fixed_variance:
    std_out = std_in  # plot.py: std_out = np.std(dat_in)
  ratio = (stats.norm.logpdf(target, median_in, std_in)
           - stats.norm.logpdf(target, median_out, std_out))
  return _finite_scores(ratio.mean(axis=1), attack)


def lira_offline_scores(target_stats: ArrayLike, shadow_stats: ArrayLike, shadow_masks: ArrayLike,
                        *, fixed_variance: bool = False, equal_counts: bool = False,
                        offline_test: str = "logpdf") -> np.ndarray:
  """Offline LiRA over per-query statistics, OUT models only (`generate_ours_offline`).

  Args:
    target_stats: [N, A] the target model's statistic (the scaled logit) per query.
    shadow_stats: [K, N, A] the shadow models' statistics.
    shadow_masks: [K, N] bool, True where the shadow model trained on the example.
    fixed_variance: one std (that of all OUT statistics) for every example.
    equal_counts: keep only the first m OUT models of every example, m the
      smallest count, as the official code does.
    offline_test: 'logpdf' (official code): -mean over queries of
      log N(s; median_out, std_out); 'one_sided' (the paper's Algorithm 1):
      -mean over queries of log Pr[Z > s], Z ~ N(median_out, std_out).

  Returns:
    [N] float64 scores, higher = more likely a member.

  Raises:
    ValueError: shapes, an unknown test, or fewer OUT models than needed
      (2 per example, 1 with fixed_variance).

  References:
    Carlini et al. Membership inference attacks from first principles. S&P 2022.
  """
  check_choice(offline_test, "offline_test", OFFLINE_TESTS)
  target, shadow, masks = _check_lira_arrays(target_stats, shadow_stats, shadow_masks)
  chosen_out = _chosen_models(~masks, equal_counts)
  attack = "lira_offline_fixed" if fixed_variance else "lira_offline"
  advice = ("Train more shadow models." if fixed_variance else
            "Use fixed_variance=True ('lira_offline_fixed') or more shadow models.")
  _require_counts(chosen_out, 1 if fixed_variance else 2, "OUT", attack, advice)
  median_out, std_out = _gaussian(shadow, chosen_out, fixed_variance)
  if offline_test == "logpdf":
    surprise = -stats.norm.logpdf(target, median_out, std_out)
  else:
    surprise = -stats.norm.logsf(target, median_out, std_out)
  return _finite_scores(surprise.mean(axis=1), attack)


def _finite_scores(scores: np.ndarray, attack: str) -> np.ndarray:
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{attack} produced {int(np.sum(~np.isfinite(scores)))} non-finite score(s) "
                     "from finite inputs; the shadow statistics are degenerate.")
  return scores


# ---------------------------------------------------------------------- RMIA


def rmia_scores(target_log_probs: ArrayLike, reference_log_probs: ArrayLike,
                population_target_log_probs: ArrayLike,
                population_reference_log_probs: ArrayLike, *, online: bool,
                reference_masks: ArrayLike | None = None, gamma: float = 1.0,
                offline_a: float = 0.3) -> np.ndarray:
  """RMIA scores from log true-class probabilities (Zarifzadeh et al. 2024).

  Pr(x) is the mean of Pr(x|theta_k) over the reference models (online), or
  ((1 + a) * mean over OUT models + (1 - a)) / 2 (offline); Pr(z) for the
  population (OUT for every model) is the mean over all models, through the
  same approximation offline. Score(x) = fraction of z with
  (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z)) > gamma, per query (query a of
  x against query a of z), averaged over the queries.

  Args:
    target_log_probs: [N, A] log Pr(x|theta) of the target model.
    reference_log_probs: [K, N, A] log Pr(x|theta_k) of the reference models.
    population_target_log_probs: [Z, A] log Pr(z|theta).
    population_reference_log_probs: [K, Z, A] log Pr(z|theta_k).
    online: average all reference models (True) or only the OUT ones (False).
    reference_masks: [K, N] bool, True where reference model k trained on x;
      required offline (each x needs >= 1 OUT model), unused online.
    gamma: the likelihood-ratio threshold, > 0.
    offline_a: a in [0, 1] of the offline approximation.

  Returns:
    [N] float64 scores in [0, 1], higher = more likely a member.

  References:
    Zarifzadeh, Liu, Shokri. Low-cost high-power membership inference
      attacks. ICML 2024.
  """
  target = np.asarray(target_log_probs, np.float64)
  reference = np.asarray(reference_log_probs, np.float64)
  population = np.asarray(population_target_log_probs, np.float64)
  population_reference = np.asarray(population_reference_log_probs, np.float64)
  check_positive(gamma, "gamma")
  if not (isinstance(offline_a, (int, float)) and 0.0 <= offline_a <= 1.0):
    raise ValueError(f"offline_a must be a number in [0, 1]; got {offline_a!r}.")
  if target.ndim != 2 or reference.ndim != 3 or reference.shape[1:] != target.shape:
    raise ValueError(f"target_log_probs must be (N, A) and reference_log_probs (K, N, A); got "
                     f"{target.shape} and {reference.shape}.")
  k = reference.shape[0]
  if population.ndim != 2 or population.shape[1] != target.shape[1] or population.shape[0] < 1:
    raise ValueError(f"population_target_log_probs must be (Z >= 1, {target.shape[1]}); "
                     f"got {population.shape}.")
  if population_reference.shape != (k,) + population.shape:
    raise ValueError(f"population_reference_log_probs must be {(k,) + population.shape}; "
                     f"got {population_reference.shape}.")
  if online:
    log_marginal_x = special.logsumexp(reference, axis=0) - math.log(k)
  else:
    if reference_masks is None:
      raise ValueError("Offline RMIA needs reference_masks to tell the OUT reference models.")
    masks = np.asarray(reference_masks)
    if masks.shape != (k, target.shape[0]) or masks.dtype != np.bool_:
      raise ValueError(f"reference_masks must be a bool array of shape {(k, target.shape[0])}; "
                       f"got {masks.dtype} {masks.shape}.")
    _require_counts(~masks, 1, "OUT", "rmia_offline",
                    "Offline RMIA averages the models that did not train on the example.")
    out_log = np.where(~masks[..., None], reference, -np.inf)
    log_mean_out = (special.logsumexp(out_log, axis=0)
                    - np.log(np.sum(~masks, axis=0))[:, None])
    log_marginal_x = _offline_marginal(log_mean_out, offline_a)
  log_marginal_z = special.logsumexp(population_reference, axis=0) - math.log(k)
  if not online:
    log_marginal_z = _offline_marginal(log_marginal_z, offline_a)
  log_ratio_x = target - log_marginal_x          # [N, A]
  log_ratio_z = np.sort(population - log_marginal_z, axis=0)  # [Z, A]
  # LR(x, z) > gamma  <=>  log ratio_z < log ratio_x - log gamma: count by binary search.
  thresholds = log_ratio_x - math.log(gamma)
  fractions = np.stack([np.searchsorted(log_ratio_z[:, a], thresholds[:, a], side="left")
                        for a in range(target.shape[1])], axis=1) / population.shape[0]
  return fractions.mean(axis=1)


def _offline_marginal(log_mean_out: np.ndarray, offline_a: float) -> np.ndarray:
  """log(((1 + a) * exp(log_mean_out) + (1 - a)) / 2), exact at a = 1 and for tiny means."""
  log_low = math.log(1.0 - offline_a) if offline_a < 1.0 else -np.inf
  return np.logaddexp(math.log(1.0 + offline_a) + log_mean_out, log_low) - math.log(2.0)


# ------------------------------------------------------------------- Shokri


def _init_mlp(key: PRNGKey, num_features: int, hidden_units: int) -> dict[str, Array]:
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (num_features, hidden_units)) * math.sqrt(2.0 / num_features),
          "b1": jnp.zeros(hidden_units),
          "w2": jax.random.normal(k2, (hidden_units,)) * math.sqrt(1.0 / hidden_units),
          "b2": jnp.zeros(())}


def _mlp(params: Mapping[str, Array], x: Array) -> Array:
  """Member log-odds of each row of x."""
  hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


@functools.partial(jax.jit, static_argnames=("num_steps", "batch_size", "learning_rate",
                                             "hidden_units"))
def _train_attack_classifiers(key: PRNGKey, features: Array, targets: Array, counts: Array, *,
                              num_steps: int, batch_size: int, learning_rate: float,
                              hidden_units: int) -> dict[str, Array]:
  """One MLP per group (class), trained at once: features [G, M, F] (rows past counts[g] unused)."""
  num_groups, _, num_features = features.shape
  optimizer = optax.adam(learning_rate)
  init_key, step_key = jax.random.split(key)
  params = jax.vmap(lambda k: _init_mlp(k, num_features, hidden_units))(
      jax.random.split(init_key, num_groups))
  opt_state = jax.vmap(optimizer.init)(params)

  def loss(p, x, t):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(_mlp(p, x), t))

  def group_step(p, state, x_all, t_all, count, k):
    rows = jax.random.randint(k, (batch_size,), 0, count)  # with replacement, valid rows only
    grads = jax.grad(loss)(p, x_all[rows], t_all[rows])
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  def step(i, carry):
    keys = jax.random.split(jax.random.fold_in(step_key, i), num_groups)
    return jax.vmap(group_step)(*carry, features, targets, counts, keys)

  params, _ = lax.fori_loop(0, num_steps, step, (params, opt_state))
  return params


def _shokri(inputs: MembershipInputs, *, key: PRNGKey, num_steps: int, batch_size: int,
            learning_rate: float, hidden_units: int) -> np.ndarray:
  labels = np.asarray(inputs.labels)
  masks = np.asarray(inputs.shadow_masks)
  shadow = np.asarray(inputs.shadow_logits)[:, :, 0, :]  # un-augmented query: [K, N, C]
  probabilities = special.softmax(np.asarray(shadow, np.float64), axis=-1).astype(np.float32)
  rows = probabilities.reshape(-1, inputs.num_classes)
  row_member = masks.reshape(-1)
  row_class = np.broadcast_to(labels, masks.shape).reshape(-1)
  classes = np.unique(labels)
  groups = [np.nonzero(row_class == c)[0] for c in classes]
  for c, group in zip(classes, groups):
    members = int(row_member[group].sum())
    if members == 0 or members == group.size:
      raise ValueError(
          f"shokri trains one attack classifier per class and needs shadow members and "
          f"non-members of every class; class {int(c)} has {members} member and "
          f"{group.size - members} non-member row(s).")
  width = max(group.size for group in groups)
  features = np.zeros((len(groups), width, inputs.num_classes), np.float32)
  targets = np.zeros((len(groups), width), np.float32)
  for g, group in enumerate(groups):
    features[g, :group.size] = rows[group]
    targets[g, :group.size] = row_member[group]
  counts = np.asarray([group.size for group in groups], np.int32)
  params = _train_attack_classifiers(
      key, jnp.asarray(features), jnp.asarray(targets), jnp.asarray(counts),
      num_steps=num_steps, batch_size=batch_size, learning_rate=float(learning_rate),
      hidden_units=hidden_units)
  target = special.softmax(np.asarray(inputs.target_logits, np.float64)[:, 0, :], axis=-1)
  # Every class's classifier on every target row ([G, N]), then each row's own class.
  log_odds = np.asarray(jax.vmap(_mlp, in_axes=(0, None))(params, jnp.asarray(target, jnp.float32)))
  group_of = np.searchsorted(classes, labels)
  return log_odds[group_of, np.arange(labels.size)].astype(np.float64)


# ------------------------------------------------------------------ attacks


def _loss_classwise(inputs: MembershipInputs, *, calibration: str) -> np.ndarray:
  labels = np.asarray(inputs.labels)
  masks = np.asarray(inputs.shadow_masks)
  target_loss = -_log_true_probability(np.asarray(inputs.target_logits)[:, 0], labels)
  shadow_loss = -_per_model(_log_true_probability, np.asarray(inputs.shadow_logits)[:, :, :1],
                            labels)[..., 0]  # [K, N]
  thresholds = np.zeros(inputs.num_classes)
  for c in np.unique(labels):
    of_class = labels == c
    member_losses = shadow_loss[masks & of_class]
    nonmember_losses = shadow_loss[~masks & of_class]
    if member_losses.size == 0 or nonmember_losses.size == 0:
      raise ValueError(
          f"loss_classwise calibrates one threshold per class from shadow members and "
          f"non-members; class {int(c)} has {member_losses.size} member and "
          f"{nonmember_losses.size} non-member shadow loss(es).")
    if calibration == "member_mean":
      thresholds[c] = member_losses.mean()
    else:
      # The best "member iff -loss >= t" on the shadow losses; tau = -t. The
      # first ROC point (t = +inf, nobody a member) is no threshold.
      pooled = np.concatenate([member_losses, nonmember_losses])
      is_member = np.arange(pooled.size) < member_losses.size
      fpr, tpr, cut = roc_curve(-pooled, is_member)
      best = 1 + int(np.argmax((tpr[1:] + 1.0 - fpr[1:]) / 2.0))
      thresholds[c] = -cut[best]
  return thresholds[labels] - target_loss


def _lira(inputs: MembershipInputs, *, online: bool, fixed_variance: bool, equal_counts: bool,
          offline_test: str = "logpdf") -> np.ndarray:
  labels = np.asarray(inputs.labels)
  target = _scaled_logit_host(inputs.target_logits, labels[:, None])
  shadow = _per_model(_scaled_logit_host, inputs.shadow_logits, labels)
  if online:
    return lira_online_scores(target, shadow, inputs.shadow_masks, fixed_variance=fixed_variance,
                              equal_counts=equal_counts)
  return lira_offline_scores(target, shadow, inputs.shadow_masks, fixed_variance=fixed_variance,
                             equal_counts=equal_counts, offline_test=offline_test)


def _rmia(inputs: MembershipInputs, *, online: bool, gamma: float, temperature: float,
          offline_a: float = 0.3) -> np.ndarray:
  labels = np.asarray(inputs.labels)
  population_labels = np.asarray(inputs.population_labels)
  log_prob = functools.partial(_log_true_probability, temperature=temperature)
  return rmia_scores(
      log_prob(inputs.target_logits, labels[:, None]),
      _per_model(log_prob, inputs.shadow_logits, labels),
      log_prob(inputs.population_target_logits, population_labels[:, None]),
      _per_model(log_prob, inputs.population_shadow_logits, population_labels),
      online=online, reference_masks=inputs.shadow_masks, gamma=gamma, offline_a=offline_a)


def _first_query_log_probability(inputs: MembershipInputs) -> np.ndarray:
  return _log_true_probability(np.asarray(inputs.target_logits)[:, 0], np.asarray(inputs.labels))


_SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "loss": _first_query_log_probability,  # -loss = log p_y
    "confidence": lambda inputs: np.exp(_first_query_log_probability(inputs)),
    "global_threshold": lambda inputs: _scaled_logit_host(
        inputs.target_logits, np.asarray(inputs.labels)[:, None]).mean(axis=1),
    "loss_classwise": _loss_classwise,
    "shokri": _shokri,
    "lira_online": functools.partial(_lira, online=True, fixed_variance=False),
    "lira_online_fixed": functools.partial(_lira, online=True, fixed_variance=True),
    "lira_offline": functools.partial(_lira, online=False, fixed_variance=False),
    "lira_offline_fixed": functools.partial(_lira, online=False, fixed_variance=True),
    "rmia_online": functools.partial(_rmia, online=True),
    "rmia_offline": functools.partial(_rmia, online=False),
}


def required_shadow_models(attack: str) -> int:
  """The fewest shadow (reference) models `attack` can run with (0: none needed).

  More may still be needed per example: LiRA and offline RMIA check that
  every example has enough IN/OUT models under the given masks.
  """
  check_choice(attack, "attack", ATTACKS)
  return _REQUIRED_SHADOW_MODELS[attack]


def _check_key(key: Any) -> None:
  """Raises unless `key` is a JAX PRNG key (typed, or a raw uint32[2])."""
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  raw = dtype == np.uint32 and np.shape(key) == (2,)
  if not (typed or raw):
    raise ValueError(f"key must be a JAX PRNG key, e.g. jax.random.key(0); got {key!r}.")


def _check_bool(value: Any, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False; got {value!r}.")
  return bool(value)


def _resolve_settings(attack: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """The attack's defaults updated by `settings`, each checked."""
  accepted = _SETTINGS[attack]
  for name in settings:
    if name not in accepted:
      listed = ", ".join(accepted) if accepted else "none"
      suggestion = closest(name, accepted) if accepted else None
      hint = f" Did you mean {suggestion!r}?" if suggestion else ""
      raise ValueError(f"Unknown setting {name!r} for attack {attack!r}. "
                       f"Accepted settings: {listed}.{hint}")
  resolved = {**accepted, **settings}
  for name, value in resolved.items():
    if name == "key":
      if value is None:
        raise ValueError(f"{attack} trains its attack classifiers from a random key: pass "
                         f"key=jax.random.key(seed).")
      _check_key(value)
    elif name in ("num_steps", "batch_size", "hidden_units"):
      resolved[name] = check_int_at_least(value, name, 1)
    elif name in ("learning_rate", "gamma", "temperature"):
      check_positive(value, name)
    elif name == "offline_a":
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"offline_a must be a number in [0, 1]; got {value!r}.")
    elif name == "equal_counts":
      resolved[name] = _check_bool(value, name)
    elif name == "offline_test":
      check_choice(value, name, OFFLINE_TESTS)
    elif name == "calibration":
      check_choice(value, name, CLASSWISE_CALIBRATIONS)
  return resolved


def score(attack: str, inputs: MembershipInputs, **settings: Any) -> np.ndarray:
  """Membership scores of the N candidates of `inputs` under `attack`.

  Args:
    attack: one of `ATTACKS` (see the module docstring for each).
    inputs: the cached logits and masks.
    **settings: the attack's settings (e.g. `key=` for 'shokri', `gamma=`
      for RMIA); unknown names are an error.

  Returns:
    [N] float64 scores; higher means more likely a member.

  Raises:
    ValueError: an unknown attack or setting, a bad setting value, missing
      shadow models, masks or population logits, fewer shadow models than
      `required_shadow_models(attack)`, or too few IN/OUT models for an example.
  """
  check_choice(attack, "attack", ATTACKS)
  if not isinstance(inputs, MembershipInputs):
    raise TypeError(f"inputs must be a MembershipInputs; got {type(inputs).__name__}.")
  resolved = _resolve_settings(attack, settings)
  needed = _REQUIRED_SHADOW_MODELS[attack]
  if needed:
    if inputs.num_shadow_models < needed:
      alternatives = {"lira_online": " (or 'lira_online_fixed' with >= 2)",
                      "lira_offline": " (or 'lira_offline_fixed' with >= 1)"}
      raise ValueError(
          f"{attack!r} needs >= {needed} shadow models{alternatives.get(attack, '')}; inputs has "
          f"{inputs.num_shadow_models}.")
    if attack in _NEEDS_MASKS and inputs.shadow_masks is None:
      raise ValueError(f"{attack!r} needs shadow_masks, which shadow model trained on which "
                       "candidate; inputs has none.")
  if attack in _NEEDS_POPULATION and (not inputs.has_population
                                      or inputs.population_shadow_logits is None):
    raise ValueError(f"{attack!r} compares each candidate with population examples: give "
                     "population_target_logits, population_shadow_logits and population_labels.")
  return _SCORERS[attack](inputs, **resolved)


# ---------------------------------------------------------------- label-only


def _translate(key: PRNGKey, images: Array, max_translation: int) -> Array:
  """Each image shifted by its own random (dy, dx) in [-d, d]^2, zeros shifted in."""
  d = max_translation
  _, height, width, _ = images.shape
  shifts = jax.random.randint(key, (images.shape[0], 2), -d, d + 1)
  padded = jnp.pad(images, ((0, 0), (d, d), (d, d), (0, 0)))

  def shift_one(image, shift):
    return lax.dynamic_slice(image, (d - shift[0], d - shift[1], 0),
                             (height, width, image.shape[-1]))

  return jax.vmap(shift_one)(padded, shifts)


@functools.partial(jax.jit, static_argnames=("max_translation",))
def _perturbed_query(key: PRNGKey, images: Array, noise_std: float, max_translation: int) -> Array:
  translate_key, noise_key = jax.random.split(key)
  if max_translation:
    images = _translate(translate_key, images, max_translation)
  noisy = images + noise_std * jax.random.normal(noise_key, images.shape, images.dtype)
  # Queries are images: pixel space is [0, 1] for every certjax model.
  return jnp.clip(noisy, 0.0, 1.0)


def label_only_scores(key: PRNGKey, label_fn: Callable[[Array], ArrayLike], images: ArrayLike,
                      labels: ArrayLike, *, num_queries: int, noise_std: float = 0.1,
                      max_translation: int = 0) -> np.ndarray:
  """Label-only membership scores: robustness of the correct label to perturbations.

  Members tend to sit further from the decision boundary, so their label
  survives more perturbation (Choquette-Choo et al. 2021, the noise and
  data-augmentation attacks). Each of `num_queries` queries perturbs every
  image: a random translation by up to `max_translation` pixels in each
  direction (zeros shifted in), then Gaussian noise of std `noise_std`,
  clipped back to [0, 1]. Query q uses `fold_in(key, q)`.

  `label_fn` is a black box (it may count its queries, round, or run
  remotely), so it is called eagerly, once per query on the whole batch; only
  the perturbations are jitted.

  Args:
    key: PRNG key.
    label_fn: images [N, H, W, C] in [0, 1] -> [N] integer labels.
    images: [N, H, W, C] candidate images in [0, 1].
    labels: [N] their true labels.
    num_queries: perturbed queries per image, >= 1.
    noise_std: std of the Gaussian noise in pixel units, >= 0.
    max_translation: largest shift in pixels, >= 0.

  Returns:
    [N] float64 fraction of queries labelled correctly; higher = more likely
    a member.

  Raises:
    ValueError: bad images, labels or settings; no perturbation at all
      (noise_std = 0 and max_translation = 0); label_fn answering with the
      wrong shape or non-integer labels.

  References:
    Choquette-Choo, Tramer, Carlini, Papernot. Label-only membership
      inference attacks. ICML 2021.
  """
  _check_key(key)
  check_images(images, name="images")
  images = jnp.asarray(images)
  labels = np.asarray(labels)
  check_labels(labels, batch_size=images.shape[0], name="labels")
  num_queries = check_int_at_least(num_queries, "num_queries", 1)
  check_positive(noise_std, "noise_std", allow_zero=True)
  max_translation = check_int_at_least(max_translation, "max_translation", 0)
  if max_translation >= min(images.shape[1:3]):
    raise ValueError(f"max_translation must be smaller than the image side "
                     f"{min(images.shape[1:3])}; got {max_translation}.")
  if noise_std == 0 and max_translation == 0:
    raise ValueError("label_only_scores needs a perturbation: noise_std > 0 or "
                     "max_translation >= 1 (every query would be the clean image).")
  correct = np.zeros(labels.shape, np.int64)
  for q in range(num_queries):
    query = _perturbed_query(jax.random.fold_in(key, q), images, float(noise_std),
                             max_translation)
    predicted = np.asarray(label_fn(query))
    if predicted.shape != labels.shape or not np.issubdtype(predicted.dtype, np.integer):
      raise ValueError(f"label_fn must return {labels.shape[0]} integer labels, one per image; "
                       f"got {predicted.dtype} {predicted.shape}.")
    correct += predicted == labels
  return correct / num_queries


# ------------------------------------------------------------------- metrics


def _check_scores(scores: ArrayLike, is_member: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  values = np.asarray(scores)
  members = np.asarray(is_member)
  if values.ndim != 1 or not (np.issubdtype(values.dtype, np.floating)
                              or np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f"scores must be a rank-1 numeric array; got {values.dtype} {values.shape}.")
  if not np.all(np.isfinite(values)):
    first = int(np.argmax(~np.isfinite(values)))
    raise ValueError(f"scores must be finite; score {first} is {values[first]}.")
  if members.shape != values.shape or members.dtype != np.bool_:
    raise ValueError(f"is_member must be a bool array of shape {values.shape} (one per score); "
                     f"got {members.dtype} {members.shape}.")
  num_members = int(members.sum())
  if num_members == 0 or num_members == members.size:
    raise ValueError(f"is_member must hold both members and non-members; got {num_members} "
                     f"member(s) of {members.size}.")
  return values.astype(np.float64), members


def roc_curve(scores: ArrayLike, is_member: ArrayLike
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The exact ROC of "member iff score >= threshold".

  One point per distinct score (tied scores move together, so a tie between
  members and non-members is one diagonal segment), from (0, 0) at threshold
  +inf to (1, 1) at the smallest score.

  Args:
    scores: [n] finite scores, higher = more likely a member.
    is_member: [n] bool ground truth, with members and non-members.

  Returns:
    (fpr, tpr, thresholds), float64 arrays, fpr and tpr non-decreasing.
  """
  values, members = _check_scores(scores, is_member)
  order = np.argsort(-values, kind="stable")
  sorted_values = values[order]
  true_positives = np.cumsum(members[order])
  false_positives = np.cumsum(~members[order])
  # The last position of every run of equal scores.
  ends = np.append(np.nonzero(np.diff(sorted_values))[0], values.size - 1)
  tpr = np.concatenate([[0.0], true_positives[ends] / true_positives[-1]])
  fpr = np.concatenate([[0.0], false_positives[ends] / false_positives[-1]])
  thresholds = np.concatenate([[np.inf], sorted_values[ends]])
  return fpr, tpr, thresholds


def auc(scores: ArrayLike, is_member: ArrayLike) -> float:
  """Area under the ROC: Pr[member score > non-member score] + Pr[tie] / 2."""
  fpr, tpr, _ = roc_curve(scores, is_member)
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tpr_at_fpr(scores: ArrayLike, is_member: ArrayLike, fpr: float, *,
               strict: bool = False) -> float:
  """The largest TPR of a threshold whose FPR is <= `fpr` (< with strict=True).

  No interpolation between ROC points. `strict=True` is the official LiRA
  `plot.py` (`tpr[np.where(fpr < .001)[0][-1]]`); they differ only when some
  threshold's FPR equals `fpr` exactly.

  Raises:
    ValueError: fpr outside (0, 1), or bad scores/is_member.
  """
  check_in_open_interval(fpr, "fpr", 0.0, 1.0)
  rates, tpr, _ = roc_curve(scores, is_member)
  allowed = rates < fpr if strict else rates <= fpr
  return float(tpr[allowed].max())  # (0, 0) is always allowed


def balanced_accuracy(scores: ArrayLike, is_member: ArrayLike) -> float:
  """max over thresholds of (TPR + 1 - FPR) / 2, the LiRA paper's "accuracy"."""
  fpr, tpr, _ = roc_curve(scores, is_member)
  return float(np.max((tpr + 1.0 - fpr) / 2.0))


def summarize(scores: ArrayLike, is_member: ArrayLike, fprs: Sequence[float] = (0.001, 0.01)
              ) -> dict[str, float | int]:
  """AUC, balanced accuracy and TPR at each FPR of `fprs`, with the member counts.

  Returns:
    {'auc', 'balanced_accuracy', 'tpr_at_fpr_<fpr>' for each fpr (e.g.
    'tpr_at_fpr_0.001'), 'num_members', 'num_nonmembers'}.
  """
  _, members = _check_scores(scores, is_member)
  for rate in fprs:
    check_in_open_interval(rate, "fpr", 0.0, 1.0)
  summary: dict[str, float | int] = {
      "auc": auc(scores, is_member),
      "balanced_accuracy": balanced_accuracy(scores, is_member),
  }
  for rate in fprs:
    summary[f"tpr_at_fpr_{rate:g}"] = tpr_at_fpr(scores, is_member, rate)
  summary["num_members"] = int(members.sum())
  summary["num_nonmembers"] = int(members.size - members.sum())
  return summary
