"""Input-transformation defences and what an adaptive attacker needs against them.

The defences Athalye, Carlini & Wagner (2018) broke, and the papers that
proposed them, as transformations `(key, x) -> x'` of a batch of NHWC float
images in [0, 1] placed in front of a `logits_fn`:

  name                 defence                                     randomized  gradient as written
  identity             none (a baseline)                           no          exact
  jpeg                 JPEG compression, the real codec (Pillow)   no          zero (shattered)
  jpeg_differentiable  JPEG in JAX, rounding made differentiable   no          useful
  bit_depth            bit-depth reduction (feature squeezing)     no          zero (shattered)
  median               median smoothing (feature squeezing)        no          sparse
  tvm                  pixel dropout + total-variation minimisation  yes       through the solver
  resize_pad           random resize and zero padding              yes         exact
  thermometer          thermometer encoding (C -> C * levels)      no          zero (shattered)

Each is an `InputTransform`: `forward` is the defence as deployed,
`approximation` the differentiable stand-in BPDA uses on the backward pass
(Athalye et al., section 4.1: the identity for transformations with
f(x) ~ x, the soft thermometer for thermometer encoding), `randomized` says
whether `forward` depends on its key (and so needs EOT). `get_transform`
builds one by name with checked settings; `compose` chains them;
`defended_logits_fn` puts one in front of a model, "as written", so that a
naive attacker sees exactly the (absent) gradients the defence's authors
saw. `certjax.defences.bpda` turns a transform into the adaptive attacker's
model: forward values, approximation's gradients.

Every transform is also a public function with explicit settings (`jpeg`,
`jpeg_differentiable`, `bit_depth`, `median_filter`, `tv_minimization`,
`random_resize_pad`, `thermometer_encode`, `soft_thermometer`). Settings that
shape the computation (quality, bits, size, levels, steps) are static Python
values, checked when the transform is built; images are checked (rank, float
dtype and, when concrete, finite values in [0, 1]) when a public function is
called. All run under `jit`, `vmap` and `grad`; the exact JPEG codec runs on
the host through `jax.pure_callback`.

References:
  Athalye, Carlini, Wagner. Obfuscated Gradients Give a False Sense of
    Security: Circumventing Defenses to Adversarial Examples. ICML 2018.
  Guo, Rana, Cisse, van der Maaten. Countering Adversarial Images using Input
    Transformations. ICLR 2018 (JPEG, total-variance minimisation).
  Dziugaite, Ghahramani, Roy. A study of the effect of JPG compression on
    adversarial images. 2016.
  Shin, Song. JPEG-resistant Adversarial Images. NeurIPS 2017 Workshop on
    Machine Learning and Computer Security (differentiable JPEG).
  Xu, Evans, Qi. Feature Squeezing: Detecting Adversarial Examples in Deep
    Neural Networks. NDSS 2018 (bit depth, median smoothing).
  Xie, Wang, Zhang, Ren, Yuille. Mitigating Adversarial Effects Through
    Randomization. ICLR 2018 (random resize and pad).
  Buckman, Roy, Raffel, Goodfellow. Thermometer Encoding: One Hot Way To Resist
    Adversarial Examples. ICLR 2018.
  Chambolle, Pock. A first-order primal-dual algorithm for convex problems with
    applications to imaging. J. Math. Imaging Vis. 2011 (the TVM solver).
  Wallace. The JPEG still picture compression standard. IEEE Trans. Consumer
    Electronics 1992; ITU-T T.81 Annex K (quantisation tables).
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_images, check_int_at_least,
                                check_positive, closest)

__all__ = [
    "DEFAULT_SETTINGS", "InputTransform", "JPEG_APPROXIMATIONS", "RESIZE_METHODS",
    "TRANSFORM_NAMES", "bit_depth", "compose", "defended_logits_fn", "get_transform",
    "identity", "jpeg", "jpeg_differentiable", "jpeg_quantization_tables", "median_filter",
    "random_resize_pad", "soft_thermometer", "thermometer_encode", "total_variation",
    "tv_minimization",
]

TRANSFORM_NAMES = ("identity", "jpeg", "jpeg_differentiable", "bit_depth", "median", "tvm",
                   "resize_pad", "thermometer")
RESIZE_METHODS = ("nearest", "bilinear")
JPEG_APPROXIMATIONS = ("identity", "differentiable")
# Xie et al. resize 299x299 inputs to r in [299, 331) and pad to 331x331: the
# image keeps at least 299/331 of the side, the default ratio of `resize_pad`.
XIE_MIN_SIZE_RATIO = 299 / 331


class InputTransform(NamedTuple):
  """An input-transformation defence and what an adaptive attacker needs.

  Attributes:
    name: the transform's name (`TRANSFORM_NAMES`, or 'a+b' for a composition).
    forward: the defence as deployed, `(key, x) -> x'`.
    approximation: a differentiable stand-in `(key, x) -> x'` with
      approximation(x) ~ forward(x), for BPDA's backward pass.
    randomized: whether `forward` depends on `key` (an attacker needs EOT).
    output_channels_factor: x' has this many times the channels of x
      (thermometer encoding: `levels`).
  """
  name: str
  forward: Callable[[PRNGKey, Array], Array]
  approximation: Callable[[PRNGKey, Array], Array]
  randomized: bool
  output_channels_factor: int = 1


# ----------------------------------------------------------------------------
# Checks.


def _check_int_in_range(value: Any, name: str, low: int, high: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or not low <= value <= high):
    raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}.")
  return int(value)


def _check_quality(quality: Any) -> int:
  return _check_int_in_range(quality, "quality", 1, 100)


def _check_jpeg_channels(x: Any, name: str) -> None:
  channels = np.shape(x)[-1]
  if channels not in (1, 3):
    raise ValueError(
        f"{name} encodes grayscale (1 channel) or RGB (3 channels) images; got "
        f"{channels} channels (shape {tuple(np.shape(x))}).")


def _check_drop_probability(value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not 0 <= value < 1):
    raise ValueError(f"drop_probability must be a number in [0, 1), got {value!r}.")
  return float(value)


def _images(x: ArrayLike) -> Array:
  """`x` checked as a batch of NHWC float images in [0, 1], as a JAX array."""
  check_images(x)
  return jnp.asarray(x)


# ----------------------------------------------------------------------------
# Identity, bit depth, median.


def identity(key: PRNGKey, x: ArrayLike) -> Array:
  """No defence: returns `x` (the key is ignored)."""
  del key
  return jnp.asarray(x)


def bit_depth(x: ArrayLike, bits: int) -> Array:
  """Bit-depth reduction of Xu et al.: round(x * (2^bits - 1)) / (2^bits - 1).

  Its gradient as written is zero almost everywhere (rounding); BPDA uses
  the identity in its place.

  Args:
    x: NHWC images in [0, 1].
    bits: bits kept per channel, an integer >= 1 (Xu et al.: 1 for MNIST, 5
      for CIFAR-10, 4 for ImageNet).

  Returns:
    The squeezed images, shaped and typed like `x`.
  """
  bits = check_int_at_least(bits, "bits", 1)
  x = _images(x)
  top = 2.0 ** bits - 1
  return jnp.round(x * top) / top


def median_filter(x: ArrayLike, size: int) -> Array:
  """Median smoothing of Xu et al.: a size x size median filter per channel.

  Matches `scipy.ndimage.median_filter(x, size=(1, size, size, 1),
  mode='reflect')`: reflect (half-sample symmetric) padding, and for even
  sizes the window [i - size // 2, i + size - 1 - size // 2] and the upper of
  the two middle values (scipy's rank size**2 // 2), which is what Xu et
  al.'s 2x2 filter computes.

  Args:
    x: NHWC images in [0, 1].
    size: the window's side, an integer >= 1 (Xu et al. use 2 and 3).

  Returns:
    The filtered images, shaped and typed like `x`.
  """
  size = check_int_at_least(size, "size", 1)
  return _median_filter(_images(x), size)


# Up to this window side the median comes from a sorting network (below);
# beyond it from jnp.sort, whose compiled program does not grow with the window.
_NETWORK_MAX_SIZE = 5


@functools.partial(jax.jit, static_argnums=1)
def _median_filter(x: Array, size: int) -> Array:
  before, after = size // 2, size - 1 - size // 2
  # numpy's 'symmetric' (edge pixel repeated) is scipy's 'reflect'.
  padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), mode="symmetric")
  height, width = x.shape[1:3]
  windows = [padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)]
  rank = (size * size) // 2
  if size > _NETWORK_MAX_SIZE:
    return jnp.sort(jnp.stack(windows, axis=-1), axis=-1)[..., rank]
  # Odd-even transposition sort of the window as elementwise min/max: XLA
  # fuses it into one loop over the pixels and drops the exchanges the
  # median does not depend on. On XLA:CPU this is about 100 times faster
  # than jnp.sort over a stacked window axis (256 MNIST digits, 2x2 to 5x5).
  values = list(windows)
  for round_ in range(len(values)):
    for i in range(round_ % 2, len(values) - 1, 2):
      low, high = values[i], values[i + 1]
      values[i], values[i + 1] = jnp.minimum(low, high), jnp.maximum(low, high)
  return values[rank]


# ----------------------------------------------------------------------------
# JPEG: the real codec, and a differentiable JAX version.


def _pillow_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip of every image in `images` (..., H, W, C) with Pillow."""
  import PIL.Image  # pylint: disable=g-import-not-at-top

  images = np.asarray(images, np.float32)
  flat = images.reshape((-1,) + images.shape[-3:])
  out = np.empty(flat.shape, np.float32)
  for i, image in enumerate(flat):
    # The codec takes bytes: a pixel is round(255 x), and NaN has no byte.
    pixels = np.clip(np.round(np.nan_to_num(image) * 255), 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 1:
      pixels = pixels[..., 0]  # Pillow's mode 'L'
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as decoded:
      out[i] = np.asarray(decoded, np.float32).reshape(image.shape) / 255
  return out.reshape(images.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _jpeg_codec(x: Array, quality: int) -> Array:
  # One host call for the whole batch; under vmap ('broadcast_all') still one
  # call, with the vmapped axes in front, which _pillow_jpeg flattens.
  return jax.pure_callback(functools.partial(_pillow_jpeg, quality=quality),
                           jax.ShapeDtypeStruct(x.shape, jnp.float32), x.astype(jnp.float32),
                           vmap_method="broadcast_all")


@_jpeg_codec.defjvp
def _jpeg_codec_jvp(quality, primals, tangents):
  # A codec has no derivative: its output is a step function of its input
  # (quantised coefficients, bytes). The honest "gradient as written" is
  # zero, which is what a naive attacker differentiating through the defence
  # gets: Athalye et al.'s shattered gradients. BPDA replaces it.
  del tangents
  out = _jpeg_codec(primals[0], quality)
  return out, jnp.zeros_like(out)


def jpeg(x: ArrayLike, quality: int) -> Array:
  """JPEG compression and decompression with the real codec (Pillow / libjpeg).

  The defence of Dziugaite et al. and Guo et al.: each image is converted to
  bytes (round(255 x)), saved as a JPEG with Pillow at `quality` (Pillow's
  defaults otherwise, so 4:2:0 chroma subsampling for RGB), decoded and
  scaled back to [0, 1]. It runs on the host through `jax.pure_callback`, one
  call per batch, and works under `jit` and `vmap`. Its derivative is zero
  (see `jpeg_differentiable` and BPDA for useful gradients).

  Args:
    x: NHWC images in [0, 1] with 1 (grayscale, Pillow mode 'L') or 3 (RGB)
      channels.
    quality: JPEG quality, an integer in [1, 100] (Guo et al.: 75).

  Returns:
    The decoded images, float32, values k / 255.
  """
  quality = _check_quality(quality)
  x = _images(x)
  _check_jpeg_channels(x, "jpeg")
  return _jpeg_codec(x, quality)


# ITU-T T.81 Annex K, natural (row-major) order, as libjpeg's jcparam.c.
_LUMINANCE_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99]], np.float64)
_CHROMINANCE_TABLE = np.full((8, 8), 99.0)
_CHROMINANCE_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99],
                              [47, 66, 99, 99]]


