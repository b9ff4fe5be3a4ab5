"""Tests of property inference (certjax.privacy.property).

Oracles: a float64 NumPy transcription of the DeepSets representation; the
function an MLP computes (a hidden-neuron permutation and the sorted
canonical form must both preserve it, and a layer list read from a certjax
`MLP` must reproduce `model.apply`); brute-force pairwise AUC; exact counts
of the drawn subsets; and, end to end, 64 tiny shadow MLPs trained in one
vmapped optax loop on synthetic data whose class balance (0.8 vs 0.2) is the
planted property, against the same models with shuffled property labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax.privacy import property as prop
from certjax.data import membership as membership_lib

WIDTHS = (5, 7, 6, 3)  # input, two hidden layers, classes

# One compiled program per shape instead of one per eager operation.
deepsets_features = jax.jit(prop.permutation_invariant_features)
sorted_features = jax.jit(prop.sorted_neuron_features)


def random_layers(seed, num_models=3, widths=WIDTHS):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(num_models, a, b)).astype(np.float32),
           rng.normal(size=(num_models, b)).astype(np.float32))
          for a, b in zip(widths[:-1], widths[1:])]


def mlp_forward(layers, x):
  """[K, B, classes] outputs of ReLU MLPs given as stacked (kernel, bias) layers."""
  h = np.broadcast_to(np.asarray(x, np.float64), (layers[0][0].shape[0],) + np.shape(x))
  for i, (kernel, bias) in enumerate(layers):
    h = np.einsum("kbi,kio->kbo", h, np.asarray(kernel, np.float64))
    h = h + np.asarray(bias, np.float64)[:, None]
    if i < len(layers) - 1:
      h = np.maximum(h, 0.0)
  return h


def permute_hidden(layers, seed):
  """The same networks with every hidden layer's neurons permuted (per model)."""
  rng = np.random.default_rng(seed)
  layers = [(np.array(k), np.array(b)) for k, b in layers]
  for i in range(len(layers) - 1):
    for m in range(layers[i][0].shape[0]):
      perm = rng.permutation(layers[i][0].shape[2])
      layers[i][0][m] = layers[i][0][m][:, perm]
      layers[i][1][m] = layers[i][1][m][perm]
      layers[i + 1][0][m] = layers[i + 1][0][m][perm, :]
  return layers


def deepsets_numpy(phi, layers):
  """Float64 transcription of the representation in the module docstring."""
  def mlp(params, x):
    for i, (w, b) in enumerate(params):
      x = x @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
      x = np.maximum(x, 0.0) if i < len(params) - 1 else x
    return x

  out = []
  for model in range(layers[0][0].shape[0]):
    parts, nodes = [], None
    for i, (kernel, bias) in enumerate(layers):
      w, b = np.asarray(kernel[model], np.float64), np.asarray(bias[model], np.float64)
      rows = []
      for j in range(w.shape[1]):
        if nodes is None:
          rows.append(np.concatenate([w[:, j], [b[j]]]))
        else:
          message = sum(w[k, j] * nodes[k] for k in range(w.shape[0]))
          rows.append(np.concatenate([message, [b[j]], nodes.sum(axis=0)]))
      nodes = mlp(phi[i], np.stack(rows))
      parts.append(nodes.sum(axis=0) if i < len(layers) - 1 else nodes.ravel())
    out.append(np.concatenate(parts))
  return np.stack(out)


# ----------------------------------------------------------- representations


def test_deepsets_matches_float64_transcription_and_is_permutation_invariant():
  layers = random_layers(0)
  params = prop.init_deepsets(jax.random.key(0), layers, node_sizes=(8,), set_dim=4)
  features = np.asarray(deepsets_features(layers, params))
  assert features.shape == (3, 4 * (2 + 3))  # two summed hidden layers, 3 classes concatenated
  np.testing.assert_allclose(features, deepsets_numpy(params["phi"], layers), rtol=1e-4, atol=1e-4)

  permuted = permute_hidden(layers, seed=1)
  x = np.random.default_rng(2).normal(size=(4, WIDTHS[0]))
  # The permutation is a symmetry: each permuted network computes the same function.
  np.testing.assert_allclose(mlp_forward(permuted, x), mlp_forward(layers, x), rtol=1e-6)
  assert not np.allclose(permuted[1][0], layers[1][0])
  np.testing.assert_allclose(np.asarray(deepsets_features(permuted, params)), features,
                             rtol=1e-5, atol=1e-5)

  scale = np.abs(features).max()
  other = np.asarray(deepsets_features(random_layers(5), params))
  assert np.abs(other - features).max() > 0.05 * scale
  # Inputs and classes are ordered, not symmetries: swapping them must show.
  swapped_inputs = [(layers[0][0][:, ::-1], layers[0][1])] + layers[1:]
  swapped_classes = layers[:-1] + [(layers[-1][0][..., ::-1], layers[-1][1][:, ::-1])]
  for swapped in (swapped_inputs, swapped_classes):
    changed = np.asarray(deepsets_features(swapped, params))
    assert np.abs(changed - features).max() > 0.05 * scale


