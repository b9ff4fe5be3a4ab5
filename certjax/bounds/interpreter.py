"""A small jaxpr interpreter shared by the bound-propagation analyses.

`eval_jaxpr` walks the equations of a jaxpr and hands each one to an
analysis-specific `eval_eqn(eqn, invals) -> list of outvals`. Call-like
primitives (`jit`, `custom_jvp_call`, `remat`, ...) carry an inner jaxpr that
`inner_jaxpr` extracts, so analyses can recurse instead of treating them as
opaque. Values in the environment are whatever the analysis uses (arrays,
`Interval`s, tagged arrays).

Every matrix product and convolution an analysis binds goes through
`full_precision`: bounds are only as good as the arithmetic that computes
them, and the default precision on accelerators (TF32 on GPUs, one bfloat16
pass on TPUs, or whatever `jax.default_matmul_precision` says at trace time)
is not float32.

References:
  jax_verify `src/bound_propagation.py` (DeepMind), for the design of a
  primitive-by-primitive jaxpr interpreter.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
from jax.extend import core as jex_core

# Primitives whose semantics are "evaluate this inner jaxpr". Names, not
# objects, so the table survives renames across JAX versions (pjit -> jit,
# remat -> remat2, custom_vjp_call_jaxpr -> custom_vjp_call).
CALL_PRIMITIVES = frozenset({
    "jit", "pjit", "closed_call", "core_call", "call", "remat", "remat2", "checkpoint",
    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin",
})

EqnEvaluator = Callable[[Any, list], list]

PRODUCT_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated"})
"""Primitives whose `precision` parameter `full_precision` overrides."""

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def full_precision(name: str, params: Mapping[str, Any]) -> Any:
  """`params` of primitive `name` with products forced to float32 (`Precision.HIGHEST`).

  The traced `precision` reflects the caller's code and the default in force
  when it was traced (`jax.default_matmul_precision`), e.g. bfloat16 or TF32
  passes: fine for inference, unsound for bounds.
  """
  if name in PRODUCT_PRIMITIVES:
    return dict(params, precision=HIGHEST)
  return params


def inner_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
  """The (jaxpr, consts) a call-like equation evaluates, or None."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jex_core.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jex_core.Jaxpr):
      return sub, ()
  return None


def call_name(eqn) -> str | None:
  """The user-facing name of a call equation (e.g. 'relu', 'softplus'), if any."""
  name = eqn.params.get("name")
  return name if isinstance(name, str) else None


def bind_eqn(eqn, invals: Sequence[Any]) -> list:
  """Evaluates `eqn` on concrete (or traced) values, products at full precision; a list."""
  params = full_precision(eqn.primitive.name, eqn.primitive.get_bind_params(eqn.params))
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any],
               eval_eqn: EqnEvaluator) -> list:
  """Evaluates `jaxpr` on `args`, delegating every equation to `eval_eqn`."""
  env: dict[Any, Any] = {}

  def read(var):
    if isinstance(var, jex_core.Literal):
      return var.val
    return env[var]

  if len(args) != len(jaxpr.invars):
    raise ValueError(f"jaxpr expects {len(jaxpr.invars)} inputs, got {len(args)}.")
  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    outvals = eval_eqn(eqn, [read(v) for v in eqn.invars])
    if len(outvals) != len(eqn.outvars):
      raise AssertionError(
          f"rule for {eqn.primitive.name} returned {len(outvals)} values, "
          f"expected {len(eqn.outvars)}.")
    for var, value in zip(eqn.outvars, outvals):
      if not isinstance(var, jex_core.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def concrete_eval_eqn(eqn, invals: list) -> list:
  """The plain evaluator: binds every primitive as JAX would."""
  return bind_eqn(eqn, invals)
