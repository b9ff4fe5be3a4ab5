"""Named random streams: every consumer of randomness derives its key from (seed, stream).

    key = keys.stream_key(seed, keys.CERTIFY)     # fold_in(key(seed), tag("certify"))

Why: with bare seeds, two consumers given the same integer draw from the same
key tree. `jax.random.split(key(0))[1]` equals `fold_in(key(0), 1)`, so a
training run seeded 0 (which used `split(key(seed))`) and a certification
seeded 0 (which keys image i with `fold_in(key(seed), i)`) shared a key: the
noise certifying test image 1 was the noise drawn in training. Here each
stream folds a fixed 32-bit tag (the CRC-32 of its name) into `key(seed)`
first, so the trees of different streams are disjoint whatever their seeds
(up to hash collisions of probability about 2^-64), and a key never depends
on which other streams a run uses.

The data pipeline's shuffles and augmentation use NumPy generators seeded
with (seed, epoch, tag) (`certjax.data.pipeline`), a different generator
family.
"""

from __future__ import annotations

import zlib

import jax

TRAINING_INIT = "training/init"      # parameter initialisation
TRAINING_STEPS = "training/steps"    # per-step keys of the objective: fold_in(., step)
CERTIFY = "certify"                  # smoothing noise: fold_in(., dataset index)
ATTACK = "attack"                    # robust-accuracy attacks
EVALUATION = "evaluation"            # any other evaluator's randomness
POISON = "poison"                    # the poisoning stage (certjax.training.poison)
STREAMS = (TRAINING_INIT, TRAINING_STEPS, CERTIFY, ATTACK, EVALUATION, POISON)


def stream_tag(stream: str) -> int:
  """The fixed 32-bit tag of a stream name (CRC-32: stable across runs and versions)."""
  if not isinstance(stream, str) or not stream:
    raise ValueError(f"A random stream is named by a non-empty string; got {stream!r}.")
  return zlib.crc32(stream.encode())


def stream_key(seed: int, stream: str) -> jax.Array:
  """The root key of `stream` for `seed`: `fold_in(jax.random.key(seed), stream_tag(stream))`.

  Args:
    seed: a non-negative integer (e.g. `config.seed`, `config.certify.seed`).
    stream: the stream's name, e.g. `keys.CERTIFY`; new evaluation families
      name their own.

  Raises:
    ValueError: a negative or non-integer seed, or an empty stream name.
  """
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"A seed must be an integer >= 0; got {seed!r}.")
  return jax.random.fold_in(jax.random.key(seed), stream_tag(stream))
