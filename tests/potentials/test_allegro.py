"""Allegro-specific behaviour (the generic physics checks live in property_suite.py)."""

import json

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.potentials import MODELS, AllegroConfig, config_from_dict, load_model, save_model
from equiforce.potentials.allegro import tensor_track_irreps
from tests.potentials.property_suite import (
    R_MAX,
    SPECIES,
    Harness,
    ModelTestCase,
    assert_o3_equivariant,
    bent_triatomic,
    get_harness,
    molecule,
    random_rotation,
    structure,
)


def test_registered():
    assert MODELS["allegro"] is AllegroConfig
    assert AllegroConfig().to_dict()["name"] == "allegro"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"l_max": -1},
        {"l_max": 7},
        {"num_tensor_features": 0},
        {"latent_dim": 0},
        {"num_bessel": 0},
        {"envelope_p": 1},
        {"two_body_mlp_hidden": (16, 0)},
        {"latent_mlp_hidden": (-2,)},
        {"edge_energy_mlp_hidden": (8.5,)},
        {"edge_energy_mlp_hidden": 32},
        {"latent_resnet_update_ratio": 0.0},
        {"latent_resnet_update_ratio": float("nan")},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        AllegroConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = AllegroConfig(num_layers=3, parity=True, two_body_mlp_hidden=[8, 16], latent_mlp_hidden=[], latent_dim=16)
    assert cfg.two_body_mlp_hidden == (8, 16) and cfg.latent_mlp_hidden == ()  # lists are stored as tuples
    data = json.loads(json.dumps(cfg.to_dict()))  # as in the model-file header: tuples come back as lists
    assert data["two_body_mlp_hidden"] == [8, 16]
    back = config_from_dict(data)
    assert back == cfg and hash(back) == hash(cfg)
    assert isinstance(back.edge_energy_mlp_hidden, tuple)


def test_tensor_track_irreps():
    # natural parity: l <= l_max throughout, scalars only after the last tensor product
    sh2 = e3nn.Irreps("0e+1o+2e")
    assert tensor_track_irreps(2, 2, parity=False) == [sh2, sh2, e3nn.Irreps("0e")]
    assert tensor_track_irreps(1, 3, parity=False) == [e3nn.Irreps("0e+1o+2e+3o"), e3nn.Irreps("0e")]
    assert tensor_track_irreps(1, 0, parity=True) == [e3nn.Irreps("0e"), e3nn.Irreps("0e")]
    # both parities: irreps that cannot reach the final scalars are pruned (as in the reference), so
    # the unnatural parities survive only in the middle of a 3-layer network
    assert tensor_track_irreps(2, 2, parity=True) == tensor_track_irreps(2, 2, parity=False)
    assert tensor_track_irreps(3, 1, parity=True) == [
        e3nn.Irreps("0e+1o"),
        e3nn.Irreps("0e+1o+1e"),
        e3nn.Irreps("0e+1o"),
        e3nn.Irreps("0e"),
    ]


def test_parameter_tree_follows_config():
    harness = get_harness("allegro")
    params = harness.params["params"]
    cfg = harness.potential.model
    n_species = len(SPECIES)
    n_env = cfg.num_tensor_features * (cfg.l_max + 1)  # one weight per channel and spherical harmonic l
    expected = {"two_body_mlp", "edge_energy_mlp"}
    expected |= {f"env_embed_{i}" for i in range(cfg.num_layers)}
    expected |= {f"latent_mlp_{i}" for i in range(cfg.num_layers)}
    expected |= {f"tensor_linear_{i}" for i in range(cfg.num_layers - 1)}  # none after the last (scalar) TP
    assert set(params) == expected
    two_body = [params["two_body_mlp"][f"Dense_{k}"]["kernel"] for k in range(len(cfg.two_body_mlp_hidden) + 1)]
    assert two_body[0].shape == (2 * n_species + cfg.num_bessel, cfg.two_body_mlp_hidden[0])  # [Z_i, Z_j, B(r)]
    assert two_body[-1].shape[1] == cfg.latent_dim
    # the first embedding also weights the initial edge features; later ones only the environment
    assert params["env_embed_0"]["Dense_0"]["kernel"].shape == (cfg.latent_dim, 2 * n_env)
    assert params["env_embed_1"]["Dense_0"]["kernel"].shape == (cfg.latent_dim, n_env)
    # latent MLP input: latent + 0e outputs of the channel-wise TP (l_max + 1 scalar paths per channel)
    assert params["latent_mlp_0"]["Dense_0"]["kernel"].shape[0] == cfg.latent_dim + n_env
    assert params["latent_mlp_1"]["Dense_0"]["kernel"].shape[0] == cfg.latent_dim + n_env
    assert params["edge_energy_mlp"][f"Dense_{len(cfg.edge_energy_mlp_hidden)}"]["kernel"].shape[1] == 1
    # bias-free MLPs, like the reference
    assert not any("bias" in "/".join(map(str, path)) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def _chain(k_position):
    """O (atom 0) — C (atom 1, 2 Å away) — H (atom 2, within r_max of C but beyond r_max of O), plus an H
    near the O."""
    pos = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], k_position, [-0.5, 1.6, 0.2]])
    assert np.linalg.norm(pos[2] - pos[0]) > R_MAX and np.linalg.norm(pos[2] - pos[1]) < R_MAX
    return structure([8, 6, 1, 1], pos)


