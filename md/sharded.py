"""One large system's MD over several devices: edges and the network's per-atom work sharded, sums reduced.

    from equiforce.md import run_md
    result = run_md("model.eqf", big_box, ensemble="nve", steps=1000, devices="all")   # or devices=4

Layout: edges and the network's atoms sharded, neighbour sums all-reduced
------------------------------------------------------------------------
The devices form a one-axis ``jax.sharding.Mesh`` (axis ``"edges"``, which also shards the atoms). The edges
the network sees (the pairs within ``r_max``, compacted every step; see :class:`~equiforce.md.engine.MDConfig`)
are *sharded* along the edge axis: each device holds and evaluates ``1/D`` of them (radial MLP, spherical
harmonics, tensor products, messages). The network's per-atom arrays (node features, MACE's symmetric
contraction, NequIP's gates, readouts, per-atom energies) are *sharded* along the atom axis: each device does
the node-wise work of ``1/D`` of the atoms. A layer's gather ``x[senders]`` all-gathers the node features it
needs, and its neighbour sum ``Σ_{j∈N(i)} m_ij`` is a partial sum on each device, all-reduced; the backward
pass mirrors this. The integrator's state (positions, momenta, forces: ``[N, 3]``) and the neighbour list stay
*replicated*: they are small beside the network's features.

Per-device memory then scales as ``E/D x (per-edge features)`` + ``N/D x (per-node features)`` + the transient
``N x (one layer's node features)`` of the gathers and sums + the neighbour list (``2 x capacity`` integers,
replicated) with E edges, N atoms and D devices. Measured with ``benchmarks/sharded_md.py`` (protocol MACE,
float32, 17,496-atom water box): 50.1 GB on one device without edge blocks, 12.6 GB per device on 4 (4.0x;
edges alone sharded gave 16.1 GB, 3.1x). Communication per force call (the compiled program of a 2-layer MACE
on 4 devices, 1,536 atoms): four all-gathers of ``[N, irreps, channels]`` node features or their cotangents,
two all-reduces of neighbour sums of that shape, and three all-gathers of integer edge indices.

Why XLA's SPMD partitioner (``jit`` + ``with_sharding_constraint``) and not ``jax.shard_map`` with explicit
``psum``: the network does its neighbour sums deep inside each model (``segment_sum`` in SchNet, PaiNN and
Allegro, :func:`~equiforce.potentials.layers.chunked_edge_sum` in NequIP and MACE, the imported mace-torch
models' own sums). With ``shard_map`` every one of them would need a ``psum`` over a named axis, and
``jax.grad`` through them would need the varying-axes machinery to insert the matching reductions in the
backward pass. With the partitioner, the edge arrays are constrained to be sharded just before the network
(:func:`make_system`'s ``edge_layout`` hook), the per-atom arrays at the network's boundary (species and atom
mask in, per-atom energies out) along the atoms (its ``node_layout`` hook), and XLA partitions the gathers
``x[senders]`` and the scatter-adds into the node arrays, forward and backward, for every model unchanged.
The MD engine is the single-device engine, unchanged: its jitted chunk becomes one SPMD program over the mesh.

Edge blocks (``edge_chunk_size``, :func:`~equiforce.potentials.layers.resolve_edge_chunk`: on by default on
CPU, off on GPU) combine with sharding: the network is traced inside
:func:`~equiforce.potentials.layers.edge_shards`, so each device runs the blocks' ``lax.scan`` over its own
edges (a ``vmap`` over the shards of the scan; the partial node sums are added once per layer, the all-reduce
above) and per-device memory falls with both the blocks and the device count. Blocks over atoms (MACE's
symmetric contraction, ``node_chunk_size``) likewise run over each device's own atoms.

Padding: the compacted edge slots are padded with masked edges to a multiple of D, so the shards are equal; XLA
pads an atom count that is not a multiple of D.
Results equal the single-device ones up to the order of the additions (float64: ~1e-15 relative).

Not supported (ValueError): several processes (``jax.distributed``; the mesh holds this process's devices)
and a list of structures (replicas: :mod:`equiforce.md.replicas` shards those over the devices instead). On
CPU, simulated devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``)
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

__all__ = [
    "EDGE_AXIS",
    "atom_layout",
    "edge_layout",
    "edge_mesh",
    "make_sharded_system",
    "resolve_md_devices",
]

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


def atom_layout(mesh: Mesh) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The ``node_layout`` hook of :func:`~equiforce.md.system.make_system` that shards per-atom arrays over ``mesh``.

    The array's leading (atom) axis is constrained to ``PartitionSpec("edges")`` (the same mesh axis as the
    edges); XLA pads an atom count that is not a multiple of the device count.
    """
    sharding = NamedSharding(mesh, PartitionSpec(EDGE_AXIS))

    def layout(array: jnp.ndarray) -> jnp.ndarray:
        return jax.lax.with_sharding_constraint(array, sharding)

    return layout


def make_sharded_system(
    potential: Potential, params: Any, atoms: Any, *, devices: int | str | Sequence[Any] | None, **kwargs: Any
) -> MDSystem:
    """:func:`~equiforce.md.system.make_system` with the network's edges sharded over ``devices``.

    With the default device alone (``devices`` None or 1) this is :func:`~equiforce.md.system.make_system` itself.
    ``kwargs`` go to it (``skin``, ``precision``, ``fractional``, ...). The returned system runs in the
    single-device :class:`~equiforce.md.engine.MDEngine` unchanged; its :attr:`MDSystem.mesh` is the mesh.

    Raises:
      ValueError: see :func:`resolve_md_devices`; and what
        :func:`~equiforce.md.system.make_system` raises.
    """
    chosen = resolve_md_devices(devices)
    if len(chosen) == 1 and chosen[0] == jax.local_devices()[0]:
        return make_system(potential, params, atoms, **kwargs)
    mesh = edge_mesh(chosen)
    system = make_system(
        potential,
        params,
        atoms,
        edge_layout=edge_layout(mesh),
        node_layout=atom_layout(mesh),
        edge_shards=len(chosen),
        **kwargs,
    )
    return dataclasses.replace(system, mesh=mesh)
