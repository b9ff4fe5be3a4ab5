"""Input checks shared by every public entry point.

Each check raises a `ValueError` (or `TypeError`) whose message names the
argument, what was wrong with it and what is accepted, so that a user never has
to read a traceback from deep inside XLA to learn that an image had the wrong
rank. Value checks (range, finiteness, label range) need concrete data: under
`jit`/`vmap` tracing they are skipped and only the static shape checks run,
which is why public functions call these before entering jitted code.

For traced values, the `checkify_*` functions emit the same value checks as
`jax.experimental.checkify` checks, with the same messages. They cost nothing
unless called, and a function that calls them must be run through
`checkify.checkify` (or `checked` below), which turns a failed check into an
error raised after the computation:

    run = jax.jit(lambda x: f(x, checked=True))  # f calls checkify_images(x)
    out = checked(run)(x)                        # raises ValueError on bad x
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any, Callable, Iterable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_Out = TypeVar("_Out")


def is_concrete(x: Any) -> bool:
  """True when `x` holds values (not a tracer under jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def closest(value: Any, choices: Iterable[Any]) -> str | None:
  """The accepted name a mistyped `value` most likely meant, or None.

  difflib's closest match (e.g. 'learnig_rate' -> 'learning_rate'), else the
  one accepted name that starts with or contains `value` ('eps' -> 'eps_list').
  """
  names = [str(c) for c in choices]
  close = difflib.get_close_matches(str(value), names, n=1)
  if close:
    return close[0]
  text = str(value)
  for matches in ([n for n in names if text and n.startswith(text)],
                  [n for n in names if text and text in n]):
    if len(matches) == 1:
      return matches[0]
  return None


def _suggest(value: str, choices: Iterable[str]) -> str:
  close = closest(value, choices)
  return f" Did you mean {close!r}?" if close else ""


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
  """Raises if `value` is not one of `choices`; returns it otherwise."""
  if value not in choices:
    accepted = ", ".join(repr(c) for c in choices)
    raise ValueError(
        f"Unknown {name} {value!r}. Accepted values: {accepted}."
        + _suggest(value, choices))
  return value


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> Any:
  """Raises unless `value` is a finite number > 0 (>= 0 with allow_zero)."""
  if is_concrete(value):
    v = np.asarray(value)
    bad = ~np.isfinite(v) | ((v < 0) if allow_zero else (v <= 0))
    if np.any(bad):
      raise ValueError(_positive_message(name, allow_zero).format(repr(value)))
  return value


def _positive_message(name: str, allow_zero: bool) -> str:
  bound = ">= 0" if allow_zero else "> 0"
  return f"{_escape(name)} must be a finite number {bound}, got {{}}."


def check_in_open_interval(value: float, name: str, low: float, high: float) -> float:
  """Raises unless low < value < high."""
  if not (isinstance(value, (int, float, np.floating, np.integer))
          and low < float(value) < high):
    raise ValueError(f"{name} must lie in the open interval ({low}, {high}), got {value!r}.")
  return value


def check_int_at_least(value: Any, name: str, minimum: int) -> int:
  """Raises unless `value` is an integer >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def check_images(x: Any, *, name: str = "x", ranks: Sequence[int] = (4,),
                 value_range: tuple[float, float] | None = (0.0, 1.0),
                 require_finite: bool = True) -> Any:
  """Checks a batch of images: rank, float dtype, finiteness and value range.

  NaN and Inf values get their own error (with their counts and the first
  example holding one), never a range error: the range applies to the finite
  values. Value checks need concrete `x`; for traced `x` see
  `checkify_images`.

  Args:
    x: the array to check.
    name: the argument's name, used in error messages.
    ranks: accepted ranks (4 for NHWC batches).
    value_range: closed interval the finite pixel values must lie in, or None
      to skip.
    require_finite: whether NaN/Inf values are an error.

  Returns:
    `x`, unchanged.

  Raises:
    ValueError: naming the problem and the accepted values.
  """
  shape = np.shape(x)
  if len(shape) not in ranks:
    expected = " or ".join(str(r) for r in ranks)
    layout = " (batch, height, width, channels)" if 4 in ranks else ""
    raise ValueError(
        f"{name} must have rank {expected}{layout}; got shape {tuple(shape)} "
        f"(rank {len(shape)}).")
  dtype = getattr(x, "dtype", np.asarray(x).dtype) if is_concrete(x) else x.dtype
  if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
    raise ValueError(
        f"{name} must be a floating-point array of pixels in [0, 1]; got dtype {dtype}. "
        "Convert uint8 images with x.astype(np.float32) / 255.")
  if not is_concrete(x):
    return x
  v = np.asarray(x, dtype=np.float32)
  finite = np.isfinite(v)
  all_finite = bool(np.all(finite))
  if require_finite and not all_finite:
    first = int(np.argmax(~finite.reshape(len(v), -1).all(axis=1))) if v.ndim else 0
    raise ValueError(_nonfinite_message(name, value_range).format(
        int(np.sum(np.isnan(v))), int(np.sum(np.isinf(v))), first))
  if value_range is not None and v.size:
    # Over the finite values only: a NaN has no place in a range, and with
    # require_finite=False non-finite values are allowed, not out of range.
    lo, hi = value_range
    finite_values = v if all_finite else v[finite]
    if finite_values.size:
      vmin, vmax = float(finite_values.min()), float(finite_values.max())
      if vmin < lo or vmax > hi:
        raise ValueError(_range_message(name, value_range).format(vmin, vmax))
  return x


def _escape(name: str) -> str:
  """`name` for use inside a format string."""
  return name.replace("{", "{{").replace("}", "}}")


def _nonfinite_message(name: str, value_range: tuple[float, float] | None) -> str:
  """Format string of the NaN/Inf error: args (NaN count, Inf count, first example)."""
  name = _escape(name)
  accepted = (f"finite pixel values in [{value_range[0]}, {value_range[1]}]"
              if value_range is not None else "finite")
  return (f"{name} contains {{}} NaN and {{}} Inf value(s) (the first in example {{}}); "
          f"images must be {accepted}.")


def _range_message(name: str, value_range: tuple[float, float]) -> str:
  """Format string of the range error: args (min, max) of the finite values."""
  name, (lo, hi) = _escape(name), value_range
  return (f"{name} must lie in [{lo}, {hi}] pixel space; got values in "
          "[{:.4g}, {:.4g}]. certjax models normalise inputs internally, "
          "so pass unnormalised images scaled to [0, 1].")


def check_labels(y: Any, *, num_classes: int | None = None, batch_size: int | None = None,
                 name: str = "y") -> Any:
  """Checks integer class labels: rank 1, integer dtype, range, batch size."""
  shape = np.shape(y)
  if len(shape) != 1:
    raise ValueError(f"{name} must be a rank-1 array of integer labels; got shape {tuple(shape)}.")
  if batch_size is not None and shape[0] != batch_size:
    raise ValueError(
        f"{name} has {shape[0]} labels but the batch has {batch_size} inputs; "
        "they must match.")
  dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
  if not jax.numpy.issubdtype(dtype, jax.numpy.integer):
    raise ValueError(f"{name} must hold integer class labels; got dtype {dtype}.")
  if num_classes is not None and is_concrete(y):
    v = np.asarray(y)
    if v.size and (v.min() < 0 or v.max() >= num_classes):
      raise ValueError(_labels_message(name, num_classes).format(int(v.min()), int(v.max())))
  return y


def _labels_message(name: str, num_classes: int) -> str:
  """Format string of the label-range error: args (min, max) of the labels."""
  name = _escape(name)
  return (f"{name} holds labels in [{{}}, {{}}] but must lie in [0, {num_classes - 1}] "
          f"for {num_classes} classes.")


def check_finite_scalar(value: Any, name: str) -> float:
  if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}.")
  return float(value)


# ----------------------------------------------------------------- traced checks
#
# The checks above read values with NumPy, which a tracer does not have. The
# functions below emit the same checks as `checkify.check`s on traced values
# (and do nothing for concrete ones, which the eager checks already saw). They
# are called only when a caller asks for checks (e.g. `checked=True`), so the
# unchecked program is unchanged and costs nothing extra.


def checkify_images(x: Any, *, name: str = "x",
                    value_range: tuple[float, float] | None = (0.0, 1.0),
                    require_finite: bool = True) -> None:
  """The value checks of `check_images` as `checkify` checks, for traced `x`.

  Checks finiteness (NaN and Inf counted separately, first bad example named)
  and the value range of the finite values, with the messages of
  `check_images`. Does nothing for concrete `x`: call `check_images` first,
  which checks it eagerly along with its shape and dtype.

  Args:
    x: the batch of images (rank >= 1, batch first), possibly traced.
    name: the argument's name, used in error messages.
    value_range: closed interval the pixel values must lie in, or None.
    require_finite: whether NaN/Inf values are an error.

  Raises:
    ValueError: at trace time if `x` is traced outside `checkify.checkify`
      (JAX cannot stage an unfunctionalized check).
  """
  if is_concrete(x):
    return
  finite = jnp.isfinite(x)
  if require_finite:
    flat = finite.reshape(x.shape[0], -1) if x.ndim else finite.reshape(1, 1)
    checkify.check(jnp.all(finite), _nonfinite_message(name, value_range),
                   jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x)),
                   jnp.argmax(~jnp.all(flat, axis=1)))
  if value_range is not None and x.size:
    lo, hi = value_range
    vmin = jnp.min(jnp.where(finite, x, jnp.inf)).astype(jnp.float32)
    vmax = jnp.max(jnp.where(finite, x, -jnp.inf)).astype(jnp.float32)
    checkify.check((vmin >= lo) & (vmax <= hi), _range_message(name, value_range),
                   vmin, vmax)


def checkify_labels(y: Any, *, num_classes: int, name: str = "y") -> None:
  """The label-range check of `check_labels` as a `checkify` check, for traced `y`.

  Does nothing for concrete `y` (`check_labels` checks it eagerly).
  """
  if is_concrete(y) or not np.size(y):
    return
  low, high = jnp.min(y), jnp.max(y)
  checkify.check((low >= 0) & (high < num_classes), _labels_message(name, num_classes),
                 low, high)


def checkify_positive(value: Any, name: str, *, allow_zero: bool = False) -> None:
  """The check of `check_positive` as a `checkify` check, for a traced value.

  Does nothing for a concrete value (`check_positive` checks it eagerly).
  """
  if is_concrete(value):
    return
  v = jnp.asarray(value)
  bad = ~jnp.isfinite(v) | ((v < 0) if allow_zero else (v <= 0))
  _check_elements(bad, v, _positive_message(name, allow_zero))


def checkify_in_open_interval(value: Any, name: str, low: float, high: float) -> None:
  """The check of `check_in_open_interval` as a `checkify` check, for a traced value."""
  if is_concrete(value):
    return
  v = jnp.asarray(value)
  _check_elements(~((v > low) & (v < high)), v,
                  f"{_escape(name)} must lie in the open interval ({low}, {high}), got {{}}.")


def _check_elements(bad: Any, v: Any, message: str) -> None:
  """One check that no element of `v` is `bad`, reporting the first bad one.

  `message` has one `{}` for the value; for an array (e.g. a per-example
  eps) the value is followed by its index.
  """
  first = jnp.argmax(bad.ravel())
  value = v.ravel()[first].astype(jnp.float32)
  if v.ndim:
    message = message.replace("{}", "{:.6g} (index {})", 1)
    checkify.check(~jnp.any(bad), message, value, first)
  else:
    checkify.check(~jnp.any(bad), message.replace("{}", "{:.6g}", 1), value)


def checked(fn: Callable[..., _Out]) -> Callable[..., _Out]:
  """Runs `fn` with its `checkify` checks, raising the first one that fails.

  `fn` is typically a jitted (or vmapped) function whose body asks for value
  checks, e.g. `jax.jit(lambda x, y: pgd(key, model, x, y, eps=eps,
  checked=True))`. The checks run inside the compiled program; after it
  finishes, a failed check raises a `ValueError`
  (`checkify.JaxRuntimeError`) whose message names the argument, the problem
  and the accepted values. Wrap the outermost transformation: `checked(jit(f))`
  or `checked(vmap(f))`, not `jit(checked(f))`, since the error can only be
  raised outside compiled code.

  Only the user checks (`checkify.user_checks`) are enabled, so no NaN or
  index checks are added to the rest of the program.

  `checked(jax.jit(f))` re-traces the (cheap) outer call each time but
  reuses the compiled program. A `jit` given options that only a top-level
  `jit` accepts (`compiler_options`) must go outside instead:
  `err, out = jax.jit(checkify.checkify(f), ...)(...)`, then `err.throw()`.

  Args:
    fn: the function to run; called with the wrapper's arguments.

  Returns:
    A function with the signature of `fn` returning its output.
  """
  checkified = checkify.checkify(fn, errors=checkify.user_checks)

  @functools.wraps(fn)
  def run(*args: Any, **kwargs: Any) -> _Out:
    error, out = checkified(*args, **kwargs)
    error.throw()
    return out

  return run
