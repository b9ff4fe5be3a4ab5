"""The 'extraction' evaluator: model extraction from a trained model, and what output defences cost.

The trained model is the victim, a black box behind a query interface that
counts every query (`certjax.privacy.extraction.QueryInterface`). Each
output mode of `outputs` is one way the victim answers, and so one defence:
'probabilities' (the undefended prediction API), 'rounded' (probabilities
rounded to `decimals` places; Tramer et al. 2016), 'top_k' (only the `k`
largest probabilities; k = 1 is top-1 only), 'label' (the label only), and
'logits'. For every mode, each attack of `attacks` runs against a fresh
victim:

  * 'knockoff': Knockoff Nets / copycat extraction (Orekondy et al. 2019;
    Correia-Silva et al. 2018): the attacker queries `budgets[-1]` unlabelled
    surrogate images (the run's train split, or another data set,
    `surrogate_data`) and trains an MLP student (`student_hidden`) on the
    answers; the copy at budget b is trained on the first b answers
    (`certjax.privacy.extraction.budget_curve`). Accuracy and fidelity
    (agreement with the victim) on the selected eval images, per budget.
    Every mode uses the same key, so the copies see the same queries in the
    same order and differ only by the answers.
  * 'exact': functionally equivalent extraction of a ReLU MLP with one or
    two hidden layers by the critical-point method (Jagielski et al. 2020;
    Carlini et al. 2020; `extract_one_hidden_layer`,
    `extract_two_hidden_layers`, the latter for a contractive first layer):
    queries used, neurons found (per layer), max |logit difference| over
    the eval images and fidelity. The attack needs
    scores it can difference, so with `exact_float64` (the default) the
    victim answers from a float64 twin of the model (its float32 weights,
    normalisation and ReLU evaluated in float64 NumPy; checked against the
    model on the eval images): float32 rounding noise swamps the Jacobian
    changes of a trained 784-128-10 MLP (see the attack's docstring).
    Rounded, top-k and label answers are refused by the attack (recorded as
    such); any other model is skipped with the reason.
  * 'square': the Square Attack (Andriushchenko et al. 2020) on the first
    `square_images` eval images, its every query answered through the
    interface (`QueryInterface.as_logits_fn`: log-probabilities of the
    answer, zeros floored); robust accuracy is judged by the victim itself on
    the images Square returns.

What each defence costs the legitimate user is measured on the eval images
too: the accuracy of the answered label (argmax of the answer; ties in a
rounded answer go to the lowest class) and the mean L1 distance between the
answer, read as a distribution (labels one-hot), and the true probabilities.

Writes `extraction/results.{json,md,png}` (the PNG: Knockoff fidelity and
accuracy against the query budget per output mode, and Square's robust
accuracy per output mode).

References:
  F. Tramer, F. Zhang, A. Juels, M. Reiter, T. Ristenpart. Stealing Machine
    Learning Models via Prediction APIs. USENIX Security 2016.
  J. Correia-Silva, R. Berriel, C. Badue, A. de Souza, T. Oliveira-Santos.
    Copycat CNN: Stealing Knowledge by Persuading Confession with Random
    Non-Labeled Data. IJCNN 2018.
  T. Orekondy, B. Schiele, M. Fritz. Knockoff Nets: Stealing Functionality of
    Black-Box Models. CVPR 2019.
  M. Jagielski, N. Carlini, D. Berthelot, A. Kurakin, N. Papernot. High
    Accuracy and High Fidelity Extraction of Neural Networks. USENIX
    Security 2020.
  N. Carlini, M. Jagielski, I. Mironov. Cryptanalytic Extraction of Neural
    Network Models. CRYPTO 2020.
  M. Andriushchenko, F. Croce, N. Flammarion, M. Hein. Square Attack: a
    query-efficient black-box adversarial attack via random search. ECCV 2020.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from certjax import data as data_lib
from certjax import keys
from certjax import models
from certjax import parallel
from certjax import validation
from certjax.attacks.square import SQUARE_NORMS, square as square_attack
from certjax.evaluation import common
from certjax.evaluation import plots
from certjax.evaluation.registry import EvalContext, EvalResult, EvalSetup
from certjax.evaluation.registry import register_evaluator
from certjax.privacy import extraction

NAME = "extraction"
SECTION = "extraction"
RESULTS_STEM = "results"
ATTACKS = ("knockoff", "exact", "square")
# The float64 twin must reproduce the model to float32 precision; more than
# this (relative to the largest logit) means it is not the same function.
_TWIN_TOLERANCE = 1e-4


def default_config() -> ml_collections.ConfigDict:
  """Defaults of `config.extraction`.

  Fields:
    attacks: of ATTACKS: 'knockoff', 'exact', 'square'.
    outputs: the victim's answer modes compared (the defences), of
      `certjax.privacy.extraction.OUTPUTS`: 'logits', 'probabilities',
      'rounded', 'top_k', 'label'.
    decimals: decimal places the 'rounded' output keeps.
    k: probabilities the 'top_k' output keeps (1 = top-1 only).
    budgets: increasing Knockoff query budgets; the victim is asked
      budgets[-1] surrogate images per output mode.
    surrogate_data: the attacker's unlabelled images: '' = the run's data
      set, or a data set name ('fashion_mnist', ...) of the same image shape.
    surrogate_manual_dir: that data set's IDX directory ('' = TFDS).
    surrogate_split: the split they come from ('' = the run's train split,
      or 'train' of another data set); its first budgets[-1] images are drawn.
    student_hidden: hidden widths of the student MLP ((): a linear student);
      it normalises with the surrogate images' own mean and std.
    knockoff_epochs, knockoff_learning_rate, knockoff_batch_size: the
      student's Adam training.
    exact_float64: the exact extraction queries a float64 twin of the model
      (True) or the float32 model itself (False).
    exact_known_width: the attacker knows the hidden width (stops once that
      many neurons are found) instead of stopping on `exact_patience`.
    exact_max_lines, exact_patience: the critical-point search's budget of
      random lines, and the idle lines after which it stops.
    square_norm, square_eps, square_queries: the Square Attack ('linf' or
      'l2', radius in [0, 1] pixels, queries per image including the first).
    square_images: the first this many selected eval images are attacked.
    batch_size: images per victim call (queries and evaluation alike).
    split: the test split for fidelity and accuracy; '' = config.data.eval_split.
    seed: the attacks' seed (stream 'extraction/<attack>', `certjax.keys`).
    checkpoint_step: checkpoint to restore; -1 = the newest.
    output_dir: '' = <workdir>/extraction.
  """
  return ml_collections.ConfigDict({
      "attacks": ATTACKS,
      "outputs": ("probabilities", "rounded", "top_k", "label"),
      "decimals": 2,
      "k": 1,
      "budgets": (100, 300, 1000, 3000, 10000),
      "surrogate_data": "",
      "surrogate_manual_dir": "",
      "surrogate_split": "",
      "student_hidden": (128,),
      "knockoff_epochs": 10,
      "knockoff_learning_rate": 1e-3,
      "knockoff_batch_size": 64,
      "exact_float64": True,
      "exact_known_width": False,
      "exact_max_lines": 256,
      "exact_patience": 8,
      "square_norm": "linf",
      "square_eps": 0.1,
      "square_queries": 1000,
      "square_images": 100,
      "batch_size": 500,
      "split": "",
      "seed": 0,
      "checkpoint_step": -1,
      "output_dir": "",
  })


def _names(value: Any, name: str, choices: tuple[str, ...]) -> list[str]:
  if isinstance(value, str) or not len(value):
    raise ValueError(f"{name} must be a non-empty list of names from {choices}; got {value!r}.")
  for item in value:
    validation.check_choice(item, name, choices)
  if len(set(value)) != len(value):
    raise ValueError(f"{name} names an entry twice: {tuple(value)!r}.")
  return list(value)


def validate_settings(settings: ml_collections.ConfigDict, setup: EvalSetup) -> None:
  _names(settings.attacks, "extraction.attacks", ATTACKS)
  _names(settings.outputs, "extraction.outputs", tuple(extraction.OUTPUTS))
  validation.check_int_at_least(settings.decimals, "extraction.decimals", 0)
  validation.check_int_at_least(settings.k, "extraction.k", 1)
  if setup.num_classes is not None and "top_k" in settings.outputs and (
      settings.k >= setup.num_classes):
    raise ValueError(f"extraction.k={settings.k} keeps every probability of the "
                     f"{setup.num_classes} classes, which is no defence; use k < "
                     f"{setup.num_classes}.")
  budgets = settings.budgets
  if isinstance(budgets, (str, int)) or not len(budgets):
    raise ValueError(f"extraction.budgets must be a non-empty increasing list of query "
                     f"counts; got {budgets!r}.")
  for budget in budgets:
    validation.check_int_at_least(budget, "extraction.budgets[i]", 1)
  if any(b >= c for b, c in itertools.pairwise(budgets)):
    raise ValueError(f"extraction.budgets must increase; got {tuple(budgets)!r}.")
  for key in ("surrogate_data", "surrogate_manual_dir", "surrogate_split"):
    if not isinstance(settings[key], str):
      raise ValueError(f"extraction.{key} must be a string ('' for the default); got "
                       f"{settings[key]!r}.")
  if settings.surrogate_manual_dir and not settings.surrogate_data:
    raise ValueError("extraction.surrogate_manual_dir applies to extraction.surrogate_data; "
                     "set the data set name too (e.g. 'fashion_mnist').")
  hidden = settings.student_hidden
  if isinstance(hidden, (str, int)):
    raise ValueError(f"extraction.student_hidden must be a list of widths, e.g. (128,); "
                     f"got {hidden!r}.")
  for width in hidden:
    validation.check_int_at_least(width, "extraction.student_hidden[i]", 1)
  validation.check_int_at_least(settings.knockoff_epochs, "extraction.knockoff_epochs", 1)
  validation.check_positive(settings.knockoff_learning_rate, "extraction.knockoff_learning_rate")
  validation.check_int_at_least(settings.knockoff_batch_size, "extraction.knockoff_batch_size",
                                1)
  for key in ("exact_float64", "exact_known_width"):
    if not isinstance(settings[key], bool):
      raise ValueError(f"extraction.{key} must be True or False; got {settings[key]!r}.")
  validation.check_int_at_least(settings.exact_max_lines, "extraction.exact_max_lines", 1)
  validation.check_int_at_least(settings.exact_patience, "extraction.exact_patience", 1)
  validation.check_choice(settings.square_norm, "extraction.square_norm",
                          SQUARE_NORMS)
  validation.check_positive(settings.square_eps, "extraction.square_eps")
  validation.check_int_at_least(settings.square_queries, "extraction.square_queries", 1)
  validation.check_int_at_least(settings.square_images, "extraction.square_images", 1)
  validation.check_int_at_least(settings.batch_size, "extraction.batch_size", 1)
  validation.check_int_at_least(settings.seed, "extraction.seed", 0)
  common.check_selection_settings(settings, SECTION)


def _output_kwargs(output: str, settings: ml_collections.ConfigDict) -> dict[str, int]:
  if output == "rounded":
    return {"decimals": int(settings.decimals)}
  if output == "top_k":
    return {"k": int(settings.k)}
  return {}


def describe_output(output: str, settings: Any) -> str:
  """'rounded (2 decimals)', 'top_k (k=1)', or the mode's name."""
  if output == "rounded":
    return f"rounded ({settings['decimals']} decimals)"
  if output == "top_k":
    return f"top_k (k={settings['k']})"
  return output


