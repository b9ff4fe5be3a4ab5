"""Certified training objectives: IBP (Gowal et al.) and CROWN-IBP (Zhang et al.).

Importing this module registers two objectives in the training registry:

  * 'ibp': loss = kappa * CE(logits(x), y) + (1 - kappa) * CE(z_hat, y), where
    z_hat are the worst-case logits built from IBP lower bounds of the margins
    z_y - z_j over the eps ball (last layer elided): z_hat_y = 0,
    z_hat_j = -lower(z_y - z_j).
  * 'crown_ibp': the same loss with the margin lower bounds
    beta * CROWN-IBP + (1 - beta) * IBP. The raw CROWN-IBP bound is mixed in,
    as in the paper (it is not clipped by IBP here: see `certjax.bounds.verify`
    for the verification-time max of both). On accelerators the CROWN-IBP
    pass is skipped once beta is 0; on CPU it is always computed (see
    `_certified_objective`).

Schedules: see `certjax.bounds.certified_training` (eps ramps from 0 after
`warmup_steps` to `train_eps` over `ramp_steps`; kappa and beta follow the
same ramp).

BatchNorm: the bound pass uses the model in inference mode (running
statistics, as constants), which is exactly the function verified at test
time; the nominal pass runs in training mode and updates those statistics.
Shi et al. (2021) instead use the clean batch's statistics as constants in the
bound pass; with an eps warm-up the running statistics have settled by the
time eps grows, and the choice keeps the bounds of the training loss those of
the deployed network.

Metrics per batch: 'accuracy' (nominal), 'verified_accuracy' (correct and every
margin bound used by the loss > 0 at the current eps; a convex combination of
sound lower bounds is sound), 'eps', 'kappa' (and 'beta'), 'nominal_loss',
'verified_loss'.

References:
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for
  Training Verifiably Robust Models", https://arxiv.org/abs/1810.12715.
  Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably
  Robust Neural Networks" (CROWN-IBP), https://arxiv.org/abs/1906.06316.
  Shi et al. 2021, "Fast Certified Robust Training with Short Warmup",
  https://arxiv.org/abs/2103.17268 (BatchNorm in the bound pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from certjax.bounds import certified_training
from certjax.bounds import linear
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, cross_entropy,
                                                  register_objective)

# The hyperparameters of the 'ibp' objective and their defaults.
IBP_DEFAULTS = {
    "train_eps": 0.1,
    "warmup_steps": 2000 / 60000,  # Gowal et al. MNIST: 2k of 60k steps
    "ramp_steps": 10000 / 60000,   # then a 10k-step ramp
    "kappa_start": 1.0,
    "kappa_end": 0.5,
}
# ... and of 'crown_ibp'.
CROWN_IBP_DEFAULTS = {**IBP_DEFAULTS, "beta_start": 1.0, "beta_end": 0.0}


def _certified_objective(hparams, ctx, use_crown: bool):
  schedules = certified_training.make_schedules(hparams, ctx.total_steps)
  num_classes = ctx.num_classes
  # Once beta reaches 0 the CROWN-IBP pass is skipped with lax.cond rather
  # than multiplied by 0. Not on CPU: XLA:CPU runs the ops inside a
  # conditional about 9x slower (measured on the IBP 'small' CNN, value and
  # gradient alike), far more than the pass it would save.
  skip_when_beta_is_zero = jax.default_backend() != "cpu"

  def loss_fn(params, model_state, batch, key, step):
    del key
    x, y = batch["image"], batch["label"]
    logits, new_state = ctx.forward(params, model_state, x, train=True)
    eps, kappa = schedules.eps(step), schedules.kappa(step)
    logits_fn = ctx.logits_fn(params, model_state, train=False)
    box = certified_training.clipped_linf_box(x, eps)
    lower = linear.ibp_margins(logits_fn, box, y).lower
    metrics = {}
    if use_crown:
      beta = schedules.beta(step)
      spec = linear.margin_spec(y, num_classes)

      def mixed(ibp_lower):
        raw = linear.crown_ibp(logits_fn, box, spec, upper=False).lower
        return beta * raw + (1 - beta) * ibp_lower

      if skip_when_beta_is_zero:
        lower = jax.lax.cond(beta > 0, mixed, lambda l: l, lower)
      else:
        lower = mixed(lower)
      metrics["beta"] = beta
    nominal = cross_entropy(logits, y)
    verified = certified_training.worst_case_cross_entropy(lower)
    loss = kappa * nominal + (1 - kappa) * verified
    correct = jnp.argmax(logits, -1) == y
    metrics.update({
        "accuracy": jnp.mean(correct),
        "verified_accuracy": jnp.mean(correct & jnp.all(lower > 0, axis=-1)),
        "eps": eps, "kappa": kappa, "nominal_loss": nominal, "verified_loss": verified,
    })
    return loss, (metrics, new_state)

  return loss_fn


@register_objective("ibp", defaults=IBP_DEFAULTS)
def ibp_objective(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext
                  ) -> LossFn:
  """IBP certified training (Gowal et al. 2018); see the module docstring.

  Hyperparameters: train_eps, warmup_steps, ramp_steps, kappa_start, kappa_end.

  References:
    Gowal et al. 2018, https://arxiv.org/abs/1810.12715.
  """
  return _certified_objective(hparams, ctx, use_crown=False)


@register_objective("crown_ibp", defaults=CROWN_IBP_DEFAULTS)
def crown_ibp_objective(hparams: ml_collections.ConfigDict,
                        ctx: ObjectiveContext) -> LossFn:
  """CROWN-IBP certified training (Zhang et al. 2020); see the module docstring.

  Hyperparameters: those of 'ibp' plus beta_start, beta_end (the weight of
  the CROWN-IBP bound against the IBP bound, ramped with eps). The networks
  must be affine + ReLU on the input path (CROWN's requirement).

  References:
    Zhang et al. 2020, https://arxiv.org/abs/1906.06316.
  """
  return _certified_objective(hparams, ctx, use_crown=True)
