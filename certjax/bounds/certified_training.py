"""Pure pieces of certified training: schedules and the worst-case cross-entropy.

The IBP and CROWN-IBP training objectives
(`certjax.training.objectives.certified`) are built from these and from the
bounds of `certjax.bounds.linear`.

Schedules (Gowal et al. 2018, Appendix B; the same ramp for every quantity):
eps = 0 for the first `warmup_steps` steps, then a linear ramp to `train_eps`
over `ramp_steps` steps; kappa goes from `kappa_start` to `kappa_end` and beta
from `beta_start` to `beta_end` over the same ramp. `warmup_steps` and
`ramp_steps` below 1 are fractions of the run's total steps (so a config stays
consistent when `num_train_steps` is overridden), values >= 1 absolute steps.
The step is the number of optimizer steps taken before the current one
(0-based), so eps is exactly 0 at step `warmup` and exactly `train_eps` from
step `warmup + ramp` on.

References:
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
  Training Verifiably Robust Models", https://arxiv.org/abs/1810.12715.
  Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably
  Robust Neural Networks" (CROWN-IBP), https://arxiv.org/abs/1906.06316.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from certjax import validation
from certjax.bounds.interval import Interval
from certjax.types import Array, ArrayLike

def resolve_steps(value: float | int, total_steps: int, name: str) -> int:
  """Steps from a fraction of the run (0 <= value < 1) or an absolute count (>= 1)."""
  validation.check_positive(value, name, allow_zero=True)
  if value < 1:
    return int(round(float(value) * total_steps))
  if float(value) != int(value):
    raise ValueError(f"{name} must be a fraction in [0, 1) of the total steps or a whole "
                     f"number of steps >= 1; got {value!r}.")
  return int(value)


def ramp_fraction(step: ArrayLike, warmup: int, ramp: int) -> Array:
  """0 before `warmup`, then linear to 1 at `warmup + ramp`, 1 after (float32)."""
  step = jnp.asarray(step, jnp.float32)
  if ramp == 0:
    return (step >= warmup).astype(jnp.float32)
  return jnp.clip((step - warmup) / ramp, 0.0, 1.0)


def linear_ramp(step: ArrayLike, start: float, end: float, warmup: int, ramp: int) -> Array:
  """`start` until `warmup`, then linear to `end` over `ramp` steps."""
  return start + (end - start) * ramp_fraction(step, warmup, ramp)


class Schedules(NamedTuple):
  """Per-step values of a certified-training objective (each: step -> scalar)."""
  eps: Callable[[ArrayLike], Array]
  kappa: Callable[[ArrayLike], Array]
  beta: Callable[[ArrayLike], Array]
  warmup: int
  ramp: int


def make_schedules(hparams: Mapping[str, Any], total_steps: int) -> Schedules:
  """The eps, kappa and beta schedules of `config.objective` for a run of `total_steps`.

  Raises:
    ValueError: negative eps, kappa/beta outside [0, 1], or a warm-up plus
      ramp longer than the run.
  """
  h = dict(hparams)
  validation.check_positive(h["train_eps"], "objective.train_eps", allow_zero=True)
  for key in ("kappa_start", "kappa_end", "beta_start", "beta_end"):
    if key in h and not 0.0 <= float(h[key]) <= 1.0:
      raise ValueError(f"objective.{key} must lie in [0, 1], got {h[key]!r}.")
  warmup = resolve_steps(h["warmup_steps"], total_steps, "objective.warmup_steps")
  ramp = resolve_steps(h["ramp_steps"], total_steps, "objective.ramp_steps")
  if warmup + ramp > total_steps:
    raise ValueError(
        f"objective.warmup_steps + objective.ramp_steps ({warmup} + {ramp} steps) exceed "
        f"the {total_steps} training steps; shorten them or train longer.")
  eps_end, k0, k1 = float(h["train_eps"]), float(h["kappa_start"]), float(h["kappa_end"])
  b0, b1 = float(h.get("beta_start", 0.0)), float(h.get("beta_end", 0.0))
  return Schedules(
      eps=lambda s: linear_ramp(s, 0.0, eps_end, warmup, ramp),
      kappa=lambda s: linear_ramp(s, k0, k1, warmup, ramp),
      beta=lambda s: linear_ramp(s, b0, b1, warmup, ramp),
      warmup=warmup, ramp=ramp)


def worst_case_cross_entropy(margin_lower: Array) -> Array:
  """Mean CE of the worst-case logits [0, -m_1, ..., -m_{K-1}] with the true class first.

  Equals the CE of logits z_hat with z_hat_y = 0 and z_hat_j = -lower(z_y - z_j)
  (Gowal et al. 2018, eq. 8 with the elided specification).
  """
  m = margin_lower.astype(jnp.float32)
  zeros = jnp.zeros(m.shape[:-1] + (1,), m.dtype)
  return jnp.mean(jax.nn.logsumexp(jnp.concatenate([zeros, -m], axis=-1), axis=-1))


def clipped_linf_box(x: Array, eps: ArrayLike) -> Interval:
  """The L-inf ball of radius `eps` around `x`, intersected with [0, 1].

  Unlike `certjax.bounds.linf_ball` it runs no value checks, which need
  concrete inputs: inside a training loss `eps` is a traced schedule value.
  """
  eps = jnp.asarray(eps).astype(x.dtype)
  return Interval(jnp.maximum(x - eps, 0.0), jnp.minimum(x + eps, 1.0))


def schedule_table(hparams, total_steps: int, steps) -> dict[str, np.ndarray]:
  """Values of eps, kappa and beta at the given steps (for configs and notebooks)."""
  s = make_schedules(hparams, total_steps)
  steps = np.asarray(steps)
  return {"step": steps, "eps": np.asarray(s.eps(steps)), "kappa": np.asarray(s.kappa(steps)),
          "beta": np.asarray(s.beta(steps))}
