"""Training over several processes, on one host or many, with JAX's distributed runtime (``jax.distributed``).

A run over P processes starts the same ``equiforce train`` command (or :func:`~equiforce.training.train`
call) in every process. :func:`initialize` starts ``jax.distributed`` before JAX does anything else, from

* explicit settings: ``parallel.coordinator_address`` (``host:port`` of process 0), ``parallel.num_processes``
  and ``parallel.process_id`` in the config (or as ``key=value`` overrides), or the environment variables
  ``EQUIFORCE_COORDINATOR_ADDRESS`` (or JAX's ``JAX_COORDINATOR_ADDRESS``), ``EQUIFORCE_NUM_PROCESSES`` and
  ``EQUIFORCE_PROCESS_ID`` (the config wins);
* or the cluster, as JAX detects it (``parallel.cluster_detection``): a SLURM step started by ``srun`` (the
  coordinator is the step's first node, the port derived from the job id) or an Open MPI 4 ``mpirun`` job
  (JAX reads ``OMPI_MCA_orte_hnp_uri``; Open MPI 5 does not set it: pass the three settings instead). JAX
  then also gives each process one GPU (``SLURM_LOCALID`` / ``OMPI_COMM_WORLD_LOCAL_RANK``), so start one
  process per GPU with every GPU of the node visible to it.

Without any of these, or with ``num_processes: 1``, the run is a single process and nothing here happens.

Then every device of every process forms one data-parallel mesh (:class:`~equiforce.training.parallel.DataParallel`):
each process reads the data and plans the same global batches, collates only its own devices' parts of each
one and moves only those to its devices. Process 0 alone writes logs, checkpoints, ``metrics.jsonl`` and the
model files, and runs what follows the training loop (final metrics, the NVE gate); the other processes wait
for it (:func:`run_on_main`). Decisions that end the loop or change the learning rate are taken on process
0's values (:func:`from_main`, :func:`any_process`), so the processes can never disagree about the next step.

Failures never hang:

* a process that cannot reach the coordinator within ``parallel.initialization_timeout`` seconds raises
  :class:`CoordinatorUnreachableError`; when not every process joins within that time, JAX ends the
  processes that did (``DEADLINE_EXCEEDED ... RegisterTask``);
* an exception in any process during training (:func:`stop_all_on_failure`) prints the error with the
  process's index and ends that process at once (``os._exit``; waiting at JAX's shutdown barrier would keep it
  alive for ``parallel.shutdown_timeout``). Its peers fail in their next collective (CPU: "Connection closed by
  peer") and end the same way, or JAX's coordination service stops them once the dead process's heartbeats
  stop (``parallel.heartbeat_timeout``: "Terminating process because the JAX distributed service detected
  fatal errors"). When process 0 (the coordinator) dies, the others end at once.

CPU processes exchange data with JAX's gloo collectives (``jax_cpu_collectives_implementation``, gloo by
default in jax 0.10), which is how the tests run two processes on one machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn

import jax
import numpy as np

from equiforce.training.config import ConfigError, ParallelConfig, check_coordinator_address

__all__ = [
    "ENV_COORDINATOR_ADDRESS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "CoordinatorUnreachableError",
    "DistributedError",
    "LaunchSettings",
    "Processes",
    "any_process",
    "check_same_on_every_process",
    "cluster_tasks",
    "from_main",
    "initialize",
    "resolve_launch",
    "run_on_main",
    "stop_all_on_failure",
    "wait_for_coordinator",
]

ENV_COORDINATOR_ADDRESS = "EQUIFORCE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "EQUIFORCE_NUM_PROCESSES"
ENV_PROCESS_ID = "EQUIFORCE_PROCESS_ID"
#: what JAX 0.10's cluster detection needs (``jax._src.clusters``): a SLURM step, an Open MPI 4 job
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_VAR = "OMPI_MCA_orte_hnp_uri"
#: the longest wait of the coordination service's key-value store, ms (a signed 32-bit int: 24.8 days)
_FOREVER_MS = 2**31 - 1


class DistributedError(RuntimeError):
    """A run over several processes cannot go on: the processes disagree, or another process failed."""


class CoordinatorUnreachableError(ConfigError):
    """The coordinator (process 0's ``jax.distributed`` service) did not answer within the timeout."""


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place in the run.

    Attributes:
      index: this process's index, 0 to ``count - 1``.
      count: the number of processes.
    """

    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files."""
        return self.index == 0

    @property
    def multi(self) -> bool:
        """More than one process."""
        return self.count > 1

    def __str__(self) -> str:
        return f"process {self.index} of {self.count}"


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """What :func:`jax.distributed.initialize` is called with (None: JAX's cluster detection fills it in).

    Attributes:
      coordinator_address: ``host:port`` of process 0.
      num_processes: the number of processes.
      process_id: this process's index.
      cluster: ``"slurm"`` or ``"ompi"`` when JAX's detection of that cluster fills in what is not given;
        None: no detection beyond JAX's default (``"deactivate"`` with ``cluster_detection: off``).
      detection: ``parallel.cluster_detection``.
      initialization_timeout, heartbeat_timeout, shutdown_timeout: seconds (see
        :class:`~equiforce.training.config.ParallelConfig`).
    """

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    cluster: str | None
    detection: str
    initialization_timeout: int
    heartbeat_timeout: int
    shutdown_timeout: int


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int | None:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
    if number < minimum:
        raise ConfigError(f"environment variable {name}={value!r} must be >= {minimum}")
    return number


def cluster_tasks(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The cluster launcher this process was started by, as JAX 0.10 detects it, and its number of tasks.

    Args:
      environ: the environment (default ``os.environ``).

    Returns:
      ``("slurm", tasks)`` for a SLURM step (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``), ``("ompi",
      tasks)`` for an Open MPI 4 job (``OMPI_COMM_WORLD_SIZE``), or None.
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in _SLURM_VARS):
        tasks = _env_int(env, "SLURM_STEP_NUM_TASKS", 1) or _env_int(env, "SLURM_NTASKS", 1) or 1
        return "slurm", tasks
    if _OMPI_VAR in env:
        return "ompi", _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) or 1
    return None