def test_sorted_features_are_a_canonical_form_of_the_same_network():
  layers = random_layers(3)
  features = np.asarray(sorted_features(layers))
  assert features.shape == (3, sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:])))
  # Bit for bit under any hidden permutation; different for a different network.
  np.testing.assert_array_equal(np.asarray(sorted_features(permute_hidden(layers, 4))), features)
  assert np.abs(np.asarray(sorted_features(random_layers(6))) - features).max() > 0.1

  # Unflattened, the features are the same network with sorted hidden neurons.
  rebuilt, start = [], 0
  for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
    kernel = features[:, start:start + a * b].reshape(3, a, b)
    bias = features[:, start + a * b:start + a * b + b]
    rebuilt.append((kernel, bias))
    start += a * b + b
  x = np.random.default_rng(7).normal(size=(6, WIDTHS[0]))
  np.testing.assert_allclose(mlp_forward(rebuilt, x), mlp_forward(layers, x), rtol=1e-5, atol=1e-5)
  for kernel, bias in rebuilt[:-1]:
    norms = (kernel.astype(np.float64) ** 2).sum(axis=1) + bias.astype(np.float64) ** 2
    assert np.all(np.diff(norms, axis=1) >= 0)
  np.testing.assert_array_equal(rebuilt[-1][1], layers[-1][1])  # classes keep their order


def test_output_features_are_flattened_softmax():
  logits = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(prop.output_features(logits)), expected.reshape(4, 15),
                             rtol=1e-5, atol=1e-7)


def test_dense_layers_from_certjax_mlp_and_flax_names():
  from certjax.models.mlp import MLP  # pylint: disable=import-outside-toplevel
  model = MLP(num_classes=3, mean=(0.0,), std=(1.0,), hidden=(4, 5))
  x = np.random.default_rng(0).uniform(size=(6, 2, 3, 1)).astype(np.float32)
  # The names MLP uses (model.init costs seconds of tracing; apply checks them).
  widths, names = (6, 4, 5, 3), ("dense_0", "dense_1", "head")
  random = random_layers(0, num_models=2, widths=widths)
  stacked = {"params": {name: {"kernel": k, "bias": b} for name, (k, b) in zip(names, random)}}
  layers = prop.dense_layers_from_params(stacked)
  assert [k.shape for k, _ in layers] == [(2, 6, 4), (2, 4, 5), (2, 5, 3)]
  expected = jax.jit(jax.vmap(lambda v: model.apply(v, x)))(stacked)
  np.testing.assert_allclose(mlp_forward(layers, x.reshape(6, -1)), expected, rtol=1e-5, atol=1e-5)

  # Flax's automatic names, no wrapper: ordered by index (Dense_10 after Dense_2),
  # not by name or insertion.
  widths = list(range(2, 14))
  flax_style = {f"Dense_{i}": {"kernel": np.zeros((1, a, b), np.float32),
                               "bias": np.zeros((1, b), np.float32)}
                for i, (a, b) in reversed(list(enumerate(zip(widths[:-1], widths[1:]))))}
  assert [k.shape[1] for k, _ in prop.dense_layers_from_params(flax_style)] == widths[:-1]

  one = {"kernel": np.zeros((1, 2, 2), np.float32), "bias": np.zeros((1, 2), np.float32)}
  with pytest.raises(ValueError, match="unexpected module 'Conv_0'"):
    prop.dense_layers_from_params({"params": {"Conv_0": one, "head": one}})
  with pytest.raises(ValueError, match="indices must be 0, 1"):
    prop.dense_layers_from_params({"dense_0": one, "dense_2": one})
  with pytest.raises(ValueError, match="stacked over models"):
    prop.dense_layers_from_params({"head": {"kernel": np.zeros((2, 2), np.float32),
                                            "bias": np.zeros((2,), np.float32)}})


