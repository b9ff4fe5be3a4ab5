"""Many models at once: K models trained by one jitted, vmapped program.

Shadow models for membership inference (Shokri et al. 2017; LiRA trains 16 to
256 of them), reference models for RMIA, property-inference shadow sets,
ensembles and simulated federated clients are all K copies of one small
model, each with its own seed and often its own training subset. Trained one
after another, each small model leaves the accelerator (and on a CPU, the
cores) mostly idle; here the K training steps are one program, the step
function `vmap`ped over a stacked `TrainState` whose every leaf has a leading
model axis.

What a run does (`train_many(config, workdir)`, reached through
`train_and_evaluate` whenever `config.num_models > 1` or
`config.data.membership != 'all'`):
  * masks: `[K, N]` bool over the train split from `config.data.membership`
    (`certjax.data.membership`), written to `<workdir>/membership.npy` before
    the first step and checked against it on resume;
  * data: the train split is held on the devices as uint8 and each step
    gathers model k's batch there from indices computed on the host: model
    k walks through per-epoch permutations of its own members, seeded by
    (seed, k, epoch), so every batch is a pure function of (seed, k, step)
    and a resumed run sees exactly the batches of an uninterrupted one;
    `augment='crop_flip'` crops and flips on the device (keys folded from
    (seed, k, step));
  * keys: model k's initialisation and step keys are `fold_in(stream, k)` of
    the named training streams (`certjax.keys`);
  * sharding: when K is a multiple of the device count, the model axis is
    split over the devices (no communication at all: each device trains its
    own models); otherwise every device holds all models and the batch axis
    is split; on one CPU device the K models are vmapped in blocks of
    `config.models_per_block` (default 8) inside the one program
    (`models_per_block`);
  * checkpoints: the stacked `TrainState`, one orbax checkpoint per save,
    signed like a single model's (`certjax.runs.checkpoints`), restored
    together by `certjax.runs.restore_models`, whose `.member(k)` is model k
    as an ordinary `TrainedModel` (its `logits_fn()` for every attack);
  * `num_epochs` counts passes over each model's own subset (its mean size),
    so 'random_half' shadow models take as many steps per epoch as their
    subsets need;
  * evaluation: every model's clean accuracy on the eval split at the end
    (logged as the mean, min and max over models; the per-model values in
    `<workdir>/models_eval.json`).

References:
  R. Shokri, M. Stronati, C. Song, V. Shmatikov. Membership Inference
  Attacks Against Machine Learning Models. IEEE S&P 2017.
  N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramer. Membership
  Inference Attacks From First Principles. IEEE S&P 2022.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from certjax import data as data_lib
from certjax import evaluation
from certjax import keys
from certjax import models as models_lib
from certjax import parallel
from certjax import runs
from certjax.data import membership as membership_lib
from certjax.runs import checkpoints as ckpt_lib
from certjax.runs import provenance as provenance_lib
from certjax.training import metrics as metrics_lib
from certjax.training import state as state_lib

MODELS_EVAL_FILE = "models_eval.json"
# Tags of the host-side batch order and the device-side augmentation keys.
_ORDER_TAG = 0x6D6F_7264
AUGMENT_STREAM = "training/augment"
_PADDING = 4


@dataclasses.dataclass
class ManyTrainResult:
  """What `train_many` returns.

  Attributes:
    state: the stacked `TrainState` (leading axis: the K models).
    model: the Flax module shared by all models.
    info: the data set's `DatasetInfo`.
    masks: bool [K, N] training masks over the train split.
    eval_metrics: mean/min/max clean accuracy over models, and the per-model lists.
    workdir: the workdir.
  """
  state: state_lib.TrainState
  model: Any
  info: data_lib.DatasetInfo
  masks: np.ndarray
  eval_metrics: dict[str, Any]
  workdir: str

  @property
  def num_models(self) -> int:
    return int(self.masks.shape[0])

  def member_variables(self, k: int) -> dict[str, Any]:
    return jax.device_get(jax.tree.map(lambda a: a[k], self.state.variables))

  def logits_fn(self, k: int = 0):
    """Model k's pure `logits_fn`."""
    return models_lib.make_logits_fn(self.model, self.member_variables(k))