def test_strict_locality_unlike_message_passing():
    """Moving an atom beyond r_max of atom 0 (but within 2 r_max, through a common neighbour) leaves the
    Allegro energy of atom 0 unchanged; a two-layer message-passing model (NequIP) sees it."""
    a, b = _chain([4.0, 0.5, 0.0]), _chain([4.2, -0.6, 0.3])
    allegro = get_harness("allegro")
    ea, eb = allegro.evaluate(a).node_energies, allegro.evaluate(b).node_energies
    np.testing.assert_allclose(eb[0], ea[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(eb[3], ea[3], rtol=0, atol=1e-12)  # also beyond r_max of the moved atom
    assert abs(eb[1] - ea[1]) > 1e-6  # the common neighbour does see the move
    nequip = get_harness("nequip")
    na, nb = nequip.evaluate(a).node_energies, nequip.evaluate(b).node_energies
    assert abs(nb[0] - na[0]) > 1e-8


# Small variants: both parities with 3 layers (the unnatural parities survive), and a scalar-only network.
VARIANTS = {
    "parity-3-layers": AllegroConfig(
        num_layers=3,
        l_max=1,
        parity=True,
        num_tensor_features=3,
        latent_dim=8,
        two_body_mlp_hidden=(8,),
        latent_mlp_hidden=(8,),
        edge_energy_mlp_hidden=(),
    ),
    "l0": AllegroConfig(
        num_layers=1,
        l_max=0,
        num_tensor_features=4,
        latent_dim=8,
        two_body_mlp_hidden=(),
        latent_mlp_hidden=(8, 8),
        edge_energy_mlp_hidden=(8,),
    ),
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
    """The tensor track sees bond angles (l_max >= 1); with l_max = 0 only distances within r_max matter."""
    name, harness = variant
    e_a = harness.evaluate(bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(bent_triatomic(160.0)).energy[0]
    if name == "l0":
        assert e_a == pytest.approx(e_b, abs=1e-12)
    else:
        assert abs(e_a - e_b) > 1e-6


def test_default_config_sees_angles():
    harness = get_harness("allegro")
    e_a = harness.evaluate(bent_triatomic(125.0)).energy[0]
    e_b = harness.evaluate(bent_triatomic(160.0)).energy[0]
    assert abs(e_a - e_b) > 1e-6


def test_save_load_round_trip(variant, tmp_path):
    name, harness = variant
    path = save_model(tmp_path / f"{name}.eqf", harness.potential, harness.params, {"model": name})
    potential, params, header = load_model(path)
    assert potential == harness.potential
    assert potential.model == VARIANTS[name] and isinstance(potential.model.latent_mlp_hidden, tuple)
    assert header["metadata"] == {"model": name}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(harness.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s = molecule(2)
    ref, out = harness.evaluate(s), harness.evaluate(s, params=params)
    np.testing.assert_array_equal(out.energy, ref.energy)
    np.testing.assert_array_equal(out.forces, ref.forces)


def test_float32_module_output_dtype():
    """The module itself computes in the dtype of the edge vectors (no float64 constants leak in)."""
    harness = get_harness("allegro")
    module = harness.potential.module
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), harness.params)
    vectors = jnp.array([[1.0, 0.5, -0.3], [-1.0, -0.5, 0.3], [0.0, 0.0, 0.0]], jnp.float32)
    out = module.apply(
        params32,
        vectors,
        jnp.array([0, 2, 0]),
        jnp.array([1, 0, 2]),
        jnp.array([0, 1, 2]),
        jnp.array([True, True, False]),
    )
    assert out.dtype == jnp.float32 and out.shape == (3,)
    assert out[2] == 0.0 and abs(float(out[0])) > 0.0  # padding node: nothing; real atoms: an energy
