"""Training: the generic loop, the objectives registry, optimizers, the run config.

`train_and_evaluate(config, workdir)` trains the model `config` names with the
objective `config.objective.name` selects (`certjax.training.objectives`),
checkpointing to and resuming from `workdir`, and runs the evaluators
`config.evals` lists on the way. Restoring a trained model
(`load_trained`, `restore_model`) lives in `certjax.runs`, below both the
loop and the evaluators; it is re-exported here.
"""

from certjax.runs import load_trained, restore_model
from certjax.training.config import base_config, validate_config
from certjax.training.objectives import (ObjectiveContext, get_objective, objective_defaults,
                                         objective_names, register_objective)
from certjax.training.train import TrainResult, TrainState, train_and_evaluate

__all__ = [
    "ObjectiveContext", "TrainResult", "TrainState", "base_config", "get_objective",
    "load_trained", "objective_defaults", "objective_names", "register_objective",
    "restore_model", "train_and_evaluate", "validate_config",
]
