"""Padded batches: budgets, collate layout and the batch iterator."""

import itertools

import numpy as np
import pytest

from equiforce.data import DataError, StructureSet
from equiforce.data.graph import PaddingBudget, batch_iterator, collate, estimate_budget, round_up
from equiforce.data.neighbours import build_neighbour_graphs

R_MAX = 2.5


def make_set(seed: int = 0, sizes=(3, 6, 1, 4, 8, 2, 5)) -> StructureSet:
    """Random structures (some periodic) with every label; atoms at least 1 Å apart."""
    rng = np.random.default_rng(seed)
    positions, cells, pbcs = [], [], []
    for k, n in enumerate(sizes):
        pos: list[np.ndarray] = []
        while len(pos) < n:
            p = rng.uniform(0.0, 3.0, 3)
            if all(np.linalg.norm(p - q) > 1.0 for q in pos):
                pos.append(p)
        positions.append(np.array(pos))
        periodic = k % 2 == 1
        cells.append(np.diag(rng.uniform(5.0, 6.0, 3)) if periodic else np.zeros((3, 3)))
        pbcs.append(np.full(3, periodic))
    total = sum(sizes)
    stress = rng.normal(size=(len(sizes), 6))
    stress[0] = np.nan  # structure 0 has no stress label
    return StructureSet(
        atomic_numbers=rng.integers(1, 10, total),
        positions=np.concatenate(positions),
        n_atoms=np.array(sizes),
        cell=np.stack(cells),
        pbc=np.stack(pbcs),
        energy=rng.normal(size=len(sizes)),
        forces=rng.normal(size=(total, 3)),
        stress=stress,
    )


@pytest.fixture(scope="module")
def data():
    s = make_set()
    graphs = build_neighbour_graphs(s, R_MAX)
    assert all(g.n_edges > 0 for g, n in zip(graphs, s.n_atoms, strict=True) if n > 1)
    return s, graphs


def test_round_up():
    assert round_up(1, 8) == 8
    assert round_up(8, 8) == 8
    assert round_up(9, 8) == 16
    assert round_up(0, 8) == 8


def test_budget_validation_and_fits():
    with pytest.raises(ValueError):
        PaddingBudget(n_nodes=1, n_edges=4, n_graphs=2)
    with pytest.raises(ValueError):
        PaddingBudget(n_nodes=4, n_edges=4, n_graphs=1)
    with pytest.raises(ValueError):
        PaddingBudget(n_nodes=4, n_edges=0, n_graphs=2)
    b = PaddingBudget(n_nodes=10, n_edges=20, n_graphs=3)
    assert b.fits(9, 20, 2)
    assert not b.fits(10, 20, 2)  # one node is kept for padding
    assert not b.fits(9, 21, 2)
    assert not b.fits(9, 20, 3)  # one graph is kept for padding


def test_collate_layout(data):
    s, graphs = data
    idx = [4, 1, 2]
    budget = PaddingBudget(n_nodes=24, n_edges=256, n_graphs=5)
    batch = collate(s, graphs, idx, budget)
    g = batch.graph
    n_real = int(s.n_atoms[idx].sum())
    e_real = sum(graphs[k].n_edges for k in idx)
    assert g.n_nodes == 24 and g.n_edges == 256 and g.n_graphs == 5
    np.testing.assert_array_equal(g.node_mask, np.arange(24) < n_real)
    np.testing.assert_array_equal(g.edge_mask, np.arange(256) < e_real)
    np.testing.assert_array_equal(g.graph_mask, [True, True, True, False, False])
    np.testing.assert_array_equal(g.n_node, [*s.n_atoms[idx], 0, 24 - n_real])
    assert g.n_node.sum() == g.n_nodes
    np.testing.assert_array_equal(g.node_graph[n_real:], 4)  # the last graph owns the padding nodes
    np.testing.assert_array_equal(np.bincount(g.node_graph, minlength=5), g.n_node)
    # padding edges: the first padding node to itself, zero shift
    assert np.all(g.senders[e_real:] == n_real) and np.all(g.receivers[e_real:] == n_real)
    assert np.all(g.shifts[e_real:] == 0)
    # real edges stay inside their structure
    assert np.all(g.node_graph[g.senders[:e_real]] == g.node_graph[g.receivers[:e_real]])
    assert np.all(g.node_mask[g.senders[:e_real]])
    # positions, species and labels copied in order
    atoms = np.concatenate([np.arange(s.offsets[k], s.offsets[k + 1]) for k in idx])
    np.testing.assert_array_equal(g.positions[:n_real], s.positions[atoms])
    np.testing.assert_array_equal(g.atomic_numbers[:n_real], s.atomic_numbers[atoms])
    assert np.all(g.atomic_numbers[n_real:] == 0) and np.all(g.positions[n_real:] == 0)
    np.testing.assert_array_equal(g.cell[:3], s.cell[idx])
    np.testing.assert_array_equal(g.pbc[:3], s.pbc[idx])
    np.testing.assert_array_equal(batch.energy[:3], s.energy[idx])
    assert np.all(batch.energy[3:] == 0)
    np.testing.assert_array_equal(batch.forces[:n_real], s.forces[atoms])
    np.testing.assert_array_equal(batch.stress_mask, [True, True, True, False, False])
    np.testing.assert_array_equal(batch.stress[:3], s.stress[idx])
    # edge vectors reproduce the per-structure neighbour graphs
    vec = (
        g.positions[g.senders]
        - g.positions[g.receivers]
        + np.einsum("ei,eij->ej", g.shifts, g.cell[g.node_graph[g.receivers]])
    )
    assert np.all(np.linalg.norm(vec[:e_real], axis=1) < R_MAX)
    assert np.all(vec[e_real:] == 0.0)


