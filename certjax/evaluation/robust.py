"""'robust': robust accuracy under a sequence of attacks, per radius (AutoAttack style).

Settings: the `attack` section of a config (`default_config`). The attacks of
`attack.attacks` run in sequence for every radius of `attack.eps_list`, each
only on the examples every previous attack failed on
(`certjax.attacks.robust_accuracy`). `attack.suite='autoattack'` runs
AutoAttack's standard version instead (`certjax.attacks.standard_attacks`:
APGD-CE, APGD-T, FAB-T, Square with the reference's fixed settings), and the
results name it ('autoattack-standard (Croce & Hein 2020)'). Writes to its
output directory (`<workdir>/attack/` for `launch.attack` /
`launch.evaluate --evaluator=robust`):

  results.json   the results, the attack settings, which checkpoint and which images;
  results.md     a readable table (robust accuracy in % after each attack, per eps);
  results.png    robust accuracy against eps after each attack of the sequence;
  results.log.jsonl  the radii finished so far: an interrupted run resumes after them.

Multi-host: each host attacks its share of the images on its own devices;
per-example outcomes are gathered (`common.gather_shares`) so every image
counts once and every host returns the same result. Every host attacks with
the key of stream 'attack' for `attack.seed` (`certjax.keys`), so
deterministic attacks (FGSM, PGD without random start)
give exactly the single-process result and randomised ones the same
distribution. Radius e uses the keys of index e in `eps_list` whether it is
run alone (a resumed run) or with the others.

References:
  Croce & Hein, "Reliable Evaluation of Adversarial Robustness with an
  Ensemble of Diverse Parameter-free Attacks", ICML 2020 (AutoAttack).
  Cohen et al. 2019 (the skip/max selection of evaluation images).
"""

from __future__ import annotations

import functools
from typing import Any, List, Sequence, Tuple

import ml_collections
import numpy as np

from certjax import keys
from certjax import parallel
from certjax import validation
from certjax.attacks import norms
from certjax.attacks.apgd import make_apgd, make_apgd_targeted
from certjax.attacks.core import AttackFn
from certjax.attacks.cw import make_cw_l2, make_cw_linf
from certjax.attacks.fab import make_fab_targeted
from certjax.attacks.pgd import make_fgm, make_pgd
from certjax.attacks.runner import (AUTOATTACK_STANDARD, EpsResult, RobustAccuracyResult,
                                    robust_accuracy, standard_attacks)
from certjax.attacks.square import SQUARE_NORMS, make_square
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalResult, EvalSetup, register_evaluator
from certjax.runs import checkpoints as runs_checkpoints

NAME = "robust"
SECTION = "attack"
RESULTS_STEM = "results"
# 'autoattack_custom' is AutoAttack's sequence (APGD-CE, APGD-T, FAB-T, Square
# where the norm allows it) with this section's steps, restarts, targets and
# queries: not the standard version, which is `suite='autoattack'`.
ATTACK_NAMES = ("fgsm", "pgd", "apgd_ce", "apgd_t", "fab_t", "square", "cw_l2", "cw_linf",
                "autoattack_custom")
# The norm each single-norm attack is defined for.
ATTACK_NORMS = {"cw_l2": "l2", "cw_linf": "linf"}
# '' runs `attack.attacks`; 'autoattack' AutoAttack's standard version.
SUITES = ("", "autoattack")
SUITE_NAMES = {"": "", "autoattack": AUTOATTACK_STANDARD}
# The reference's standard L1 version ends with Square, which certjax lacks in
# L1: that sequence must not carry the standard version's name.
AUTOATTACK_STANDARD_L1_NO_SQUARE = (
    "autoattack-standard-l1-without-square (Croce & Hein 2020/2021 minus their L1 Square)")


def suite_name(settings: Any) -> str:
  """The name the results give the attacks run ('' without a suite)."""
  name = SUITE_NAMES[suite_of(settings)]
  if name == AUTOATTACK_STANDARD and str(settings.norm) == "l1":
    return AUTOATTACK_STANDARD_L1_NO_SQUARE
  return name
