"""Helpers shared by the distributed tests: subprocess environment, free ports."""

import os
import socket

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  """A localhost port that nothing listens on (free when this returns)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
  """A child's environment: CPU only, the tests' compilation cache, and no
  CERTJAX_* multi-process settings inherited from the caller."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("CERTJAX_") or k == "CERTJAX_JAX_CACHE"}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
  env.update(extra)
  return env


def certjax_env(**values) -> dict[str, str]:
  """{'CERTJAX_<NAME>': str(value)} for each keyword."""
  return {f"CERTJAX_{k}": str(v) for k, v in values.items()}
