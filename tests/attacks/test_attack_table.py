"""Every attack under jit and vmap, from one table (optax's alias_test style).

Each row is (name, factory, kwargs): `factory(**kwargs)` is an `AttackFn`,
`attack_fn(key, logits_fn, x, y, eps)`. One test runs every row under every
transformation and checks what any attack must do: stay in the eps-ball and
the [0, 1] box, keep the input's shape and dtype, and give the same result
whichever way it is run. A new `make_*` factory fails
`test_the_table_covers_every_attack_factory` until it has a row.

Kept tiny (compile time dominates on CPU): the 7x7 MNIST MLP, batches of 8,
a few steps or queries.
"""

import functools

import jax
import numpy as np
import pytest

from certjax import attacks
from tests.attacks.conftest import EPS, fast_jit

ROWS = [
    ("cw_l2", attacks.make_cw_l2, {"num_steps": 5, "binary_search_steps": 2,
                                   "learning_rate": 0.1}),
    ("cw_linf", attacks.make_cw_linf, {"num_steps": 5, "num_restarts": 2}),
    ("fgsm", attacks.make_fgm, {"norm": "linf"}),
    ("fgm_l2", attacks.make_fgm, {"norm": "l2"}),
    ("pgd_restarts", attacks.make_pgd, {"num_steps": 3, "num_restarts": 2,
                                        "schedule": "cosine"}),
    ("mi_fgsm_l2", attacks.make_mi_fgsm, {"norm": "l2", "num_steps": 3}),
    ("apgd", attacks.make_apgd, {"num_steps": 3}),
    ("apgd_t", attacks.make_apgd_targeted, {"num_steps": 3, "num_target_classes": 2}),
    ("square", attacks.make_square, {"num_queries": 6}),
    ("fab_t", attacks.make_fab_targeted, {"num_steps": 3, "num_target_classes": 2}),
    ("fab_l1", attacks.make_fab, {"norm": "l1", "num_steps": 2, "num_restarts": 2}),
]
# A row drawing no random numbers whose eager call is cheap enough to be a
# third reference (eager dispatch compiles every primitive on its own).
EAGER = ("fgsm",)
TRANSFORMS = ("jit", "vmap")
NUM_SLICES, BATCH = 2, 8  # vmap runs NUM_SLICES batches of BATCH at once


def _np_norm(v, norm):
  flat = np.asarray(v, np.float64).reshape(len(v), -1)
  return {"linf": np.abs(flat).max(1), "l2": np.sqrt((flat ** 2).sum(1)),
          "l1": np.abs(flat).sum(1)}[norm]


@pytest.fixture(scope="module")
def data(mnist):
  """NUM_SLICES batches of test digits, with a different radius per example."""
  n = NUM_SLICES * BATCH
  x = mnist["x_test"][:n].reshape(NUM_SLICES, BATCH, *mnist["x_test"].shape[1:])
  y = mnist["y_test"][:n].reshape(NUM_SLICES, BATCH)
  scale = np.linspace(0.5, 1.5, n, dtype=np.float32).reshape(NUM_SLICES, BATCH)
  return x, y, scale


@functools.lru_cache(maxsize=None)
def _jitted(name):
  """The row's attack jitted once for the model and batch shape (shared by tests)."""
  _, factory, kwargs = next(row for row in ROWS if row[0] == name)
  return fast_jit(factory(**kwargs))


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name,factory,kwargs", ROWS, ids=[row[0] for row in ROWS])
def test_attack_under_transformation(trained_mlp, data, name, factory, kwargs, transform):
  model = trained_mlp[0]
  attack_fn = factory(**kwargs)
  norm = attack_fn.config["norm"]
  x, y, scale = data
  eps = EPS[norm] * scale
  key = jax.random.key(0)
  jitted = _jitted(name)
  # The reference: each batch on its own through jit. The key is shared, so
  # vmapped batches draw the same random numbers as these calls.
  reference = [np.asarray(jitted(key, model, x[i], y[i], eps[i])) for i in range(NUM_SLICES)]
  if transform == "jit":
    out = reference
    if name in EAGER:
      eager = attack_fn(key, model, x[0], y[0], eps[0])
      np.testing.assert_allclose(eager, reference[0], atol=1e-6)
  else:
    batched = fast_jit(jax.vmap(attack_fn, in_axes=(None, None, 0, 0, 0)))
    out = batched(key, model, x, y, eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(out, np.stack(reference), atol=1e-6)
  moved = 0
  for i in range(NUM_SLICES):
    x_adv = np.asarray(out[i])
    assert x_adv.shape == x[i].shape and x_adv.dtype == x[i].dtype
    sizes = _np_norm(x_adv - x[i], norm)
    assert np.all(sizes <= eps[i] * (1 + 1e-5) + 1e-6), (sizes, eps[i])
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    moved += int(np.sum(sizes > 0))
  assert moved > 0  # an attack returning x unchanged would pass the rest


def test_the_table_covers_every_attack_factory():
  factories = {getattr(attacks, n) for n in attacks.__all__ if n.startswith("make_")}
  assert factories == {factory for _, factory, _ in ROWS}
