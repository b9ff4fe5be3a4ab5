"""Class counts of a base classifier under random noise, for many inputs at once.

The Monte Carlo half of randomized smoothing runs on the accelerator: for each
input `x_i` and draw `j < num`, classify `x_i + sigma * eps_ij` and count the
argmax classes. Cohen et al.'s reference loops one input at a time on the
host; here every input of a batch is counted in one jitted `lax.fori_loop`
whose body classifies a fixed-size device batch of `batch_size` noisy copies.

Layout of the work. The `B * num` (input, draw) pairs are enumerated input-major
(`t = i * num + j`) and cut into `ceil(B * num / batch_size)` chunks of exactly
`batch_size` pairs; a chunk may straddle inputs, and the last chunk's surplus
slots are computed on a clamped copy and masked out of the counts. So the
device batch never changes shape (one compilation) and never materialises more
than `batch_size` noise draws.

Key scheme (what makes results reproducible and batching-invariant):

  * per-input key:  `k_i = fold_in(key, i)` for a single `key` (see
    `input_keys`), or `key[i]` when a key array of shape `[B]` is given;
  * per-draw noise: `eps_ij ~ N(0, I)` (or unit-variance uniform), the draw
    `jax.random.normal(fold_in(k_i, j), x_i.shape)` makes in the classic
    (non-partitionable) threefry layout: the same threefry bits and the same
    uniform -> normal map, with erfinv rounded slightly differently (and more
    accurately; see `_erfinv`); uniform noise is `jax.random.uniform`'s bit
    for bit. `sample_noise` reproduces one draw. Keys of other
    implementations (rbg, unsafe_rbg, ...) key threefry through a hash of
    their key data (see `_threefry_words`), since rbg's values depend on how
    a call is batched. JAX does not promise identical random streams across
    its versions; the hash here is written out, so this stream does not
    change with JAX.

Speed. Generating the noise is the only work beyond the classifier's own
forward passes, so it is written for XLA to fuse: per-draw key derivation,
threefry hashing, the uniform -> normal map and the add to `x_i` form one
elementwise pass over the device batch (`_threefry2x32`, `_erfinv`), and on
CPU the loop is compiled for 512-bit vectors and with XLA's Eigen
convolutions (`_CPU_COMPILER_OPTIONS`).
`benchmarks/smoothing.py` measures the result against the raw forward pass.

Hence the counts of input `i` depend only on `(k_i, x_i, num)`: counting a whole
batch equals counting each input alone with its key (`key[i:i+1]`), a dataset
split into batches gives the same counts as one pass when keys come from
`input_keys(key, size, start=offset)`, and `batch_size` and device count do not
change which noise is drawn. (The base classifier's logits are still computed at
the chosen batch size, so a classifier whose floating-point output depends on
the batch composition could, in a near-tie, flip an argmax.)

Multi-device: when `x` is sharded over a `jax.sharding.Mesh` axis (default name
'data'), or `mesh=` is given, the loop runs under `jax.shard_map`: each device
counts its own inputs with its own keys and a device batch of `batch_size`
noisy copies, with no communication; counts come back sharded like `x`.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (`Smooth._sample_noise` in locuslab/smoothing).
  Yang et al., "Randomized Smoothing of All Shapes and Sizes", ICML 2020
  (uniform noise).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from certjax import validation
from certjax.smoothing import stats
from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey

NOISE_TYPES = tuple(stats.NOISE_NORMS)


# --------------------------------------------------------------------------- keys


def _as_typed_keys(key: Any) -> jax.Array:
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
  key = _as_typed_keys(key)
  if key.shape != ():
    raise ValueError(f"input_keys needs a single key; got a key array of shape {key.shape}.")
  num_inputs = validation.check_int_at_least(num_inputs, "num_inputs", 0)
  if validation.is_concrete(start):
    value = np.asarray(start)
    if value.ndim or value.dtype.kind not in "iu" or value < 0:
      raise ValueError(f"start must be a non-negative integer index; got {start!r}.")
  indices = jnp.asarray(start, jnp.uint32) + jnp.arange(num_inputs, dtype=jnp.uint32)
  return _fold_in_each(key, indices)


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
  key = _as_typed_keys(key)
  if key.shape != ():
    raise ValueError(f"keys_for_indices needs a single key; got a key array of shape "
                     f"{key.shape}.")
  values = np.asarray(indices)
  if values.ndim != 1 or values.dtype.kind not in "iu" or (values.size and values.min() < 0):
    raise ValueError(f"indices must be a 1-D array of non-negative integers; got {indices!r}.")
  return _fold_in_each(key, jnp.asarray(values, jnp.uint32))


# Jitted: run op by op, the vmapped fold_in is retraced at every call
# (milliseconds of host time per sample_counts / certify call).
@jax.jit
def _fold_in_each(key: jax.Array, indices: Array) -> jax.Array:
  if _is_threefry(key):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)
  # Other implementations may not batch: unsafe_rbg's fold_in runs its data
  # through rng_bit_generator, whose vmap rule keys the whole batch with the
  # first element, so key i would depend on the batch it was made in.
  return jax.lax.map(lambda index: jax.random.fold_in(key, index), indices)


@jax.jit
def _fold_in_all_jit(keys: jax.Array, data: Array) -> jax.Array:
  if _is_threefry(keys):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)
  return jax.lax.map(lambda key: jax.random.fold_in(key, data), keys)


def _per_input_keys(key: Any, num_inputs: int) -> jax.Array:
  key = _as_typed_keys(key)
  if key.shape == ():
    return input_keys(key, num_inputs)
  if key.shape != (num_inputs,):
    raise ValueError(
        f"key must be a single key or one key per input (shape ({num_inputs},)); "
        f"got a key array of shape {key.shape}.")
  return key


def _fold_in_all(keys: jax.Array, data: int) -> jax.Array:
  return _fold_in_all_jit(keys, jnp.uint32(data))


# ------------------------------------------------------------------------- noise


# Threefry-2x32 rotation constants (Salmon et al. 2011, Table 4), as in JAX.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, bits: int) -> Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
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


def _uniform_floats(bits: Array, low: float, high: float) -> Array:
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


def _erfinv(x: Array) -> Array:
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


def _standard_gaussian_from_bits(bits: Array) -> Array:
  # jax.random.normal's map: sqrt(2) erfinv(u), u uniform on the open interval
  # (-1, 1), so |u| < 1 and w stays finite (at most about 16).
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  return np.float32(np.sqrt(2.0)) * _erfinv(_uniform_floats(bits, low, 1.0))


def _unit_variance_uniform_from_bits(bits: Array) -> Array:
  # Uniform on [-sqrt(3), sqrt(3)] has variance 1, so sigma is the noise's
  # standard deviation for every noise type (Yang et al.'s convention).
  return _uniform_floats(bits, -1.0, 1.0) * np.float32(math.sqrt(3.0))


_BITS_TO_NOISE = {"gaussian": _standard_gaussian_from_bits,
                  "uniform": _unit_variance_uniform_from_bits}


def _threefry_noise(k0: Array, k1: Array, shape: Sequence[int], noise: str) -> Array:
  """Unit noise `[R, *shape]` for the threefry keys with uint32 words `(k0[r], k1[r])`.

  Made from the bits `jax.random.normal(key, shape)` (or `uniform`) uses in
  the classic, non-partitionable threefry layout of `jax.random.bits`, bit
  for bit: a draw of size d hashes the counter pairs
  `(c, c + ceil(d/2))`, the first outputs filling the first half and the
  second outputs the rest (an odd d pads the last pair's second counter with
  0). Written as one elementwise pass so that XLA fuses it (see `_threefry2x32`).
  """
  size = math.prod(shape)
  half = -(-size // 2)
  first = jnp.arange(half, dtype=jnp.uint32)
  second = first + np.uint32(half)
  if size % 2:
    second = jnp.where(second < size, second, np.uint32(0))
  out0, out1 = _threefry2x32(k0[:, None], k1[:, None], first[None, :], second[None, :])
  to_noise = _BITS_TO_NOISE[noise]
  flat = jnp.concatenate([to_noise(out0), to_noise(out1)], axis=1)[:, :size]
  return flat.reshape((k0.shape[0],) + tuple(shape))


def _draw_noise_threefry(key_words: Array, draw_index: Array, shape: Sequence[int],
                         noise: str) -> Array:
  """Unit noise of the draws keyed `fold_in(k_r, draw_index[r])`, one per row r.

  `key_words` `[R, 2]` are the uint32 words of threefry keys `k_r`.
  """
  draw_index = draw_index.astype(jnp.uint32)
  # jax.random.fold_in(k, j) is threefry(k, (0, j)).
  k0, k1 = _threefry2x32(key_words[:, 0], key_words[:, 1], jnp.zeros_like(draw_index),
                         draw_index)
  return _threefry_noise(k0, k1, shape, noise)


def _is_threefry(keys: jax.Array) -> bool:
  return str(jax.random.key_impl(keys)) == "threefry2x32"


def _threefry_words(keys: jax.Array) -> Array:
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
  if _is_threefry(keys):
    return data
  if data.shape[-1] % 2:
    data = jnp.concatenate([data, jnp.zeros_like(data[..., :1])], axis=-1)
  words = (jnp.zeros(data.shape[:-1], jnp.uint32),) * 2
  for i in range(0, data.shape[-1], 2):
    words = _threefry2x32(*words, data[..., i], data[..., i + 1])
  return jnp.stack(words, axis=-1)


def _unit_noise(key: PRNGKey, shape: Sequence[int], noise: str) -> Array:
  """Unit-variance noise for one draw; the definition of the noise stream.

  For a threefry key (JAX's default) this is `jax.random.normal(key, shape)`
  in the classic threefry layout, up to the rounding of erfinv (see
  `_erfinv`), or `jax.random.uniform(key, shape, minval=-1, maxval=1) *
  sqrt(3)` exactly; keys of other implementations are first mapped to
  threefry words (`_threefry_words`).
  """
  words = _threefry_words(key)
  return _threefry_noise(words[None, 0], words[None, 1], shape, noise)[0]


# Compiled like the counting loop, so that the values equal its draws bit for
# bit (run op by op, XLA:CPU's log may round differently in the last place).
_unit_noise_jit = jax.jit(_unit_noise, static_argnames=("shape", "noise"))


def sample_noise(key: PRNGKey, shape: Sequence[int], sigma: ArrayLike,
                 noise: str = "gaussian") -> Array:
  """One noise draw of standard deviation `sigma` ('gaussian' or 'uniform').

  'uniform' is uniform on `[-sqrt(3) sigma, sqrt(3) sigma]^d`. This is the
  draw `sample_counts` adds for key `fold_in(k_i, j)`.
  """
  validation.check_choice(noise, "noise", NOISE_TYPES)
  return sigma * _unit_noise_jit(_as_typed_keys(key), tuple(shape), noise)


# ---------------------------------------------------- logits_fn as jit arguments


class _ById:
  """Hashes an unhashable static object by identity."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _ById) and other.obj is self.obj


class _StaticPart(NamedTuple):
  treedef: Any
  static_leaves: tuple  # None where the leaf is an array (passed dynamically)


def _is_array_leaf(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _split_logits_fn(logits_fn: LogitsFn) -> tuple[_StaticPart, list]:
  """Splits `logits_fn` into a hashable static part and its array leaves.

  `functools.partial(model.apply, variables)` would otherwise be a static jit
  argument with the weights baked into the program as constants (slow to
  compile, and a recompilation for every new set of weights). Its arrays are
  passed as jit arguments instead; anything else (plain functions, closures)
  is static and hashed by identity.
  """
  if isinstance(logits_fn, functools.partial):
    logits_fn = jax.tree_util.Partial(logits_fn.func, *logits_fn.args, **logits_fn.keywords)
  leaves, treedef = jax.tree_util.tree_flatten(logits_fn)
  static_leaves, dynamic = [], []
  for leaf in leaves:
    if _is_array_leaf(leaf):
      static_leaves.append(None)
      dynamic.append(leaf)
    else:
      try:
        hash(leaf)
      except TypeError:
        leaf = _ById(leaf)
      static_leaves.append(leaf)
  return _StaticPart(treedef, tuple(static_leaves)), dynamic


def _merge_logits_fn(static: _StaticPart, dynamic: Sequence[Any]) -> LogitsFn:
  dynamic = iter(dynamic)
  leaves = [next(dynamic) if s is None else (s.obj if isinstance(s, _ById) else s)
            for s in static.static_leaves]
  return jax.tree_util.tree_unflatten(static.treedef, leaves)


# ---------------------------------------------------------------------- counting


def _count_local(keys: jax.Array, x: Array, sigma: Array, logits_fn: LogitsFn, *,
                 num: int, batch_size: int, num_classes: int, noise: str) -> Array:
  """Counts for the inputs present on this device (or all inputs, unsharded)."""
  num_inputs = x.shape[0]
  total = num_inputs * num
  # A device batch larger than the whole job would only add masked slots.
  chunk = min(batch_size, total)
  num_chunks = -(-total // chunk)
  sample_shape = x.shape[1:]
  offsets = jnp.arange(chunk, dtype=jnp.int32)
  key_words = _threefry_words(keys)

  def body(_, carry):
    counts, first_input, first_draw = carry
    # (first_input, first_draw) is the chunk's first pair; carrying it rather
    # than computing chunk * batch_size keeps indices far from int32 overflow.
    position = first_draw + offsets
    input_index = first_input + position // num
    draw_index = position % num
    valid = input_index < num_inputs
    input_index = jnp.minimum(input_index, num_inputs - 1)
    eps = _draw_noise_threefry(key_words[input_index], draw_index, sample_shape, noise)
    noisy = (x[input_index].astype(jnp.float32) + sigma * eps).astype(x.dtype)
    predictions = jnp.argmax(logits_fn(noisy), axis=-1)
    counts = counts.at[input_index, predictions].add(valid.astype(jnp.int32))
    next_position = first_draw + chunk
    return counts, first_input + next_position // num, next_position % num

  counts = jnp.zeros((num_inputs, num_classes), jnp.int32)
  start = (counts, jnp.int32(0), jnp.int32(0))
  counts, _, _ = jax.lax.fori_loop(0, num_chunks, body, start)
  return counts


def _sample_counts(keys, fn_dynamic, x, sigma, *, fn_static, num, batch_size,
                   num_classes, noise, mesh, data_axis):
  sigma = jnp.asarray(sigma, jnp.float32)

  def count(keys, fn_dynamic, x, sigma):
    logits_fn = _merge_logits_fn(fn_static, fn_dynamic)
    return _count_local(keys, x, sigma, logits_fn, num=num, batch_size=batch_size,
                        num_classes=num_classes, noise=noise)

  if mesh is None:
    return count(keys, fn_dynamic, x, sigma)
  spec = PartitionSpec(data_axis)
  # check_vma=False: the zero-initialised counts carry is device-invariant
  # while its updates vary per device; the loop is purely local anyway.
  sharded = jax.shard_map(
      count, mesh=mesh, in_specs=(spec, PartitionSpec(), spec, PartitionSpec()),
      out_specs=spec, check_vma=False)
  return sharded(keys, fn_dynamic, x, sigma)


_STATIC_ARGNAMES = ("fn_static", "num", "batch_size", "num_classes", "noise", "mesh",
                    "data_axis")
_sample_counts_jit = jax.jit(_sample_counts, static_argnames=_STATIC_ARGNAMES)

# XLA:CPU options for the counting loop, both measured on a 2-core AVX-512
# Xeon (jaxlib 0.10.2; benchmarks/smoothing.py, benchmarks/smoothing_peers.py):
#  * 512-bit vectors. XLA:CPU asks LLVM for 256-bit vectors even where AVX-512
#    exists. The noise (20 rounds of integer hashing, a log and a polynomial
#    per value) is pure elementwise work and runs about 2x faster with 512-bit
#    vectors (786k Gaussian values from bits in 1.3 ms instead of 3.3 ms;
#    threefry hashing 1.1 ms instead of 1.6 ms). LLVM clamps the width to what
#    the CPU has, so the option is harmless elsewhere.
#  * Convolutions and dots through XLA's Eigen kernels instead of YNNPACK
#    (an empty `xla_cpu_experimental_ynn_fusion_type`). YNNPACK's convolutions
#    were 1.5-2.3x slower than Eigen's on the small CNNs certified here
#    (forward images/s at batch 256: cnn 11.8k -> 27.2k, ibp_small 13.0k ->
#    19.8k), matching elsewhere (mlp 85.7k vs 86.3k, resnet20 702 vs 738).
#    Logits change by float rounding only (~1e-6).
# Both only make the loop faster; counts are the same for the same logits.
# The options are experimental XLA flags: if this jaxlib rejects them, the
# loop is compiled without them (see `_cpu_options_accepted`).
_CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512,
                         "xla_cpu_experimental_ynn_fusion_type": ""}
_sample_counts_jit_cpu = jax.jit(_sample_counts, static_argnames=_STATIC_ARGNAMES,
                                 compiler_options=_CPU_COMPILER_OPTIONS)


@functools.cache
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib compiles with `_CPU_COMPILER_OPTIONS` (checked once)."""
  try:
    probe = jax.jit(lambda v: v + 1, compiler_options=_CPU_COMPILER_OPTIONS)
    probe.lower(np.float32(0)).compile()
    return True
  except Exception as error:  # pylint: disable=broad-except
    warnings.warn(
        f"certjax.smoothing: XLA:CPU rejected the counting loop's compiler options "
        f"{_CPU_COMPILER_OPTIONS} ({str(error).splitlines()[0][:200]}); compiling without "
        "them (correct, possibly slower).", RuntimeWarning, stacklevel=3)
    return False


def _compiler_options(platform: str) -> dict | None:
  """The compiler options of the counting loop on a platform ('cpu', 'gpu', ...)."""
  if platform == "cpu" and _cpu_options_accepted():
    return dict(_CPU_COMPILER_OPTIONS)
  return None


def _counter_for(x: Any, mesh: Mesh | None):
  """The jitted counter to call: with CPU compiler options when x lives on CPU."""
  if mesh is not None:
    platform = mesh.devices.flat[0].platform
  elif not validation.is_concrete(x):
    # Inside the caller's jit the caller's compilation decides.
    return _sample_counts_jit
  elif isinstance(x, jax.Array):
    platform = next(iter(x.devices())).platform
  else:
    platform = jax.default_backend()
  return _sample_counts_jit_cpu if _compiler_options(platform) else _sample_counts_jit


def _data_axis_size(mesh: Mesh, data_axis: Any) -> int:
  axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
  for axis in axes:
    if axis not in mesh.axis_names:
      raise ValueError(
          f"data_axis {axis!r} is not an axis of the mesh; mesh axes are {mesh.axis_names}.")
  return int(np.prod([mesh.shape[a] for a in axes]))


def _resolve_mesh(x: Any, mesh: Mesh | None, data_axis: Any) -> tuple[Mesh | None, Any]:
  if mesh is None and validation.is_concrete(x):
    sharding = getattr(x, "sharding", None)
    if (isinstance(sharding, NamedSharding) and len(sharding.spec)
        and sharding.spec[0] is not None):
      mesh, data_axis = sharding.mesh, sharding.spec[0]
  if mesh is None:
    return None, None
  size = _data_axis_size(mesh, data_axis)
  if x.shape[0] % size:
    raise ValueError(
        f"the number of inputs ({x.shape[0]}) must be divisible by the {size} devices "
        f"of mesh axis {data_axis!r}; pad the batch or use fewer devices.")
  return mesh, data_axis


def _infer_num_classes(logits_fn: LogitsFn, x: Any, num_classes: int | None) -> int:
  spec = jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype)
  logits = jax.eval_shape(logits_fn, spec)
  if len(logits.shape) != 2 or logits.shape[0] != 1:
    raise ValueError(
        f"logits_fn must map a batch [N, H, W, C] to logits [N, num_classes]; for N=1 it "
        f"returned shape {logits.shape}.")
  width = int(logits.shape[1])
  if num_classes is None:
    return width
  num_classes = validation.check_int_at_least(num_classes, "num_classes", 1)
  if num_classes < width:
    raise ValueError(
        f"num_classes={num_classes} is smaller than the {width} logits logits_fn returns.")
  return num_classes


class _Prepared(NamedTuple):
  x: Any
  sigma: Any
  num_classes: int
  fn_static: _StaticPart
  fn_dynamic: list
  mesh: Mesh | None
  data_axis: Any


def _prepare(logits_fn, x, sigma, batch_size, num_classes, noise, mesh, data_axis):
  """Validation and set-up shared by sample_counts, certify and predict."""
  if not callable(logits_fn):
    raise ValueError(f"logits_fn must be callable; got {type(logits_fn).__name__}.")
  validation.check_choice(noise, "noise", NOISE_TYPES)
  validation.check_positive(sigma, "sigma")
  if np.ndim(sigma) != 0:
    raise ValueError(f"sigma must be a scalar noise level; got shape {np.shape(sigma)}.")
  validation.check_int_at_least(batch_size, "batch_size", 1)
  if not hasattr(x, "shape"):
    x = np.asarray(x)
  validation.check_images(x, name="x")
  if x.shape[0] < 1:
    raise ValueError("x must hold at least one input; got an empty batch.")
  num_classes = _infer_num_classes(logits_fn, x, num_classes)
  mesh, data_axis = _resolve_mesh(x, mesh, data_axis)
  fn_static, fn_dynamic = _split_logits_fn(logits_fn)
  return _Prepared(x, sigma, num_classes, fn_static, fn_dynamic, mesh, data_axis)


def _counts_for_keys(keys: jax.Array, prepared: _Prepared, num: int, batch_size: int,
                     noise: str) -> jax.Array:
  return _counter_for(prepared.x, prepared.mesh)(
      keys, prepared.fn_dynamic, prepared.x, prepared.sigma, fn_static=prepared.fn_static,
      num=num, batch_size=batch_size, num_classes=prepared.num_classes, noise=noise,
      mesh=prepared.mesh, data_axis=prepared.data_axis)


def sample_counts(key: PRNGKey, logits_fn: LogitsFn, x: ArrayLike, sigma: float,
                  num: int, batch_size: int, *, num_classes: int | None = None,
                  noise: str = "gaussian", mesh: Mesh | None = None,
                  data_axis: Hashable = "data") -> jax.Array:
  """Counts the base classifier's argmax classes on `num` noisy copies of each input.

  Noise is added in [0, 1] pixel space without clipping, as in Cohen et al.
  The device evaluates `logits_fn` on fixed batches of `batch_size` noisy
  copies, which may mix copies of several inputs; see the module docstring for
  the key scheme that makes counts independent of `batch_size` and batching.

  Jittable with `num`, `batch_size`, `num_classes`, `noise`, `mesh` static
  (value checks are skipped on traced arguments).

  Args:
    key: a single PRNG key (input i uses `fold_in(key, i)`) or a key array of
      shape `[B]`, one per input.
    logits_fn: pure function from images `[N, H, W, C]` in [0, 1] to logits
      `[N, num_classes]`.
    x: inputs `[B, H, W, C]` with values in [0, 1].
    sigma: noise standard deviation (> 0), in pixel units.
    num: noise draws per input (>= 1).
    batch_size: noisy copies per forward pass on each device (>= 1).
    num_classes: number of classes; inferred from `logits_fn` when None.
    noise: 'gaussian' (L2 certificates) or 'uniform' (L1, uniform on
      `[-sqrt(3) sigma, sqrt(3) sigma]` per coordinate).
    mesh: a Mesh over which to split the inputs; inferred from `x`'s
      NamedSharding when None. `B` must be divisible by the data-axis size.
    data_axis: the mesh axis (or tuple of axes) the inputs are split over.

  Returns:
    int32 counts `[B, num_classes]`; each row sums to `num`.

  Raises:
    ValueError: on a bad key, sigma, num, batch_size, noise, image batch
      (rank, dtype, range, NaN) or logits shape.

  References:
    Cohen, Rosenfeld & Kolter, ICML 2019 (`_sample_noise`).
  """
  num = validation.check_int_at_least(num, "num", 1)
  prepared = _prepare(logits_fn, x, sigma, batch_size, num_classes, noise, mesh, data_axis)
  keys = _per_input_keys(key, prepared.x.shape[0])
  return _counts_for_keys(keys, prepared, num, int(batch_size), noise)
