"""Shared layers: cutoff envelope, radial basis, NaN-safe edge geometry, chunked edge sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.potentials.layers import (
    CPU_CHUNK_MIN_EDGES,
    CPU_EDGE_CHUNK,
    _balanced_blocks,
    bessel_basis,
    chunked_edge_sum,
    chunked_node_map,
    edge_lengths,
    edge_shards,
    full_edges,
    polynomial_envelope,
    radial_embedding,
    resolve_edge_chunk,
    reverse_edge_signs,
    safe_unit_vectors,
)


@pytest.mark.parametrize("p", [2, 5, 6, 9])
def test_polynomial_envelope_values(p):
    x = jnp.linspace(0.0, 1.5, 301)
    u = np.asarray(polynomial_envelope(x, p))
    assert float(polynomial_envelope(jnp.asarray(0.0), p)) == 1.0
    assert float(polynomial_envelope(jnp.asarray(1.0), p)) == 0.0
    assert np.all(u[np.asarray(x) >= 1.0] == 0.0)
    inside = u[np.asarray(x) < 1.0]
    assert np.all(np.diff(inside) <= 1e-15)  # monotonically decreasing from 1 to 0
    assert np.all((inside > 0.0) & (inside <= 1.0))
    # u(1 - d) vanishes as d^3 (value, first and second derivative are zero at 1)
    d = 1e-3
    assert abs(float(polynomial_envelope(jnp.asarray(1.0 - d), p))) < 1e-6 * p**3


@pytest.mark.parametrize("p", [2, 6])
def test_polynomial_envelope_derivatives_vanish_at_one(p):
    u1 = jax.grad(lambda x: polynomial_envelope(x, p))
    u2 = jax.grad(u1)
    for x in (1.0 - 1e-9, 1.0, 1.0 + 1e-9):
        assert abs(float(u1(jnp.asarray(x)))) < 1e-7
        assert abs(float(u2(jnp.asarray(x)))) < 1e-6
    # ... but not identically zero inside (the test could fail)
    assert abs(float(u1(jnp.asarray(0.7)))) > 0.1
    # derivative at 0 vanishes too (p >= 2): the envelope is flat at short range
    assert float(u1(jnp.asarray(0.0))) == 0.0


def test_bessel_basis_formula():
    r = jnp.array([0.3, 1.0, 2.5, 4.9])
    r_max, n = 5.0, 6
    b = np.asarray(bessel_basis(r, n, r_max))
    k = np.arange(1, n + 1)
    expected = np.sqrt(2 / r_max) * np.sin(k * np.pi * np.asarray(r)[:, None] / r_max) / np.asarray(r)[:, None]
    np.testing.assert_allclose(b, expected, rtol=1e-12, atol=1e-12)


def test_radial_embedding_zero_beyond_cutoff_and_on_masked_edges():
    r_max = 3.0
    r = jnp.array([0.5, 1.5, 2.999, 3.0, 3.5, 7.0, 1.2, 1.0])
    mask = jnp.array([True, True, True, True, True, True, False, False])
    emb = np.asarray(radial_embedding(r, mask, r_max=r_max, num_basis=8))
    assert emb.shape == (8, 8)
    assert emb.dtype == np.float64
    assert np.all(np.abs(emb[:2]) > 0.0) and np.max(np.abs(emb[:2])) > 1e-2
    assert np.max(np.abs(emb[2])) < 1e-9
    assert np.all(emb[3:] == 0.0)
    emb32 = radial_embedding(r.astype(jnp.float32), mask, r_max=r_max)
    assert emb32.dtype == jnp.float32


def test_edge_lengths_and_unit_vectors_nan_safe_on_padding():
    vectors = jnp.array([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.6, 0.0, 0.8]])
    mask = jnp.array([True, False, False, True])
    lengths = np.asarray(edge_lengths(vectors, mask))
    np.testing.assert_allclose(lengths, [3.0, 1.0, 1.0, 1.0])
    units = np.asarray(safe_unit_vectors(vectors, mask))
    np.testing.assert_array_equal(units[1], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(units[0], np.asarray(vectors[0]))

    def loss(v):
        r = edge_lengths(v, mask)
        emb = radial_embedding(r, mask, r_max=4.0, num_basis=4)
        u = safe_unit_vectors(v, mask)
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        return jnp.sum(emb) + jnp.sum(r) + jnp.sum(u**3)

    grad = np.asarray(jax.grad(loss)(vectors))  # jax_debug_nans would raise on a NaN
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~np.asarray(mask)], 0.0)
    assert np.all(np.abs(grad[0]) > 0.0)
    # gradient of a real edge length is the unit vector
    g_len = np.asarray(jax.grad(lambda v: jnp.sum(edge_lengths(v, mask)))(vectors))
    np.testing.assert_allclose(g_len[0], [1 / 3, 2 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_array_equal(g_len[1:3], 0.0)


def test_chunked_edge_sum_equals_segment_sum():
    """Blocks of 1..n edges (padding dropped) give the segment sum, and so do its first and second derivatives."""
    rng = np.random.default_rng(0)
    n_nodes, n_edges = 5, 23
    values = jnp.asarray(rng.normal(size=(n_edges, 3)))
    receivers = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    weights = jnp.asarray(rng.normal(size=(n_nodes, 3)))

    def edge_fn(v):
        return jnp.sin(v) * v

    def total(v, chunk):
        return jnp.sum(weights * chunked_edge_sum(edge_fn, (v,), receivers, n_nodes, chunk) ** 2)

    ref = jax.ops.segment_sum(edge_fn(values), receivers, num_segments=n_nodes)
    for chunk in (0, 1, 4, 7, 23, 50):
        np.testing.assert_allclose(chunked_edge_sum(edge_fn, (values,), receivers, n_nodes, chunk), ref, atol=1e-12)
        np.testing.assert_allclose(jax.grad(total)(values, chunk), jax.grad(total)(values, 0), atol=1e-12)
        hvp = jax.jvp(lambda v, c=chunk: jax.grad(total)(v, c), (values,), (values,))[1]
        np.testing.assert_allclose(hvp, jax.jvp(lambda v: jax.grad(total)(v, 0), (values,), (values,))[1], atol=1e-10)


def test_chunked_edge_sum_of_pairs_sends_each_output_to_its_node():
    """With ``[n_pairs, 2]`` receivers each pair's two outputs go to their two nodes, blocked or not, and
    the gradient of the blocked sum is the one-shot one."""
    rng = np.random.default_rng(1)
    n_nodes, n_pairs = 6, 17
    values = jnp.asarray(rng.normal(size=(n_pairs, 3)))
    targets = jnp.asarray(rng.integers(0, n_nodes, (n_pairs, 2)))

    def pair_fn(v):
        return jnp.stack([jnp.sin(v), v**2], axis=1)  # [e, 2, 3]

    out = pair_fn(values)
    ref = np.zeros((n_nodes, 3))
    for k in range(n_pairs):
        for j in range(2):
            ref[int(targets[k, j])] += np.asarray(out[k, j])
    for chunk in (0, 1, 5, 17):
        np.testing.assert_allclose(chunked_edge_sum(pair_fn, (values,), targets, n_nodes, chunk), ref, atol=1e-12)
    grads = [
        jax.grad(lambda v, c=chunk: jnp.sum(chunked_edge_sum(pair_fn, (v,), targets, n_nodes, c) ** 2))(values)
        for chunk in (0, 5)
    ]
    np.testing.assert_allclose(grads[1], grads[0], atol=1e-12)


def test_full_edges_lists_each_pair_in_both_directions():
    vectors = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    v, s, r, m = full_edges(vectors, jnp.asarray([1, 2]), jnp.asarray([0, 0]), jnp.asarray([True, False]))
    np.testing.assert_array_equal(np.asarray(v), [[1, 0, 0], [0, 2, 0], [-1, 0, 0], [0, -2, 0]])
    np.testing.assert_array_equal(np.asarray(s), [1, 2, 0, 0])
    np.testing.assert_array_equal(np.asarray(r), [0, 0, 1, 2])
    np.testing.assert_array_equal(np.asarray(m), [True, False, True, False])


def test_reverse_edge_signs_follow_the_parity_of_the_harmonics_each_column_reads():
    # D_in = 1, harmonics rows of degree [0, 1, 1, 1, 2], three output columns reading l = 0, 1 and 2
    cg = np.zeros((1, 5, 3))
    cg[0, 0, 0] = 1.0
    cg[0, 2, 1] = 0.5
    cg[0, 4, 2] = 2.0
    degrees = np.array([0, 1, 1, 1, 2])
    np.testing.assert_array_equal(reverse_edge_signs(cg, degrees), [1.0, -1.0, 1.0])
    cg[0, 1, 2] = 1.0  # column 2 now reads l = 1 and l = 2
    with pytest.raises(ValueError, match="both parities"):
        reverse_edge_signs(cg, degrees)


@pytest.mark.parametrize("n", [1, 5, 23, 64, 65, 336, 1000])
@pytest.mark.parametrize("chunk", [1, 7, 56, 64, 128])
def test_balanced_blocks_are_equal_and_cover_every_row(n, chunk):
    """The fewest blocks of at most ``chunk`` rows, of one size, with less than one padding row per block."""
    n_blocks, block, pad = _balanced_blocks(n, chunk)
    assert n_blocks == -(-n // chunk)  # as few blocks as unbalanced ones
    assert block <= chunk and n_blocks * block == n + pad
    assert 0 <= pad < n_blocks


def test_balanced_blocks_of_the_md_aspirin_graph():
    assert _balanced_blocks(336, 64) == (6, 56, 0)  # was 6 x 64 with 48 padding edges


def test_resolve_edge_chunk():
    """Explicit sizes win; the automatic size on CPU is 128 for large graphs and the model's choice below."""
    assert resolve_edge_chunk(0, 10**6) == 0
    assert resolve_edge_chunk(32, 10, small_graph_chunk=64) == 32
    if jax.default_backend() == "cpu":
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES) == CPU_EDGE_CHUNK
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES - 1) == 0
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES - 1, small_graph_chunk=64) == 64
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES, small_graph_chunk=64) == CPU_EDGE_CHUNK
        # a half list's rows are pairs: graphs are sized by directed edges and blocks hold half as many pairs
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES // 2, half_list=True) == CPU_EDGE_CHUNK // 2
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES // 2 - 1, small_graph_chunk=64, half_list=True) == 32
        assert resolve_edge_chunk(None, CPU_CHUNK_MIN_EDGES // 2 - 1, half_list=True) == 0
    assert resolve_edge_chunk(64, 10, half_list=True) == 32
    assert resolve_edge_chunk(1, 10, half_list=True) == 1
    assert resolve_edge_chunk(0, 10, half_list=True) == 0


def test_chunked_node_map_equals_one_call():
    """Row blocks of 1..n (the last padded) give the one-call result and its first and second derivatives."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(11, 2, 3)))
    y = jnp.asarray(rng.normal(size=(11, 4)))

    def fn(x, y):
        return jnp.tanh(x) * jnp.sum(y**2, axis=1)[:, None, None]

    def total(x, chunk):
        return jnp.sum(jnp.cos(chunked_node_map(fn, (x, y), chunk)))

    for chunk in (0, 1, 3, 4, 11, 20):
        np.testing.assert_allclose(chunked_node_map(fn, (x, y), chunk), fn(x, y), rtol=0, atol=1e-14)
        np.testing.assert_allclose(jax.grad(total)(x, chunk), jax.grad(total)(x, 0), rtol=0, atol=1e-13)
        hvp = jax.jvp(lambda v, c=chunk: jax.grad(total)(v, c), (x,), (x,))[1]
        np.testing.assert_allclose(hvp, jax.jvp(lambda v: jax.grad(total)(v, 0), (x,), (x,))[1], atol=1e-12)


def test_blocks_within_edge_shards_equal_one_call():
    """Inside edge_shards(n) (sharded MD) each of the n contiguous shards is blocked on its own: the same sums,
    node maps and derivatives; an edge count that does not split into n shards is refused."""
    rng = np.random.default_rng(2)
    n_nodes, n_edges = 5, 24
    values = jnp.asarray(rng.normal(size=(n_edges, 3)))
    receivers = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    x = jnp.asarray(rng.normal(size=(11, 2, 3)))

    def edge_fn(v):
        return jnp.sin(v) * v

    def node_fn(x):
        return jnp.tanh(x) * x

    def total(v, x, chunk):
        edges = chunked_edge_sum(edge_fn, (v,), receivers, n_nodes, chunk)
        return jnp.sum(jnp.cos(edges)) + jnp.sum(jnp.cos(chunked_node_map(node_fn, (x,), chunk)))

    ref = jax.ops.segment_sum(edge_fn(values), receivers, num_segments=n_nodes)
    grad_ref = jax.grad(total, argnums=(0, 1))(values, x, 0)
    for shards, chunk in ((3, 2), (3, 5), (4, 1), (2, 100)):
        with edge_shards(shards):
            out = chunked_edge_sum(edge_fn, (values,), receivers, n_nodes, chunk)
            nodes = chunked_node_map(node_fn, (x,), chunk)
            grads = jax.grad(total, argnums=(0, 1))(values, x, chunk)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(nodes, node_fn(x), rtol=0, atol=1e-14)
        for g, r in zip(grads, grad_ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)
    with edge_shards(5), pytest.raises(ValueError, match="24 edges do not split into 5"):
        chunked_edge_sum(edge_fn, (values,), receivers, n_nodes, 2)
    with pytest.raises(ValueError, match="shards"), edge_shards(0):
        pass


def test_mace_within_edge_shards_equals_the_one_shot_model(monkeypatch):
    """MACE traced inside edge_shards(2) (what sharded MD does) with edge blocks of 7 pairs and atom blocks of 3
    gives the unblocked model's energy and forces: blocked sums per shard and the symmetric contraction per
    shard's atoms."""
    import dataclasses

    from equiforce.potentials import layers, mace
    from tests.potentials.property_suite import BUDGET, MODEL_TEST_CASES, Harness, ModelTestCase, crystal

    monkeypatch.setattr(mace, "CPU_NODE_CHUNK", 3)
    shard_shapes = []
    blocked = layers._blocked_node_map
    monkeypatch.setattr(layers, "_blocked_node_map", lambda *a: shard_shapes.append(a[1][0].shape) or blocked(*a))
    base = MODEL_TEST_CASES["mace"]
    plain = Harness(ModelTestCase(dataclasses.replace(base.config, edge_chunk_size=0), base.param_scale))
    sharded = Harness(ModelTestCase(dataclasses.replace(base.config, edge_chunk_size=7), base.param_scale))
    s = crystal(seed=1)
    ref = plain.evaluate(s)
    with edge_shards(2):
        out = sharded.evaluate(s, params=plain.params)
    # each shard's atoms (half the padded budget), in blocks of 3
    assert shard_shapes and all(shape[0] == BUDGET.n_nodes // 2 for shape in shard_shapes)
    np.testing.assert_allclose(out.energy, ref.energy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.forces, ref.forces, rtol=0, atol=1e-11)


def _chunk_harnesses(model: str, chunk: int):
    import dataclasses

    from tests.potentials.property_suite import MODEL_TEST_CASES, Harness, ModelTestCase

    base = MODEL_TEST_CASES[model]
    return {
        c: Harness(ModelTestCase(dataclasses.replace(base.config, edge_chunk_size=c), base.param_scale))
        for c in (0, chunk)
    }


@pytest.mark.parametrize("model", ["mace", pytest.param("nequip", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "chunk", [7, pytest.param(1, marks=pytest.mark.slow), pytest.param(64, marks=pytest.mark.slow)]
)
def test_chunked_edges_equal_all_at_once(model, chunk):
    """Edges evaluated in blocks (scan + remat; padding to a whole number of blocks) give the energy, forces
    and stress of the one-shot sum."""
    from tests.potentials.property_suite import crystal, molecule

    harnesses = _chunk_harnesses(model, chunk)
    for s in (molecule(seed=3, n_atoms=9), crystal(seed=1)):
        ref = harnesses[0].evaluate(s)
        out = harnesses[chunk].evaluate(s, params=harnesses[0].params)
        np.testing.assert_allclose(out.energy, ref.energy, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out.forces, ref.forces, rtol=0, atol=1e-11)
        np.testing.assert_allclose(out.stress, ref.stress, rtol=0, atol=1e-11)


# slow (84 s for MACE on 2 cores): the default run covers second derivatives through the blocked scan in
# test_chunked_edge_sum_equals_segment_sum and the models' blocked forces in test_chunked_edges_equal_all_at_once
@pytest.mark.slow
@pytest.mark.parametrize("model", ["mace", "nequip"])
def test_chunked_edges_give_the_training_gradient(model):
    """The parameter gradient of a force loss (what training differentiates: a derivative of a derivative
    through the blocked scan) equals the one-shot one."""
    from equiforce.data.graph import collate
    from equiforce.data.neighbours import build_neighbour_graphs
    from tests.potentials.property_suite import BATCH_BUDGET, molecule

    chunk = 7
    harnesses = _chunk_harnesses(model, chunk)
    structures = molecule(seed=5, n_atoms=8)
    graphs = build_neighbour_graphs(structures, harnesses[0].potential.r_max)
    graph = collate(structures, graphs, np.arange(len(structures)), BATCH_BUDGET).graph

    def force_loss(params, potential):
        return jnp.sum(potential(params, graph).forces ** 2)

    params = harnesses[0].params
    g_ref = jax.grad(force_loss)(params, harnesses[0].potential)
    g_out = jax.grad(force_loss)(params, harnesses[chunk].potential)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
