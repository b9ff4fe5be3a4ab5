"""Smoothing training objectives: learning under jit, fresh noise, the papers'
formulas on fixed logits, the SmoothAdv attack, hyperparameter errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special as scipy_special

from certjax.smoothing import soft_smoothing
from certjax.training import objectives
from certjax.training.objectives import smoothing as smoothing_objectives

NUM_CLASSES = 4
SHAPE = (8, 8, 1)
BATCH = 32


class TinyNet(nn.Module):
  """A small MLP; with `batch_norm` a BatchNorm layer exercises model_state."""
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(32)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(NUM_CLASSES)(nn.relu(x))


def make_data(seed):
  """Four classes: which quadrant of the image is bright (NumPy: no eager JAX ops)."""
  labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, BATCH)
  images = np.full((BATCH, 8, 8, 1), 0.1, np.float32)
  for i, label in enumerate(labels):
    r, c = (label // 2) * 4, (label % 2) * 4
    images[i, r:r + 4, c:c + 4] = 0.9
  return {"image": images, "label": labels.astype(np.int32)}


def make_ctx(model, total_steps=20):
  return objectives.ObjectiveContext(apply_fn=model.apply, num_classes=NUM_CLASSES,
                                     total_steps=total_steps, input_shape=SHAPE)


SMALL_HPARAMS = {
    "gaussian": {"sigma": 0.25},
    "smoothadv": {"sigma": 0.25, "eps": 0.5, "num_steps": 2, "num_noise": 2,
                  "eps_warmup_steps": 5},
    "macer": {"sigma": 0.25, "num_noise": 4, "lbd": 2.0},
    "consistency": {"sigma": 0.25, "num_noise": 2, "lbd": 5.0},
}


@pytest.fixture(scope="module")
def batch():
  return make_data(0)


@pytest.mark.parametrize("name", sorted(SMALL_HPARAMS))
def test_objective_trains_under_jit_with_fresh_noise(name, batch):
  model = TinyNet()
  params = model.init(jax.random.key(1), batch["image"])["params"]
  loss_fn = objectives.get_objective({"name": name, **SMALL_HPARAMS[name]}, make_ctx(model))
  tx = optax.adam(3e-2)

  @jax.jit
  def train_step(params, opt_state, key, step):
    # Fresh noise every step, as the training loop does it.
    step_key = jax.random.fold_in(key, step)
    (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, {}, batch, step_key, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state = tx.init(params)
  # The noise comes from the step key: another training key, or the same key
  # at another step, draws other noise and so another loss.
  loss_with = lambda k, s: float(train_step(params, opt_state, k, jnp.int32(s))[2])  # noqa: E731
  k1, k2 = jax.random.key(5), jax.random.key(6)
  assert loss_with(k1, 10) != loss_with(k2, 10)
  assert loss_with(k1, 10) != loss_with(k1, 11)

  train_key = jax.random.key(2)
  losses, eps = [], []
  for step in range(20):
    params, opt_state, loss, metrics = train_step(
        params, opt_state, train_key, jnp.int32(step))
    losses.append(float(loss))
    eps.append(float(metrics.get("eps", np.nan)))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
  assert float(metrics["accuracy"]) > 0.7
  if name == "smoothadv":
    # eps_warmup_steps=5: eps = 0.5 * (step + 1) / 5 for 5 steps, then 0.5.
    np.testing.assert_allclose(eps[:7], [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5], rtol=1e-6)


def test_gaussian_updates_batch_norm_state(batch):
  model = TinyNet(batch_norm=True)
  variables = model.init(jax.random.key(1), batch["image"])
  state = {"batch_stats": variables["batch_stats"]}
  loss_fn = objectives.get_objective({"name": "gaussian", "sigma": 0.5, "num_noise": 2},
                                     make_ctx(model))
  loss, (metrics, new_state) = jax.jit(loss_fn)(variables["params"], state, batch,
                                                jax.random.key(3), jnp.int32(0))
  assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 1.0
  old_mean = state["batch_stats"]["BatchNorm_0"]["mean"]
  new_mean = new_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert not np.allclose(old_mean, new_mean)


# ------------------------------------------------- formulas on fixed logits


def fixed_logits_ctx(table):
  """A 'model' returning `table` whatever the input (noise cannot matter)."""
  def apply_fn(variables, x, train=False, mutable=None):
    out = variables["params"]["scale"] * table + 0.0 * jnp.sum(x)
    return (out, {}) if mutable else out
  return objectives.ObjectiveContext(apply_fn=apply_fn, num_classes=table.shape[1],
                                     total_steps=10, input_shape=SHAPE)


def macer_reference(logits, labels, m, sigma, lbd, gamma, beta):
  """numpy transcription of RuntianZ/macer `macer_train` for one batch."""
  batch = labels.shape[0]
  outputs = logits.reshape(batch, m, -1)
  soft = scipy_special.softmax(outputs, axis=2).mean(1)
  classification = -np.log(soft + 1e-10)[np.arange(batch), labels].sum()
  beta_soft = scipy_special.softmax(outputs * beta, axis=2).mean(1)
  order = np.argsort(-beta_soft, axis=1)
  top2_idx = order[:, :2]
  top2 = np.take_along_axis(beta_soft, top2_idx, axis=1)
  correct = top2_idx[:, 0] == labels
  out0, out1 = top2[correct, 0], top2[correct, 1]
  with np.errstate(divide="ignore"):
    robust = scipy_special.ndtri(out1) - scipy_special.ndtri(out0)
  keep = ~np.isnan(robust) & ~np.isinf(robust) & (np.abs(robust) <= gamma)
  robust = (robust[keep] + gamma).sum() * sigma / 2
  return (classification + lbd * robust) / batch


def test_macer_matches_reference_formula():
  m, batch = 4, 6
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(batch * m, 5)).astype(np.float32) * 2.0
  # Example 5: one class dominates every copy, so the tempered softmax
  # saturates (p1 = 1): the reference drops it from the hinge (inf radius).
  logits[5 * m:(5 + 1) * m] = np.array([40.0, 0, 0, 0, 0])
  labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
  hp = {"sigma": 0.5, "num_noise": m, "lbd": 3.0, "gamma": 8.0, "beta": 2.0}
  ctx = fixed_logits_ctx(jnp.asarray(logits))
  loss_fn = objectives.get_objective({"name": "macer", **hp}, ctx)
  batch_data = {"image": jnp.zeros((batch,) + SHAPE), "label": jnp.asarray(labels)}
  params = {"scale": jnp.float32(1.0)}
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(p, {}, batch_data, jax.random.key(0), jnp.int32(0)), has_aux=True))
  (loss, (metrics, _)), grad = value_and_grad(params)
  expected = macer_reference(logits, labels, m, hp["sigma"], hp["lbd"], hp["gamma"], hp["beta"])
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  assert 0.0 < float(metrics["fraction_in_hinge"]) < 1.0
  # Gradients stay finite with the saturated example present.
  assert np.isfinite(float(grad["scale"]))


def consistency_reference(logits, labels, m, lbd, eta):
  """numpy transcription of Jeong & Shin's cross-entropy + consistency loss."""
  batch = labels.shape[0]
  per_copy = logits.reshape(batch, m, -1)
  log_softmax = per_copy - scipy_special.logsumexp(per_copy, axis=2, keepdims=True)
  xent = -log_softmax[np.arange(batch), :, labels].mean()
  softmax = np.exp(log_softmax)
  avg = softmax.mean(1)
  kl = sum((avg * (np.log(avg) - log_softmax[:, j])).sum(1).mean() for j in range(m)) / m
  ent = (-avg * np.log(np.maximum(avg, 1e-20))).sum(1).mean()
  return xent + lbd * kl + eta * ent