# Settings a suite fixes, so the ones in the section are not used.
SUITE_IGNORES = ("attacks", "num_steps", "step_size", "restarts", "num_target_classes",
                 "square_queries")


def default_config() -> ml_collections.ConfigDict:
  """The attack evaluation settings (`config.attack`) and their defaults.

  Fields:
    norm: 'linf', 'l2' or 'l1'.
    eps_list: radii in [0, 1] pixel units.
    suite: '' (run `attacks`) or 'autoattack': AutoAttack's standard version
      (Croce & Hein 2020; `certjax.attacks.standard_attacks`: APGD-CE, APGD-T,
      FAB-T and, for 'linf' and 'l2', Square, with the reference's fixed
      budgets), which ignores attacks, num_steps, step_size, restarts,
      num_target_classes and square_queries; the results say so.
    attacks: names from ATTACK_NAMES, run in sequence (each only on the points
      still robust after the previous ones). 'autoattack_custom' is
      AutoAttack's sequence with this section's num_steps, restarts,
      num_target_classes and square_queries (not the standard version).
    num_steps: iterations of PGD, APGD and FAB-T.
    step_size: PGD's absolute step size; 0 = 2.5 * eps / num_steps.
    restarts: random restarts of PGD, APGD and FAB-T.
    num_target_classes: target classes of APGD-T and FAB-T.
    square_queries: query budget of Square (evaluations per example).
    cw_num_steps: Adam iterations of 'cw_l2' (per binary-search step) and
      'cw_linf' (per restart); 0 = each attack's default (1000 and 100).
    cw_learning_rate: Adam's learning rate of 'cw_l2' and 'cw_linf'; 0 =
      each attack's default (0.01, the reference's, and 0.1).
    cw_binary_search_steps: binary-search steps over the constant c of 'cw_l2'.
    cw_initial_const: the first constant c of 'cw_l2'.
    cw_confidence: kappa of 'cw_l2' and 'cw_linf', the logit margin an
      adversarial must exceed (0). 'cw_l2' (norm 'l2') keeps its closest
      adversarial where its L2 norm is at most eps; 'cw_linf' (norm 'linf')
      uses attack.restarts (`certjax.attacks.cw`).
    batch_size: examples per compiled attack call.
    split: split to attack; '' = config.data.eval_split.
    seed: seed of the attacks' randomness.
    checkpoint_step: checkpoint to restore; -1 = the newest.
  """
  return ml_collections.ConfigDict({
      "norm": "linf",
      "eps_list": (0.1, 0.2, 0.3),
      "suite": "",
      "attacks": ("fgsm", "pgd"),
      "num_steps": 20,
      "step_size": 0.0,
      "restarts": 1,
      "num_target_classes": 9,
      "square_queries": 1000,
      "cw_num_steps": 0,
      "cw_learning_rate": 0.0,
      "cw_binary_search_steps": 9,
      "cw_initial_const": 1e-3,
      "cw_confidence": 0.0,
      "batch_size": 500,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
  })


