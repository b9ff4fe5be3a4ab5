"""Pieces shared by every certjax model: input checks, normalisation, head.

Every certjax model takes a batch of NHWC images in [0, 1] pixel space and
normalises it itself, with a `Normalize` layer as its first operation. That is
why a perturbation size (eps, sigma, radius) given to an attack, a certifier
or a smoothing routine is always measured in [0, 1] pixel space, whatever the
dataset statistics: randomized-smoothing codebases that normalise outside the
model (and so silently rescale sigma) are the source of the most asked
question in Cohen et al.'s repository.

The layers used here are the ones a bound-propagation interpreter handles:
dense/conv, relu, BatchNorm, add, reshape and mean. `Normalize` is written as
an affine map `x * scale + shift` with constant (non-trainable) scale and
shift, so it is a plain multiply and add in the jaxpr.

References:
  Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
  Smoothing", ICML 2019 (normalisation as the first layer of the model).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from certjax.models import layers

# PyTorch's BatchNorm momentum 0.1 (weight of the new batch) is Flax's 0.9
# (weight of the running average); the reference models are all PyTorch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He et al. (2015) normal init with fan_out, as in the reference PyTorch
# ResNet / WideResNet code (`normal_(0, sqrt(2 / (k * k * out_channels)))`).
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_model_input(x: Any, channels: int, model_name: str) -> jax.Array:
  """Static checks on a model's input; works under jit/vmap (shape and dtype).

  Args:
    x: the batch of images passed to the model.
    channels: the channel count the model was configured for (len(mean)).
    model_name: used in the error message.

  Returns:
    `x` as a jax array.

  Raises:
    ValueError: when `x` is not a rank-4 NHWC floating batch with `channels`
      channels.
  """
  shape = tuple(np.shape(x))
  if len(shape) != 4 or shape[-1] != channels:
    raise ValueError(
        f"{model_name} expected images of shape (B, H, W, C) with C={channels} "
        f"channels (NHWC, float pixels in [0, 1]; C is len(mean)); got shape "
        f"{shape} (rank {len(shape)}). Add a batch axis with x[None] for a "
        "single image; transpose NCHW data to NHWC.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{model_name} expected floating-point images in [0, 1]; got dtype "
        f"{x.dtype}. Convert uint8 images with x.astype(np.float32) / 255.")
  return x


class Normalize(nn.Module):
  """Per-channel `(x - mean) / std`, as a constant affine map (no parameters).

  Computed in float32 and cast to the compute `dtype` afterwards, so that
  bfloat16 models see the same normalised values up to one rounding.

  Attributes:
    mean: per-channel mean of the data in [0, 1] pixel space.
    std: per-channel standard deviation, > 0.
    dtype: dtype of the output (the model's compute dtype).
  """
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    mean = np.asarray(self.mean, dtype=np.float64)
    std = np.asarray(self.std, dtype=np.float64)
    # Folding into scale and shift gives the interpreter a mul and an add by
    # constants rather than a division.
    scale = jnp.asarray(1.0 / std, dtype=jnp.float32)
    shift = jnp.asarray(-mean / std, dtype=jnp.float32)
    return (x.astype(jnp.float32) * scale + shift).astype(self.dtype)


class ImageClassifier(nn.Module):
  """Fields and helpers common to all certjax classifiers.

  Subclasses implement `__call__(x, train=False)` and start with
  `x = self.normalize_input(x)` and end with `self.logits(x)`.

  Attributes:
    num_classes: number of output logits.
    mean: per-channel data mean (its length fixes the channel count).
    std: per-channel data standard deviation.
    dtype: compute dtype (float32 or bfloat16); params stay float32.
    conv_impl: how convolutions are computed: 'xla' (`nn.Conv`) or 'im2col'
      (`layers.Im2colConv`: the same result and parameters, as one matrix
      product).
  """
  num_classes: int
  mean: Sequence[float]
  std: Sequence[float]
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  def normalize_input(self, x: Any) -> jax.Array:
    x = check_model_input(x, len(self.mean), type(self).__name__)
    return Normalize(self.mean, self.std, dtype=self.dtype, name="normalize")(x)

  def logits(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 name="head")(x)
    return x.astype(jnp.float32)

  def batch_norm(self, train: bool, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=self.dtype,
                        param_dtype=jnp.float32, name=name)

  def conv(self, features: int, kernel: int, stride: int = 1,
           padding: str | int = 1, use_bias: bool = False,
           kernel_init: Any = he_normal_fan_out,
           name: str | None = None) -> nn.Module:
    if self.conv_impl not in layers.CONV_IMPLS:
      raise ValueError(f"conv_impl must be one of {layers.CONV_IMPLS}, got "
                       f"{self.conv_impl!r}.")
    conv_class = layers.Im2colConv if self.conv_impl == "im2col" else nn.Conv
    return conv_class(features, (kernel, kernel), strides=(stride, stride),
                      padding=padding, use_bias=use_bias, dtype=self.dtype,
                      param_dtype=jnp.float32, kernel_init=kernel_init, name=name)

  def dense(self, features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                    name=name)


def global_average_pool(x: jax.Array) -> jax.Array:
  """Mean over H and W of an NHWC batch (the reference AvgPool(8)/(4) on 32x32)."""
  return jnp.mean(x, axis=(1, 2))


def flatten(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0], -1))


class InputTransformed(nn.Module):
  """A model behind a fixed, deterministic input transformation it was trained with.

  Thermometer encoding (Buckman et al. 2018) is the example: the network
  sees `transform(x)` (more channels than `x`), yet its callers still pass
  images in [0, 1], so attacks and evaluators treat it like any model.
  `transformed=True` feeds an already transformed input to the inner
  network: what an adaptive attacker needs to put a differentiable
  approximation of `transform` in front of it (BPDA, Athalye et al. 2018).

  Attributes:
    inner: the network applied to the transformed input.
    transform: `x -> transform(x)`, deterministic and traceable.
  """
  inner: nn.Module
  transform: Any

  @nn.compact
  def __call__(self, x: Any, train: bool = False, transformed: bool = False) -> jax.Array:
    return self.inner(x if transformed else self.transform(x), train=train)
