"""MACE-specific behaviour (the generic physics checks live in property_suite.py)."""

import functools
import itertools

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.potentials import MODELS, MACEConfig, config_from_dict
from equiforce.potentials.mace import (
    SymmetricContraction,
    _blocks,
    _tensor_product_constants,
    natural_irreps,
)
from tests.potentials.property_suite import bent_triatomic, get_harness, random_rotation

NUM_SPECIES = 3
R_MAX = 3.0


def test_registered_and_round_trip():
    assert MODELS["mace"] is MACEConfig
    cfg = MACEConfig(num_features=8, correlation=2)
    data = cfg.to_dict()
    assert data["name"] == "mace"
    assert config_from_dict(data) == cfg
    defaults = MACEConfig()
    assert (defaults.num_interactions, defaults.l_max, defaults.correlation, defaults.envelope_p) == (2, 3, 3, 5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_interactions": 0},
        {"num_features": 0},
        {"l_max": -1},
        {"l_max": 5},
        {"hidden_l_max": -1},
        {"l_max": 1, "hidden_l_max": 2},
        {"correlation": 0},
        {"correlation": 5},
        {"num_bessel": 0},
        {"envelope_p": 1},
        {"radial_mlp_hidden": 0},
        {"radial_mlp_layers": 0},
        {"readout_mlp_hidden": 0},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        MACEConfig(**kwargs)


def test_parameter_tree_follows_config():
    harness = get_harness("mace")
    params = harness.params["params"]
    cfg = harness.potential.model
    blocks = sorted(k for k in params if k.startswith("interaction_"))
    assert blocks == [f"interaction_{i}" for i in range(cfg.num_interactions)]
    assert params["embedding"].shape == (NUM_SPECIES, cfg.num_features)
    first, last = params["interaction_0"], params[f"interaction_{cfg.num_interactions - 1}"]
    # first layer: species-indexed linear of A, no residual; later layers: species-indexed residual
    assert "species_linear" in first and "skip" not in first
    assert "skip" in last and "species_linear" not in last
    # the last layer has the MLP readout, the others a linear one
    assert "readout_hidden" in last and "readout_hidden" not in first
    assert last["readout_hidden"]["kernel"].shape == (cfg.num_features, cfg.readout_mlp_hidden)
    # species-dependent symmetric-contraction weights for every order ν <= correlation
    for block, irreps in ((first, ("0e", "1o")), (last, ("0e",))):
        sc = block["symmetric_contraction"]
        assert set(sc) == {f"w{nu}_{ir}" for nu in range(1, cfg.correlation + 1) for ir in irreps}
        for w in sc.values():
            assert w.shape[0] == NUM_SPECIES and w.shape[-1] == cfg.num_features
    for w in jax.tree.leaves(last["skip"]):
        assert w.shape[0] == NUM_SPECIES
    # radial MLP: radial_mlp_layers hidden layers, one output weight per path and channel
    mlp = first["radial_mlp"]
    assert len(mlp) == cfg.radial_mlp_layers + 1
    assert mlp[f"Dense_{cfg.radial_mlp_layers}"]["kernel"].shape[-1] == (cfg.l_max + 1) * cfg.num_features


def test_tensor_product_constant_matches_e3nn():
    """The dense CG constant reproduces e3nn.tensor_product (path by path, with the documented column order)."""
    irreps_in, l_max, target = "0e+1o", 2, natural_irreps(2)
    cg, irreps_mid, path_of_column = _tensor_product_constants(irreps_in, l_max, str(target))
    rng = np.random.default_rng(0)
    x = rng.normal(size=e3nn.Irreps(irreps_in).dim)
    y = rng.normal(size=natural_irreps(l_max).dim)
    ours = np.einsum("i,j,ijk->k", x, y, cg)
    ref = e3nn.tensor_product(
        e3nn.IrrepsArray(irreps_in, x), e3nn.IrrepsArray(natural_irreps(l_max), y), filter_ir_out=target
    )
    assert e3nn.Irreps(irreps_mid) == ref.irreps
    for (ir, start, mul), chunk in zip(_blocks(e3nn.Irreps(irreps_mid)), ref.chunks, strict=True):
        block = ours[start : start + mul * ir.dim].reshape(ir.dim, mul).T  # ours: component-major
        np.testing.assert_allclose(block, np.asarray(chunk), atol=1e-12)
        assert len(set(path_of_column[start : start + mul * ir.dim])) == mul
    assert path_of_column.max() + 1 == e3nn.Irreps(irreps_mid).num_irreps


# ---------------------------------------------------------------------------------------- symmetric contraction
A_IRREPS = "0e+1o+2e"


def _contraction(irreps_out: str, correlation: int, channels: int = 3):
    module = SymmetricContraction(A_IRREPS, irreps_out, correlation, NUM_SPECIES)
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(5, e3nn.Irreps(A_IRREPS).dim, channels)))
    onehot = jax.nn.one_hot(jnp.array([0, 1, 2, 1, 0]), NUM_SPECIES, dtype=a.dtype)
    params = module.init(jax.random.PRNGKey(3), a, onehot)
    return module, params, a, onehot


