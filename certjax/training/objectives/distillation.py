"""The 'distillation' objective: defensive distillation's teacher and student (Papernot et al.).

  teacher: `objective.teacher_workdir = ''`: cross-entropy of
    `softmax(logits / T)` against the hard labels;
  student: `objective.teacher_workdir = <the teacher's workdir>`: the same
    loss against the teacher's temperature-T probabilities of each training
    batch (`certjax.defences.distillation.soft_labels`).

Both are deployed at T = 1: the checkpoint's logits are used as they are, so
every evaluator sees the distilled network as Papernot et al. deploy it.
Computing the soft labels of each batch rather than of the training set once
is the same target for unaugmented data and the consistent one when the data
are augmented.
"""

from __future__ import annotations

import jax
import ml_collections

from certjax import runs
from certjax import validation
from certjax.defences import distillation as distillation_lib
from certjax.training.objectives.registry import (LossFn, ObjectiveContext, accuracy,
                                                  register_objective)


@register_objective("distillation", defaults={"temperature": 100.0, "teacher_workdir": "",
                                              "teacher_checkpoint_step": -1})
def distillation(hparams: ml_collections.ConfigDict, ctx: ObjectiveContext) -> LossFn:
  """Defensive distillation at temperature `temperature` (Papernot et al. 2016 use 100).

  Raises:
    ValueError: a temperature <= 0, or a teacher with a different number of classes.
    FileNotFoundError: a teacher workdir without checkpoints.
  """
  temperature = distillation_lib.check_temperature(hparams.temperature,
                                                   "objective.temperature")
  validation.check_int_at_least(hparams.teacher_checkpoint_step,
                                "objective.teacher_checkpoint_step", -1)
  teacher_logits_fn = None
  if hparams.teacher_workdir:
    teacher = runs.restore_model(str(hparams.teacher_workdir),
                                 int(hparams.teacher_checkpoint_step))
    if teacher.info.num_classes != ctx.num_classes:
      raise ValueError(
          f"The teacher in {hparams.teacher_workdir} has {teacher.info.num_classes} classes; "
          f"this run's data set has {ctx.num_classes}.")
    teacher_logits_fn = teacher.logits_fn()

  def loss_fn(params, model_state, batch, key, step):
    del key, step
    logits, new_state = ctx.forward(params, model_state, batch["image"], train=True)
    if teacher_logits_fn is None:
      targets = jax.nn.one_hot(batch["label"], logits.shape[-1])
    else:
      targets = jax.lax.stop_gradient(
          distillation_lib.soft_labels(teacher_logits_fn(batch["image"]), temperature))
    loss = distillation_lib.distillation_loss(logits, targets, temperature)
    return loss, ({"loss": loss, "accuracy": accuracy(logits, batch["label"])}, new_state)

  return loss_fn
