"""Backdoor triggers as data, the label maps and the choice of poisoned examples.

A backdoor attack (Gu et al. 2017) adds a trigger to a small share of the
training images and relabels them; a model trained on them predicts the
attacker's label whenever the trigger is present. Here a trigger is a
`Trigger`, a pytree of arrays built once from the image shape (and a key), and
`apply_trigger(trigger, x)` is one pure function for every kind, so a trigger
can be passed into `jit`, mapped over with `vmap`, stacked and saved:

  name      paper                        kind   x' =
  badnets   Gu et al. 2017               blend  (1 - m) x + m p, m a 0/1 patch mask
  blended   Chen et al. 2017             blend  (1 - alpha) x + alpha p, p noise
  badnets   Turner et al. 2019, reduced  add    clip(x + m a (2p - 1), 0, 1)
    (amplitude a < 1, 'four_corners')
  wanet     Nguyen & Tran 2021           warp   bilinear resampling of x along a fixed
                                                smooth warping field

Images are NHWC float arrays in [0, 1] (convert uint8 with
`x.astype(np.float32) / 255`); a trigger is made for one image shape (H, W, C)
and `apply_trigger` takes any leading batch dimensions.

Poisoning a training set: `poison_indices` draws which examples get the
trigger, `target_labels` gives their new labels ('all_to_one': every poisoned
example -> `target`; 'all_to_all': y -> (y + 1) mod C, as BackdoorBench), and
`poison_examples` returns the triggered images and labels to write over the
originals.

Settings that shape the computation (image shape, patch size and location,
grid size, mode, counts) are static Python values checked when a trigger or a
selection is built; one-line `ValueError`s name the problem and the accepted
values.

References:
  Gu, Dolan-Gavitt, Garg. BadNets: Identifying Vulnerabilities in the Machine
    Learning Model Supply Chain. 2017.
  Chen, Liu, Li, Lu, Song. Targeted Backdoor Attacks on Deep Learning Systems
    Using Data Poisoning. 2017 (blended injection).
  Turner, Tsipras, Madry. Label-Consistent Backdoor Attacks. 2019 (the
    reduced-amplitude four-corner trigger).
  Nguyen, Tran. WaNet -- Imperceptible Warping-based Backdoor Attack. ICLR
    2021 (warping field, noise mode; reference code
    github.com/VinAIResearch/Warping-based_Backdoor_Attack-release).
  Wu, Chen, Zhang, Wei, Liu, Shen, Zha, Chen, Luo. BackdoorBench: A
    Comprehensive Benchmark of Backdoor Learning. NeurIPS 2022 Datasets and
    Benchmarks (poison-rate and label-map conventions).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_images, check_int_at_least, check_labels,
                                closest, is_concrete)

__all__ = [
    "KINDS", "LOCATIONS", "MODES", "PATTERNS", "TRIGGER_NAMES", "Trigger", "apply_trigger",
    "badnets", "blended", "check_trigger_fits", "make_trigger", "poison_examples",
    "poison_indices", "target_labels", "wanet", "wanet_noise_grid",
]

TRIGGER_NAMES = ("badnets", "blended", "wanet")
KINDS = ("blend", "add", "warp")
LOCATIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "four_corners")
PATTERNS = ("checkerboard", "white", "black", "random", "turner")
MODES = ("all_to_one", "all_to_all")

# Turner et al.'s 3x3 pattern (1 = white, 0 = black) at the left-hand corners,
# transcribed from their code (github.com/MadryLab/label-consistent-backdoor-code,
# as BackdoorBench's utils/bd_img_transform/lc.py keeps it).
_TURNER = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], np.float32)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["mask", "pattern", "grid"], meta_fields=["name", "kind"])
@dataclasses.dataclass(frozen=True, eq=False)
class Trigger:
  """A backdoor trigger: arrays as pytree leaves, its name and kind static.

  Not a NamedTuple: every field of a NamedTuple is a pytree child, so `name`
  and `kind` would be leaves, which `jit` rejects (strings are not arrays) and
  which `apply_trigger` could not branch on while tracing. Registered with
  `jax.tree_util.register_dataclass`, the arrays are leaves (traced by `jit`,
  mapped by `vmap`, stackable: a batch of per-example WaNet noise triggers is
  one `Trigger` with a leading axis) and `name`/`kind` live in the treedef,
  static and part of the compilation cache key.

  Attributes:
    name: the trigger's family, one of `TRIGGER_NAMES`.
    kind: how it is applied, one of `KINDS`:
      'blend': x' = (1 - mask) x + mask pattern (BadNets, Blended);
      'add': x' = clip(x + mask pattern, 0, 1), pattern in [-1, 1]
        (Turner et al.'s reduced-amplitude patch);
      'warp': x' = bilinear sampling of x at `grid` (WaNet).
    mask: (H, W, C) weights in [0, 1] ('blend', 'add'); None for 'warp'.
    pattern: (H, W, C) pattern ('blend': pixels in [0, 1]; 'add': signed
      perturbation in [-1, 1]); None for 'warp'.
    grid: (H, W, 2) sampling grid in normalised coordinates [-1, 1], (x, y) =
      (column, row) order as PyTorch's `grid_sample` with align_corners=True;
      None for 'blend' and 'add'.
  """
  name: str
  kind: str
  mask: Optional[Array] = None
  pattern: Optional[Array] = None
  grid: Optional[Array] = None


# ----------------------------------------------------------------------------
# Checks.


def _check_image_shape(image_shape: Any) -> Tuple[int, int, int]:
  try:
    shape = tuple(int(s) for s in image_shape)
    ok = len(shape) == 3 and all(s >= 1 for s in shape) and all(
        not isinstance(s, bool) and float(s) == int(s) for s in image_shape)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f"image_shape must be (height, width, channels) of positive integers; got "
        f"{image_shape!r}.")
  return shape


def _check_unit(value: Any, name: str, *, allow_zero: bool, meaning: str = "") -> float:
  interval = "[0, 1]" if allow_zero else "(0, 1]"
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value) and (0 <= value <= 1 if allow_zero else 0 < value <= 1))
  if not ok:
    raise ValueError(f"{name} must be a number in {interval}{meaning}; got {value!r}.")
  return float(value)


def check_rate(rate: Any, name: str = "rate", meaning: str = "") -> float:
  """Raises unless `rate` is a number in [0, 1]; returns it as a float."""
  return _check_unit(rate, name, allow_zero=True, meaning=meaning)


def _check_num_classes(num_classes: Any) -> int:
  return check_int_at_least(num_classes, "num_classes", 2)


def check_class(value: Any, name: str, num_classes: Optional[int]) -> int:
  """Raises unless `value` is an integer class in [0, num_classes - 1]."""
  if num_classes is None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative integer class; got {value!r}.")
  elif (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or not 0 <= value < num_classes):
    raise ValueError(
        f"{name} must be an integer class in [0, {num_classes - 1}] for num_classes="
        f"{num_classes}; got {value!r}.")
  return int(value)


def _trigger_extent(trigger: Trigger) -> Tuple[Tuple[int, ...], str]:
  """The image shape a trigger was made for ((H, W) for warps) and its wording."""
  if trigger.kind == "warp":
    shape = tuple(np.shape(trigger.grid)[-3:-1])
    return shape, f"{shape[0]}x{shape[1]}"
  shape = tuple(np.shape(trigger.mask)[-3:])
  return shape, f"{shape[0]}x{shape[1]}x{shape[2]}"


def check_trigger_fits(trigger: Trigger, image_shape: Sequence[int]) -> None:
  """Raises unless `trigger` was made for images of `image_shape`.

  Args:
    trigger: a `Trigger`.
    image_shape: (H, W, C), or the shape of a batch (..., H, W, C).

  Raises:
    ValueError: when the trigger is larger than the images or made for
      another size or number of channels (a warp trigger fits any channels).
  """
  if not isinstance(trigger, Trigger):
    raise ValueError(
        f"trigger must be a certjax.poisoning Trigger (from badnets, blended, wanet or "
        f"make_trigger); got {type(trigger).__name__}.")
  check_choice(trigger.kind, "trigger kind", KINDS)
  shape = tuple(image_shape)
  if len(shape) < 3:
    raise ValueError(
        f"image_shape must end in (height, width, channels); got {shape}.")
  height, width, channels = (int(s) for s in shape[-3:])
  made_for, words = _trigger_extent(trigger)
  if made_for[0] > height or made_for[1] > width:
    raise ValueError(
        f"The {trigger.name} trigger ({words}) is larger than the images "
        f"({height}x{width}x{channels}); build it for image_shape={(height, width, channels)}.")
  if made_for[:2] != (height, width) or (trigger.kind != "warp" and made_for[2] != channels):
    raise ValueError(
        f"The {trigger.name} trigger was made for {words} images, not "
        f"{height}x{width}x{channels}; build it for image_shape={(height, width, channels)}.")


# ----------------------------------------------------------------------------
# BadNets and Turner et al.'s four corners.


def _corner_origins(location: Any, size: int, height: int, width: int
                    ) -> Tuple[Tuple[int, int, bool], ...]:
  """(row, col, mirrored) of each patch's top-left pixel; mirrored patches are
  flipped left-right (Turner et al.'s right-hand corners)."""
  if isinstance(location, str):
    check_choice(location, "location", LOCATIONS)
    if size > height or size > width or (location == "four_corners"
                                         and 2 * size > min(height, width)):
      need = "2 * size" if location == "four_corners" else "size"
      raise ValueError(
          f"The badnets trigger is larger than the image: {need} must be <= min(H, W) = "
          f"{min(height, width)} for location={location!r}; got size={size}.")
    bottom, right = height - size, width - size
    corners = {"top_left": (0, 0, False), "top_right": (0, right, True),
               "bottom_left": (bottom, 0, False), "bottom_right": (bottom, right, True)}
    if location == "four_corners":
      return tuple(corners.values())
    # A single patch keeps its pattern as given.
    row, col, _ = corners[location]
    return ((row, col, False),)
  try:
    row, col = location
    valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (row, col))
  except (TypeError, ValueError):
    valid = False
  if not valid:
    accepted = ", ".join(repr(c) for c in LOCATIONS)
    raise ValueError(
        f"location must be one of {accepted} or a (row, col) pair of integers (the "
        f"patch's top-left pixel); got {location!r}.")
  if not (0 <= row <= height - size and 0 <= col <= width - size):
    raise ValueError(
        f"The badnets trigger (size {size}) at location {(int(row), int(col))} does not fit "
        f"{height}x{width} images: needs 0 <= row <= {height - size} and "
        f"0 <= col <= {width - size}.")
  return ((int(row), int(col), False),)


def _patch_pattern(pattern: Any, size: int, channels: int, key: Optional[PRNGKey]) -> Array:
  """The (size, size, channels) patch in [0, 1] named or given by `pattern`."""
  if isinstance(pattern, str):
    check_choice(pattern, "pattern", PATTERNS)
    if pattern == "random":
      if key is None:
        raise ValueError("pattern='random' needs a key (jax.random.key); got key=None.")
      return jax.random.uniform(key, (size, size, channels), jnp.float32)
    if pattern == "turner":
      if size != 3:
        raise ValueError(f"pattern='turner' is Turner et al.'s 3x3 pattern: size must be 3; "
                         f"got size={size}.")
      plane = _TURNER
    elif pattern == "checkerboard":
      plane = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32)
    else:
      plane = np.full((size, size), 1.0 if pattern == "white" else 0.0, np.float32)
    return jnp.asarray(np.repeat(plane[:, :, None], channels, axis=2))
  return _pattern_image(pattern, (size, size, channels), "badnets pattern array")