def resolve_launch(cfg: ParallelConfig, environ: Mapping[str, str] | None = None) -> LaunchSettings | None:
    """How this process joins a run over several processes, or None for a single-process run.

    The config's ``coordinator_address`` / ``num_processes`` / ``process_id`` win over the environment
    variables (``EQUIFORCE_COORDINATOR_ADDRESS`` or ``JAX_COORDINATOR_ADDRESS``, ``EQUIFORCE_NUM_PROCESSES``,
    ``EQUIFORCE_PROCESS_ID``); what neither gives comes from the cluster (:func:`cluster_tasks`) when
    ``cluster_detection`` allows it and the cluster runs more than one task.

    Args:
      cfg: the ``parallel`` section.
      environ: the environment (default ``os.environ``).

    Raises:
      ConfigError: an environment variable that is not a valid value; ``process_id`` out of range; some
        but not all of the three settings outside a cluster; ``cluster_detection: slurm`` / ``ompi`` outside
        that cluster.
    """
    env = os.environ if environ is None else environ
    address = cfg.coordinator_address or env.get(ENV_COORDINATOR_ADDRESS) or None
    if address is not None and cfg.coordinator_address is None:
        check_coordinator_address(address, f"environment variable {ENV_COORDINATOR_ADDRESS}")
    count = cfg.num_processes if cfg.num_processes is not None else _env_int(env, ENV_NUM_PROCESSES, 1)
    index = cfg.process_id if cfg.process_id is not None else _env_int(env, ENV_PROCESS_ID, 0)
    if count is not None and index is not None and index >= count:
        raise ConfigError(f"process id {index} is out of range for {count} processes (0 to {count - 1})")
    if count == 1:
        return None
    cluster = None
    if None in (address, count, index) and cfg.cluster_detection != "off":
        found = cluster_tasks(env)
        if cfg.cluster_detection in ("slurm", "ompi") and (found is None or found[0] != cfg.cluster_detection):
            raise ConfigError(
                f"parallel.cluster_detection is {cfg.cluster_detection!r}, but this process was not started "
                f"by {'srun' if cfg.cluster_detection == 'slurm' else 'an Open MPI 4 mpirun'}"
            )
        if found is not None and (found[1] > 1 or cfg.cluster_detection != "auto"):
            cluster = found[0]
    if cluster is None:
        given = {"coordinator_address": address, "num_processes": count, "process_id": index}
        missing = [name for name, value in given.items() if value is None]
        if len(missing) == 3:
            return None
        if missing:
            raise ConfigError(
                f"a run over several processes needs parallel.coordinator_address, parallel.num_processes and "
                f"parallel.process_id (or {ENV_COORDINATOR_ADDRESS}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                f"{', '.join('parallel.' + m for m in missing)} not given, and no SLURM step or Open MPI job "
                "with several tasks was found to fill in the rest"
            )
    return LaunchSettings(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        cluster=cluster,
        detection=cfg.cluster_detection,
        initialization_timeout=cfg.initialization_timeout,
        heartbeat_timeout=cfg.heartbeat_timeout,
        shutdown_timeout=cfg.shutdown_timeout,
    )


