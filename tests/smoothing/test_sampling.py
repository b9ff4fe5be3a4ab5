"""sample_counts: key scheme, batching invariance, masking, statistics, sharding."""

import functools
import math
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import special
from scipy import stats as scipy_stats

from certjax import smoothing
from certjax.smoothing import noise
from certjax.smoothing import sampling
from tests._subprocess import run_on_cpu_devices

SIGMA = 0.25
NUM = 37  # with 6 inputs: 222 pairs, ragged for batch sizes 16 and 7
NUM_INPUTS = 6


def linear_logits(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


@pytest.fixture(scope="module")
def weights():
  return jax.random.normal(jax.random.key(1), (64, 10)) * 0.5


@pytest.fixture(scope="module")
def logits_fn(weights):
  return functools.partial(linear_logits, weights)


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(2), (NUM_INPUTS, 8, 8, 1))


@pytest.fixture(scope="module")
def reference_counts(logits_fn, images):
  return np.asarray(smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 16))


def test_counts_match_materialised_reference(weights, images, reference_counts):
  # Independent of the chunked loop: draw every (input, draw) noise at once
  # with the documented keys fold_in(fold_in(key, i), j) and count in NumPy.
  assert reference_counts.shape == (NUM_INPUTS, 10)
  assert reference_counts.dtype == np.int32
  np.testing.assert_array_equal(reference_counts.sum(axis=1), NUM)
  expected = np.zeros((NUM_INPUTS, 10), np.int64)
  key = jax.random.key(0)
  for i in range(NUM_INPUTS):
    draw_keys = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(key, i), jnp.arange(NUM))
    eps = jax.vmap(lambda k: smoothing.sample_noise(k, (8, 8, 1), SIGMA))(draw_keys)
    predictions = np.argmax(linear_logits(weights, images[i] + eps), axis=1)
    expected[i] = np.bincount(predictions, minlength=10)
  np.testing.assert_array_equal(reference_counts, expected)
  # The counts are not degenerate (noise matters).
  assert (reference_counts > 0).sum() > NUM_INPUTS


def test_identical_keys_identical_counts(logits_fn, images, reference_counts):
  again = smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 16)
  np.testing.assert_array_equal(again, reference_counts)
  other = smoothing.sample_counts(jax.random.key(5), logits_fn, images, SIGMA, NUM, 16)
  assert not np.array_equal(other, reference_counts)
  # A legacy uint32 key gives the same stream as the typed key it wraps.
  legacy = smoothing.sample_counts(jax.random.PRNGKey(0), logits_fn, images, SIGMA, NUM, 16)
  np.testing.assert_array_equal(legacy, reference_counts)


def test_batch_size_and_batching_do_not_change_counts(logits_fn, images, reference_counts):
  ragged = smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 7)
  np.testing.assert_array_equal(ragged, reference_counts)
  # A device batch larger than all 222 draws is shrunk, not padded.
  huge = smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 1000)
  np.testing.assert_array_equal(huge, reference_counts)
  # One input at a time with its per-input key, and a dataset split in two
  # batches with input_keys(start=...), reproduce the batched counts.
  keys = smoothing.input_keys(jax.random.key(0), NUM_INPUTS)
  alone = [smoothing.sample_counts(keys[i:i + 1], logits_fn, images[i:i + 1], SIGMA, NUM, 16)
           for i in (0, 4)]
  np.testing.assert_array_equal(np.concatenate(alone), reference_counts[[0, 4]])
  second_half = smoothing.sample_counts(
      smoothing.input_keys(jax.random.key(0), 3, start=3), logits_fn, images[3:], SIGMA, NUM, 16)
  np.testing.assert_array_equal(second_half, reference_counts[3:])


