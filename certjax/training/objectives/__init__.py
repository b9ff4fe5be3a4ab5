"""Training objectives: the loss one training step minimises, chosen by `config.objective.name`.

  standard      softmax cross-entropy (`standard.py`);
  adversarial   'pgd_at', 'trades', 'fast_at' (`adversarial.py`);
  certified     'ibp', 'crown_ibp' (`certified.py`);
  smoothing     'gaussian', 'smoothadv', 'macer', 'consistency' (`smoothing.py`);
  defences      'distillation' (`distillation.py`: defensive distillation's teacher
                and student);
  poisoning     'abl_isolation' (`poisoning.py`: anti-backdoor learning's isolation
                stage).

Each module imports the pure pieces it needs from the algorithm packages
(`certjax.attacks`, `certjax.bounds`, `certjax.smoothing`,
`certjax.defences`, `certjax.poisoning`) and registers its
factories with `register_objective` (`registry.py`) when imported; this
package imports all of them, so every objective is registered once
`certjax.training.objectives` is imported. The algorithm packages never
import training code.
"""

from certjax.training.objectives.registry import LossFn
from certjax.training.objectives.registry import ObjectiveContext
from certjax.training.objectives.registry import accuracy
from certjax.training.objectives.registry import check_objective_config
from certjax.training.objectives.registry import cross_entropy
from certjax.training.objectives.registry import get_objective
from certjax.training.objectives.registry import objective_defaults
from certjax.training.objectives.registry import objective_names
from certjax.training.objectives.registry import register_objective
# Imported for their registrations (and as the objectives' public home).
from certjax.training.objectives import standard  # pylint: disable=g-bad-import-order
from certjax.training.objectives import adversarial
from certjax.training.objectives import certified
from certjax.training.objectives import smoothing
from certjax.training.objectives import distillation
from certjax.training.objectives import poisoning

__all__ = [
    "LossFn", "ObjectiveContext", "accuracy", "adversarial", "certified",
    "check_objective_config", "cross_entropy", "distillation",
    "get_objective", "objective_defaults", "objective_names", "poisoning",
    "register_objective", "smoothing", "standard",
]
