"""Robust accuracy in the AutoAttack style: attacks in sequence, per radius.

`robust_accuracy` runs a list of attacks one after the other, each only on the
points that every previous attack failed on (a point is robust at a radius iff
it is classified correctly and no attack found an adversarial example), for
every radius in `eps_list`, as foolbox reports per-epsilon results. The
remaining points are gathered on the host between attacks and processed in
fixed-size batches (the last one padded), so each attack compiles once and
costs nothing for points already broken. `eps` is passed to the compiled
attack as an argument: one compilation serves all radii.

Every returned adversarial example is checked: its perturbation norm must be
at most eps (up to a float tolerance) and it must lie in [0, 1]; a violation
raises `PerturbationError` naming the attack, the radius and the example.
That catches attacks that forget to project, and is the reason a buggy attack
cannot report an inflated success.

`standard_attacks(norm)` is AutoAttack's standard version (APGD-CE, APGD-T,
FAB-T, Square with the reference's settings); pass
`suite=AUTOATTACK_STANDARD` to `robust_accuracy` to name it in the results.

References:
  Croce, Hein. Reliable Evaluation of Adversarial Robustness with an Ensemble
    of Diverse Parameter-free Attacks. ICML 2020 (AutoAttack).
  Rauber, Zimmermann, Bethge, Brendel. Foolbox Native. JOSS 2020
    (per-epsilon results).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from certjax.types import ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_finite_scalar, check_images,
                                check_int_at_least, check_labels, check_positive)
from certjax.attacks import norms
from certjax.attacks.core import as_oracle, logits_shape
from certjax.attacks.apgd import make_apgd, make_apgd_targeted
from certjax.attacks.core import AttackFn
from certjax.attacks.fab import make_fab_targeted
from certjax.attacks.square import SQUARE_NORMS, make_square

# The name results carry for the sequence `standard_attacks` builds with its
# defaults: AutoAttack's standard version.
AUTOATTACK_STANDARD = "autoattack-standard (Croce & Hein 2020)"


class PerturbationError(ValueError):
  """An attack returned a point outside the eps-ball or the [0, 1] box."""


@dataclasses.dataclass(frozen=True)
class EpsResult:
  """Results at one radius.

  Attributes:
    eps: the radius.
    robust_accuracy: fraction of all examples still robust after every attack.
    robust_accuracy_after: (attack name, robust accuracy after that attack and
      all previous ones), in order.
    seconds: (attack name, wall time) in order.
    max_perturbation: largest perturbation norm among the returned examples.
    robust: per-example robustness mask (N,).
  """
  eps: float
  robust_accuracy: float
  robust_accuracy_after: Tuple[Tuple[str, float], ...]
  seconds: Tuple[Tuple[str, float], ...]
  max_perturbation: float
  robust: np.ndarray = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class RobustAccuracyResult:
  """Output of `robust_accuracy`; `to_dict()` for JSON, `table()` for reading.

  `suite` names the attack sequence when it is a published one (e.g.
  `AUTOATTACK_STANDARD`), '' otherwise.
  """
  norm: str
  num_examples: int
  clean_accuracy: float
  attack_names: Tuple[str, ...]
  per_eps: Tuple[EpsResult, ...]
  correct: np.ndarray = dataclasses.field(repr=False, compare=False)
  suite: str = ""

  def to_dict(self, *, include_masks: bool = False) -> Dict[str, Any]:
    """A JSON-serialisable dict (per-example masks as 0/1 lists if asked)."""
    out = {
        "norm": self.norm,
        "num_examples": self.num_examples,
        "clean_accuracy": self.clean_accuracy,
        "suite": self.suite,
        "attacks": list(self.attack_names),
        "results": [],
    }
    for r in self.per_eps:
      entry = {
          "eps": r.eps,
          "robust_accuracy": r.robust_accuracy,
          "robust_accuracy_after": dict(r.robust_accuracy_after),
          "seconds": dict(r.seconds),
          "max_perturbation": r.max_perturbation,
      }
      if include_masks:
        entry["robust"] = r.robust.astype(int).tolist()
      out["results"].append(entry)
    if include_masks:
      out["correct"] = self.correct.astype(int).tolist()
    return out

  def to_json(self, **kwargs: Any) -> str:
    return json.dumps(self.to_dict(**kwargs), indent=2)

  def table(self) -> str:
    """Readable text table: one row per radius, one column per attack."""
    names = list(self.attack_names)
    width = max([10] + [len(n) + 2 for n in names])
    header = f"{'eps':>10}" + "".join(f"{n:>{width}}" for n in names) + f"{'robust':>10}"
    lines = [
        f"Robust accuracy ({self.norm}) on {self.num_examples} examples; "
        f"clean accuracy {100 * self.clean_accuracy:.2f}%",
        *([f"Suite: {self.suite}"] if self.suite else []),
        "Columns: robust accuracy (%) after each attack in sequence.",
        header,
        "-" * len(header),
    ]
    for r in self.per_eps:
      cells = "".join(f"{100 * acc:>{width}.2f}" for _, acc in r.robust_accuracy_after)
      lines.append(f"{r.eps:>10.5g}{cells}{100 * r.robust_accuracy:>10.2f}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def check_perturbation(x: ArrayLike, x_adv: ArrayLike, eps: float, norm: str, *,
                       rtol: float = 1e-4, atol: float = 1e-6,
                       name: str = "attack") -> np.ndarray:
  """Raises `PerturbationError` unless every x_adv is in the eps-ball and [0, 1].

  Allowed: ||x_adv - x||_p <= eps (1 + rtol) + atol and -atol <= x_adv <= 1 + atol.

  Returns:
    The per-example perturbation norms.
  """
  check_choice(norm, "norm", norms.NORMS)
  x, x_adv = np.asarray(x, np.float64), np.asarray(x_adv, np.float64)
  if x.shape != x_adv.shape:
    raise PerturbationError(
        f"{name} returned shape {x_adv.shape}; expected {x.shape} (the input shape).")
  if not np.all(np.isfinite(x_adv)):
    bad = int(np.argmax(~np.all(np.isfinite(x_adv.reshape(len(x_adv), -1)), axis=1)))
    raise PerturbationError(f"{name} returned NaN or Inf values (example {bad}).")
  flat = (x_adv - x).reshape(len(x), -1)
  if norm == "linf":
    sizes = np.max(np.abs(flat), axis=1) if flat.size else np.zeros(len(x))
  elif norm == "l2":
    sizes = np.sqrt(np.sum(flat ** 2, axis=1))
  else:
    sizes = np.sum(np.abs(flat), axis=1)
  limit = eps * (1 + rtol) + atol
  if np.any(sizes > limit):
    worst = int(np.argmax(sizes))
    raise PerturbationError(
        f"{name} returned a perturbation of {norm} norm {sizes[worst]:.6g} > eps = "
        f"{eps:.6g} (example {worst}, tolerance {limit - eps:.2g}). Attacks must "
        "project onto the eps-ball.")
  low, high = float(np.min(x_adv, initial=0.0)), float(np.max(x_adv, initial=1.0))
  if low < -atol or high > 1 + atol:
    raise PerturbationError(
        f"{name} returned pixel values in [{low:.6g}, {high:.6g}], outside the [0, 1] "
        "box. Attacks must clip to [0, 1].")
  return sizes


@functools.lru_cache(maxsize=None)
def _bound_partial(func: Callable[..., Any], keywords: Tuple[Tuple[str, Any], ...]
                   ) -> functools.partial:
  # One object per (function, static keywords): jit caches key on the pytree
  # structure of the model, which includes this function, so repeated calls
  # (e.g. evaluation during training) reuse their compiled programs.
  return functools.partial(func, **dict(keywords))


def as_pytree_model(model: Any) -> Any:
  """`functools.partial(apply, variables, **static)` -> `Partial` with variables as data.

  `certjax.models.make_logits_fn` returns such a partial; making its array
  arguments pytree leaves lets the compiled attacks take the weights as inputs
  instead of embedding them in the program as constants. Anything else is
  returned unchanged.
  """
  if (isinstance(model, functools.partial) and not isinstance(model, jax.tree_util.Partial)
      and model.args and all(isinstance(leaf, (jax.Array, np.ndarray))
                             for leaf in jax.tree.leaves(model.args))):
    try:
      func = _bound_partial(model.func, tuple(sorted(model.keywords.items())))
    except TypeError:  # unhashable keyword values
      func = functools.partial(model.func, **model.keywords)
    return jax.tree_util.Partial(func, *model.args)
  return model


@functools.lru_cache(maxsize=256)
def _compiled(fn: Callable[..., Any], options: Tuple[Tuple[str, Any], ...]) -> Callable[..., Any]:
  """jit of `fn(model, *args)`, one per (fn, compiler options)."""
  return jax.jit(fn, compiler_options=dict(options) or None)


def _jit_with_model(fn: Callable[..., Any], model: Any,
                    options: Tuple[Tuple[str, Any], ...]) -> Callable[..., Any]:
  """jit `fn(model, *args)`; a `jax.tree_util.Partial` model is passed as data."""
  model = as_pytree_model(model)
  if isinstance(model, jax.tree_util.Partial):
    jitted = _compiled(fn, options)
    return lambda *args: jitted(model, *args)
  return jax.jit(lambda *args: fn(model, *args), compiler_options=dict(options) or None)


def _predict_fn(model: Any, xb: Any) -> Any:
  return jnp.argmax(as_oracle(model).logits(jax.random.key(0), xb), -1)


@functools.lru_cache(maxsize=256)
def _attack_call(fn: Callable[..., Any]) -> Callable[..., Any]:
  # One wrapper per attack function, so `_compiled` finds it again.
  def call(model, key, xb, yb, eps):
    return fn(key, model, xb, yb, eps)
  return call


def _check_data_mesh(mesh: Mesh, data_axis: Any) -> int:
  axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
  for axis in axes:
    if axis not in mesh.shape:
      raise ValueError(f"data_axis {axis!r} is not an axis of the mesh; mesh axes are "
                       f"{tuple(mesh.shape)}.")
  return int(np.prod([mesh.shape[a] for a in axes]))


def _padded_batches(indices: np.ndarray, batch_size: int):
  """Yields (batch indices padded to batch_size, number of real entries)."""
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.full(batch_size - real, chunk[-1])])
    yield chunk, real


def _check_attacks(attacks: Any) -> List[Tuple[str, Callable[..., Any]]]:
  if isinstance(attacks, (str, bytes)) or not isinstance(attacks, Sequence) or not attacks:
    raise ValueError(
        "attacks must be a non-empty sequence of (name, attack_fn) pairs, e.g. "
        "standard_attacks('linf').")
  checked = []
  for i, item in enumerate(attacks):
    if (not isinstance(item, (tuple, list)) or len(item) != 2
        or not isinstance(item[0], str) or not callable(item[1])):
      raise ValueError(
          f"attacks[{i}] must be a (name, attack_fn) pair with attack_fn(key, "
          f"logits_fn, x, y, eps) -> x_adv; got {item!r}.")
    checked.append((item[0], item[1]))
  names = [n for n, _ in checked]
  if len(set(names)) != len(names):
    raise ValueError(f"Attack names must be unique; got {names}.")
  return checked


def robust_accuracy(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
                    attacks: Sequence[Tuple[str, AttackFn]],
                    eps_list: Sequence[float], norm: str, batch_size: int = 256,
                    rtol: float = 1e-4, atol: float = 1e-6,
                    verbose: bool = False,
                    mesh: Optional[Mesh] = None, data_axis: Any = "data",
                    eps_key_index: Optional[Sequence[int]] = None,
                    compiler_options: Optional[Dict[str, Any]] = None,
                    suite: str = "") -> RobustAccuracyResult:
  """Clean and robust accuracy under a sequence of attacks, for several radii.

  Args:
    key: a `jax.random.key`; attack a, radius e and batch b use
      fold_in(fold_in(fold_in(key, e), a), b), where e is the radius's index
      in `eps_list` (or `eps_key_index[e]`).
    logits_fn: x -> logits, or a gradient oracle such as EOT (predictions use
      its mean logits, drawn with a fixed key). The weights of a
      `jax.tree_util.Partial(apply_fn, variables)` or of a
      `functools.partial(apply_fn, variables, **static_kwargs)` (what
      `certjax.models.make_logits_fn` returns) are passed to the compiled
      functions as inputs rather than embedded as constants.
    x: images (N, H, W, C) in [0, 1] (host or device arrays).
    y: labels (N,).
    attacks: (name, attack_fn) pairs, attack_fn(key, logits_fn, x, y, eps) ->
      x_adv, e.g. from `standard_attacks` or the `make_*` factories.
    eps_list: radii to evaluate (each >= 0).
    norm: 'linf', 'l2' or 'l1', the norm every attack's output is checked in.
    batch_size: examples per compiled attack call.
    rtol: relative tolerance of the perturbation-norm check.
    atol: absolute tolerance of the norm and box checks.
    verbose: print progress after each attack.
    mesh: a `jax.sharding.Mesh` (e.g. `certjax.parallel.local_mesh()`):
      every batch is split over its `data_axis` devices and the weights are
      replicated on them, so the attacks run data-parallel. `batch_size` is
      rounded up to a multiple of the number of devices along `data_axis`
      (the extra rows are padding and never counted). None: the default
      device.
    data_axis: the mesh axis (or tuple of axes) batches are split over, as in
      `certjax.smoothing.sample_counts`.
    eps_key_index: the index used in the key of each radius (default 0, 1,
      ...): a run split into several calls, one per radius (a resumed
      evaluation), draws the same randomness as one call over all radii.
    compiler_options: XLA compiler options for the attacks and predictions
      (e.g. {'xla_backend_optimization_level': 0} to compile faster when the
      programs run only briefly, as in tests).
    suite: the name of the sequence, recorded in the result (e.g.
      `AUTOATTACK_STANDARD` for `standard_attacks(norm)`); '' for none.

  Returns:
    A `RobustAccuracyResult`.

  Raises:
    ValueError: on bad inputs.
    PerturbationError: if an attack returns a point outside the ball or box.
  """
  oracle = as_oracle(logits_fn)
  check_choice(norm, "norm", norms.NORMS)
  attacks = _check_attacks(attacks)
  if isinstance(eps_list, (int, float)) or not len(eps_list):
    raise ValueError(f"eps_list must be a non-empty sequence of radii; got {eps_list!r}.")
  eps_values = [check_finite_scalar(e, "eps") for e in eps_list]
  for e in eps_values:
    check_positive(e, "eps", allow_zero=True)
  check_int_at_least(batch_size, "batch_size", 1)
  check_images(x)
  x_host = np.asarray(x)
  num_examples = x_host.shape[0]
  if num_examples == 0:
    raise ValueError("x is empty; robust accuracy needs at least one example.")
  probe = x_host[:1]
  num_classes = logits_shape(oracle, probe)[-1]
  check_labels(y, num_classes=num_classes, batch_size=num_examples)
  y_host = np.asarray(y)
  if eps_key_index is None:
    key_index = list(range(len(eps_values)))
  else:
    key_index = [check_int_at_least(i, "eps_key_index entry", 0) for i in eps_key_index]
    if len(key_index) != len(eps_values):
      raise ValueError(f"eps_key_index must give one index per radius ({len(eps_values)}); "
                       f"got {len(key_index)}.")
  options = tuple(sorted((compiler_options or {}).items()))
  batch_size = min(batch_size, num_examples)
  place = lambda *arrays: arrays  # pylint: disable=unnecessary-lambda-assignment
  if mesh is not None:
    num_devices = _check_data_mesh(mesh, data_axis)
    batch_size = -(-batch_size // num_devices) * num_devices
    batch_sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    place = lambda *arrays: tuple(jax.device_put(a, batch_sharding) for a in arrays)  # pylint: disable=unnecessary-lambda-assignment
    logits_fn = as_pytree_model(logits_fn)
    if isinstance(logits_fn, jax.tree_util.Partial):
      logits_fn = jax.device_put(logits_fn, NamedSharding(mesh, PartitionSpec()))

  predict = _jit_with_model(_predict_fn, logits_fn, options)

  def run_predict(indices: np.ndarray) -> np.ndarray:
    preds = np.empty(len(indices), np.int64)
    for pos, (chunk, real) in zip(range(0, len(indices), batch_size),
                                  _padded_batches(indices, batch_size)):
      preds[pos:pos + real] = np.asarray(predict(*place(x_host[chunk])))[:real]
    return preds

  all_indices = np.arange(num_examples)
  correct = run_predict(all_indices) == y_host
  clean_accuracy = float(np.mean(correct))
  compiled = [_jit_with_model(_attack_call(fn), logits_fn, options) for _, fn in attacks]

  per_eps = []
  for e_index, eps in enumerate(eps_values):
    robust = correct.copy()
    after, seconds, largest = [], [], 0.0
    for a_index, (name, _) in enumerate(attacks):
      start = time.perf_counter()
      remaining = np.nonzero(robust)[0]
      for b_index, (chunk, real) in enumerate(_padded_batches(remaining, batch_size)):
        k = jax.random.fold_in(jax.random.fold_in(
            jax.random.fold_in(key, key_index[e_index]), a_index), b_index)
        xb, yb = x_host[chunk], y_host[chunk]
        x_adv = np.asarray(compiled[a_index](k, *place(xb, yb), jnp.float32(eps)))
        sizes = check_perturbation(xb[:real], x_adv[:real], eps, norm, rtol=rtol,
                                   atol=atol, name=f"attack {name!r} at eps={eps:g}")
        largest = max(largest, float(np.max(sizes, initial=0.0)))
        preds = np.asarray(predict(*place(x_adv)))[:real]
        fooled = preds != yb[:real]
        robust[chunk[:real][fooled]] = False
      seconds.append((name, time.perf_counter() - start))
      after.append((name, float(np.mean(robust))))
      if verbose:
        print(f"eps={eps:g} after {name}: robust accuracy {100 * after[-1][1]:.2f}% "
              f"({seconds[-1][1]:.1f} s)", flush=True)
    per_eps.append(EpsResult(eps=eps, robust_accuracy=float(np.mean(robust)),
                             robust_accuracy_after=tuple(after), seconds=tuple(seconds),
                             max_perturbation=largest, robust=robust))
  return RobustAccuracyResult(norm=norm, num_examples=num_examples,
                              clean_accuracy=clean_accuracy,
                              attack_names=tuple(n for n, _ in attacks),
                              per_eps=tuple(per_eps), correct=correct, suite=str(suite))


def standard_attacks(norm: str, *, num_classes: Optional[int] = None,
                     num_steps: int = 100, num_restarts: Optional[int] = None,
                     num_target_classes: Optional[int] = None,
                     square_queries: int = 5001, fab_t: bool = True
                     ) -> List[Tuple[str, AttackFn]]:
  """AutoAttack's standard version (Croce & Hein 2020) as a sequence for `robust_accuracy`.

  With the defaults, the standard version of the reference code
  (fra31/auto-attack, `version='standard'`), each attack run only on the
  points every previous one failed on (label the result with
  `AUTOATTACK_STANDARD`):

  * 'linf', 'l2': APGD-CE (100 iterations, 1 restart), APGD-T (targeted
    DLR, 9 target classes, 100 iterations, 1 restart), FAB-T (9 target
    classes, 100 iterations, 1 restart, from x), Square (5,000 iterations
    after its initial query, i.e. num_queries=5001, p_init 0.8, 1 restart,
    the window schedule not rescaled to the budget: `resc_schedule=False`);
    APGD starts from the reference's random start (`init='autoattack'`).
  * 'l1': APGD-CE with L1-APGD (5 restarts, each the reference's three runs
    at 3 eps, 2 eps, eps: `large_reps`), APGD-T (5 target classes, 1
    restart, `large_reps`) and FAB-T in L1 (9 target classes). The
    reference lists Square for L1 too; certjax's Square has no L1 version,
    so the L1 sequence ends with FAB-T.

  What differs when arguments change (the result is then no longer the
  standard version; label it something else): `num_steps` sets the
  iterations of APGD-CE, APGD-T and FAB-T; `num_restarts` the restarts of
  APGD-CE, APGD-T and FAB-T (None: the standard 1, and 5 for APGD-CE in
  L1); `num_target_classes` the targets of APGD-T and FAB-T (None: 9, and 5
  for APGD-T in L1); `square_queries` Square's total budget, initial query
  included (0 drops Square); `fab_t=False` drops FAB-T.

  With fewer classes (when `num_classes` is given) the target classes are
  capped at num_classes - 1 (the reference needs 10 classes for its 9
  targets), and with fewer than 4 classes APGD-T is replaced by untargeted
  APGD-DLR (3 classes) or APGD on the CW margin (2 classes), since targeted
  DLR needs 4 classes. The radius is not part of the sequence:
  `robust_accuracy` passes each eps of its `eps_list` to every attack.

  Args:
    norm: 'linf', 'l2' or 'l1'.
    num_classes: number of classes, if known.
    num_steps: iterations of APGD-CE, APGD-T and FAB-T (100).
    num_restarts: restarts of APGD-CE, APGD-T and FAB-T (None: standard).
    num_target_classes: target classes of APGD-T and FAB-T (None: standard).
    square_queries: Square's evaluations per example, initial one included
      (5001: the reference's 5,000 iterations); 0 drops Square.
    fab_t: include FAB-T.

  Returns:
    (name, attack_fn) pairs: 'apgd-ce', 'apgd-t', 'fab-t', 'square'.

  References:
    Croce, Hein. Reliable Evaluation of Adversarial Robustness with an
      Ensemble of Diverse Parameter-free Attacks. ICML 2020.
    Croce, Hein. Mind the Box: l1-APGD for Sparse Adversarial Attacks on
      Image Classifiers. ICML 2021 (the L1 version).
  """
  check_choice(norm, "norm", norms.NORMS)
  check_int_at_least(num_steps, "num_steps", 1)
  check_int_at_least(square_queries, "square_queries", 0)
  if num_restarts is not None:
    check_int_at_least(num_restarts, "num_restarts", 1)
  if num_target_classes is not None:
    check_int_at_least(num_target_classes, "num_target_classes", 1)
  if num_classes is not None:
    check_int_at_least(num_classes, "num_classes", 2)
  l1 = norm == "l1"
  apgd_restarts = num_restarts or (5 if l1 else 1)
  other_restarts = num_restarts or 1
  apgd_targets = num_target_classes or (5 if l1 else 9)
  fab_targets = num_target_classes or 9
  if num_classes is not None:
    apgd_targets = min(apgd_targets, num_classes - 1)
    fab_targets = min(fab_targets, num_classes - 1)
  apgd_settings = dict(norm=norm, num_steps=num_steps, init="autoattack", large_reps=l1)
  sequence = [("apgd-ce", make_apgd(loss="ce", num_restarts=apgd_restarts, **apgd_settings))]
  if num_classes is None or num_classes >= 4:
    sequence.append(("apgd-t", make_apgd_targeted(
        num_target_classes=apgd_targets, num_restarts=other_restarts, **apgd_settings)))
  elif num_classes == 3:
    sequence.append(("apgd-dlr", make_apgd(loss="dlr", num_restarts=other_restarts,
                                           **apgd_settings)))
  else:
    sequence.append(("apgd-cw", make_apgd(loss="cw", num_restarts=other_restarts,
                                          **apgd_settings)))
  if fab_t:
    sequence.append(("fab-t", make_fab_targeted(
        norm=norm, num_steps=num_steps, num_target_classes=fab_targets,
        num_restarts=other_restarts)))
  if square_queries > 0 and norm in SQUARE_NORMS:
    sequence.append(("square", make_square(norm=norm, num_queries=square_queries,
                                           p_init=0.8, rescale_schedule=False)))
  return sequence