def test_jit_vmap_and_new_weights_do_not_recompile(weights, logits_fn, images, reference_counts):
  jitted = jax.jit(functools.partial(
      smoothing.sample_counts, logits_fn=logits_fn, sigma=SIGMA, num=NUM, batch_size=16))
  np.testing.assert_array_equal(jitted(jax.random.key(0), x=images), reference_counts)
  # vmap over keys: each mapped key gives its unmapped counts.
  keys = jnp.stack([jax.random.key(0), jax.random.key(5)])
  mapped = jax.vmap(lambda k: smoothing.sample_counts(k, logits_fn, images, SIGMA, NUM, 16))(keys)
  np.testing.assert_array_equal(mapped[0], reference_counts)
  # On CPU the loop is compiled with its CPU options (512-bit vectors).
  counter = sampling.counter_for(images, None)
  assert counter is sampling.sample_counts_jit_cpu
  before = counter._cache_size()
  assert before >= 1
  # New weights in a new partial reuse the compiled loop: arrays are arguments.
  fresh = functools.partial(linear_logits, weights * 2.0)
  scaled = smoothing.sample_counts(jax.random.key(0), fresh, images, SIGMA, NUM, 16)
  assert counter._cache_size() == before
  assert scaled.shape == reference_counts.shape


def test_cpu_compiler_options_fall_back_when_rejected(monkeypatch):
  assert sampling.compiler_options("cpu") == sampling.CPU_COMPILER_OPTIONS
  assert sampling.compiler_options("gpu") is None
  monkeypatch.setattr(sampling, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": 1})
  sampling.cpu_options_accepted.cache_clear()
  try:
    with pytest.warns(RuntimeWarning, match="compiling without"):
      assert sampling.compiler_options("cpu") is None
    assert sampling.counter_for(np.zeros((1, 2, 2, 1), np.float32), None) is (
        sampling.sample_counts_jit)
  finally:
    sampling.cpu_options_accepted.cache_clear()


def test_sharded_over_one_device_mesh(logits_fn, images, reference_counts):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
  counts = smoothing.sample_counts(jax.random.key(0), logits_fn, sharded, SIGMA, NUM, 16)
  np.testing.assert_array_equal(counts, reference_counts)
  assert isinstance(counts.sharding, NamedSharding)
  explicit = smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 16,
                                     mesh=mesh)
  np.testing.assert_array_equal(explicit, reference_counts)
  with pytest.raises(ValueError, match="data_axis 'batch'"):
    smoothing.sample_counts(jax.random.key(0), logits_fn, images, SIGMA, NUM, 16, mesh=mesh,
                            data_axis="batch")


def test_threefry_noise_is_jax_randoms_stream():
  # The unrolled hash is JAX's threefry2x32 bit for bit.
  words = jax.random.bits(jax.random.key(7), (4, 300), jnp.uint32)
  ours = jax.jit(noise.threefry2x32)(words[0, 0], words[1, 0], words[2], words[3])
  # Counts of even size are hashed in pairs (count[c], count[c + size / 2]).
  theirs = jax.extend.random.threefry_2x32(words[:2, 0], words[2:].reshape(-1))
  np.testing.assert_array_equal(np.concatenate(ours), theirs)
  # The draw for fold_in(k, j) is jax.random's classic-layout draw: exactly
  # for uniform noise, up to erfinv's rounding (XLA's own is off by up to
  # 2e-5 in the tails) for Gaussian noise. An odd size pads the last pair.
  keys = jax.random.split(jax.random.key(8), 5)
  draws = jnp.array([0, 1, 2, 40, 2**31 + 5], jnp.uint32)
  cases = [((4, 4, 1), "uniform"), ((3, 3, 1), "gaussian")]

  @jax.jit
  def ours(words, draws):
    return [noise.draw_noise(words, draws, *case) for case in cases]

  @jax.jit
  def theirs(keys, draws):
    with jax.threefry_partitionable(False):
      folded = jax.vmap(jax.random.fold_in)(keys, draws)
      return [jax.vmap(lambda k, s=shape: jax.random.normal(k, s))(folded)
              if noise == "gaussian" else
              jax.vmap(lambda k, s=shape: jax.random.uniform(k, s, minval=-1.0, maxval=1.0))(
                  folded) * math.sqrt(3.0)
              for shape, noise in cases]

  for case, mine, reference in zip(cases, ours(jax.random.key_data(keys), draws),
                                   theirs(keys, draws)):
    if case[1] == "gaussian":
      np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-4, err_msg=str(case))
    else:
      np.testing.assert_array_equal(mine, reference, err_msg=str(case))
  # sample_noise is the loop's draw (sigma 1), bit for bit.
  np.testing.assert_array_equal(
      smoothing.sample_noise(jax.random.fold_in(keys[3], draws[3]), (3, 3, 1), 1.0),
      ours(jax.random.key_data(keys), draws)[1][3])


