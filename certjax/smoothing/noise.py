"""The noise of randomized smoothing: per-input keys and the noise stream they key.

Key scheme (what makes certificates reproducible and batching-invariant):

  * per-input key: `k_i = fold_in(key, i)` for a single `key` and input
    (dataset) index `i` (`input_keys`, `keys_for_indices`), or `key[i]` when a
    key array of shape `[B]` is given (`per_input_keys`);
  * per-draw noise: draw `j` of input `i` is unit noise keyed
    `fold_in(k_i, j)`: for Gaussian noise the values `jax.random.normal(
    fold_in(k_i, j), x_i.shape)` takes in the classic (non-partitionable)
    threefry layout, i.e. the same threefry bits and the same uniform ->
    normal map, with erfinv rounded slightly differently (and more
    accurately; see `erfinv`); for uniform noise `jax.random.uniform`'s
    values on [-1, 1) times sqrt(3), bit for bit. `sample_noise` reproduces
    one draw.
  * layout of a draw of d values from the threefry key words `(k0, k1)`: the
    counter pairs `(c, c + ceil(d / 2))` for `c < ceil(d / 2)` are hashed with
    threefry-2x32 (20 rounds), the first outputs filling the first half of
    the values and the second outputs the rest (an odd d pads the last pair's
    second counter with 0); 23 bits of each word become a float in [1, 2),
    shifted to the interval, then mapped to a normal by sqrt(2) erfinv(u).
  * keys of other implementations (rbg, unsafe_rbg, philox, ...) key
    threefry through a hash of their key data (`threefry_words`), since
    rbg's values depend on how a call is batched. JAX does not promise
    identical random streams across its versions; the hash is written out
    here, so this stream does not change with JAX.

Speed. Generating the noise is the only work beyond the classifier's own
forward passes, so it is written for XLA to fuse: per-draw key derivation,
threefry hashing, the uniform -> normal map and the add to `x_i` form one
elementwise pass over the device batch (`threefry2x32`, `erfinv`).

References:
  Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
  SC 2011 (Threefry).
  Giles, "Approximating the erfinv function", GPU Computing Gems, 2011.
  Cohen, Rosenfeld & Kolter, ICML 2019 (Gaussian noise);
  Yang et al., ICML 2020 (uniform noise).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from certjax import validation
from certjax.smoothing import stats
from certjax.types import Array, ArrayLike, PRNGKey

NOISE_TYPES = tuple(stats.NOISE_NORMS)


# --------------------------------------------------------------------------- keys


def as_typed_keys(key: Any) -> jax.Array:
  """Accepts typed keys (`jax.random.key`) or legacy uint32 keys (`PRNGKey`)."""
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return key
    if key.dtype == np.uint32 and key.ndim >= 1:
      return jax.random.wrap_key_data(key)
  raise ValueError(
      "key must be a JAX PRNG key from jax.random.key(seed) (or a legacy "
      f"jax.random.PRNGKey), or an array of them; got {type(key).__name__} "
      f"with dtype {getattr(key, 'dtype', None)}.")


def input_keys(key: PRNGKey, num_inputs: int, start: int | ArrayLike = 0) -> jax.Array:
  """Per-input keys `fold_in(key, start + i)` for `i < num_inputs`.

  Pass `start` = the index of the batch's first input in a dataset to get the
  same keys (and therefore the same counts and certificates) however the
  dataset is split into batches.

  Args:
    key: a single PRNG key.
    num_inputs: number of keys.
    start: index of the first input.

  Returns:
    A key array of shape `[num_inputs]`.
  """
  key = as_typed_keys(key)
  if key.shape != ():
    raise ValueError(f"input_keys needs a single key; got a key array of shape {key.shape}.")
  num_inputs = validation.check_int_at_least(num_inputs, "num_inputs", 0)
  if validation.is_concrete(start):
    value = np.asarray(start)
    if value.ndim or value.dtype.kind not in "iu" or value < 0:
      raise ValueError(f"start must be a non-negative integer index; got {start!r}.")
  indices = jnp.asarray(start, jnp.uint32) + jnp.arange(num_inputs, dtype=jnp.uint32)
  return fold_in_each(key, indices)


def keys_for_indices(key: PRNGKey, indices: ArrayLike) -> jax.Array:
  """Per-input keys `fold_in(key, indices[i])` for arbitrary dataset indices.

  `input_keys` for inputs that are not contiguous in the dataset (Cohen's
  `skip`, one host's share of a selection): the key of input `j` of the
  dataset is the same however the inputs are chosen and grouped.

  Args:
    key: a single PRNG key.
    indices: 1-D non-negative integer dataset indices.

  Returns:
    A key array of shape `[len(indices)]`.
  """
  key = as_typed_keys(key)
  if key.shape != ():
    raise ValueError(f"keys_for_indices needs a single key; got a key array of shape "
                     f"{key.shape}.")
  values = np.asarray(indices)
  if values.ndim != 1 or values.dtype.kind not in "iu" or (values.size and values.min() < 0):
    raise ValueError(f"indices must be a 1-D array of non-negative integers; got {indices!r}.")
  return fold_in_each(key, jnp.asarray(values, jnp.uint32))


# Jitted: run op by op, the vmapped fold_in is retraced at every call
# (milliseconds of host time per sample_counts / certify call).
@jax.jit
def fold_in_each(key: jax.Array, indices: Array) -> jax.Array:
  """`[fold_in(key, i) for i in indices]`, batched without changing any key."""
  if is_threefry(key):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
  # Other implementations may not batch: unsafe_rbg's fold_in runs its data
  # through rng_bit_generator, whose vmap rule keys the whole batch with the
  # first element, so key i would depend on the batch it was made in.
  return jax.lax.map(lambda index: jax.random.fold_in(key, index), indices)


@jax.jit
def _fold_in_all_jit(keys: jax.Array, data: Array) -> jax.Array:
  if is_threefry(keys):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)
  return jax.lax.map(lambda key: jax.random.fold_in(key, data), keys)


def per_input_keys(key: Any, num_inputs: int) -> jax.Array:
  """One key per input: `input_keys(key, num_inputs)` for a single key, or a
  key array of shape `[num_inputs]` as given."""
  key = as_typed_keys(key)
  if key.shape == ():
    return input_keys(key, num_inputs)
  if key.shape != (num_inputs,):
    raise ValueError(
        f"key must be a single key or one key per input (shape ({num_inputs},)); "
        f"got a key array of shape {key.shape}.")
  return key


def fold_in_all(keys: jax.Array, data: int) -> jax.Array:
  """`[fold_in(k, data) for k in keys]` (e.g. CERTIFY's selection and estimation streams)."""
  return _fold_in_all_jit(keys, jnp.uint32(data))


# ------------------------------------------------------------------------- noise


# Threefry-2x32 rotation constants (Salmon et al. 2011, Table 4), as in JAX.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, bits: int) -> Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
  """Threefry-2x32 with 20 rounds on broadcastable uint32 arrays, unrolled.

  Bit for bit the hash behind `jax.random`'s default keys
  (`jax.extend.random.threefry_2x32`). It is written out because JAX lowers its
  own on CPU as a rolled 5-step `fori_loop` (to save compile time): every step
  then reads and writes whole uint32 arrays, and nothing fuses with the
  uniform -> normal transform that follows. Unrolled, per-draw key derivation,
  hashing, the transform and the noise add fuse into elementwise loops over
  the device batch. Measured on a 2-core AVX-512 Xeon for 256 draws of 3072
  normals: about 3x cheaper than `vmap(jax.random.normal)` over per-draw keys
  (benchmarks/smoothing.py records the effect on the whole count).
  """
  keys = (k0, k1, k0 ^ k1 ^ _THREEFRY_PARITY)
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for block in range(5):
    for rotation in _THREEFRY_ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, rotation)
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def uniform_floats(bits: Array, low: float, high: float) -> Array:
  """`jax.random.uniform`'s bits -> float32 map on [low, high), operation for operation."""
  low, high = np.float32(low), np.float32(high)
  mantissa = (bits >> np.uint32(32 - 23)) | np.array(1.0, np.float32).view(np.uint32)
  floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
  return jnp.maximum(low, floats * (high - low) + low)


# Giles' single-precision erfinv: polynomials in w - 2.5 (w < 5) and in
# sqrt(w) - 3 (w >= 5, |x| > 0.9966), w = -log(1 - x^2).
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                   0.00021858087, -0.00125372503, -0.00417768164, 0.246640727, 1.50140941)
_ERFINV_TAIL = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844,
                0.00573950773, -0.0076224613, 0.00943887047, 1.00167406, 2.83297682)