def build_attacks(attack_config: Any, num_classes: int | None) -> List[Tuple[str, AttackFn]]:
  """(name, attack_fn) pairs for `attacks.robust_accuracy` from `config.attack`.

  `num_classes` None (unknown) skips the checks that depend on it.

  Raises:
    ValueError: for an unknown suite or attack name (the old name
      'autoattack' says what replaced it), a bad setting, or a sequence
      naming the same attack twice (e.g. 'apgd_ce' with 'autoattack_custom').
  """
  cfg = attack_config
  norm = validation.check_choice(cfg.norm, "attack.norm", norms.NORMS)
  if validation.check_choice(suite_of(cfg), "attack.suite", SUITES) == "autoattack":
    return standard_attacks(norm, num_classes=num_classes)
  names = cfg.attacks
  if isinstance(names, str) or not len(names):
    raise ValueError(f"attack.attacks must be a non-empty list of names from "
                     f"{ATTACK_NAMES}; got {names!r}.")
  steps = validation.check_int_at_least(cfg.num_steps, "attack.num_steps", 1)
  restarts = validation.check_int_at_least(cfg.restarts, "attack.restarts", 1)
  validation.check_positive(cfg.step_size, "attack.step_size", allow_zero=True)
  step_size = float(cfg.step_size) if float(cfg.step_size) > 0 else None
  targets = validation.check_int_at_least(cfg.num_target_classes,
                                          "attack.num_target_classes", 1)
  if num_classes is not None:
    targets = min(targets, num_classes - 1)
  queries = validation.check_int_at_least(cfg.square_queries, "attack.square_queries", 1)
  sequence: List[Tuple[str, AttackFn]] = []
  for name in names:
    if name == "autoattack":
      raise ValueError(
          "attack.attacks no longer accepts 'autoattack': for AutoAttack's standard "
          "version (Croce & Hein 2020) set attack.suite='autoattack' (e.g. "
          "--config.attack.suite=autoattack); for APGD-CE, APGD-T, FAB-T and Square "
          "with this section's num_steps, restarts, num_target_classes and "
          "square_queries, name 'autoattack_custom'.")
    validation.check_choice(name, "attack name in attack.attacks", ATTACK_NAMES)
    if name == "fgsm":
      sequence.append(("fgsm" if norm == "linf" else f"fgm-{norm}", make_fgm(norm=norm)))
    elif name == "pgd":
      sequence.append((f"pgd{steps}", make_pgd(norm=norm, num_steps=steps,
                                               step_size=step_size,
                                               num_restarts=restarts)))
    elif name == "apgd_ce":
      sequence.append(("apgd-ce", make_apgd(norm=norm, loss="ce", num_steps=steps,
                                            num_restarts=restarts)))
    elif name == "apgd_t":
      if num_classes is not None and num_classes < 4:
        raise ValueError(f"'apgd_t' needs at least 4 classes; the data has {num_classes}.")
      sequence.append(("apgd-t", make_apgd_targeted(
          norm=norm, num_steps=steps, num_target_classes=targets, num_restarts=restarts)))
    elif name == "fab_t":
      sequence.append(("fab-t", make_fab_targeted(
          norm=norm, num_steps=steps, num_target_classes=targets, num_restarts=restarts)))
    elif name == "square":
      if norm not in SQUARE_NORMS:
        raise ValueError(f"'square' supports norms {SQUARE_NORMS}; attack.norm is {norm!r}.")
      sequence.append(("square", make_square(norm=norm, num_queries=queries)))
    elif name in ATTACK_NORMS:
      if norm != ATTACK_NORMS[name]:
        raise ValueError(f"{name!r} is an attack in the {ATTACK_NORMS[name]!r} norm; "
                         f"attack.norm is {norm!r}.")
      sequence.append(_cw_attack(name, cfg, restarts))
    else:
      sequence.extend(standard_attacks(
          norm, num_classes=num_classes, num_steps=steps, num_restarts=restarts,
          num_target_classes=targets, square_queries=queries))
  shown = [n for n, _ in sequence]
  repeated = sorted({n for n in shown if shown.count(n) > 1})
  if repeated:
    raise ValueError(f"attack.attacks {tuple(names)} runs {repeated} twice "
                     "('autoattack_custom' already holds apgd_ce, apgd_t, fab_t and square).")
  return sequence


def _cw_attack(name: str, cfg: Any, restarts: int) -> Tuple[str, AttackFn]:
  """('cw-l2', ...) or ('cw-linf', ...) from the section's cw_* settings."""
  steps = validation.check_int_at_least(cfg.get("cw_num_steps", 0), "attack.cw_num_steps", 0)
  learning_rate = cfg.get("cw_learning_rate", 0.0)
  validation.check_positive(learning_rate, "attack.cw_learning_rate", allow_zero=True)
  confidence = cfg.get("cw_confidence", 0.0)
  validation.check_positive(confidence, "attack.cw_confidence", allow_zero=True)
  settings = {"confidence": float(confidence)}
  if steps:
    settings["num_steps"] = steps
  if float(learning_rate) > 0:
    settings["learning_rate"] = float(learning_rate)
  if name == "cw_linf":
    return "cw-linf", make_cw_linf(num_restarts=restarts, **settings)
  searches = validation.check_int_at_least(cfg.get("cw_binary_search_steps", 9),
                                           "attack.cw_binary_search_steps", 1)
  initial_const = cfg.get("cw_initial_const", 1e-3)
  validation.check_positive(initial_const, "attack.cw_initial_const")
  return "cw-l2", make_cw_l2(binary_search_steps=searches,
                             initial_const=float(initial_const), **settings)