def wait_for_coordinator(address: str, timeout_s: float, who: str = "this process") -> None:
    """Wait until something accepts TCP connections at ``address`` (process 0's coordination service).

    JAX itself would retry for ``timeout_s`` and then abort the process from C++ with ``DEADLINE_EXCEEDED``
    (no Python exception, no hint what to check); this probe turns that into a clear error first.

    Args:
      address: ``host:port``.
      timeout_s: seconds to keep trying, > 0.
      who: names this process in the message.

    Raises:
      CoordinatorUnreachableError: nothing answered within ``timeout_s`` (the message names the address,
        the last socket error and what to check).
    """
    host, port = check_coordinator_address(address, "the coordinator address")
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(remaining, 0.05))):
                return
        except OSError as err:
            last = err
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
    raise CoordinatorUnreachableError(
        f"{who} cannot reach the coordinator at {address} (process 0's jax.distributed service) within "
        f"{timeout_s:g} s: {last}. Check that process 0 runs, that {host} is its host as seen from here and "
        "that the port is open (parallel.coordinator_address, parallel.initialization_timeout)"
    )


def initialize(cfg: ParallelConfig, log: Callable[[str], None] = print) -> Processes:
    """Start ``jax.distributed`` as ``cfg`` and the environment say, once per process.

    Must run before any JAX computation (``jax.devices()`` included); :func:`~equiforce.training.train`
    calls it first. When ``jax.distributed`` is already running (a second ``train`` call, or a script that
    started it itself), the running setup is used.

    Args:
      cfg: the ``parallel`` section.
      log: receives one line about the setup (process 0 only; all processes on failure).

    Returns:
      This process's :class:`Processes` (``Processes(0, 1)`` for a single-process run).

    Raises:
      ConfigError: bad settings (see :func:`resolve_launch`), or JAX had already started its backends.
      CoordinatorUnreachableError: process 0 did not answer within ``cfg.initialization_timeout``.
    """
    if jax.distributed.is_initialized():
        return Processes(jax.process_index(), jax.process_count())
    launch = resolve_launch(cfg)
    if launch is None:
        return Processes()
    rank = launch.process_id
    if rank is None:  # JAX's cluster detection will read it from here
        rank = _env_int(os.environ, "SLURM_PROCID" if launch.cluster == "slurm" else "OMPI_COMM_WORLD_RANK", 0)
    who = "this process" if rank is None else f"process {rank}"
    if launch.coordinator_address is not None and rank not in (None, 0):
        wait_for_coordinator(launch.coordinator_address, launch.initialization_timeout, who)
    if rank in (None, 0):
        source = f"{launch.cluster} cluster detection" if launch.cluster else "explicit settings"
        log(
            f"jax.distributed: {who} of {launch.num_processes or '?'} ({source}), coordinator "
            f"{launch.coordinator_address or '(from the cluster)'}; waiting up to {launch.initialization_timeout} s "
            "for every process to join (after that JAX ends this process: DEADLINE_EXCEEDED ... RegisterTask)"
        )
    if launch.cluster is not None:
        method = launch.cluster
    else:
        method = "deactivate" if launch.detection == "off" else None
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            cluster_detection_method=method,
            initialization_timeout=launch.initialization_timeout,
            heartbeat_timeout_seconds=launch.heartbeat_timeout,
            shutdown_timeout_seconds=launch.shutdown_timeout,
        )
    except (RuntimeError, ValueError, TypeError) as err:
        hint = ""
        if "before any JAX" in str(err):
            hint = (
                ": call equiforce.training.distributed.initialize (or train) before jax.devices() or any array "
                "operation"
            )
        raise ConfigError(f"jax.distributed could not start ({who}): {str(err).rstrip('.')}{hint}") from err
    return Processes(jax.process_index(), jax.process_count())


