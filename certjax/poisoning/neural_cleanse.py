"""Neural Cleanse: reverse-engineer a trigger per class, flag the class whose trigger is small.

A backdoored model maps any input carrying a small trigger to the target
class, so the smallest input change that sends every clean image to the
target is far smaller than for any other class. For every class t, Neural
Cleanse optimises a mask m (H x W, in [0, 1]) and a pattern p (H x W x C, in
[0, 1]) with

  min_{m, p}  CE(f((1 - m) * x + m * p), t) + lambda * |m|_1

over clean images x, then calls the classes whose mask L1 norm is an outlier
on the small side (`anomaly_index`: median absolute deviation, index > 2)
infected:

  result = neural_cleanse(key, logits_fn, x_clean, num_classes=10)
  anomaly = anomaly_index(result.l1_norm)
  anomaly.flagged                      # [10] bool: the infected target(s)
  x, y, _ = unlearning_set(key, x_clean, y_clean, result.mask[t], result.pattern[t])
  # ... the caller fine-tunes the model on (x, y): the trigger, true labels.

The optimisation follows the authors' `visualizer.py`: m and p are
tanh-parameterised (m = (tanh(w) + 1) / 2), initialised uniformly at random,
and trained with Adam (lr 0.1, betas 0.5 / 0.9) on mini-batches of clean
images. One "epoch" (the reference's "step") is `batches_per_epoch`
mini-batches; after it, lambda (`cost`) moves with that epoch's mean attack
success rate (ASR): it starts at 0 (`start_cost_at_zero`) and is set to
`init_cost` once the ASR has been >= `attack_success_threshold` for
`patience` epochs; from then on, `patience` epochs at or above the threshold
multiply it by `cost_multiplier`, `patience` epochs below divide it by
cost_multiplier^1.5. The best mask (smallest mean L1 among epochs with ASR
>= the threshold) is kept; the run stops early once lambda has moved both
ways and the best L1 has not improved (by the factor `early_stop_threshold`)
for `early_stop_patience` epochs. Defaults are those of the authors' GTSRB
example (patience 5, multiplier 2, early stop after 25 epochs, init cost
1e-3, batch 32).

All classes run in one compiled program, `vmap`ped over the classes (the
default `batching='vmap'`): the early-stopping `while_loop` then runs until
the last class stops, the finished ones frozen. `batching='map'` runs them
one after the other in one program (`lax.map`, one class's memory), and
`batching='loop'` calls one jitted single-class program per class from
Python. Class t always uses the key `fold_in(key, t)`, so the three give the
same triggers. `reverse_engineer_trigger` is the single-class function,
usable under `jit`/`vmap` with a traced target. On XLA:CPU the three
programs are compiled without YNNPACK fusions (`_CPU_OPTIONS`: 2-20x faster
here, the vmapped one most).

References:
  Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao. Neural Cleanse: Identifying
    and Mitigating Backdoor Attacks in Neural Networks. IEEE S&P 2019
    (code: bolunwang/backdoor, `visualizer.py`, `mad_outlier_detection.py`).
  Hampel. The influence curve and its role in robust estimation. JASA 1974
    (the 1.4826 MAD consistency constant).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey
from certjax.validation import (check_choice, check_images, check_int_at_least, check_labels,
                                check_positive)

__all__ = [
    "BATCHINGS", "MAD_CONSISTENCY", "AnomalyIndex", "ReversedTrigger", "anomaly_index",
    "apply_trigger", "neural_cleanse", "reverse_engineer_trigger", "unlearning_set",
]

BATCHINGS = ("vmap", "map", "loop")
# Scales the median absolute deviation to the standard deviation of a normal
# distribution (mad_outlier_detection.py's consistency_constant).
MAD_CONSISTENCY = 1.4826


class ReversedTrigger(NamedTuple):
  """Reverse-engineered trigger(s); with a leading class axis from `neural_cleanse`.

  Attributes:
    mask: [H, W] in [0, 1], the best mask (the last one if no epoch reached
      the attack-success threshold, see `found`).
    pattern: [H, W, C] in [0, 1].
    l1_norm: sum of the mask, the quantity `anomaly_index` compares.
    attack_success_rate: fraction of the clean images that (1 - m) x + m p
      sends to the target, recomputed on all of `x_clean` after optimisation.
    found: whether some epoch reached the attack-success threshold.
    cost: lambda at the end of the run.
    num_epochs: epochs run (fewer than the maximum after an early stop).
    target: the target class.
  """
  mask: Array
  pattern: Array
  l1_norm: Array
  attack_success_rate: Array
  found: Array
  cost: Array
  num_epochs: Array
  target: Array


class _Settings(NamedTuple):
  """The optimisation's static settings (hashable: one compilation per setting)."""
  num_epochs: int
  batches_per_epoch: int
  batch_size: int
  learning_rate: float
  init_cost: float
  start_cost_at_zero: bool
  attack_success_threshold: float
  patience: int
  cost_multiplier: float
  early_stop: bool
  early_stop_threshold: float
  early_stop_patience: int


