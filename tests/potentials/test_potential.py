"""The Potential: the model property suite on every registered model, plus Potential-level behaviour."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.lj import LennardJones

from equiforce.data.graph import collate
from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.potentials import (
    MODELS,
    ModelConfig,
    NequIPConfig,
    Potential,
    config_from_dict,
    register_model,
)
from tests.potentials.property_suite import (
    BUDGET,
    E0,
    MODEL_TEST_CASES,
    R_MAX,
    SPECIES,
    PotentialPropertySuite,
    crystal,
    get_harness,
    molecule,
    transformed,
)


class TestEveryRegisteredModel(PotentialPropertySuite):
    """Runs :class:`PotentialPropertySuite` on each model of ``equiforce.potentials.MODELS``."""


@pytest.fixture(scope="module")
def harness():
    return get_harness("nequip")


def _graph(s, budget=BUDGET):
    return collate(s, build_neighbour_graphs(s, R_MAX), np.arange(len(s)), budget).graph


# ------------------------------------------------------------------------------- construction
def _potential(**changes):
    kwargs = dict(
        model=MODEL_TEST_CASES["nequip"].config, species=SPECIES, r_max=R_MAX, atomic_energies=E0, dtype="float64"
    )
    kwargs.update(changes)
    return Potential(**kwargs)


@pytest.mark.parametrize(
    "changes",
    [
        {"species": (6, 1, 8)},  # unsorted
        {"species": (1, 1, 8)},  # duplicate
        {"species": ()},
        {"species": (0, 1, 8)},
        {"species": (1, 6, 119)},
        {"atomic_energies": (-1.0, -2.0)},  # one E0 missing
        {"atomic_energies": (-1.0, float("nan"), -2.0)},
        {"r_max": 0.0},
        {"r_max": -1.0},
        {"dtype": "float16"},
        {"scale": float("inf")},
        {"shift": float("nan")},
        {"avg_num_neighbours": 0.0},
    ],
)
def test_invalid_potential_rejected(changes):
    with pytest.raises(ValueError):
        _potential(**changes)


def test_to_dict_round_trip_is_json():
    pot = _potential(scale=1.7, shift=-0.3, avg_num_neighbours=12.5, dtype="float32")
    text = json.dumps(pot.to_dict())
    back = Potential.from_dict(json.loads(text))
    assert back == pot
    assert isinstance(back.model, NequIPConfig)
    assert back.species == SPECIES and isinstance(back.species, tuple)


# ------------------------------------------------------------------------------- registry
def test_registry_round_trip_and_errors():
    assert "nequip" in MODELS
    cfg = NequIPConfig(num_interactions=1, l_max=1, num_features=3, parity=False)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model"):
        config_from_dict({"name": "no-such-model"})
    with pytest.raises(ValueError, match="unknown model"):
        config_from_dict({"l_max": 1})
    with pytest.raises(ValueError, match="bogus"):
        config_from_dict({**cfg.to_dict(), "bogus": 1})


def test_register_model_rejects_clash_and_missing_name():
    @dataclasses.dataclass(frozen=True)
    class Nameless(ModelConfig):
        pass

    with pytest.raises(ValueError, match="name"):
        register_model(Nameless)

    @dataclasses.dataclass(frozen=True)
    class Impostor(ModelConfig):
        name = "nequip"

    with pytest.raises(ValueError, match="already registered"):
        register_model(Impostor)
    assert MODELS["nequip"] is NequIPConfig
    assert register_model(NequIPConfig) is NequIPConfig  # re-registering the same class is harmless


# ------------------------------------------------------------------------------- energy paths
def test_energy_only_and_e0_paths_agree(harness):
    pot, params = harness.potential, harness.params
    s = crystal(0)
    g = _graph(s)
    full = harness.evaluate(s)

    @jax.jit
    def paths(p, graph):
        no_forces = pot(p, graph, compute_forces=False)
        forces_only = pot(p, graph)
        no_e0 = pot(p, graph, compute_forces=False, include_e0=False)
        return no_forces, forces_only, no_e0

    no_forces, forces_only, no_e0 = paths(params, g)
    assert no_forces.forces is None and no_forces.stress is None
    assert forces_only.stress is None
    np.testing.assert_allclose(np.asarray(no_forces.energy)[:1], full.energy, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(no_forces.node_energies)[: s.n_total_atoms], full.node_energies, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(forces_only.forces)[: s.n_total_atoms], full.forces, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.sum(full.node_energies), full.energy[0], rtol=1e-13)
    sum_e0 = sum(E0[SPECIES.index(int(z))] for z in s.atomic_numbers)
    np.testing.assert_allclose(np.asarray(no_e0.energy)[0], full.energy[0] - sum_e0, rtol=1e-12, atol=1e-12)


def test_scale_and_shift_semantics(harness):
    """e_i = scale * (out_i - out_iso[Z_i]) + shift + E0[Z_i]."""
    s = molecule(0)
    g = _graph(s)
    n = s.n_total_atoms
    bare = harness.potential.replace(scale=1.0, shift=0.0, atomic_energies=(0.0, 0.0, 0.0))
    scaled = harness.potential.replace(scale=2.5, shift=-0.75, atomic_energies=E0)
    out, e = jax.jit(lambda p, graph: (bare.node_energies(p, graph), scaled.node_energies(p, graph)))(harness.params, g)
    out, e = np.asarray(out)[:n], np.asarray(e)[:n]
    e0 = np.array([E0[SPECIES.index(int(z))] for z in s.atomic_numbers])
    assert np.max(np.abs(out)) > 1e-3
    np.testing.assert_allclose(e, 2.5 * out - 0.75 + e0, rtol=1e-12, atol=1e-12)


def test_no_recompilation_for_same_budget(harness):
    pot, params = harness.potential, harness.params
    traces = []

    @jax.jit
    def energy(p, graph):
        traces.append(1)
        return pot(p, graph, compute_forces=False).energy

    s = molecule(0)
    e1 = energy(params, _graph(s))
    e2 = energy(params, _graph(transformed(s, s.positions * 1.05)))
    e3 = energy(params, _graph(crystal(0)))  # other structure, same padding budget
    assert len(traces) == 1
    assert float(e1[0]) != float(e2[0]) != float(e3[0])


def test_init_dtype_follows_potential():
    for dtype, expected in (("float32", jnp.float32), ("float64", jnp.float64)):
        pot = _potential(dtype=dtype)
        template = jax.eval_shape(lambda p=pot: p.init(jax.random.PRNGKey(0)))
        assert {leaf.dtype for leaf in jax.tree.leaves(template)} == {jnp.dtype(expected)}


# ------------------------------------------------------------------------------- ASE conventions
def test_ase_stress_convention_is_strain_derivative_over_volume():
    """ASE's own stress is σ = (1/V) ∂E/∂ε (positive = tensile): the convention the suite checks."""
    atoms = bulk("Ar", "fcc", a=5.6, cubic=True)  # stretched beyond equilibrium: tensile stress
    atoms.rattle(0.05, seed=1)
    atoms.calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=8.0, smooth=True)
    stress = atoms.get_stress(voigt=False)
    volume = atoms.get_volume()
    cell = atoms.get_cell()[:]
    h = 1e-6
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1.0, -1.0):
                strained = atoms.copy()
                strained.calc = atoms.calc
                eps = np.zeros((3, 3))
                eps[a, b] = eps[b, a] = sign * h
                strained.set_cell(cell @ (np.eye(3) + eps).T, scale_atoms=True)
                energies.append(strained.get_potential_energy())
            fd[a, b] = (energies[0] - energies[1]) / (2 * h) / volume / (1.0 if a == b else 2.0)
    np.testing.assert_allclose(stress, fd, rtol=1e-5, atol=1e-9)
    assert np.all(np.diag(stress) > 0)  # stretched crystal: tensile, positive in ASE's sign