@contextlib.contextmanager
def stop_all_on_failure(procs: Processes) -> Iterator[None]:
    """In a run over several processes, end this process at once when the block raises.

    The error and its traceback go to stderr with the process's index, then ``os._exit`` (1; 130 for
    Ctrl-C) ends the process without JAX's shutdown barrier, so its peers learn at once (their next collective
    fails, or the coordination service misses its heartbeats) instead of hanging in a collective while this
    process waits up to ``parallel.shutdown_timeout`` at the barrier. A single process re-raises as usual.
    """
    if not procs.multi:
        yield
        return
    try:
        yield
    except BaseException as err:  # every failure must end the process, Ctrl-C included
        _die(procs, err)


def _die(procs: Processes, err: BaseException) -> NoReturn:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    traceback.print_exception(err, file=sys.stderr)
    print(
        f"equiforce: {procs} failed ({type(err).__name__}: {err}); ending it now, so that jax.distributed stops "
        "the other processes too (at their next collective, or within parallel.heartbeat_timeout seconds). "
        "A failed collective (gloo, NCCL: 'Connection reset/closed by peer') means that another process "
        "failed first: see its output",
        file=sys.stderr,
        flush=True,
    )
    os._exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def _fingerprint(value: Any) -> np.ndarray:
    """Two int64 words of the SHA-256 of ``value``'s JSON (arrays by their bytes)."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, np.ndarray):
            h.update(str((x.dtype.str, x.shape)).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, list | tuple):
            for item in x:
                feed(item)
        else:
            h.update(json.dumps(x, default=str).encode())

    feed(value)
    return np.frombuffer(h.digest()[:16], dtype=np.int64).copy()


def check_same_on_every_process(procs: Processes, what: Mapping[str, Any]) -> None:
    """Verify that every process has the same values (data, settings, resume point) before training.

    Every process must call it at the same point with the same keys. Processes that silently disagree would
    train on different batches or step counts, and sooner or later wait for each other forever.

    Args:
      procs: this process's place.
      what: name → value (JSON-like, NumPy arrays allowed); compared by a hash per name.

    Raises:
      DistributedError: names the values that differ and the processes that differ from process 0 (on
        every process alike, so all of them stop).
    """
    if not procs.multi:
        return
    from jax.experimental import multihost_utils

    names = sorted(what)
    local = np.stack([_fingerprint(what[n]) for n in names])  # [names, 2]
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, names, 2]
    differ = [
        (name, [p for p in range(gathered.shape[0]) if not np.array_equal(gathered[p, i], gathered[0, i])])
        for i, name in enumerate(names)
    ]
    differ = [(name, ps) for name, ps in differ if ps]
    if differ:
        detail = "; ".join(f"{name} differs on process(es) {ps}" for name, ps in differ)
        raise DistributedError(
            f"the {procs.count} processes do not agree: {detail} (every process must read the same data and "
            "config and see the same output folder, e.g. on a shared file system)"
        )


def from_main(procs: Processes, value: float) -> float:
    """Process 0's ``value`` on every process (a float; returned as is for a single process)."""
    if not procs.multi:
        return value
    from jax.experimental import multihost_utils

    return float(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value, np.float64))))


def any_process(procs: Processes, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (every process must call it at the same point)."""
    if not procs.multi:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32)))))


_calls = itertools.count()


def _client() -> Any:
    # jax.distributed's coordination client (the object jax.experimental.multihost_utils uses as well): its
    # key-value store waits without a device collective, so a long wait cannot time out in gloo or NCCL
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not running")
    return client


def run_on_main(procs: Processes, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on process 0 only; the other processes wait until it is done.

    Process 0 posts ``ok`` or its error to the coordination service's key-value store when ``fn`` returns
    or raises (and then returns its value or re-raises). The others block on that key (heartbeats go on:
    a wait of any length is fine, and should process 0 die, JAX ends them at once) and return None, or raise
    :class:`DistributedError` with process 0's error. Every process must call it at the same point.

    Args:
      procs: this process's place.
      fn: what process 0 does (e.g. write the model file).

    Returns:
      ``fn()`` on process 0 (and on a single process); None on the others.

    Raises:
      DistributedError: on the other processes, when ``fn`` raised on process 0.
    """
    if not procs.multi:
        return fn()
    key = f"equiforce/run_on_main/{next(_calls)}"
    if procs.is_main:
        try:
            value = fn()
        except BaseException as err:
            _client().key_value_set(key, f"{type(err).__name__}: {err}")
            raise
        _client().key_value_set(key, "ok")
        return value
    status = _client().blocking_key_value_get(key, _FOREVER_MS)
    if status != "ok":
        raise DistributedError(f"process 0 failed: {status}")
    return None