def apply_trigger(x: ArrayLike, mask: ArrayLike, pattern: ArrayLike) -> Array:
  """(1 - m) * x + m * p for images x [..., H, W, C], mask [H, W], pattern [H, W, C]."""
  m = jnp.asarray(mask)[..., None]
  return (1.0 - m) * x + m * jnp.asarray(pattern)


def _squash(w: Array) -> Array:
  # visualizer.py divides tanh by 2 - 1e-7 to stay inside (0, 1); in float32
  # that factor pushes a saturated tanh to -3e-8, outside [0, 1]: (tanh + 1) / 2
  # stays inside.
  return 0.5 * (jnp.tanh(w) + 1.0)


def _unsquash(v: Array) -> Array:
  # Uniform draws may hit 0 exactly: stay inside arctanh's domain.
  return jnp.arctanh(jnp.clip(2.0 * v - 1.0, -1.0 + 1e-6, 1.0 - 1e-6))


def _batch_indices(key: PRNGKey, num_images: int, settings: _Settings) -> Array:
  """[batches_per_epoch, batch_size] indices: one shuffled pass, wrapped if too short."""
  perm = jax.random.permutation(key, num_images)
  positions = jnp.arange(settings.batches_per_epoch * settings.batch_size) % num_images
  return perm[positions].reshape(settings.batches_per_epoch, settings.batch_size)


