"""Property inference: what a model's parameters or outputs reveal about its training set.

A global property of a training set (the fraction of one class, of rotated
images, of one demographic group) is not about any one example, yet it shapes
the trained model. The attack (Ateniese et al. 2015; Ganju et al. 2018):

1. train many shadow models, half on data WITH the property and half WITHOUT
   (`config.data.membership='property'` draws the training subsets as
   [K, N] membership masks for the many-models trainer:
   `certjax.data.membership.property_masks`);
2. train a binary meta-classifier that predicts the property from each shadow
   model (`train_meta_classifier`), from one of three representations:
   * 'deepsets': Ganju et al.'s permutation-invariant representation of a
     fully connected network's parameters (`permutation_invariant_features`),
     trained end to end with the classifier on top of it;
   * 'sorted': the flat baseline, every parameter after sorting the neurons of
     each hidden layer by a canonical key (`sorted_neuron_features`);
   * 'outputs': the model's softmax outputs on a fixed set of query inputs
     (`output_features`), the black-box variant;
3. apply it to the target model (`meta_predict`), and measure it on held-out
   shadow models against chance (`evaluate_property_inference`).

Shadow models arrive as a stacked pytree (leading axis K, one entry per
model) of a plain MLP; `dense_layers_from_params` turns a Flax parameter dict
into the list of (kernel [K, in, out], bias [K, out]) pairs every function
here takes, so nothing depends on Flax's module names.

Hidden neurons of an MLP can be permuted (columns of one kernel and its bias,
rows of the next kernel) without changing the function it computes, so a
meta-classifier over raw flattened parameters must learn the same property K!
times over. Ganju et al. make the representation invariant with DeepSets
(Zaheer et al. 2017): a node network phi_i maps each neuron of layer i to a
vector and the layer is represented by their sum. For layers after the first
they pair each neuron's incoming weights with the representations of the
neurons those weights come from, by concatenating both in the previous
layer's neuron order; phi applied to an ordered concatenation still depends on
that order, so that representation changes when an earlier hidden layer is
permuted. Here the pairing is summed instead: neuron j of layer i > 1 is
represented through m_ij = sum_k W_i[k, j] N_{i-1,k}, its incoming weights read
through the previous layer's node representations N_{i-1,k}, which is exactly
invariant to permuting every hidden layer (the weight-space construction later
made general by Navon et al. 2023). The output neurons (classes) and the input
features have a fixed order: the output layer's node representations are
concatenated in class order, not summed.

References:
  Ateniese, Mancini, Spognardi, Villani, Vitali, Felici. Hacking smart machines
    with smarter ones: How to extract meaningful data from machine learning
    classifiers. International Journal of Security and Networks, 2015.
  Ganju, Wang, Yang, Gunter, Borisov. Property inference attacks on fully
    connected neural networks using permutation invariant representations.
    ACM CCS 2018.
  Zaheer, Kottur, Ravanbakhsh, Poczos, Salakhutdinov, Smola. Deep Sets.
    NeurIPS 2017.
  Navon, Shamsian, Achituve, Fetaya, Chechik, Maron. Equivariant architectures
    for learning in deep weight spaces. ICML 2023.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from certjax.types import Array, ArrayLike, PRNGKey
from certjax.validation import (check_choice, check_int_at_least, check_positive,
                                is_concrete)

META_KINDS = ("deepsets", "sorted", "outputs")

DenseLayers = Sequence[tuple[ArrayLike, ArrayLike]]  # [(kernel [K, in, out], bias [K, out])]

# Standard deviations below this are treated as a constant feature: dividing
# by them would turn float noise into unit-scale signal.
_MIN_SCALE = 1e-12
_DENSE_NAME = re.compile(r"^(dense|Dense)_(\d+)$")


# --------------------------------------------------------------- parameters in


def dense_layers_from_params(stacked_params: Mapping[str, Any]) -> list[tuple[Array, Array]]:
  """The (kernel, bias) pairs of a stacked Flax MLP, input layer first.

  Accepts `{'params': {...}}` or the inner dict. Hidden layers are the modules
  named `dense_<i>` (certjax's `MLP`) or `Dense_<i>` (Flax's automatic names),
  ordered by i; a module named `head` (certjax's output layer), if present,
  comes last. Modules without parameters never appear in a Flax dict.

  Args:
    stacked_params: the parameters of K models of one MLP architecture, every
      leaf with a leading model axis (kernels [K, in, out], biases [K, out]).

  Returns:
    A list of (kernel [K, in, out], bias [K, out]) pairs.

  Raises:
    ValueError: a module that is not a dense layer, a gap or a repeat in the
      layer indices, a layer without 'kernel' or 'bias', or unstacked leaves.
  """
  if not isinstance(stacked_params, Mapping):
    raise ValueError(
        "stacked_params must be a dict of dense layers such as "
        f"{{'params': {{'dense_0': {{'kernel', 'bias'}}, ...}}}}; "
        f"got {type(stacked_params).__name__}.")
  tree = stacked_params
  if set(tree) == {"params"}:
    tree = tree["params"]
  indexed, head = {}, None
  for name, module in tree.items():
    match = _DENSE_NAME.match(str(name))
    if name == "head":
      head = module
    elif match:
      index = int(match.group(2))
      if index in indexed:
        raise ValueError(f"stacked_params has two dense layers with index {index} "
                         f"({indexed[index][0]!r} and {name!r}).")
      indexed[index] = (name, module)
    else:
      raise ValueError(
          f"stacked_params is not a plain MLP: unexpected module {name!r}. Accepted "
          "names: dense_<i> or Dense_<i> for hidden layers and 'head' for the output layer.")
  if sorted(indexed) != list(range(len(indexed))):
    raise ValueError("stacked_params' dense layer indices must be 0, 1, ..., n-1; "
                     f"got {sorted(indexed)}.")
  modules = [indexed[i] for i in range(len(indexed))]
  if head is not None:
    modules.append(("head", head))
  if not modules:
    raise ValueError("stacked_params holds no dense layers (dense_<i>, Dense_<i> or head).")
  layers = []
  for name, module in modules:
    if not isinstance(module, Mapping) or set(module) != {"kernel", "bias"}:
      found = sorted(module) if isinstance(module, Mapping) else type(module).__name__
      raise ValueError(f"Layer {name!r} must hold exactly 'kernel' and 'bias'; got {found}.")
    layers.append((jnp.asarray(module["kernel"]), jnp.asarray(module["bias"])))
  _check_layers(layers, "stacked_params")
  return layers


def _check_layers(layers: Any, name: str = "stacked_dense_layers") -> tuple[int, tuple[int, ...]]:
  """Checks a list of stacked (kernel, bias) pairs; returns K and the widths.

  The widths are (in_0, out_0, out_1, ..., out_last).
  """
  if not isinstance(layers, (list, tuple)) or not layers:
    raise ValueError(f"{name} must be a non-empty list of (kernel [K, in, out], bias [K, out]) "
                     f"pairs; got {type(layers).__name__}.")
  num_models, widths = None, []
  for i, layer in enumerate(layers):
    if not isinstance(layer, (list, tuple)) or len(layer) != 2:
      raise ValueError(f"{name}[{i}] must be a (kernel, bias) pair.")
    kernel, bias = layer
    kshape, bshape = np.shape(kernel), np.shape(bias)
    if len(kshape) != 3 or len(bshape) != 2:
      raise ValueError(
          f"{name}[{i}] must be stacked over models: kernel [K, in, out] and bias [K, out]; "
          f"got shapes {tuple(kshape)} and {tuple(bshape)}.")
    if num_models is None:
      num_models = kshape[0]
      widths.append(kshape[1])
    if kshape[0] != num_models or bshape[0] != num_models:
      raise ValueError(
          f"Every layer of {name} must hold the same number of models K; layer 0 has "
          f"{num_models} but layer {i} has kernel {tuple(kshape)} and bias {tuple(bshape)}.")
    if kshape[1] != widths[-1]:
      raise ValueError(f"{name}[{i}]'s kernel takes {kshape[1]} inputs but the layer before "
                       f"it has {widths[-1]} outputs.")
    if bshape[1] != kshape[2]:
      raise ValueError(f"{name}[{i}] has {kshape[2]} outputs but {bshape[1]} biases.")
    widths.append(kshape[2])
    for part, value in (("kernel", kernel), ("bias", bias)):
      dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}[{i}]'s {part} must be floating point; got dtype {dtype}.")
      if is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{name}[{i}]'s {part} holds NaN or Inf values.")
  if num_models < 1:
    raise ValueError(f"{name} holds no models (K = 0).")
  return int(num_models), tuple(int(w) for w in widths)


def _check_logits(stacked_logits: Any, name: str = "stacked_logits") -> int:
  shape = np.shape(stacked_logits)
  if len(shape) != 3:
    raise ValueError(
        f"{name} must have shape [K models, Q queries, C classes]; got {tuple(shape)}.")
  dtype = (stacked_logits.dtype if hasattr(stacked_logits, "dtype")
           else np.asarray(stacked_logits).dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be floating-point logits; got dtype {dtype}.")
  if is_concrete(stacked_logits) and not np.all(np.isfinite(np.asarray(stacked_logits))):
    raise ValueError(f"{name} holds NaN or Inf values.")
  if min(shape) < 1:
    raise ValueError(f"{name} must hold at least one model, query and class; got {tuple(shape)}.")
  return int(shape[0])


# ------------------------------------------------------------ representations


def _host_rng(key: PRNGKey, name: str, *tags: int) -> np.random.Generator:
  """A NumPy generator seeded with the key's data, a stream name and tags.

  A deterministic function of `key` as `jax.random` draws are, for host-side
  draws: compiling a threefry kernel on CPU takes longer than these draws'
  whole programs. Different names or tags give independent streams.
  """
  if not hasattr(key, "dtype"):
    raise ValueError(f"The key for the {name} must be a jax.random.key; got {type(key).__name__}.")
  if not is_concrete(key):
    raise ValueError(f"The key for the {name} must be concrete (not traced).")
  is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  key_data = np.asarray(jax.random.key_data(key) if is_typed else key, np.uint32)
  return np.random.default_rng([*key_data.ravel().tolist(), zlib.crc32(name.encode()), *tags])


def _init_mlps(key: PRNGKey, all_sizes: Sequence[Sequence[int]]) -> list[list[tuple[Array, Array]]]:
  """He-normal weights and zero biases for MLPs with the given layer sizes.

  Drawn on the host (`_host_rng`).
  """
  rng = _host_rng(key, "meta-classifier initialisation")
  mlps = []
  for sizes in all_sizes:
    mlps.append([(jnp.asarray(rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in),
                              jnp.float32), jnp.asarray(np.zeros((fan_out,), np.float32)))
                 for fan_in, fan_out in zip(sizes[:-1], sizes[1:])])
  return mlps


def _apply_mlp(params: Sequence[tuple[Array, Array]], x: Array) -> Array:
  """ReLU between layers, a linear last layer."""
  for i, (weight, bias) in enumerate(params):
    x = x @ weight + bias
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def init_deepsets(key: PRNGKey, stacked_dense_layers: DenseLayers, *,
                  node_sizes: Sequence[int] = (32,), set_dim: int = 16,
                  hidden_sizes: Sequence[int] = (32,)) -> dict:
  """Parameters of a DeepSets meta-classifier for MLPs of the given architecture.

  Args:
    key: initialisation key.
    stacked_dense_layers: list of (kernel [K, in, out], bias [K, out]); only
      the layer widths are read.
    node_sizes: hidden widths of each node network phi_i.
    set_dim: width of every node representation (phi_i's output).
    hidden_sizes: hidden widths of rho, the network from the representation
      to the property logit.

  Returns:
    {'phi': one MLP per layer, 'rho': an MLP}, each a list of (weight, bias).
  """
  _, widths = _check_layers(stacked_dense_layers)
  node_sizes = _check_sizes(node_sizes, "node_sizes", allow_empty=True)
  hidden_sizes = _check_sizes(hidden_sizes, "hidden_sizes", allow_empty=True)
  set_dim = check_int_at_least(set_dim, "set_dim", 1)
  num_layers = len(widths) - 1
  # Layer 0 sees its incoming weights over the (ordered) input features;
  # later layers see (message, bias, previous layer representation).
  phi_sizes = [(widths[0] + 1 if i == 0 else 2 * set_dim + 1, *node_sizes, set_dim)
               for i in range(num_layers)]
  rep_dim = set_dim * (num_layers - 1) + set_dim * widths[-1]
  *phi, rho = _init_mlps(key, phi_sizes + [(rep_dim, *hidden_sizes, 1)])
  return {"phi": phi, "rho": rho}


def permutation_invariant_features(stacked_dense_layers: DenseLayers,
                                   deepsets_params: Mapping[str, Any]) -> Array:
  """Ganju et al.'s permutation-invariant representation of K fully connected networks.

  For the first layer, neuron j is N_1j = phi_1([W_1[:, j], b_1j]) (its
  incoming weights over the ordered inputs and its bias). For layer i > 1,
  N_ij = phi_i([m_ij, b_ij, L_{i-1}]) with m_ij = sum_k W_i[k, j] N_{i-1,k}
  (the incoming weights read through the representations of the neurons they
  come from; see the module docstring for why this sum replaces Ganju et
  al.'s ordered concatenation) and L_{i-1} = sum_k N_{i-1,k}. Each hidden
  layer is represented by L_i = sum_j N_ij; the output layer, whose neurons
  are the ordered classes, by its N_ij concatenated in class order.

  Permuting the neurons of any hidden layer (kernel columns and bias of that
  layer, kernel rows of the next) leaves the result unchanged up to float
  summation order.

  Args:
    stacked_dense_layers: list of (kernel [K, in, out], bias [K, out]),
      input layer first (e.g. from `dense_layers_from_params`).
    deepsets_params: from `init_deepsets` (only 'phi' is used).

  Returns:
    [K, set_dim * (num_layers - 1 + num_classes)] representations, hidden
    layers first.
  """
  _check_layers(stacked_dense_layers)
  return _deepsets_representation(deepsets_params["phi"], stacked_dense_layers)


def _deepsets_representation(phi: Sequence[Any], layers: DenseLayers) -> Array:
  parts, nodes = [], None
  for i, (kernel, bias) in enumerate(layers):
    kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
    if nodes is None:
      node_inputs = jnp.concatenate([jnp.swapaxes(kernel, 1, 2), bias[..., None]], axis=-1)
    else:
      message = jnp.einsum("kio,kid->kod", kernel, nodes)
      context = jnp.broadcast_to(jnp.sum(nodes, axis=1, keepdims=True),
                                 message.shape)
      node_inputs = jnp.concatenate([message, bias[..., None], context], axis=-1)
    nodes = _apply_mlp(phi[i], node_inputs)  # [K, out, set_dim]
    if i < len(layers) - 1:
      parts.append(jnp.sum(nodes, axis=1))
    else:
      parts.append(nodes.reshape(nodes.shape[0], -1))
  return jnp.concatenate(parts, axis=-1)


def sorted_neuron_features(stacked_dense_layers: DenseLayers) -> Array:
  """All parameters, flattened after sorting each hidden layer's neurons: a canonical form.

  Layer by layer, the rows of a kernel are first put in the order chosen for
  the previous layer's neurons; then the neurons of a hidden layer are sorted
  by the L2 norm of (incoming weights, bias), and its kernel columns and bias
  follow. The result is the same network with its hidden neurons in a
  canonical order, so any permutation of the hidden neurons gives the same
  features, bit for bit (neurons with exactly equal norms, which random or
  trained weights almost never have, keep their given order). Output neurons
  (classes) keep their order.

  Args:
    stacked_dense_layers: list of (kernel [K, in, out], bias [K, out]).

  Returns:
    [K, P] flattened parameters (P = number of parameters of one model), in
    layer order, each layer's kernel (row-major) then bias.
  """
  _check_layers(stacked_dense_layers)
  return _sorted_features(stacked_dense_layers)


def _sorted_features(layers: DenseLayers) -> Array:
  parts, order = [], None
  for i, (kernel, bias) in enumerate(layers):
    kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
    if order is not None:
      kernel = jnp.take_along_axis(kernel, order[:, :, None], axis=1)
    if i < len(layers) - 1:
      norms = jnp.sum(kernel ** 2, axis=1) + bias ** 2
      order = jnp.argsort(norms, axis=1, stable=True)
      kernel = jnp.take_along_axis(kernel, order[:, None, :], axis=2)
      bias = jnp.take_along_axis(bias, order, axis=1)
    parts += [kernel.reshape(kernel.shape[0], -1), bias]
  return jnp.concatenate(parts, axis=-1)


def output_features(stacked_logits: ArrayLike) -> Array:
  """The black-box representation: softmax outputs on a fixed query set, flattened.

  Args:
    stacked_logits: [K, Q, C] logits of K models on the same Q query inputs,
      in the same order for every model.

  Returns:
    [K, Q * C] probabilities.
  """
  _check_logits(stacked_logits)
  return _output_features(jnp.asarray(stacked_logits))


def _output_features(logits: Array) -> Array:
  return jax.nn.softmax(logits, axis=-1).reshape(logits.shape[0], -1)


# ------------------------------------------------------------- meta-classifier


class MetaClassifier(NamedTuple):
  """A trained property meta-classifier (from `train_meta_classifier`).

  Attributes:
    kind: 'deepsets', 'sorted' or 'outputs'.
    params: trained parameters ({'phi', 'rho'} for 'deepsets', {'mlp'} else).
    normalizer: statistics of the training models used to scale inputs:
      per-layer (kernel mean, kernel std, bias mean, bias std) for 'deepsets',
      per-feature (mean, std) otherwise.
    input_shapes: the shapes (without K) the classifier was trained on.
    final_loss: mean training loss at the last step.
  """
  kind: str
  params: Any
  normalizer: Any
  input_shapes: tuple
  final_loss: float


def _check_sizes(sizes: Any, name: str, *, allow_empty: bool) -> tuple[int, ...]:
  if isinstance(sizes, (int, np.integer)) or not isinstance(sizes, (list, tuple)):
    raise ValueError(f"{name} must be a tuple of layer widths (integers >= 1); got {sizes!r}.")
  if not sizes and not allow_empty:
    raise ValueError(f"{name} must name at least one layer width.")
  for size in sizes:
    check_int_at_least(size, f"every entry of {name}", 1)
  return tuple(int(s) for s in sizes)


def _check_property_labels(labels: Any, num_models: int, *, min_per_class: int,
                           name: str = "property_labels") -> np.ndarray:
  shape = np.shape(labels)
  if len(shape) != 1:
    raise ValueError(f"{name} must be a rank-1 array with one 0/1 label per model; "
                     f"got shape {tuple(shape)}.")
  if shape[0] != num_models:
    raise ValueError(f"{name} has {shape[0]} labels but there are {num_models} models (K); "
                     "they must match.")
  if not is_concrete(labels):
    raise ValueError(f"{name} must be concrete (not traced): the meta-classifier checks "
                     "its class counts.")
  values = np.asarray(labels)
  if not (values.dtype == bool or np.issubdtype(values.dtype, np.integer)):
    raise ValueError(f"{name} must be bool or integer 0/1 labels; got dtype {values.dtype}.")
  unexpected = sorted(set(np.unique(values).tolist()) - {0, 1})
  if unexpected:
    raise ValueError(f"{name} must be binary (0 = without the property, 1 = with it); "
                     f"got values {unexpected[:5]}.")
  values = values.astype(np.int32)
  counts = np.bincount(values, minlength=2)
  if counts.min() < min_per_class:
    raise ValueError(
        f"{name} needs at least {min_per_class} models of each class; got {counts[0]} "
        f"without and {counts[1]} with the property.")
  return values


def _check_inputs(inputs: Any, kind: str, name: str = "inputs") -> tuple[int, tuple]:
  """Checks meta-classifier inputs for `kind`; returns K and the per-model shapes."""
  if kind == "outputs":
    if isinstance(inputs, (list, tuple)):
      raise ValueError(
          f"kind='outputs' takes stacked logits [K, Q, C] as {name}, not a list of layers.")
    num_models = _check_logits(inputs, name)
    return num_models, (tuple(np.shape(inputs)[1:]),)
  if not isinstance(inputs, (list, tuple)):
    raise ValueError(f"kind={kind!r} takes a list of (kernel [K, in, out], bias [K, out]) "
                     f"layers as {name} (see dense_layers_from_params); got an array of shape "
                     f"{tuple(np.shape(inputs))}.")
  num_models, _ = _check_layers(inputs, name)
  shapes = tuple((tuple(np.shape(k)[1:]), tuple(np.shape(b)[1:])) for k, b in inputs)
  return num_models, shapes


def _as_arrays(inputs: Any, kind: str) -> Any:
  if kind == "outputs":
    return jnp.asarray(inputs)
  return [(jnp.asarray(k), jnp.asarray(b)) for k, b in inputs]


def _fit_normalizer(inputs: Any, kind: str) -> Any:
  """Input scaling from the training models (host side, float64 statistics)."""
  def scale(std):
    return np.where(std > _MIN_SCALE, std, 1.0).astype(np.float32)

  if kind == "deepsets":
    # One mean and one std per tensor: statistics pooled over a layer's
    # neurons do not depend on their order, so the representation stays
    # invariant.
    stats = []
    for kernel, bias in inputs:
      k, b = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
      stats.append((np.float32(k.mean()), scale(k.std()), np.float32(b.mean()), scale(b.std())))
    return stats
  features = np.asarray(_flat_features_jit(inputs, kind=kind), np.float64)
  return (features.mean(axis=0).astype(np.float32), scale(features.std(axis=0)))


def _flat_features(inputs: Any, kind: str) -> Array:
  return _output_features(inputs) if kind == "outputs" else _sorted_features(inputs)


_flat_features_jit = jax.jit(_flat_features, static_argnames=("kind",))


def _meta_logits(params: Any, inputs: Any, normalizer: Any, kind: str) -> Array:
  """Property logits [K] (traceable)."""
  if kind == "deepsets":
    layers = [((k - km) / ks, (b - bm) / bs)
              for (k, b), (km, ks, bm, bs) in zip(inputs, normalizer)]
    features = _deepsets_representation(params["phi"], layers)
    return _apply_mlp(params["rho"], features)[:, 0]
  mean, std = normalizer
  features = (_flat_features(inputs, kind) - mean) / std
  return _apply_mlp(params["mlp"], features)[:, 0]


def _init_meta(key: PRNGKey, inputs: Any, kind: str, hidden_sizes: tuple[int, ...],
               node_sizes: tuple[int, ...], set_dim: int) -> Any:
  if kind == "deepsets":
    return init_deepsets(key, inputs, node_sizes=node_sizes, set_dim=set_dim,
                         hidden_sizes=hidden_sizes)
  num_features = jax.eval_shape(lambda x: _flat_features(x, kind), inputs).shape[-1]
  return {"mlp": _init_mlps(key, [(num_features, *hidden_sizes, 1)])[0]}


@functools.partial(jax.jit, static_argnames=("kind", "num_steps"))
def _train(params: Any, inputs: Any, labels: Array, normalizer: Any, batch_rows: Array | None,
           learning_rate: Array, weight_decay: Array, *, kind: str,
           num_steps: int) -> tuple[Any, Array]:
  # One flat vector for the optimizer: AdamW's per-leaf updates of a dozen
  # small leaves cost more compile time than the whole forward pass.
  flat_params, unravel = jax.flatten_util.ravel_pytree(params)
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  targets = labels.astype(jnp.float32)

  def loss_fn(flat_params, batch_inputs, batch_targets):
    logits = _meta_logits(unravel(flat_params), batch_inputs, normalizer, kind)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch_targets))

  def step(i, carry):
    params, opt_state, _ = carry
    if batch_rows is None:
      batch_inputs, batch_targets = inputs, targets
    else:
      rows = batch_rows[i]
      batch_inputs = jax.tree.map(lambda a: a[rows], inputs)
      batch_targets = targets[rows]
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_inputs, batch_targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  flat_params, _, loss = lax.fori_loop(
      0, num_steps, step,
      (flat_params, optimizer.init(flat_params), jnp.zeros((), jnp.float32)))
  return unravel(flat_params), loss


def train_meta_classifier(key: PRNGKey, inputs: Any, property_labels: ArrayLike, *,
                          kind: str = "deepsets", num_steps: int = 500,
                          learning_rate: float = 1e-3, hidden_sizes: Sequence[int] = (32,),
                          node_sizes: Sequence[int] = (32,), set_dim: int = 16,
                          weight_decay: float = 1e-4,
                          batch_size: int | None = None) -> MetaClassifier:
  """Trains a binary meta-classifier predicting the property from each shadow model.

  Sigmoid cross-entropy on one property logit per model, AdamW (optax) in one
  jitted `fori_loop`; full batch over the K shadow models unless `batch_size`
  is given (then `batch_size` models drawn without replacement for each step,
  all drawn beforehand on the host from `key`). Inputs are standardised with statistics of these
  training models, kept in the returned classifier for `meta_predict`.

  Args:
    key: initialisation and minibatch key (drawn on the host from its data).
    inputs: for 'deepsets' and 'sorted', the shadow models' parameters as a
      list of (kernel [K, in, out], bias [K, out]) (`dense_layers_from_params`);
      for 'outputs', their logits [K, Q, C] on a fixed query set.
    property_labels: [K] 0/1 (or bool): 1 where the model's training set had
      the property. At least 2 models of each class.
    kind: 'deepsets' (Ganju et al.'s permutation-invariant network, trained
      end to end), 'sorted' (an MLP on `sorted_neuron_features`) or 'outputs'
      (an MLP on `output_features`).
    num_steps: optimizer steps.
    learning_rate: AdamW learning rate.
    hidden_sizes: hidden widths of the classifier MLP (rho for 'deepsets').
    node_sizes: hidden widths of each node network phi ('deepsets' only).
    set_dim: width of the node representations ('deepsets' only).
    weight_decay: AdamW's decoupled weight decay (>= 0).
    batch_size: models per step, or None for all K.

  Returns:
    A `MetaClassifier`.

  Raises:
    ValueError: unknown kind, malformed inputs, labels that are not binary, of
      the wrong length or with fewer than 2 models of a class, or bad
      hyperparameters.

  References:
    Ganju et al. 2018 (the meta-classifier over shadow models).
  """
  kind = check_choice(kind, "kind", META_KINDS)
  num_models, shapes = _check_inputs(inputs, kind)
  labels = _check_property_labels(property_labels, num_models, min_per_class=2)
  num_steps = check_int_at_least(num_steps, "num_steps", 1)
  check_positive(learning_rate, "learning_rate")
  check_positive(weight_decay, "weight_decay", allow_zero=True)
  hidden_sizes = _check_sizes(hidden_sizes, "hidden_sizes", allow_empty=True)
  node_sizes = _check_sizes(node_sizes, "node_sizes", allow_empty=True)
  set_dim = check_int_at_least(set_dim, "set_dim", 1)
  if batch_size is not None:
    batch_size = check_int_at_least(batch_size, "batch_size", 1)
    if batch_size > num_models:
      raise ValueError(f"batch_size must be at most the number of models ({num_models}), "
                       f"or None for all of them; got {batch_size}.")
  arrays = _as_arrays(inputs, kind)
  normalizer = _fit_normalizer(arrays, kind)
  params = _init_meta(key, arrays, kind, hidden_sizes, node_sizes, set_dim)
  batch_rows = None
  if batch_size is not None:
    rng = _host_rng(key, "meta-classifier minibatches")
    batch_rows = np.stack([rng.choice(num_models, batch_size, replace=False)
                           for _ in range(num_steps)]).astype(np.int32)
  params, loss = _train(params, arrays, jnp.asarray(labels), normalizer, batch_rows,
                        jnp.float32(learning_rate), jnp.float32(weight_decay),
                        kind=kind, num_steps=num_steps)
  return MetaClassifier(kind, params, normalizer, shapes, float(loss))


@functools.partial(jax.jit, static_argnames=("kind",))
def _predict(params: Any, inputs: Any, normalizer: Any, *, kind: str) -> Array:
  return jax.nn.sigmoid(_meta_logits(params, inputs, normalizer, kind))


def meta_predict(classifier: MetaClassifier, inputs: Any) -> Array:
  """Probability that each model's training set had the property.

  Args:
    classifier: from `train_meta_classifier`.
    inputs: models in the form the classifier was trained on (dense layers or
      logits [K, Q, C]), with the same per-model shapes.

  Returns:
    [K] probabilities; threshold at 0.5 for a prediction.
  """
  if not isinstance(classifier, MetaClassifier):
    raise ValueError(f"classifier must be a MetaClassifier from train_meta_classifier; "
                     f"got {type(classifier).__name__}.")
  _, shapes = _check_inputs(inputs, classifier.kind)
  if shapes != classifier.input_shapes:
    raise ValueError(f"inputs have per-model shapes {shapes} but the meta-classifier was "
                     f"trained on {classifier.input_shapes}.")
  return _predict(classifier.params, _as_arrays(inputs, classifier.kind),
                  classifier.normalizer, kind=classifier.kind)


# ------------------------------------------------------------------ evaluation


def _model_digests(inputs: Any, kind: str) -> list[bytes]:
  """One hash per model of its exact inputs, to find a model in both sets."""
  arrays = [np.asarray(inputs)] if kind == "outputs" else [
      np.asarray(a) for layer in inputs for a in layer]
  num_models = arrays[0].shape[0]
  digests = []
  for k in range(num_models):
    digest = hashlib.sha256()
    for array in arrays:
      digest.update(np.ascontiguousarray(array[k]).tobytes())
    digests.append(digest.digest())
  return digests


def binary_auc(scores: ArrayLike, labels: ArrayLike) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties half.

  The Mann-Whitney U statistic over average ranks.

  Args:
    scores: [n] scores, higher meaning more likely positive.
    labels: [n] 0/1 labels with at least one of each.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  num_pos, num_neg = int(labels.sum()), int((~labels).sum())
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"The AUC needs at least one positive and one negative label; got "
                     f"{num_pos} positive and {num_neg} negative.")
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks, tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], values.size]
  group_ranks = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
  ranks = np.empty(values.size)
  ranks[order] = np.repeat(group_ranks, ends - starts)
  return ranks


def evaluate_property_inference(key: PRNGKey, train_set: tuple[Any, ArrayLike],
                                test_set: tuple[Any, ArrayLike], *, kind: str = "deepsets",
                                **train_kwargs: Any) -> dict:
  """Trains a meta-classifier on one set of shadow models and measures it on another.

  The held-out models are never seen in training: a model whose inputs
  appear in both sets, bit for bit, is an error.

  Args:
    key: passed to `train_meta_classifier`.
    train_set: (inputs, property_labels) of the training shadow models, in
      the form `kind` takes (see `train_meta_classifier`).
    test_set: (inputs, property_labels) of held-out shadow models (at least
      one of each class).
    kind: 'deepsets', 'sorted' or 'outputs'.
    **train_kwargs: further arguments of `train_meta_classifier`
      (num_steps, learning_rate, hidden_sizes, ...).

  Returns:
    dict with 'accuracy' (held-out, threshold 0.5), 'chance' (the majority
    rate of the held-out labels, what always guessing one answer scores),
    'auc' (held-out ROC AUC of the predicted probability), 'train_accuracy',
    'num_train', 'num_test' and 'kind'.

  References:
    Ganju et al. 2018 (attack accuracy on held-out shadow models).
  """
  kind = check_choice(kind, "kind", META_KINDS)
  for name, pair in (("train_set", train_set), ("test_set", test_set)):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f"{name} must be an (inputs, property_labels) pair.")
  train_inputs, train_labels = train_set
  test_inputs, test_labels = test_set
  _check_inputs(train_inputs, kind, "train_set inputs")
  num_test, _ = _check_inputs(test_inputs, kind, "test_set inputs")
  test_labels = _check_property_labels(test_labels, num_test, min_per_class=1,
                                       name="test_set property_labels")
  overlap = set(_model_digests(train_inputs, kind)) & set(_model_digests(test_inputs, kind))
  if overlap:
    raise ValueError(f"{len(overlap)} held-out model(s) in test_set also appear in train_set; "
                     "held-out shadow models must never be used for training.")
  classifier = train_meta_classifier(key, train_inputs, train_labels, kind=kind, **train_kwargs)
  train_probs = np.asarray(meta_predict(classifier, train_inputs))
  test_probs = np.asarray(meta_predict(classifier, test_inputs))
  train_labels = np.asarray(train_labels).astype(np.int32)
  rate = float(test_labels.mean())
  return {
      "accuracy": float(np.mean((test_probs > 0.5) == test_labels)),
      "chance": max(rate, 1.0 - rate),
      "auc": binary_auc(test_probs, test_labels),
      "train_accuracy": float(np.mean((train_probs > 0.5) == train_labels)),
      "num_train": int(train_labels.shape[0]),
      "num_test": int(num_test),
      "kind": kind,
  }