def _pattern_image(pattern: Any, shape: Tuple[int, int, int], what: str) -> Array:
  """A user's pattern array, checked and broadcast to `shape` (H, W, C).

  Accepted shapes: (H, W), (H, W, 1) and (H, W, C); concrete values must be
  finite pixels in [0, 1].
  """
  height, width, channels = shape
  if np.shape(pattern) not in ((height, width), (height, width, 1), tuple(shape)):
    raise ValueError(
        f"A {what} must have shape ({height}, {width}), ({height}, {width}, 1) or "
        f"({height}, {width}, {channels}); got {tuple(np.shape(pattern))}.")
  if is_concrete(pattern):
    values = np.asarray(pattern, np.float32)
    if not (np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1):
      raise ValueError(f"A {what} must hold finite pixel values in [0, 1].")
  image = jnp.asarray(pattern, jnp.float32).reshape(height, width, -1)
  return jnp.broadcast_to(image, tuple(shape))


def badnets(image_shape: Sequence[int], *, size: int = 3,
            location: Union[str, Tuple[int, int]] = "bottom_right",
            pattern: Union[str, ArrayLike, None] = None, key: Optional[PRNGKey] = None,
            amplitude: float = 1.0) -> Trigger:
  """A BadNets patch trigger (Gu et al. 2017) or Turner et al.'s reduced one.

  A size x size pattern is stamped at a corner, at all four corners
  ('four_corners', Turner et al. 2019: the trigger survives random crops and,
  the right-hand patches being mirror images of the left-hand ones, random
  horizontal flips) or at a given (row, col). With amplitude 1 the patch
  pixels are replaced by the pattern (kind 'blend' with a 0/1 mask, exact
  pixel values). With amplitude a < 1 the trigger is Turner et al.'s
  reduced-visibility version: each patch pixel moves by a (2p - 1), i.e. by
  +a towards white where the pattern is white and by -a where it is black,
  then clipped to [0, 1] (kind 'add'); a = 1 would give the full stamp.

  Args:
    image_shape: (H, W, C) of the images.
    size: the patch side in pixels.
    location: 'bottom_right' (default, BackdoorBench's), 'bottom_left',
      'top_right', 'top_left', 'four_corners', or (row, col) of the patch's
      top-left pixel.
    pattern: 'checkerboard' (pixel (i, j) white where i + j is even),
      'white', 'black', 'random' (uniform in [0, 1] per pixel and channel,
      from `key`), 'turner' (Turner et al.'s 3x3 pattern), or an array
      (size, size[, C]) in [0, 1]. Default: 'turner' for 'four_corners',
      else 'checkerboard'.
    key: a `jax.random.key`, needed for pattern='random' only.
    amplitude: in (0, 1]: 1 stamps the pattern; less is Turner et al.'s
      reduced amplitude (they use 16/255, 32/255 and 64/255 on CIFAR-10).

  Returns:
    The `Trigger` (name 'badnets').

  Raises:
    ValueError: on an unknown location or pattern, a patch that does not fit
      the image, or an amplitude outside (0, 1].
  """
  height, width, channels = _check_image_shape(image_shape)
  size = check_int_at_least(size, "size", 1)
  amplitude = _check_unit(amplitude, "amplitude", allow_zero=False,
                          meaning=" (1 stamps the pattern; less is Turner et al.'s reduction)")
  if pattern is None:
    pattern = "turner" if isinstance(location, str) and location == "four_corners" else (
        "checkerboard")
  origins = _corner_origins(location, size, height, width)
  patch = _patch_pattern(pattern, size, channels, key)
  mask = np.zeros((height, width, channels), np.float32)
  full = jnp.zeros((height, width, channels), jnp.float32)
  for row, col, mirrored in origins:
    mask[row:row + size, col:col + size] = 1.0
    full = full.at[row:row + size, col:col + size].set(patch[:, ::-1] if mirrored else patch)
  if amplitude == 1.0:
    return Trigger("badnets", "blend", mask=jnp.asarray(mask), pattern=full)
  return Trigger("badnets", "add", mask=jnp.asarray(mask) * amplitude,
                 pattern=jnp.asarray(mask) * (2.0 * full - 1.0))


