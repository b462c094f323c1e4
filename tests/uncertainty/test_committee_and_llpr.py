"""Committee and LLPR uncertainties against independent computations; model files; bad input."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from equiforce.data.graph import collate, estimate_budget
from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.potentials import MODELS, Potential, load_model, save_model
from equiforce.potentials.uncertainty import UncertaintyConfig, last_layer_paths, network_params
from equiforce.training.config import ConfigError, load_config
from equiforce.uncertainty.calibration import UncertaintyError, calibrate, fit_llpr, predict_uncertainties
from tests.potentials.property_suite import MODEL_TEST_CASES, molecule


def _graph(s, r_max):
    graphs = build_neighbour_graphs(s, r_max)
    budget = estimate_budget(s.n_atoms, [g.n_edges for g in graphs], len(s))
    return collate(s, graphs, np.arange(len(s)), budget).graph


def _potential(name: str, **changes) -> Potential:
    pot = Potential(
        model=MODEL_TEST_CASES[name].config,
        species=(1, 6, 8),
        r_max=4.0,
        atomic_energies=(-1.0, -2.0, -3.0),
        dtype="float64",
    )
    return dataclasses.replace(pot, **changes)


@pytest.fixture(autouse=True)
def _x64():
    jax.config.update("jax_enable_x64", True)


def test_committee_is_the_mean_of_its_members_and_sigma_their_spread():
    s = molecule(0, 7)
    g = _graph(s, 4.0)
    com = _potential("nequip", ensemble_size=3)
    params = com.init(jax.random.PRNGKey(1))
    single = com.single()
    single_fn = jax.jit(lambda p: single(p, g))
    members = [single_fn(com.member_params(params, k)) for k in range(3)]
    out = jax.jit(lambda p: com(p, g))(params)
    e_k = np.array([np.asarray(m.energy) for m in members])
    f_k = np.array([np.asarray(m.forces) for m in members])
    np.testing.assert_allclose(out.energy, e_k.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.forces, f_k.mean(0), rtol=0, atol=1e-10)
    pred = jax.jit(lambda p: com.predict_uncertainty(p, g))(params)
    np.testing.assert_allclose(pred.member_energies, e_k, atol=1e-10)
    np.testing.assert_allclose(pred.energy_uncertainty, e_k.std(0, ddof=1), atol=1e-10)
    sigma_f = np.sqrt(np.mean(f_k.var(0, ddof=1), axis=-1))
    np.testing.assert_allclose(pred.forces_uncertainty, sigma_f, atol=1e-10)
    np.testing.assert_allclose(pred.forces, out.forces, atol=1e-10)
    # member 0 is the single model initialised with the same key
    np.testing.assert_allclose(single_fn(single.init(jax.random.PRNGKey(1))).energy, e_k[0], atol=1e-10)
    assert abs(e_k[1, 0] - e_k[0, 0]) > 1e-6  # the other members are independent


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_linear_in_its_last_layer(name):
    """LLPR's premise for each registered model: e_i(w + δ) = e_i(w) + g_i·δ exactly, with g from forward mode."""
    s = molecule(0, 7)
    g = _graph(s, 4.0)
    pot = _potential(name, uncertainty=UncertaintyConfig("llpr"))
    params = pot.init(jax.random.PRNGKey(0))
    assert "llpr" in params
    net = network_params(params)
    paths = last_layer_paths(pot.model.last_layer, net)
    n_last = sum(int(np.size(flatten_dict(net)[p])) for p in paths)
    from equiforce.potentials.uncertainty import last_layer_features, split_last_layer

    single = pot.single()
    feats = np.asarray(
        jax.jit(lambda n: last_layer_features(pot.model.last_layer, n, lambda p: single.node_energies(p, g)))(net)
    )
    assert feats.shape == (g.positions.shape[0], n_last)
    w, rebuild = split_last_layer(pot.model.last_layer, net)
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(5), w.shape, w.dtype)
    energies = jax.jit(lambda p: single.node_energies(p, g))
    e0 = np.asarray(energies(net))
    e1 = np.asarray(energies(rebuild(w + delta)))
    np.testing.assert_allclose(e1 - e0, feats @ np.asarray(delta), rtol=1e-9, atol=1e-9)
    assert np.linalg.norm(e1 - e0) > 1e-4


