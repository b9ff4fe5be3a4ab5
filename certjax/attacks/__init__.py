"""Adversarial attacks: jitted, vmappable, batch-first, lax-looped.

Every attack has the form `attack(key, logits_fn, x, y, *, eps, ...) -> x_adv`
on NHWC images in [0, 1]; the `make_*` factories return
`attack_fn(key, logits_fn, x, y, eps)` for `robust_accuracy`. `logits_fn` may
be a plain function or a gradient oracle (see `eot`).

Eager calls check every input; under `jit`/`vmap` pass `checked=True` and
run the transformed function through `checked` to check values too (NaN,
range, eps >= 0, labels), with no cost when not asked for:

    run = jax.jit(lambda key, x, y, eps: attacks.pgd(key, model, x, y, eps=eps,
                                                     checked=True))
    x_adv = attacks.checked(run)(key, x, y, eps)

Modules:
  core: gradient oracles, input checks (`validate_inputs`, `checked`) and
    `bind_attack`, shared by the attack modules.
  norms: Lp-ball geometry (random init, steepest steps, projections).
  losses: cross-entropy, CW margin, DLR (targeted and untargeted).
  pgd: FGSM / FGM, PGD with restarts and schedules, MI-FGSM.
  apgd: APGD-CE / APGD-DLR, targeted APGD-T.
  fab: FAB (minimum-norm, untargeted) and FAB-T (targeted, as in AutoAttack).
  square: Square attack (score-based black box).
  cw: Carlini & Wagner's L2 attack (minimum norm, binary search over c) and a
    fixed-radius CW L-infinity attack.
  eot: Expectation over Transformation oracles.
  patch: adversarial patch training, application and evaluation.
  trades: TRADES' inner maximisation (the 'trades' training objective's attack).
  diagnostics: gradient-masking checks on attack outcomes (Athalye et al.
    2018): black-box or one-step attacks beating iterative white-box ones,
    accuracy not reaching 0 at a large eps, randomised predictions, zero
    gradients; each a named `GradientMaskingWarning`.
  runner: robust accuracy over radii under a sequence of attacks;
    `standard_attacks` is AutoAttack's standard version.

The package namespace holds the attack functions, so `certjax.attacks.pgd`,
`.apgd`, `.fab` and `.square` are functions, not the modules of the same names;
import module-level helpers with `from certjax.attacks.apgd import
checkpoints` (which always resolves the module).
"""

from certjax.attacks import core, diagnostics, eot, losses, norms
from certjax.attacks.core import (AttackFn, DeterministicOracle, GradientOracle, as_oracle,
                                  bind_attack, checked)
from certjax.attacks.apgd import apgd, apgd_targeted, make_apgd, make_apgd_targeted
from certjax.attacks.cw import CWInfo, cw_l2, cw_linf, make_cw_l2, make_cw_linf
from certjax.attacks.eot import EOT, eot_gradient, eot_transform
from certjax.attacks.fab import fab, fab_targeted, make_fab, make_fab_targeted
from certjax.attacks.losses import cross_entropy, cw_margin, dlr
from certjax.attacks.norms import NORMS, lp_norm, project, random_init, steepest_direction
from certjax.attacks.patch import apply_patch, patch_success_rate, train_patch
from certjax.attacks.pgd import fgm, fgsm, make_fgm, make_mi_fgsm, make_pgd, mi_fgsm, pgd
from certjax.attacks.runner import (AUTOATTACK_STANDARD, EpsResult, PerturbationError,
                                    RobustAccuracyResult, check_perturbation,
                                    robust_accuracy, standard_attacks)
from certjax.attacks.square import SquareInfo, make_square, square
from certjax.attacks.trades import kl_divergence, trades_attack

__all__ = [
    "AUTOATTACK_STANDARD", "AttackFn", "CWInfo", "DeterministicOracle", "EOT", "EpsResult",
    "GradientOracle", "NORMS", "PerturbationError", "RobustAccuracyResult", "SquareInfo",
    "apgd", "apgd_targeted", "apply_patch", "as_oracle", "bind_attack",
    "check_perturbation", "checked", "core", "cross_entropy", "cw_l2", "cw_linf",
    "diagnostics",
    "cw_margin", "dlr", "eot",
    "eot_gradient", "eot_transform", "fab", "fab_targeted", "fgm", "fgsm", "losses",
    "lp_norm", "make_apgd", "make_apgd_targeted", "make_fab", "make_fab_targeted",
    "make_cw_l2", "make_cw_linf",
    "make_fgm", "make_mi_fgsm", "make_pgd", "make_square", "mi_fgsm", "norms",
    "patch_success_rate", "pgd", "project", "random_init", "robust_accuracy", "square",
    "standard_attacks", "steepest_direction", "kl_divergence", "trades_attack",
    "train_patch",
]
