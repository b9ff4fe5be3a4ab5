"""The 'abl_isolation' objective: anti-backdoor learning's isolation stage (Li et al. 2021).

Trains on the (possibly poisoned) training set with local gradient ascent:
the cross-entropy is descended while above `gamma` and ascended once below,
so clean examples hover around gamma while backdoor examples, which a
network learns much faster, still fall below it. The trained model is ABL's
isolation model: the 'backdoor' evaluator's `abl` defence isolates the
lowest-loss share of the training set with it and unlearns that share
(`certjax.evaluation.backdoor_repair`).

reduction='batch' (the default) is the authors' code: sign(L - gamma) L on
the batch-mean loss L; 'example' is the paper's Eq. 3, the sign taken per
example (`certjax.poisoning.repair.lga_loss`).

References:
  Li, Lyu, Koren, Lyu, Li, Ma. Anti-Backdoor Learning: Training Clean Models
    on Poisoned Data. NeurIPS 2021 (code: bboylyg/ABL).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from certjax import validation
from certjax.poisoning import repair
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, accuracy,
                                                  register_objective)


@register_objective("abl_isolation", defaults={"gamma": 0.5, "reduction": "batch"})
def abl_isolation(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """Local gradient ascent around loss `gamma` (0.5 in the paper).

  Raises:
    ValueError: gamma <= 0 or not finite, or an unknown reduction.
  """
  gamma = validation.check_positive(hparams.gamma, "objective.gamma")
  reduction = validation.check_choice(hparams.reduction, "objective.reduction",
                                      repair.LGA_REDUCTIONS)

  def loss_fn(params, model_state, batch, key, step):
    del key, step
    logits, new_state = ctx.forward(params, model_state, batch["image"], train=True)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])
    loss = repair.lga_loss(per_example, gamma, reduction=reduction)
    return loss, ({"loss": loss, "cross_entropy": jnp.mean(per_example),
                   "accuracy": accuracy(logits, batch["label"])}, new_state)

  return loss_fn