def test_llpr_sigma_matches_the_closed_form(shift_data, llpr):
    """σ_E² = α² G_sᵀ (A + ς² I)⁻¹ G_s and σ_F,i² = α_F² g_iᵀ (A_F + ς_F² I)⁻¹ g_i, with g from finite differences
    of the energy in the last-layer weights (independent of the forward-mode features), A from the training
    structures and A_F from the training atoms."""
    potential, params = llpr
    cfg = potential.uncertainty
    net = network_params(params)
    single = potential.single()
    from equiforce.potentials.uncertainty import split_last_layer

    w, rebuild = split_last_layer(potential.model.last_layer, net)

    def node_fd(s):
        g = _graph(s, potential.r_max)
        energies = jax.jit(lambda w_: single.node_energies(rebuild(w_), g, include_e0=False))
        base = np.asarray(energies(w))
        cols = []
        for k in range(w.shape[0]):
            e = np.asarray(energies(w.at[k].add(1.0)))
            cols.append(e - base)  # exact: linear in w
        n = int(np.sum(g.node_mask))
        return np.stack(cols, axis=1)[:n]

    train = shift_data["train"]
    g_train = node_fd(train)
    bounds = np.concatenate([[0], np.cumsum(train.n_atoms)])
    big_g = np.add.reduceat(g_train, bounds[:-1], axis=0)
    a = big_g.T @ big_g + cfg.regularizer * np.eye(w.shape[0])
    test = shift_data["in"].subset(np.arange(4))
    g_test = node_fd(test)
    big_g_test = np.add.reduceat(g_test, np.concatenate([[0], np.cumsum(test.n_atoms)])[:-1], axis=0)
    sigma_e = cfg.energy_scale * np.sqrt(np.einsum("sp,sp->s", big_g_test, np.linalg.solve(a, big_g_test.T).T))
    a_f = g_train.T @ g_train + cfg.force_regularizer * np.eye(w.shape[0])
    sigma_f = cfg.forces_scale * np.sqrt(np.einsum("np,np->n", g_test, np.linalg.solve(a_f, g_test.T).T))
    pred = predict_uncertainties(potential, params, test)
    np.testing.assert_allclose(pred.energy_uncertainty, sigma_e, rtol=1e-6)
    np.testing.assert_allclose(pred.forces_uncertainty, sigma_f, rtol=1e-6)


def test_calibration_makes_the_validation_z_scores_unit(shift_data, committee, llpr):
    for potential, params in (committee, llpr):
        pred = predict_uncertainties(potential, params, shift_data["valid"])
        z_e = (pred.energy - pred.energy_ref) / pred.energy_uncertainty
        z_f = (pred.forces - pred.forces_ref) / pred.forces_uncertainty[:, None]
        np.testing.assert_allclose(np.mean(z_e**2), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.mean(z_f**2), 1.0, rtol=1e-6)


def test_model_files_keep_members_and_llpr(tmp_path, shift_data, committee, llpr):
    s = shift_data["in"].subset(np.arange(3))
    for k, (potential, params) in enumerate((committee, llpr)):
        path = save_model(tmp_path / f"m{k}.eqf", potential, params)
        p2, params2, _ = load_model(path)
        assert p2 == potential
        a = predict_uncertainties(potential, params, s)
        b = predict_uncertainties(p2, params2, s)
        np.testing.assert_array_equal(a.energy_uncertainty, b.energy_uncertainty)
        np.testing.assert_array_equal(a.forces_uncertainty, b.forces_uncertainty)


def test_bad_input_is_refused(shift_data, llpr, committee):
    with pytest.raises(ConfigError, match="ensemble_size"):
        load_config(None, ["model.ensemble_size=0"])
    with pytest.raises(ValueError, match="ensemble_size"):
        _potential("nequip", ensemble_size=0)
    with pytest.raises(ValueError, match="does not fit"):
        _potential("nequip", uncertainty=UncertaintyConfig("committee"))
    with pytest.raises(ValueError, match="finite and positive"):
        UncertaintyConfig("llpr", energy_scale=float("nan"))
    potential, params = llpr
    no_forces = dataclasses.replace(shift_data["valid"], forces=None)
    with pytest.raises(UncertaintyError, match="forces"):
        fit_llpr(potential, params, shift_data["train"], no_forces)
    with pytest.raises(UncertaintyError, match="forces"):
        calibrate(*committee, no_forces)
    plain = potential.single()
    with pytest.raises(UncertaintyError, match="no uncertainty"):
        predict_uncertainties(plain, network_params(params), shift_data["valid"])
    with pytest.raises(UncertaintyError, match="single network"):
        fit_llpr(*committee, shift_data["train"], shift_data["valid"])