def _fixed_batch_fn(fn: Callable[[Any], Any], batch_size: int) -> Callable[[Any], np.ndarray]:
  """x -> fn(x) in chunks of exactly `batch_size` (the last padded): one compiled shape."""

  def call(x):
    x = np.asarray(x, np.float32)
    outputs = []
    for part in common.batches(len(x), batch_size):
      chunk = x[part]
      size = len(chunk)
      if size < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - size, *chunk.shape[1:]),
                                                chunk.dtype)])
      outputs.append(np.asarray(fn(chunk))[:size])
    return np.concatenate(outputs)

  return call


class Float64Twin:
  """A certjax MLP evaluated in float64 NumPy (its float32 weights, exactly).

  logits(x) = head(relu(... relu(((x - mean) / std).reshape(n, -1) @ w1 + b1) ...)):
  `certjax.models.MLP` without its float32 rounding.
  """

  def __init__(self, module: Any, params: Any):
    self.mean = np.asarray(module.mean, np.float64)
    self.std = np.asarray(module.std, np.float64)
    params = jax.device_get(params)
    as64 = lambda layer: (np.asarray(layer["kernel"], np.float64),
                          np.asarray(layer["bias"], np.float64))
    self.layers = [as64(params[f"dense_{i}"]) for i in range(len(module.hidden))]
    self.head = as64(params["head"])

  @property
  def hidden_widths(self) -> tuple[int, ...]:
    return tuple(int(w.shape[1]) for w, _ in self.layers)

  @property
  def hidden_width(self) -> int:
    """Hidden neurons in all (the width of a one-hidden-layer MLP)."""
    return sum(self.hidden_widths)

  def __call__(self, x: Any) -> np.ndarray:
    z = (np.asarray(x, np.float64) - self.mean) / self.std
    z = z.reshape(len(z), -1)
    for w, b in self.layers:
      z = np.maximum(z @ w + b, 0.0)
    w, b = self.head
    return z @ w + b