def jpeg_quantization_tables(quality: int) -> np.ndarray:
  """The (luminance, chrominance) 8x8 quantisation tables libjpeg uses at `quality`.

  libjpeg's `jpeg_quality_scaling`: scale = 5000 / q below 50, 200 - 2 q
  from 50; entries (base * scale + 50) // 100 clamped to [1, 255] (baseline).

  Returns:
    float32 array of shape (2, 8, 8).
  """
  quality = _check_quality(quality)
  scale = 5000 // quality if quality < 50 else 200 - 2 * quality
  tables = np.stack([_LUMINANCE_TABLE, _CHROMINANCE_TABLE])
  return np.clip((tables * scale + 50) // 100, 1, 255).astype(np.float32)


def _dct_matrix() -> np.ndarray:
  """Orthonormal 8-point DCT-II: the JPEG FDCT is D B D^T per 8x8 block."""
  u = np.arange(8)[:, None]
  n = np.arange(8)[None, :]
  matrix = np.sqrt(2 / 8) * np.cos((2 * n + 1) * u * np.pi / 16)
  matrix[0] /= np.sqrt(2)
  return matrix.astype(np.float32)


def _soft_round(x: Array) -> Array:
  """Shin & Song's rounding: the value of round(x) up to a cubic, gradient 3 (x - round x)^2."""
  rounded = jnp.round(x)
  return rounded + (x - rounded) ** 3


# JFIF (ITU-T T.871) colour conversion, as libjpeg: offsets of 128 on Cb, Cr.
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                          [-0.168735892, -0.331264108, 0.5],
                          [0.5, -0.418687589, -0.081312411]], np.float32)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402],
                          [1.0, -0.344136286, -0.714136286],
                          [1.0, 1.772, 0.0]], np.float32)


