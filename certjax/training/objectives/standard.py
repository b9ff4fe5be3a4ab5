"""The 'standard' objective: softmax cross-entropy on clean inputs."""

from __future__ import annotations

import ml_collections

from certjax import validation
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, accuracy,
                                                  cross_entropy, register_objective)


@register_objective("standard", defaults={"label_smoothing": 0.0})
def standard(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """Plain empirical risk minimisation with softmax cross-entropy."""
  validation.check_positive(hparams.label_smoothing, "objective.label_smoothing",
                            allow_zero=True)

  def loss_fn(params, model_state, batch, key, step):
    del key, step
    logits, new_state = ctx.forward(params, model_state, batch["image"], train=True)
    loss = cross_entropy(logits, batch["label"], hparams.label_smoothing)
    return loss, ({"loss": loss, "accuracy": accuracy(logits, batch["label"])}, new_state)

  return loss_fn
