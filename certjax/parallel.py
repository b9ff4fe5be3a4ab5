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
    process 0 (`is_main_process()`) writes files;
  * a process that fails says so (`report_failure`, which the launchers call)
    and every other process prints its message and stops within seconds
    (`start_failure_watchdog`, started by `initialize_distributed`).

See launch/README.md for how to start such runs.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
import threading
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
  Once connected, every process runs a failure watchdog
  (`start_failure_watchdog`).

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
    start_failure_watchdog()
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
  start_failure_watchdog()
  return True


# ------------------------------------------------------------ failure broadcast
#
# Without this, a process that stops on an error leaves its peers blocked in a
# collective or in jax.distributed's shutdown barrier until a timeout (minutes)
# ends them with a C++ stack trace that does not mention the error. Instead,
# the failing process writes its message into the coordination service's
# key-value store (hosted by process 0) under one key per peer, and every
# process has a daemon thread blocked on its own key that prints the message
# and ends the process at once. Process 0 hosts the store, so before it exits
# it waits (a few seconds at most) for the others to acknowledge.

_FAILURE_KEY = "certjax/failure/{}"
_ACK_KEY = "certjax/failure_ack/{}"
_NORMAL_EXIT = ""  # the value that releases a process's own watchdog at exit
ACK_TIMEOUT_S = 5.0
EXIT_GRACE_S = 1.0


class _WatchdogState:
  """This process's watchdog: its thread and whether it already reports a failure."""
  thread: threading.Thread | None = None
  reporting = threading.Event()  # this process is failing: ignore peers' news
  exiting = threading.Event()  # normal interpreter exit has begun


def _distributed_client() -> Any:
  """The coordination-service client of `jax.distributed`, or None.

  jax (0.10) has no public API for the key-value store; `multihost_utils`
  itself reaches it through `jax._src.distributed.global_state.client`.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _await_acks(client: Any, process_ids: list[int], timeout_s: float) -> None:
  """Waits up to `timeout_s` in all for each process in `process_ids` to acknowledge,
  then a moment longer for them to exit."""
  if not process_ids:
    return
  deadline = time.time() + timeout_s
  for k in process_ids:
    remaining_ms = int(1000 * (deadline - time.time()))
    if remaining_ms <= 0:
      break
    try:
      client.blocking_key_value_get(_ACK_KEY.format(k), remaining_ms)
    except Exception:  # pylint: disable=broad-except
      # A peer that cannot answer (blocked with the GIL held, or gone) must
      # not keep this one alive: its own heartbeat ends it later.
      pass
  # A peer acknowledges just before its os._exit; if the service (this
  # process) vanished in between, the peer's JAX client would abort it with a
  # C++ stack trace instead.
  time.sleep(EXIT_GRACE_S)


def _exit_now(code: int) -> None:
  """Ends the process at once, skipping jax.distributed's shutdown barrier."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(code)  # pylint: disable=protected-access


def _watch(client: Any, process_index: int, process_count: int) -> None:
  """The watchdog thread: blocks until a failure (or this process's exit) is announced."""
  key = _FAILURE_KEY.format(process_index)
  while True:
    try:
      # One day per call: the call only returns early when the key is set.
      value = client.blocking_key_value_get(key, 24 * 3600 * 1000)
      break
    except Exception:  # pylint: disable=broad-except
      # Timed out, or the service is shutting down or unreachable (then JAX's
      # heartbeat reports it); keep listening unless the process is ending.
      if _WatchdogState.exiting.is_set() or _WatchdogState.reporting.is_set():
        return
      time.sleep(1.0)
  if value == _NORMAL_EXIT or _WatchdogState.reporting.is_set():
    return
  failing, _, message = value.partition(":")
  print(f"certjax error on process {failing}: {message}", file=sys.stderr, flush=True)
  try:
    client.key_value_set(_ACK_KEY.format(process_index), "1", allow_overwrite=True)
    if process_index == 0:
      _await_acks(client, [k for k in range(1, process_count) if str(k) != failing],
                  ACK_TIMEOUT_S)
  except Exception:  # pylint: disable=broad-except
    pass
  _exit_now(1)