def jpeg_differentiable(x: ArrayLike, quality: int) -> Array:
  """JPEG compression written in JAX with differentiable rounding (Shin & Song).

  The codec's pipeline: pixels 255 x; RGB -> YCbCr (JFIF) for 3 channels;
  level shift by -128; padding to multiples of 8 by edge replication (as
  libjpeg pads); 8x8 DCT-II as a matrix product; division by libjpeg's
  quality-scaled Annex K tables (luminance for Y and grayscale,
  chrominance for Cb and Cr); rounding; the inverse of each step; a clip
  to [0, 1]. Rounding is replaced by round(t) + (t - round(t))^3, equal to
  it up to a cubic and with gradient 3 (t - round t)^2 instead of zero.
  Unlike Pillow's encoder, chroma is NOT subsampled (4:4:4), and neither the
  input nor the output is rounded to bytes (their rounding would zero the
  gradient at byte-valued images). Measured against Pillow at quality 75
  (tests/defences/test_transforms.py): a mean absolute difference of 0.0017
  (0.43 / 255; max 0.056) on 64 MNIST digits, where the codec itself moves
  them by 0.0095, and of 0.0041 on smooth RGB images against Pillow's
  4:4:4 (unsubsampled) encoding.

  Args:
    x: NHWC images in [0, 1] with 1 or 3 channels.
    quality: JPEG quality, an integer in [1, 100].

  Returns:
    The images after the approximate JPEG round trip, shaped and typed like `x`.
  """
  quality = _check_quality(quality)
  x = _images(x)
  _check_jpeg_channels(x, "jpeg_differentiable")
  return _jpeg_differentiable(x, quality)