def test_gaussian_transform_accuracy_and_distribution():
  # Every float32 uniform the generator can produce near the ends, and a sweep.
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  ends = np.array([low, low + 2**-23, -0.99, -0.5, 0.0, 0.3, 0.9966, 0.999,
                   1 - 3 * 2**-24, 1 - 2**-22], np.float32)
  u = np.concatenate([ends, np.linspace(-0.999999, 0.999999, 4001, dtype=np.float32)])
  ours = np.asarray(jax.jit(noise.erfinv)(u), np.float64)
  exact = special.erfinv(u.astype(np.float64))
  assert np.max(np.abs(ours - exact) / np.maximum(1.0, np.abs(exact))) < 2e-6
  # The noise is standard normal: a Kolmogorov-Smirnov test on 200k values.
  values = np.asarray(smoothing.sample_noise(jax.random.key(9), (200_000,), 1.0)).ravel()
  assert scipy_stats.kstest(values, "norm").pvalue > 1e-3
  assert abs(values.mean()) < 0.01 and abs(values.std() - 1.0) < 0.01


def test_other_key_implementations_do_not_depend_on_batching(logits_fn, images):
  # rbg's bit generator gives a batch's values from its first key, so the
  # noise is keyed through threefry words hashed from the key data instead.
  key = jax.random.key(0, impl="rbg")
  counts = smoothing.sample_counts(key, logits_fn, images, SIGMA, NUM, 16)
  np.testing.assert_array_equal(counts.sum(axis=1), NUM)
  np.testing.assert_array_equal(
      smoothing.sample_counts(key, logits_fn, images, SIGMA, NUM, 7), counts)
  keys = smoothing.input_keys(key, NUM_INPUTS)
  alone = smoothing.sample_counts(keys[4:5], logits_fn, images[4:5], SIGMA, NUM, 16)
  np.testing.assert_array_equal(alone, counts[4:5])
  # unsafe_rbg's fold_in does not batch: input_keys still gives key i = fold_in(key, i).
  unsafe = jax.random.key(3, impl="unsafe_rbg")
  split = smoothing.input_keys(unsafe, 3, start=2)
  for i in range(3):
    np.testing.assert_array_equal(jax.random.key_data(split[i]),
                                  jax.random.key_data(jax.random.fold_in(unsafe, 2 + i)))


def _threshold_logits(x, threshold):
  # Class 0 iff the first pixel's noise is below `threshold` (inputs are 0.5).
  first = x[:, 0, 0, 0] - 0.5
  return jnp.stack([threshold - first, jnp.zeros_like(first)], axis=1)


