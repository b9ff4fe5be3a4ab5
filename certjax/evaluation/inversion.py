"""The 'inversion' evaluator: model inversion and FedSGD gradient inversion of a trained model.

Two measurements of what a model leaks about its inputs
(`certjax.privacy.inversion`):

  1. Class inversion (Fredrikson et al. 2015, MI-Face): a representative
     image of each class of `classes`, found by gradient descent on the input
     of the evaluated (target) model. How recognisable it is is measured, as
     the literature does, by an independent evaluation classifier: a model
     trained in another workdir (`evaluation_workdir`, e.g. another
     architecture and seed), restored here through `certjax.runs`. Its
     accuracy on the inversions (does it see class c in the inversion of c?)
     is the headline figure; its accuracy on the real images is reported
     beside it. Without one (`evaluation_workdir=''`) only the target's own
     confidence is reported, and the results say that this is not an
     independent measure (the target is fooled by its own adversarial
     inputs by construction).
  2. Gradient inversion of a FedSGD update: for each batch size B of
     `gradient_batch_sizes`, `num_batches` batches of consecutive selected
     images (batch j holds images j*B .. j*B+B-1 of the selection); the
     gradient a client would share is that of the model's batch-mean
     cross-entropy at the checkpoint's parameters (`fedsgd_gradient`). The
     labels are read off the head's kernel gradient (iDLG for B = 1, LLG for
     B > 1, or `label_method`) and given to the attacks (`label_source=
     'true'` gives them the true labels instead, an upper bound); each attack
     of `gradient_attacks` reconstructs the batch: 'dlg' (Zhu et al. 2019,
     L-BFGS on the squared gradient distance, with the given labels: iDLG's
     form), 'dlg_joint' (the original DLG, dummy soft labels optimised
     jointly, no labels given) and 'inverting_gradients' (Geiping et al.
     2020, cosine distance + TV). Reconstructions are paired with the true
     images (`match_reconstructions`, Hungarian on MSE) before PSNR and SSIM
     are read, per image, then averaged over the B * num_batches images.

The model is applied with `train=False` throughout, including for the
client's gradient: a BatchNorm model uses its running statistics, not the
batch statistics a training client would use (a simplification that makes
the gradient a deterministic function of the batch). Models computing in
bfloat16 are evaluated through their float32 twin (gradient matching needs
second derivatives that bfloat16 rounding destroys).

Writes under its output directory (`<workdir>/inversion/` for
`launch.evaluate --evaluator=inversion`):

  results.json  per-class and per-batch outcomes, settings, metadata and provenance;
  results.md    the tables (class inversion; gradient inversion per batch size and attack);
  results.png   class inversions in one row; for the first batch of each batch
                size the originals and, below them, each attack's reconstructions;
  images.npz    every image shown or scored (class inversions, originals and
                matched reconstructions), for notebooks (`read_images`).

Multi-host: every host computes the same (deterministic, small) problems on
its own devices; process 0 writes.

References:
  Fredrikson, Jha, Ristenpart. Model inversion attacks that exploit confidence
    information and basic countermeasures. CCS 2015.
  Zhu, Liu, Han. Deep leakage from gradients. NeurIPS 2019.
  Zhao, Mopuri, Bilen. iDLG: Improved deep leakage from gradients. arXiv
    2001.02610, 2020.
  Geiping, Bauermeister, Droege, Moeller. Inverting gradients: how easy is it
    to break privacy in federated learning? NeurIPS 2020.
  Wainakh et al. User-level label leakage from gradients in federated
    learning. PETS 2022 (LLG).
  Zhang, Jia, Pei, Wang, Li, Song. The secret revealer: generative
    model-inversion attacks against deep neural networks. CVPR 2020 (an
    independent evaluation classifier's accuracy as the inversion metric).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from certjax import keys
from certjax import parallel
from certjax import runs
from certjax import validation
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator
from certjax.privacy import inversion as inversion_lib
from certjax.runs import files

NAME = "inversion"
SECTION = "inversion"
RESULTS_STEM = "results"
IMAGES_FILE = "images.npz"
GRADIENT_ATTACKS = ("dlg", "dlg_joint", "inverting_gradients")
LABEL_METHODS = ("auto",) + inversion_lib.LABEL_RECOVERY_METHODS
LABEL_SOURCES = ("recovered", "true")
# The key of the final dense layer in every certjax model (`ImageClassifier.logits`).
HEAD = "head"
# Images per row of the figure; a larger batch shows its first ones.
FIGURE_COLUMNS = 16


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.inversion`.

  Fields:
    class_inversion: run the class inversion (Fredrikson et al. 2015).
    classes: the classes to invert; () = every class.
    num_steps: class inversion's descent steps at most (the paper's alpha).
    step_size: its gradient step (the paper's lambda).
    loss: 'probability' (the paper's 1 - p_c) or 'cross_entropy' (-log p_c).
    tv_weight: weight of the total-variation prior, >= 0.
    l2_weight: weight of the L2 prior (towards the zero image), >= 0.
    init: 'zeros' (the paper's start) or 'uniform' (seeded noise).
    patience: the paper's beta: stop when the cost has not improved on the
      last `patience` costs; 0 runs all `num_steps`.
    cost_threshold: the paper's gamma: stop once the cost falls to it; a
      negative value disables the rule (the cost is never negative).
    evaluation_workdir: the workdir of an independently trained classifier
      of the same data (its own config.json and checkpoints; the newest
      checkpoint is used) that classifies the class inversions; '' = none
      (only the target's own confidence is reported, not independent).
    gradient_attacks: gradient-inversion attacks, of GRADIENT_ATTACKS
      ('dlg', 'dlg_joint', 'inverting_gradients'); () = no gradient inversion.
    gradient_batch_sizes: the client batch sizes B attacked.
    num_batches: batches attacked per batch size.
    label_method: how labels are recovered from the head's gradient: 'auto'
      (iDLG for B = 1, LLG for B > 1), 'idlg' (B = 1 only), 'llg' or 'yin'.
    label_source: what 'dlg' and 'inverting_gradients' are given: 'recovered'
      (the labels recovered from the gradient, a real attacker's knowledge)
      or 'true' (the true labels: an upper bound).
    dlg_num_steps: L-BFGS (or Adam) iterations of DLG (the paper's 300).
    dlg_optimizer: 'lbfgs' (the paper's) or 'adam'.
    dlg_step_size: DLG's step size; 0 = the optimizer's default (1.0 for
      L-BFGS, 0.1 for Adam).
    ig_num_steps: Adam steps of Inverting Gradients (the paper's 4,800).
    ig_step_size: its initial step size (the paper's 0.1).
    ig_tv_weight: its total-variation weight (the paper's 1e-4 on ImageNet).
    ig_restarts: its independent restarts; the best objective is kept.
    batch_size: images per forward pass when classifying the real images.
    save_images: write images.npz.
    split: split whose images are used; '' = config.data.eval_split.
    seed: seed of the attacks' randomness (the stream 'inversion/<attack>').
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/inversion.
  """
  return ml_collections.ConfigDict({
      "class_inversion": True,
      "classes": (),
      "num_steps": 5000,
      "step_size": 0.1,
      "loss": "probability",
      "tv_weight": 0.0,
      "l2_weight": 0.0,
      "init": "zeros",
      "patience": 100,
      "cost_threshold": -1.0,
      "evaluation_workdir": "",
      "gradient_attacks": ("dlg", "inverting_gradients"),
      "gradient_batch_sizes": (1, 4),
      "num_batches": 2,
      "label_method": "auto",
      "label_source": "recovered",
      "dlg_num_steps": 300,
      "dlg_optimizer": "lbfgs",
      "dlg_step_size": 0.0,
      "ig_num_steps": 4800,
      "ig_step_size": 0.1,
      "ig_tv_weight": 1e-4,
      "ig_restarts": 1,
      "batch_size": 500,
      "save_images": True,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def _check_bool(value: Any, name: str) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False; got {value!r}.")


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  """Raises a one-line ValueError naming the first bad setting of `config.inversion`."""
  where = SECTION
  common.check_selection_settings(settings, where)
  _check_bool(settings.class_inversion, f"{where}.class_inversion")
  _check_bool(settings.save_images, f"{where}.save_images")
  classes = tuple(settings.classes)
  for c in classes:
    validation.check_int_at_least(c, f"{where}.classes", 0)
    if setup.num_classes is not None and c >= setup.num_classes:
      raise ValueError(f"{where}.classes holds class {c}, but the data has "
                       f"{setup.num_classes} classes (0..{setup.num_classes - 1}).")
  if len(set(classes)) != len(classes):
    raise ValueError(f"{where}.classes must not repeat a class; got {classes}.")
  validation.check_int_at_least(settings.num_steps, f"{where}.num_steps", 1)
  validation.check_positive(settings.step_size, f"{where}.step_size")
  validation.check_choice(settings.loss, f"{where}.loss", inversion_lib.CLASS_INVERSION_LOSSES)
  validation.check_positive(settings.tv_weight, f"{where}.tv_weight", allow_zero=True)
  validation.check_positive(settings.l2_weight, f"{where}.l2_weight", allow_zero=True)
  validation.check_choice(settings.init, f"{where}.init", inversion_lib.CLASS_INVERSION_INITS)
  validation.check_int_at_least(settings.patience, f"{where}.patience", 0)
  validation.check_finite_scalar(settings.cost_threshold, f"{where}.cost_threshold")
  attacks = tuple(settings.gradient_attacks)
  for attack in attacks:
    validation.check_choice(attack, f"{where}.gradient_attacks", GRADIENT_ATTACKS)
  if len(set(attacks)) != len(attacks):
    raise ValueError(f"{where}.gradient_attacks must not repeat an attack; got {attacks}.")
  sizes = tuple(settings.gradient_batch_sizes)
  for size in sizes:
    validation.check_int_at_least(size, f"{where}.gradient_batch_sizes", 1)
  if attacks and not sizes:
    raise ValueError(f"{where}.gradient_batch_sizes must name at least one batch size when "
                     f"gradient_attacks are given ({attacks}); use gradient_attacks=() to "
                     "skip gradient inversion.")
  if len(set(sizes)) != len(sizes):
    raise ValueError(f"{where}.gradient_batch_sizes must not repeat a size; got {sizes}.")
  if not settings.class_inversion and not attacks:
    raise ValueError(f"{where} has nothing to do: class_inversion is False and "
                     "gradient_attacks is empty.")
  validation.check_int_at_least(settings.num_batches, f"{where}.num_batches", 1)
  validation.check_choice(settings.label_method, f"{where}.label_method", LABEL_METHODS)
  if settings.label_method == "idlg" and any(s > 1 for s in sizes):
    raise ValueError(f"{where}.label_method 'idlg' recovers one label (batch size 1); "
                     f"gradient_batch_sizes {sizes} has larger ones: use 'auto', 'llg' or "
                     "'yin'.")
  if (settings.label_method == "yin" and setup.num_classes is not None
      and any(s > setup.num_classes for s in sizes)):
    raise ValueError(f"{where}.label_method 'yin' recovers distinct labels, so batch sizes "
                     f"must be <= {setup.num_classes} classes; got {sizes}.")
  validation.check_choice(settings.label_source, f"{where}.label_source", LABEL_SOURCES)
  validation.check_int_at_least(settings.dlg_num_steps, f"{where}.dlg_num_steps", 1)
  validation.check_choice(settings.dlg_optimizer, f"{where}.dlg_optimizer",
                          inversion_lib.DLG_OPTIMIZERS)
  validation.check_positive(settings.dlg_step_size, f"{where}.dlg_step_size", allow_zero=True)
  validation.check_int_at_least(settings.ig_num_steps, f"{where}.ig_num_steps", 1)
  validation.check_positive(settings.ig_step_size, f"{where}.ig_step_size")
  validation.check_positive(settings.ig_tv_weight, f"{where}.ig_tv_weight", allow_zero=True)
  validation.check_int_at_least(settings.ig_restarts, f"{where}.ig_restarts", 1)
  validation.check_int_at_least(settings.batch_size, f"{where}.batch_size", 1)
  validation.check_int_at_least(settings.seed, f"{where}.seed", 0)


# ------------------------------------------------------------------ helpers


class EvaluationClassifier:
  """The independent classifier restored from `evaluation_workdir` (once, then cached)."""

  def __init__(self, workdir: str, run_config: Any):
    self.workdir = os.path.abspath(workdir)
    self._run_config = run_config
    self._trained = None

  def load(self) -> runs.TrainedModel:
    if self._trained is None:
      # Trust comes from the evaluated run's signing settings, never from the
      # config.json of the workdir being checked.
      policy = runs.policy_from_config(self._run_config)
      self._trained = runs.restore_model(self.workdir, None, mesh=parallel.local_mesh(),
                                         policy=policy)
    return self._trained


def _check_evaluation_workdir(path: str) -> str:
  if not os.path.isdir(path):
    raise ValueError(f"inversion.evaluation_workdir {path!r} does not exist: give the workdir "
                     "of an independently trained classifier (python -m launch.train "
                     "--workdir=...) or '' to report the target's own confidence.")
  if not os.path.exists(os.path.join(path, runs.CONFIG_FILE)):
    raise ValueError(f"inversion.evaluation_workdir {path!r} holds no {runs.CONFIG_FILE}: it is "
                     "not a training workdir (python -m launch.train --workdir=...).")
  return path


def _check_evaluation_model(eval_fn: Any, workdir: str, image_shape: tuple[int, ...],
                            num_classes: int) -> None:
  """The evaluation classifier must take the target's images and give its classes."""
  try:
    logits = jax.eval_shape(eval_fn, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  except Exception as error:  # pylint: disable=broad-except
    first_line = (str(error).strip().splitlines() or [""])[0]
    raise ValueError(f"inversion.evaluation_workdir {workdir} holds a model that does not take "
                     f"the evaluated images of shape {image_shape}: {first_line}") from error
  if tuple(logits.shape) != (1, num_classes):
    raise ValueError(f"inversion.evaluation_workdir {workdir} holds a model with logits of "
                     f"shape {tuple(logits.shape)[1:]}; the evaluated model has "
                     f"{num_classes} classes.")


def _apply_fn_of(model_apply: Any, variables: Any):
  """(params, images) -> logits of a Flax model whose other collections stay fixed."""
  rest = {k: v for k, v in variables.items() if k != "params"}

  def apply_fn(params, images):
    return model_apply({"params": params, **rest}, images, train=False)

  return apply_fn


def _probabilities_fn(model_apply: Any):
  """jit: (variables, images) -> float32 softmax probabilities."""
  return jax.jit(lambda variables, images: jax.nn.softmax(
      model_apply(variables, images, train=False).astype(jnp.float32), axis=-1))


def _classify(probabilities_fn: Any, variables: Any, x: np.ndarray,
              batch_size: int) -> np.ndarray:
  """Softmax probabilities of `x`, in batches of at most `batch_size`."""
  out = [np.asarray(probabilities_fn(variables, x[part]))
         for part in common.batches(len(x), batch_size)]
  return np.concatenate(out)


class _Programs:
  """The evaluator's jitted programs, built once per model and reused.

  Evaluations during training call the same evaluator again with new
  variables: they pass as arguments, so each program compiles once.
  """

  def __init__(self):
    self._programs: dict[Any, tuple[Any, Any]] = {}

  def get(self, key: Any, model_apply: Any, make: Any) -> Any:
    """The program `key` of `model_apply`, made by `make()` the first time."""
    entry = self._programs.get(key)
    if entry is None or entry[0] != model_apply:
      entry = self._programs[key] = (model_apply, make())
    return entry[1]


def _load_selection(ctx: EvalContext, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  parts_x, parts_y = [], []
  for part in common.batches(len(ctx.data.indices), max(batch_size, 1024)):
    indices = ctx.data.indices[part]
    x, y = ctx.data.load(indices)
    common.note_loaded(ctx.data, indices, x, y)
    parts_x.append(np.asarray(x, np.float32))
    parts_y.append(np.asarray(y, np.int32))
  return np.concatenate(parts_x), np.concatenate(parts_y)


def _invert_fn(model_apply: Any, image_shape: tuple[int, ...],
               settings: ml_collections.ConfigDict):
  """jit: (key, variables, classes [K]) -> class inversions [K, H, W, C] and their info."""
  patience = int(settings.patience) or None
  # The cost is never negative, so a negative threshold could never fire.
  threshold = float(settings.cost_threshold) if settings.cost_threshold >= 0 else None

  def invert(key, variables, classes):
    return inversion_lib.invert_classes(
        key, lambda images: model_apply(variables, images, train=False), classes, image_shape,
        num_steps=int(settings.num_steps), step_size=float(settings.step_size),
        loss=settings.loss, tv_weight=float(settings.tv_weight),
        l2_weight=float(settings.l2_weight), init=settings.init, patience=patience,
        cost_threshold=threshold, return_info=True)

  return jax.jit(invert)


def _attack_fn(attack: str, model_apply: Any, batch_shape: tuple[int, ...],
               settings: ml_collections.ConfigDict):
  """The attack over N batches: (keys [N], variables, grads [N, ...], labels [N, B]) -> results."""

  def one(key, variables, grads, labels):
    apply_fn = _apply_fn_of(model_apply, variables)
    params = variables["params"]
    if attack == "inverting_gradients":
      return inversion_lib.inverting_gradients(
          key, apply_fn, params, grads, labels, batch_shape,
          num_steps=int(settings.ig_num_steps), step_size=float(settings.ig_step_size),
          tv_weight=float(settings.ig_tv_weight), restarts=int(settings.ig_restarts))
    step_size = float(settings.dlg_step_size) or None
    return inversion_lib.dlg(
        key, apply_fn, params, grads, batch_shape,
        labels=None if attack == "dlg_joint" else labels,
        num_steps=int(settings.dlg_num_steps), optimizer=settings.dlg_optimizer,
        step_size=step_size)

  if attack == "inverting_gradients":
    return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)))

  def in_turn(batch_keys, variables, grads, labels):
    # L-BFGS's line search is a while loop: under vmap every batch would step
    # until the slowest one's search ends (measured 7x slower than in turn).
    return jax.lax.map(lambda args: one(args[0], variables, args[1], args[2]),
                       (batch_keys, grads, labels))

  return jax.jit(in_turn)


def _gradients_fn(model_apply: Any, batch_size: int, method: str | None):
  """jit: (variables, images [N, B, H, W, C], labels [N, B]) -> the N clients' FedSGD
  gradients (a pytree with leading axis N) and the labels recovered from them [N, B]."""

  def one(variables, images, labels):
    apply_fn = _apply_fn_of(model_apply, variables)
    grads = inversion_lib.fedsgd_gradient(apply_fn, variables["params"], images, labels)
    recovered = inversion_lib.recover_labels_idlg(grads[HEAD]["kernel"], batch_size,
                                                  method=method)
    return grads, recovered

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def _mean(values: Any) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


# ------------------------------------------------------------------ tables


def class_table(rows: list[dict[str, Any]], summary: dict[str, Any], independent: bool) -> str:
  lines = []
  if independent:
    lines += [(f"Class inversion (Fredrikson et al. 2015) of {len(rows)} classes; evaluation "
               f"classifier {summary['evaluation_model']} from {summary['evaluation_workdir']} "
               f"(accuracy {100 * summary['evaluation_real_accuracy']:.2f}% on the "
               f"{summary['num_real_images']} real images): it recognises "
               f"{100 * summary['eval_accuracy']:.1f}% of the inversions."), "",
              "| class | target p(class) | eval prediction | eval p(class) | steps |",
              "|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['class']} | {r['target_probability']:.4f} | {r['eval_prediction']} | "
                   f"{r['eval_probability']:.4f} | {r['num_steps']} |")
    lines.append(f"| mean | {summary['target_confidence']:.4f} | "
                 f"{100 * summary['eval_accuracy']:.1f}% correct | "
                 f"{summary['eval_confidence']:.4f} | |")
  else:
    lines += [(f"Class inversion (Fredrikson et al. 2015) of {len(rows)} classes. No "
               "evaluation classifier (inversion.evaluation_workdir=''): the target's own "
               "confidence below is NOT an independent measure of what the inversions reveal "
               "(they are optimised against this very model)."), "",
              "| class | target p(class) | target prediction | steps |", "|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['class']} | {r['target_probability']:.4f} | "
                   f"{r['target_prediction']} | {r['num_steps']} |")
    lines.append(f"| mean | {summary['target_confidence']:.4f} | "
                 f"{100 * summary['target_accuracy']:.1f}% correct | |")
  return "\n".join(lines) + "\n"


def gradient_table(rows: list[dict[str, Any]], header: str) -> str:
  lines = [header, "",
           "| batch size | attack | PSNR (dB) | SSIM | labels used | label recovery |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['batch_size']} | {r['attack']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                 f"{r['labels_used']} | {100 * r['label_recovery']:.1f}% |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the evaluator


@dataclasses.dataclass
class _Report:
  """What the two parts of an evaluation add to its result: metrics, JSON, tables, images."""
  metrics: dict[str, float]
  payload: dict[str, Any]
  tables: list[str]
  figure_rows: list[tuple[str, np.ndarray, list[str]]] = dataclasses.field(default_factory=list)
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Target:
  """The evaluated model, its compiled programs and the selected images."""
  model_apply: Any
  variables: Any
  programs: _Programs
  x: np.ndarray
  y: np.ndarray
  indices: np.ndarray
  batch_size: int

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.x.shape[1:])

  def probabilities(self, x: np.ndarray) -> np.ndarray:
    fn = self.programs.get("probabilities", self.model_apply,
                           lambda: _probabilities_fn(self.model_apply))
    return _classify(fn, self.variables, x, self.batch_size)


def _class_inversion(ctx: EvalContext, settings: ml_collections.ConfigDict, target: _Target,
                     evaluator: EvaluationClassifier | None, report: _Report) -> None:
  """Inverts the classes of `settings.classes` and scores the inversions."""
  classes = np.asarray(tuple(settings.classes) or range(ctx.num_classes), np.int32)
  common.report(ctx, f"inversion: inverting {len(classes)} classes "
                f"({settings.num_steps} steps at most)")
  shape = target.image_shape
  invert = target.programs.get(("invert", shape), target.model_apply,
                               lambda: _invert_fn(target.model_apply, shape, settings))
  images, info = invert(keys.stream_key(int(settings.seed), "inversion/class"), target.variables,
                        classes)
  images = np.asarray(images)
  target_probs = target.probabilities(images)
  rows = [{"class": int(c), "target_probability": float(info.probability[i]),
           "target_prediction": int(target_probs[i].argmax()),
           "cost": float(info.cost[i]), "num_steps": int(info.num_steps[i])}
          for i, c in enumerate(classes)]
  summary: dict[str, Any] = {
      "independent": evaluator is not None,
      "target_confidence": _mean([r["target_probability"] for r in rows]),
      "target_accuracy": _mean([float(r["target_prediction"] == r["class"]) for r in rows])}
  report.metrics["class_inversion/target_confidence"] = summary["target_confidence"]
  report.metrics["class_inversion/target_accuracy"] = summary["target_accuracy"]
  captions = [f"{c}" for c in classes]
  if evaluator is not None:
    trained = evaluator.load()
    eval_variables = jax.device_get(trained.variables)
    _check_evaluation_model(
        lambda x: trained.model.apply(eval_variables, x, train=False),
        evaluator.workdir, shape, ctx.num_classes)
    eval_fn = target.programs.get("eval_probabilities", trained.model.apply,
                                  lambda: _probabilities_fn(trained.model.apply))
    eval_real = _classify(eval_fn, eval_variables, target.x, target.batch_size)
    eval_probs = _classify(eval_fn, eval_variables, images, target.batch_size)
    for i, r in enumerate(rows):
      r["eval_prediction"] = int(eval_probs[i].argmax())
      r["eval_probability"] = float(eval_probs[i, r["class"]])
    summary.update({
        "evaluation_workdir": evaluator.workdir,
        "evaluation_model": trained.config.model.name,
        "evaluation_step": int(trained.step),
        "evaluation_real_accuracy": float(np.mean(eval_real.argmax(-1) == target.y)),
        "num_real_images": len(target.y),
        "eval_accuracy": _mean([float(r["eval_prediction"] == r["class"]) for r in rows]),
        "eval_confidence": _mean([r["eval_probability"] for r in rows])})
    report.metrics["class_inversion/eval_accuracy"] = summary["eval_accuracy"]
    report.metrics["class_inversion/eval_confidence"] = summary["eval_confidence"]
    report.metrics["eval_classifier/accuracy"] = summary["evaluation_real_accuracy"]
    captions = [f"{r['class']}: eval {r['eval_prediction']}" for r in rows]
  report.payload["class_inversion"] = {"summary": summary, "classes": rows}
  report.tables.append(class_table(rows, summary, evaluator is not None))
  report.figure_rows.append(("class inversion", images, captions))
  report.arrays["class_inversions"] = images
  report.arrays["classes"] = classes


def _score_batches(reconstructions: np.ndarray, x: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Matches each batch's reconstructions to its images; (matched, order, PSNR, SSIM) [N, B...]."""
  matched, orders, psnrs, ssims = [], [], [], []
  for recon, true in zip(reconstructions, x):
    images, order = inversion_lib.match_reconstructions(recon, true)
    matched.append(np.asarray(images))
    orders.append(np.asarray(order))
    psnrs.append(np.asarray(inversion_lib.psnr(images, true), np.float64))
    ssims.append(np.asarray(inversion_lib.ssim(images, true), np.float64))
  return np.stack(matched), np.stack(orders), np.stack(psnrs), np.stack(ssims)


def _gradient_inversion(ctx: EvalContext, settings: ml_collections.ConfigDict, target: _Target,
                        report: _Report) -> None:
  """Attacks the FedSGD gradients of `num_batches` batches of each batch size."""
  num_batches = int(settings.num_batches)
  method = None if settings.label_method == "auto" else settings.label_method
  rows, details = [], []
  for size in (int(s) for s in settings.gradient_batch_sizes):
    count = size * num_batches
    x = target.x[:count].reshape(num_batches, size, *target.image_shape)
    y = target.y[:count].reshape(num_batches, size)
    indices = target.indices[:count].reshape(num_batches, size)
    common.report(ctx, f"inversion: {num_batches} FedSGD gradient(s) of batch size {size}")
    gradients = target.programs.get(("gradients", size), target.model_apply,
                                    lambda s=size: _gradients_fn(target.model_apply, s, method))
    grads, recovered = gradients(target.variables, x, y)
    recovered = np.asarray(recovered)
    recovery = np.asarray(inversion_lib.label_recovery_rate(recovered, y), np.float64)
    report.metrics[f"labels/b{size}/recovery_rate"] = float(recovery.mean())
    given = y if settings.label_source == "true" else recovered
    report.figure_rows.append((f"B={size} original", x[0], [f"y={int(v)}" for v in y[0]]))
    report.arrays.update({f"b{size}/originals": x, f"b{size}/labels": y,
                          f"b{size}/recovered_labels": recovered})
    for attack in settings.gradient_attacks:
      common.report(ctx, f"inversion: {attack} at batch size {size}")
      root = jax.random.fold_in(keys.stream_key(int(settings.seed), f"inversion/{attack}"), size)
      batch_keys = jax.vmap(lambda j, root=root: jax.random.fold_in(root, j))(
          jnp.arange(num_batches))
      attack_fn = target.programs.get(
          (attack, size, target.image_shape), target.model_apply,
          lambda a=attack, s=size: _attack_fn(a, target.model_apply,
                                              (s, *target.image_shape), settings))
      result = attack_fn(batch_keys, target.variables, grads, jnp.asarray(given, jnp.int32))
      attack_labels = np.asarray(result.labels)
      matched, orders, psnrs, ssims = _score_batches(np.asarray(result.images), x)
      if attack == "dlg_joint":
        # The original DLG recovers labels itself: the argmax of its soft labels.
        label_rates = np.asarray(inversion_lib.label_recovery_rate(attack_labels, y), np.float64)
        labels_used = "jointly optimised"
      else:
        label_rates, labels_used = recovery, settings.label_source
      row = {"batch_size": size, "attack": attack, "psnr": _mean(psnrs.ravel()),
             "psnr_median": float(np.median(psnrs)), "ssim": _mean(ssims.ravel()),
             "labels_used": labels_used, "label_recovery": float(label_rates.mean())}
      rows.append(row)
      details.append({"batch_size": size, "attack": attack, "batches": [{
          "batch": j, "indices": indices[j].tolist(), "labels": y[j].tolist(),
          "recovered_labels": recovered[j].tolist(), "attack_labels": attack_labels[j].tolist(),
          "label_recovery": float(label_rates[j]), "order": orders[j].tolist(),
          "psnr": psnrs[j].tolist(), "ssim": ssims[j].tolist(),
          "matching_loss": float(result.matching_loss[j])} for j in range(num_batches)]})
      report.metrics[f"{attack}/b{size}/psnr"] = row["psnr"]
      report.metrics[f"{attack}/b{size}/ssim"] = row["ssim"]
      if attack == "dlg_joint":
        report.metrics[f"{attack}/b{size}/label_recovery"] = row["label_recovery"]
      report.figure_rows.append((f"B={size} {attack}", matched[0],
                                 [f"{p:.1f} dB" for p in psnrs[0]]))
      report.arrays[f"b{size}/{attack}"] = matched
  label_desc = {"auto": "iDLG (B = 1) / LLG (B > 1)"}.get(settings.label_method,
                                                           settings.label_method)
  header = (f"Gradient inversion of FedSGD gradients (batch-mean cross-entropy at checkpoint "
            f"step {ctx.step}, train=False): {num_batches} batch(es) per size; labels recovered "
            f"from the head's gradient with {label_desc}; '{settings.label_source}' labels "
            "given to dlg and inverting_gradients. PSNR and SSIM per image after Hungarian "
            "matching, averaged.")
  report.payload["gradient_inversion"] = {"summary": rows, "details": details}
  report.tables.append(gradient_table(rows, header))


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings, float32=True,
                    summary="model inversion (MI-Face) and FedSGD gradient inversion "
                            "(DLG, iDLG, Inverting Gradients)")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'inversion' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  evaluator = None
  if settings.evaluation_workdir:
    evaluator = EvaluationClassifier(_check_evaluation_workdir(settings.evaluation_workdir),
                                     setup.run_config)
  attacks = tuple(settings.gradient_attacks)
  sizes = tuple(int(s) for s in settings.gradient_batch_sizes)
  num_batches = int(settings.num_batches)
  programs = _Programs()

  def evaluate(ctx: EvalContext) -> EvalResult:
    if (evaluator is not None and ctx.metadata.get("workdir")
        and os.path.abspath(str(ctx.metadata["workdir"])) == evaluator.workdir):
      raise ValueError(f"inversion.evaluation_workdir {evaluator.workdir} is the workdir under "
                       "evaluation: the evaluation classifier must be independent of the "
                       "target (train another model).")
    variables = jax.device_get(ctx.variables)
    if "params" not in variables:
      raise ValueError("The 'inversion' evaluator needs a Flax model's variables "
                       "({'params': ...}); a plain logits_fn has no parameters to take a "
                       "gradient of.")
    head = variables["params"].get(HEAD)
    if attacks and not (hasattr(head, "get") and np.ndim(head.get("kernel")) == 2):
      raise ValueError(f"inversion: gradient inversion reads labels off the final dense "
                       f"layer's kernel, params['{HEAD}']['kernel'] (every certjax model's "
                       f"head); this model's params hold {sorted(variables['params'])}.")
    needed = max(sizes, default=0) * num_batches if attacks else 1
    if needed > len(ctx.data.indices):
      raise ValueError(f"inversion: the selection holds {len(ctx.data.indices)} images; "
                       f"{num_batches} batches of {max(sizes, default=1)} need {needed} "
                       "(config.skip / config.max).")
    x, y = _load_selection(ctx, int(settings.batch_size))
    target = _Target(ctx.float32_apply_fn or ctx.apply_fn, variables, programs, x, y,
                     np.asarray(ctx.data.indices), int(settings.batch_size))
    accuracy = float(np.mean(target.probabilities(x).argmax(-1) == y))
    report = _Report(
        metrics={"target/accuracy": accuracy},
        payload={"evaluator": NAME, "settings": settings.to_dict()},
        tables=[(f"Model inversion of {ctx.metadata.get('model', 'the model')} on "
                 f"{ctx.data.name} {ctx.data.split}, checkpoint step {ctx.step} (target "
                 f"accuracy {100 * accuracy:.2f}% on the {len(y)} selected images)."), ""])
    if settings.class_inversion:
      _class_inversion(ctx, settings, target, evaluator, report)
    if attacks:
      _gradient_inversion(ctx, settings, target, report)

    table = "\n".join(report.tables)
    payload = {**report.payload, "metrics": report.metrics,
               "metadata": common.metadata_block(ctx)}
    title = (f"{ctx.metadata.get('data', ctx.data.name)} {ctx.metadata.get('model', '')}, "
             f"step {ctx.step}")
    figure = plots.inversion_grid_figure(report.figure_rows, title=title,
                                         max_columns=FIGURE_COLUMNS)
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    if ctx.output_dir is not None and settings.save_images and parallel.is_main_process():
      # npz names are file names inside a zip: '/' becomes '__' (read_images undoes it).
      artifacts["images"] = files.atomic_write_npz(
          os.path.join(ctx.output_dir, IMAGES_FILE),
          **{k.replace("/", "__"): v for k, v in report.arrays.items()})
    common.report(ctx, table)
    return EvalResult(NAME, report.metrics, artifacts, table,
                      details={"payload": payload, "images": report.arrays})

  return evaluate


def read_results(path: str) -> dict[str, Any]:
  """The results.json of an inversion evaluation (a workdir, its inversion/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)


def read_images(path: str) -> dict[str, np.ndarray]:
  """The images.npz (no pickle): 'class_inversions', 'classes', 'b<B>/originals',
  'b<B>/labels', 'b<B>/recovered_labels' and 'b<B>/<attack>' (matched to the originals)."""
  if os.path.isdir(path):
    candidate = os.path.join(path, SECTION, IMAGES_FILE)
    path = candidate if os.path.exists(candidate) else os.path.join(path, IMAGES_FILE)
  with np.load(path, allow_pickle=False) as f:
    return {k.replace("__", "/"): f[k] for k in f.files}


__all__ = ["GRADIENT_ATTACKS", "LABEL_METHODS", "LABEL_SOURCES", "build", "default_config",
           "read_images", "read_results", "validate_settings"]
