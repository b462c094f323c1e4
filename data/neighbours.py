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

__all__ = [
    "DIRECT_PAIRS_MAX_ATOMS",
    "MIN_PAIR_DISTANCE",
    "NeighbourGraph",
    "average_num_neighbours",
    "build_neighbour_graph",
    "build_neighbour_graphs",
    "check_finite_positions",
    "check_no_overlap",
    "check_pair_distances",
]

#: Atoms closer than this (Å) are refused as overlapping, by the data pipeline, the ASE calculator and MD
#: alike. Why 0.5 Å: the shortest chemical bond (H2) is 0.74 Å and even 3000 K AIMD of hydrogen-rich
#: systems stays above ~0.55 Å, while below 0.5 Å every potential trained on DFT data is extrapolating
#: into a region it has never seen (its energy there is meaningless, typically far too low): such a
#: structure is a bug (duplicated atom, wrong units, a blown-up run), not a physical configuration.
MIN_PAIR_DISTANCE = 0.5


def check_finite_positions(positions: np.ndarray) -> None:
    """Raise a :class:`DataError` naming the atoms (0-based) whose positions are NaN or inf."""
    bad = np.nonzero(~np.all(np.isfinite(np.asarray(positions, dtype=np.float64)), axis=-1))[0]
    if bad.size:
        more = f" and {bad.size - 10} more" if bad.size > 10 else ""
        raise DataError(f"positions contain NaN or inf (atom{'s' if bad.size > 1 else ''} {bad[:10].tolist()}{more})")


def check_pair_distances(
    i: np.ndarray, j: np.ndarray, dist: np.ndarray, min_distance: float = MIN_PAIR_DISTANCE
) -> None:
    """Raise a :class:`DataError` naming the closest pair if any pair (i, j) at ``dist`` (Å) is below
    ``min_distance`` (default :data:`MIN_PAIR_DISTANCE`)."""
    if dist.size and dist.min() < min_distance:
        k = int(np.argmin(dist))
        raise DataError(
            f"atoms {int(i[k])} and {int(j[k])} overlap (distance {dist[k]:.3g} Å < {min_distance} Å; "
            "see equiforce.data.neighbours.MIN_PAIR_DISTANCE)"
        )


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


#: Non-periodic structures of at most this many atoms get their pairs from the full distance matrix (numpy,
#: ~15x faster than ``ase.neighborlist`` for a 21-atom molecule, where its per-call overhead dominates; the
#: matrix of 1024 atoms is 8 MB). Larger ones and every periodic structure go through ``ase.neighborlist``.
DIRECT_PAIRS_MAX_ATOMS = 1024


def _all_pairs_within(positions: np.ndarray, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i != j``, of a free-space structure closer than ``r_max`` (Å), sorted by ``i`` then
    ``j``, with their distances (Å)."""
    dist = np.linalg.norm(positions[None, :, :] - positions[:, None, :], axis=-1)
    np.fill_diagonal(dist, np.inf)
    i, j = np.nonzero(dist < r_max)
    return i, j, dist[i, j]


def build_neighbour_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    r_max: float,
    *,
    min_distance: float = MIN_PAIR_DISTANCE,
) -> NeighbourGraph:
    """All pairs within ``r_max`` (Å) of one structure, periodic images included.

    Args:
      positions: ``[n_atoms, 3]`` float64, Å.
      cell: ``[3, 3]`` lattice vectors as rows, Å (ignored along non-periodic directions).
      pbc: ``[3]`` bool.
      r_max: cutoff radius in Å (> 0).
      min_distance: pairs closer than this (Å) raise — overlapping atoms give meaningless energies
        (default :data:`MIN_PAIR_DISTANCE`).

    Raises:
      DataError: non-positive cutoff, non-finite positions, overlapping atoms, a singular periodic cell.
    """
    if not r_max > 0:
        raise DataError(f"r_max must be positive, got {r_max}")
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[0] == 0:
        raise DataError("empty structure (0 atoms)")
    check_finite_positions(positions)
    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    _check_cell(cell, pbc)
    if not np.any(pbc):
        if positions.shape[0] <= DIRECT_PAIRS_MAX_ATOMS:
            i, j, dist = _all_pairs_within(positions, float(r_max))
            check_pair_distances(i, j, dist, min_distance)
            return NeighbourGraph(
                senders=j.astype(np.int32), receivers=i.astype(np.int32), shifts=np.zeros((i.size, 3), np.int32)
            )
        # ase needs a non-singular cell only for periodic directions; give it a box that encloses the atoms.
        extent = positions.max(0) - positions.min(0)
        cell = np.diag(extent + 2 * r_max + 1.0)
    i, j, shift, dist = primitive_neighbor_list("ijSd", pbc, cell, positions, float(r_max), self_interaction=False)
    check_pair_distances(i, j, dist, min_distance)
    return NeighbourGraph(senders=j.astype(np.int32), receivers=i.astype(np.int32), shifts=shift.astype(np.int32))


def build_neighbour_graphs(structures: StructureSet, r_max: float, *, first_index: int = 0) -> list[NeighbourGraph]:
    """:func:`build_neighbour_graph` for every structure of a set (host loop over structures).

    Raises:
      DataError: naming the structure (its index in the set plus ``first_index``, for a set that is one part of
        a larger one).
    """
    graphs = []
    for k in range(len(structures)):
        sl = structures.atom_slice(k)
        try:
            graphs.append(build_neighbour_graph(structures.positions[sl], structures.cell[k], structures.pbc[k], r_max))
        except DataError as err:
            raise DataError(f"structure {first_index + k}: {err}") from None
    return graphs


def check_no_overlap(structures: StructureSet, min_distance: float = MIN_PAIR_DISTANCE) -> None:
    """Refuse a set in which two atoms of a structure (or an atom and a periodic image) are closer than
    ``min_distance`` (Å; default :data:`MIN_PAIR_DISTANCE`, the graph builder's own limit): the readers of
    formats without a checksum call it, as a damaged coordinate often puts an atom onto another.

    A periodic structure with a singular cell is left to the graph builder, which refuses it.

    Raises:
      DataError: naming the first such structure and its two atoms (0-based, within the structure) and their
        distance.
    """
    for k in range(len(structures)):
        sl = structures.atom_slice(k)
        positions, pbc, cell = structures.positions[sl], structures.pbc[k], structures.cell[k]
        if not np.any(pbc):
            if positions.shape[0] < 2:
                continue
            if positions.shape[0] <= DIRECT_PAIRS_MAX_ATOMS:
                i, j, dist = _all_pairs_within(positions, min_distance)
            else:
                box = np.diag(positions.max(0) - positions.min(0) + 2 * min_distance + 1.0)
                i, j, dist = primitive_neighbor_list("ijd", pbc, box, positions, min_distance, self_interaction=False)
        elif abs(np.linalg.det(cell)) < 1e-9:
            continue
        else:
            i, j, dist = primitive_neighbor_list("ijd", pbc, cell, positions, min_distance, self_interaction=False)
        try:
            check_pair_distances(i, j, dist, min_distance)
        except DataError as err:
            raise DataError(f"structure {k}: {err}") from None


def average_num_neighbours(structures: StructureSet, graphs: list[NeighbourGraph]) -> float:
    """Mean number of neighbours within r_max per atom (edges / atoms) over a set."""
    n_edges = sum(g.n_edges for g in graphs)
    return float(n_edges) / float(structures.n_total_atoms)
