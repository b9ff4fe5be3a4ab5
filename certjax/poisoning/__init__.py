"""Data poisoning and backdoors: poison generators and the defences that find or remove poison.

Pure functions over arrays, `logits_fn`s and parameter pytrees, like every
algorithm package. The training loop applies a recorded poison to the data
pipeline (`certjax.training.poison`, `config.poison`); the 'backdoor'
evaluator scores attacks and defences against that record.

Modules:
  triggers: backdoor triggers as pytrees (BadNets, Turner et al.'s four
    corners, blended, WaNet and its noise mode), poison indices and label
    maps (all-to-one, all-to-all).
  labels: label flipping (random, pairwise, greedy against a surrogate).
  clean_label: Turner et al.'s label-consistent backdoor.
  crafting: targeted clean-label poisons: feature collision (Poison Frogs)
    and gradient matching (Witches' Brew).
  sanitize: spectral signatures, activation clustering, detection scores.
  neural_cleanse: Neural Cleanse's reversed triggers (vmapped over classes),
    MAD anomaly index, unlearning set.
  repair: fine-tuning on an in-memory set, fine-pruning's pruning order and
    anti-backdoor learning's losses.
"""

from certjax.poisoning import (clean_label, crafting, labels, neural_cleanse, repair, sanitize,
                               triggers)
from certjax.poisoning.clean_label import clean_label_indices, clean_label_poison
from certjax.poisoning.crafting import (FeatureCollisionResult, GradientMatchingResult,
                                        feature_collision, gradient_alignment_loss,
                                        gradient_matching)
from certjax.poisoning.labels import greedy_flips, pairwise_flips, random_flips
from certjax.poisoning.neural_cleanse import ReversedTrigger, anomaly_index, unlearning_set
from certjax.poisoning.repair import (fine_tune, isolate_lowest_loss, lga_loss, prune_until,
                                      pruning_mask, pruning_order)
from certjax.poisoning.sanitize import (activation_clustering, detection_scores,
                                        spectral_signatures)
from certjax.poisoning.triggers import (TRIGGER_NAMES, Trigger, apply_trigger, make_trigger,
                                        poison_examples, poison_indices, target_labels)

__all__ = [
    "FeatureCollisionResult", "GradientMatchingResult", "ReversedTrigger", "TRIGGER_NAMES",
    "Trigger", "activation_clustering", "anomaly_index", "apply_trigger", "clean_label",
    "clean_label_indices", "clean_label_poison", "crafting", "detection_scores",
    "feature_collision", "fine_tune", "gradient_alignment_loss", "gradient_matching",
    "greedy_flips", "isolate_lowest_loss", "labels", "lga_loss", "make_trigger", "neural_cleanse",
    "pairwise_flips", "poison_examples", "poison_indices", "prune_until", "pruning_mask",
    "pruning_order", "random_flips", "repair", "sanitize", "spectral_signatures",
    "target_labels", "triggers", "unlearning_set",
]