def _release_watchdog() -> None:
  """At a normal exit: wakes this process's own watchdog so that it ends
  before jax.distributed shuts its client down."""
  thread = _WatchdogState.thread
  if thread is None or not thread.is_alive():
    return
  _WatchdogState.exiting.set()
  client = _distributed_client()
  if client is None:
    return
  try:
    client.key_value_set(_FAILURE_KEY.format(jax.process_index()), _NORMAL_EXIT,
                         allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    return
  thread.join(timeout=ACK_TIMEOUT_S)


def start_failure_watchdog() -> bool:
  """Starts this process's failure watchdog (multi-process runs; idempotent).

  A daemon thread waits for `report_failure` on any other process; it then
  prints `certjax error on process <k>: <message>` to stderr and ends this
  process with exit code 1, whatever its main thread is blocked in (a
  collective, a barrier). `initialize_distributed` calls it.

  Returns:
    True when a watchdog runs (jax.distributed runs several processes).
  """
  client = _distributed_client()
  if client is None or jax.process_count() == 1:
    return False
  if _WatchdogState.thread is None:
    _WatchdogState.thread = threading.Thread(
        target=_watch, args=(client, jax.process_index(), jax.process_count()),
        name="certjax-failure-watchdog", daemon=True)
    _WatchdogState.thread.start()
    # atexit runs handlers last-registered first: this one runs before the
    # handler jax registered at import, which shuts the client down.
    atexit.register(_release_watchdog)
  return True


def is_multi_process() -> bool:
  """True when jax.distributed runs this process as one of several."""
  return _distributed_client() is not None and jax.process_count() > 1


def report_failure(message: str) -> bool:
  """Tells every other process of a multi-process run that this one failed.

  Each peer's watchdog (`start_failure_watchdog`) prints
  `certjax error on process <this process>: <message>` and exits with code 1.
  On process 0, which hosts the coordination service, this waits (at most
  `ACK_TIMEOUT_S` seconds) until the peers have read the message. The caller
  should then end the process with `os._exit` rather than `sys.exit`: a normal
  exit would wait in jax.distributed's shutdown barrier for peers that are gone.

  Args:
    message: what went wrong, one line preferably.

  Returns:
    False when this is not a multi-process run (nothing was sent).
  """
  if not is_multi_process():
    return False
  client = _distributed_client()
  _WatchdogState.reporting.set()
  me = jax.process_index()
  peers = [k for k in range(jax.process_count()) if k != me]
  try:
    for k in peers:
      client.key_value_set(_FAILURE_KEY.format(k), f"{me}:{message}", allow_overwrite=True)
    if me == 0:
      _await_acks(client, peers, ACK_TIMEOUT_S)
  except Exception as e:  # pylint: disable=broad-except
    print(f"certjax: could not tell the other processes about the failure ({e}); they "
          "stop when JAX's heartbeat notices this process is gone.", file=sys.stderr)
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


def to_words(a: np.ndarray) -> np.ndarray:
  """`a`'s bytes as uint32 words (zero-padded): how `process_allgather` and
  `broadcast_from_main` move any dtype bit-exactly (`from_words` inverts it)."""
  raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
  padded = np.zeros(-(-raw.size // 4) * 4, np.uint8)
  padded[:raw.size] = raw
  return padded.view(np.uint32)


def from_words(words: np.ndarray, like: np.ndarray) -> np.ndarray:
  """The array of `like`'s dtype and shape whose bytes `to_words` packed."""
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
  gathered = multihost_utils.process_allgather([to_words(leaf) for leaf in leaves])
  out = [np.stack([from_words(row, leaf) for row in np.asarray(words)])
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
  words = multihost_utils.broadcast_one_to_all([to_words(leaf) for leaf in leaves])
  return jax.tree.unflatten(
      treedef, [from_words(np.asarray(w), leaf) for w, leaf in zip(words, leaves)])


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