def test_collate_missing_stress_and_dtype(data):
    s, graphs = data
    budget = PaddingBudget(n_nodes=16, n_edges=128, n_graphs=3)
    batch = collate(s, graphs, [0, 2], budget, dtype=np.float32)
    np.testing.assert_array_equal(batch.stress_mask, [False, True, False])
    assert np.all(batch.stress[0] == 0.0) and np.all(np.isfinite(batch.stress))
    for arr in (batch.graph.positions, batch.graph.cell, batch.graph.shifts, batch.energy, batch.forces):
        assert arr.dtype == np.float32
    assert batch.graph.senders.dtype == np.int32 and batch.graph.node_graph.dtype == np.int32


def test_collate_raises_when_batch_does_not_fit(data):
    s, graphs = data
    n = int(s.n_atoms[[1, 4]].sum())
    e = graphs[1].n_edges + graphs[4].n_edges
    collate(s, graphs, [1, 4], PaddingBudget(n_nodes=n + 1, n_edges=e, n_graphs=3))  # fits exactly
    for budget in (
        PaddingBudget(n_nodes=n, n_edges=e, n_graphs=3),  # no room for the padding node
        PaddingBudget(n_nodes=n + 1, n_edges=e - 1, n_graphs=3),
        PaddingBudget(n_nodes=n + 1, n_edges=e, n_graphs=2),  # no room for the padding graph
    ):
        with pytest.raises(DataError, match="does not fit"):
            collate(s, graphs, [1, 4], budget)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_estimate_budget_fits_any_batch(data, batch_size):
    s, graphs = data
    n_edges = [g.n_edges for g in graphs]
    budget = estimate_budget(s.n_atoms, n_edges, batch_size)
    assert budget.n_graphs == batch_size + 1
    assert budget.n_nodes % 8 == 0 and budget.n_edges % 64 == 0
    for combo in itertools.combinations(range(len(s)), batch_size):
        combo = list(combo)
        assert budget.fits(int(s.n_atoms[combo].sum()), sum(n_edges[k] for k in combo), batch_size)
        collate(s, graphs, combo, budget)


def test_estimate_budget_tight_without_rounding():
    budget = estimate_budget([3, 9, 5], [10, 40, 20], 2, node_multiple=1, edge_multiple=1)
    assert budget == PaddingBudget(n_nodes=15, n_edges=61, n_graphs=3)
    with pytest.raises(ValueError):
        estimate_budget([3], [2], 0)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_batch_iterator_yields_every_structure_once(data, batch_size, shuffle):
    s, graphs = data
    n_edges = [g.n_edges for g in graphs]
    budget = estimate_budget(s.n_atoms, n_edges, batch_size)
    seen = []
    for batch in batch_iterator(s, graphs, batch_size, budget, shuffle=shuffle, seed=3):
        g = batch.graph
        n_real = int(g.graph_mask.sum())
        assert 1 <= n_real <= batch_size
        assert g.n_nodes == budget.n_nodes and g.n_edges == budget.n_edges and g.n_graphs == budget.n_graphs
        # identify the structures by their energies (distinct random labels)
        for e in batch.energy[:n_real]:
            seen.append(int(np.nonzero(s.energy == e)[0][0]))
    assert sorted(seen) == list(range(len(s)))
    if shuffle:
        assert seen != list(range(len(s))) or batch_size == len(s)
    else:
        assert seen == list(range(len(s)))


def test_batch_iterator_packs_to_a_small_budget(data):
    """A budget smaller than batch_size structures: batches are closed early, nothing is lost."""
    s, graphs = data
    largest = int(np.argmax(s.n_atoms))
    budget = PaddingBudget(n_nodes=int(s.n_atoms[largest]) + 2, n_edges=max(g.n_edges for g in graphs) + 4, n_graphs=8)
    seen = []
    n_batches = 0
    for batch in batch_iterator(s, graphs, 7, budget, shuffle=True, seed=1):
        n_batches += 1
        n_real = int(batch.graph.graph_mask.sum())
        seen.extend(int(np.nonzero(s.energy == e)[0][0]) for e in batch.energy[:n_real])
    assert sorted(seen) == list(range(len(s)))
    assert n_batches > 1


def test_batch_iterator_shuffle_depends_on_seed(data):
    s, graphs = data
    budget = estimate_budget(s.n_atoms, [g.n_edges for g in graphs], 1)

    def order(seed):
        return [float(b.energy[0]) for b in batch_iterator(s, graphs, 1, budget, shuffle=True, seed=seed)]

    assert order(4) == order(4)
    assert order(4) != order(5)


def test_batch_iterator_raises_on_oversized_structure(data):
    s, graphs = data
    budget = PaddingBudget(n_nodes=4, n_edges=512, n_graphs=4)  # the 8-atom structure cannot fit
    with pytest.raises(DataError, match="exceeds the budget"):
        list(batch_iterator(s, graphs, 2, budget))
