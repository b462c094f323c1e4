"""Neighbour graphs: agreement with a brute-force image search, edge convention, bad input."""

import itertools

import numpy as np
import pytest

from equiforce.data import DataError, StructureSet
from equiforce.data.neighbours import average_num_neighbours, build_neighbour_graph, build_neighbour_graphs

TRICLINIC = np.array([[3.1, 0.0, 0.0], [0.9, 2.8, 0.0], [-0.5, 0.7, 3.3]])


def brute_force(positions, cell, pbc, r_max):
    """Set of (receiver i, sender j, shift S) with 0 < |x_j - x_i + S @ cell| < r_max, searching all images."""
    pbc = np.asarray(pbc, dtype=bool)
    if np.any(pbc):
        volume = abs(np.linalg.det(cell))
        heights = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
        # positions may lie outside the cell: widen the search by their fractional extent
        frac = positions @ np.linalg.inv(cell)
        spread = np.ceil(frac.max(0) - frac.min(0))
        reach = [int(np.ceil(r_max / h) + spread[k] + 1) if pbc[k] else 0 for k, h in enumerate(heights)]
    else:
        reach = [0, 0, 0]
    edges = set()
    for shift in itertools.product(*(range(-m, m + 1) for m in reach)):
        offset = np.asarray(shift) @ cell if np.any(pbc) else np.zeros(3)
        d = positions[None, :, :] - positions[:, None, :] + offset  # d[i, j] = x_j - x_i + S @ cell
        dist = np.linalg.norm(d, axis=-1)
        for i, j in zip(*np.nonzero((dist < r_max) & (dist > 0)), strict=True):
            edges.add((int(i), int(j), shift))
    return edges


def graph_edges(g):
    return {
        (int(i), int(j), tuple(int(v) for v in s)) for i, j, s in zip(g.receivers, g.senders, g.shifts, strict=True)
    }


def random_positions(rng, n, cell, min_dist=0.9):
    """Random positions in (and partly outside) a cell, nearest images at least ``min_dist`` apart."""
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3))) @ cell
    pos: list[np.ndarray] = []
    while len(pos) < n:
        x = rng.uniform(0.0, 1.0, 3) @ cell
        if all(np.min(np.linalg.norm(x - q + images, axis=1)) > min_dist for q in pos):
            pos.append(x)
    pos = np.array(pos)
    pos[0] += cell[0] - cell[2]  # unwrapped coordinates must work too
    pos[1] -= 2 * cell[1]
    return pos


@pytest.mark.parametrize("r_max", [1.7, 3.0, 4.5])  # below and above half the cell heights
def test_periodic_graph_matches_brute_force(rng, r_max):
    pos = random_positions(rng, 5, TRICLINIC)
    g = build_neighbour_graph(pos, TRICLINIC, np.ones(3, bool), r_max)
    expected = brute_force(pos, TRICLINIC, np.ones(3, bool), r_max)
    assert g.n_edges == len(expected) > 0
    assert graph_edges(g) == expected
    assert len(graph_edges(g)) == g.n_edges  # no duplicate edges
    if r_max > 3.0:
        assert any(i == j for i, j, _ in expected)  # self-images are neighbours


def test_partially_periodic_graph_matches_brute_force(rng):
    pbc = np.array([True, False, True])
    pos = random_positions(rng, 4, TRICLINIC)
    g = build_neighbour_graph(pos, TRICLINIC, pbc, 3.2)
    expected = brute_force(pos, TRICLINIC, pbc, 3.2)
    assert graph_edges(g) == expected
    assert np.all(g.shifts[:, 1] == 0)


@pytest.mark.parametrize("offset", [0.0, -57.3, 1e3])
def test_non_periodic_graph_matches_all_pairs(rng, offset):
    pos = rng.uniform(0.0, 4.0, (9, 3)) + offset * np.array([1.0, -0.5, 0.25])
    g = build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 2.5, min_distance=0.0)
    assert np.all(g.shifts == 0)
    assert graph_edges(g) == brute_force(pos, np.eye(3), np.zeros(3, bool), 2.5)