class MemberOrder:
  """Batch indices of K models, each walking per-epoch permutations of its own members.

  Model k's stream is the concatenation of permutations of its member
  indices, epoch e drawn from (seed, k, e); its batch at step s is stream
  positions [s * B, (s + 1) * B), so no example is dropped at an epoch boundary.
  With `rotated` [K, N] flags and `rotated_slot` [N] (from
  `membership.rotated_copies`), a member model k sees rotated is replaced by
  the index of its rotated copy: the same order, other images.
  """

  def __init__(self, masks: np.ndarray, batch_size: int, seed: int,
               rotated: np.ndarray | None = None, rotated_slot: np.ndarray | None = None):
    self.members = [np.flatnonzero(m) for m in np.asarray(masks, bool)]
    if rotated is not None:
      self.members = [np.where(flags[members], rotated_slot[members], members)
                      for members, flags in zip(self.members, np.asarray(rotated, bool))]
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    small = [k for k, m in enumerate(self.members) if len(m) < self.batch_size]
    if small:
      raise ValueError(
          f"batch_size={self.batch_size} exceeds the training subset of model(s) "
          f"{small[:10]} ({min(len(self.members[k]) for k in small)} examples); lower "
          "batch_size or use a membership design with larger subsets.")
    # Model k's epochs: permutations of its members drawn from (seed, k, epoch).
    self.orders = [data_lib.pipeline.EpochOrder(len(m), self.seed, (k, _ORDER_TAG))
                   for k, m in enumerate(self.members)]

  def indices(self, step: int) -> np.ndarray:
    """int32 [K, B]: the train-split indices of every model's batch at `step` (0-based)."""
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    return np.stack([members[order.indices(positions)] for members, order in
                     zip(self.members, self.orders)]).astype(np.int32)


def crop_flip(key: jax.Array, images: jax.Array, padding: int = _PADDING) -> jax.Array:
  """Random crop after zero padding, then a random horizontal flip, on the device.

  The same augmentation as `certjax.data.crop_flip` (the CIFAR recipe of He
  et al. 2016), with offsets and flips drawn from `key`.
  """
  n, h, w, c = images.shape
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


def model_keys(root: jax.Array, num_models: int) -> jax.Array:
  """[K] keys: `fold_in(root, k)` for model k."""
  return jax.vmap(lambda k: jax.random.fold_in(root, k))(jnp.arange(num_models))