# ----------------------------------------------------------------------------
# Blended.


def blended(image_shape: Sequence[int], *, key: Optional[PRNGKey], alpha: float = 0.1,
            pattern: Union[str, ArrayLike] = "noise") -> Trigger:
  """A blended-injection trigger (Chen et al. 2017): x' = (1 - alpha) x + alpha p.

  Args:
    image_shape: (H, W, C) of the images.
    key: a `jax.random.key` for the noise pattern (may be None with an array
      pattern).
    alpha: the blend ratio in (0, 1] (Chen et al. train with 0.2 and test with
      0.2 for noise patterns; BackdoorBench uses 0.2).
    pattern: 'noise' (uniform in [0, 1] per pixel and channel, Chen et al.'s
      random-pattern key) or an image (H, W), (H, W, 1) or (H, W, C) in
      [0, 1] (e.g. their Hello Kitty).

  Returns:
    The `Trigger` (name 'blended', kind 'blend', mask = alpha everywhere).

  Raises:
    ValueError: on alpha outside (0, 1], an unknown pattern name, a pattern
      of another shape, or a missing key for 'noise'.
  """
  height, width, channels = _check_image_shape(image_shape)
  alpha = _check_unit(alpha, "alpha", allow_zero=False, meaning=" (the blend ratio)")
  shape = (height, width, channels)
  if isinstance(pattern, str):
    check_choice(pattern, "pattern", ("noise",))
    if key is None:
      raise ValueError("blended with pattern='noise' needs a key (jax.random.key); got None.")
    image = jax.random.uniform(key, shape, jnp.float32)
  else:
    image = _pattern_image(pattern, shape, "blended pattern")
  return Trigger("blended", "blend", mask=jnp.full(shape, alpha, jnp.float32), pattern=image)