def erfinv(x: Array) -> Array:
  """erfinv on float32 x in (-1, 1), as XLA's `erf_inv` but cheaper and closer.

  The same approximation (Giles 2011) that `jax.lax.erf_inv` lowers to, with
  `1 - x^2` formed as `(1 - x)(1 + x)` and a plain `log` instead of
  `log1p(-x * x)`. The uniform -> normal map is about half the cost of a
  noise value, and on CPU this form is much cheaper: measured on a 2-core
  AVX-512 Xeon, 786k values in 1.3 ms instead of 4.4 ms through
  `lax.erf_inv` (both compiled for 512-bit vectors, which `lax.erf_inv` does
  not profit from). It is also more accurate in the tails: against float64
  `scipy.special.erfinv` on all 2^23 uniforms the generator can produce,
  the normal value sqrt(2) erfinv(u) is off by at most 1.1e-6 here and by
  2.2e-5 through `lax.erf_inv`, whose `-x * x` rounds away precision as
  |x| -> 1.
  """
  w = -jnp.log((1.0 - x) * (1.0 + x))
  central = w < 5.0
  t = jnp.where(central, w - 2.5, jnp.sqrt(w) - 3.0)
  p = jnp.where(central, np.float32(_ERFINV_CENTRAL[0]), np.float32(_ERFINV_TAIL[0]))
  for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:]):
    p = jnp.where(central, np.float32(a), np.float32(b)) + p * t
  return p * x


