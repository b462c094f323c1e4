"""An all-pairs sparse neighbour list with jax-md's interface, in 32-bit indices under JAX's 64-bit types.

jax-md's :func:`jax_md.partition.neighbor_list` without a cell list (molecules, triclinic or small periodic
cells, NPT in fractional coordinates) builds its candidate and sender indices with ``jnp.arange``'s default
dtype, which is int64 when ``jax_enable_x64`` is on, and scatters them into its int32 lists: JAX warns
(``FutureWarning: scatter inputs have incompatible types: cannot safely cast value from dtype=int64 to
dtype=int32``) and says future releases make it an error. Its cell-list path keeps int32 throughout.

:func:`all_pairs_neighbor_list` is the same algorithm in int32: every ordered pair ``(i, j)``, ``i != j``, is a
candidate (``custom_mask_function`` may set entries to ``N`` to drop them), pairs within ``r_cutoff +
dr_threshold`` are compacted, sender-major as jax-md orders them, into ``[2, capacity]`` (row 0: the neighbour
``j``, row 1: the centre ``i``, ``N`` in empty slots); the list is rebuilt when an atom has moved more than
``dr_threshold / 2`` since the last build (always when ``dr_threshold`` is 0), and an overflow sets jax-md's
``NEIGHBOR_LIST_OVERFLOW`` error, so :attr:`NeighborList.did_buffer_overflow` works as before. It returns
jax-md's own :class:`~jax_md.partition.NeighborList` and :class:`~jax_md.partition.NeighborListFns`, so the
engines, integrators and jax-md's quantities take it unchanged, and the pairs (and their order) are jax-md's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax_md import partition, space

__all__ = ["all_pairs_neighbor_list"]

_SPARSE = (partition.NeighborListFormat.Sparse, partition.NeighborListFormat.OrderedSparse)


def all_pairs_neighbor_list(
    displacement_fn: Callable[..., jnp.ndarray],
    r_cutoff: float,
    *,
    dr_threshold: float = 0.0,
    capacity_multiplier: float = 1.25,
    format: partition.NeighborListFormat = partition.NeighborListFormat.Sparse,
    custom_mask_function: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> partition.NeighborListFns:
    """jax-md's ``neighbor_list(..., disable_cell_list=True)`` for the sparse formats, with int32 indices.

    Args:
      displacement_fn: ``(Ra, Rb, **kwargs) -> [dim]`` displacement (jax-md's ``space``); the keyword arguments
        given to ``allocate`` / ``update`` (``box``, ``perturbation``, ...) reach it.
      r_cutoff: cutoff, Å.
      dr_threshold: the skin, Å: pairs within ``r_cutoff + dr_threshold`` are kept, and the list is rebuilt when
        an atom moved more than half of it (0: rebuilt on every update).
      capacity_multiplier: head-room of the capacity over the pairs found by ``allocate``.
      format: ``Sparse`` (each pair twice) or ``OrderedSparse`` (each pair once, ``j < i``).
      custom_mask_function: ``[N, N] int32 candidates -> same``, entries set to ``N`` are dropped.

    Returns:
      jax-md's ``NeighborListFns(allocate, update)``; ``allocate(position, extra_capacity=0, **kwargs)`` (not
      jit-able: it sizes the list), ``update(position, neighbors, **kwargs)`` and ``neighbors.update(position,
      **kwargs)`` (jit-able). ``idx`` is ``int32 [2, capacity]``.

    Raises:
      ValueError: a format other than ``Sparse`` / ``OrderedSparse``.
    """
    if format not in _SPARSE:
        raise ValueError(f"all_pairs_neighbor_list builds the sparse formats only, not {format}")
    ordered = format is partition.NeighborListFormat.OrderedSparse
    always_rebuild = dr_threshold == 0
    # the same arithmetic as jax-md's neighbor_list, so the same pairs come out at the boundary
    cutoff_sq = (lax.stop_gradient(r_cutoff) + lax.stop_gradient(dr_threshold)) ** 2
    threshold_sq = (lax.stop_gradient(dr_threshold) / jnp.float32(2)) ** 2

    def metric_sq(ra: jnp.ndarray, rb: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
        return space.square_distance(displacement_fn(ra, rb, **kwargs))

    @jax.jit
    def prune(position: jnp.ndarray, **kwargs: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
        n = position.shape[0]
        atoms = jnp.arange(n, dtype=jnp.int32)
        candidates = jnp.broadcast_to(atoms[None, :], (n, n))
        candidates = jnp.where(candidates == atoms[:, None], jnp.int32(n), candidates)  # no self pairs
        if custom_mask_function is not None:
            candidates = custom_mask_function(candidates).astype(jnp.int32)
        senders = jnp.broadcast_to(atoms[:, None], (n, n)).reshape(-1)
        receivers = candidates.reshape(-1)
        d = jax.vmap(partial(metric_sq, **kwargs))(position[senders], position[receivers])
        mask = (d < cutoff_sq) & (receivers < n)
        if ordered:
            mask = mask & (receivers < senders)
        cumsum = jnp.cumsum(mask, dtype=jnp.int32)
        index = jnp.where(mask, cumsum - 1, receivers.shape[0] - 1)
        empty = jnp.full(receivers.shape, n, jnp.int32)
        return jnp.stack((empty.at[index].set(receivers), empty.at[index].set(senders))), cumsum[-1]

    def build(
        position: jnp.ndarray, error: Any, previous: partition.NeighborList | None, extra_capacity: int, kwargs: dict
    ) -> partition.NeighborList:
        idx, occupancy = prune(position, **kwargs)
        n = position.shape[0]
        capacity = None if previous is None else previous.max_occupancy
        if capacity is None:  # allocate: size the list from the pairs found now
            capacity = int(occupancy * capacity_multiplier + n * extra_capacity)
            limit = n * (n - 1) // 2 if ordered else n * (n - 1)
            capacity = max(0, min(capacity, idx.shape[-1], limit))
        return partition.NeighborList(
            idx[:, :capacity],
            position,
            error.update(partition.PEC.NEIGHBOR_LIST_OVERFLOW, occupancy > capacity),
            None,
            capacity,
            format,
            None,
            None,
            update if previous is None else previous.update_fn,  # (a list keeps its own, as jax-md's do)
        )

    def allocate(position: jnp.ndarray, extra_capacity: int = 0, **kwargs: Any) -> partition.NeighborList:
        error = partition.PartitionError(jnp.zeros((), jnp.uint8))
        return build(position, error, None, extra_capacity, kwargs)

    def update(position: jnp.ndarray, neighbors: partition.NeighborList, **kwargs: Any) -> partition.NeighborList:
        def rebuild(operand: tuple[jnp.ndarray, Any]) -> partition.NeighborList:
            return build(operand[0], operand[1], neighbors, 0, kwargs)

        if always_rebuild:
            return rebuild((position, neighbors.error))
        moved = jax.vmap(partial(metric_sq, **kwargs))(position, neighbors.reference_position)
        return lax.cond(jnp.any(moved > threshold_sq), rebuild, lambda _: neighbors, (position, neighbors.error))

    return partition.NeighborListFns(allocate, update)
