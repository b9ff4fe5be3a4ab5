"""`robust_accuracy(..., mesh=...)` splits batches over devices and matches one device."""

import textwrap

from tests._subprocess import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
  import functools
  import jax, jax.numpy as jnp, numpy as np
  from certjax import attacks, parallel
  assert jax.device_count() == 4, jax.devices()

  def apply(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"]) @ params["w2"]

  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(12, 16)), jnp.float32) * 0.5,
            "w2": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  logits_fn = jax.tree_util.Partial(apply, params)
  x = rng.random((10, 2, 2, 3), dtype=np.float32)
  y = np.asarray(jnp.argmax(logits_fn(x), -1))

  seen = []
  pgd = attacks.make_pgd(num_steps=3)
  def recording_pgd(key, fn, xb, yb, eps):
    jax.debug.inspect_array_sharding(
        xb, callback=lambda s: seen.append(len(s.device_set)))
    return pgd(key, fn, xb, yb, eps)

  suite = [("fgsm", attacks.make_fgm()), ("pgd", recording_pgd)]
  kwargs = dict(attacks=suite, eps_list=[0.05, 0.2], norm="linf", batch_size=6)
  one = attacks.robust_accuracy(jax.random.key(0), logits_fn, x, y, **kwargs)
  assert seen and set(seen) == {1}, seen
  seen.clear()
  four = attacks.robust_accuracy(jax.random.key(0), logits_fn, x, y,
                                 mesh=parallel.make_mesh(), **kwargs)
  # batch_size 6 is rounded up to 8 (2 rows per device); the padding rows
  # must not count.
  assert seen and set(seen) == {4}, seen
  assert four.num_examples == 10
  np.testing.assert_array_equal(one.correct, four.correct)
  for a, b in zip(one.per_eps, four.per_eps):
    np.testing.assert_array_equal(a.robust, b.robust)
    assert a.robust_accuracy_after == b.robust_accuracy_after
  assert 0 < one.per_eps[1].robust_accuracy < one.clean_accuracy, one.table()
  # Any axis name, as smoothing's data_axis: a 2 x 2 mesh split over 'batch'.
  seen.clear()
  grid = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("batch", "model"))
  two = attacks.robust_accuracy(jax.random.key(0), logits_fn, x, y, mesh=grid,
                                data_axis="batch", **kwargs)
  assert seen and set(seen) == {4}, seen  # split over 'batch', replicated over 'model'
  for a, b in zip(one.per_eps, two.per_eps):
    np.testing.assert_array_equal(a.robust, b.robust)
  try:
    attacks.robust_accuracy(jax.random.key(0), logits_fn, x, y, mesh=grid, data_axis="data",
                            **kwargs)
    raise AssertionError("an unknown data_axis must be an error")
  except ValueError as e:
    assert "data_axis 'data' is not an axis of the mesh" in str(e), e
  print("OK")
""")


def test_robust_accuracy_on_four_devices_matches_one_device():
  proc = run_on_cpu_devices(SCRIPT, 4)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