def standard_gaussian_from_bits(bits: Array) -> Array:
  """uint32 bits -> standard normal values, `jax.random.normal`'s map."""
  # jax.random.normal's map: sqrt(2) erfinv(u), u uniform on the open interval
  # (-1, 1), so |u| < 1 and w stays finite (at most about 16).
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  return np.float32(np.sqrt(2.0)) * erfinv(uniform_floats(bits, low, 1.0))


def unit_variance_uniform_from_bits(bits: Array) -> Array:
  """uint32 bits -> uniform values of variance 1 on [-sqrt(3), sqrt(3))."""
  # Uniform on [-sqrt(3), sqrt(3)] has variance 1, so sigma is the noise's
  # standard deviation for every noise type (Yang et al.'s convention).
  return uniform_floats(bits, -1.0, 1.0) * np.float32(math.sqrt(3.0))


_BITS_TO_NOISE = {"gaussian": standard_gaussian_from_bits,
                  "uniform": unit_variance_uniform_from_bits}


def threefry_noise(k0: Array, k1: Array, shape: Sequence[int], noise: str) -> Array:
  """Unit noise `[R, *shape]` for the threefry keys with uint32 words `(k0[r], k1[r])`.

  Made from the bits `jax.random.normal(key, shape)` (or `uniform`) uses in
  the classic, non-partitionable threefry layout of `jax.random.bits`, bit
  for bit: a draw of size d hashes the counter pairs
  `(c, c + ceil(d/2))`, the first outputs filling the first half and the
  second outputs the rest (an odd d pads the last pair's second counter with
  0). Written as one elementwise pass so that XLA fuses it (see `threefry2x32`).
  """
  size = math.prod(shape)
  half = -(-size // 2)
  first = jnp.arange(half, dtype=jnp.uint32)
  second = first + np.uint32(half)
  if size % 2:
    second = jnp.where(second < size, second, np.uint32(0))
  out0, out1 = threefry2x32(k0[:, None], k1[:, None], first[None, :], second[None, :])
  to_noise = _BITS_TO_NOISE[noise]
  flat = jnp.concatenate([to_noise(out0), to_noise(out1)], axis=1)[:, :size]
  return flat.reshape((k0.shape[0],) + tuple(shape))


def draw_noise(key_words: Array, draw_index: Array, shape: Sequence[int],
                         noise: str) -> Array:
  """Unit noise of the draws keyed `fold_in(k_r, draw_index[r])`, one per row r.

  `key_words` `[R, 2]` are the uint32 words of threefry keys `k_r`.
  """
  draw_index = draw_index.astype(jnp.uint32)
  # jax.random.fold_in(k, j) is threefry(k, (0, j)).
  k0, k1 = threefry2x32(key_words[:, 0], key_words[:, 1], jnp.zeros_like(draw_index),
                         draw_index)
  return threefry_noise(k0, k1, shape, noise)


def is_threefry(keys: jax.Array) -> bool:
  """Whether `keys` are JAX's default threefry2x32 keys."""
  return str(jax.random.key_impl(keys)) == "threefry2x32"


def threefry_words(keys: jax.Array) -> Array:
  """The uint32 threefry key words `[..., 2]` that key the noise of `keys`.

  Threefry keys (JAX's default) are their own words. Keys of other
  implementations (rbg, unsafe_rbg, philox, ...) have their key data hashed
  into threefry words: their own bit generators are not used for the noise,
  because rbg's values depend on how a call is batched (the vmap rule of
  `rng_bit_generator` keys a whole batch with its first key) and may depend on
  partitioning, which would make counts depend on `batch_size`, on the inputs
  counted together and on the device count. Threefry is counter-based: each
  value depends only on its key and position.
  """
  data = jax.random.key_data(keys)
  if is_threefry(keys):
    return data
  if data.shape[-1] % 2:
    data = jnp.concatenate([data, jnp.zeros_like(data[..., :1])], axis=-1)
  words = (jnp.zeros(data.shape[:-1], jnp.uint32),) * 2
  for i in range(0, data.shape[-1], 2):
    words = threefry2x32(*words, data[..., i], data[..., i + 1])
  return jnp.stack(words, axis=-1)


def unit_noise(key: PRNGKey, shape: Sequence[int], noise: str) -> Array:
  """Unit-variance noise for one draw; the definition of the noise stream.

  For a threefry key (JAX's default) this is `jax.random.normal(key, shape)`
  in the classic threefry layout, up to the rounding of erfinv (see
  `erfinv`), or `jax.random.uniform(key, shape, minval=-1, maxval=1) *
  sqrt(3)` exactly; keys of other implementations are first mapped to
  threefry words (`threefry_words`).
  """
  words = threefry_words(key)
  return threefry_noise(words[None, 0], words[None, 1], shape, noise)[0]


# Compiled like the counting loop, so that the values equal its draws bit for
# bit (run op by op, XLA:CPU's log may round differently in the last place).
_unit_noise_jit = jax.jit(unit_noise, static_argnames=("shape", "noise"))


def sample_noise(key: PRNGKey, shape: Sequence[int], sigma: ArrayLike,
                 noise: str = "gaussian") -> Array:
  """One noise draw of standard deviation `sigma` ('gaussian' or 'uniform').

  'uniform' is uniform on `[-sqrt(3) sigma, sqrt(3) sigma]^d`. This is the
  draw `sample_counts` adds for key `fold_in(k_i, j)`.
  """
  validation.check_choice(noise, "noise", NOISE_TYPES)
  return sigma * _unit_noise_jit(as_typed_keys(key), tuple(shape), noise)