def _shardings(mesh, num_models: int, batch_size: int):
  """(state sharding, index sharding): the model axis split when K allows, else the batch."""
  devices = mesh.devices.size
  if num_models % devices == 0:
    return NamedSharding(mesh, P(parallel.DATA_AXIS)), NamedSharding(mesh, P(parallel.DATA_AXIS))
  parallel.check_batch_size(batch_size, mesh, "batch_size")
  return parallel.replicated(mesh), NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def _global(array: np.ndarray, sharding) -> jax.Array:
  """A global array from a host array every process holds in full."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def models_per_block(configured: int, num_models: int, mesh) -> int:
  """How many models one vmapped block of the K-model step trains.

  `configured` > 0 is used as it is (K must be a multiple). 0 picks 8 on a
  one-device CPU (the largest divisor of K up to 8) and all K elsewhere: on
  the 2-core CPU, 32 784-256-10 MLPs trained as 4 independent blocks of 8
  ran up to 1.4x faster than as one vmap of 32 (each block's optimizer
  state stays in cache, and XLA runs independent blocks side by side);
  blocks made no difference to 16 of them or to 128 784-32-10 MLPs
  (benchmarks/many_models.py). An accelerator wants one wide program.
  """
  if configured:
    if num_models % configured:
      raise ValueError(f"num_models={num_models} must be a multiple of models_per_block="
                       f"{configured}.")
    return int(configured)
  if mesh.devices.size > 1 or mesh.devices.flat[0].platform != "cpu":
    return num_models
  return max(d for d in range(1, min(8, num_models) + 1) if num_models % d == 0)


def split_models(tree, block: int) -> tuple:
  """A stacked pytree [K, ...] as a tuple of K / block stacked pytrees [block, ...]."""
  num_models = jax.tree.leaves(tree)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i:i + block], tree)
               for i in range(0, num_models, block))


def join_models(blocks: tuple):
  """The inverse of `split_models`: one stacked pytree [K, ...]."""
  return jax.tree.map(lambda *a: jnp.concatenate(a), *blocks)


def make_many_step(loss_fn, tx, augment: bool, state_sharding, index_sharding, mesh,
                   block: int = 0):
  """The jitted step of K models: gather, augment, vmapped `train_step_fn`.

  `step(state, images_u8, labels, indices [K, B], train_keys [K], augment_keys [K])
  -> (state, metrics)`, metrics averaged over models plus the worst model's loss.
  With `block` > 0, `state` is the tuple `split_models(stacked, block)` and
  each block of models is its own vmap inside the one program: the same
  per-model computation (to float rounding), without writing the K models'
  state back into one array every step.
  """
  single = state_lib.train_step_fn(loss_fn, tx)

  def block_step(state, images_u8, labels, indices, train_keys, augment_keys):
    x = images_u8[indices].astype(jnp.float32) / jnp.float32(255.0)
    if augment:
      x = jax.vmap(lambda key, s, xs: crop_flip(jax.random.fold_in(key, s), xs))(
          augment_keys, state.step, x)
    batch = {"image": x, "label": labels[indices]}
    return jax.vmap(single)(state, batch, train_keys)

  def step(state, images_u8, labels, indices, train_keys, augment_keys):
    if block:
      outputs = [block_step(part, images_u8, labels, *(a[i * block:(i + 1) * block] for a in
                                                       (indices, train_keys, augment_keys)))
                 for i, part in enumerate(state)]
      new_state = tuple(new for new, _ in outputs)
      metrics = join_models(tuple(m for _, m in outputs))
    else:
      new_state, metrics = block_step(state, images_u8, labels, indices, train_keys,
                                      augment_keys)
    summary = {name: jnp.mean(value) for name, value in metrics.items()}
    summary["loss_worst_model"] = jnp.max(metrics["loss"])
    return new_state, summary

  repl = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(state_sharding, repl, repl, index_sharding, state_sharding,
                                     state_sharding),
                 out_shardings=(state_sharding, repl), donate_argnums=(0,))


def evaluate_models(model, variables, images_u8: np.ndarray, labels: np.ndarray,
                    batch_size: int) -> dict[str, np.ndarray]:
  """Per-model clean accuracy and loss on (images, labels): float64 [K] each."""
  logits = evaluation.common.stacked_logits(
      model.apply, variables, data_lib.pipeline.to_float(images_u8), batch_size
  ).astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  n = max(len(labels), 1)
  correct = (logits.argmax(-1) == labels[None]).sum(1)
  loss = -np.take_along_axis(log_probs, labels[None, :, None], -1)[..., 0].sum(1)
  return {"accuracy": correct / n, "loss": loss / n}


def _check_masks_file(workdir: str, masks: np.ndarray, name: str, what: str) -> None:
  """Writes bool [K, N] masks (process 0) or checks them against the ones a run saved."""
  path = os.path.join(workdir, name)
  if os.path.exists(path):
    saved = membership_lib.read_masks_file(path)
    if saved.shape != masks.shape or not np.array_equal(saved, masks):
      raise ValueError(
          f"{path} holds other {what} (shape {saved.shape}) than this config "
          f"draws ({masks.shape}): the workdir was trained with another seed, num_models or "
          "data.membership (or property settings). Use a new --workdir.")
    return
  if jax.process_index() == 0:
    runs.files.atomic_write_npy(path, masks)


def total_many_steps(config: ml_collections.ConfigDict, masks: np.ndarray) -> int:
  """`num_train_steps`, or `num_epochs` passes over the models' mean subset size."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  mean_size = float(np.asarray(masks, bool).sum(1).mean())
  return max(1, int(np.ceil(config.num_epochs * mean_size / config.batch_size)))