@functools.partial(jax.jit, static_argnums=1)
def _jpeg_differentiable(x: Array, quality: int) -> Array:
  batch, height, width, channels = x.shape
  pixels = x * 255
  if channels == 3:
    pixels = pixels @ jnp.asarray(_RGB_TO_YCBCR.T, x.dtype) + jnp.asarray([0, 128, 128], x.dtype)
  pad_h, pad_w = -height % 8, -width % 8
  padded = jnp.pad(pixels - 128, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  rows, cols = (height + pad_h) // 8, (width + pad_w) // 8
  blocks = padded.reshape(batch, rows, 8, cols, 8, channels)
  dct = jnp.asarray(_dct_matrix(), x.dtype)
  # Blocks (n, r, i, s, j, c): block (r, s), pixel (i, j) inside it.
  coefficients = jnp.einsum("ui,nrisjc,vj->nrusvc", dct, blocks, dct)
  tables = jpeg_quantization_tables(quality)
  per_channel = [0, 1, 1] if channels == 3 else [0]  # Y, Cb, Cr or grayscale
  table = jnp.asarray(np.stack([tables[t] for t in per_channel], axis=-1), x.dtype)
  table = table.reshape(1, 1, 8, 1, 8, channels)
  quantized = _soft_round(coefficients / table) * table
  restored = jnp.einsum("ui,nrusvc,vj->nrisjc", dct, quantized, dct)
  restored = restored.reshape(batch, rows * 8, cols * 8, channels)[:, :height, :width] + 128
  if channels == 3:
    restored = (restored - jnp.asarray([0, 128, 128], x.dtype)) @ jnp.asarray(
        _YCBCR_TO_RGB.T, x.dtype)
  return jnp.clip(restored / 255, 0, 1).astype(x.dtype)


# ----------------------------------------------------------------------------
# Total-variance minimisation.


def total_variation(x: ArrayLike) -> Array:
  """Anisotropic total variation per image: sum of |vertical| and |horizontal| differences.

  Returns:
    Shape (batch,).
  """
  x = jnp.asarray(x)
  vertical = jnp.abs(jnp.diff(x, axis=1)).sum(axis=(1, 2, 3))
  horizontal = jnp.abs(jnp.diff(x, axis=2)).sum(axis=(1, 2, 3))
  return vertical + horizontal


def _gradient(z: Array):
  """Forward differences, zero across the last row / column (Neumann boundary)."""
  return (jnp.diff(z, axis=1, append=z[:, -1:]), jnp.diff(z, axis=2, append=z[:, :, -1:]))


def _divergence(p_vertical: Array, p_horizontal: Array) -> Array:
  """Minus the adjoint of `_gradient` (its last row / column of p are always zero)."""
  shift_v = jnp.pad(p_vertical, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
  shift_h = jnp.pad(p_horizontal, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]
  return (p_vertical - shift_v) + (p_horizontal - shift_h)


def tv_minimization(key: PRNGKey, x: ArrayLike, *, drop_probability: float, weight: float,
                    num_steps: int) -> Array:
  """Total-variance minimisation of Guo et al.: pixel dropout, then TV reconstruction.

  A Bernoulli mask keeps each pixel (all its channels) with probability
  1 - drop_probability, independently per example; the reconstruction is

    z = argmin_{z in [0, 1]}  ||(z - x) * mask||_2^2 + weight * TV(z),

  TV the anisotropic total variation per channel (Guo et al.'s TV_p with
  p = 1). Guo et al. solve it with a split Bregman method; here
  `num_steps` iterations of Chambolle and Pock's primal-dual algorithm
  (step sizes tau = sigma = 1 / sqrt(8), since ||grad||^2 <= 8; the
  data term and box constraint are separable, so their proximal step is a
  closed-form per-pixel update followed by a clip), started from the masked
  image (dropped pixels at 0) in a `lax.fori_loop`. Unlike gradient descent
  on a smoothed TV, it handles the non-smooth TV exactly and needs no step
  size tuning. The output is differentiable by unrolling the loop, but
  Athalye et al. attack it with BPDA (identity) and EOT over the mask.

  Args:
    key: a `jax.random.key` drawing the dropout mask.
    x: NHWC images in [0, 1].
    drop_probability: probability of dropping a pixel, in [0, 1).
    weight: the TV weight, >= 0 (larger: smoother).
    num_steps: primal-dual iterations, an integer >= 1.

  Returns:
    The reconstructed images in [0, 1], shaped and typed like `x`.
  """
  drop_probability = _check_drop_probability(drop_probability)
  check_positive(weight, "weight", allow_zero=True)
  num_steps = check_int_at_least(num_steps, "num_steps", 1)
  return _tv_minimization(key, _images(x), drop_probability, weight, num_steps)


# Probability and weight traced: one compiled program serves every setting.
@functools.partial(jax.jit, static_argnums=4)
def _tv_minimization(key: PRNGKey, x: Array, drop_probability: Any, weight: Any,
                     num_steps: int) -> Array:
  keep = jax.random.bernoulli(key, 1 - drop_probability, x.shape[:3] + (1,)).astype(x.dtype)
  step = 1 / math.sqrt(8.0)  # tau = sigma; tau * sigma * ||grad||^2 <= 1
  data = 2 * step * keep  # of the proximal step of ||(z - x) * mask||^2

  def body(_, state):
    z, z_bar, p_vertical, p_horizontal = state
    g_vertical, g_horizontal = _gradient(z_bar)
    # Dual ascent, projected onto the l-inf ball of radius `weight` (the
    # conjugate of weight * |.|_1).
    p_vertical = jnp.clip(p_vertical + step * g_vertical, -weight, weight)
    p_horizontal = jnp.clip(p_horizontal + step * g_horizontal, -weight, weight)
    v = z + step * _divergence(p_vertical, p_horizontal)
    z_next = jnp.clip((v + data * x) / (1 + data), 0, 1)
    return z_next, 2 * z_next - z, p_vertical, p_horizontal

  z0 = x * keep
  zeros = jnp.zeros_like(x)
  z, _, _, _ = lax.fori_loop(0, num_steps, body, (z0, z0, zeros, zeros))
  return z


# ----------------------------------------------------------------------------
# Random resize and pad.


def random_resize_pad(key: PRNGKey, x: ArrayLike, *, min_size: int,
                      method: str = "nearest") -> Array:
  """Random resizing and padding of Xie et al., at a fixed output shape.

  Per example, a side r is drawn uniformly from the integers in
  [min_size, H], the image is resized to r x round(r W / H) (r x r for
  square images) and placed at a uniformly random integer offset in an
  H x W canvas of zeros. Xie et al. enlarge 299x299 images to r in
  [299, 331) and pad to 331x331; keeping the model's input shape, this
  shrinks instead, with the same ratio of sides for min_size = 299 / 331 H.
  Differentiable in `x` (the attacker needs EOT over the draws, not BPDA).

  Args:
    key: a `jax.random.key` drawing sizes and offsets.
    x: NHWC images in [0, 1].
    min_size: the smallest side, an integer in [1, H].
    method: 'nearest' (Xie et al., as their TensorFlow resize) or 'bilinear'
      (`jax.image.scale_and_translate`, antialiased).

  Returns:
    Shaped and typed like `x`.
  """
  x = _images(x)
  _check_int_in_range(min_size, "min_size", 1, x.shape[1])
  check_choice(method, "method", RESIZE_METHODS)
  return _random_resize_pad(key, x, min_size, method)


@functools.partial(jax.jit, static_argnums=3)
def _random_resize_pad(key: PRNGKey, x: Array, min_size: Any, method: str) -> Array:
  batch, height, width, _ = x.shape
  size_key, row_key, col_key = jax.random.split(key, 3)
  rows = jax.random.randint(size_key, (batch,), min_size, height + 1)
  cols = jnp.maximum(jnp.round(rows * (width / height)).astype(jnp.int32), 1)
  top = jax.random.randint(row_key, (batch,), 0, height - rows + 1)
  left = jax.random.randint(col_key, (batch,), 0, width - cols + 1)

  def one(image, size_r, size_c, offset_r, offset_c):
    if method == "bilinear":
      scale = jnp.stack([size_r / height, size_c / width]).astype(jnp.float32)
      translation = jnp.stack([offset_r, offset_c]).astype(jnp.float32)
      # Zero outside the resized image: the padding.
      return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation,
                                           "linear", antialias=True).astype(image.dtype)
    # Nearest neighbour with half-pixel centres, by gathering source pixels.
    r = jnp.arange(height)
    c = jnp.arange(width)
    src_r = jnp.floor((r - offset_r + 0.5) * (height / size_r)).astype(jnp.int32)
    src_c = jnp.floor((c - offset_c + 0.5) * (width / size_c)).astype(jnp.int32)
    inside = (((r >= offset_r) & (r < offset_r + size_r))[:, None]
              & ((c >= offset_c) & (c < offset_c + size_c))[None, :])
    resized = image[jnp.clip(src_r, 0, height - 1)][:, jnp.clip(src_c, 0, width - 1)]
    return jnp.where(inside[..., None], resized, 0)

  return jax.vmap(one)(x, rows, cols, top, left)


# ----------------------------------------------------------------------------
# Thermometer encoding.


def _thresholds(levels: int, dtype) -> Array:
  return jnp.arange(levels, dtype=dtype) / levels


def thermometer_encode(x: ArrayLike, levels: int) -> Array:
  """Thermometer encoding of Buckman et al. (C channels -> C * levels).

  tau(x)_k = 1 if x > k / levels else 0, for k = 0, ..., levels - 1: channel
  c * levels + k of the output encodes channel c of the input. Buckman et
  al. quantise x into `levels` uniform buckets and encode bucket j as j + 1
  leading ones (a cumulative one-hot); this is that code with buckets
  (k / l, (k + 1) / l] (x = 0 encodes as all zeros), the convention under
  which Athalye et al.'s soft thermometer (`soft_thermometer`) equals it at
  the multiples of 1 / levels. Gradient as written: zero (comparisons).

  Args:
    x: NHWC images in [0, 1].
    levels: the number of levels, an integer >= 2 (Buckman et al.: 16).

  Returns:
    0/1 values of `x`'s dtype, shape (N, H, W, C * levels).
  """
  levels = check_int_at_least(levels, "levels", 2)
  x = _images(x)
  hot = (x[..., None] > _thresholds(levels, x.dtype)).astype(x.dtype)
  return hot.reshape(x.shape[:-1] + (x.shape[-1] * levels,))


def soft_thermometer(x: ArrayLike, levels: int) -> Array:
  """Athalye et al.'s differentiable thermometer: min(max(x - k / l, 0) * l, 1).

  Channel c * levels + k ramps linearly from 0 at x = k / l to 1 at
  x = (k + 1) / l, so it equals `thermometer_encode` wherever x is a multiple
  of 1 / levels and is its BPDA stand-in.

  Args:
    x: NHWC images in [0, 1].
    levels: the number of levels, an integer >= 2.

  Returns:
    Values in [0, 1] of `x`'s dtype, shape (N, H, W, C * levels).
  """
  levels = check_int_at_least(levels, "levels", 2)
  x = _images(x)
  soft = jnp.clip((x[..., None] - _thresholds(levels, x.dtype)) * levels, 0, 1)
  return soft.reshape(x.shape[:-1] + (x.shape[-1] * levels,))


# ----------------------------------------------------------------------------
# By name, composition, and in front of a model.


def _ignore_key(fn: Callable[[Array], Array]) -> Callable[[PRNGKey, Array], Array]:
  def keyed(key: PRNGKey, x: Array) -> Array:
    del key
    return fn(x)
  return keyed


def _identity(key: PRNGKey, x: Array) -> Array:
  del key
  return x


def _build(name: str, settings: Dict[str, Any]) -> InputTransform:
  if name == "identity":
    return InputTransform("identity", _identity, _identity, False)
  if name == "jpeg":
    quality = _check_quality(settings["quality"])
    approximation = check_choice(settings["approximation"], "approximation",
                                 JPEG_APPROXIMATIONS)
    approx = (_identity if approximation == "identity" else
              _ignore_key(functools.partial(jpeg_differentiable, quality=quality)))
    return InputTransform("jpeg", _ignore_key(functools.partial(jpeg, quality=quality)),
                          approx, False)
  if name == "jpeg_differentiable":
    fn = _ignore_key(functools.partial(jpeg_differentiable, quality=_check_quality(
        settings["quality"])))
    return InputTransform("jpeg_differentiable", fn, fn, False)
  if name == "bit_depth":
    bits = check_int_at_least(settings["bits"], "bits", 1)
    return InputTransform("bit_depth", _ignore_key(functools.partial(bit_depth, bits=bits)),
                          _identity, False)
  if name == "median":
    size = check_int_at_least(settings["size"], "size", 1)
    return InputTransform("median", _ignore_key(functools.partial(median_filter, size=size)),
                          _identity, False)
  if name == "tvm":
    drop = _check_drop_probability(settings["drop_probability"])
    weight = settings["weight"]
    check_positive(weight, "weight", allow_zero=True)
    steps = check_int_at_least(settings["num_steps"], "num_steps", 1)
    return InputTransform("tvm", functools.partial(tv_minimization, drop_probability=drop,
                                                   weight=weight, num_steps=steps),
                          _identity, True)
  if name == "resize_pad":
    min_size = settings["min_size"]
    if min_size is not None:
      check_int_at_least(min_size, "min_size", 1)
    method = check_choice(settings["method"], "method", RESIZE_METHODS)

    def resize_pad(key: PRNGKey, x: Array) -> Array:
      size = min_size
      if size is None:
        size = max(1, round(XIE_MIN_SIZE_RATIO * np.shape(x)[1]))
      return random_resize_pad(key, x, min_size=size, method=method)

    return InputTransform("resize_pad", resize_pad, resize_pad, True)
  if name == "thermometer":
    levels = check_int_at_least(settings["levels"], "levels", 2)
    return InputTransform(
        "thermometer", _ignore_key(functools.partial(thermometer_encode, levels=levels)),
        _ignore_key(functools.partial(soft_thermometer, levels=levels)), False, levels)
  raise AssertionError(name)  # unreachable: the name was checked


# The settings of each transform and their defaults.
DEFAULT_SETTINGS: Dict[str, Dict[str, Any]] = {
    "identity": {},
    "jpeg": {"quality": 75, "approximation": "identity"},
    "jpeg_differentiable": {"quality": 75},
    "bit_depth": {"bits": 5},
    "median": {"size": 2},
    "tvm": {"drop_probability": 0.5, "weight": 0.05, "num_steps": 40},
    "resize_pad": {"min_size": None, "method": "nearest"},
    "thermometer": {"levels": 16},
}


def get_transform(name: str, **settings: Any) -> InputTransform:
  """An input-transformation defence by name, with checked settings.

  Settings and defaults (the defences' papers' choices where they made one):

    identity
    jpeg                 quality=75, approximation='identity' (BPDA's backward
                         pass; 'differentiable' uses `jpeg_differentiable`)
    jpeg_differentiable  quality=75
    bit_depth            bits=5
    median               size=2
    tvm                  drop_probability=0.5, weight=0.05, num_steps=40
    resize_pad           min_size=None (round(299 / 331 * H), Xie et al.'s
                         ratio), method='nearest'
    thermometer          levels=16

  Args:
    name: one of `TRANSFORM_NAMES`.
    **settings: settings of that transform, overriding the defaults.

  Returns:
    The `InputTransform`.

  Raises:
    ValueError: for an unknown name or setting, or a setting out of range,
      naming it and the accepted values.
  """
  check_choice(name, "transform", TRANSFORM_NAMES)
  accepted = DEFAULT_SETTINGS[name]
  for setting in settings:
    if setting not in accepted:
      names = ", ".join(accepted) or "none"
      close = closest(setting, accepted)
      hint = f" Did you mean {close!r}?" if close else ""
      raise ValueError(f"Unknown setting {setting!r} of transform {name!r}. Accepted "
                       f"settings: {names}.{hint}")
  return _build(name, {**accepted, **settings})


def compose(*transforms: InputTransform) -> InputTransform:
  """The transforms applied left to right, stage i with key `fold_in(key, i)`.

  The composition's approximation chains the stages' approximations (at the
  approximations' own intermediate values). For BPDA with each stage's
  surrogate gradient taken at that stage's true input, compose the BPDA'd
  stages instead: `compose(*map(bpda.bpda_transform, transforms))`.

  Args:
    *transforms: `InputTransform`s; none gives the identity.

  Returns:
    An `InputTransform` named 'a+b+...', randomized if any stage is, whose
    channel factor is the product of the stages'.
  """
  for t in transforms:
    if not isinstance(t, InputTransform):
      raise TypeError(f"compose takes InputTransforms (see get_transform); got "
                      f"{type(t).__name__}.")
  if not transforms:
    return get_transform("identity")

  def chain(fns):
    def run(key: PRNGKey, x: Array) -> Array:
      for i, fn in enumerate(fns):
        x = fn(jax.random.fold_in(key, i), x)
      return x
    return run

  return InputTransform("+".join(t.name for t in transforms),
                        chain([t.forward for t in transforms]),
                        chain([t.approximation for t in transforms]),
                        any(t.randomized for t in transforms),
                        math.prod(t.output_channels_factor for t in transforms))


def defended_logits_fn(logits_fn: Callable[[Array], Array], transform: InputTransform
                       ) -> Callable[[PRNGKey, Array], Array]:
  """The defended model "as written": `(key, x) -> logits_fn(transform.forward(key, x))`.

  Its gradients are the defence's own (zero through JPEG, bit depth and
  thermometer encoding): what a non-adaptive attacker sees. For the adaptive
  attacker use `certjax.defences.bpda.bpda_logits_fn`, and EOT
  (`certjax.attacks.eot.eot`) when `transform.randomized`.
  """
  if not callable(logits_fn):
    raise TypeError("logits_fn must be a callable x -> logits.")
  if not isinstance(transform, InputTransform):
    raise TypeError(f"transform must be an InputTransform (see get_transform); got "
                    f"{type(transform).__name__}.")

  def defended(key: PRNGKey, x: Array) -> Array:
    return logits_fn(transform.forward(key, x))

  return defended
