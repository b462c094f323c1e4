"""NequIP-specific behaviour (the generic physics checks live in property_suite.py)."""

import e3nn_jax as e3nn
import jax
import numpy as np
import pytest

from equiforce.potentials import MODELS, NequIPConfig
from equiforce.potentials.nequip import _hidden_irreps
from tests.potentials.property_suite import (
    R_MAX,
    Harness,
    ModelTestCase,
    get_harness,
    molecule,
    random_rotation,
    structure,
    transformed,
)


def test_registered():
    assert MODELS["nequip"] is NequIPConfig
    assert NequIPConfig().to_dict()["name"] == "nequip"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_interactions": 0},
        {"l_max": -1},
        {"l_max": 7},
        {"num_features": 0},
        {"num_bessel": 0},
        {"radial_mlp_hidden": 0},
        {"envelope_p": 1},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        NequIPConfig(**kwargs)


def test_hidden_irreps():
    assert _hidden_irreps(4, 2, parity=True) == e3nn.Irreps("4x0e+4x0o+4x1o+4x1e+4x2e+4x2o").regroup()
    assert _hidden_irreps(3, 1, parity=False) == e3nn.Irreps("3x0e+3x1o")
    assert _hidden_irreps(2, 0, parity=False) == e3nn.Irreps("2x0e")


def test_parameter_tree_follows_config():
    harness = get_harness("nequip")
    params = harness.params["params"]
    cfg = harness.potential.model
    blocks = sorted(k for k in params if k.startswith("interaction_"))
    assert blocks == [f"interaction_{i}" for i in range(cfg.num_interactions)]
    assert {"embedding", "output_hidden", "output"} <= set(params)
    # species-indexed self-connection: one weight matrix per species
    for w in jax.tree.leaves(params["interaction_0"]["self_connection"]):
        assert w.shape[0] == len(harness.potential.species)


# Small variants: scalar-only (l_max = 0) and natural-parity-only networks.
VARIANTS = {
    "l0": NequIPConfig(num_interactions=2, num_features=4, l_max=0, radial_mlp_hidden=8, radial_mlp_layers=1),
    "no-parity": NequIPConfig(num_interactions=2, num_features=3, l_max=1, parity=False, radial_mlp_hidden=8),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    return request.param, Harness(ModelTestCase(VARIANTS[request.param]))


def test_variant_o3_equivariant(variant):
    _, harness = variant
    s = molecule(0)
    ref = harness.evaluate(s)
    assert np.max(np.abs(ref.forces)) > 1e-3
    rng = np.random.default_rng(5)
    for improper in (False, True):
        rot = random_rotation(rng, improper)
        out = harness.evaluate(transformed(s, s.positions @ rot.T + 1.5))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces @ rot.T, rtol=0, atol=1e-10)


def _bent_triatomic(angle_deg: float):
    """O at the origin with two H at 1.8 Å; the H–H distance (> R_MAX) changes only through the angle."""
    t = np.deg2rad(angle_deg)
    pos = np.array([[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [1.8 * np.cos(t), 1.8 * np.sin(t), 0.0]])
    assert np.linalg.norm(pos[1] - pos[2]) > R_MAX
    return structure([8, 1, 1], pos)


def test_angular_information(variant):
    """With l_max >= 1 the energy depends on bond angles; with l_max = 0 only on distances within r_max."""
    name, harness = variant
    e_a = harness.evaluate(_bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(_bent_triatomic(160.0)).energy[0]
    if name == "l0":
        assert e_a == pytest.approx(e_b, abs=1e-12)
    else:
        assert abs(e_a - e_b) > 1e-6


def test_default_config_sees_angles():
    harness = get_harness("nequip")
    assert harness.potential.model.l_max >= 1
    e_a = harness.evaluate(_bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(_bent_triatomic(160.0)).energy[0]
    assert abs(e_a - e_b) > 1e-6
