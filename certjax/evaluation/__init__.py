"""Evaluators by name: robust, verified and certified accuracy, and the families to come.

  registry: the protocol (`EvalContext` -> `EvalResult`), `register_evaluator`,
    `get_evaluator(name, settings, num_classes)`, `evaluator_names()`.
  common: what every evaluator shares: host split and gather, resumable
    logs, atomic result files, progress with ETA.
  robust: 'robust' (config section `attack`): robust accuracy under a
    sequence of attacks, per radius.
  verified: 'verified' (section `verify`): IBP / CROWN-IBP / CROWN verified
    accuracy.
  certified: 'certified' (section `certify`): randomized-smoothing certified
    accuracy (Cohen et al.'s CERTIFY), Cohen's TSV files.
  membership: 'membership' (section `membership`): membership inference
    (LiRA, RMIA, Shokri, thresholds) on the K models of a many-models run.
  extraction: 'extraction' (section `extraction`): model extraction (Knockoff
    copies against budget, exact one-hidden-layer ReLU recovery) and Square
    through a counting victim, per output defence (rounding, top-k, label).
  inversion: 'inversion' (section `inversion`): class inversion (MI-Face)
    scored by an independent classifier, and FedSGD gradient inversion (DLG,
    iDLG, Inverting Gradients) scored by PSNR/SSIM and label recovery.
  property: 'property' (section `property`): property inference (Ganju et
    al. 2018) over the shadow models of a many-models run.
  defences: 'defences' (section `defence`): inference-time defences (input
    transformations, distillation, thermometer encoding, ensembles,
    detectors) under the naive and the adaptive attack (BPDA, EOT, CW, joint
    classifier + detector), with gradient-masking diagnostics.
  backdoor: 'backdoor' (section `backdoor`): clean accuracy and attack
    success of a poisoned run, and the poison detectors (spectral
    signatures, activation clustering, Neural Cleanse, STRIP) scored
    against its poison record.
  plots: every picture of a result.
  workdir: `evaluate_workdir(config, workdir, name)` on a trained workdir.

Readers live beside their writers: `robust.read_results`,
`verified.read_results` / `verified.result_rows`, `certified.read_results` /
`certified.read_tsv`.

Each evaluator module registers itself when imported; this package imports
them all. The training loop calls evaluators (`config.evals`); evaluators
never import the training loop.
"""

from certjax.evaluation.registry import EvalContext
from certjax.evaluation.registry import EvalData
from certjax.evaluation.registry import EvalResult
from certjax.evaluation.registry import EvalSetup
from certjax.evaluation.registry import Evaluator
from certjax.evaluation.registry import EvaluatorSpec
from certjax.evaluation.registry import evaluator_defaults
from certjax.evaluation.registry import evaluator_names
from certjax.evaluation.registry import get_evaluator
from certjax.evaluation.registry import get_spec
from certjax.evaluation.registry import merged_settings
from certjax.evaluation.registry import register_evaluator
from certjax.evaluation.registry import validate_settings
# Imported for their registrations (and as the evaluators' public home).
from certjax.evaluation import backdoor  # pylint: disable=g-bad-import-order
from certjax.evaluation import certified
from certjax.evaluation import common
from certjax.evaluation import defences
from certjax.evaluation import extraction
from certjax.evaluation import inversion
from certjax.evaluation import membership
from certjax.evaluation import plots
from certjax.evaluation import property  # pylint: disable=redefined-builtin
from certjax.evaluation import robust
from certjax.evaluation import verified
from certjax.evaluation.workdir import evaluate_workdir

__all__ = [
    "EvalContext", "EvalData", "EvalResult", "EvalSetup", "Evaluator", "EvaluatorSpec",
    "backdoor", "certified", "common", "defences", "evaluate_workdir", "evaluator_defaults", "evaluator_names",
    "extraction",
    "get_evaluator", "get_spec", "inversion", "membership", "merged_settings", "plots", "property",
    "register_evaluator", "robust",
    "validate_settings", "verified",
]
