"""NequIP-specific behaviour (the generic physics checks live in property_suite.py)."""

import dataclasses

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.potentials import MODELS, NequIPConfig, nequip
from equiforce.potentials.nequip import (
    CPU_SMALL_GRAPH_EDGE_CHUNK,
    _channels_last,
    _convolution_constants,
    _from_channels_last,
    _hidden_irreps,
    _small_graph_chunk,
)
from tests.potentials.property_suite import (
    Harness,
    ModelTestCase,
    assert_o3_equivariant,
    bent_triatomic,
    get_harness,
    molecule,
    random_rotation,
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
    rng = np.random.default_rng(5)
    for improper in (False, True):
        ref = assert_o3_equivariant(harness, molecule(0), random_rotation(rng, improper), 1.5)
        assert np.max(np.abs(ref.forces)) > 1e-3


def test_angular_information(variant):
    """With l_max >= 1 the energy depends on bond angles; with l_max = 0 only on distances within r_max."""
    name, harness = variant
    e_a = harness.evaluate(bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(bent_triatomic(160.0)).energy[0]
    if name == "l0":
        assert e_a == pytest.approx(e_b, abs=1e-12)
    else:
        assert abs(e_a - e_b) > 1e-6


def test_default_config_sees_angles():
    harness = get_harness("nequip")
    assert harness.potential.model.l_max >= 1
    e_a = harness.evaluate(bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(bent_triatomic(160.0)).energy[0]
    assert abs(e_a - e_b) > 1e-6


@pytest.mark.parametrize(
    ("x_irreps", "l_max", "parity"),
    [
        ("4x0e", 2, True),
        ("4x0e+4x0o+4x1o+4x1e+4x2e+4x2o", 2, True),
        ("3x0e+3x1o+3x2e+3x3o", 3, False),
        ("2x0e", 0, False),
    ],
)
def test_dense_convolution_equals_the_e3nn_tensor_product(x_irreps, l_max, parity):
    """The dense per-channel Clebsch-Gordan map gives e3nn's message ``[x, x ⊗ Y]`` (filtered to the gate input,
    regrouped) in e3nn's layout and path order, so the radial weights and the parameters keep their meaning."""
    channels = e3nn.Irreps(x_irreps)[0].mul
    target = _hidden_irreps(channels, l_max, parity)
    n_gates = target.filter(drop=["0e", "0o"]).num_irreps
    gated = target + e3nn.Irreps(f"{n_gates}x0e") if n_gates else target
    sh_irreps = e3nn.Irreps.spherical_harmonics(l_max).filter(drop="0e") if l_max > 0 else e3nn.Irreps("0e")
    rng = np.random.default_rng(0)
    x = e3nn.IrrepsArray(x_irreps, jnp.asarray(rng.normal(size=(7, e3nn.Irreps(x_irreps).dim))))
    sh = e3nn.spherical_harmonics(sh_irreps, jnp.asarray(rng.normal(size=(7, 3))), normalize=True)

    ref = e3nn.concatenate([x.filter(keep=gated), e3nn.tensor_product(x, sh, filter_ir_out=gated)]).regroup()
    cg, per_channel = _convolution_constants(str(x.irreps), str(sh.irreps), str(gated))
    sh1 = jnp.concatenate([jnp.ones((7, 1)), sh.array], axis=1)
    dense = jnp.einsum("ej,ijk,eic->ekc", sh1, jnp.asarray(cg), _channels_last(x))
    out = _from_channels_last(dense, per_channel, channels)
    assert out.irreps == ref.irreps
    np.testing.assert_allclose(out.array, ref.array, rtol=0, atol=1e-12)


def _blocked(fn, *args) -> bool:
    """Whether the traced computation runs a ``scan`` (the blocked edge sum)."""
    return "scan" in str(jax.make_jaxpr(fn)(*args))


def test_small_graphs_are_blocked_when_their_messages_overflow_the_cache():
    """Protocol size on aspirin's 336 MD edge slots: 8.8 MB of float64 messages (blocked), 4.4 MB of float32
    (not); the MD tests' small model (8 features, l_max 1) is never blocked below 2048 edges."""
    sh = e3nn.Irreps.spherical_harmonics(2).filter(drop="0e")
    protocol = _hidden_irreps(32, 2, parity=True)
    assert _small_graph_chunk(protocol, sh, 336, jnp.float64) == CPU_SMALL_GRAPH_EDGE_CHUNK
    assert _small_graph_chunk(protocol, sh, 336, jnp.float32) == 0
    assert _small_graph_chunk(protocol, sh, 5 * 292, jnp.float32) == CPU_SMALL_GRAPH_EDGE_CHUNK
    small = _hidden_irreps(8, 1, parity=False)
    assert _small_graph_chunk(small, e3nn.Irreps.spherical_harmonics(1).filter(drop="0e"), 2047, jnp.float64) == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the automatic block size is a CPU setting")
def test_automatic_blocks_of_a_small_graph_give_the_same_energy_and_forces(monkeypatch):
    """With the size threshold at 0 the automatic setting blocks a small graph's edges (a ``scan`` in the
    jaxpr), with the energy and forces of all edges at once; with no threshold it does not block."""
    rng = np.random.default_rng(3)
    n_nodes, n_edges = 9, 150
    senders = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    receivers = jnp.asarray(rng.integers(0, n_nodes, n_edges))
    species = jnp.asarray(rng.integers(0, 2, n_nodes))
    positions = jnp.asarray(rng.normal(size=(n_nodes, 3)) * 1.5)
    mask = senders != receivers
    config = NequIPConfig(num_interactions=1, num_features=3, l_max=1, radial_mlp_hidden=8)
    auto = config.build(num_species=2, r_max=4.0, avg_num_neighbours=10.0)
    at_once = dataclasses.replace(config, edge_chunk_size=0).build(num_species=2, r_max=4.0, avg_num_neighbours=10.0)

    def energy(model, params, pos):
        vectors = jnp.where(mask[:, None], pos[senders] - pos[receivers], 0.0)
        return model.apply(params, vectors, species, senders, receivers, mask).sum()

    params = jax.jit(auto.init)(
        jax.random.PRNGKey(0), positions[senders] - positions[receivers], species, senders, receivers, mask
    )
    assert not _blocked(lambda p: energy(auto, params, p), positions)  # 150 edges: a few kB of messages
    monkeypatch.setattr(nequip, "CPU_SMALL_GRAPH_BLOCK_BYTES", 0)
    assert _blocked(lambda p: energy(auto, params, p), positions)
    assert not _blocked(lambda p: energy(at_once, params, p), positions)

    e_auto, f_auto = jax.jit(jax.value_and_grad(lambda p: energy(auto, params, p)))(positions)
    e_once, f_once = jax.jit(jax.value_and_grad(lambda p: energy(at_once, params, p)))(positions)
    np.testing.assert_allclose(e_auto, e_once, rtol=1e-13)
    np.testing.assert_allclose(f_auto, f_once, rtol=0, atol=1e-12)
    assert np.max(np.abs(f_auto)) > 1e-3
