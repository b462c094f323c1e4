"""The one data structure through the middle: a padded graph batch with static shapes.

Training batches, the MD energy function and the ASE calculator all feed a model through
:class:`Graph`, so a model is written once and runs everywhere. Shapes are fixed by a
:class:`PaddingBudget` (rounded up), so a jitted function compiles once per budget.

Padding layout: real nodes come first, then padding nodes; real graphs first, then one padding
graph (always the last) that owns every padding node. Padding edges join the first padding node to
itself (a zero-length vector: models must use NaN-safe norms and mask by ``edge_mask``). Masks come
from the padding, never from the data.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.neighbours import NeighbourGraph
from equiforce.data.structures import StructureSet

__all__ = [
    "Batch",
    "BatchShard",
    "Graph",
    "PaddingBudget",
    "batch_groups",
    "batch_iterator",
    "collate",
    "estimate_budget",
    "plan_batches",
    "round_up",
    "split_group",
]


class Graph(NamedTuple):
    """A padded batch of structures (a JAX pytree; arrays may be NumPy or JAX).

    Attributes:
      positions: ``[n_nodes, 3]`` float, Å.
      atomic_numbers: ``[n_nodes]`` int32 (0 on padding nodes).
      senders: ``[n_edges]`` int32, global node index of the neighbour j.
      receivers: ``[n_edges]`` int32, global node index of the centre i.
      shifts: ``[n_edges, 3]`` float, integer lattice offsets of the sender's image (edge vector is
        ``positions[senders] - positions[receivers] + shifts @ cell[node_graph[receivers]]``).
      cell: ``[n_graphs, 3, 3]`` float, Å, lattice vectors as rows (zeros where not periodic).
      pbc: ``[n_graphs, 3]`` bool.
      node_graph: ``[n_nodes]`` int32, graph index of each node.
      n_node: ``[n_graphs]`` int32, nodes per graph.
      node_mask: ``[n_nodes]`` bool, True on real atoms.
      edge_mask: ``[n_edges]`` bool, True on real edges.
      graph_mask: ``[n_graphs]`` bool, True on real structures.
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    node_graph: np.ndarray
    n_node: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    graph_mask: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.senders.shape[0])

    @property
    def n_graphs(self) -> int:
        return int(self.cell.shape[0])


class Batch(NamedTuple):
    """A graph with its labels (zeros where absent; masks say which are real).

    Attributes:
      graph: the :class:`Graph`.
      energy: ``[n_graphs]`` float, eV.
      forces: ``[n_nodes, 3]`` float, eV/Å.
      stress: ``[n_graphs, 6]`` float, eV/Å³ (ASE sign, Voigt order).
      stress_mask: ``[n_graphs]`` bool, True where a stress label exists.
    """

    graph: Graph
    energy: np.ndarray
    forces: np.ndarray
    stress: np.ndarray
    stress_mask: np.ndarray


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple) if value > 0 else multiple


@dataclass(frozen=True)
class PaddingBudget:
    """Static array sizes of a batch: nodes, edges and graphs (the padding graph included)."""

    n_nodes: int
    n_edges: int
    n_graphs: int

    def __post_init__(self) -> None:
        if self.n_nodes < 2 or self.n_graphs < 2 or self.n_edges < 1:
            raise ValueError(f"budget too small: {self}")

    def fits(self, n_nodes: int, n_edges: int, n_graphs: int) -> bool:
        """Whether real sizes fit (one node and one graph are kept for padding)."""
        return n_nodes + 1 <= self.n_nodes and n_edges <= self.n_edges and n_graphs + 1 <= self.n_graphs