@pytest.mark.parametrize("noise,p_a", [
    ("gaussian", scipy_stats.norm.cdf(0.1 / SIGMA)),
    ("uniform", 0.5 + 0.1 / (2 * math.sqrt(3) * SIGMA)),
], ids=["gaussian", "uniform"])
def test_noise_distribution_and_confidence_bound_validity(noise, p_a):
  num_inputs, num, alpha = 256, 100, 0.1
  x = jnp.full((num_inputs, 8, 8, 1), 0.5)
  logits_fn = functools.partial(_threshold_logits, threshold=0.1)
  counts = np.asarray(smoothing.sample_counts(
      jax.random.key(3), logits_fn, x, SIGMA, num, 128, noise=noise))
  n_a = counts[:, 0]
  # The empirical pA matches the noise's true CDF at the threshold.
  se = math.sqrt(p_a * (1 - p_a) / (num_inputs * num))
  assert abs(n_a.mean() / num - p_a) < 4 * se
  # Inputs draw independent noise: the spread of nA across inputs is binomial
  # (a shared stream would give zero variance).
  variance_ratio = n_a.var(ddof=1) / (num * p_a * (1 - p_a))
  assert 0.7 < variance_ratio < 1.4
  # The one-sided bound exceeds the true pA in at most about alpha of trials.
  failures = int(np.sum(smoothing.clopper_pearson_lower(n_a, num, alpha) > p_a))
  assert failures <= scipy_stats.binom.ppf(0.999, num_inputs, alpha)


def test_bad_inputs(logits_fn, images):
  key = jax.random.key(0)
  cases = [
      (dict(sigma=0.0), "sigma must be a finite number > 0"),
      (dict(sigma=-1.0), "sigma"),
      (dict(num=0), "num must be an integer >= 1"),
      (dict(batch_size=0), "batch_size must be an integer >= 1"),
      (dict(batch_size=2.5), "batch_size"),
      (dict(x=images + 1.0), r"x must lie in \[0.0, 1.0\]"),
      (dict(x=images.at[0, 0, 0, 0].set(jnp.nan)), "NaN"),
      (dict(x=images[0]), "rank 4"),
      (dict(noise="laplace"), "Unknown noise 'laplace'"),
      (dict(key=jax.random.split(key, 3)), r"one key per input \(shape \(6,\)\)"),
      (dict(key=0), "PRNG key"),
      (dict(num_classes=3), "num_classes=3 is smaller than the 10 logits"),
      (dict(logits_fn=lambda z: z[:, 0, 0, 0]), r"logits \[N, num_classes\]"),
  ]
  with pytest.raises(ValueError, match="start must be a non-negative integer"):
    smoothing.input_keys(key, 3, start=-1)
  for override, message in cases:
    args = dict(key=key, logits_fn=logits_fn, x=images, sigma=SIGMA, num=NUM, batch_size=16)
    args.update(override)
    with pytest.raises(ValueError, match=message):
      smoothing.sample_counts(**args)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, os
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    if os.environ.get("CERTJAX_JAX_CACHE"):
      jax.config.update("jax_compilation_cache_dir", os.environ["CERTJAX_JAX_CACHE"])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from certjax import smoothing
    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    fn = functools.partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
    x = rng.uniform(size=(6, 8, 8, 1)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    key = jax.random.key(0)
    counts = smoothing.sample_counts(key, fn, xs, 0.25, 37, 16)
    assert len(counts.sharding.device_set) == 2, counts.sharding
    single = smoothing.sample_counts(key, fn, x, 0.25, 37, 16)
    np.testing.assert_array_equal(counts, single)
    assert len(np.unique(np.asarray(counts), axis=0)) == 6
    try:
      smoothing.sample_counts(key, fn, x[:5], 0.25, 37, 16, mesh=mesh)
    except ValueError as e:
      assert "divisible" in str(e)
    else:
      raise AssertionError("odd batch on 2 devices accepted")
    print("OK")
""")


def test_two_cpu_devices_match_single_device():
  result = run_on_cpu_devices(_MULTI_DEVICE_SCRIPT, 2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


def test_keys_for_indices_are_input_keys_at_arbitrary_indices():
  key = jax.random.key(7)
  indices = np.array([5, 2, 9], np.int64)
  got = jax.random.key_data(smoothing.keys_for_indices(key, indices))
  contiguous = jax.random.key_data(smoothing.input_keys(key, 10))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(contiguous)[indices])
  with pytest.raises(ValueError, match="non-negative integers"):
    smoothing.keys_for_indices(key, np.array([1, -1]))
  with pytest.raises(ValueError, match="single key"):
    smoothing.keys_for_indices(jax.random.split(key, 2), indices)
