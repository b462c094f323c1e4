"""One large system's MD over several devices: the edges are sharded, the neighbour sums reduced.

    from equiforce.md import run_md
    result = run_md("model.eqf", big_box, ensemble="nve", steps=1000, devices="all")   # or devices=4

Layout: node arrays replicated, edges sharded, every neighbour sum all-reduced
-----------------------------------------------------------------------------
The devices form a one-axis ``jax.sharding.Mesh`` (axis ``"edges"``). Positions, momenta, the neighbour list
and every per-atom array (node features, per-atom energies, forces) are *replicated*: each device holds all
of them. The edges the network sees (the pairs within ``r_max``, compacted every step; see
:class:`~equiforce.md.engine.MDConfig`) are *sharded* along the edge axis: each device holds and evaluates
``1/D`` of them (radial MLP, spherical harmonics, tensor products, messages). Every per-layer neighbour sum
``Σ_{j∈N(i)} m_ij`` is then a partial sum on each device, reduced by an all-reduce; so are, in the backward
pass, the node cotangents and finally the forces. The network's node-wise work (MACE's symmetric
contraction, NequIP's gates, readouts) runs on every device on the replicated node arrays.

Per-device memory then scales as ``E/D x (per-edge features)`` + ``N x (per-node features)`` + the
neighbour list (``2 x capacity`` integers, replicated) with E edges, N atoms and D devices. For the
equivariant models the per-edge terms (``[edges, irreps, channels]`` messages and their backward-pass
residuals, about 20-40 edges per atom) dominate, so the largest system grows nearly D-fold; the replicated
per-atom terms set the limit for very many devices. Communication per force call: one all-reduce of
``[N, irreps, channels]`` per layer forward and backward, and one of ``[N, 3]`` for the forces.

Why XLA's SPMD partitioner (``jit`` + ``with_sharding_constraint``) and not ``jax.shard_map`` with explicit
``psum``: the network does its neighbour sums deep inside each model (``segment_sum`` in SchNet, PaiNN and
Allegro, :func:`~equiforce.potentials.layers.chunked_edge_sum` in NequIP and MACE, the imported mace-torch
models' own sums). With ``shard_map`` every one of them would need a ``psum`` over a named axis, and
``jax.grad`` through them would need the varying-axes machinery to insert the matching reductions in the
backward pass. With the partitioner, the edge arrays are constrained to be sharded just before the network
(:func:`make_system`'s ``edge_layout`` hook) and XLA partitions the gathers ``x[senders]`` (replicated
operand, sharded indices: local) and the scatter-adds into the node arrays (sharded updates: a local
partial sum then an all-reduce), forward and backward, for every model unchanged. The compiled program of
a 2-layer MACE on 4 devices holds exactly that: one all-reduce per layer's neighbour sum, one (of two node
arrays) in the backward pass, one for the forces, plus one all-gather of the edge compaction's integer prefix
sum. (Per device it still holds about one per-edge tensor unpartitioned: 4 devices divide the memory by 3.1,
not 4; see ``benchmarks/sharded_md.py``.) The MD engine is the
single-device engine, unchanged: its jitted chunk becomes one SPMD program over the mesh.

Edge blocking (``edge_chunk_size``, :func:`~equiforce.potentials.layers.resolve_edge_chunk`) is switched off
here: its ``lax.scan`` over blocks of edges would run over the sharded axis (XLA would gather the edges back
onto every device). Sharding takes its place as the way to bound the per-edge memory; a model that asks for
explicit blocks (``edge_chunk_size > 0``) is refused with a ValueError.

Padding: the compacted edge slots are padded with masked edges to a multiple of D, so the shards are equal.
Results equal the single-device ones up to the order of the additions (float64: ~1e-15 relative).

Not supported (ValueError): several processes (``jax.distributed``; the mesh holds this process's devices),
a list of structures (replicas: :mod:`equiforce.md.replicas` shards those over the devices instead), and
explicit edge blocks. On CPU, simulated devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
share the same cores: sharding there divides the memory per device, not the time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from equiforce.md.system import MDSystem, make_system
from equiforce.potentials.potential import Potential

__all__ = ["EDGE_AXIS", "edge_layout", "edge_mesh", "make_sharded_system", "resolve_md_devices", "unblocked"]

#: the mesh axis the edges are sharded along
EDGE_AXIS = "edges"


def resolve_md_devices(devices: int | str | Sequence[Any] | None) -> list[Any]:
    """The devices one system's MD runs on, in mesh order.

    Args:
      devices: None or 1 (one device: the default device, as without this module), ``"all"`` (every device
        of this process), a count N (the first N of ``jax.local_devices()``), or a sequence of devices.

    Raises:
      ValueError: a count below 1 or above the devices that exist, another string, an empty sequence, or a
        run over several processes.
    """
    available = jax.local_devices()
    if devices is None:
        return available[:1]
    if jax.process_count() > 1:
        raise ValueError("sharded MD runs within one process; jax.distributed runs over several are not supported")
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices must be 'all', a device count or a list of devices, got {devices!r}")
        return list(available)
    if isinstance(devices, bool):
        raise ValueError(f"devices must be 'all', a device count or a list of devices, got {devices!r}")
    if isinstance(devices, (int, np.integer)):
        n = int(devices)
        if not 1 <= n <= len(available):
            raise ValueError(
                f"devices = {devices}, but {len(available)} {available[0].platform} device(s) exist (on CPU, "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 2)} simulates more; set it before JAX "
                "starts)"
            )
        return available[:n]
    chosen = list(devices)
    if not chosen:
        raise ValueError("devices: an empty list of devices")
    return chosen


def edge_mesh(devices: Sequence[Any]) -> Mesh:
    """A one-axis mesh (:data:`EDGE_AXIS`) of ``devices``."""
    return Mesh(np.array(list(devices)), (EDGE_AXIS,))


def edge_layout(mesh: Mesh) -> Callable[..., tuple[jnp.ndarray, ...]]:
    """The ``edge_layout`` hook of :func:`~equiforce.md.system.make_system` that shards the edges over ``mesh``.

    The edge arrays ``(vectors, senders, receivers, edge_mask)`` are padded with masked edges (zero vector,
    atom 0, mask False) to a multiple of the device count and constrained to ``PartitionSpec("edges")``.
    """
    n_devices = int(mesh.devices.size)
    sharding = NamedSharding(mesh, PartitionSpec(EDGE_AXIS))

    def layout(*edge_arrays: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        pad = -edge_arrays[0].shape[0] % n_devices
        padded = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in edge_arrays)  # zeros / False
        return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in padded)

    return layout


def unblocked(potential: Potential) -> Potential:
    """``potential`` with its edge blocks switched off (``edge_chunk_size = 0``) where the model has them.

    Raises:
      ValueError: the model asks for explicit blocks (``edge_chunk_size > 0``).
    """
    chunk = getattr(potential.model, "edge_chunk_size", 0)
    if chunk is None:  # automatic: off here
        return potential.replace(model=dataclasses.replace(potential.model, edge_chunk_size=0))
    if chunk > 0:
        raise ValueError(
            f"this model evaluates its edges in blocks of {chunk} (edge_chunk_size), which sharded MD does not "
            "support (the blocks' scan would run over the sharded edge axis); set model edge_chunk_size to None or 0"
        )
    return potential


def make_sharded_system(
    potential: Potential, params: Any, atoms: Any, *, devices: int | str | Sequence[Any] | None, **kwargs: Any
) -> MDSystem:
    """:func:`~equiforce.md.system.make_system` with the network's edges sharded over ``devices``.

    With the default device alone (``devices`` None or 1) this is :func:`~equiforce.md.system.make_system` itself.
    ``kwargs`` go to it (``skin``, ``precision``, ``fractional``, ...). The returned system runs in the
    single-device :class:`~equiforce.md.engine.MDEngine` unchanged; its :attr:`MDSystem.mesh` is the mesh.

    Raises:
      ValueError: see :func:`resolve_md_devices` and :func:`unblocked`; and what
        :func:`~equiforce.md.system.make_system` raises.
    """
    chosen = resolve_md_devices(devices)
    if len(chosen) == 1 and chosen[0] == jax.local_devices()[0]:
        return make_system(potential, params, atoms, **kwargs)
    mesh = edge_mesh(chosen)
    system = make_system(unblocked(potential), params, atoms, edge_layout=edge_layout(mesh), **kwargs)
    return dataclasses.replace(system, mesh=mesh)