def estimate_budget(
    n_atoms: Sequence[int] | np.ndarray,
    n_edges: Sequence[int] | np.ndarray,
    batch_size: int,
    *,
    node_multiple: int = 8,
    edge_multiple: int = 64,
) -> PaddingBudget:
    """A budget that holds any ``batch_size`` structures of a set (the largest ones, plus padding).

    Rounded up to multiples so that sets of similar size share a compiled shape.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n_atoms = np.sort(np.asarray(n_atoms))[::-1]
    n_edges = np.sort(np.asarray(n_edges))[::-1]
    return PaddingBudget(
        n_nodes=round_up(int(n_atoms[:batch_size].sum()) + 1, node_multiple),
        n_edges=round_up(int(n_edges[:batch_size].sum()) + 1, edge_multiple),
        n_graphs=batch_size + 1,
    )


def collate(
    structures: StructureSet,
    graphs: Sequence[NeighbourGraph],
    indices: Sequence[int] | np.ndarray,
    budget: PaddingBudget,
    dtype: np.dtype | type = np.float64,
) -> Batch:
    """Pack the structures at ``indices`` into one padded :class:`Batch` (NumPy arrays).

    Args:
      structures: the host-side set.
      graphs: its neighbour graphs (``graphs[k]`` belongs to ``structures[k]``).
      indices: which structures, in order.
      budget: static sizes; must fit (see :meth:`PaddingBudget.fits`).
      dtype: float dtype of positions, cell, shifts and labels.

    Raises:
      DataError: if the structures do not fit the budget (never truncated silently).
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_atoms = structures.n_atoms[idx]
    n_real_nodes = int(n_atoms.sum())
    n_real_edges = int(sum(graphs[k].n_edges for k in idx))
    n_real_graphs = idx.size
    if not budget.fits(n_real_nodes, n_real_edges, n_real_graphs):
        raise DataError(
            f"batch of {n_real_graphs} structures ({n_real_nodes} atoms, {n_real_edges} edges) does not fit "
            f"the padding budget {budget}"
        )
    N, E, G = budget.n_nodes, budget.n_edges, budget.n_graphs
    atom_idx = (
        np.concatenate([np.arange(structures.offsets[k], structures.offsets[k + 1]) for k in idx])
        if idx.size
        else np.zeros(0, np.int64)
    )

    positions = np.zeros((N, 3), dtype)
    positions[:n_real_nodes] = structures.positions[atom_idx]
    atomic_numbers = np.zeros(N, np.int32)
    atomic_numbers[:n_real_nodes] = structures.atomic_numbers[atom_idx]
    node_graph = np.full(N, G - 1, np.int32)
    node_graph[:n_real_nodes] = np.repeat(np.arange(n_real_graphs, dtype=np.int32), n_atoms)
    n_node = np.zeros(G, np.int32)
    n_node[:n_real_graphs] = n_atoms
    n_node[G - 1] = N - n_real_nodes

    first_node = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]) if idx.size else np.zeros(0, np.int64)
    senders = np.full(E, n_real_nodes, np.int32)
    receivers = np.full(E, n_real_nodes, np.int32)
    shifts = np.zeros((E, 3), dtype)
    if n_real_edges:
        pairs = list(zip(idx, first_node, strict=True))
        senders[:n_real_edges] = np.concatenate([graphs[k].senders + o for k, o in pairs])
        receivers[:n_real_edges] = np.concatenate([graphs[k].receivers + o for k, o in pairs])
        shifts[:n_real_edges] = np.concatenate([graphs[k].shifts for k in idx])

    cell = np.zeros((G, 3, 3), dtype)
    cell[:n_real_graphs] = structures.cell[idx]
    pbc = np.zeros((G, 3), bool)
    pbc[:n_real_graphs] = structures.pbc[idx]

    node_mask = np.arange(N) < n_real_nodes
    edge_mask = np.arange(E) < n_real_edges
    graph_mask = np.arange(G) < n_real_graphs

    energy = np.zeros(G, dtype)
    if structures.energy is not None:
        energy[:n_real_graphs] = structures.energy[idx]
    forces = np.zeros((N, 3), dtype)
    if structures.forces is not None:
        forces[:n_real_nodes] = structures.forces[atom_idx]
    stress = np.zeros((G, 6), dtype)
    stress_mask = np.zeros(G, bool)
    if structures.stress is not None:
        has = structures.has_stress[idx]
        stress_mask[:n_real_graphs] = has
        stress[:n_real_graphs] = np.where(has[:, None], np.nan_to_num(structures.stress[idx]), 0.0)

    graph = Graph(
        positions=positions,
        atomic_numbers=atomic_numbers,
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        cell=cell,
        pbc=pbc,
        node_graph=node_graph,
        n_node=n_node,
        node_mask=node_mask,
        edge_mask=edge_mask,
        graph_mask=graph_mask,
    )
    return Batch(graph=graph, energy=energy, forces=forces, stress=stress, stress_mask=stress_mask)