# ----------------------------------------------------------------------------
# WaNet.


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 (Keys' kernel
  with PyTorch's a = -0.75, as `F.interpolate(mode='bicubic')`)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(size_out: int, size_in: int) -> np.ndarray:
  """(size_out, size_in) matrix of PyTorch's bicubic resize with align_corners=True.

  Output pixel i samples the input at i (size_in - 1) / (size_out - 1); taps
  outside the input are clamped to its edge, as `upsample_bicubic2d` does.
  """
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  source = np.arange(size_out, dtype=np.float64) * scale
  base = np.floor(source).astype(np.int64)
  weights = _cubic_weights(source - base)
  matrix = np.zeros((size_out, size_in), np.float64)
  for tap in range(4):
    np.add.at(matrix, (np.arange(size_out), np.clip(base - 1 + tap, 0, size_in - 1)),
              weights[:, tap])
  return matrix


def _identity_grid(height: int, width: int) -> Array:
  cols = jnp.linspace(-1.0, 1.0, width, dtype=jnp.float32)
  rows = jnp.linspace(-1.0, 1.0, height, dtype=jnp.float32)
  return jnp.stack(jnp.broadcast_arrays(cols[None, :], rows[:, None]), axis=-1)


def wanet(image_shape: Sequence[int], *, key: PRNGKey, grid_size: int = 4,
          strength: float = 0.5, grid_rescale: float = 1.0) -> Trigger:
  """A WaNet warping trigger (Nguyen & Tran 2021), built as their reference code.

  A random k x k x 2 flow, uniform in [-1, 1], is divided by its mean
  absolute value, upsampled bicubically to H x W (align_corners=True,
  PyTorch's kernel a = -0.75), scaled by strength / H for the row and
  strength / W for the column component (the reference's s / H for the square
  images it supports), added to the identity grid, multiplied by
  `grid_rescale` and clipped to [-1, 1]. `apply_trigger` then samples the
  image bilinearly there (`grid_sample`, align_corners=True). With the paper's
  k = 4 and s = 0.5 pixels move by a fraction of a pixel: the trigger is
  nearly invisible.

  Args:
    image_shape: (H, W, C) of the images (H, W >= 2; the warp ignores C).
    key: a `jax.random.key`.
    grid_size: k, the side of the random control grid (4 in the paper).
    strength: s, the warping strength (0.5 in the paper; 0 is the identity).
    grid_rescale: the reference code's `grid_rescale` (1 by default).

  Returns:
    The `Trigger` (name 'wanet', kind 'warp').

  Raises:
    ValueError: on an image smaller than 2x2, a grid larger than the image,
      a negative strength or a non-positive grid_rescale.
  """
  height, width, _ = _check_image_shape(image_shape)
  if height < 2 or width < 2:
    raise ValueError(f"wanet needs images of at least 2x2 pixels; got {height}x{width}.")
  grid_size = check_int_at_least(grid_size, "grid_size", 1)
  if grid_size > min(height, width):
    raise ValueError(
        f"The wanet control grid ({grid_size}x{grid_size}) is larger than the image "
        f"({height}x{width}); grid_size must be <= {min(height, width)}.")
  if not (isinstance(strength, (int, float, np.integer, np.floating))
          and math.isfinite(strength) and strength >= 0):
    raise ValueError(f"strength must be a finite number >= 0 (0.5 in the paper); got "
                     f"{strength!r}.")
  if not (isinstance(grid_rescale, (int, float, np.integer, np.floating))
          and math.isfinite(grid_rescale) and grid_rescale > 0):
    raise ValueError(f"grid_rescale must be a finite number > 0; got {grid_rescale!r}.")
  noise = jax.random.uniform(key, (grid_size, grid_size, 2), jnp.float32, -1.0, 1.0)
  noise = noise / jnp.mean(jnp.abs(noise))
  rows = jnp.asarray(bicubic_matrix(height, grid_size), jnp.float32)
  cols = jnp.asarray(bicubic_matrix(width, grid_size), jnp.float32)
  flow = jnp.einsum("hk,klc,wl->hwc", rows, noise, cols)
  per_axis = jnp.asarray([strength / width, strength / height], jnp.float32)
  grid = (_identity_grid(height, width) + flow * per_axis) * grid_rescale
  return Trigger("wanet", "warp", grid=jnp.clip(grid, -1.0, 1.0))


def wanet_noise_grid(key: PRNGKey, trigger: Trigger) -> Trigger:
  """WaNet's noise mode: the trigger's grid with a fresh random perturbation.

  Nguyen & Tran train with "cross" (noise-mode) examples warped by the
  backdoor grid plus uniform noise in [-1, 1] / H (per axis here: / H for
  rows, / W for columns), clipped to [-1, 1], and keep their TRUE labels, so
  that the model learns the exact warp rather than any warp. One call draws
  one perturbed grid; draw one per example with `vmap` over keys and apply
  with `vmap` over (trigger, image):

    crosses = jax.vmap(wanet_noise_grid, (0, None))(keys, trigger)
    x_cross = jax.vmap(apply_trigger)(crosses, x)

  Args:
    key: a `jax.random.key`.
    trigger: a 'wanet' trigger.

  Returns:
    A warp `Trigger` with the same name, kind and shapes (so it can stand in
    for the original inside a compiled function).

  Raises:
    ValueError: when `trigger` is not a warp trigger.
  """
  if not isinstance(trigger, Trigger) or trigger.kind != "warp":
    raise ValueError("wanet_noise_grid needs a warp trigger (from wanet); got "
                     f"{getattr(trigger, 'kind', type(trigger).__name__)!r}.")
  height, width = np.shape(trigger.grid)[-3:-1]
  noise = jax.random.uniform(key, np.shape(trigger.grid), trigger.grid.dtype, -1.0, 1.0)
  scale = jnp.asarray([1.0 / width, 1.0 / height], trigger.grid.dtype)
  return Trigger(trigger.name, "warp", grid=jnp.clip(trigger.grid + noise * scale, -1.0, 1.0))


def _grid_sample(x: Array, grid: Array) -> Array:
  """Bilinear `grid_sample(x, grid, align_corners=True, padding_mode='zeros')`.

  x: (B, H, W, C); grid: (H, W, 2) of (x, y) in [-1, 1] (the same for every
  image). Corners outside the image contribute zero, as in PyTorch.
  """
  _, height, width, _ = x.shape
  col = (grid[..., 0] + 1.0) * 0.5 * (width - 1)
  row = (grid[..., 1] + 1.0) * 0.5 * (height - 1)
  col0, row0 = jnp.floor(col), jnp.floor(row)
  out = jnp.zeros(x.shape, x.dtype)
  for dr in (0, 1):
    for dc in (0, 1):
      r, c = row0 + dr, col0 + dc
      weight = (1.0 - jnp.abs(row - r)) * (1.0 - jnp.abs(col - c))
      inside = (r >= 0) & (r <= height - 1) & (c >= 0) & (c <= width - 1)
      ri = jnp.clip(r, 0, height - 1).astype(jnp.int32)
      ci = jnp.clip(c, 0, width - 1).astype(jnp.int32)
      weight = jnp.where(inside, weight, 0.0).astype(x.dtype)
      out = out + weight[None, :, :, None] * x[:, ri, ci, :]
  return out


# ----------------------------------------------------------------------------
# Applying a trigger, by name.


def apply_trigger(trigger: Trigger, x: ArrayLike) -> Array:
  """Adds `trigger` to images `x` of any leading batch shape.

  Args:
    trigger: a `Trigger` made for images of x's (H, W, C).
    x: images (..., H, W, C) in [0, 1], float.

  Returns:
    The triggered images, shaped and typed like `x`, in [0, 1]. Pure: works
    under `jit` (the trigger may be an argument), `vmap` (over images, or
    over images and a stacked trigger) and `grad`.

  Raises:
    ValueError: on a trigger made for another image shape, or images that
      are not float NHWC in [0, 1] (values checked on eager calls only).
  """
  ndim = np.ndim(x)
  check_images(x, ranks=(ndim,) if ndim >= 3 else (3, 4))
  check_trigger_fits(trigger, np.shape(x))
  return _apply(trigger, jnp.asarray(x))


@jax.jit
def _apply(trigger: Trigger, x: Array) -> Array:
  # Jitted so that eager calls run one compiled program (cached per kind and
  # shape: the trigger is an argument, not a constant), not a dozen small ones.
  if trigger.kind == "warp":
    flat = x.reshape((-1,) + x.shape[-3:])
    return _grid_sample(flat, trigger.grid.astype(x.dtype)).reshape(x.shape)
  mask, pattern = trigger.mask.astype(x.dtype), trigger.pattern.astype(x.dtype)
  if trigger.kind == "blend":
    return (1 - mask) * x + mask * pattern
  return jnp.clip(x + mask * pattern, 0, 1)


_BUILDERS = {"badnets": badnets, "blended": blended, "wanet": wanet}


def make_trigger(name: str, image_shape: Sequence[int], *, key: Optional[PRNGKey],
                 **settings: Any) -> Trigger:
  """The trigger `name` (one of `TRIGGER_NAMES`) for `image_shape`, with `settings`.

  Args:
    name: 'badnets', 'blended' or 'wanet'.
    image_shape: (H, W, C) of the images.
    key: a `jax.random.key` (may be None for a badnets trigger with a fixed
      pattern).
    **settings: the builder's keyword settings (e.g. size, location, pattern,
      amplitude for badnets; alpha, pattern for blended; grid_size, strength,
      grid_rescale for wanet).

  Returns:
    The `Trigger`.

  Raises:
    ValueError: on an unknown name or setting, or an invalid setting.
  """
  check_choice(name, "trigger name", TRIGGER_NAMES)
  builder = _BUILDERS[name]
  accepted = [p for p in inspect.signature(builder).parameters if p not in ("image_shape",
                                                                            "key")]
  for setting in settings:
    if setting not in accepted:
      close = closest(setting, accepted)
      hint = f" Did you mean {close!r}?" if close else ""
      raise ValueError(f"Unknown setting {setting!r} for trigger {name!r}. Accepted: "
                       f"{', '.join(accepted)}.{hint}")
  return builder(image_shape, key=key, **settings)


# ----------------------------------------------------------------------------
# Labels and the choice of poisoned examples.


def _check_mode_target(mode: str, target: Any, num_classes: Any) -> Tuple[int, Optional[int]]:
  check_choice(mode, "mode", MODES)
  num_classes = _check_num_classes(num_classes)
  if target is None:
    if mode == "all_to_one":
      raise ValueError("mode='all_to_one' needs a target class; got target=None.")
    return num_classes, None
  return num_classes, check_class(target, "target", num_classes)


def target_labels(labels: ArrayLike, mode: str, *, target: Optional[int] = None,
                  num_classes: int) -> Array:
  """The backdoor's label map: the label each poisoned example is given.

  Args:
    labels: the examples' true labels (N,), integers in [0, num_classes).
    mode: 'all_to_one' (every example -> target) or 'all_to_all'
      (y -> (y + 1) mod num_classes, as BackdoorBench).
    target: the target class (needed for 'all_to_one'; ignored otherwise,
      but checked when given).
    num_classes: the number of classes C.

  Returns:
    int32 labels (N,). Pure: works under `jit` with static mode, target and
    num_classes.

  Raises:
    ValueError: on an unknown mode, a target outside [0, C - 1] or labels
      outside [0, C) (checked on concrete labels).
  """
  num_classes, target = _check_mode_target(mode, target, num_classes)
  check_labels(labels, num_classes=num_classes, name="labels")
  labels = jnp.asarray(labels, jnp.int32)
  if mode == "all_to_one":
    return jnp.full(labels.shape, target, jnp.int32)
  return (labels + 1) % num_classes


@functools.partial(jax.jit, static_argnums=2)
def choose(key: PRNGKey, eligible: Array, count: int) -> Array:
  """`count` indices drawn uniformly without replacement where `eligible`, sorted.

  Every eligible index gets an independent uniform score and the `count`
  smallest are kept: a uniformly random subset, with a static `count`, so it
  runs under `jit`. If fewer than `count` are eligible, ineligible indices
  fill the rest (callers check counts on concrete data first).
  """
  scores = jax.random.uniform(key, eligible.shape)
  scores = jnp.where(eligible, scores, 2.0)
  return jnp.sort(jnp.argsort(scores)[:count]).astype(jnp.int32)


def poison_indices(key: PRNGKey, labels: ArrayLike, *, rate: float, mode: str,
                   target: Optional[int] = None, num_classes: int) -> Array:
  """Which training examples get the trigger (BackdoorBench's convention).

  round(rate * N) of the N examples (Python's `round`: halves to even), drawn
  uniformly without replacement; for 'all_to_one' from the examples NOT of
  the target class only (relabelling a target-class example to the target
  would poison nothing).

  Args:
    key: a `jax.random.key`.
    labels: the training labels (N,).
    rate: the poisoning rate in [0, 1], a share of the whole training set.
    mode: 'all_to_one' or 'all_to_all'.
    target: the target class (needed for 'all_to_one').
    num_classes: the number of classes C.

  Returns:
    Sorted int32 indices, round(rate * N) of them. Runs under `jit` (the
    count depends only on N); whether enough non-target examples exist is
    checked on concrete labels only.

  Raises:
    ValueError: on rate outside [0, 1], an unknown mode, a target outside
      [0, C - 1], or (concrete labels) fewer eligible examples than asked for.
  """
  rate = check_rate(rate, meaning=" (the share of the training set poisoned)")
  num_classes, target = _check_mode_target(mode, target, num_classes)
  check_labels(labels, num_classes=num_classes, name="labels")
  labels = jnp.asarray(labels)
  count = round(rate * labels.shape[0])
  eligible = (labels != target) if mode == "all_to_one" else jnp.ones(labels.shape, bool)
  if is_concrete(labels):
    available = int(np.sum(np.asarray(eligible)))
    if available < count:
      raise ValueError(
          f"rate={rate} asks for {count} poisoned examples but only {available} are not of "
          f"the target class {target}; use rate <= {available / labels.shape[0]:.4g}.")
  return choose(key, eligible, count)


def poison_examples(trigger: Trigger, images: ArrayLike, labels: ArrayLike,
                    indices: ArrayLike, *, mode: str, target: Optional[int] = None,
                    num_classes: int) -> Tuple[Array, Array]:
  """The poisoned copies of `images[indices]`: the trigger added, the labels mapped.

  Write them over the originals (`images.at[indices].set(...)`) to build the
  poisoned training set; at test time, `apply_trigger` on clean test images
  and `target_labels` give the attack-success set.

  Args:
    trigger: a `Trigger` for the images' shape.
    images: the training images (N, H, W, C) in [0, 1].
    labels: the training labels (N,).
    indices: which examples to poison (e.g. from `poison_indices`).
    mode: 'all_to_one' or 'all_to_all'.
    target: the target class (needed for 'all_to_one').
    num_classes: the number of classes C.

  Returns:
    (poisoned images (len(indices), H, W, C), new int32 labels (len(indices),)).

  Raises:
    ValueError: as `apply_trigger` and `target_labels`.
  """
  check_images(images, name="images")
  indices = jnp.asarray(indices)
  if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be a rank-1 integer array; got shape {indices.shape} "
                     f"and dtype {indices.dtype}.")
  new_labels = target_labels(jnp.asarray(labels)[indices], mode, target=target,
                             num_classes=num_classes)
  return apply_trigger(trigger, jnp.asarray(images)[indices]), new_labels