def test_direct_molecule_pairs_equal_ase_neighbour_list(rng, monkeypatch):
    """Free-space structures up to DIRECT_PAIRS_MAX_ATOMS take the numpy all-pairs path; it gives ase's edges."""
    from equiforce.data import neighbours

    pos = rng.uniform(0.0, 9.0, (60, 3))
    direct = build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0, min_distance=0.0)
    order = np.lexsort((direct.senders, direct.receivers))
    assert np.array_equal(order, np.arange(direct.n_edges))  # sorted by receiver, then sender
    with pytest.raises(DataError, match="overlap"):
        build_neighbour_graph(np.array([[0.0, 0, 0], [0.3, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    monkeypatch.setattr(neighbours, "DIRECT_PAIRS_MAX_ATOMS", 0)  # every structure through ase.neighborlist
    via_ase = build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0, min_distance=0.0)
    assert direct.n_edges == via_ase.n_edges > 100
    assert graph_edges(direct) == graph_edges(via_ase)


def test_edge_convention_and_both_directions(rng):
    pos = random_positions(rng, 6, TRICLINIC)
    r_max = 3.5
    g = build_neighbour_graph(pos, TRICLINIC, np.ones(3, bool), r_max)
    assert g.senders.dtype == np.int32 and g.receivers.dtype == np.int32 and g.shifts.dtype == np.int32
    vec = pos[g.senders] - pos[g.receivers] + g.shifts @ TRICLINIC
    dist = np.linalg.norm(vec, axis=1)
    assert np.all((dist > 0) & (dist < r_max))
    edges = graph_edges(g)
    for i, j, s in edges:
        assert (j, i, tuple(-v for v in s)) in edges  # the reverse edge, with the opposite image
    assert not any(i == j and s == (0, 0, 0) for i, j, s in edges)  # no zero-length self-edge


def test_graphs_of_a_set_and_average_neighbours(rng):
    pos = random_positions(rng, 4, TRICLINIC)
    s = StructureSet(
        atomic_numbers=[1] * 7,
        positions=np.concatenate([pos, [[0.0, 0.0, 0.0], [1.2, 0.0, 0.0], [5.0, 0.0, 0.0]]]),
        n_atoms=[4, 3],
        cell=np.stack([TRICLINIC, np.zeros((3, 3))]),
        pbc=np.array([[True] * 3, [False] * 3]),
    )
    graphs = build_neighbour_graphs(s, 2.0)
    assert len(graphs) == 2
    assert graph_edges(graphs[1]) == {(0, 1, (0, 0, 0)), (1, 0, (0, 0, 0))}
    assert average_num_neighbours(s, graphs) == pytest.approx((graphs[0].n_edges + 2) / 7)


def test_nan_positions_raise():
    pos = np.array([[0.0, 0.0, 0.0], [1.0, np.nan, 0.0]])
    with pytest.raises(DataError, match="NaN"):
        build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    pos[1, 1] = np.inf
    with pytest.raises(DataError):
        build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0)


@pytest.mark.parametrize("periodic", [False, True])
def test_overlapping_atoms_raise(periodic):
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.05, 0.0]])
    cell = np.eye(3) * 4.0 if periodic else np.zeros((3, 3))
    with pytest.raises(DataError, match="overlap"):
        build_neighbour_graph(pos, cell, np.full(3, periodic), 3.0)


def test_overlap_with_own_periodic_image_raises():
    with pytest.raises(DataError, match="overlap"):
        build_neighbour_graph(np.zeros((1, 3)), np.diag([0.05, 3.0, 3.0]), np.ones(3, bool), 2.0)


def test_empty_structure_raises():
    with pytest.raises(DataError, match="empty"):
        build_neighbour_graph(np.zeros((0, 3)), np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    with pytest.raises(DataError, match="empty"):
        StructureSet(
            atomic_numbers=[],
            positions=np.zeros((0, 3)),
            n_atoms=[0],
            cell=np.zeros((1, 3, 3)),
            pbc=np.zeros((1, 3), bool),
        )


def test_bad_cutoff_and_singular_cell_raise():
    pos = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    for r_max in (0.0, -1.0, float("nan")):
        with pytest.raises(DataError, match="r_max"):
            build_neighbour_graph(pos, np.zeros((3, 3)), np.zeros(3, bool), r_max)
    singular = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 3.0, 0.0]])
    with pytest.raises(DataError, match="singular"):
        build_neighbour_graph(pos, singular, np.ones(3, bool), 2.0)


def test_error_names_the_structure():
    s = StructureSet(
        atomic_numbers=[1, 1, 1, 1],
        positions=np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.01, 0.0, 0.0]]),
        n_atoms=[2, 2],
        cell=np.zeros((2, 3, 3)),
        pbc=np.zeros((2, 3), bool),
    )
    with pytest.raises(DataError, match="structure 1"):
        build_neighbour_graphs(s, 2.0)


def test_isolated_atom_has_no_edges():
    g = build_neighbour_graph(np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool), 5.0)
    assert g.n_edges == 0 and g.shifts.shape == (0, 3)
