"""Square Attack (Andriushchenko et al. 2020): score-based black-box attack.

Random search that only queries logits. Each iteration proposes, for every
example still robust, a change confined to a random square window and keeps it
if it lowers the margin loss (or fools the model):

* 'linf': the window is set to x +/- eps with one random sign per channel;
  the start is vertical stripes of +/- eps.
* 'l2': mass is moved from a second random window into the first one, whose
  new content is the `eta` pattern of nested squares with random sign per
  channel added to the old content, rescaled so the total L2 norm stays eps;
  the start is a grid of `eta` patterns.

The window side follows the schedule p (`p_selection` of the reference code):
p_init, halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
8000; the side is round(sqrt(p * H * W)) (at least 1, and odd and at least 3
for 'l2'). With `rescale_schedule=True` (the default, the reference's
`resc_schedule=True`) the iteration counts are first rescaled to a budget of
10,000 iterations, int(i / n * 10000) with n = num_queries - 1 iterations
(the reference's `n_queries`), so a short budget still walks the whole
schedule; AutoAttack's standard version builds its Square attack with
`resc_schedule=False`, the schedule of the paper, where a budget of 5,000
iterations stops halfway through it.

JAX specifics: windows are per example (the reference shares one window per
batch); the window side is traced, with the 'l2' patterns for the (at most ten)
sides the schedule reaches precomputed in a table. The loop is a
`lax.while_loop` that exits when every example is fooled or the budget is
spent; an example stops querying (masked, shapes stay static) as soon as it is
fooled. `num_queries` is the total budget per example, the initial query
included: no example is ever evaluated more than `num_queries` times, so
num_queries = n + 1 runs the reference's `n_queries = n` iterations.

References:
  Andriushchenko, Croce, Flammarion, Hein. Square Attack: a query-efficient
    black-box adversarial attack via random search. ECCV 2020.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import check_choice, check_in_open_interval, check_int_at_least
from certjax.attacks import losses as losses_lib
from certjax.attacks import norms
from certjax.attacks.core import AttackFn, as_oracle, bind_attack, validate_inputs

SQUARE_NORMS = ("linf", "l2")
SQUARE_LOSSES = ("margin", "ce")
# Iteration counts (on a 10,000-iteration scale when rescaled) after which p
# is halved.
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def schedule_phase_starts(num_queries: int, rescale_schedule: bool) -> np.ndarray:
  """First iteration of each halving of p (static; 0-based iterations).

  Iteration i (the i-th proposal after the initial query) is in phase
  sum(i >= starts) and uses p_init / 2**phase. The thresholds are computed
  on the host with the reference's own float arithmetic, int(i / n * 10000)
  for n = num_queries - 1 iterations, so the phases match its
  `p_selection` exactly, rounding included.

  Args:
    num_queries: total evaluations per example, the initial one included.
    rescale_schedule: rescale the iteration counts to 10,000 iterations.

  Returns:
    int32 array of len(_P_HALVINGS) first iterations (num_queries where a
    phase is never reached).
  """
  iterations = max(int(num_queries) - 1, 1)
  i = np.arange(max(int(num_queries), 1), dtype=np.int64)
  scaled = (i / iterations * 10000).astype(np.int64) if rescale_schedule else i
  starts = []
  for halving in _P_HALVINGS:
    later = np.nonzero(scaled > halving)[0]
    starts.append(int(later[0]) if later.size else int(num_queries))
  return np.asarray(starts, np.int32)


def window_fraction(iteration: int, *, p_init: float, num_queries: int,
                    rescale_schedule: bool = True) -> float:
  """The fraction p of pixels in the window at a (0-based) iteration.

  The schedule `square` follows (see the module docstring).
  """
  phase = int(np.sum(iteration >= schedule_phase_starts(num_queries, rescale_schedule)))
  return float(p_init) / 2 ** phase


class SquareInfo(NamedTuple):
  """Per-example bookkeeping returned with `return_info=True`."""
  num_queries: Array  # model evaluations spent on each example, initial one included
  success: Array  # whether the example was fooled


def _side_lengths(p_init: float, height: int, width: int, norm: str) -> np.ndarray:
  """Window side per schedule phase (static)."""
  limit = min(height, width)
  sides = []
  for phase in range(len(_P_HALVINGS) + 1):
    side = int(round(math.sqrt(p_init / 2 ** phase * height * width)))
    if norm == "l2":
      side = max(side, 3)
      side += 1 - side % 2
      if side > limit:
        side = limit - (1 - limit % 2) if limit >= 3 else limit
    sides.append(min(max(side, 1), limit))
  return np.asarray(sides, np.int32)


def _eta_rectangle(rows: int, cols: int) -> np.ndarray:
  """Nested centred squares weighted 1/(k+1)^2, unit L2 norm (reference `eta_rectangles`)."""
  if rows == 0:
    return np.zeros((0, cols))
  num_rings = max(rows // 2 + 1, cols // 2 + 1)
  weights = 1.0 / np.arange(1, num_rings + 1) ** 2
  tail = np.cumsum(weights[::-1])[::-1]  # tail[d] = sum_{k >= d} weights[k]
  i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
  ring = np.maximum(np.abs(i - rows // 2), np.abs(j - cols // 2))
  pattern = tail[ring]
  return pattern / np.linalg.norm(pattern)


def eta_pattern(side: int) -> np.ndarray:
  """The (side, side) L2 Square-attack pattern: +rectangles on top, - below."""
  pattern = np.concatenate([_eta_rectangle(side // 2, side),
                            -_eta_rectangle(side - side // 2, side)], axis=0)
  return pattern / np.linalg.norm(pattern)


def _l2_start_pattern(height: int, width: int) -> Tuple[np.ndarray, np.ndarray, int]:
  """Grid of eta patterns for the L2 start: (pattern, window id or -1, count)."""
  side = max(height // 5, 1)
  pattern = np.zeros((height, width))
  window_id = -np.ones((height, width), np.int32)
  tile = eta_pattern(side)
  count = 0
  top = (height - 5 * side) // 2
  for _ in range(height // side):
    left = (width - 5 * side) // 2
    for _ in range(width // side):
      rows = slice(max(top, 0), min(top + side, height))
      cols = slice(max(left, 0), min(left + side, width))
      block = tile[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
      if block.size:
        pattern[rows, cols] = block
        window_id[rows, cols] = count
        count += 1
      left += side
    top += side
  return pattern, window_id, max(count, 1)


def _window_mask(key: PRNGKey, batch: int, height: int, width: int,
                 side: Array) -> Tuple[Array, Array, Array]:
  """Random per-example windows: (mask (B, H, W, 1), top (B,), left (B,))."""
  u = jax.random.uniform(key, (batch, 2))
  top = jnp.floor(u[:, 0] * (height - side + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, 1] * (width - side + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
  return (in_rows[:, :, None] & in_cols[:, None, :])[..., None], top, left


def _channel_l2(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))


def _square_core(oracle: Any, key: PRNGKey, x: Array, y: Array,
                 target: Optional[Array], eps: Array, *, norm: str,
                 num_queries: int, p_init: float, loss: str,
                 rescale_schedule: bool) -> Tuple[Array, SquareInfo]:
  batch, height, width, channels = x.shape
  radius = norms.broadcast_per_example(eps, x)
  sides = jnp.asarray(_side_lengths(p_init, height, width, norm))
  phase_starts = jnp.asarray(schedule_phase_starts(num_queries, rescale_schedule))
  objective_fn = losses_lib.cw_margin if loss == "margin" else losses_lib.cross_entropy

  def evaluate(k, x_eval):
    logits = oracle.logits(k, x_eval)
    return losses_lib.cw_margin(logits, y, target), objective_fn(logits, y, target)

  k_init, k_loop = jax.random.split(key)
  if norm == "linf":
    stripes = jax.random.rademacher(k_init, (batch, 1, width, channels), x.dtype)
    x_best = jnp.clip(x + radius * stripes, 0.0, 1.0)
  else:
    start, window_id, count = _l2_start_pattern(height, width)
    signs = jax.random.rademacher(k_init, (batch, count, channels), x.dtype)
    delta = jnp.where(jnp.asarray(window_id >= 0)[None, :, :, None],
                      jnp.asarray(start, x.dtype)[None, :, :, None]
                      * signs[:, np.maximum(window_id, 0)], 0.0)
    size = norms.broadcast_per_example(norms.lp_norm(delta, "l2"), x)
    x_best = jnp.clip(x + radius * delta / (size + 1e-12), 0.0, 1.0)
    # Patterns for each phase's side, zero-padded to the largest side.
    sides_np = _side_lengths(p_init, height, width, norm)
    largest = int(sides_np.max())
    table_np = np.zeros((len(sides_np), largest, largest))
    for phase, side in enumerate(sides_np):
      table_np[phase, :side, :side] = eta_pattern(int(side))
    table = jnp.asarray(table_np, x.dtype)

  margin_best, objective_best = evaluate(jax.random.fold_in(k_loop, 0), x_best)
  queries = jnp.ones((batch,), jnp.int32)

  def propose_linf(k, x_best, side):
    k_win, k_sign = jax.random.split(k)
    mask, _, _ = _window_mask(k_win, batch, height, width, side)
    signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
    return jnp.where(mask, jnp.clip(x + radius * signs, 0.0, 1.0), x_best)

  def propose_l2(k, x_best, side, phase):
    k_win1, k_win2, k_sign, k_flip = jax.random.split(k, 4)
    delta = x_best - x
    mask1, top, left = _window_mask(k_win1, batch, height, width, side)
    mask2, _, _ = _window_mask(k_win2, batch, height, width, side)
    window_norm = _channel_l2(jnp.where(mask1, delta, 0.0))
    image_norm = norms.broadcast_per_example(norms.lp_norm(delta, "l2"), x)
    windows_norm = norms.broadcast_per_example(
        norms.lp_norm(jnp.where(mask1 | mask2, delta, 0.0), "l2"), x)
    local_r = jnp.arange(height)[None, :, None] - top[:, None, None]
    local_c = jnp.arange(width)[None, None, :] - left[:, None, None]
    local_r, local_c = jnp.broadcast_arrays(local_r, local_c)
    flip = jax.random.bernoulli(k_flip, 0.5, (batch, 1, 1))
    first = jnp.clip(jnp.where(flip, local_c, local_r), 0, table.shape[1] - 1)
    second = jnp.clip(jnp.where(flip, local_r, local_c), 0, table.shape[2] - 1)
    pattern = table[phase][first, second][..., None]
    signs = jax.random.rademacher(k_sign, (batch, 1, 1, channels), x.dtype)
    new = jnp.where(mask1, pattern * signs + delta / (window_norm + 1e-12), 0.0)
    budget = jnp.sqrt(jnp.maximum(radius ** 2 - image_norm ** 2, 0.0) / channels
                      + windows_norm ** 2)
    new = new / (_channel_l2(new) + 1e-12) * budget
    delta = jnp.where(mask1, new, jnp.where(mask2, 0.0, delta))
    size = norms.broadcast_per_example(norms.lp_norm(delta, "l2"), x)
    return jnp.clip(x + radius * delta / (size + 1e-12), 0.0, 1.0)

  def cond(state):
    i, _, margin_best, _, _ = state
    return (i < num_queries - 1) & jnp.any(margin_best <= 0)

  def body(state):
    i, x_best, margin_best, objective_best, queries = state
    active = margin_best <= 0
    phase = jnp.sum(i >= phase_starts)
    side = sides[phase]
    k = jax.random.fold_in(k_loop, i + 1)
    k_prop, k_eval = jax.random.split(k)
    if norm == "linf":
      x_new = propose_linf(k_prop, x_best, side)
    else:
      x_new = propose_l2(k_prop, x_best, side, phase)
    margin, objective = evaluate(k_eval, x_new)
    improved = active & (objective > objective_best)
    accept = improved | (active & (margin > 0))
    return (i + 1,
            jnp.where(accept.reshape(-1, 1, 1, 1), x_new, x_best),
            jnp.where(accept, margin, margin_best),
            jnp.where(improved, objective, objective_best),
            queries + active.astype(jnp.int32))

  state = (jnp.zeros((), jnp.int32), x_best, margin_best, objective_best, queries)
  _, x_best, margin_best, _, queries = lax.while_loop(cond, body, state)
  return x_best, SquareInfo(num_queries=queries, success=margin_best > 0)


def _check_config(norm: str, num_queries: int, p_init: float, loss: str,
                  rescale_schedule: bool = True) -> None:
  check_choice(norm, "norm", SQUARE_NORMS)
  check_int_at_least(num_queries, "num_queries", 1)
  check_in_open_interval(p_init, "p_init", 0.0, 1.0)
  check_choice(loss, "loss", SQUARE_LOSSES)
  if not isinstance(rescale_schedule, (bool, np.bool_)):
    raise ValueError(f"rescale_schedule must be True or False; got {rescale_schedule!r}.")


def square(key: PRNGKey, logits_fn: Any, x: ArrayLike, y: ArrayLike, *,
           eps: ArrayLike, norm: str = "linf", num_queries: int = 5000,
           p_init: float = 0.8, loss: str = "margin",
           rescale_schedule: bool = True,
           target: Optional[ArrayLike] = None,
           return_info: bool = False,
           checked: bool = False) -> Union[Array, Tuple[Array, SquareInfo]]:
  """Square Attack, score-based black-box (Andriushchenko et al. 2020).

  Checks: eager calls check shapes, dtypes, settings and values (x finite and
  in [0, 1], eps finite and >= 0, y and target in [0, num_classes)). Under
  `jit`/`vmap` the values are traced and only shapes, dtypes and settings
  are checked, unless `checked=True`, which checks the values in the
  compiled program (see `certjax.attacks.core`).

  Args:
    key: a `jax.random.key`.
    logits_fn: x -> logits (only evaluated, never differentiated), or an
      oracle such as EOT (its mean logits are used).
    x: clean images (batch, H, W, C) in [0, 1].
    y: true labels (batch,).
    eps: radius, scalar or (batch,).
    norm: 'linf' or 'l2'.
    num_queries: total model evaluations allowed per example (initial one
      included).
    p_init: initial fraction of pixels in the window (0.8 in the paper for
      'linf'; AutoAttack uses 0.8 for both norms).
    loss: 'margin' (CW margin) or 'ce' (cross-entropy) to drive the search;
      success is always judged by the margin.
    rescale_schedule: rescale the window schedule to the query budget (the
      reference's `resc_schedule`; True by default, False in AutoAttack's
      standard version). See the module docstring.
    target: optional target labels for a targeted attack.
    return_info: also return `SquareInfo` (queries per example, success).
    checked: check traced values too, as `checkify` checks; the call must
      then run under `certjax.attacks.checked` (or `checkify.checkify`).
      False adds nothing to the program.

  Returns:
    Adversarial images shaped like `x` (and `SquareInfo` with return_info).

  Raises:
    ValueError: on invalid input, naming the problem and the accepted values.
  """
  oracle = as_oracle(logits_fn)
  _check_config(norm, num_queries, p_init, loss, rescale_schedule)
  validate_inputs(oracle, x, y, eps=eps, norm=norm, target=target, name="square",
                  checked=checked)
  x, y = jnp.asarray(x), jnp.asarray(y)
  target = None if target is None else jnp.asarray(target)
  x_adv, info = _square_core(oracle, key, x, y, target, jnp.asarray(eps, x.dtype),
                             norm=norm, num_queries=num_queries, p_init=float(p_init),
                             loss=loss, rescale_schedule=bool(rescale_schedule))
  return (x_adv, info) if return_info else x_adv


def make_square(*, norm: str = "linf", num_queries: int = 5000, p_init: float = 0.8,
                loss: str = "margin", rescale_schedule: bool = True) -> AttackFn:
  """`attack_fn(key, logits_fn, x, y, eps)` running `square`."""
  _check_config(norm, num_queries, p_init, loss, rescale_schedule)
  return bind_attack(square, "square", norm=norm, num_queries=num_queries,
                     p_init=p_init, loss=loss, rescale_schedule=bool(rescale_schedule))