# ------------------------------------------------------------ subset masks


def test_property_masks_exact_fractions_and_independent_draws():
  labels = np.repeat(np.arange(4), 30).astype(np.int32)  # 30 of each of 4 classes
  kwargs = dict(property_class=2, fraction_with=0.75, fraction_without=0.25, subset_size=20)
  masks, plabels = membership_lib.property_masks(labels, 4, 0, **kwargs)
  masks, plabels = np.asarray(masks), np.asarray(plabels)
  assert masks.shape == (4, 120) and masks.dtype == bool
  np.testing.assert_array_equal(plabels, [1, 0, 1, 0])
  np.testing.assert_array_equal(masks.sum(axis=1), 20)
  np.testing.assert_array_equal((masks & (labels == 2)).sum(axis=1), [15, 5, 15, 5])
  assert len({m.tobytes() for m in masks}) == 4  # every model draws its own subset
  again, _ = membership_lib.property_masks(labels, 4, 0, **kwargs)
  np.testing.assert_array_equal(np.asarray(again), masks)
  other, _ = membership_lib.property_masks(labels, 4, 1, **kwargs)
  assert not np.any(np.all(np.asarray(other) == masks, axis=1))
  # A whole class, or none of it: one side of the draw is empty.
  every, _ = membership_lib.property_masks(labels, 4, 0, property_class=0,
                                           fraction_with=1.0, fraction_without=0.0, subset_size=30)
  np.testing.assert_array_equal(np.asarray(every)[0], labels == 0)


@pytest.mark.parametrize("change, message", [
    (dict(fraction_with=1.2), r"fraction_with must be a number in the closed interval \[0, 1\]"),
    (dict(fraction_without=-0.1), r"fraction_without must be a number in the closed interval"),
    (dict(fraction_with=0.25), "must differ"),
    (dict(subset_size=40, fraction_with=1.0),
     "needs 40 examples of class 2 but the pool has only 30"),
    (dict(subset_size=121), "larger than the pool of 120"),
    (dict(fraction_with=0.33), "whole number of examples"),
    (dict(num_models=5), "num_models must be even"),
])
def test_property_masks_errors(change, message):
  labels = np.repeat(np.arange(4), 30).astype(np.int32)
  kwargs = dict(num_models=4, property_class=2, fraction_with=0.75, fraction_without=0.25,
                subset_size=20)
  kwargs.update(change)
  num_models = kwargs.pop("num_models")
  with pytest.raises(ValueError, match=message):
    membership_lib.property_masks(labels, num_models, 0, **kwargs)


def test_rotated_property_masks_exact_shares_within_uniform_subsets():
  masks, rotated, plabels = membership_lib.rotated_property_masks(
      120, 4, 0, fraction_with=0.5, fraction_without=0.1, subset_size=20)
  assert masks.shape == rotated.shape == (4, 120) and rotated.dtype == bool
  np.testing.assert_array_equal(plabels, [1, 0, 1, 0])
  np.testing.assert_array_equal(masks.sum(1), 20)
  np.testing.assert_array_equal(rotated.sum(1), [10, 2, 10, 2])
  assert not np.any(rotated & ~masks)  # a model rotates only its own examples
  assert len({m.tobytes() for m in masks}) == 4
  again = membership_lib.rotated_property_masks(120, 4, 0, fraction_with=0.5,
                                                fraction_without=0.1, subset_size=20)
  np.testing.assert_array_equal(again[1], rotated)
  np.testing.assert_array_equal(membership_lib.rotated_labels_of(masks, rotated, 0.5, 0.1),
                                plabels)
  with pytest.raises(ValueError, match="num_models must be even"):
    membership_lib.rotated_property_masks(120, 3, 0, fraction_with=0.5, fraction_without=0.1,
                                          subset_size=20)
  with pytest.raises(ValueError, match="whole number of examples"):
    membership_lib.rotated_property_masks(120, 4, 0, fraction_with=0.33, fraction_without=0.1,
                                          subset_size=20)