# The depths exact extraction handles: `extract_one_hidden_layer` and
# `extract_two_hidden_layers`.
EXACT_DEPTHS = (1, 2)


def mlp_twin(apply_fn: Any, variables: Any) -> tuple[Float64Twin | None, str]:
  """(the float64 twin, '') of a certjax MLP with one or two hidden layers, else (None, why not)."""
  module = getattr(apply_fn, "__self__", None)
  if not isinstance(module, models.MLP):
    kind = type(module).__name__ if module is not None else "a plain function"
    return None, (f"exact extraction needs a ReLU MLP with one or two hidden layers (model "
                  f"'mlp'); the model is {kind}")
  if len(module.hidden) not in EXACT_DEPTHS:
    return None, (f"exact extraction handles one or two hidden layers; this MLP has "
                  f"{len(module.hidden)} (hidden={tuple(module.hidden)})")
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  expected = sorted([f"dense_{i}" for i in range(len(module.hidden))] + ["head"])
  if sorted(params) != expected:
    return None, f"unexpected MLP parameters {sorted(params)}"
  return Float64Twin(module, params), ""


def _surrogate_images(settings: ml_collections.ConfigDict, run_config: Any,
                      count: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
  """The attacker's first `count` unlabelled images and where they came from."""
  if run_config is None:
    raise ValueError("Knockoff needs the run's data config for its surrogate images: evaluate "
                     "through evaluate_workdir (or a training config's evals).")
  data_config = ml_collections.ConfigDict(run_config.data.to_dict())
  if settings.surrogate_data:
    data_config.name = settings.surrogate_data
    data_config.manual_dir = settings.surrogate_manual_dir
    split = settings.surrogate_split or "train"
  else:
    split = settings.surrogate_split or run_config.data.train_split
  available = len(data_lib.select_split_indices(data_config, split, 1, -1))
  if count > available:
    raise ValueError(f"extraction.budgets[-1]={count} exceeds the {available} surrogate images "
                     f"of {data_config.name} {split!r}; lower the budgets or use a larger split.")
  images, _ = data_lib.load_arrays(data_config, split, 0, count)  # labels never used
  if images.shape[1:] != image_shape:
    raise ValueError(f"The surrogate images of {data_config.name} {split!r} have shape "
                     f"{images.shape[1:]}; the victim takes {image_shape}.")
  return images, f"{data_config.name} {split} (first {count})"


def _defence_costs(outputs: list[str], settings: Any, logits: np.ndarray,
                   labels: np.ndarray) -> dict[str, dict[str, float]]:
  """Per output mode: the answered label's accuracy and the answer's L1 distortion."""
  probabilities = extraction.QueryInterface(lambda z: z).query(logits)
  costs = {}
  for output in outputs:
    answer = extraction.QueryInterface(lambda z: z, output=output,
                                       **_output_kwargs(output, settings)).query(logits)
    if output == "label":
      predicted, as_distribution = answer, np.eye(logits.shape[1])[answer]
    else:
      predicted = np.argmax(answer, axis=-1)
      as_distribution = probabilities if output == "logits" else answer
    costs[output] = {
        "answer_accuracy": float(np.mean(predicted == labels)),
        "answer_agreement": float(np.mean(predicted == np.argmax(logits, -1))),
        "answer_distortion": float(np.mean(np.sum(np.abs(as_distribution - probabilities), -1))),
    }
  return costs


def _student(settings: ml_collections.ConfigDict, num_classes: int, surrogate: np.ndarray,
             key: jax.Array) -> tuple[Callable, Any]:
  """The attacker's MLP student: (apply_fn(params, x), init params)."""
  channels = surrogate.shape[-1]
  mean = surrogate.reshape(-1, channels).mean(0)
  std = np.maximum(surrogate.reshape(-1, channels).std(0), 1e-3)
  student = models.get_model("mlp", num_classes=num_classes, mean=tuple(map(float, mean)),
                             std=tuple(map(float, std)),
                             hidden=tuple(int(w) for w in settings.student_hidden))
  params = models.init_variables(student, key, (1, *surrogate.shape[1:]))["params"]

  def apply_fn(params, x):
    return student.apply({"params": params}, x, train=False)

  return apply_fn, params


def _knockoff(ctx: EvalContext, settings: ml_collections.ConfigDict, outputs: list[str],
              victim_fn: Callable, surrogate: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray) -> dict[str, dict[str, Any]]:
  key = keys.stream_key(int(settings.seed), "extraction/knockoff")
  apply_fn, init = _student(settings, ctx.num_classes, surrogate,
                            keys.stream_key(int(settings.seed), "extraction/student"))
  budgets = [int(b) for b in settings.budgets]
  rows = {}
  for output in outputs:
    tic = time.perf_counter()
    victim = extraction.QueryInterface(victim_fn, output=output,
                                       **_output_kwargs(output, settings))
    curve = extraction.budget_curve(
        key, victim, surrogate, apply_fn, init, budgets=budgets, test_images=x_test,
        test_labels=y_test, batch_size=int(settings.knockoff_batch_size),
        num_epochs=int(settings.knockoff_epochs),
        learning_rate=float(settings.knockoff_learning_rate),
        query_batch_size=int(settings.batch_size), eval_batch_size=int(settings.batch_size))
    rows[output] = {"budgets": budgets, "accuracy": [float(a) for a in curve.accuracy],
                    "fidelity": [float(f) for f in curve.fidelity],
                    "queries_used": int(victim.queries_used),
                    "seconds": time.perf_counter() - tic}
    common.report(ctx, f"extraction: knockoff through {output}: fidelity "
                  f"{rows[output]['fidelity'][-1]:.4f} at {budgets[-1]} queries")
  return rows


def _exact_row(copy: Any, x_test: np.ndarray, y_test: np.ndarray, reference: np.ndarray,
               model_logits: np.ndarray) -> dict[str, Any]:
  """The results row of one extracted copy (one or two hidden layers)."""
  copy_logits = copy.logits(x_test)
  two_layers = isinstance(copy, extraction.ExtractedReLU2)
  per_layer = (tuple(copy.num_neurons_found) if two_layers else (copy.num_neurons_found,))
  row = {
      "queries_used": int(copy.queries_used),
      "num_neurons_found": int(sum(per_layer)),
      "max_logit_difference": extraction.max_logit_difference(
          copy.logits, lambda x: reference, x_test, up_to_shift=copy.up_to_shift),
      "max_logit_difference_float32_model": extraction.max_logit_difference(
          copy.logits, lambda x: model_logits, x_test, up_to_shift=copy.up_to_shift),
      "fidelity": extraction.agreement(copy_logits, model_logits),
      "accuracy": float(np.mean(np.argmax(copy_logits, -1) == y_test)),
      "up_to_shift": bool(copy.up_to_shift),
      "fit_residual": float(copy.fit_residual),
  }
  if two_layers:
    row.update({
        "neurons_found_per_layer": [int(n) for n in per_layer],
        "queries_per_layer": [int(q) for q in copy.queries_per_layer],
        "sign_residual": float(max(copy.sign_residual)),
        "sign_residual_per_layer": [float(r) for r in copy.sign_residual],
        "worst_rank_one_residual": float(max(np.max(r) for r in copy.rank_one_residual)),
        "worst_rank_one_residual_per_layer": [float(np.max(r))
                                              for r in copy.rank_one_residual],
    })
  else:
    row.update({"sign_residual": float(copy.sign_residual),
                "worst_rank_one_residual": float(np.max(copy.rank_one_residual))})
  return row


def _exact(ctx: EvalContext, settings: ml_collections.ConfigDict, outputs: list[str],
           victim_fn: Callable, x_test: np.ndarray, y_test: np.ndarray,
           model_logits: np.ndarray) -> dict[str, Any]:
  twin, reason = mlp_twin(ctx.apply_fn, ctx.variables)
  if twin is None:
    return {"skipped": reason}
  widths = twin.hidden_widths
  input_dim = int(np.prod(x_test.shape[1:]))
  if len(widths) == 2 and widths[0] >= input_dim:
    return {"skipped": f"two-hidden-layer extraction needs a contractive first layer; this "
                       f"MLP's first layer has {widths[0]} neurons for {input_dim} inputs"}
  twin_logits = twin(x_test)
  twin_error = float(np.max(np.abs(twin_logits - model_logits)))
  if twin_error > _TWIN_TOLERANCE * max(float(np.max(np.abs(model_logits))), 1.0):
    return {"skipped": f"the float64 twin differs from the model by {twin_error:.3g} in the "
                       "logits: it is not the same function"}
  victim_of = twin if settings.exact_float64 else victim_fn
  reference = twin_logits if settings.exact_float64 else model_logits
  key = keys.stream_key(int(settings.seed), "extraction/exact")
  if len(widths) == 1:
    extract, known = extraction.extract_one_hidden_layer, widths[0]
  else:
    extract, known = extraction.extract_two_hidden_layers, widths
  result: dict[str, Any] = {"victim": "float64 twin" if settings.exact_float64 else "float32 model",
                            "hidden_width": twin.hidden_width,
                            "hidden_widths": list(widths),
                            "twin_max_logit_difference": twin_error, "by_output": {}}
  for output in outputs:
    victim = extraction.QueryInterface(victim_of, output=output, num_classes=ctx.num_classes,
                                       **_output_kwargs(output, settings))
    tic = time.perf_counter()
    try:
      copy = extract(key, victim, x_test.shape[1:],
                     num_hidden=known if settings.exact_known_width else None,
                     max_lines=int(settings.exact_max_lines),
                     patience=int(settings.exact_patience))
    except ValueError as error:  # refused (defended output) or failed (no kink found)
      first_line = (str(error).strip().splitlines() or [""])[0]
      refused = output not in ("logits", "probabilities")
      result["by_output"][output] = {"refused" if refused else "failed": first_line,
                                     "queries_used": int(victim.queries_used)}
      continue
    row = _exact_row(copy, x_test, y_test, reference, model_logits)
    row["seconds"] = time.perf_counter() - tic
    result["by_output"][output] = row
    common.report(ctx, f"extraction: exact through {output}: {_neurons_cell(row, result)} "
                  f"neurons, {row['queries_used']} queries, max logit error "
                  f"{row['max_logit_difference']:.3g}, fidelity {row['fidelity']:.4f}")
  return result


def _neurons_cell(row: dict[str, Any], exact: dict[str, Any]) -> str:
  """'found/width', per hidden layer ('32/32, 16/16' for two)."""
  found = row.get("neurons_found_per_layer", [row["num_neurons_found"]])
  widths = exact.get("hidden_widths", [exact["hidden_width"]])
  return ", ".join(f"{n}/{w}" for n, w in zip(found, widths))


class _CurrentVictim:
  """A jittable logits_fn answering through whichever victim is current.

  Square is traced and compiled once for every output mode: the victim is
  switched on the host, where each call of the callback asks the current
  one (`QueryInterface.query`, counted) and turns its answer into scores as
  `QueryInterface.as_logits_fn` does (logits as they are; otherwise the log
  of the answered probabilities, a label one-hot, zeros floored).
  """

  def __init__(self, num_classes: int, floor: float = 1e-12):
    self.num_classes = num_classes
    self.floor = floor
    self.victim: extraction.QueryInterface | None = None

  def _host(self, x: np.ndarray) -> np.ndarray:
    answer = self.victim.query(x)
    if self.victim.output == "logits":
      return answer.astype(np.float32)
    if self.victim.output == "label":
      answer = np.eye(self.num_classes)[answer]
    return np.log(np.maximum(answer, self.floor)).astype(np.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.pure_callback(self._host,
                             jax.ShapeDtypeStruct((x.shape[0], self.num_classes), np.float32),
                             x, vmap_method="sequential")


def _square(ctx: EvalContext, settings: ml_collections.ConfigDict, outputs: list[str],
            victim_fn: Callable, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
  key = keys.stream_key(int(settings.seed), "extraction/square")
  eps = float(settings.square_eps)
  clean = np.argmax(victim_fn(x), -1) == y
  result: dict[str, Any] = {"num_images": len(y), "eps": eps,
                            "norm": str(settings.square_norm),
                            "clean_accuracy": float(np.mean(clean)), "by_output": {}}
  current = _CurrentVictim(ctx.num_classes)
  attack = jax.jit(lambda k, images, labels: square_attack(
      k, current, images, labels, eps=eps, norm=str(settings.square_norm),
      num_queries=int(settings.square_queries), return_info=True))
  for output in outputs:
    victim = extraction.QueryInterface(victim_fn, output=output,
                                       num_classes=ctx.num_classes,
                                       **_output_kwargs(output, settings))
    current.victim = victim
    tic = time.perf_counter()
    x_adv, info = attack(key, x, y)
    x_adv = np.asarray(x_adv)
    # The victim's own (uncounted) judgement of what Square returned. An
    # image the victim gets wrong is not robust, even if Square's start
    # (stripes of +-eps) happened to correct it.
    robust = clean & (np.argmax(victim_fn(x_adv), -1) == y)
    difference = (x_adv - x).reshape(len(x), -1)
    size = (np.max(np.abs(difference), -1) if settings.square_norm == "linf"
            else np.linalg.norm(difference, axis=-1))
    result["by_output"][output] = {
        "robust_accuracy": float(np.mean(robust)),
        "queries_used": int(victim.queries_used),
        "mean_queries_per_image": float(np.mean(np.asarray(info.num_queries))),
        "success_seen_by_attacker": float(np.mean(np.asarray(info.success))),
        "max_perturbation": float(np.max(size)),
        "seconds": time.perf_counter() - tic,
    }
    common.report(ctx, f"extraction: square through {output}: robust accuracy "
                  f"{np.mean(robust):.3f} ({victim.queries_used} queries)")
  return result


def _percent(value: float) -> str:
  return f"{100 * value:.2f}%"


def results_table(header: str, outputs: list[str], settings: Any, costs: dict[str, Any],
                  knockoff: dict[str, Any] | None, exact: dict[str, Any] | None,
                  square: dict[str, Any] | None) -> str:
  """The Markdown summary: one row per output mode (defence), one column group per attack."""
  columns = ["output (defence)", "answer acc.", "answer L1 distortion"]
  if knockoff:
    budget = knockoff[outputs[0]]["budgets"][-1]
    columns += [f"Knockoff fidelity @{budget}", f"Knockoff acc. @{budget}", "Knockoff queries"]
  if exact is not None:
    columns += ["exact: neurons", "exact: max logit err.", "exact: fidelity", "exact: queries"]
  if square is not None:
    columns += [f"Square robust acc. ({square['norm']} eps {square['eps']:g})", "Square queries"]
  lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for output in outputs:
    cells = [describe_output(output, settings), _percent(costs[output]["answer_accuracy"]),
             f"{costs[output]['answer_distortion']:.4f}"]
    if knockoff:
      row = knockoff[output]
      cells += [_percent(row["fidelity"][-1]), _percent(row["accuracy"][-1]),
                str(row["queries_used"])]
    if exact is not None:
      if "skipped" in exact:
        cells += ["skipped", "", "", ""]
      else:
        row = exact["by_output"][output]
        if "max_logit_difference" in row:
          cells += [_neurons_cell(row, exact),
                    f"{row['max_logit_difference']:.3g}", _percent(row["fidelity"]),
                    str(row["queries_used"])]
        else:
          cells += ["refused" if "refused" in row else "failed", "", "",
                    str(row["queries_used"])]
    if square is not None:
      row = square["by_output"][output]
      cells += [_percent(row["robust_accuracy"]), str(row["queries_used"])]
    lines.append("| " + " | ".join(cells) + " |")
  if knockoff:
    budgets = knockoff[outputs[0]]["budgets"]
    lines += ["", "Knockoff fidelity / accuracy against the query budget:", "",
              "| budget | " + " | ".join(describe_output(o, settings) for o in outputs) + " |",
              "|---|" + "---|" * len(outputs)]
    for i, budget in enumerate(budgets):
      lines.append(f"| {budget} | " + " | ".join(
          f"{_percent(knockoff[o]['fidelity'][i])} / {_percent(knockoff[o]['accuracy'][i])}"
          for o in outputs) + " |")
  if exact is not None:
    lines.append("")
    if "skipped" in exact:
      lines.append(f"Exact extraction skipped: {exact['skipped']}.")
    else:
      lines.append(f"Exact extraction queried the {exact['victim']} (it differs from the "
                   f"float32 model by at most {exact['twin_max_logit_difference']:.3g} in the "
                   "logits); max logit error against the queried victim, logits centred per "
                   "image when extracted from probabilities.")
      for output in outputs:
        row = exact["by_output"][output]
        note = row.get("refused") or row.get("failed")
        if note:
          lines.append(f"- {output}: {'refused' if 'refused' in row else 'failed'}: {note}")
  if square is not None:
    lines += ["", f"Square: the first {square['num_images']} images (clean accuracy "
              f"{_percent(square['clean_accuracy'])}), {settings['square_queries']} queries per "
              "image; queries counted by the victim include the images already fooled, which "
              "Square keeps in its batch."]
  return "\n".join(lines) + "\n"


def _metrics(victim_accuracy: float, costs: dict[str, Any], knockoff: dict[str, Any] | None,
             exact: dict[str, Any] | None, square: dict[str, Any] | None) -> dict[str, float]:
  metrics = {"victim_accuracy": victim_accuracy}
  for output, cost in costs.items():
    metrics[f"{output}/answer_accuracy"] = cost["answer_accuracy"]
    metrics[f"{output}/answer_distortion"] = cost["answer_distortion"]
  for output, row in (knockoff or {}).items():
    for budget, fidelity, accuracy in zip(row["budgets"], row["fidelity"], row["accuracy"]):
      metrics[f"knockoff/{output}/fidelity@{budget}"] = fidelity
      metrics[f"knockoff/{output}/accuracy@{budget}"] = accuracy
    metrics[f"knockoff/{output}/queries"] = float(row["queries_used"])
  for output, row in ((exact or {}).get("by_output") or {}).items():
    metrics[f"exact/{output}/queries"] = float(row["queries_used"])
    if "max_logit_difference" in row:
      metrics[f"exact/{output}/max_logit_difference"] = row["max_logit_difference"]
      metrics[f"exact/{output}/fidelity"] = row["fidelity"]
      metrics[f"exact/{output}/neurons_found"] = float(row["num_neurons_found"])
      for layer, found in enumerate(row.get("neurons_found_per_layer", ()), 1):
        metrics[f"exact/{output}/neurons_found_layer{layer}"] = float(found)
  for output, row in ((square or {}).get("by_output") or {}).items():
    metrics[f"square/{output}/robust_accuracy"] = row["robust_accuracy"]
    metrics[f"square/{output}/queries"] = float(row["queries_used"])
  return metrics


@register_evaluator(NAME, section=SECTION, default_config=default_config,
                    validate=validate_settings,
                    summary="model extraction (Knockoff, exact ReLU recovery) and Square "
                            "through a counting victim, per output defence")
def build(settings: ml_collections.ConfigDict, setup: EvalSetup):
  """The 'extraction' evaluator for validated `settings` (see `default_config`)."""
  validate_settings(settings, setup)
  run_config = setup.run_config
  attacks = list(settings.attacks)
  outputs = list(settings.outputs)

  def evaluate(ctx: EvalContext) -> EvalResult:
    variables = common.local_variables(ctx.variables, parallel.local_mesh())
    forward = jax.jit(lambda v, x: ctx.apply_fn(v, x, train=False))
    victim_fn = _fixed_batch_fn(lambda x: forward(variables, x), int(settings.batch_size))
    x_test, y_test = ctx.data.load(ctx.data.indices)
    common.note_loaded(ctx.data, ctx.data.indices, x_test, y_test)
    model_logits = np.asarray(victim_fn(x_test), np.float64)
    victim_accuracy = float(np.mean(np.argmax(model_logits, -1) == y_test))
    costs = _defence_costs(outputs, settings, model_logits, y_test)
    knockoff = exact = square = None
    surrogate_source = None
    if "knockoff" in attacks:
      surrogate, surrogate_source = _surrogate_images(
          settings, run_config, int(settings.budgets[-1]), tuple(x_test.shape[1:]))
      knockoff = _knockoff(ctx, settings, outputs, victim_fn, surrogate, x_test, y_test)
    if "exact" in attacks:
      exact = _exact(ctx, settings, outputs, victim_fn, x_test, y_test, model_logits)
    if "square" in attacks:
      count = min(int(settings.square_images), len(y_test))
      square = _square(ctx, settings, outputs, victim_fn, x_test[:count], y_test[:count])
    header = (f"Model extraction: {ctx.metadata.get('model', 'model')} on "
              f"{ctx.data.name} {ctx.data.split} ({len(y_test)} test images, victim accuracy "
              f"{_percent(victim_accuracy)})"
              + (f"; Knockoff surrogate: {surrogate_source}" if surrogate_source else "") + ".")
    table = results_table(header, outputs, settings.to_dict(), costs, knockoff, exact, square)
    metrics = _metrics(victim_accuracy, costs, knockoff, exact, square)
    payload = {"evaluator": NAME, "settings": settings.to_dict(),
               "metadata": common.metadata_block(ctx, surrogate=surrogate_source),
               "victim_accuracy": victim_accuracy, "defence_costs": costs,
               "knockoff": knockoff, "exact": exact, "square": square}
    figure = None
    if knockoff or square:
      figure = plots.extraction_figure(
          {describe_output(o, settings): (r["budgets"], r["accuracy"], r["fidelity"])
           for o, r in (knockoff or {}).items()},
          {describe_output(o, settings): r["robust_accuracy"]
           for o, r in ((square or {}).get("by_output") or {}).items()},
          victim_accuracy=victim_accuracy,
          square_clean_accuracy=None if square is None else square["clean_accuracy"],
          square_label="" if square is None else
          f"Square {square['norm']} eps {square['eps']:g}, {settings.square_queries} queries",
          title=header.split(" (")[0])
    artifacts = common.write_results(ctx.output_dir, RESULTS_STEM, payload, table, figure)
    common.report(ctx, table)
    return EvalResult(NAME, metrics, artifacts, table, details=payload)

  return evaluate


def read_results(path: str) -> dict[str, Any]:
  """The results.json of an extraction evaluation (a workdir, its extraction/, or the file)."""
  return common.read_results_json(path, SECTION, RESULTS_STEM)
