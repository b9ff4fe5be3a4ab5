"""Device mesh, shardings and multi-host start-up.

certjax is data-parallel over every device of every host: a one-axis
`jax.sharding.Mesh` named `data`, batches split along it with `NamedSharding`,
parameters and optimizer state replicated. All communication is JAX's: XLA
collectives (GSPMD) inside compiled programs, `jax.distributed` for start-up,
and `jax.experimental.multihost_utils` to gather evaluation results on the
host; nothing here moves data by hand. One device, eight forced CPU devices
and a multi-host GPU cluster or TPU pod slice all run the same code.

Multi-host conventions used by every runner:

  * `initialize_distributed()` runs first (the launch scripts call it);
  * each host reads only its part of the data: a contiguous slice of every
    global batch (training, `certjax.data`), or a contiguous share of the
    selected evaluation images (`host_share`);
  * padding added to fill a batch or a share carries a mask and never counts;
  * per-example results are gathered once with `process_allgather` and only
    process 0 (`is_main_process()`) writes files.

See launch/README.md for how to start such runs.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

ENV_ADDRESS = "CERTJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CERTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CERTJAX_PROCESS_ID"
ENV_TIMEOUT = "CERTJAX_DISTRIBUTED_TIMEOUT"
ENV_MODE = "CERTJAX_DISTRIBUTED"
DEFAULT_TIMEOUT_S = 300


def _auto_detected(environ: Mapping[str, str]) -> bool:
  """True inside a multi-process SLURM step, Open MPI job or TPU-pod (GKE) job,
  whose variables jax.distributed.initialize() reads by itself."""

  def count(name: str) -> int:
    text = environ.get(name, "").strip()
    return int(text) if text.isdigit() else 0

  return ((count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in environ)
          or count("OMPI_COMM_WORLD_SIZE") > 1
          or len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)


class CoordinatorUnreachableError(TimeoutError):
  """The coordinator of a multi-process run did not answer within the timeout."""


class DistributedSettings(NamedTuple):
  """What `initialize_distributed` passes to `jax.distributed.initialize`.

  Attributes:
    coordinator_address: 'host:port' of process 0, or None to let JAX detect
      the cluster (SLURM, Open MPI, TPU pod).
    num_processes: number of processes (None when detected).
    process_id: this process's id in [0, num_processes) (None when detected).
    timeout_s: seconds to wait for the coordinator and all processes.
  """
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout_s: int


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
  text = environ.get(name)
  if text is None or not text.strip():
    raise ValueError(
        f"{name} is not set. A multi-process run started with {ENV_ADDRESS} also needs "
        f"{ENV_NUM_PROCESSES} (the number of processes) and {ENV_PROCESS_ID} (this "
        "process's id, 0 on the coordinator host); see launch/README.md.")
  try:
    value = int(text.strip())
  except ValueError:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {text!r}.") from None
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
  return value


def distributed_settings(environ: Mapping[str, str] | None = None
                         ) -> DistributedSettings | None:
  """Reads the multi-process settings from the environment; None for one process.

  Explicit settings: `CERTJAX_COORDINATOR_ADDRESS=host:port` (process 0's
  host and a free port), `CERTJAX_NUM_PROCESSES` and `CERTJAX_PROCESS_ID`.
  Without them, a multi-process SLURM step, Open MPI job or GKE TPU job is
  left to `jax.distributed.initialize()`'s own detection, and so is any
  cluster it knows (e.g. a Cloud TPU VM pod slice) with
  `CERTJAX_DISTRIBUTED=auto`; `CERTJAX_DISTRIBUTED=off` forces a
  single-process run. `CERTJAX_DISTRIBUTED_TIMEOUT` (seconds, default 300)
  bounds the wait for the coordinator and the peers.

  Args:
    environ: the environment (default `os.environ`).

  Returns:
    The settings, or None when nothing asks for a multi-process run.

  Raises:
    ValueError: naming the variable that is missing or malformed.
  """
  environ = os.environ if environ is None else environ
  timeout_s = DEFAULT_TIMEOUT_S
  if environ.get(ENV_TIMEOUT, "").strip():
    timeout_s = _env_int(environ, ENV_TIMEOUT, 1)
  mode = environ.get(ENV_MODE, "").strip().lower()
  if mode not in ("", "auto", "off"):
    raise ValueError(f"{ENV_MODE} must be 'auto' (let jax.distributed.initialize() detect "
                     f"the cluster) or 'off' (one process); got {environ[ENV_MODE]!r}.")
  address = environ.get(ENV_ADDRESS, "").strip()
  if mode == "off":
    return None
  if not address:
    stray = [n for n in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if environ.get(n, "").strip()]
    if stray:
      raise ValueError(
          f"{' and '.join(stray)} set without {ENV_ADDRESS}: set it to 'host:port' of "
          "process 0 (the coordinator) on every process, or unset them for a "
          "single-process run.")
    if mode == "auto" or _auto_detected(environ):
      return DistributedSettings(None, None, None, timeout_s)
    return None
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
        f"{ENV_ADDRESS} must be 'host:port' with a port in [1, 65535] (e.g. "
        f"'10.0.0.1:12355'); got {address!r}.")
  num_processes = _env_int(environ, ENV_NUM_PROCESSES, 1)
  process_id = _env_int(environ, ENV_PROCESS_ID, 0)
  if process_id >= num_processes:
    raise ValueError(
        f"{ENV_PROCESS_ID}={process_id} is out of range: with {ENV_NUM_PROCESSES}="
        f"{num_processes} the ids are 0..{num_processes - 1}, one per process.")
  return DistributedSettings(address, num_processes, process_id, timeout_s)


def _wait_for_coordinator(address: str, deadline: float, settings: DistributedSettings
                          ) -> None:
  """Polls a TCP connection to the coordinator until it accepts or `deadline`.

  jax.distributed.initialize() aborts the whole process (a C++ fatal error,
  no Python exception) when the coordinator does not answer in time, so a
  non-coordinator process first checks that the port is reachable; this
  exchanges no data.
  """
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  last_error: Exception | None = None
  while True:
    try:
      with socket.create_connection((host, int(port)),
                                    timeout=max(0.1, min(2.0, deadline - time.time()))):
        return
    except OSError as e:
      last_error = e
    if time.time() >= deadline:
      break
    time.sleep(0.25)
  raise CoordinatorUnreachableError(
      f"Could not reach the coordinator at {address} within {settings.timeout_s} s "
      f"(this is process {settings.process_id} of {settings.num_processes}; last error: "
      f"{last_error}). Check that process 0 was started with the same "
      f"{ENV_ADDRESS}, that the host name resolves and the port is open from this "
      f"host (firewall), and that all {settings.num_processes} processes are launched; "
      f"raise {ENV_TIMEOUT} (seconds) if process 0 starts late.")


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` when the environment asks for it.

  A single-process run does nothing. Multi-process runs are recognised by
  certjax's explicit variables (see `distributed_settings`; any cluster,
  localhost tests), by `CERTJAX_DISTRIBUTED=auto`, or by the variables
  `jax.distributed.initialize` reads itself (SLURM, Open MPI, TPU on GKE).
  Must run before any other JAX call.

  The wait is bounded by `CERTJAX_DISTRIBUTED_TIMEOUT` seconds (default 300):
  a process other than 0 that cannot reach the coordinator raises
  `CoordinatorUnreachableError` naming the address; once connected, JAX's
  `initialization_timeout` bounds the wait for the remaining processes (JAX
  then ends the process with DEADLINE_EXCEEDED after the message logged here).

  Args:
    environ: the environment (default `os.environ`).

  Returns:
    True when `jax.distributed.initialize` was called.

  Raises:
    ValueError: malformed or incomplete CERTJAX_* variables.
    CoordinatorUnreachableError: the coordinator did not accept a connection
      in time.
  """
  settings = distributed_settings(environ)
  if settings is None:
    return False
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialized; not initializing again.")
    return True
  # Cross-process collectives on CPU devices need an implementation; gloo
  # ships with jaxlib (it is the default from jax 0.5 on, set for older ones).
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  deadline = time.time() + settings.timeout_s
  if settings.coordinator_address is None:
    logging.info("jax.distributed.initialize() with cluster auto-detection "
                 "(timeout %d s)", settings.timeout_s)
    try:
      jax.distributed.initialize(initialization_timeout=settings.timeout_s)
    except ValueError as e:
      raise ValueError(
          f"jax.distributed.initialize() could not detect the cluster ({e}); it knows "
          "SLURM steps, Open MPI jobs and Cloud TPU VMs. Elsewhere set "
          f"{ENV_ADDRESS}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (see "
          "launch/README.md).") from e
  else:
    if settings.process_id != 0:
      _wait_for_coordinator(settings.coordinator_address, deadline, settings)
    remaining = max(1, math.ceil(deadline - time.time()))
    logging.warning(
        "Process %d of %d: connecting to the coordinator at %s and waiting up to %d s "
        "for all processes (%s). If this ends with DEADLINE_EXCEEDED, a process did not "
        "start or cannot reach %s.", settings.process_id, settings.num_processes,
        settings.coordinator_address, remaining, ENV_TIMEOUT,
        settings.coordinator_address)
    # 'deactivate': explicit settings win over a scheduler's variables, which
    # would otherwise (under SLURM or Open MPI) restrict every process to one GPU.
    jax.distributed.initialize(
        settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id, initialization_timeout=remaining,
        cluster_detection_method="deactivate")
  logging.info("Process %d of %d: %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes result files."""
  return jax.process_index() == 0


def make_mesh(devices: Any = None) -> Mesh:
  """A one-axis mesh over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """A one-axis mesh over this host's devices, for work that needs no peers."""
  return make_mesh(jax.local_devices())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises unless the global batch splits evenly over devices and hosts."""
  num_devices = mesh.devices.size
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(
        f"{name}={batch_size} must be a positive multiple of the number of devices "
        f"({num_devices}) so that every device gets the same share; for example "
        f"{max(1, batch_size // num_devices) * num_devices} or "
        f"{(batch_size // num_devices + 1) * num_devices}.")
  if batch_size % jax.process_count():
    raise ValueError(f"{name}={batch_size} must be divisible by the number of hosts "
                     f"({jax.process_count()}).")


def round_up_batch(batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
  """The smallest multiple of the mesh's device count >= `batch_size`.

  For evaluation, where the extra rows are masked padding: the result does
  not change, only the work per call.
  """
  num_devices = mesh.devices.size
  rounded = -(-int(batch_size) // num_devices) * num_devices
  if rounded != batch_size:
    logging.info("%s=%d rounded up to %d, a multiple of the %d devices (the extra rows "
                 "are masked padding).", name, batch_size, rounded, num_devices)
  return rounded


def host_share(count: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[slice, int]:
  """This host's contiguous share of `count` items, and the padded share size.

  Host h of P takes items [h * m, min((h + 1) * m, count)) with
  m = ceil(count / P), so the shares tile [0, count) in order and every item
  belongs to exactly one host. Hosts past the end get an empty share.

  Returns:
    (slice of this host's items, m): pad every share to m rows (masked) to
    gather them with `process_allgather`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  size = -(-int(count) // process_count)
  start = min(process_index * size, count)
  return slice(start, min(start + size, count)), size


def unpad_shares(gathered: np.ndarray, count: int) -> np.ndarray:
  """Inverse of padding `host_share`s: [P, m, ...] gathered -> [count, ...] in order."""
  process_count, size = gathered.shape[:2]
  rows = []
  for h in range(process_count):
    share, _ = host_share(count, h, process_count)
    rows.append(gathered[h, :share.stop - share.start])
  return np.concatenate(rows)


def pad_rows(a: Any, size: int) -> np.ndarray:
  """`a` padded along axis 0 with zeros to `size` rows."""
  a = np.asarray(a)
  if a.shape[0] > size:
    raise ValueError(f"cannot pad {a.shape[0]} rows down to {size}.")
  out = np.zeros((size, *a.shape[1:]), a.dtype)
  out[:a.shape[0]] = a
  return out


def _to_words(a: np.ndarray) -> np.ndarray:
  raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
  padded = np.zeros(-(-raw.size // 4) * 4, np.uint8)
  padded[:raw.size] = raw
  return padded.view(np.uint32)


def _from_words(words: np.ndarray, like: np.ndarray) -> np.ndarray:
  raw = np.ascontiguousarray(words).view(np.uint8)[:like.nbytes]
  return raw.view(like.dtype).reshape(like.shape).copy()


def process_allgather(tree: Any) -> Any:
  """Every host's pytree of numpy arrays, stacked on a new leading axis [P, ...].

  A bit-exact wrapper around `jax.experimental.multihost_utils.process_allgather`
  (which would turn int64/float64 into 32-bit types with x64 disabled): the
  arrays travel as uint32 words. Every host must pass the same structure and
  shapes. On one process no collective runs.
  """
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(leaf) for leaf in leaves]
  if jax.process_count() == 1:
    return jax.tree.unflatten(treedef, [leaf[None] for leaf in leaves])
  gathered = multihost_utils.process_allgather([_to_words(leaf) for leaf in leaves])
  out = [np.stack([_from_words(row, leaf) for row in np.asarray(words)])
         for words, leaf in zip(gathered, leaves)]
  return jax.tree.unflatten(treedef, out)


def broadcast_from_main(tree: Any) -> Any:
  """Process 0's pytree of numpy arrays on every host (bit-exact).

  Every host must pass arrays of the same shapes and dtypes (the values of
  hosts other than 0 are ignored). On one process `tree` is returned.
  """
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [np.asarray(leaf) for leaf in leaves]
  if jax.process_count() == 1:
    return jax.tree.unflatten(treedef, leaves)
  words = multihost_utils.broadcast_one_to_all([_to_words(leaf) for leaf in leaves])
  return jax.tree.unflatten(
      treedef, [_from_words(np.asarray(w), leaf) for w, leaf in zip(words, leaves)])


def host_to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each host's slice of a batch into one global, sharded array.

  Args:
    local_batch: pytree of numpy arrays holding this host's contiguous slice of
      the global batch (the whole batch on a single host).
    mesh: the data mesh.

  Returns:
    The same pytree of `jax.Array`s, batch axis sharded over `data`.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
      local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