def test_rotated_copies_are_exact_quarter_turns_at_the_slots():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 3, 3, 1), np.uint8)
  labels = np.arange(6, dtype=np.int32)
  rotated = np.zeros((2, 6), bool)
  rotated[0, [1, 4]] = rotated[1, [4, 5]] = True
  extended, extended_labels, slot = membership_lib.rotated_copies(images, labels, rotated, 90)
  np.testing.assert_array_equal(slot, [-1, 6, -1, -1, 7, 8])
  assert extended.shape == (9, 3, 3, 1)
  np.testing.assert_array_equal(extended[:6], images)
  for i in (1, 4, 5):  # counter-clockwise: the first row becomes the first column, upwards
    np.testing.assert_array_equal(extended[slot[i], :, 0, 0], images[i, 0, ::-1, 0])
    assert extended_labels[slot[i]] == labels[i]
  half = membership_lib.rotated_copies(images, labels, rotated, 180)[0]
  np.testing.assert_array_equal(half[6], images[1, ::-1, ::-1])
  with pytest.raises(ValueError, match="degrees must be 90, 180 or 270"):
    membership_lib.rotated_copies(images, labels, rotated, 45)
  with pytest.raises(ValueError, match="needs square images"):
    membership_lib.rotated_copies(images[:, :2], labels, rotated, 270)


# -------------------------------------------------------------- end to end


def _train_shadow_models(num_models):
  """K tiny 2-8-2 MLPs in one vmapped optax loop, each on its own property-controlled subset."""
  rng = np.random.default_rng(0)
  pool_labels = np.repeat([0, 1], 200).astype(np.int32)
  pool = (rng.normal(size=(400, 2)) + np.where(pool_labels[:, None] == 1, 1.0, -1.0) * [1.0, 0.0])
  pool = pool.astype(np.float32)
  masks, plabels = membership_lib.property_masks(
      pool_labels, num_models, 0, property_class=1, fraction_with=0.8,
      fraction_without=0.2, subset_size=50)

  def apply(params, x):
    hidden = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return hidden @ params["head"]["kernel"] + params["head"]["bias"]

  optimizer = optax.adam(0.05)

  @jax.jit
  def train_all(init, inputs, labels):
    def train_one(params, x, y):
      def loss(params):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y))

      def step(_, carry):
        params, state = carry
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

      return jax.lax.fori_loop(0, 100, step, (params, optimizer.init(params)))[0]

    params = jax.vmap(train_one)(init, inputs, labels)
    return params, jax.vmap(apply, (0, None))(params, queries)

  grid = np.linspace(-2.0, 2.0, 4)
  queries = jnp.asarray(np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2), jnp.float32)
  # Initial weights drawn by NumPy: a threefry kernel costs more compile time than training.
  normals = rng.normal(size=(num_models, 32)).astype(np.float32)
  init = {"dense_0": {"kernel": normals[:, :16].reshape(-1, 2, 8) * 0.7,
                      "bias": np.zeros((num_models, 8), np.float32)},
          "head": {"kernel": normals[:, 16:].reshape(-1, 8, 2) * 0.35,
                   "bias": np.zeros((num_models, 2), np.float32)}}
  members = np.stack([np.flatnonzero(mask) for mask in np.asarray(masks)])  # [K, 50]
  params, logits = train_all(init, pool[members], pool_labels[members])
  # NumPy from here on: slicing device arrays eagerly compiles a program per slice.
  return jax.device_get({"params": params}), np.asarray(logits), np.asarray(plabels)


@pytest.fixture(scope="module")
def shadow_models():
  return _train_shadow_models(128)


def _split(inputs, half):
  if isinstance(inputs, list):
    return [(k[:half], b[:half]) for k, b in inputs], [(k[half:], b[half:]) for k, b in inputs]
  return inputs[:half], inputs[half:]


@pytest.mark.parametrize("kind", ["outputs", "deepsets"])
def test_meta_classifier_infers_planted_property_and_not_shuffled_labels(shadow_models, kind):
  params, logits, plabels = shadow_models
  inputs = logits if kind == "outputs" else prop.dense_layers_from_params(params)
  train, test = _split(inputs, 64)  # 32 (with, without) pairs each; test pairs never trained on
  results = {}
  shuffled = np.random.default_rng(3).permutation(plabels)
  for name, labels in (("planted", plabels), ("shuffled", shuffled)):
    results[name] = prop.evaluate_property_inference(
        jax.random.key(2), (train, labels[:64]), (test, labels[64:]), kind=kind,
        num_steps=300, learning_rate=3e-3)
  planted, control = results["planted"], results["shuffled"]
  assert planted["num_train"] == planted["num_test"] == 64 and planted["chance"] == 0.5
  assert planted["accuracy"] >= 0.75 and planted["auc"] >= 0.85, results
  # Labels unrelated to the models: memorised in training, useless on held-out models.
  assert control["train_accuracy"] >= 0.9 and control["accuracy"] <= 0.75, results


