"""Named random streams: no evaluator key is a training key, whatever the seeds."""

import jax
import numpy as np
import pytest

from certjax import keys
from certjax.smoothing import noise


def _data(key_array):
  return {tuple(row) for row in np.asarray(jax.random.key_data(key_array)).reshape(-1, 2)}


def test_bare_seeds_shared_keys_and_streams_do_not():
  # What the streams fix: split(key(0)) (training's old derivation) and
  # fold_in(key(0), i) (certification's old per-image key) coincide.
  old_training = _data(jax.random.split(jax.random.key(0)))
  old_certify = _data(noise.keys_for_indices(jax.random.key(0), np.arange(10)))
  assert old_training & old_certify
  # Now: the training keys (init, and the per-step keys of 1,000 steps) and
  # the certification keys of 10,000 images and attack keys, all with seed 0.
  init = keys.stream_key(0, keys.TRAINING_INIT)
  steps = keys.stream_key(0, keys.TRAINING_STEPS)
  training = _data(init) | _data(steps) | _data(
      jax.vmap(jax.random.fold_in, in_axes=(None, 0))(steps, np.arange(1000)))
  certify = _data(noise.keys_for_indices(keys.stream_key(0, keys.CERTIFY), np.arange(10_000)))
  attack = _data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      keys.stream_key(0, keys.ATTACK), np.arange(1000)))
  assert len(training) == 1002 and len(certify) == 10_000 and len(attack) == 1000
  assert not training & certify and not training & attack and not certify & attack


def test_stream_tags_are_distinct_fixed_and_checked():
  tags = [keys.stream_tag(s) for s in keys.STREAMS]
  assert len(set(tags)) == len(tags) and not {0, 1} & set(tags)
  assert keys.stream_tag("certify") == 1161586333  # CRC-32: the same in every run
  with pytest.raises(ValueError, match="seed must be an integer >= 0"):
    keys.stream_key(-1, keys.CERTIFY)
  with pytest.raises(ValueError, match="non-empty string"):
    keys.stream_key(0, "")
