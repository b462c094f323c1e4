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

    Structures of up to :data:`DIRECT_PAIRS_MAX_ATOMS` atoms are checked together, size by size, from their
    pair-distance matrices (periodic ones by the minimum image, exact when every periodic cell height exceeds
    ``2 min_distance``: an image closer than half a height has all fractional components in (-1/2, 1/2); a free
    direction is never wrapped); larger ones and thinner cells go through ``ase.neighborlist`` one by one. A
    periodic structure with a singular cell is left to the graph builder, which refuses it.

    Raises:
      DataError: naming the first such structure and its two atoms (0-based, within the structure) and their
        distance.
    """
    n_atoms, pbc = structures.n_atoms, structures.pbc
    periodic = pbc.any(axis=1)
    cell = _complete(structures.cell, pbc)
    det = np.linalg.det(cell)
    with np.errstate(divide="ignore", invalid="ignore"):
        # cell heights along each lattice vector: 1 / |row k of inv(cell).T| (V / area of the opposite face)
        heights = np.where(
            np.abs(det)[:, None] > 1e-9, 1.0 / np.linalg.norm(np.linalg.inv(_safe(cell, det)), axis=1), 0.0
        )
    singular = periodic & (np.abs(det) <= 1e-9)  # left to the graph builder, which refuses it
    thin = periodic & ~singular & ~np.all(~pbc | (heights > 2 * min_distance), axis=1)
    one_by_one = (n_atoms > DIRECT_PAIRS_MAX_ATOMS) | thin
    found: list[tuple[int, int, int, float]] = []  # (structure, atom i, atom j, distance) of the first overlap
    for n in np.unique(n_atoms[~one_by_one & ~singular]):
        ks = np.flatnonzero((n_atoms == n) & ~one_by_one & ~singular)
        first, second = np.triu_indices(int(n), 1)  # each pair once
        if first.size == 0:
            continue
        per_chunk = max(1, 250_000 // first.size)  # ~30 MB of temporaries
        for c in range(0, ks.size, per_chunk):
            k = ks[c : c + per_chunk]
            pos = structures.positions[structures.offsets[k][:, None] + np.arange(n)]  # [m, n, 3]
            box = np.where(periodic[k][:, None, None], cell[k], np.eye(3))  # free space: fractional = Cartesian
            frac = pos @ np.linalg.inv(box)
            d = frac[:, second] - frac[:, first]  # [m, pairs, 3]
            d -= np.where(pbc[k][:, None, :], np.round(d), 0.0)  # the minimum image along periodic directions
            cart = d @ box
            d2 = np.einsum("mpc,mpc->mp", cart, cart)
            bad = d2 < min_distance**2
            if bad.any():
                m = int(np.argmax(bad.any(axis=1)))  # the first structure of the chunk with an overlap
                q = int(np.argmin(d2[m]))
                found.append((int(k[m]), int(first[q]), int(second[q]), float(np.sqrt(d2[m, q]))))
                break
    for k in np.flatnonzero(one_by_one & ~singular):
        if found and min(found)[0] < k:
            break
        positions = structures.positions[structures.atom_slice(int(k))]
        box = cell[k]
        if not periodic[k]:  # ase needs a cell only along periodic directions: one that encloses the atoms
            box = np.diag(positions.max(0) - positions.min(0) + 2 * min_distance + 1.0)
        i, j, dist = primitive_neighbor_list("ijd", pbc[k], box, positions, min_distance, self_interaction=False)
        if dist.size:
            q = int(np.argmin(dist))
            found.append((int(k), int(i[q]), int(j[q]), float(dist[q])))
    if found:
        k, i, j, d = min(found)
        try:
            check_pair_distances(np.array([i]), np.array([j]), np.array([d]), min_distance)
        except DataError as err:
            raise DataError(f"structure {k}: {err}") from None


def _complete(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``[n, 3, 3]`` cells whose lattice vectors along free (non-periodic) directions of a partly periodic
    structure are replaced by unit vectors orthogonal to the periodic ones (a slab's cell may hold a zero vector
    there; the minimum image never wraps along a free direction, so only the periodic heights matter, and these
    are then the in-plane ones)."""
    partly = pbc.any(axis=1) & ~pbc.all(axis=1)
    if not partly.any():
        return cell
    out = cell.copy()
    for k in np.flatnonzero(partly):
        periodic_rows = cell[k][pbc[k]]
        _, _, vh = np.linalg.svd(periodic_rows)  # rows of vh past the periodic ones' rank: their complement
        out[k][~pbc[k]] = vh[periodic_rows.shape[0] :]
    return out


def _safe(cell: np.ndarray, det: np.ndarray) -> np.ndarray:
    """``cell`` with singular matrices replaced by the identity (their heights are then masked out)."""
    return np.where(np.abs(det)[:, None, None] > 1e-9, cell, np.eye(3))


def average_num_neighbours(structures: StructureSet, graphs: list[NeighbourGraph]) -> float:
    """Mean number of neighbours within r_max per atom (edges / atoms) over a set."""
    n_edges = sum(g.n_edges for g in graphs)
    return float(n_edges) / float(structures.n_total_atoms)