def _reverse_one(key: PRNGKey, target: Array, logits_fn: LogitsFn, x_clean: Array,
                 settings: _Settings) -> ReversedTrigger:
  """One class's optimisation (visualizer.py's `visualize`); no validation."""
  height, width, channels = x_clean.shape[1:]
  num_images = x_clean.shape[0]
  k_mask, k_pattern, k_data = jax.random.split(key, 3)
  params = {"mask": _unsquash(jax.random.uniform(k_mask, (height, width))),
            "pattern": _unsquash(jax.random.uniform(k_pattern, (height, width, channels)))}
  optimizer = optax.adam(settings.learning_rate, b1=0.5, b2=0.9)
  target = jnp.asarray(target, jnp.int32)

  def batch_loss(params, cost, images):
    mask, pattern = _squash(params["mask"]), _squash(params["pattern"])
    logits = logits_fn(apply_trigger(images, mask, pattern))
    labels = jnp.full(images.shape[:1], target)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    reg = jnp.sum(jnp.abs(mask))
    success = jnp.mean((jnp.argmax(logits, axis=-1) == target).astype(jnp.float32))
    return ce + cost * reg, (reg, success)

  def run_epoch(params, opt_state, cost, epoch):
    batches = _batch_indices(jax.random.fold_in(k_data, epoch), num_images, settings)

    def body(b, carry):
      params, opt_state, reg_sum, success_sum = carry
      grads, (reg, success) = jax.grad(batch_loss, has_aux=True)(
          params, cost, x_clean[batches[b]])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, reg_sum + reg, success_sum + success

    zero = jnp.zeros((), jnp.float32)
    params, opt_state, reg_sum, success_sum = lax.fori_loop(
        0, settings.batches_per_epoch, body, (params, opt_state, zero, zero))
    # Means over the epoch's batches, measured before each batch's update (as
    # Keras' train_on_batch reports them).
    return params, opt_state, reg_sum / settings.batches_per_epoch, (
        success_sum / settings.batches_per_epoch)

  threshold = settings.attack_success_threshold
  cost0 = 0.0 if settings.start_cost_at_zero else settings.init_cost
  int0, false = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
  state = {
      "params": params, "opt_state": optimizer.init(params),
      "cost": jnp.asarray(cost0, jnp.float32),
      "best_mask": _squash(params["mask"]), "best_pattern": _squash(params["pattern"]),
      "reg_best": jnp.asarray(jnp.inf, jnp.float32),
      "early_stop_reg_best": jnp.asarray(jnp.inf, jnp.float32),
      "early_stop_counter": int0, "cost_set_counter": int0, "cost_up_counter": int0,
      "cost_down_counter": int0, "cost_up_flag": false, "cost_down_flag": false,
      "epoch": int0, "stopped": false,
  }

  def epoch_body(s):
    params, opt_state, reg, success = run_epoch(s["params"], s["opt_state"], s["cost"],
                                                s["epoch"])
    s = dict(s, params=params, opt_state=opt_state, epoch=s["epoch"] + 1)
    attacked = success >= threshold
    # The best mask so far: the mask after this epoch, its L1 the epoch's mean.
    better = attacked & (reg < s["reg_best"])
    s["best_mask"] = jnp.where(better, _squash(params["mask"]), s["best_mask"])
    s["best_pattern"] = jnp.where(better, _squash(params["pattern"]), s["best_pattern"])
    s["reg_best"] = jnp.where(better, reg, s["reg_best"])
    if settings.early_stop:
      # Count only once a valid trigger exists; stop once lambda moved both ways.
      found = jnp.isfinite(s["reg_best"])
      stale = s["reg_best"] >= settings.early_stop_threshold * s["early_stop_reg_best"]
      s["early_stop_counter"] = jnp.where(
          found, jnp.where(stale, s["early_stop_counter"] + 1, 0), s["early_stop_counter"])
      s["early_stop_reg_best"] = jnp.minimum(s["reg_best"], s["early_stop_reg_best"])
      s["stopped"] = (s["cost_down_flag"] & s["cost_up_flag"]
                      & (s["early_stop_counter"] >= settings.early_stop_patience))
    # Cost modification, in visualizer.py's order; skipped on the stopping
    # epoch, as its `break` skips it.
    live = ~s["stopped"]
    at_zero = (s["cost"] == 0.0) & attacked
    cost_set_counter = jnp.where(at_zero, s["cost_set_counter"] + 1, 0)
    reset = at_zero & (cost_set_counter >= settings.patience)
    cost = jnp.where(reset, settings.init_cost, s["cost"])
    up_counter = jnp.where(reset, 0, s["cost_up_counter"])
    down_counter = jnp.where(reset, 0, s["cost_down_counter"])
    up_flag = jnp.where(reset, False, s["cost_up_flag"])
    down_flag = jnp.where(reset, False, s["cost_down_flag"])
    up_counter = jnp.where(attacked, up_counter + 1, 0)
    down_counter = jnp.where(attacked, 0, down_counter + 1)
    go_up = up_counter >= settings.patience
    go_down = ~go_up & (down_counter >= settings.patience)
    cost = jnp.where(go_up, cost * settings.cost_multiplier,
                     jnp.where(go_down, cost / settings.cost_multiplier ** 1.5, cost))
    new = {"cost_set_counter": cost_set_counter, "cost": cost,
           "cost_up_counter": jnp.where(go_up, 0, up_counter),
           "cost_down_counter": jnp.where(go_down, 0, down_counter),
           "cost_up_flag": up_flag | go_up, "cost_down_flag": down_flag | go_down}
    for name, value in new.items():
      s[name] = jnp.where(live, value, s[name])
    return s

  def keep_going(s):
    return (s["epoch"] < settings.num_epochs) & ~s["stopped"]

  s = lax.while_loop(keep_going, epoch_body, state)
  found = jnp.isfinite(s["reg_best"])
  # Without a valid trigger, the last mask (visualizer.py's `mask_best is None`).
  mask = jnp.where(found, s["best_mask"], _squash(s["params"]["mask"]))
  pattern = jnp.where(found, s["best_pattern"], _squash(s["params"]["pattern"]))
  return ReversedTrigger(mask=mask, pattern=pattern, l1_norm=jnp.sum(mask),
                         attack_success_rate=_success_rate(logits_fn, x_clean, mask, pattern,
                                                           target, settings.batch_size),
                         found=found, cost=s["cost"], num_epochs=s["epoch"], target=target)