def test_meta_predict_is_invariant_to_hidden_permutations_of_the_target(shadow_models):
  params, _, plabels = shadow_models
  # The shapes and settings of the end-to-end test: its compiled programs are reused.
  train, test = _split([(np.asarray(k), np.asarray(b))
                        for k, b in prop.dense_layers_from_params(params)], 64)
  classifier = prop.train_meta_classifier(jax.random.key(2), train, plabels[:64], kind="deepsets",
                                          num_steps=300, learning_rate=3e-3)
  probs = np.asarray(prop.meta_predict(classifier, test))
  np.testing.assert_allclose(np.asarray(prop.meta_predict(classifier, permute_hidden(test, 0))),
                             probs, atol=1e-5)
  assert np.any(np.abs(probs - 0.5) > 0.3)  # confident predictions, not a constant


def test_minibatch_training_fits_separable_planted_features():
  # Model k's logits carry its label in their sign: a linear meta-classifier separates them.
  labels = np.arange(8) % 2
  logits = np.random.default_rng(0).normal(size=(8, 2, 2)).astype(np.float32)
  logits[:, 0, 0] = np.where(labels == 1, 3.0, -3.0)
  classifier = prop.train_meta_classifier(jax.random.key(0), logits, labels, kind="outputs",
                                          num_steps=100, learning_rate=1e-2, batch_size=4,
                                          hidden_sizes=())
  assert np.isfinite(classifier.final_loss) and classifier.final_loss < 0.3
  np.testing.assert_array_equal(np.asarray(prop.meta_predict(classifier, logits)) > 0.5, labels == 1)
  with pytest.raises(ValueError, match="per-model shapes"):
    prop.meta_predict(classifier, logits[:, :1])


def test_binary_auc_matches_pairwise_count():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 5, size=40).astype(np.float64)  # many ties
  labels = rng.integers(0, 2, size=40)
  pos, neg = scores[labels == 1], scores[labels == 0]
  wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
  pairwise = wins / (pos.size * neg.size)
  assert prop.binary_auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)


# --------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
  layers = random_layers(0, num_models=6)
  labels = np.array([0, 1, 0, 1, 0, 1])
  train = prop.train_meta_classifier
  with pytest.raises(ValueError, match="must be binary"):
    train(jax.random.key(0), layers, np.array([0, 1, 2, 1, 0, 1]))
  with pytest.raises(ValueError, match="bool or integer 0/1 labels"):
    train(jax.random.key(0), layers, labels.astype(np.float32))
  with pytest.raises(ValueError, match="6 labels but there are 5 models"):
    train(jax.random.key(0), [(k[:5], b[:5]) for k, b in layers], labels)
  with pytest.raises(ValueError, match="at least 2 models of each class; got 5 without and 1 with"):
    train(jax.random.key(0), layers, np.array([0, 0, 0, 1, 0, 0]))
  mismatched = [layers[0], (layers[1][0][:4], layers[1][1][:4]), layers[2]]
  with pytest.raises(ValueError, match="same number of models K; layer 0 has 6 but layer 1"):
    train(jax.random.key(0), mismatched, labels)
  with pytest.raises(ValueError, match="takes 6 inputs but the layer before it has 7"):
    train(jax.random.key(0), [layers[0], layers[2]], labels)
  with pytest.raises(ValueError, match="Unknown kind 'deepset'.*Did you mean 'deepsets'"):
    train(jax.random.key(0), layers, labels, kind="deepset")
  with pytest.raises(ValueError, match=r"kind='outputs' takes stacked logits \[K, Q, C\]"):
    train(jax.random.key(0), layers, labels, kind="outputs")
  with pytest.raises(ValueError, match="batch_size must be at most the number of models"):
    train(jax.random.key(0), layers, labels, batch_size=7)
  with pytest.raises(ValueError, match="held-out model"):
    prop.evaluate_property_inference(jax.random.key(0), (layers, labels), (layers, labels),
                                     kind="sorted", num_steps=1)