def test_consistency_matches_reference_formula():
  m, batch = 3, 5
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(batch * m, 4)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 0], np.int32)
  ctx = fixed_logits_ctx(jnp.asarray(logits))
  loss_fn = objectives.get_objective(
      {"name": "consistency", "sigma": 0.25, "num_noise": m, "lbd": 7.0, "eta": 0.3}, ctx)
  batch_data = {"image": jnp.zeros((batch,) + SHAPE), "label": jnp.asarray(labels)}
  loss, _ = jax.jit(loss_fn)({"scale": jnp.float32(1.0)}, {}, batch_data, jax.random.key(0),
                            jnp.int32(0))
  np.testing.assert_allclose(float(loss), consistency_reference(logits, labels, m, 7.0, 0.3),
                             rtol=2e-5)


# ---------------------------------------------------------------- SmoothAdv


def soft_smoothed_nll(logits_fn, x, labels, noise):
  b, m = noise.shape[:2]
  logits = logits_fn((x[:, None] + noise).reshape((b * m,) + x.shape[1:]))
  probs = jax.nn.softmax(logits).reshape(b, m, -1).mean(1)
  return -jnp.log(probs[jnp.arange(b), labels])


def test_smoothadv_pgd_stays_in_ball_and_raises_the_smoothed_loss():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(64, NUM_CLASSES)).astype(np.float32)
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights  # noqa: E731
  x = rng.uniform(size=(6,) + SHAPE).astype(np.float32)
  labels = np.argmax(x.reshape(6, -1) @ weights, axis=-1).astype(np.int32)
  noise = 0.25 * rng.normal(size=(6, 3) + SHAPE).astype(np.float32)
  eps = np.array([0.0, 0.1, 0.3, 0.5, 1.0, 2.0], np.float32)

  @jax.jit
  def attack(key, x, labels, noise, eps):
    x_adv = soft_smoothing.smoothadv_pgd(key, logits_fn, x, labels, eps=eps, num_steps=3,
                                             noise=noise)
    # EOT mode: fresh noise at every step.
    eot = soft_smoothing.smoothadv_pgd(key, logits_fn, x, labels, eps=0.5, num_steps=2,
                                           sigma=0.25, num_noise=4, resample_noise=True)
    return (x_adv, eot, soft_smoothed_nll(logits_fn, x, labels, noise),
            soft_smoothed_nll(logits_fn, x_adv, labels, noise))

  x_adv, eot, before, after = jax.device_get(attack(jax.random.key(3), x, labels, noise, eps))
  norms = np.sqrt(np.sum((x_adv - x) ** 2, axis=(1, 2, 3)))
  assert np.all(norms <= eps + 1e-5)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  np.testing.assert_allclose(after[0], before[0], rtol=1e-6)  # eps = 0: no move
  assert np.all(after[1:] > before[1:])
  eot_norms = np.sqrt(np.sum((eot - x) ** 2, axis=(1, 2, 3)))
  assert eot_norms.max() <= 0.5 + 1e-5 and eot_norms.min() > 0.1
  with pytest.raises(ValueError, match="sigma and num_noise"):
    soft_smoothing.smoothadv_pgd(jax.random.key(4), logits_fn, x, labels, eps=0.5,
                                     num_steps=3)
  with pytest.raises(ValueError, match="eps must be a scalar or one radius per image"):
    soft_smoothing.smoothadv_pgd(jax.random.key(4), logits_fn, x, labels,
                                     eps=jnp.ones(2), num_steps=3, noise=noise)


