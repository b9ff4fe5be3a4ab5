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

Keys and noise (`certjax.smoothing.noise`): input `i` has the key
`k_i = fold_in(key, i)` (or `key[i]` for a key array), and its draw `j` the
unit noise keyed `fold_in(k_i, j)`, generated inside the loop.

Speed. The noise fuses with the add to `x_i` into one elementwise pass over
the device batch (see `noise`), and on CPU the loop is compiled for 512-bit
vectors and with XLA's Eigen convolutions (`CPU_COMPILER_OPTIONS`).
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
import warnings
from typing import Any, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from certjax import validation
from certjax.smoothing import noise as noise_lib
from certjax.smoothing.noise import (NOISE_TYPES, input_keys, keys_for_indices,
                                     per_input_keys, sample_noise)
from certjax.types import Array, ArrayLike, LogitsFn, PRNGKey

__all__ = ["NOISE_TYPES", "Prepared", "counter_for", "counts_for_keys", "input_keys",
           "keys_for_indices", "prepare", "sample_counts", "sample_noise"]


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
  key_words = noise_lib.threefry_words(keys)

  def body(_, carry):
    counts, first_input, first_draw = carry
    # (first_input, first_draw) is the chunk's first pair; carrying it rather
    # than computing chunk * batch_size keeps indices far from int32 overflow.
    position = first_draw + offsets
    input_index = first_input + position // num
    draw_index = position % num
    valid = input_index < num_inputs
    input_index = jnp.minimum(input_index, num_inputs - 1)
    eps = noise_lib.draw_noise(key_words[input_index], draw_index, sample_shape, noise)
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
sample_counts_jit = jax.jit(_sample_counts, static_argnames=_STATIC_ARGNAMES)

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
# loop is compiled without them (see `cpu_options_accepted`).
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512,
                         "xla_cpu_experimental_ynn_fusion_type": ""}
sample_counts_jit_cpu = jax.jit(_sample_counts, static_argnames=_STATIC_ARGNAMES,
                                 compiler_options=CPU_COMPILER_OPTIONS)


@functools.cache
def cpu_options_accepted() -> bool:
  """Whether this jaxlib compiles with `CPU_COMPILER_OPTIONS` (checked once)."""
  try:
    probe = jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS)
    probe.lower(np.float32(0)).compile()
    return True
  except Exception as error:  # pylint: disable=broad-except
    warnings.warn(
        f"certjax.smoothing: XLA:CPU rejected the counting loop's compiler options "
        f"{CPU_COMPILER_OPTIONS} ({str(error).splitlines()[0][:200]}); compiling without "
        "them (correct, possibly slower).", RuntimeWarning, stacklevel=3)
    return False


def compiler_options(platform: str) -> dict | None:
  """The compiler options of the counting loop on a platform ('cpu', 'gpu', ...)."""
  if platform == "cpu" and cpu_options_accepted():
    return dict(CPU_COMPILER_OPTIONS)
  return None


def counter_for(x: Any, mesh: Mesh | None):
  """The jitted counting loop to call for inputs `x`: `sample_counts_jit_cpu`
  (compiled with `CPU_COMPILER_OPTIONS`) when x lives on CPU, else
  `sample_counts_jit`."""
  if mesh is not None:
    platform = mesh.devices.flat[0].platform
  elif not validation.is_concrete(x):
    # Inside the caller's jit the caller's compilation decides.
    return sample_counts_jit
  elif isinstance(x, jax.Array):
    platform = next(iter(x.devices())).platform
  else:
    platform = jax.default_backend()
  return sample_counts_jit_cpu if compiler_options(platform) else sample_counts_jit


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


class Prepared(NamedTuple):
  """Checked inputs of a count: the images, noise level, classes, the logits
  function split into its static part and its arrays, and the mesh."""
  x: Any
  sigma: Any
  num_classes: int
  fn_static: _StaticPart
  fn_dynamic: list
  mesh: Mesh | None
  data_axis: Any


def prepare(logits_fn, x, sigma, batch_size, num_classes, noise, mesh, data_axis) -> Prepared:
  """Validation and set-up shared by `sample_counts`, `core.certify` and `core.predict`.

  Raises:
    ValueError: on a bad logits_fn, noise, sigma, batch_size, image batch or mesh.
  """
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
  return Prepared(x, sigma, num_classes, fn_static, fn_dynamic, mesh, data_axis)


def counts_for_keys(keys: jax.Array, prepared: Prepared, num: int, batch_size: int,
                    noise: str) -> jax.Array:
  """Counts of `num` draws per input with per-input `keys` (one per input of `prepared`)."""
  return counter_for(prepared.x, prepared.mesh)(
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
  prepared = prepare(logits_fn, x, sigma, batch_size, num_classes, noise, mesh, data_axis)
  keys = per_input_keys(key, prepared.x.shape[0])
  return counts_for_keys(keys, prepared, num, int(batch_size), noise)
