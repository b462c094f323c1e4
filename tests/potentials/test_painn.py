"""PaiNN-specific behaviour (the generic physics checks live in property_suite.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.data.graph import collate
from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.potentials import MODELS, PaiNNConfig, Potential, config_from_dict
from equiforce.potentials.painn import cosine_cutoff
from tests.potentials.property_suite import (
    BUDGET,
    R_MAX,
    Harness,
    ModelTestCase,
    assert_o3_equivariant,
    bent_triatomic,
    get_harness,
    molecule,
    random_rotation,
    structure,
    transformed,
)


def test_registered():
    assert MODELS["painn"] is PaiNNConfig
    cfg = PaiNNConfig()
    assert cfg.to_dict()["name"] == "painn"
    assert config_from_dict(cfg.to_dict()) == cfg
    # paper's MD17 defaults
    assert (cfg.num_interactions, cfg.num_features, cfg.num_rbf, cfg.cutoff_fn) == (3, 128, 20, "cosine")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_interactions": 0},
        {"num_features": 0},
        {"num_rbf": 0},
        {"cutoff_fn": "gaussian"},
        {"envelope_p": 1},
        {"epsilon": 0.0},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        PaiNNConfig(**kwargs)


def test_cosine_cutoff():
    r = jnp.array([0.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(cosine_cutoff(r, 3.0), [1.0, 0.5, 0.0, 0.0], atol=1e-15)
    slope = jax.vmap(jax.grad(lambda x: cosine_cutoff(x, 3.0)))(jnp.array([3.0 - 1e-9, 3.0 + 1e-3]))
    np.testing.assert_allclose(slope, 0.0, atol=1e-8)


def test_parameter_tree_follows_config():
    harness = get_harness("painn")
    params = harness.params["params"]
    cfg = harness.potential.model
    f = cfg.num_features
    blocks = sorted(k for k in params if k.startswith("interaction_"))
    assert blocks == [f"interaction_{i}" for i in range(cfg.num_interactions)]
    assert {"embedding", "filter_net", "readout_hidden", "readout_out"} <= set(params)
    assert params["embedding"]["embedding"].shape == (len(harness.potential.species), f)
    assert params["filter_net"]["kernel"].shape == (cfg.num_rbf, cfg.num_interactions * 3 * f)
    block = params["interaction_0"]
    assert block["message"]["phi_hidden"]["kernel"].shape == (f, f)
    assert block["message"]["phi_out"]["kernel"].shape == (f, 3 * f)
    assert set(block["update"]["U"]) == {"kernel"} and set(block["update"]["V"]) == {"kernel"}  # no bias
    assert block["update"]["U"]["kernel"].shape == (f, f)
    assert block["update"]["context_hidden"]["kernel"].shape == (2 * f, f)
    assert block["update"]["context_out"]["kernel"].shape == (f, 3 * f)
    assert params["readout_hidden"]["kernel"].shape == (f, f // 2)
    assert params["readout_out"]["kernel"].shape == (f // 2, 1)


def test_shared_weights_shrink_the_tree():
    base = dict(num_interactions=3, num_features=4, num_rbf=4)
    counts = {}
    for name, extra in [
        ("plain", {}),
        ("filters", {"shared_filters": True}),
        ("both", {"shared_filters": True, "shared_interactions": True}),
    ]:
        pot = Potential(PaiNNConfig(**base, **extra), species=(1, 8), r_max=R_MAX, atomic_energies=(0.0, 0.0))
        params = jax.eval_shape(lambda p=pot: p.init(jax.random.PRNGKey(0)))["params"]
        counts[name] = sum(x.size for x in jax.tree.leaves(params))
        if name == "both":
            assert "interaction" in params and "interaction_0" not in params
    assert counts["plain"] > counts["filters"] > counts["both"]
    assert counts["plain"] - counts["filters"] == 2 * (4 + 1) * 3 * 4  # two fewer rbf → 3F Dense layers


def _features(harness: Harness, s, params=None):
    """Final scalar and vector features ``([n_atoms, F], [n_atoms, 3, F])`` of a one-structure set."""
    pot = harness.potential
    graph = collate(s, build_neighbour_graphs(s, R_MAX), [0], BUDGET).graph
    vectors, species, senders, receivers, edge_mask = pot._prepare(graph, None)
    _, state = pot.module.apply(
        harness.params if params is None else params,
        vectors,
        species,
        senders,
        receivers,
        edge_mask,
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    last = f"interaction_{pot.model.num_interactions - 1}"
    (sc, vec) = state["intermediates"][last]["__call__"][0]
    n = s.n_total_atoms
    return np.asarray(sc)[:n], np.asarray(vec)[:n]


@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "rotoinversion"])
def test_vector_features_are_equivariant(improper):
    """Rotating the inputs rotates v (a polar vector: it also flips under inversion) and leaves s unchanged."""
    harness = get_harness("painn")
    s = molecule(0)
    sc, vec = _features(harness, s)
    assert np.max(np.abs(vec)) > 1e-2  # non-trivial vector features
    rot = random_rotation(np.random.default_rng(11), improper)
    sc_r, vec_r = _features(harness, transformed(s, s.positions @ rot.T + 2.0))
    np.testing.assert_allclose(sc_r, sc, rtol=0, atol=1e-10)
    np.testing.assert_allclose(vec_r, np.einsum("ab,nbf->naf", rot, vec), rtol=0, atol=1e-10)
    assert not np.allclose(vec_r, vec, atol=1e-3)  # the check above could fail


def test_angular_information():
    """Bond lengths fixed and the H–H pair beyond r_max: only the vector features can see the angle."""
    harness = get_harness("painn")
    e = [harness.evaluate(bent_triatomic(a)).energy[0] for a in (125.0, 160.0)]
    assert abs(e[0] - e[1]) > 1e-6
    assert np.isfinite(e).all()


def test_one_interaction_is_angle_blind():
    """With one interaction the angle reaches only the O atom (through its vector features ||V v||, <U v, V v>).

    Each H sees a single neighbour, so its v is one direction and its invariants depend on the O–H distance
    only: the H energies are angle-independent while the O energy is not (the angle comes from v, nothing else).
    """
    harness = Harness(ModelTestCase(PaiNNConfig(num_interactions=1, num_features=8, num_rbf=8)))
    node = [harness.evaluate(bent_triatomic(a)).node_energies for a in (125.0, 160.0)]
    # H atoms see only their O neighbour (the H-H pair is beyond r_max): after one layer their energy
    # cannot depend on the angle, while the O atom's does (through <U v, V v> and ||V v||).
    np.testing.assert_allclose(node[0][1:], node[1][1:], rtol=0, atol=1e-12)
    assert abs(node[0][0] - node[1][0]) > 1e-6


def test_gradients_are_finite_at_init():
    """Parameter and position gradients exist (no NaN) incl. isolated atoms, where v = 0 in the norm."""
    harness = get_harness("painn")
    pot = harness.potential
    s = structure([8, 1, 1, 6], np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [20.0, 0, 0]]))
    graph = collate(s, build_neighbour_graphs(s, R_MAX), [0], BUDGET).graph

    def loss(params):
        out = pot(params, graph)
        return jnp.sum(out.energy**2) + jnp.sum(out.forces**2)

    grads = jax.jit(jax.grad(loss))(harness.params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(g**2)) for g in leaves) > 0.0
    # the isolated carbon has zero force; the molecule has non-zero forces
    out = pot(harness.params, graph)
    forces = np.asarray(out.forces)
    assert np.all(forces[3] == 0.0) and np.max(np.abs(forces[:3])) > 1e-3


def test_normalize_sum_scales_messages():
    """normalize_sum divides the neighbour sums by avg_num_neighbours (changes the energy, keeps symmetry)."""
    cfg = PaiNNConfig(num_interactions=2, num_features=8, num_rbf=8, normalize_sum=True)
    harness = Harness(ModelTestCase(cfg))
    plain = get_harness("painn")
    assert jax.tree.structure(harness.params) == jax.tree.structure(plain.params)
    s = molecule(1)
    e_norm = harness.evaluate(s, params=plain.params).energy[0]
    e_plain = plain.evaluate(s).energy[0]
    assert abs(e_norm - e_plain) > 1e-6
    rot = random_rotation(np.random.default_rng(4), improper=True)
    assert_o3_equivariant(harness, s, rot, params=plain.params)


def test_polynomial_cutoff_variant():
    """The polynomial-envelope variant is smooth at r_max and still O(3)-invariant."""
    harness = Harness(ModelTestCase(PaiNNConfig(num_interactions=2, num_features=8, num_rbf=8, cutoff_fn="polynomial")))
    direction = np.array([1.0, 2.0, -2.0]) / 3.0
    far = harness.evaluate(structure([6, 8], np.array([np.zeros(3), (R_MAX + 1e-6) * direction])))
    near = harness.evaluate(structure([6, 8], np.array([np.zeros(3), (R_MAX - 1e-3) * direction])))
    inside = harness.evaluate(structure([6, 8], np.array([np.zeros(3), (R_MAX - 0.5) * direction])))
    assert abs(inside.energy[0] - far.energy[0]) > 1e-6
    assert abs(near.energy[0] - far.energy[0]) < 1e-10
    assert np.max(np.abs(near.forces)) < 1e-8
    assert_o3_equivariant(harness, molecule(0), random_rotation(np.random.default_rng(6), improper=True))