def suite_of(settings: Any) -> str:
  """`attack.suite` of a section ('' when the section predates the field)."""
  return str(settings.get("suite", "") or "") if hasattr(settings, "get") else ""


def suite_note(settings: Any) -> str:
  """What a suite fixes, for the results ('' without a suite)."""
  if not suite_of(settings):
    return ""
  return (f"attack.suite={suite_of(settings)!r}: {suite_name(settings)}, with the "
          "reference's fixed settings; attack." + ", attack.".join(SUITE_IGNORES)
          + " are ignored.")


def _eps_list(settings: Any) -> list[float]:
  eps_list = settings.eps_list
  if isinstance(eps_list, (int, float)) or not len(eps_list):
    raise ValueError(f"attack.eps_list must be a non-empty sequence of radii; got {eps_list!r}.")
  values = [validation.check_finite_scalar(e, "attack.eps_list entry") for e in eps_list]
  for e in values:
    validation.check_positive(e, "attack.eps_list entry", allow_zero=True)
  return values


def validate_settings(settings: Any, setup: EvalSetup | None = None) -> None:
  """Raises ValueError naming the first bad field of `config.attack`."""
  build_attacks(settings, None if setup is None else setup.num_classes)
  _eps_list(settings)
  validation.check_int_at_least(settings.batch_size, "attack.batch_size", 1)
  validation.check_int_at_least(settings.seed, "attack.seed", 0)
  common.check_selection_settings(settings, SECTION)


def _gather_eps(part: RobustAccuracyResult | None, share: common.HostShare,
                attack_names: Sequence[str]) -> dict[str, Any]:
  """The outcome at one radius over all hosts: masks in order, counts summed, maxima."""
  n = len(share.indices)
  num_attacks = len(attack_names)
  local = {"correct": np.zeros(n, bool), "robust": np.zeros(n, bool)}
  scalars = {"after": np.zeros(num_attacks, np.int64), "seconds": np.zeros(num_attacks),
             "max_perturbation": np.zeros(())}
  if part is not None:
    (r,) = part.per_eps
    local = {"correct": part.correct, "robust": r.robust}
    scalars = {"after": np.array([round(acc * n) for _, acc in r.robust_accuracy_after]),
               "seconds": np.array([s for _, s in r.seconds]),
               "max_perturbation": np.asarray(r.max_perturbation)}
  masks = common.gather_shares(local, share.size, share.count)
  every = parallel.process_allgather(scalars)
  return {"correct": masks["correct"].astype(int).tolist(),
          "robust": masks["robust"].astype(int).tolist(),
          "after": every["after"].sum(axis=0).astype(int).tolist(),
          "seconds": every["seconds"].max(axis=0).tolist(),
          "max_perturbation": float(every["max_perturbation"].max())}


def _result_from_units(units: Sequence[dict], eps_values: Sequence[float], norm: str,
                       attack_names: Sequence[str], suite: str = "") -> RobustAccuracyResult:
  correct = np.asarray(units[0]["correct"], bool)
  total = correct.size
  per_eps = []
  for eps, unit in zip(eps_values, units):
    robust = np.asarray(unit["robust"], bool)
    per_eps.append(EpsResult(
        eps=float(eps), robust_accuracy=float(np.mean(robust)),
        robust_accuracy_after=tuple((n, c / total) for n, c in zip(attack_names, unit["after"])),
        seconds=tuple(zip(attack_names, (float(s) for s in unit["seconds"]))),
        max_perturbation=float(unit["max_perturbation"]), robust=robust))
  return RobustAccuracyResult(norm=norm, num_examples=total,
                              clean_accuracy=float(np.mean(correct)),
                              attack_names=tuple(attack_names), per_eps=tuple(per_eps),
                              correct=correct, suite=suite)


