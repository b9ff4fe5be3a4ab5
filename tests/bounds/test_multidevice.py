"""Bound propagation on a batch sharded over 4 CPU devices equals one device."""

import textwrap

from tests._subprocess import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from certjax import models
  from certjax.bounds import crown_ibp, ibp, linf_ball, margin_spec
  assert len(jax.devices()) == 4, jax.devices()
  model = models.get_model("ibp_small", num_classes=10, mean=(0.1307,), std=(0.3081,))
  variables = models.init_variables(model, jax.random.key(0), (1, 28, 28, 1))
  logits_fn = models.make_logits_fn(model, variables)
  x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
  spec = margin_spec(np.arange(8) % 10, 10)
  box = linf_ball(x, 0.02)
  ibp_fn = jax.jit(lambda b: ibp(logits_fn, b))
  crown_fn = jax.jit(lambda b, s: crown_ibp(logits_fn, b, s, upper=False))
  ref_ibp, ref_crown = ibp_fn(box), crown_fn(box, spec)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  box_s, spec_s = jax.device_put((box, spec), sharding)
  got_ibp, got_crown = ibp_fn(box_s), crown_fn(box_s, spec_s)
  assert len(got_ibp.lower.sharding.device_set) == 4
  for got, ref in ((got_ibp.lower, ref_ibp.lower), (got_ibp.upper, ref_ibp.upper),
                   (got_crown.lower, ref_crown.lower)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  print("OK")
""")


def test_bounds_on_four_devices_match_one_device():
  proc = run_on_cpu_devices(SCRIPT, 4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK" in proc.stdout