def _rotate(irreps: str | e3nn.Irreps, rot: np.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Apply the representation of ``rot`` (det ±1) to ``x [n, D, C]``."""
    d = np.asarray(e3nn.Irreps(irreps).D_from_matrix(jnp.asarray(rot)))
    return jnp.einsum("ij,njc->nic", d, x)


@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "rotoinversion"])
def test_symmetric_contraction_is_o3_equivariant(improper):
    module, params, a, onehot = _contraction("0e+1o+2e", correlation=3)
    assert module.output_irreps == e3nn.Irreps("0e+1o+2e")
    rot = random_rotation(np.random.default_rng(4), improper)
    out = module.apply(params, a, onehot)
    assert out.shape == (5, 9, 3) and np.max(np.abs(out)) > 1e-2
    out_rot = module.apply(params, _rotate(A_IRREPS, rot, a), onehot)
    np.testing.assert_allclose(out_rot, _rotate(module.output_irreps, rot, out), atol=1e-10)


def test_symmetric_contraction_matches_dense_definition():
    """Monomial folding and pruning reproduce Σ_ν Σ_k W[s, k, c] Σ_{i..} (U_ν/ν)[i.., k, m] A_i..A_i.."""
    module, params, a, onehot = _contraction("0e+1o", correlation=3)
    out = np.asarray(module.apply(params, a, onehot))
    species = np.argmax(np.asarray(onehot), axis=1)
    weights = params["params"]
    expected = np.zeros_like(out)
    letters = "pqrs"
    for nu in (1, 2, 3):
        u = e3nn.reduced_symmetric_tensor_product_basis(e3nn.Irreps(A_IRREPS), nu, keep_ir=["0e", "1o"])
        for (_, ir), chunk, start in zip(u.irreps, u.chunks, (0, 1), strict=True):
            idx = letters[:nu]
            term = np.einsum(
                f"{idx}km,{','.join(f'n{i}c' for i in idx)}->nkmc", np.asarray(chunk) / nu, *([np.asarray(a)] * nu)
            )
            w = np.asarray(weights[f"w{nu}_{ir}"])[species]  # [n, k, c]
            expected[:, start : start + ir.dim, :] += np.einsum("nkmc,nkc->nmc", term, w)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_symmetric_contraction_in_atom_blocks_is_the_same():
    """Atoms in blocks (lax.map + remat, last block padded) give the same values, parameter gradients and
    second derivatives as one call."""
    module, params, a, onehot = _contraction("0e+1o", correlation=3)
    blocked = module.clone(node_chunk_size=2)  # 5 atoms: blocks of 2, 2 and 1 + padding
    np.testing.assert_allclose(blocked.apply(params, a, onehot), module.apply(params, a, onehot), rtol=0, atol=1e-13)

    def loss(m, p, x):
        return jnp.sum(jnp.sin(m.apply(p, x, onehot)))

    g_ref, g_out = jax.grad(loss, argnums=1)(module, params, a), jax.grad(loss, argnums=1)(blocked, params, a)
    for x, y in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-12)

    def hvp(m):
        return jax.jvp(lambda x: jax.grad(loss, argnums=2)(m, params, x), (a,), (a,))[1]

    np.testing.assert_allclose(hvp(blocked), hvp(module), rtol=0, atol=1e-11)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_contraction_order_is_polynomial_degree(nu):
    """With only the order-ν weights non-zero, scaling A by λ scales the output by λ^ν."""
    module, params, a, onehot = _contraction("0e+1o", correlation=3)
    only_nu = jax.tree_util.tree_map_with_path(
        lambda path, w: w if path[-1].key.startswith(f"w{nu}_") else jnp.zeros_like(w), params
    )
    out = module.apply(only_nu, a, onehot)
    assert np.max(np.abs(out)) > 1e-3
    lam = 1.7
    np.testing.assert_allclose(module.apply(only_nu, lam * a, onehot), lam**nu * out, rtol=1e-10, atol=1e-12)


def test_correlation_changes_the_output():
    _, p1, a, onehot = _contraction("0e", correlation=1)
    module3, p3, _, _ = _contraction("0e", correlation=3)
    assert set(p3["params"]) == {"w1_0e", "w2_0e", "w3_0e"} and set(p1["params"]) == {"w1_0e"}
    out3 = module3.apply(p3, a, onehot)
    truncated = {"params": {k: (v if k == "w1_0e" else jnp.zeros_like(v)) for k, v in p3["params"].items()}}
    out1 = module3.apply(truncated, a, onehot)
    assert np.max(np.abs(out3 - out1)) > 1e-3  # orders 2 and 3 contribute


# ---------------------------------------------------------------------------------------- whole network
def _graph(positions: np.ndarray, n_pad_edges: int = 2):
    """All pairs within R_MAX (both directions), plus padding edges on an extra padding node."""
    n = len(positions)
    pairs = [
        (i, j) for i, j in itertools.permutations(range(n), 2) if np.linalg.norm(positions[i] - positions[j]) < R_MAX
    ]
    senders = np.array([j for _, j in pairs] + [n] * n_pad_edges, np.int32)
    receivers = np.array([i for i, _ in pairs] + [n] * n_pad_edges, np.int32)
    pos = np.concatenate([positions, np.zeros((1, 3))])
    vectors = pos[senders] - pos[receivers]
    mask = np.arange(len(senders)) < len(pairs)
    return jnp.asarray(vectors), senders, receivers, jnp.asarray(mask)


def _apply(cfg: MACEConfig, positions: np.ndarray, species: np.ndarray, params=None, **kwargs):
    module = cfg.build(num_species=NUM_SPECIES, r_max=R_MAX, avg_num_neighbours=3.0)
    vectors, senders, receivers, mask = _graph(positions)
    species = jnp.asarray(np.concatenate([species, [0]]), jnp.int32)
    if params is None:  # random weights ~ N(0, 1/fan_in) without compiling the (slow) random initialisers
        shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), vectors, species, senders, receivers, mask)
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[-2]), x.dtype), shapes)
    apply = jax.jit(functools.partial(module.apply, **kwargs))
    return apply(params, vectors, species, senders, receivers, mask), params


TINY = {"num_features": 4, "radial_mlp_hidden": 8, "radial_mlp_layers": 1, "readout_mlp_hidden": 4}


@pytest.mark.parametrize(
    ("kwargs", "sees_angles"),
    [
        ({"num_interactions": 1, "correlation": 1, "l_max": 2}, False),  # one two-body layer
        ({"num_interactions": 1, "correlation": 2, "l_max": 2}, True),  # three-body in one layer
        ({"num_interactions": 1, "correlation": 3, "l_max": 0, "hidden_l_max": 0}, False),  # no angular basis
    ],
    ids=["nu1", "nu2", "lmax0"],
)
def test_body_order_of_one_layer(kwargs, sees_angles):
    """One MACE layer with correlation ν is a (ν+1)-body model: bond angles enter only from ν = 2 on."""
    cfg = MACEConfig(**TINY, **kwargs)
    species = np.array([2, 0, 0])
    e_a, params = _apply(cfg, bent_triatomic(125.0).positions, species)
    e_b, _ = _apply(cfg, bent_triatomic(160.0).positions, species, params)
    gap = abs(float(e_a[0] - e_b[0]))
    if sees_angles:
        assert gap > 1e-6
    else:
        assert gap < 1e-12
        assert abs(float(e_a[1] - e_b[1])) < 1e-12


def _cluster(seed: int = 0, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(-1.5, 1.5, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    return np.array(pos), rng.integers(0, NUM_SPECIES, n)


def test_readouts_sum_to_the_output():
    cfg = MACEConfig(num_interactions=3, l_max=2, hidden_l_max=1, correlation=2, **TINY)
    pos, species = _cluster(1)
    (out, state), _ = _apply(cfg, pos, species, mutable="intermediates")
    readouts = [state["intermediates"][f"readout_{t}"][0] for t in range(cfg.num_interactions)]
    assert len(state["intermediates"]) == cfg.num_interactions
    np.testing.assert_allclose(out, sum(readouts), rtol=1e-12, atol=1e-14)
    for r in readouts:
        assert np.max(np.abs(np.asarray(r)[:-1])) > 1e-4  # every layer contributes


@pytest.mark.parametrize("improper", [False, True], ids=["rotation", "rotoinversion"])
def test_paper_like_irreps_are_invariant(improper):
    """L = 2 hidden features (the paper's rMD17 irreps 0e+1o+2e) and l_max = 3 keep per-atom outputs O(3)-invariant."""
    cfg = MACEConfig(num_interactions=2, l_max=3, hidden_l_max=2, correlation=3, residual_first_layer=True, **TINY)
    pos, species = _cluster(2)
    out, params = _apply(cfg, pos, species)
    first = params["params"]["interaction_0"]
    assert "skip" in first and "species_linear" not in first  # residual first layer (ScaleShiftMACE default)
    assert set(first["symmetric_contraction"]) >= {"w3_0e", "w3_1o", "w3_2e"}
    assert np.max(np.abs(np.asarray(out))) > 1e-3
    rot = random_rotation(np.random.default_rng(7), improper)
    out_rot, _ = _apply(cfg, pos @ rot.T + 0.3, species, params)
    np.testing.assert_allclose(out_rot[:-1], out[:-1], rtol=0, atol=1e-10)


def test_edge_chunk_size_is_a_compute_setting():
    """Chunking changes no parameter: a file written unchunked loads and runs chunked (same tree)."""
    base = MACEConfig(num_features=4, l_max=1, correlation=2, edge_chunk_size=0)
    chunked = MACEConfig(num_features=4, l_max=1, correlation=2, edge_chunk_size=16)
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(40, 3)))
    args = (vectors, jnp.zeros(6, jnp.int32), jnp.arange(40) % 6, (jnp.arange(40) + 1) % 6, jnp.ones(40, bool))
    p0 = base.build(num_species=1, r_max=3.0, avg_num_neighbours=5.0).init(jax.random.PRNGKey(0), *args)
    p1 = chunked.build(num_species=1, r_max=3.0, avg_num_neighbours=5.0).init(jax.random.PRNGKey(0), *args)
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    assert [x.shape for x in jax.tree.leaves(p0)] == [x.shape for x in jax.tree.leaves(p1)]
    with pytest.raises(ValueError, match="edge_chunk_size"):
        MACEConfig(edge_chunk_size=-1)