def format_markdown(result: RobustAccuracyResult, metadata: dict[str, Any],
                    note: str = "") -> str:
  """The Markdown file: a heading naming model, data and checkpoint, then the table."""
  return "\n".join([
      f"# Robust accuracy: {metadata.get('model')} on {metadata.get('dataset')} "
      f"({metadata.get('split')})",
      "",
      f"Checkpoint step {metadata.get('checkpoint_step')} in `{metadata.get('workdir')}`; "
      f"images skip={metadata.get('skip')}, max={metadata.get('max')}.",
      "",
      *([f"Attacks: {result.suite}. {note}", ""] if result.suite else []),
      "```",
      result.table(),
      "```",
      "",
  ])


def metrics_of(result: RobustAccuracyResult) -> dict[str, float]:
  """Flat metrics for logging: clean accuracy and robust accuracy at each radius."""
  metrics = {"clean_accuracy": result.clean_accuracy}
  for r in result.per_eps:
    metrics[f"robust_accuracy@{r.eps:g}"] = r.robust_accuracy
  return metrics


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings,
                    summary="robust accuracy under a sequence of attacks, per radius")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'robust' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  attacks = build_attacks(settings, setup.num_classes)
  attack_names = [n for n, _ in attacks]
  eps_values = _eps_list(settings)
  norm = str(settings.norm)
  batch_size = int(settings.batch_size)
  seed = int(settings.seed)
  suite = suite_name(settings)
  note = suite_note(settings)

  def evaluate(ctx: EvalContext) -> EvalResult:
    mesh = parallel.local_mesh()
    share = common.HostShare(ctx.data)
    variables = common.local_variables(ctx.variables, mesh)
    logits_fn = functools.partial(ctx.apply_fn, variables, train=False)
    attack_config = runs_checkpoints.config_to_dict(settings)
    fingerprint = {"evaluator": NAME, "step": int(ctx.step),
                   "indices": ctx.data.indices.tolist(),
                   # Results do not depend on the batch size or on which checkpoint
                   # was asked for (the step restored is in the fingerprint).
                   "attack": {k: v for k, v in attack_config.items()
                              if k not in ("batch_size", "checkpoint_step")}}
    log = common.ResumeLog(common.log_path(ctx, RESULTS_STEM), fingerprint)
    key = keys.stream_key(seed, keys.ATTACK)
    counter = common.progress(len(eps_values) * len(attacks), "attack run", "robust")
    units = []
    for e_index, eps in enumerate(eps_values):
      unit = f"eps={eps!r}"
      if unit not in log.completed:
        part = None
        if share.indices.size:
          part = robust_accuracy(key, logits_fn, share.x, share.y, attacks=attacks,
                                 eps_list=[eps], norm=norm, batch_size=batch_size,
                                 verbose=False, mesh=mesh, eps_key_index=[e_index],
                                 suite=suite)
        log.record(unit, _gather_eps(part, share, attack_names))
      units.append(log.completed[unit])
      done = (e_index + 1) * len(attacks)
      if counter.due(done):
        rates = counter.update(done)
        after = units[-1]["after"]
        common.report(ctx, counter.line(done, rates, {
            f"eps {eps:g} robust %": 100.0 * after[-1] / max(share.count, 1)}))
    result = _result_from_units(units, eps_values, norm, attack_names, suite)
    metadata = common.metadata_block(ctx)
    payload = {**metadata, **result.to_dict(), "attack_config": attack_config}
    if note:
      payload["suite_note"] = note
    artifacts = common.write_results(
        ctx.output_dir, RESULTS_STEM, payload, format_markdown(result, metadata, note),
        figure=plots.robust_accuracy_figure(result, title=_title(metadata))
        if ctx.output_dir is not None else None)
    return EvalResult(NAME, metrics_of(result), artifacts, result.table(), result)

  return evaluate


def _title(metadata: dict[str, Any]) -> str:
  return (f"{metadata.get('model', '?')} on {metadata.get('dataset', '?')}, checkpoint "
          f"{metadata.get('checkpoint_step')}")


def read_results(path: str) -> dict[str, Any]:
  """Reads results.json written by this evaluator (a workdir, its attack/ directory or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)
