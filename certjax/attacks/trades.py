"""TRADES' inner maximisation (Zhang et al. 2019), usable on its own.

The 'trades' training objective (`certjax.training.objectives.adversarial`)
minimises CE(f(x), y) + beta * KL(f(x) || f(x')) at the point `trades_attack`
finds; the attack itself is a plain function of a `logits_fn`.

References:
  Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan. Theoretically Principled
    Trade-off between Robustness and Accuracy. ICML 2019
    (yaodongyu/TRADES `trades.py`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from certjax.attacks import norms
from certjax.types import Array

TRADES_INIT_STD = 0.001  # the start x + 0.001 N(0, I) of Zhang et al.'s code


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
  """Per-example KL(softmax(p_logits) || softmax(q_logits))."""
  log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), -1)
  log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def trades_attack(key: Any, logits_fn: Any, x: Array, clean_logits: Array, eps: Array,
                  *, norm: str, num_steps: int, step_size: Array) -> Array:
  """TRADES' inner maximisation of KL(f(x) || f(x')) over the eps ball ∩ [0, 1].

  Starts at x + 0.001 N(0, I) (projected), then `num_steps` steepest-ascent
  steps (signed gradient for 'linf'), each projected.
  """
  p_logits = lax.stop_gradient(clean_logits)
  start = x + TRADES_INIT_STD * jax.random.normal(key, x.shape, x.dtype)
  x_adv = norms.project(start, x, eps, norm)
  step = step_size.astype(x.dtype)

  def body(_, x_adv):
    grad = jax.grad(lambda z: jnp.sum(kl_divergence(p_logits, logits_fn(z))))(x_adv)
    return norms.project(x_adv + step * norms.steepest_direction(grad, norm), x, eps, norm)

  return lax.fori_loop(0, num_steps, body, x_adv)
