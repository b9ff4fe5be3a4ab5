"""'defences': inference-time defences under the naive and the adaptive attack (Athalye et al.).

Settings: the `defence` section of a config (`default_config`). The evaluator
builds one row per defence and measures, on the selected eval images:

  * clean accuracy of the defended system as deployed;
  * robust accuracy per radius under the *naive* attack: PGD (cross-entropy)
    through the defence as written: autodiff of its forward pass (zero
    through a JPEG codec, a quantiser, a thermometer encoding or a majority
    vote; vanishing through a distilled network's saturated softmax; one
    random draw per step of a randomised transform);
  * robust accuracy per radius under the *adaptive* attack: the naive attack
    and then the attacks of `adaptive_attacks` in sequence (an example is
    robust only if none of them broke it), the latter through BPDA's
    differentiable stand-in for every
    non-differentiable stage and EOT over `eot_samples` draws for randomised
    ones; `pgd_cw` and `cw` use Carlini & Wagner's margin on the logits,
    which a saturated softmax does not hide;
  * gradient-masking diagnostics on the naive attack
    (`certjax.attacks.diagnostics`): FGSM beating PGD, Square beating PGD at
    the largest radius, accuracy not falling to ~0 at `large_eps`, predictions
    changing between evaluations, zero input gradients; each raised as a
    named `GradientMaskingWarning` and written with the row.

Rows:
  * the workdir's own model: 'undefended', or what it was trained as:
    'distillation (T=...)' (objective 'distillation' with a teacher), or
    '<transform>-trained' (`model.input_transform`, e.g. thermometer encoding,
    attacked adaptively through BPDA's soft thermometer);
  * that model behind each input transformation of `transforms`
    (`certjax.defences.transforms`, settings from `transform_kwargs`);
  * each model of `models` ('label=workdir' pairs): the same rules, and a
    many-models workdir (or 'label=w1+w2+...', separately trained
    workdirs) gives one ensemble row per `ensemble_methods`
    ('vote' is attacked adaptively through BPDA with the mean probabilities
    as the backward pass);
  * each detector of `detectors` on the workdir's model, fitted on
    `calibration_size` clean train images, with a reject option at the
    threshold giving `detector_fpr` false rejections on up to
    `calibration_size` held-out clean eval images (those the selection
    leaves out): its row reports the accuracy of the
    system with the reject option (an input counts as handled when it is
    classified correctly or rejected) under PGD on the classifier alone
    (naive: the detector is ignored by the attacker) and under the naive and
    the joint attack on classifier and detector (Carlini & Wagner 2017,
    `joint_margin`; an input counts as handled only if both fail),
    plus the detection rate and ROC AUC of the naive adversarial examples.

Writes `<workdir>/defence/results.{json,md,png}`: an Athalye-style table
(defence x attack, per radius) and a chart of accuracy against eps, naive
dashed and adaptive solid.

Randomised defences are scored by one draw per prediction (the key of the
deployed system is fixed per evaluation, so results reproduce); the
diagnostics report how often another draw changes the prediction.

References:
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security: Circumventing Defenses to Adversarial Examples. ICML 2018.
  Carlini, Wagner. Adversarial Examples Are Not Easily Detected: Bypassing
    Ten Detection Methods. AISec 2017; Towards Evaluating the Robustness of
    Neural Networks. IEEE S&P 2017.
  Tramer, Carlini, Brendel, Madry. On Adaptive Attacks to Adversarial
    Example Defenses. NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from certjax import runs
from certjax import validation
from certjax.attacks import diagnostics as diagnostics_lib
from certjax.attacks.core import AttackFn
from certjax.attacks.cw import make_cw_l2, make_cw_linf
from certjax.attacks.pgd import make_fgm, make_pgd
from certjax.attacks.runner import check_perturbation, robust_accuracy
from certjax.attacks.square import SQUARE_NORMS, make_square
from certjax.defences import bpda as bpda_lib
from certjax.defences import detectors as detectors_lib
from certjax.defences import ensemble as ensemble_lib
from certjax.defences import oracles
from certjax.defences import transforms as transforms_lib
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalData, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator

NAME = "defences"
SECTION = "defence"
RESULTS_STEM = "results"
ADAPTIVE_ATTACKS = ("pgd", "pgd_cw", "cw")
DETECTORS = ("feature_squeezing", "mahalanobis", "strip")
# Transformations that make sense in front of a model of images in [0, 1]
# (thermometer encoding changes the channel count: it is trained into a model
# with model.input_transform instead).
INPUT_TRANSFORMS = ("bit_depth", "median", "jpeg", "jpeg_differentiable", "tvm", "resize_pad")
JPEG_APPROXIMATIONS = ("identity", "jpeg_differentiable")


def default_config() -> ml_collections.ConfigDict:
  """The defence evaluation settings (`config.defence`) and their defaults.

  Fields:
    norm: 'linf' or 'l2'.
    eps_list: radii in [0, 1] pixel units.
    include_model: add a row for the workdir's model itself.
    transforms: input transformations of INPUT_TRANSFORMS, each a row in
      front of the workdir's model.
    transform_kwargs: settings per transformation, e.g.
      {'bit_depth': {'bits': 1}, 'jpeg': {'quality': 75}}.
    jpeg_approximation: BPDA's backward pass for JPEG: 'identity' (Athalye
      et al.) or 'jpeg_differentiable' (Shin & Song's smooth JPEG).
    models: other trained models to add as rows: 'label=workdir' pairs
      separated by commas (a distilled student, a thermometer-trained model,
      a many-models workdir as an ensemble); 'label=w1+w2+w3' is the
      ensemble of separately trained workdirs (their class counts must agree).
    ensemble_methods: how an ensemble combines its members, of
      `certjax.defences.ensemble.ENSEMBLE_METHODS`.
    detectors: detectors of DETECTORS on the workdir's model.
    squeezers: feature squeezing's squeezers (transformations of
      INPUT_TRANSFORMS with `transform_kwargs`).
    detector_fpr: false-rejection rate on clean images that sets each
      detector's threshold.
    calibration_size: clean train images for Mahalanobis' class statistics
      and STRIP's overlays, and at most as many held-out clean eval images
      (not in the evaluated selection) for the thresholds.
    strip_overlays: STRIP's superimposed images per input.
    mahalanobis_noise: Lee et al.'s input-preprocessing magnitude (0: none).
    num_steps: PGD steps (naive and adaptive).
    step_size: PGD's absolute step size; 0 = 2.5 * eps / num_steps.
    restarts: PGD restarts.
    adaptive_attacks: the adaptive sequence, of ADAPTIVE_ATTACKS ('cw' is
      Carlini-Wagner in the section's norm).
    cw_steps: Adam iterations of 'cw' (per binary-search step for L2).
    cw_binary_search_steps: binary-search steps over c of CW-L2.
    eot_samples: EOT draws per gradient of a randomised defence.
    diagnostics: run the gradient-masking checks (FGSM, Square, large eps,
      repeated predictions, gradient norms).
    large_eps: the radius at which accuracy must fall to ~0 (0.5 in
      L-infinity turns any image into uniform gray).
    square_queries: Square's queries for the black-box check.
    batch_size: examples per compiled attack call.
    split: split to evaluate; '' = config.data.eval_split.
    seed: seed of the attacks' and defences' randomness.
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/defence.
  """
  return ml_collections.ConfigDict({
      "norm": "linf",
      "eps_list": (0.1, 0.2, 0.3),
      "include_model": True,
      "transforms": ("bit_depth", "median", "jpeg", "tvm", "resize_pad"),
      "transform_kwargs": ml_collections.ConfigDict({
          "bit_depth": {"bits": 1}, "median": {"size": 2}, "jpeg": {"quality": 75},
          "jpeg_differentiable": {"quality": 75},
          "tvm": {"drop_probability": 0.5, "weight": 0.05, "num_steps": 40},
          # Xie et al.'s ratio 299 / 331 of a 28-pixel image.
          "resize_pad": {"min_size": 25}}),
      "jpeg_approximation": "identity",
      "models": "",
      "ensemble_methods": ("logits", "probabilities", "vote"),
      "detectors": ("feature_squeezing", "mahalanobis", "strip"),
      "squeezers": ("bit_depth", "median"),
      "detector_fpr": 0.05,
      "calibration_size": 1000,
      "strip_overlays": 16,
      "mahalanobis_noise": 0.0,
      "num_steps": 40,
      "step_size": 0.0,
      "restarts": 1,
      "adaptive_attacks": ("pgd", "pgd_cw"),
      "cw_steps": 100,
      "cw_binary_search_steps": 5,
      "eot_samples": 8,
      "diagnostics": True,
      "large_eps": 0.5,
      "square_queries": 1000,
      "batch_size": 250,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def _names(value: Any, field: str, choices: Sequence[str], allow_empty: bool = True
           ) -> tuple[str, ...]:
  if isinstance(value, str):
    raise ValueError(f"defence.{field} must be a list of names from {tuple(choices)}; got the "
                     f"string {value!r} (write ({value!r},)).")
  names = tuple(value or ())
  if not names and not allow_empty:
    raise ValueError(f"defence.{field} must name at least one of {tuple(choices)}.")
  for name in names:
    validation.check_choice(name, f"defence.{field}", tuple(choices))
  if len(set(names)) != len(names):
    raise ValueError(f"defence.{field} names {names} twice.")
  return names


def parse_models(value: str) -> list[tuple[str, str]]:
  """`'label=workdir,label=workdir'` -> [(label, workdir), ...]; '' -> []."""
  pairs = []
  for item in [p.strip() for p in str(value or "").split(",") if p.strip()]:
    label, sep, workdir = item.partition("=")
    if not sep or not label.strip() or not workdir.strip():
      raise ValueError(f"defence.models takes 'label=workdir' pairs separated by commas; got "
                       f"{item!r}.")
    pairs.append((label.strip(), workdir.strip()))
  labels = [label for label, _ in pairs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"defence.models repeats a label: {labels}.")
  return pairs


def _transform(name: str, settings: Any) -> transforms_lib.InputTransform:
  kwargs = dict((settings.transform_kwargs or {}).get(name, {}) or {})
  return transforms_lib.get_transform(name, **kwargs)


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  del setup
  norm = validation.check_choice(settings.norm, "defence.norm", ("linf", "l2"))
  eps_list = tuple(settings.eps_list)
  if not eps_list:
    raise ValueError("defence.eps_list must hold at least one radius.")
  for eps in eps_list:
    validation.check_positive(eps, "defence.eps_list entry")
  transforms = _names(settings.transforms, "transforms", INPUT_TRANSFORMS)
  unknown = sorted(set((settings.transform_kwargs or {}).keys()) - set(INPUT_TRANSFORMS))
  if unknown:
    raise ValueError(f"defence.transform_kwargs names unknown transformation(s) {unknown}; "
                     f"accepted: {INPUT_TRANSFORMS}.")
  squeezers = _names(settings.squeezers, "squeezers", INPUT_TRANSFORMS)
  for name in set(transforms) | set(squeezers):
    _transform(name, settings)  # raises on a bad setting (quality 0, bits 0, ...)
  for name in squeezers:
    if _transform(name, settings).randomized:
      raise ValueError(f"defence.squeezers must be deterministic; {name!r} is randomised.")
  validation.check_choice(settings.jpeg_approximation, "defence.jpeg_approximation",
                          JPEG_APPROXIMATIONS)
  parse_models(settings.models)
  _names(settings.ensemble_methods, "ensemble_methods", ensemble_lib.ENSEMBLE_METHODS)
  _names(settings.detectors, "detectors", DETECTORS)
  validation.check_in_open_interval(settings.detector_fpr, "defence.detector_fpr", 0.0, 1.0)
  validation.check_int_at_least(settings.calibration_size, "defence.calibration_size", 2)
  validation.check_int_at_least(settings.strip_overlays, "defence.strip_overlays", 1)
  validation.check_positive(settings.mahalanobis_noise, "defence.mahalanobis_noise",
                            allow_zero=True)
  validation.check_int_at_least(settings.num_steps, "defence.num_steps", 1)
  validation.check_positive(settings.step_size, "defence.step_size", allow_zero=True)
  validation.check_int_at_least(settings.restarts, "defence.restarts", 1)
  _names(settings.adaptive_attacks, "adaptive_attacks", ADAPTIVE_ATTACKS, allow_empty=False)
  validation.check_int_at_least(settings.cw_steps, "defence.cw_steps", 1)
  validation.check_int_at_least(settings.cw_binary_search_steps,
                                "defence.cw_binary_search_steps", 1)
  validation.check_int_at_least(settings.eot_samples, "defence.eot_samples", 1)
  validation.check_positive(settings.large_eps, "defence.large_eps")
  if settings.diagnostics and norm not in SQUARE_NORMS:
    raise ValueError(f"defence.diagnostics runs Square, which supports {SQUARE_NORMS}; "
                     f"defence.norm is {norm!r}.")
  validation.check_int_at_least(settings.square_queries, "defence.square_queries", 1)
  validation.check_int_at_least(settings.batch_size, "defence.batch_size", 1)
  validation.check_int_at_least(settings.seed, "defence.seed", 0)
  validation.check_int_at_least(settings.checkpoint_step, "defence.checkpoint_step", -1)
  if not (settings.include_model or transforms or settings.models or settings.detectors):
    raise ValueError("defence: nothing to evaluate (include_model is False and transforms, "
                     "models and detectors are empty).")


@dataclasses.dataclass(frozen=True)
class Row:
  """One defended system and how each attacker sees it.

  Attributes:
    label: the row's name in the table.
    kind: 'model', 'transform' or 'ensemble'.
    deployed: `(key, x) -> logits` of the system as deployed.
    approximated: `(key, x) -> logits` with the deployed values and BPDA's
      gradients (the same function when nothing needs approximating).
    randomized: whether `deployed` draws randomness (EOT for the adaptive
      attacker).
    how: one line on the adaptive attacker's view (for the table).
  """
  label: str
  kind: str
  deployed: Callable[[Any, Any], Any]
  approximated: Callable[[Any, Any], Any]
  randomized: bool
  how: str


def _deterministic(logits_fn: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
  return lambda key, x: logits_fn(x)


def model_row(label: str, apply_fn: Any, variables: Any, run_config: Any) -> Row:
  """The row of one trained model, judged by how it was trained (see the module docstring)."""
  logits_fn = functools.partial(apply_fn, variables, train=False)
  deployed = _deterministic(logits_fn)
  transform = runs.model_input_transform(run_config) if run_config is not None else None
  if transform is not None:
    backward = bpda_lib.bpda(lambda x: transform.forward(jax.random.key(0), x),
                             lambda x: transform.approximation(jax.random.key(0), x))
    approximated = _deterministic(
        lambda x: apply_fn(variables, backward(x), train=False, transformed=True))
    return Row(f"{label} ({transform.name}-trained)", "model", deployed, approximated, False,
               f"BPDA through {transform.name}'s differentiable approximation")
  objective = run_config.get("objective", {}) if run_config is not None else {}
  if objective.get("name") == "distillation" and objective.get("teacher_workdir"):
    return Row(f"{label} (distillation, T={float(objective['temperature']):g})", "model",
               deployed, deployed, False, "margin loss on the logits (CW)")
  return Row(label, "model", deployed, deployed, False, "none needed")


def transform_rows(logits_fn: Callable[[Any], Any], settings: Any) -> list[Row]:
  """The workdir's model behind each transformation of `settings.transforms`."""
  rows = []
  for name in settings.transforms:
    transform = _transform(name, settings)
    if name == "jpeg" and settings.jpeg_approximation == "jpeg_differentiable":
      smooth = _transform("jpeg_differentiable", settings)
      transform = transform._replace(approximation=smooth.forward)
    deployed = transforms_lib.defended_logits_fn(logits_fn, transform)
    approximated = bpda_lib.bpda_logits_fn(logits_fn, transform)
    how = "BPDA" + (" + EOT" if transform.randomized else "")
    rows.append(Row(name, "transform", deployed, approximated, transform.randomized, how))
  return rows


def ensemble_rows(label: str, num_models: int, make: Callable[[str, bool], Any],
                  methods: Sequence[str]) -> list[Row]:
  """One row per combination rule of an ensemble.

  Args:
    label: the ensemble's name.
    num_models: its number of members.
    make: `make(method, bpda) -> logits_fn` of the ensemble (stacked models
      of a many-models run, or a list of workdirs' models).
    methods: combination rules of `certjax.defences.ensemble.ENSEMBLE_METHODS`.
  """
  rows = []
  for method in methods:
    combined = make(method, False)
    approximated, how = combined, "none needed"
    if method == "vote":
      approximated, how = make(method, True), "BPDA through the mean probabilities"
    rows.append(Row(f"{label} (ensemble of {num_models}, {method})", "ensemble",
                    _deterministic(combined), _deterministic(approximated), False, how))
  return rows


def _attack_sequences(settings: Any):
  norm = settings.norm
  steps = int(settings.num_steps)
  step_size = float(settings.step_size) if float(settings.step_size) > 0 else None
  rel = None if step_size else 2.5 / steps
  pgd = functools.partial(make_pgd, norm=norm, num_steps=steps, step_size=step_size,
                          rel_step_size=rel, num_restarts=int(settings.restarts))
  naive = [(f"pgd{steps}-ce", pgd(loss="ce"))]
  adaptive: list[tuple[str, AttackFn]] = []
  for name in settings.adaptive_attacks:
    if name == "pgd":
      adaptive.append((f"pgd{steps}-ce", pgd(loss="ce")))
    elif name == "pgd_cw":
      adaptive.append((f"pgd{steps}-cw", pgd(loss="cw")))
    elif norm == "linf":
      adaptive.append(("cw-linf", make_cw_linf(num_steps=int(settings.cw_steps))))
    else:
      adaptive.append(("cw-l2", make_cw_l2(
          num_steps=int(settings.cw_steps),
          binary_search_steps=int(settings.cw_binary_search_steps))))
  return naive, adaptive


def _gradient_norms(oracle: Any, key: Any, x: np.ndarray, y: np.ndarray,
                    batch_size: int) -> np.ndarray:
  """The naive attacker's CE input-gradient norm per example."""

  @jax.jit
  def norms_of(k, xb, yb):
    loss = lambda logits: -jnp.take_along_axis(  # noqa: E731
        jax.nn.log_softmax(logits), yb[:, None], axis=-1)[:, 0]
    grad = oracle.value_and_grad(k, xb, loss)[2]
    return jnp.sqrt(jnp.sum(jnp.square(grad.reshape(grad.shape[0], -1)), axis=-1))

  return np.concatenate([np.asarray(norms_of(jax.random.fold_in(key, i), x[s], y[s]))
                         for i, s in enumerate(common.batches(len(x), batch_size))])


def _predictions(deployed: Callable[[Any, Any], Any], key: Any, x: np.ndarray,
                 batch_size: int) -> np.ndarray:
  predict = jax.jit(lambda k, xb: jnp.argmax(deployed(k, xb), -1))
  return np.concatenate([np.asarray(predict(key, x[s]))
                         for s in common.batches(len(x), batch_size)])


def _robust(result: Any, e: int = 0) -> np.ndarray:
  return np.asarray(result.per_eps[e].robust, bool)


def evaluate_row(row: Row, x: np.ndarray, y: np.ndarray, settings: Any, key: Any,
                 report: Callable[[str], None]) -> dict[str, Any]:
  """Clean, naive and adaptive accuracy of one row, and its diagnostics."""
  eps_list = [float(e) for e in settings.eps_list]
  batch_size = int(settings.batch_size)
  naive_attacks, adaptive_attacks = _attack_sequences(settings)
  naive = oracles.naive_oracle(row.deployed)
  adaptive = oracles.adaptive_oracle(
      row.deployed, row.approximated, randomized=row.randomized,
      num_samples=int(settings.eot_samples) if row.randomized else 1)
  start = time.perf_counter()
  naive_result = robust_accuracy(jax.random.fold_in(key, 0), naive, x, y,
                                 attacks=naive_attacks, eps_list=eps_list, norm=settings.norm,
                                 batch_size=batch_size)
  adaptive_result = robust_accuracy(jax.random.fold_in(key, 1), adaptive, x, y,
                                    attacks=adaptive_attacks, eps_list=eps_list,
                                    norm=settings.norm, batch_size=batch_size)
  out: dict[str, Any] = {
      "defence": row.label, "kind": row.kind, "randomized": row.randomized,
      "adaptive_view": row.how,
      "clean_accuracy": naive_result.clean_accuracy,
      "naive_attack": " then ".join(naive_result.attack_names),
      "adaptive_attack": " then ".join(naive_result.attack_names + adaptive_result.attack_names)
      + (f" (the last {len(adaptive_result.attack_names)} with EOT over "
         f"{int(settings.eot_samples)} draws)" if row.randomized else ""),
      "naive": {f"{e:g}": r.robust_accuracy for e, r in zip(eps_list, naive_result.per_eps)},
      # The adaptive attacker also has the naive attack: an example counts as
      # robust only if neither broke it (BPDA's identity can be a worse guide
      # than a median filter's true gradient, for instance).
      "adaptive": {f"{e:g}": float(np.mean(_robust(naive_result, i) & _robust(adaptive_result, i)))
                   for i, e in enumerate(eps_list)},
      "adaptive_attacks_alone": {f"{e:g}": dict(r.robust_accuracy_after)
                                 for e, r in zip(eps_list, adaptive_result.per_eps)},
  }
  if settings.diagnostics:
    out["diagnostics"] = diagnose_row(row, naive, naive_result, x, y, settings, key)
  out["seconds"] = time.perf_counter() - start
  report(f"defences: {row.label}: clean {100 * out['clean_accuracy']:.1f}%, naive "
         + ", ".join(f"{100 * a:.1f}%" for a in out["naive"].values()) + "; adaptive "
         + ", ".join(f"{100 * a:.1f}%" for a in out["adaptive"].values())
         + f" ({out['seconds']:.0f} s)")
  return out


def diagnose_row(row: Row, naive: Any, naive_result: Any, x: np.ndarray, y: np.ndarray,
                 settings: Any, key: Any) -> list[dict[str, Any]]:
  """The gradient-masking checks of `certjax.attacks.diagnostics` on the naive attacker."""
  norm, batch_size = settings.norm, int(settings.batch_size)
  eps = float(settings.eps_list[-1])
  last = len(settings.eps_list) - 1
  checks = functools.partial(robust_accuracy, norm=norm, batch_size=batch_size)
  fgsm = checks(jax.random.fold_in(key, 2), naive, x, y, eps_list=[eps],
                attacks=[("fgsm" if norm == "linf" else "fgm", make_fgm(norm=norm))])
  square = checks(jax.random.fold_in(key, 3), naive, x, y, eps_list=[eps],
                  attacks=[("square", make_square(norm=norm,
                                                  num_queries=int(settings.square_queries)))])
  large = checks(jax.random.fold_in(key, 4), naive, x, y, eps_list=[float(settings.large_eps)],
                 attacks=_attack_sequences(settings)[0])
  predictions = np.stack([_predictions(row.deployed, jax.random.fold_in(key, 100 + r), x,
                                       batch_size) for r in range(2)])
  outcomes = {
      "iterative_robust": _robust(naive_result, last), "one_step_robust": _robust(fgsm),
      "white_box_robust": _robust(naive_result, last), "black_box_robust": _robust(square),
      "large_eps_robust": _robust(large), "large_eps": float(settings.large_eps),
      "predictions": predictions,
      "gradient_norms": _gradient_norms(naive, jax.random.fold_in(key, 5), x, y, batch_size),
  }
  findings = diagnostics_lib.diagnose(outcomes)
  diagnostics_lib.warn(findings, row.label)
  return [{"name": f.name, "message": f.message, "evidence": f.evidence} for f in findings]


def build_detector(name: str, logits_fn: Callable[[Any], Any], apply_fn: Any, variables: Any,
                   settings: Any, calibration: tuple[np.ndarray, np.ndarray],
                   num_classes: int, adaptive: bool) -> Any:
  """Detector `name` on the model; `adaptive` puts BPDA on its non-differentiable parts."""
  if name == "feature_squeezing":
    squeezers = []
    for squeezer in settings.squeezers:
      t = _transform(squeezer, settings)
      forward = (lambda x, t=t: t.forward(jax.random.key(0), x))
      if adaptive:
        forward = bpda_lib.bpda(forward, lambda x, t=t: t.approximation(jax.random.key(0), x))
      squeezers.append(forward)
    return detectors_lib.feature_squeezing(logits_fn, squeezers)
  if name == "mahalanobis":
    features_fn = common.penultimate_features(apply_fn, variables)
    stats = detectors_lib.fit_mahalanobis(features_fn, calibration[0], calibration[1],
                                          num_classes)
    return detectors_lib.mahalanobis(features_fn, stats,
                                     noise_magnitude=float(settings.mahalanobis_noise))
  return detectors_lib.strip(logits_fn, calibration[0],
                             num_overlays=int(settings.strip_overlays))


def _score_all(detector: Any, key: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  score = jax.jit(detector.score_fn)
  return np.concatenate([np.asarray(score(jax.random.fold_in(key, i), x[s]))
                         for i, s in enumerate(common.batches(len(x), batch_size))])


def evaluate_detector(name: str, ctx: EvalContext, x: np.ndarray, y: np.ndarray,
                      calibration: tuple[np.ndarray, np.ndarray], held_out: np.ndarray,
                      settings: Any, key: Any, report: Callable[[str], None]) -> dict[str, Any]:
  """The system 'classifier + detector with a reject option' under naive and joint attacks.

  The detector is fitted on clean train images (`calibration`: Mahalanobis'
  class statistics, STRIP's overlays) and its threshold set on held-out clean
  eval images (`held_out`, none of them evaluated): scores of training
  images are biased (the model fits them), so a threshold set on them
  rejects more clean test images than the stated rate.
  """
  start = time.perf_counter()
  logits_fn = ctx.logits_fn()
  batch_size = int(settings.batch_size)
  detector = build_detector(name, logits_fn, ctx.apply_fn, ctx.variables, settings,
                            calibration, ctx.num_classes, adaptive=False)
  # Only feature squeezing has non-differentiable stages to approximate; the
  # others would be fitted (Mahalanobis' statistics) a second time for nothing.
  smooth = build_detector(name, logits_fn, ctx.apply_fn, ctx.variables, settings,
                          calibration, ctx.num_classes, adaptive=True) \
      if name == "feature_squeezing" else detector
  threshold = detectors_lib.threshold_at_fpr(
      _score_all(detector, jax.random.fold_in(key, 0), held_out, batch_size),
      float(settings.detector_fpr))
  system = detectors_lib.with_reject(logits_fn, detector, threshold)
  system_smooth = detectors_lib.with_reject(logits_fn, smooth, threshold)
  reject = ctx.num_classes
  steps = int(settings.num_steps)
  step_size = float(settings.step_size) if float(settings.step_size) > 0 else None
  rel = None if step_size else 2.5 / steps
  pgd = functools.partial(make_pgd, norm=settings.norm, num_steps=steps, step_size=step_size,
                          rel_step_size=rel, num_restarts=int(settings.restarts))
  naive_attack = pgd(loss="ce")
  # 'success' would keep a restart whose input is rejected (a success of the
  # classifier attack, a failure of the joint one): keep the highest joint loss.
  joint_attack = pgd(loss=detectors_lib.joint_margin, keep="loss")
  if detector.randomized:
    joint_oracle = oracles.adaptive_oracle(system, system_smooth, randomized=True,
                                           num_samples=int(settings.eot_samples))
  else:
    joint_oracle = oracles.adaptive_oracle(system, system_smooth, randomized=False)
  naive_run = jax.jit(lambda k, xb, yb, eps: naive_attack(k, logits_fn, xb, yb, eps))
  joint_run = jax.jit(lambda k, xb, yb, eps: joint_attack(k, joint_oracle, xb, yb, eps))
  decide = jax.jit(lambda k, xb: jnp.argmax(system(k, xb), -1))
  score = jax.jit(detector.score_fn)
  classify = jax.jit(lambda xb: jnp.argmax(logits_fn(xb), -1))

  def handled(k, xb, yb):
    prediction = np.asarray(decide(k, xb))
    return (prediction == yb) | (prediction == reject), prediction == reject

  clean_ok, clean_rejected = [], []
  for i, s in enumerate(common.batches(len(x), batch_size)):
    ok, rejected = handled(jax.random.fold_in(key, 10 + i), x[s], y[s])
    clean_ok.append(ok & ~rejected)
    clean_rejected.append(rejected)
  clean_scores = _score_all(detector, jax.random.fold_in(key, 1), x, batch_size)
  out: dict[str, Any] = {
      "defence": f"{name} (detector)", "kind": "detector", "randomized": detector.randomized,
      "threshold": float(threshold), "detector_fpr": float(settings.detector_fpr),
      "clean_accuracy": float(np.mean(np.concatenate(clean_ok))),
      "clean_rejection_rate": float(np.mean(np.concatenate(clean_rejected))),
      "naive_attack": f"pgd{steps}-ce on the classifier alone",
      "adaptive_attack": f"pgd{steps} on classifier + detector (joint margin"
      + (", BPDA" if name == "feature_squeezing" else "")
      + (f", EOT over {int(settings.eot_samples)} draws" if detector.randomized else "") + ")",
      "adaptive_view": "joint loss over classifier and detector",
      "naive": {}, "adaptive": {}, "detection": {}}
  for e_index, eps in enumerate(float(e) for e in settings.eps_list):
    naive_ok, joint_ok, adversarial_scores, fooled = [], [], [], []
    for i, s in enumerate(common.batches(len(x), batch_size)):
      k = jax.random.fold_in(jax.random.fold_in(key, 1000 + e_index), i)
      xb, yb = x[s], y[s]
      x_naive = np.asarray(naive_run(jax.random.fold_in(k, 0), xb, yb, jnp.float32(eps)))
      x_joint = np.asarray(joint_run(jax.random.fold_in(k, 1), xb, yb, jnp.float32(eps)))
      for what, x_adv in (("naive", x_naive), ("joint", x_joint)):
        check_perturbation(xb, x_adv, eps, settings.norm,
                           name=f"the {what} attack on {name} at eps={eps:g}")
      ok, _ = handled(jax.random.fold_in(k, 2), x_naive, yb)
      naive_ok.append(ok)
      ok, _ = handled(jax.random.fold_in(k, 3), x_joint, yb)
      joint_ok.append(ok)
      adversarial_scores.append(np.asarray(score(jax.random.fold_in(k, 4), x_naive)))
      fooled.append(np.asarray(classify(x_naive)) != yb)
    scores = np.concatenate(adversarial_scores)
    successful = np.concatenate(fooled)
    out["naive"][f"{eps:g}"] = float(np.mean(np.concatenate(naive_ok)))
    # The adaptive attacker keeps whichever of its two attacks fools the system.
    out["adaptive"][f"{eps:g}"] = float(np.mean(np.concatenate(naive_ok)
                                                & np.concatenate(joint_ok)))
    out.setdefault("joint_attack_alone", {})[f"{eps:g}"] = float(
        np.mean(np.concatenate(joint_ok)))
    metrics = detectors_lib.detection_metrics(clean_scores, scores[successful],
                                              fpr=float(settings.detector_fpr)) \
        if successful.any() else {}
    out["detection"][f"{eps:g}"] = {"successful_naive_adversarials": int(successful.sum()),
                                    **{k: float(v) for k, v in metrics.items()}}
  out["seconds"] = time.perf_counter() - start
  report(f"defences: {out['defence']}: clean {100 * out['clean_accuracy']:.1f}% (rejects "
         f"{100 * out['clean_rejection_rate']:.1f}%), naive "
         + ", ".join(f"{100 * a:.1f}%" for a in out["naive"].values()) + "; joint "
         + ", ".join(f"{100 * a:.1f}%" for a in out["adaptive"].values())
         + f" ({out['seconds']:.0f} s)")
  return out


def results_table(rows: Sequence[dict[str, Any]], eps_list: Sequence[float], norm: str,
                  header: str) -> str:
  """The Athalye-style table: accuracy (%) per defence under the naive and adaptive attack."""
  eps_names = [f"{float(e):g}" for e in eps_list]
  columns = [f"naive {e}" for e in eps_names] + [f"adaptive {e}" for e in eps_names]
  lines = [header, "",
           f"Accuracy (%) of each defended system under the naive attack (gradients of the "
           f"defence as written) and the adaptive attack ({norm} eps).", "",
           "| defence | clean | " + " | ".join(columns) + " | adaptive attack | warnings |",
           "|---|---|" + "---|" * len(columns) + "---|---|"]
  for row in rows:
    cells = [f"{100 * row['naive'][e]:.1f}" for e in eps_names]
    cells += [f"{100 * row['adaptive'][e]:.1f}" for e in eps_names]
    warned = ", ".join(d["name"] for d in row.get("diagnostics", ())) or "none"
    if "diagnostics" not in row:
      warned = "not run"
    lines.append(f"| {row['defence']} | {100 * row['clean_accuracy']:.1f} | "
                 + " | ".join(cells) + f" | {row['adaptive_attack']} | {warned} |")
  detectors = [r for r in rows if r["kind"] == "detector"]
  if detectors:
    lines += ["", "Detectors (threshold at the stated false-rejection rate on held-out clean "
              "eval images): detection rate and AUC of the naive attack's successful "
              "adversarial examples; the table above counts a rejected input as handled.", "",
              "| detector | clean rejections | " + " | ".join(
                  f"detected {e} | AUC {e}" for e in eps_names) + " |",
              "|---|---|" + "---|---|" * len(eps_names)]
    for row in detectors:
      cells = []
      for e in eps_names:
        d = row["detection"][e]
        cells += [f"{100 * d['detection_rate']:.1f}%" if "detection_rate" in d else "-",
                  f"{d['auc']:.3f}" if "auc" in d else "-"]
      lines.append(f"| {row['defence']} | {100 * row['clean_rejection_rate']:.1f}% | "
                   + " | ".join(cells) + " |")
  findings = [(row["defence"], d) for row in rows for d in row.get("diagnostics", ())]
  if findings:
    lines += ["", "Gradient-masking warnings (naive attack):", ""]
    lines += [f"- {label}: [{d['name']}] {d['message']}" for label, d in findings]
  return "\n".join(lines) + "\n"


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings,
                    summary="inference-time defences under naive and adaptive attacks")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'defences' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  run_config = setup.run_config

  def evaluate(ctx: EvalContext) -> EvalResult:
    x, y = common.load_all(ctx.data)
    key = jax.random.key(int(settings.seed))
    report = functools.partial(common.report, ctx)
    rows: list[Row] = []
    if settings.include_model:
      rows.append(model_row("workdir model", ctx.apply_fn, ctx.variables, run_config))
    rows += transform_rows(ctx.logits_fn(), settings)
    for label, workdir in parse_models(settings.models):
      rows += _rows_of_workdir(label, workdir, settings)
    results = [evaluate_row(row, x, y, settings, jax.random.fold_in(key, i), report)
               for i, row in enumerate(rows)]
    if settings.detectors:
      if run_config is None:
        raise ValueError("The 'defences' evaluator's detectors calibrate on train images: "
                         "run it on a workdir (launch.evaluate), or set defence.detectors=().")
      calibration_data = EvalData.from_config(run_config.data, run_config.data.train_split, 1,
                                              int(settings.calibration_size) - 1)
      calibration = common.load_all(calibration_data)
      every = EvalData.from_config(run_config.data, ctx.data.split, 1, -1)
      unused = np.setdiff1d(every.indices, ctx.data.indices)[:int(settings.calibration_size)]
      if len(unused) < 2:
        raise ValueError("The detectors' thresholds are set on eval-split images that are not "
                         "evaluated; this selection uses (nearly) all of them: set skip or max.")
      held_out = every.load(unused)[0]
      for j, name in enumerate(settings.detectors):
        results.append(evaluate_detector(name, ctx, x, y, calibration, held_out, settings,
                                         jax.random.fold_in(key, 10_000 + j), report))
    eps_list = [float(e) for e in settings.eps_list]
    header = (f"Inference-time defences on {len(y)} {ctx.data.name} {ctx.data.split} images "
              f"(checkpoint step {ctx.step}).")
    table = results_table(results, eps_list, settings.norm, header)
    metrics = {}
    for row in results:
      metrics[f"{row['defence']}/clean_accuracy"] = row["clean_accuracy"]
      for e in eps_list:
        metrics[f"{row['defence']}/naive@{e:g}"] = row["naive"][f"{e:g}"]
        metrics[f"{row['defence']}/adaptive@{e:g}"] = row["adaptive"][f"{e:g}"]
    payload = {"evaluator": NAME, "settings": settings.to_dict(),
               "metadata": common.metadata_block(ctx), "norm": settings.norm,
               "eps_list": eps_list, "rows": results}
    figure = plots.defence_accuracy_figure(results, eps_list, norm=settings.norm,
                                           title=header)
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    common.report(ctx, table)
    return EvalResult(NAME, metrics, artifacts, table, details={"rows": results})

  return evaluate


def _rows_of_workdir(label: str, workdir: str, settings: Any) -> list[Row]:
  """The rows of other trained workdirs: 'a+b+c' (or a many-models run) is an ensemble."""
  step = None if int(settings.checkpoint_step) < 0 else int(settings.checkpoint_step)
  methods = tuple(settings.ensemble_methods)
  if "+" in workdir:
    members = [runs.restore_model(w.strip(), step).logits_fn()
               for w in workdir.split("+") if w.strip()]
    return ensemble_rows(label, len(members), lambda method, bpda: ensemble_lib.ensemble_logits_fn(
        members, method, bpda=bpda), methods)
  config = runs.read_config(workdir)
  if int(config.get("num_models", 1)) > 1:
    trained = runs.restore_models(workdir, step)
    return ensemble_rows(label, trained.num_models,
                         lambda method, bpda: ensemble_lib.stacked_ensemble_logits_fn(
                             trained.model.apply, trained.variables, method, bpda=bpda),
                         methods)
  trained = runs.restore_model(workdir, step)
  return [model_row(label, trained.model.apply, trained.variables, trained.config)]


def read_results(path: str) -> dict[str, Any]:
  """The results.json of a defences evaluation (a workdir, its defence/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)