def _success_rate(logits_fn: LogitsFn, x: Array, mask: Array, pattern: Array, target: Array,
                  chunk: int) -> Array:
  """Fraction of x sent to target by the trigger, `chunk` images at a time."""
  num_images = x.shape[0]

  def body(i, hits):
    positions = i * chunk + jnp.arange(chunk)
    valid = positions < num_images
    images = x[jnp.minimum(positions, num_images - 1)]
    hit = jnp.argmax(logits_fn(apply_trigger(images, mask, pattern)), axis=-1) == target
    return hits + jnp.sum(hit & valid)

  num_chunks = -(-num_images // chunk)
  return lax.fori_loop(0, num_chunks, body, jnp.zeros((), jnp.int32)) / num_images


def _settings(x_clean: Any, *, num_epochs: int, batches_per_epoch: Optional[int],
              batch_size: int, learning_rate: float, init_cost: float,
              start_cost_at_zero: bool, attack_success_threshold: float, patience: int,
              cost_multiplier: float, early_stop: bool, early_stop_threshold: float,
              early_stop_patience: Optional[int]) -> _Settings:
  check_images(x_clean, name="x_clean")
  check_int_at_least(num_epochs, "num_epochs", 1)
  check_int_at_least(batch_size, "batch_size", 1)
  if batches_per_epoch is None:
    batches_per_epoch = max(1, np.shape(x_clean)[0] // batch_size)
  check_int_at_least(batches_per_epoch, "batches_per_epoch", 1)
  check_int_at_least(np.shape(x_clean)[0], "the number of clean images", 1)
  check_positive(learning_rate, "learning_rate")
  check_positive(init_cost, "init_cost")
  if not (isinstance(attack_success_threshold, (int, float))
          and 0.0 < attack_success_threshold <= 1.0):
    raise ValueError(f"attack_success_threshold must lie in (0, 1], got "
                     f"{attack_success_threshold!r}.")
  check_int_at_least(patience, "patience", 1)
  if not (isinstance(cost_multiplier, (int, float)) and cost_multiplier > 1.0):
    raise ValueError(f"cost_multiplier must be a number > 1 (lambda is multiplied by it, "
                     f"and divided by its 1.5th power), got {cost_multiplier!r}.")
  check_positive(early_stop_threshold, "early_stop_threshold")
  if early_stop_patience is None:
    early_stop_patience = 5 * patience
  check_int_at_least(early_stop_patience, "early_stop_patience", 1)
  for name, value in (("start_cost_at_zero", start_cost_at_zero), ("early_stop", early_stop)):
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{name} must be True or False, got {value!r}.")
  return _Settings(int(num_epochs), int(batches_per_epoch), int(batch_size),
                   float(learning_rate), float(init_cost), bool(start_cost_at_zero),
                   float(attack_success_threshold), int(patience), float(cost_multiplier),
                   bool(early_stop), float(early_stop_threshold), int(early_stop_patience))


def reverse_engineer_trigger(key: PRNGKey, logits_fn: LogitsFn, x_clean: ArrayLike,
                             target: ArrayLike, *, num_epochs: int = 1000,
                             batches_per_epoch: Optional[int] = None, batch_size: int = 32,
                             learning_rate: float = 0.1, init_cost: float = 1e-3,
                             start_cost_at_zero: bool = True,
                             attack_success_threshold: float = 0.99, patience: int = 5,
                             cost_multiplier: float = 2.0, early_stop: bool = True,
                             early_stop_threshold: float = 1.0,
                             early_stop_patience: Optional[int] = None) -> ReversedTrigger:
  """Neural Cleanse's trigger for one target class (module docstring).

  Pure in (key, x_clean, target): usable under `jit` and `vmap`, with a
  traced target. `neural_cleanse` runs every class with key
  `fold_in(key, t)`; this function uses `key` as given.

  Args:
    key: PRNG key (mask and pattern initialisation, mini-batch order).
    logits_fn: images in [0, 1] (NHWC) -> logits.
    x_clean: [N, H, W, C] clean images in [0, 1].
    target: the target class (an int or a scalar int array).
    num_epochs: most epochs (the reference's `steps`; 1000 there).
    batches_per_epoch: mini-batches per epoch; None: len(x_clean) // batch_size
      (the reference's `mini_batch`), at least 1.
    batch_size: images per mini-batch (32).
    learning_rate: Adam's step size (0.1; betas 0.5 and 0.9 as the reference).
    init_cost: lambda once the attack first succeeds (1e-3).
    start_cost_at_zero: start with lambda = 0 (the reference's
      `reset_cost_to_zero`, True); False starts at init_cost.
    attack_success_threshold: the ASR that counts as success, in (0, 1] (0.99).
    patience: epochs above (below) the threshold before lambda moves (5).
    cost_multiplier: lambda's factor up; down is its 1.5th power (2).
    early_stop: stop once lambda moved both ways and the best L1 stalled.
    early_stop_threshold: the best L1 stalls unless it drops below this
      factor times its previous best (1.0).
    early_stop_patience: epochs of stall before stopping; None: 5 * patience.

  Returns:
    A `ReversedTrigger` (no class axis).

  Raises:
    ValueError: bad images or settings.
  """
  settings = _settings(
      x_clean, num_epochs=num_epochs, batches_per_epoch=batches_per_epoch,
      batch_size=batch_size, learning_rate=learning_rate, init_cost=init_cost,
      start_cost_at_zero=start_cost_at_zero, attack_success_threshold=attack_success_threshold,
      patience=patience, cost_multiplier=cost_multiplier, early_stop=early_stop,
      early_stop_threshold=early_stop_threshold, early_stop_patience=early_stop_patience)
  return _reverse_one(key, target, logits_fn, jnp.asarray(x_clean, jnp.float32), settings)


def neural_cleanse(key: PRNGKey, logits_fn: LogitsFn, x_clean: ArrayLike, *, num_classes: int,
                   targets: Optional[Sequence[int]] = None, batching: str = "vmap",
                   num_epochs: int = 1000, batches_per_epoch: Optional[int] = None,
                   batch_size: int = 32, learning_rate: float = 0.1, init_cost: float = 1e-3,
                   start_cost_at_zero: bool = True, attack_success_threshold: float = 0.99,
                   patience: int = 5, cost_multiplier: float = 2.0, early_stop: bool = True,
                   early_stop_threshold: float = 1.0,
                   early_stop_patience: Optional[int] = None) -> ReversedTrigger:
  """Neural Cleanse's reversed triggers for every class (module docstring).

  Class t uses `reverse_engineer_trigger(fold_in(key, t), ...)`, whatever
  the batching, so 'vmap', 'map' and 'loop' agree (up to floating-point
  reassociation in batched matrix products).

  Args:
    key: PRNG key.
    logits_fn: images in [0, 1] (NHWC) -> logits over num_classes classes.
    x_clean: [N, H, W, C] clean images in [0, 1] (the defender's clean
      set; the paper uses a held-out slice of the test set).
    num_classes: number of classes.
    targets: the classes to reverse (distinct, in [0, num_classes));
      None: all of them.
    batching: 'vmap' (one program, all classes at once), 'map' (one
      program, one class at a time) or 'loop' (one jitted single-class
      program called per class).
    num_epochs ... early_stop_patience: as `reverse_engineer_trigger`.
  Returns:
    A `ReversedTrigger` with a leading axis over `targets` (masks [K, H, W],
    patterns [K, H, W, C], l1_norm [K], ...).

  Raises:
    ValueError: bad images, targets or settings.
  """
  check_int_at_least(num_classes, "num_classes", 2)
  check_choice(batching, "batching", BATCHINGS)
  settings = _settings(
      x_clean, num_epochs=num_epochs, batches_per_epoch=batches_per_epoch,
      batch_size=batch_size, learning_rate=learning_rate, init_cost=init_cost,
      start_cost_at_zero=start_cost_at_zero, attack_success_threshold=attack_success_threshold,
      patience=patience, cost_multiplier=cost_multiplier, early_stop=early_stop,
      early_stop_threshold=early_stop_threshold, early_stop_patience=early_stop_patience)
  if targets is None:
    targets = list(range(num_classes))
  targets_np = np.asarray(targets)
  check_labels(targets_np, num_classes=num_classes, name="targets")
  if targets_np.size == 0 or np.unique(targets_np).size != targets_np.size:
    raise ValueError(f"targets must be distinct classes, at least one; got {list(targets_np)}.")
  x = jnp.asarray(x_clean, jnp.float32)
  targets_arr = jnp.asarray(targets_np, jnp.int32)
  keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(targets_arr)
  run = _program(batching, _compiler_options(jax.default_backend()))
  if batching == "loop":
    results = [run(keys[i], targets_arr[i], x, logits_fn=logits_fn, settings=settings)
               for i in range(targets_np.size)]
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *results)
  return run(keys, targets_arr, x, logits_fn=logits_fn, settings=settings)


def _one(keys: PRNGKey, targets: Array, x: Array, logits_fn: LogitsFn,
         settings: _Settings) -> ReversedTrigger:
  return _reverse_one(keys, targets, logits_fn, x, settings)


def _all_vmap(keys: PRNGKey, targets: Array, x: Array, logits_fn: LogitsFn,
              settings: _Settings) -> ReversedTrigger:
  one = lambda k, t: _reverse_one(k, t, logits_fn, x, settings)  # noqa: E731
  return jax.vmap(one)(keys, targets)


def _all_map(keys: PRNGKey, targets: Array, x: Array, logits_fn: LogitsFn,
             settings: _Settings) -> ReversedTrigger:
  return lax.map(lambda kt: _reverse_one(kt[0], kt[1], logits_fn, x, settings), (keys, targets))


_PROGRAMS = {"loop": _one, "vmap": _all_vmap, "map": _all_map}
# XLA:CPU (jax 0.10) hands reductions above a few thousand elements to
# YNNPACK fusions, which on a shared 2-core machine took 10-20x longer than
# XLA's own loops (e.g. summing a [96, 7, 7] mask gradient over the batch:
# 60 us against 3 us). Every optimisation step reduces over the batch, and
# vmapping over classes makes the reductions K times larger, so the vmapped
# program is hit hardest. The option only exists on XLA:CPU builds that have
# these fusions; elsewhere the programs compile without it.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _compiler_options(backend: str) -> tuple[tuple[str, str], ...]:
  if backend != "cpu":
    return ()
  try:
    jax.jit(lambda: jnp.zeros(()), compiler_options=_CPU_OPTIONS).lower().compile()
  except Exception:  # pylint: disable=broad-except  # an XLA without the option
    return ()
  return tuple(_CPU_OPTIONS.items())


@functools.lru_cache(maxsize=None)
def _program(batching: str, options: tuple[tuple[str, str], ...]):
  """The jitted program of a batching, compiled once per (logits_fn, settings, shapes).

  Pass the same logits_fn object (e.g. a `jax.tree_util.Partial`) to reuse it.
  """
  return jax.jit(_PROGRAMS[batching], static_argnames=("logits_fn", "settings"),
                 compiler_options=dict(options) or None)


# ------------------------------------------------------------------ outliers


class AnomalyIndex(NamedTuple):
  """MAD outlier statistics of the mask norms (`anomaly_index`).

  Attributes:
    index: [K] |l1_k - median| / (1.4826 * MAD) per class.
    flagged: [K] bool, index > threshold on the small side (l1_k < median).
    median: median of the norms.
    mad: 1.4826 * median(|l1 - median|), the normal-consistent deviation.
    min_index: the anomaly index of the smallest norm (the single figure the
      paper reports per model).
  """
  index: Array
  flagged: Array
  median: Array
  mad: Array
  min_index: Array


def anomaly_index(l1_norms: ArrayLike, *, threshold: float = 2.0) -> AnomalyIndex:
  """Median-absolute-deviation anomaly index of the reversed triggers' L1 norms.

  As `mad_outlier_detection.py`: median m, MAD = 1.4826 median(|l - m|), index
  |l_k - m| / MAD, and class k is flagged (infected) when its index exceeds
  `threshold` (2: a 95% chance of being an outlier for a normal spread) and
  l_k < m: only an unusually small trigger marks a backdoor target. When the
  MAD is 0 (half the norms equal) an index is 0 for a norm at the median and
  +inf otherwise. Works under `jit` and `vmap` (e.g. over many models).

  Args:
    l1_norms: [K] mask L1 norms, K >= 2.
    threshold: the index above which a class is flagged, > 0.

  Returns:
    An `AnomalyIndex`.

  Raises:
    ValueError: l1_norms not a rank-1 array of at least 2 values, or a bad threshold.
  """
  shape = np.shape(l1_norms)
  if len(shape) != 1 or shape[0] < 2:
    raise ValueError(f"l1_norms must be a rank-1 array of at least 2 mask norms (one per "
                     f"class); got shape {tuple(shape)}.")
  check_positive(threshold, "threshold")
  norms = jnp.asarray(l1_norms, jnp.float32)
  median = jnp.median(norms)
  deviation = jnp.abs(norms - median)
  mad = MAD_CONSISTENCY * jnp.median(deviation)
  index = jnp.where(deviation == 0, 0.0, deviation / mad)  # x / 0 = inf for x > 0
  return AnomalyIndex(index=index, flagged=(index > threshold) & (norms < median),
                      median=median, mad=mad, min_index=index[jnp.argmin(norms)])


# ----------------------------------------------------------------- mitigation


def unlearning_set(key: PRNGKey, x_clean: ArrayLike, y_clean: ArrayLike, mask: ArrayLike,
                   pattern: ArrayLike, *, fraction: float = 0.2) -> tuple[Array, Array, Array]:
  """Neural Cleanse's unlearning data: the reversed trigger on some clean images, true labels.

  The paper fine-tunes the model for one epoch on 10% of the clean training
  data, of which 20% carry the reversed trigger with their labels left
  unchanged, so that the model learns to ignore the trigger. This builds that
  set from the given clean images: exactly round(fraction * N) of them,
  chosen uniformly without replacement, get (1 - m) x + m p; the caller
  fine-tunes on the result with its trainer.

  Works under `jit` (fraction static) and `vmap`.

  Args:
    key: PRNG key choosing the stamped images.
    x_clean: [N, H, W, C] clean images in [0, 1].
    y_clean: [N] their true labels.
    mask: [H, W] reversed mask in [0, 1].
    pattern: [H, W, C] reversed pattern in [0, 1].
    fraction: share of images stamped, in [0, 1] (0.2 in the paper).

  Returns:
    (images [N, H, W, C], labels [N] = y_clean, stamped [N] bool).

  Raises:
    ValueError: bad images, labels, mask or pattern shapes, or fraction
      outside [0, 1].
  """
  check_images(x_clean, name="x_clean")
  num_images = np.shape(x_clean)[0]
  check_labels(y_clean, batch_size=num_images, name="y_clean")
  image_shape = tuple(np.shape(x_clean)[1:])
  if tuple(np.shape(mask)) != image_shape[:2] or tuple(np.shape(pattern)) != image_shape:
    raise ValueError(f"mask must have shape {image_shape[:2]} and pattern {image_shape} for "
                     f"images of shape {image_shape}; got {tuple(np.shape(mask))} and "
                     f"{tuple(np.shape(pattern))}.")
  if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
    raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}.")
  num_stamped = int(round(fraction * num_images))
  chosen = jax.random.permutation(key, num_images)[:num_stamped]
  stamped = jnp.zeros(num_images, bool).at[chosen].set(True)
  x = jnp.asarray(x_clean)
  images = jnp.where(stamped[:, None, None, None], apply_trigger(x, mask, pattern), x)
  return images.astype(x.dtype), jnp.asarray(y_clean), stamped
