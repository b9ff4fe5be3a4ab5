"""Models looked up by name from a config, and the helpers around them.

`get_model(name, num_classes=..., mean=..., std=...)` returns an unbound Flax
module; `init_variables` initialises it; `make_logits_fn` turns module +
variables into the pure `logits_fn` that every attack, bound and smoothing
routine takes.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax import validation
from certjax.models import convnets, layers
from certjax.models.base import ImageClassifier
from certjax.models.mlp import MLP
from certjax.models.resnets import CifarResNet, PreActResNet, WideResNet
from certjax.types import LogitsFn, PRNGKey, Variables

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_widths(value: Any, name: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    value = (value,)
  try:
    widths = tuple(value)
  except TypeError:
    raise ValueError(
        f"{name} must be a sequence of positive integers, got {value!r}.") from None
  for w in widths:
    validation.check_int_at_least(w, f"each entry of {name}", 1)
  return tuple(int(w) for w in widths)


def _check_depth(depth: Any, name: str, offset: int, examples: str) -> int:
  depth = validation.check_int_at_least(depth, name, offset + 6)
  if (depth - offset) % 6:
    raise ValueError(
        f"{name} must be 6n+{offset} for an integer n >= 1 (e.g. {examples}); "
        f"got {depth}.")
  return depth


# One builder per name. Its keyword-only arguments (after `common`) are the
# options `get_model` accepts for that name, with their defaults.
def _mlp(common, *, hidden=(256, 256)):
  return MLP(**common, hidden=_check_widths(hidden, "hidden"))


def _ibp_small(common):
  return convnets.IBPConvNet(**common, convs=convnets.IBP_SMALL,
                             hidden=convnets.IBP_SMALL_DENSE)


def _ibp_medium(common):
  return convnets.IBPConvNet(**common, convs=convnets.IBP_MEDIUM,
                             hidden=convnets.IBP_MEDIUM_DENSE)


def _ibp_large(common, *, hidden=512):
  hidden = validation.check_int_at_least(hidden, "hidden", 1)
  return convnets.IBPConvNet(**common, convs=convnets.IBP_LARGE, hidden=(hidden,))


def _cnn7(common, *, width=64, linear_size=512):
  return convnets.CNN7(
      **common, width=validation.check_int_at_least(width, "width", 1),
      linear_size=validation.check_int_at_least(linear_size, "linear_size", 1))


def _cifar_resnet(depth):
  def build(common, *, width=16):
    return CifarResNet(**common, depth=depth,
                       width=validation.check_int_at_least(width, "width", 1))
  return build


def _preact_resnet18(common, *, width=64):
  return PreActResNet(**common, stage_sizes=(2, 2, 2, 2),
                      width=validation.check_int_at_least(width, "width", 1))


def _wide_resnet(default_depth):
  def build(common, *, depth=default_depth, widen_factor=10):
    return WideResNet(
        **common, depth=_check_depth(depth, "depth", 4, "16, 28, 34, 40"),
        widen_factor=validation.check_int_at_least(widen_factor, "widen_factor", 1))
  return build


_BUILDERS: dict[str, Callable[..., ImageClassifier]] = {
    "mlp": _mlp,
    "ibp_small": _ibp_small,
    "ibp_medium": _ibp_medium,
    "ibp_large": _ibp_large,
    "cnn7": _cnn7,
    "resnet20": _cifar_resnet(20),
    "resnet110": _cifar_resnet(110),
    "preact_resnet18": _preact_resnet18,
    "wrn28_10": _wide_resnet(28),
    "wrn34_10": _wide_resnet(34),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def model_options(name: str) -> dict[str, Any]:
  """The keyword options `get_model` accepts for `name`, with their defaults."""
  validation.check_choice(name, "model name", MODEL_NAMES)
  params = inspect.signature(_BUILDERS[name]).parameters.values()
  return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def _check_stats(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
  try:
    mean_t = tuple(float(m) for m in np.ravel(np.asarray(mean, dtype=np.float64)))
    std_t = tuple(float(s) for s in np.ravel(np.asarray(std, dtype=np.float64)))
  except (TypeError, ValueError):
    raise ValueError(
        f"mean and std must be sequences of numbers (one per channel); got "
        f"mean={mean!r}, std={std!r}.") from None
  if not mean_t or len(mean_t) != len(std_t):
    raise ValueError(
        f"mean and std must have one entry per image channel and the same "
        f"length; got {len(mean_t)} mean(s) and {len(std_t)} std(s).")
  if not all(math.isfinite(m) for m in mean_t):
    raise ValueError(f"mean must be finite, got {mean!r}.")
  validation.check_positive(np.asarray(std_t), "std")
  return mean_t, std_t


def _check_dtype(dtype: Any) -> Any:
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  validation.check_choice(name, "compute dtype", _COMPUTE_DTYPES)
  return jnp.dtype(name)


def get_model(name: str, *, num_classes: int, mean: Sequence[float],
              std: Sequence[float], dtype: Any = jnp.float32,
              conv_impl: str = "xla", **kwargs: Any) -> nn.Module:
  """Builds the model registered under `name`.

  Every model maps NHWC float images in [0, 1] to float32 logits
  `[B, num_classes]` with `model.apply(variables, x, train=False)`, and
  normalises its input itself (first layer: `(x - mean) / std`), so
  perturbation sizes stay in [0, 1] pixel space.

  Args:
    name: one of `MODEL_NAMES`.
    num_classes: number of logits.
    mean: per-channel data mean in [0, 1] pixel space; its length is the
      number of input channels the model accepts.
    std: per-channel data standard deviation (> 0).
    dtype: compute dtype, float32 (default), bfloat16 or float16. Parameters
      are always float32 and logits are returned as float32.
    conv_impl: 'xla' (`flax.linen.Conv`, the default) or 'im2col' (the same
      convolution, parameters and result, as one matrix product over stacked
      input slices; see `certjax.models.layers`). On XLA:CPU im2col makes the
      gradients of the small strided IBP CNNs about 1.5x faster and ResNets
      2-3x slower; on GPU/TPU keep 'xla'.
    **kwargs: options of that model; see `model_options(name)`:
      mlp: hidden=(256, 256); ibp_large: hidden=512; cnn7: width=64,
      linear_size=512; resnet20 / resnet110: width=16; preact_resnet18:
      width=64; wrn28_10 / wrn34_10: depth (28 / 34), widen_factor=10.

  Returns:
    An unbound `flax.linen.Module` with `__call__(x, train=False)`.

  Raises:
    ValueError: for an unknown name, an option the model does not accept, or
      a bad value (the message lists what is accepted).
  """
  validation.check_choice(name, "model name", MODEL_NAMES)
  accepted = model_options(name)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    if accepted:
      options = ", ".join(f"{k}={v!r}" for k, v in accepted.items())
      hint = f"Accepted options of {name!r} (with defaults): {options}."
    else:
      hint = f"Model {name!r} accepts no options."
    raise ValueError(
        f"Unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}. "
        + hint)
  num_classes = validation.check_int_at_least(num_classes, "num_classes", 1)
  mean_t, std_t = _check_stats(mean, std)
  validation.check_choice(conv_impl, "conv_impl", layers.CONV_IMPLS)
  common = dict(num_classes=num_classes, mean=mean_t, std=std_t,
                dtype=_check_dtype(dtype), conv_impl=conv_impl)
  return _BUILDERS[name](common, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(model: nn.Module, key: PRNGKey, input_shape: tuple[int, ...]):
  return model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)


def init_variables(model: nn.Module, key: PRNGKey | int,
                   input_shape: Sequence[int]) -> Variables:
  """Initialises `model` for inputs of `input_shape` under one jitted init.

  Args:
    model: a module from `get_model` (or any module with `__call__(x, train)`).
    key: a `jax.random.key` (or an int seed).
    input_shape: NHWC shape of an example batch, e.g. (1, 28, 28, 1); the
      batch size does not matter, height, width and channels do for models
      with Dense layers after flattening.

  Returns:
    The variables: {'params': ...} plus {'batch_stats': ...} for models with
    BatchNorm. Params are float32.
  """
  try:
    shape = tuple(int(d) for d in input_shape)
  except (TypeError, ValueError):
    shape = None
  if shape is None or len(shape) != 4 or min(shape) < 1:
    raise ValueError(
        f"input_shape must be an NHWC shape (B, H, W, C) of positive ints, "
        f"e.g. (1, 28, 28, 1); got {input_shape!r}.")
  channels = len(getattr(model, "mean", ())) or shape[-1]
  if shape[-1] != channels:
    raise ValueError(
        f"input_shape {shape} has {shape[-1]} channel(s) but the model was "
        f"built with {channels} (len(mean)).")
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  try:
    hash(model)
  except TypeError:  # e.g. a list-valued attribute: it cannot be a static arg
    init = jax.jit(functools.partial(model.init, train=False))
    return init(key, jnp.zeros(shape, jnp.float32))
  return _jitted_init(model, key, shape)


def make_logits_fn(model: nn.Module, variables: Variables) -> LogitsFn:
  """The pure `logits_fn` of a model: images in [0, 1] -> float32 logits.

  This is `functools.partial(model.apply, variables, train=False)`: BatchNorm
  uses its running averages and nothing is mutated, so the function is pure
  and works under `jit`, `vmap`, `grad` and sharding. It is the currency of
  certjax: attacks, bound propagation and randomized smoothing all take a
  `logits_fn` and never see a model class or its variables. (Bound
  propagation interprets its jaxpr, so it only meets dense/conv, relu,
  BatchNorm-as-affine, add, reshape and mean.)

  Args:
    model: a module from `get_model`.
    variables: its variables (from `init_variables` or a checkpoint).

  Returns:
    `logits_fn(x)` mapping a batch of NHWC images in [0, 1] to logits.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
        "variables must be the mapping returned by model.init / init_variables, "
        "with a 'params' collection (and 'batch_stats' for BatchNorm models); "
        f"got {type(variables).__name__}"
        + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        + ".")
  return functools.partial(model.apply, variables, train=False)


def make_stacked_logits(apply_fn: Any):
  """`logits(variables [K, ...], x [B, ...]) -> float32 [K, B, C]`, jitted.

  Every one of K models whose variables are stacked on a leading axis (the
  many-models trainer's) on the same batch, as one vmapped program.

  Args:
    apply_fn: a Flax `model.apply`.
  """
  return jax.jit(jax.vmap(lambda v, x: apply_fn(v, x, train=False).astype(jnp.float32),
                          in_axes=(0, None)))


def count_params(variables: Variables) -> int:
  """Number of scalars in the 'params' collection (not batch statistics).

  Works on concrete variables and on the `jax.ShapeDtypeStruct` tree of
  `jax.eval_shape(model.init, ...)`. A bare params tree (no 'params' key) is
  counted whole.
  """
  if isinstance(variables, Mapping) and "params" in variables:
    variables = variables["params"]
  return int(sum(math.prod(np.shape(leaf))
                 for leaf in jax.tree_util.tree_leaves(variables)))