def test_smoothadv_warmup_fraction_of_the_run():
  hparams = objectives.objective_defaults("smoothadv")
  hparams.eps_warmup_fraction = 0.1
  assert smoothing_objectives.eps_warmup_steps(hparams, 250) == 25
  hparams.eps_warmup_steps = 7  # an explicit step count wins
  assert smoothing_objectives.eps_warmup_steps(hparams, 250) == 7


# ------------------------------------------------------------ bad hyperparameters


@pytest.mark.parametrize("name, bad, message", [
    ("gaussian", {"sigma": 0.0}, "objective.sigma"),
    ("gaussian", {"num_noise": 0}, "objective.num_noise"),
    ("smoothadv", {"eps": -1.0}, "objective.eps"),
    ("smoothadv", {"num_steps": 0}, "objective.num_steps"),
    ("smoothadv", {"eps_warmup_fraction": 1.5}, "eps_warmup_fraction"),
    ("macer", {"gamma": 0.0}, "objective.gamma"),
    ("macer", {"beta": -2.0}, "objective.beta"),
    ("consistency", {"num_noise": 1}, "objective.num_noise must be an integer >= 2"),
    ("consistency", {"eta": -0.1}, "objective.eta"),
    ("macer", {"lamda": 1.0}, "unknown hyperparameter"),
])
def test_bad_hyperparameters_are_named(name, bad, message):
  with pytest.raises(ValueError, match=message):
    objectives.get_objective({"name": name, **bad}, make_ctx(TinyNet()))