def train_many(config: ml_collections.ConfigDict, workdir: str) -> ManyTrainResult:
  """Trains `config.num_models` models at once (module docstring), resuming from `workdir`.

  Args:
    config: a validated run config with defaults (`train_and_evaluate` calls
      this for many-models configs).
    workdir: checkpoints, masks, metrics.

  Returns:
    A `ManyTrainResult`.

  Raises:
    ValueError: masks that do not fit the data, a batch larger than a model's
      subset, or a workdir trained with other masks.
    FloatingPointError: NaN/Inf loss or parameters (no checkpoint written).
  """
  info = data_lib.get_info(config.data)
  mesh = parallel.make_mesh()
  num_models = int(config.num_models)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  augment = config.data.augment == "crop_flip"
  if augment and config.data.image_size:
    raise ValueError("The many-models trainer augments on the device at the native image "
                     "size; data.augment='crop_flip' with data.image_size > 0 is not "
                     "supported there (set data.image_size=0 or data.augment='none').")
  images_u8, labels = data_lib.load_split_uint8(config.data, config.data.train_split)
  masks = membership_lib.membership_masks(
      config.data.membership, num_models, len(labels), int(config.seed),
      fraction=float(config.data.membership_fraction), path=config.data.membership_file,
      labels=labels, property_class=int(config.data.property_class),
      property_fractions=tuple(config.data.property_fractions),
      property_subset_size=int(config.data.property_subset_size),
      property_kind=config.data.property_kind)
  rotated = rotated_slot = None
  if config.data.membership == "property" and config.data.property_kind == "rotated_share":
    rotated = membership_lib.rotated_share_design(
        len(labels), num_models, int(config.seed), config.data.property_fractions,
        config.data.property_subset_size)[1]
    images_u8, labels, rotated_slot = membership_lib.rotated_copies(
        images_u8, labels, rotated, int(config.data.property_rotation))
  order = MemberOrder(masks, config.batch_size, int(config.seed), rotated, rotated_slot)
  total_steps = total_many_steps(config, masks)
  state_sharding, index_sharding = _shardings(mesh, num_models, config.batch_size)

  model, tx, schedule, loss_fn = state_lib.model_and_objective(config, info, total_steps)

  init_keys = model_keys(keys.stream_key(int(config.seed), keys.TRAINING_INIT), num_models)
  train_keys = jax.device_put(
      model_keys(keys.stream_key(int(config.seed), keys.TRAINING_STEPS), num_models),
      state_sharding)
  augment_keys = jax.device_put(
      model_keys(keys.stream_key(int(config.seed), AUGMENT_STREAM), num_models),
      state_sharding)
  create = functools.partial(state_lib.create_train_state, config, model, tx, info)
  state = jax.jit(jax.vmap(create), out_shardings=state_sharding)(init_keys)

  signer = state_lib.signing_policy(config)
  ckpt_lib.write_config(workdir, config)
  _check_masks_file(workdir, masks, membership_lib.MASK_FILE, "membership masks")
  if rotated is not None:
    _check_masks_file(workdir, rotated, membership_lib.ROTATED_FILE, "rotation flags")
  manager = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints)
  resumed = ckpt_lib.resume(manager, state, signer)
  if resumed.state is not None:
    state = jax.device_put(resumed.state, state_sharding)
    logging.info("Resumed %d models from checkpoint at step %d in %s", num_models,
                 int(state.step[0]), manager.directory)
  start_step = int(jax.device_get(state.step)[0])
  if jax.process_index() == 0:
    provenance_lib.append_training_entry(workdir, provenance_lib.training_entry(
        config, workdir, start_step=start_step, total_steps=total_steps,
        resumed_from=resumed.checkpoint, signing=signer.describe(),
        hash_train_examples=config.provenance.hash_train_examples))
  signed: dict[int, str] = {}

  repl = parallel.replicated(mesh)
  images_dev, labels_dev = _global(images_u8, repl), _global(labels, repl)
  block = models_per_block(int(config.get("models_per_block", 0)), num_models, mesh)
  block = block if block < num_models else 0
  step_fn = make_many_step(loss_fn, tx, augment, state_sharding, index_sharding, mesh, block)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
  progress = runs.Progress(total_steps, config.batch_size * num_models, start_step)

  def joined(state):
    return join_models(state) if block else state

  def save(state, step: int) -> None:
    state = joined(state)
    if not state_lib.all_finite(state.params):
      raise FloatingPointError(
          f"Parameters of some of the {num_models} models contain NaN/Inf at step {step}; "
          "not writing a checkpoint. Lower optimizer.learning_rate or set "
          "optimizer.grad_clip_norm.")
    record = ckpt_lib.save_checkpoint(manager, step, state, signer)
    if record is not None:
      signed[step] = record["sha256"]

  logging.info("Training %d x %s on %s for %d steps (batch %d per model, %s%s; masks %s)",
               num_models, config.model.name, info.name, total_steps, config.batch_size,
               "model axis over devices" if state_sharding.spec else "batch axis over devices",
               f", vmapped in blocks of {block}" if block else "",
               membership_lib.describe(masks))
  if (jax.default_backend() == "cpu" and config.model.name != "mlp"
      and config.model.get("conv_impl", "xla") == "xla"):
    # Measured by benchmarks/many_models.py (2-core CPU, K = 16, ibp_small):
    # vmapped over per-model weights, XLA:CPU convolutions run as grouped
    # convolutions at 0.5x the speed of training the models one by one;
    # im2col turns them into batched matrix products, 1.7x faster (0.8x of
    # the loop; 2026-12-03 reference run).
    logging.warning("Training %d convolutional models vmapped on a CPU: set "
                    "--config.model.conv_impl=im2col (about 1.7x faster here, same models).",
                    num_models)
  history = []
  start_time = time.perf_counter()
  if block:
    state = split_models(state, block)
  for step in range(start_step + 1, total_steps + 1):
    indices = _global(order.indices(step - 1), index_sharding)
    state, step_metrics = step_fn(state, images_dev, labels_dev, indices, train_keys,
                                  augment_keys)
    history.append(step_metrics)
    if step % config.log_every_steps == 0 or step == total_steps:
      metrics_lib.log_training_interval(writer, progress, step, history,
                                        float(schedule(step - 1)),
                                        worst_loss_key="loss_worst_model")
      history = []
    if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(state, step)

  if manager.latest_step() != total_steps:
    save(state, total_steps)
  manager.wait_until_finished()
  state = joined(state)
  if jax.process_index() == 0:
    provenance_lib.finish_training_entry(workdir, end_step=total_steps, checkpoints=signed)
  eval_images, eval_labels = data_lib.load_split_uint8(config.data, config.data.eval_split)
  keep = data_lib.info.capped_eval_size(data_lib.validate_data_config(config.data),
                                        len(eval_labels))
  per_model = evaluate_models(model, state.variables, eval_images[:keep], eval_labels[:keep],
                              config.eval_batch_size)
  eval_metrics = {
      "accuracy": float(per_model["accuracy"].mean()),
      "accuracy_min": float(per_model["accuracy"].min()),
      "accuracy_max": float(per_model["accuracy"].max()),
      "loss": float(per_model["loss"].mean()), "num_examples": float(keep),
      "num_models": float(num_models)}
  writer.write(total_steps, "eval", eval_metrics)
  writer.close()
  if jax.process_index() == 0:
    runs.atomic_write_json(os.path.join(workdir, MODELS_EVAL_FILE), {
        "step": total_steps, "split": config.data.eval_split, "num_examples": keep,
        "accuracy": per_model["accuracy"].tolist(), "loss": per_model["loss"].tolist(),
        "training_examples": masks.sum(1).tolist()})
  logging.info("Finished %d steps of %d models in %.1f s; eval accuracy mean %.4f "
               "(min %.4f, max %.4f) on %d examples", total_steps - start_step, num_models,
               time.perf_counter() - start_time, eval_metrics["accuracy"],
               eval_metrics["accuracy_min"], eval_metrics["accuracy_max"], keep)
  eval_metrics["per_model_accuracy"] = per_model["accuracy"].tolist()
  return ManyTrainResult(state, model, info, masks, eval_metrics, workdir)
