"""Convolution written as im2col + one matrix product, for CPU backends.

XLA:CPU (jaxlib 0.10) lowers convolutions and their gradients to Eigen's
convolution, which for the small strided layers of the IBP CNNs is slower
than the matrix product XLA hands to its BLAS-like backends (the table
below). `Im2colConv` computes
exactly what `flax.linen.Conv` computes, with the same parameters (names,
shapes, dtypes and initialisers), by stacking the k x k strided slices of
the padded input on the channel axis ("im2col") and multiplying by the
kernel reshaped to (k*k*C_in, C_out). The two are interchangeable on the
same variables; checkpoints do not record which one ran.

Only pad, strided slice, concatenate and dot_general appear in its jaxpr, so
bound propagation (IBP, CROWN) handles it like the convolution and gives the
same bounds.

Select it with `get_model(..., conv_impl='im2col')` or `config.model.conv_impl`.
Whether it pays depends on the layer shapes and the batch, which is why there
is no automatic choice. Speed-up of im2col over nn.Conv (images/s ratio, > 1
means im2col is faster), jaxlib 0.10.2 on 2 cores of a Xeon with AVX-512,
batch 128, float32, machine nearly idle (2026-11-22):

    model (input)           forward   fwd + input grad   parameter grad
    ibp_small (28x28x1)      1.31          1.58              1.55
    ibp_medium (28x28x1)     0.99          1.51              1.81
    ibp_large (28x28x1)      0.94          1.10              1.22
    cnn7 (32x32x3)           0.66          0.71              1.09
    resnet20 (32x32x3)       0.32          0.52              0.81

So on CPU it speeds up attacks and certified training of the small strided
IBP CNNs and slows down the ResNets, whose many stride-1 3x3 convolutions
with 16-64 channels XLA:CPU runs well, while the 9x larger im2col operand
costs memory traffic. At batch 512 ibp_small's forward gain fell to 1.08. On
GPU and TPU use 'xla': cuDNN and the TPU compiler pick their own algorithm.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# No 'auto': whether im2col wins depends on the layer shapes and the batch
# (measured table in the module docstring), not just on the backend.
CONV_IMPLS = ("xla", "im2col")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  # XLA's / flax's 'SAME': output ceil(size / stride), extra pad on the high side.
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class Im2colConv(nn.Module):
  """`nn.Conv` (2-D, NHWC, square kernel, no dilation or groups) as a matmul.

  Attributes:
    features: output channels.
    kernel_size: (k, k).
    strides: (s, s).
    padding: 'SAME', 'VALID', an int (same on every side) or
      ((top, bottom), (left, right)), as for `nn.Conv`.
    use_bias: whether to add a bias.
    dtype: compute dtype (None: promoted from inputs and parameters).
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser (HWIO shape, like `nn.Conv`).
    bias_init: bias initialiser.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.linear.default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    sh, sw = self.strides
    if x.ndim != 4:
      raise ValueError(f"Im2colConv expects NHWC inputs, got shape {x.shape}.")
    c_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, c_in, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

    pad = self.padding
    if isinstance(pad, str):
      if pad.upper() == "SAME":
        pads = (_same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw))
      elif pad.upper() == "VALID":
        pads = ((0, 0), (0, 0))
      else:
        raise ValueError(f"padding must be 'SAME', 'VALID' or ints, got {pad!r}.")
    elif isinstance(pad, int):
      pads = ((pad, pad), (pad, pad))
    else:
      pads = tuple(tuple(int(p) for p in side) for side in pad)
    if any(p for side in pads for p in side):
      x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    if out_h < 1 or out_w < 1:
      raise ValueError(
          f"Im2colConv: a {kh}x{kw} kernel does not fit the (padded) input of "
          f"spatial shape {x.shape[1:3]}.")
    # Slices in (i, j) order, channels innermost: the rows of the HWIO kernel
    # reshaped to (kh*kw*c_in, features).
    slices = [
        x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
        for i in range(kh) for j in range(kw)]
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    y = jnp.dot(patches, kernel.reshape(kh * kw * c_in, self.features))
    if bias is not None:
      y = y + bias
    return y
