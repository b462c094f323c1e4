"""Per-structure neighbour graphs on the host, built with ``ase.neighborlist``.

Convention (used by every model): an edge ``e`` points from its *sender* ``j`` to its *receiver* ``i``;
its vector is ``positions[senders] - positions[receivers] + shifts @ cell`` (Å), i.e. the vector from
the receiving atom to the sending one, with ``shifts`` the integer cell offsets of the sender's image.
Messages flow sender → receiver and are summed at the receiver. Both directions of every pair are
present; self-pairs are included only as periodic images (never the zero-length self-edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase.neighborlist import primitive_neighbor_list

from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet

__all__ = ["NeighbourGraph", "average_num_neighbours", "build_neighbour_graph", "build_neighbour_graphs"]


@dataclass(frozen=True)
class NeighbourGraph:
    """Edges of one structure (host side).

    Attributes:
      senders: ``[n_edges]`` int32, atom index (within the structure) of the neighbour j.
      receivers: ``[n_edges]`` int32, atom index of the centre i.
      shifts: ``[n_edges, 3]`` int32, integer lattice offsets of the sender's periodic image.
    """

    senders: np.ndarray
    receivers: np.ndarray
    shifts: np.ndarray

    @property
    def n_edges(self) -> int:
        return int(self.senders.size)


def _check_cell(cell: np.ndarray, pbc: np.ndarray) -> None:
    """A periodic structure needs a non-singular cell."""
    if np.any(pbc) and abs(np.linalg.det(cell)) < 1e-9:
        raise DataError("periodic structure with a singular cell (zero volume)")


def build_neighbour_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    r_max: float,
    *,
    min_distance: float = 0.1,
) -> NeighbourGraph:
    """All pairs within ``r_max`` (Å) of one structure, periodic images included.

    Args:
      positions: ``[n_atoms, 3]`` float64, Å.
      cell: ``[3, 3]`` lattice vectors as rows, Å (ignored along non-periodic directions).
      pbc: ``[3]`` bool.
      r_max: cutoff radius in Å (> 0).
      min_distance: pairs closer than this (Å) raise — overlapping atoms give meaningless energies.

    Raises:
      DataError: non-positive cutoff, non-finite positions, overlapping atoms, a singular periodic cell.
    """
    if not r_max > 0:
        raise DataError(f"r_max must be positive, got {r_max}")
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[0] == 0:
        raise DataError("empty structure (0 atoms)")
    if not np.all(np.isfinite(positions)):
        raise DataError("positions contain NaN or inf")
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    _check_cell(cell, pbc)
    if not np.any(pbc):
        # ase needs a non-singular cell only for periodic directions; give it a box that encloses the atoms.
        extent = positions.max(0) - positions.min(0)
        cell = np.diag(extent + 2 * r_max + 1.0)
    i, j, shift, dist = primitive_neighbor_list("ijSd", pbc, cell, positions, float(r_max), self_interaction=False)
    if dist.size and dist.min() < min_distance:
        k = int(np.argmin(dist))
        raise DataError(f"atoms {int(i[k])} and {int(j[k])} overlap (distance {dist[k]:.3g} Å < {min_distance} Å)")
    return NeighbourGraph(senders=j.astype(np.int32), receivers=i.astype(np.int32), shifts=shift.astype(np.int32))


def build_neighbour_graphs(structures: StructureSet, r_max: float) -> list[NeighbourGraph]:
    """:func:`build_neighbour_graph` for every structure of a set (host loop over structures)."""
    graphs = []
    for k in range(len(structures)):
        sl = structures.atom_slice(k)
        try:
            graphs.append(build_neighbour_graph(structures.positions[sl], structures.cell[k], structures.pbc[k], r_max))
        except DataError as err:
            raise DataError(f"structure {k}: {err}") from None
    return graphs


def average_num_neighbours(structures: StructureSet, graphs: list[NeighbourGraph]) -> float:
    """Mean number of neighbours within r_max per atom (edges / atoms) over a set."""
    n_edges = sum(g.n_edges for g in graphs)
    return float(n_edges) / float(structures.n_total_atoms)
