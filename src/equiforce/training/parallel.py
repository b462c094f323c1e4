"""Data-parallel training over the devices of one host or of several processes (``parallel``), with JAX's own
SPMD tools.

Each global batch (the structures :func:`~equiforce.data.graph.batch_groups` puts together, exactly as on one
device) is split into ``D`` consecutive parts, one per device. Every part is padded to the same per-device
:class:`~equiforce.data.graph.PaddingBudget` (sized for ``ceil(batch_size / D)`` of the largest structures),
so the step compiles once. The parts are stacked on a leading axis sharded over a one-dimensional
``jax.sharding.Mesh`` (axis ``"data"``); parameters, optimiser and EMA state are replicated.

The step is a ``jax.shard_map``: each device computes the summed loss terms of its part and their gradients
(:func:`~equiforce.training.trainer.make_loss_terms_fn`), the item counts of every term are summed over the
devices first (``psum``; they do not depend on the parameters), and the gradients and losses are summed
over the devices. The loss and gradient are therefore exactly those of the whole batch on one device (up to
the order of floating-point additions), the optimiser update runs replicated, and a checkpoint holds the
same arrays whatever the device count: a run written on 4 devices resumes on 1 and the other way round.

Several processes (hosts), started with ``jax.distributed`` (:mod:`equiforce.training.distributed`): the mesh
spans the devices of every process (``jax.devices()``, each process's first ``parallel.devices`` local
devices, process by process). Every process plans the same global batches; each collates only the parts of
its own devices and assembles the global batch from them
(``jax.make_array_from_single_device_arrays``), so no process builds or sends another's data; a streamed
training set is also read that way, each process reading only its parts' structures (:attr:`DataParallel.shard`,
:mod:`equiforce.training.data_source`). The loss
and gradient sums then run across processes (NCCL on GPUs, gloo on CPUs) and the result is the same as
on one device.

The same code runs on GPUs (``parallel.devices: all``, the default there) and on CPU devices simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or in several local processes (how the tests run it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from equiforce.data.graph import Batch, BatchShard, PaddingBudget, collate, estimate_budget, split_group
from equiforce.training.bootstrap import batch_weights
from equiforce.training.config import ConfigError
from equiforce.training.optim import ema_update

__all__ = ["DataParallel", "resolve_devices", "split_group"]

AXIS = "data"


def resolve_devices(devices: int | str | None) -> list[Any]:
    """The devices to train on for ``parallel.devices``, in mesh order.

    In a run over several processes the setting counts each process's own devices, and the result holds
    that many of every process's devices, process by process (every process must choose the same count).

    Args:
      devices: ``"all"``; a count N (the first N of this process's devices); ``None``: all on GPU/TPU or in a
        run over several processes, one on a single CPU process (simulated CPU devices share the same cores,
        so more of them do not make a CPU faster).

    Raises:
      ConfigError: a count below 1 or above this process's devices, or another string.
    """
    available = jax.local_devices()
    multi = jax.process_count() > 1
    if devices is None:
        n = len(available) if multi or available[0].platform != "cpu" else 1
    elif devices == "all":
        n = len(available)
    elif isinstance(devices, bool) or not isinstance(devices, int):
        raise ConfigError(f"parallel.devices must be 'all' or a device count, got {devices!r}")
    elif not 1 <= devices <= len(available):
        where = f" on process {jax.process_index()}" if multi else ""
        raise ConfigError(
            f"parallel.devices = {devices}, but {len(available)} {available[0].platform} device(s) are "
            f"available{where} (simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    else:
        n = devices
    if not multi:
        return available[:n]
    by_process: dict[int, list[Any]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [d for p in sorted(by_process) for d in by_process[p][:n]]


class DataParallel:
    """The data-parallel pieces of one training run: the mesh, the per-device budget and the step.

    Args:
      devices: the devices of every process, in mesh order (see :func:`resolve_devices`).
      n_atoms, n_edges: sizes of every structure the step may see (training set), for the per-device budget.
      batch_size: the global batch size.
    """

    def __init__(self, devices: Sequence[Any], n_atoms: np.ndarray, n_edges: Sequence[int], batch_size: int):
        self.devices = list(devices)
        self.n_devices = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.per_device_batch = math.ceil(batch_size / self.n_devices)
        self.budget: PaddingBudget = estimate_budget(n_atoms, n_edges, self.per_device_batch)
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.n_processes = len({d.process_index for d in self.devices})
        #: (mesh position, device) of this process's devices: the parts this process builds
        self.local = [(i, d) for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]

    def describe(self, batch_size: int) -> str:
        kind = self.devices[0].device_kind
        where = f" in {self.n_processes} processes" if self.n_processes > 1 else ""
        return (
            f"data parallel over {self.n_devices} {self.devices[0].platform} devices ({kind}){where}: global batch "
            f"{batch_size}, per device up to {self.per_device_batch} (budget {self.budget.n_nodes} nodes / "
            f"{self.budget.n_edges} edges / {self.budget.n_graphs} graphs each)"
        )

    @property
    def shard(self) -> BatchShard | None:
        """The parts of every global batch this process builds, or None when it builds them all (one
        process): a streamed epoch then reads only those structures (:meth:`TrainingData.epoch
        <equiforce.training.data_source.TrainingData.epoch>`)."""
        if self.n_processes == 1:
            return None
        return BatchShard(self.n_devices, tuple(i for i, _ in self.local))

    def replicate(self, tree: Any) -> Any:
        """Put a pytree (parameters, optimiser state) on every device of every process.

        Across processes every process must pass the same values; arrays that are already replicated over
        the mesh stay as they are."""
        if self.n_processes == 1:
            return jax.device_put(tree, self.replicated)

        def put(x: Any) -> Any:
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            value = np.asarray(x)
            return jax.make_array_from_callback(value.shape, self.replicated, lambda index: value[index])

        return jax.tree.map(put, tree)

    def to_local(self, tree: Any) -> Any:
        """A replicated pytree as arrays on this process's first device (for host-side use: validation,
        model files, running sums), without touching other processes."""
        return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)

    def _assemble(self, parts: Sequence[Any]) -> Any:
        """The global ``[D, ...]`` arrays from this process's parts (one pytree of NumPy arrays per local
        device, in the order of :attr:`local`)."""
        on_device = [
            jax.device_put(jax.tree.map(lambda x: x[None], part), device)
            for part, (_, device) in zip(parts, self.local, strict=True)
        ]

        def global_array(*shards: jax.Array) -> jax.Array:
            shape = (self.n_devices, *shards[0].shape[1:])
            return jax.make_array_from_single_device_arrays(shape, self.sharded, list(shards))

        return jax.tree.map(global_array, *on_device)

    def batch(
        self,
        structures: Any,
        graphs: Sequence[Any],
        group: Sequence[int],
        dtype: Any,
        counts: np.ndarray | None = None,
        *,
        rows: Sequence[int] | None = None,
    ) -> tuple[Batch, jnp.ndarray | None]:
        """The global batch ``group`` as ``[D, ...]`` padded parts sharded over the devices, and the
        bootstrap weights ``[D, K, n_graphs]`` of each part (None without bootstrap).

        ``rows``: where ``group``'s structures are in ``structures`` and ``graphs`` (default: ``group``
        itself; a streamed batch holds just its own structures, and over several processes just those of
        this process's parts, :attr:`shard`: the other entries are never read, e.g. -1). Only this
        process's parts are collated and transferred; every process passes the same ``group``."""
        rows = list(group) if rows is None else list(rows)
        parts = split_group(range(len(rows)), self.n_devices)
        mine = [parts[i] for i, _ in self.local]
        batch = self._assemble(
            [collate(structures, graphs, [rows[j] for j in part], self.budget, dtype) for part in mine]
        )
        weights = None
        if counts is not None:
            group = list(group)
            weights = self._assemble(
                [batch_weights(counts, [group[j] for j in part], self.budget.n_graphs, dtype) for part in mine]
            )
        return batch, weights

    def make_train_step(
        self,
        terms_fn: Callable,
        combine: Callable,
        optimizer: optax.GradientTransformation,
        ema_decay: float | None,
        ensemble_size: int,
        bootstrap: bool,
    ) -> Callable:
        """The jitted step ``(state, batch [D, ...], weights) -> (state, (loss, loss_e, loss_f))``.

        ``terms_fn(params, batch, graph_weight) -> (sums [3], counts [3])`` and ``combine(sums, counts) ->
        (total, (loss_e, loss_f))`` are the trainer's (:func:`~equiforce.training.trainer.make_loss_terms_fn`,
        :func:`~equiforce.training.trainer.combine_loss_terms`)."""

        def member(params: Any, batch: Batch, weight: jnp.ndarray | None):
            def local_loss(p: Any):
                sums, counts = terms_fn(p, batch, weight)
                # this part's share of the global loss: its sums over the global item counts (parameter-free,
                # so nothing flows back through their psum)
                return combine(sums, jax.lax.psum(counts, AXIS))

            (loss, (le, lf)), grads = jax.value_and_grad(local_loss, has_aux=True)(params)
            return loss, le, lf, grads

        def local(params: Any, batch: Batch, weights: jnp.ndarray | None):
            batch = jax.tree.map(lambda x: x[0], batch)  # this device's part
            w = None if weights is None else weights[0]
            if ensemble_size > 1:
                loss, le, lf, grads = jax.vmap(member, in_axes=(0, None, 0 if bootstrap else None))(params, batch, w)
                loss, le, lf = jnp.mean(loss), jnp.mean(le), jnp.mean(lf)
            else:
                loss, le, lf, grads = member(params, batch, w)
            return jax.lax.psum((loss, le, lf, grads), AXIS)

        in_specs = (P(), P(AXIS), P(AXIS) if bootstrap else None)
        # check_vma=False: every cross-device sum is the explicit psum above (with the varying-axes check on,
        # JAX would also sum the cotangent of the replicated parameters by itself, counting it twice)
        sharded_value_and_grad = jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=P(), check_vma=False)

        def step(state: Any, batch: Batch, weights: jnp.ndarray | None = None):
            loss, le, lf, grads = sharded_value_and_grad(state.params, batch, weights)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = ema_update(state.ema_params, params, state.step, ema_decay)
            return type(state)(params, opt_state, ema, state.step + 1), (loss, le, lf)

        # the state comes back replicated with the same sharding it went in with, so the step compiles once
        return jax.jit(step, donate_argnums=(0,), out_shardings=self.replicated)