def batch_groups(
    structures: StructureSet,
    graphs: Sequence[NeighbourGraph],
    batch_size: int,
    budget: PaddingBudget,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[list[int]]:
    """The structure indices of each batch :func:`batch_iterator` yields, in the same order.

    Up to ``batch_size`` structures per batch, greedily packed to the budget. With ``shuffle`` the order is a
    permutation drawn from ``seed``. Every structure appears exactly once per pass.

    Raises:
      DataError: a structure alone exceeds the budget.
    """
    n_edges = np.array([g.n_edges for g in graphs], dtype=np.int64)
    yield from plan_batches(structures.n_atoms, n_edges, batch_size, budget, shuffle=shuffle, seed=seed)


def plan_batches(
    n_atoms: np.ndarray,
    n_edges: np.ndarray,
    batch_size: int,
    budget: PaddingBudget,
    *,
    shuffle: bool = False,
    seed: int = 0,
    start: int = 0,
) -> Iterator[list[int]]:
    """:func:`batch_groups` from the structures' sizes alone: the indices of each batch, in order.

    Args:
      n_atoms, n_edges: ``[n]`` ints, atoms and edges of every structure.
      batch_size, budget, shuffle, seed: as for :func:`batch_groups` (the same arguments give the same batches).
      start: skip this many batches (they are planned, not yielded).

    Raises:
      DataError: a structure alone exceeds the budget.
    """
    n = int(np.asarray(n_atoms).size)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    current: list[int] = []
    nodes = edges = 0
    done = 0
    for k in order:
        k = int(k)
        n_a, n_e = int(n_atoms[k]), int(n_edges[k])
        if not budget.fits(n_a, n_e, 1):
            raise DataError(f"structure {k} ({n_a} atoms, {n_e} edges) alone exceeds the budget {budget}")
        if current and (len(current) == batch_size or not budget.fits(nodes + n_a, edges + n_e, len(current) + 1)):
            if done >= start:
                yield current
            done += 1
            current, nodes, edges = [], 0, 0
        current.append(k)
        nodes += n_a
        edges += n_e
    if current and done >= start:
        yield current


def split_group(group: Sequence[int], n_parts: int) -> list[list[int]]:
    """Split a batch's structure indices into ``n_parts`` consecutive parts whose sizes differ by at most one
    (the first parts are the larger ones; parts may be empty when the batch is smaller than ``n_parts``)."""
    group = list(group)
    base, extra = divmod(len(group), n_parts)
    parts, start = [], 0
    for d in range(n_parts):
        size = base + (1 if d < extra else 0)
        parts.append(group[start : start + size])
        start += size
    return parts


@dataclass(frozen=True)
class BatchShard:
    """Which parts of every batch one process holds, when each batch is split into ``n_parts`` consecutive
    parts (:func:`split_group`, one per device of a data-parallel run over several processes).

    Attributes:
      n_parts: parts per batch (the devices of every process), >= 1.
      mine: the indices (``0..n_parts-1``, increasing) of this process's parts.

    Raises:
      ValueError: ``n_parts < 1``, or ``mine`` empty, out of range or not increasing.
    """

    n_parts: int
    mine: tuple[int, ...]

    def __post_init__(self) -> None:
        mine = tuple(int(i) for i in self.mine)
        if self.n_parts < 1:
            raise ValueError(f"n_parts must be >= 1, got {self.n_parts}")
        increasing = all(a < b for a, b in itertools.pairwise(mine))
        if not mine or not increasing or not 0 <= mine[0] <= mine[-1] < self.n_parts:
            raise ValueError(f"mine must be increasing part indices in 0..{self.n_parts - 1}, got {self.mine}")
        object.__setattr__(self, "mine", mine)

    def positions(self, batch_len: int) -> list[int]:
        """The positions (``0..batch_len-1``, increasing) of a ``batch_len``-structure batch in this
        process's parts."""
        parts = split_group(range(batch_len), self.n_parts)
        return [j for i in self.mine for j in parts[i]]


def batch_iterator(
    structures: StructureSet,
    graphs: Sequence[NeighbourGraph],
    batch_size: int,
    budget: PaddingBudget,
    *,
    shuffle: bool = False,
    seed: int = 0,
    dtype: np.dtype | type = np.float64,
) -> Iterator[Batch]:
    """Padded batches over a set: up to ``batch_size`` structures each, greedily packed to the budget.

    With ``shuffle`` the order is a permutation drawn from ``seed`` (pass the epoch in the seed for a
    new order each epoch). Every structure appears exactly once per pass; :func:`batch_groups` gives the
    indices of each batch.
    """
    for group in batch_groups(structures, graphs, batch_size, budget, shuffle=shuffle, seed=seed):
        yield collate(structures, graphs, group, budget, dtype)
