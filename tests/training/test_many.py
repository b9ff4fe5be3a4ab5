"""Tests of the many-models trainer: masks, per-model data, the vmapped step,
exact resume, restoring members, and bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from certjax import data as data_lib
from certjax import runs
from certjax.data import membership as membership_lib
from certjax.training import many as many_lib
from certjax.training import metrics as metrics_lib
from certjax.training import objectives as objectives_lib
from certjax.training import state as state_lib
from certjax.training import train as train_lib
from tests.conftest import smoke_config

K = 4


def many_config(**overrides):
  """configs/mnist5k.py at smoke scale as 4 shadow models on random halves."""
  return smoke_config("mnist5k", overrides={
      "num_models": K, "data.membership": "random_half", "model.kwargs": {"hidden": (16,)},
      "num_train_steps": 40, "log_every_steps": 20, "checkpoint_every_steps": 20,
      "optimizer.learning_rate": 3e-3, "optimizer.schedule": "constant", **overrides})


@pytest.fixture(scope="module")
def many_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("many"))
  return train_lib.train_and_evaluate(many_config(), workdir)


def test_masks_designs():
  half = membership_lib.membership_masks("random_half", 8, 500, seed=3)
  assert half.shape == (8, 500) and (half.sum(0) == 4).all()   # each example in 4 of 8
  assert not np.array_equal(half, membership_lib.membership_masks("random_half", 8, 500, 4))
  np.testing.assert_array_equal(half, membership_lib.membership_masks("random_half", 8, 500, 3))
  part = membership_lib.membership_masks("disjoint", 3, 100, seed=0)
  assert (part.sum(0) == 1).all() and sorted(part.sum(1)) == [33, 33, 34]
  frac = membership_lib.membership_masks("fraction", 10, 200, 0, fraction=0.3)
  assert (frac.sum(0) == 3).all()
  with pytest.raises(ValueError, match="no example has both IN and OUT"):
    membership_lib.membership_masks("random_half", 1, 100, 0)


def test_mask_file_is_checked(tmp_path):
  path = str(tmp_path / "m.npy")
  np.save(path, np.ones((2, 5), bool))
  with pytest.raises(ValueError, match=r"shape \(2, 5\).*\(3, 5\)"):
    membership_lib.membership_masks("file", 3, 5, 0, path=path)
  np.save(path, np.ones((2, 5), np.int32))
  with pytest.raises(ValueError, match="bool"):
    membership_lib.membership_masks("file", 2, 5, 0, path=path)


def test_bad_configs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"membership_fraction must lie in \(0, 1\)"):
    train_lib.train_and_evaluate(many_config(**{"data.membership_fraction": 1.5}), str(tmp_path))
  with pytest.raises(ValueError, match="data_config.membership"):
    train_lib.train_and_evaluate(many_config(**{"data.membership": "halves"}), str(tmp_path))
  with pytest.raises(ValueError, match="clear config.evals"):
    train_lib.train_and_evaluate(many_config(evals={"pgd": {"type": "robust"}}), str(tmp_path))
  with pytest.raises(ValueError, match="num_models must be"):
    train_lib.train_and_evaluate(many_config(num_models=0), str(tmp_path))
  with pytest.raises(ValueError, match="multiple of models_per_block=3"):
    train_lib.train_and_evaluate(many_config(models_per_block=3), str(tmp_path))


def test_member_order_walks_each_models_own_members():
  masks = membership_lib.membership_masks("random_half", 3, 50, seed=1)
  order = many_lib.MemberOrder(masks, batch_size=5, seed=0)
  sizes = masks.sum(1)
  for k in range(3):
    # The first epoch of model k: every member exactly once, nothing else.
    steps = int(sizes[k]) // 5
    seen = np.concatenate([order.indices(s)[k] for s in range(steps)])
    assert set(seen) <= set(np.flatnonzero(masks[k]))
    assert len(set(seen)) == len(seen)
  np.testing.assert_array_equal(order.indices(7), many_lib.MemberOrder(masks, 5, 0).indices(7))
  with pytest.raises(ValueError, match="exceeds the training subset"):
    many_lib.MemberOrder(masks, batch_size=40, seed=0)


def test_vmapped_step_equals_one_model_at_a_time():
  # The K-model program must compute, for each model, exactly what the
  # single-model step computes on that model's batch and key.
  config = many_config()
  info = data_lib.get_info(config.data)
  model = runs.build_model(config, info)
  tx = optax.adam(1e-2)
  ctx = objectives_lib.ObjectiveContext(model.apply, info.num_classes, 10, info.image_shape)
  loss_fn = objectives_lib.get_objective(config.objective, ctx)
  create = lambda key: state_lib.create_train_state(config, model, tx, info, key)  # noqa: E731
  init_keys = many_lib.model_keys(jax.random.key(0), K)
  train_keys = many_lib.model_keys(jax.random.key(1), K)
  stacked = jax.vmap(create)(init_keys)
  images = np.random.default_rng(0).integers(0, 256, (30, 28, 28, 1), np.uint8)
  labels = np.arange(30, dtype=np.int32) % 10
  indices = np.random.default_rng(1).integers(0, 30, (K, 8)).astype(np.int32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding, index_sharding = many_lib._shardings(mesh, K, 8)
  step = many_lib.make_many_step(loss_fn, tx, False, sharding, index_sharding, mesh)
  new_stacked, metrics = step(stacked, images, labels, indices, train_keys, train_keys)
  single = jax.jit(state_lib.train_step_fn(loss_fn, tx))
  losses = []
  for k in range(K):
    batch = {"image": images[indices[k]].astype(np.float32) / 255, "label": labels[indices[k]]}
    new_k, metrics_k = single(create(init_keys[k]), batch, train_keys[k])
    losses.append(float(metrics_k["loss"]))
    for a, b in zip(jax.tree.leaves(new_k.params),
                    jax.tree.leaves(jax.tree.map(lambda x: x[k], new_stacked.params))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
  assert float(metrics["loss_worst_model"]) == pytest.approx(max(losses), rel=1e-5)
  # In blocks of models (the CPU default), each block its own vmap: the same models.
  blocked_step = many_lib.make_many_step(loss_fn, tx, False, sharding, index_sharding, mesh,
                                         block=K // 2)
  fresh = jax.vmap(create)(init_keys)  # the first step consumed (donated) `stacked`
  blocks, blocked_metrics = blocked_step(many_lib.split_models(fresh, K // 2), images, labels,
                                         indices, train_keys, train_keys)
  assert len(blocks) == 2
  for a, b in zip(jax.tree.leaves(new_stacked), jax.tree.leaves(many_lib.join_models(blocks))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for name, value in metrics.items():
    assert float(blocked_metrics[name]) == pytest.approx(float(value), rel=1e-6), name


def test_models_per_block():
  cpu = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert [many_lib.models_per_block(0, k, cpu) for k in (32, 16, 12, 7, 3)] == [8, 8, 6, 7, 3]
  assert many_lib.models_per_block(4, 32, cpu) == 4
  with pytest.raises(ValueError, match="multiple of models_per_block=5"):
    many_lib.models_per_block(5, 32, cpu)
  if len(jax.devices()) > 1:  # a model axis split over devices keeps one block
    two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    assert many_lib.models_per_block(0, 32, two) == 32


def test_device_crop_flip_matches_the_host_augmentation():
  key = jax.random.key(5)
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3)).astype(np.float32)
  offset_key, flip_key = jax.random.split(key)
  offsets = np.asarray(jax.random.randint(offset_key, (6, 2), 0, 9))
  flips = np.asarray(jax.random.bernoulli(flip_key, 0.5, (6,)))
  np.testing.assert_array_equal(many_lib.crop_flip(key, jnp.asarray(images)),
                                data_lib.crop_flip(images, offsets, flips))


def test_run_trains_k_models_saves_masks_and_restores_members(many_run):
  workdir = many_run.workdir
  masks = membership_lib.read_workdir_masks(workdir)
  np.testing.assert_array_equal(masks, many_run.masks)
  assert masks.shape == (K, 4000) and (masks.sum(0) == K // 2).all()
  assert many_run.eval_metrics["num_models"] == K
  # 40 steps of a 16-unit MLP on ~2,000 digits: every model well above chance.
  assert many_run.eval_metrics["accuracy_min"] > 0.6
  accuracies = many_run.eval_metrics["per_model_accuracy"]
  assert len(set(accuracies)) > 1   # different seeds and subsets, different models
  restored = runs.restore_models(workdir)
  x = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, 16)[0]
  for k in (0, K - 1):
    np.testing.assert_allclose(restored.member(k).logits_fn()(x), many_run.logits_fn(k)(x),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="restore_models"):
    runs.restore_model(workdir)
  with pytest.raises(ValueError, match="out of range"):
    restored.member(K)


def test_resume_is_exact_and_masks_are_checked(many_run, tmp_path):
  workdir = str(tmp_path / "resumed")
  # In blocks of 2 models (saved and restored as one stacked state): the same models.
  blocked = many_config(models_per_block=2)
  uninterrupted = train_lib.train_and_evaluate(blocked, workdir)
  for a, b in zip(jax.tree.leaves(jax.device_get(uninterrupted.state.params)),
                  jax.tree.leaves(jax.device_get(many_run.state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # float rounding of the blocks
  # Lose the last checkpoint (a run killed after step 20's): the resumed run
  # must end bit for bit where the uninterrupted one did, logging each step once.
  import shutil
  shutil.rmtree(os.path.join(workdir, "checkpoints", "40"))
  resumed = train_lib.train_and_evaluate(blocked, workdir)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state.params)),
                  jax.tree.leaves(jax.device_get(uninterrupted.state.params))):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]
  assert steps == [20, 40]
  with pytest.raises(ValueError, match="other membership masks"):
    train_lib.train_and_evaluate(many_config(seed=1), workdir)


_SHARDED_SCRIPT = """
import json, sys, tempfile
import jax, numpy as np
from certjax.training import train as train_lib
from tests.training.test_many import many_config
out = {}
for k in (4, 3):   # 4 models: the model axis split over 2 devices; 3: the batch axis
  with tempfile.TemporaryDirectory() as workdir:
    result = train_lib.train_and_evaluate(
        many_config(num_models=k, num_train_steps=10, checkpoint_every_steps=0), workdir)
    out[k] = [float(np.abs(np.asarray(leaf, np.float64)).sum())
              for leaf in jax.tree.leaves(jax.device_get(result.state.params))]
print("RESULT " + json.dumps({"devices": jax.device_count(), "sums": out}))
"""


def test_two_devices_train_the_same_models(tmp_path):
  from tests._subprocess import run_on_cpu_devices  # pylint: disable=import-outside-toplevel
  proc = run_on_cpu_devices(_SHARDED_SCRIPT, 2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = __import__("json").loads(line[len("RESULT "):])
  assert result["devices"] == 2
  for k in (4, 3):
    here = train_lib.train_and_evaluate(
        many_config(num_models=k, num_train_steps=10, checkpoint_every_steps=0),
        str(tmp_path / str(k)))
    sums = [float(np.abs(np.asarray(leaf, np.float64)).sum())
            for leaf in jax.tree.leaves(jax.device_get(here.state.params))]
    np.testing.assert_allclose(result["sums"][str(k)], sums, rtol=1e-5)
