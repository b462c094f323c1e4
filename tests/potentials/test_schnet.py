"""SchNet-specific behaviour (the generic physics checks live in property_suite.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.potentials import MODELS, SchNetConfig, config_from_dict
from equiforce.potentials.layers import polynomial_envelope
from equiforce.potentials.schnet import SchNetInteraction, cosine_cutoff, gaussian_rbf, shifted_softplus
from tests.potentials.property_suite import (
    MODEL_TEST_CASES,
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
    assert MODELS["schnet"] is SchNetConfig
    cfg = SchNetConfig()
    assert cfg.to_dict()["name"] == "schnet"
    assert config_from_dict(cfg.to_dict()) == cfg
    assert (cfg.num_interactions, cfg.num_features, cfg.num_filters, cfg.num_rbf) == (3, 128, 128, 50)
    assert cfg.cutoff_fn == "polynomial" and cfg.envelope_p == 6 and not cfg.normalise_neighbour_sum


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_interactions": 0},
        {"num_features": 0},
        {"num_filters": 0},
        {"num_rbf": 1},
        {"cutoff_fn": "gaussian"},
        {"cutoff_fn": "Cosine"},
        {"envelope_p": 1},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SchNetConfig(**kwargs)


def _expected_num_params(cfg: SchNetConfig, num_species: int) -> int:
    f, k, g = cfg.num_features, cfg.num_filters, cfg.num_rbf
    interaction = f * k + (g * k + k) + (k * k + k) + (k * f + f) + (f * f + f)
    return num_species * f + cfg.num_interactions * interaction + (f * (f // 2) + f // 2) + (f // 2 + 1)


def test_parameter_tree_follows_config():
    harness = get_harness("schnet")
    params = harness.params["params"]
    cfg = harness.potential.model
    n_species = len(harness.potential.species)
    blocks = sorted(k for k in params if k.startswith("interaction_"))
    assert blocks == [f"interaction_{i}" for i in range(cfg.num_interactions)]
    assert set(params) == {"embedding", "output_hidden", "output", *blocks}
    assert params["embedding"]["kernel"].shape == (n_species, cfg.num_features)
    assert set(params["embedding"]) == {"kernel"}  # bias-free, like an embedding table
    block = params["interaction_0"]
    assert set(block) == {"in2f", "filter_0", "filter_1", "f2out_0", "f2out_1"}
    assert set(block["in2f"]) == {"kernel"}  # schnetpack: in2f has no bias
    assert block["in2f"]["kernel"].shape == (cfg.num_features, cfg.num_filters)
    assert block["filter_0"]["kernel"].shape == (cfg.num_rbf, cfg.num_filters)
    assert block["filter_1"]["kernel"].shape == (cfg.num_filters, cfg.num_filters)
    assert block["f2out_0"]["kernel"].shape == (cfg.num_filters, cfg.num_features)
    assert block["f2out_1"]["kernel"].shape == (cfg.num_features, cfg.num_features)
    assert params["output_hidden"]["kernel"].shape == (cfg.num_features, cfg.num_features // 2)
    assert params["output"]["kernel"].shape == (cfg.num_features // 2, 1)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params == _expected_num_params(cfg, n_species)


def test_parameter_count_of_a_large_config():
    cfg = SchNetConfig(num_interactions=6, num_features=128, num_filters=128, num_rbf=50)
    pot = get_harness("schnet").potential.replace(model=cfg, dtype="float32")
    template = jax.eval_shape(lambda: pot.init(jax.random.PRNGKey(0)))
    assert sum(x.size for x in jax.tree.leaves(template)) == _expected_num_params(cfg, 3) == 443_393  # 3 species


def test_shifted_softplus():
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.linspace(-30.0, 30.0, 121, dtype=dtype)
        y = shifted_softplus(x)
        assert y.dtype == dtype
        assert shifted_softplus(jnp.zeros((), dtype)) == 0.0
        assert np.all(np.diff(np.asarray(y)) >= 0)  # non-decreasing (saturates in float32 at -30)
        assert np.all(np.diff(np.asarray(y)[50:71]) > 0)  # strictly increasing on [-5, 5]
        np.testing.assert_allclose(np.asarray(y)[-1], 30.0 - math.log(2.0), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y)[0], -math.log(2.0), rtol=1e-6)
    assert jax.grad(shifted_softplus)(0.0) == pytest.approx(0.5)


def test_gaussian_rbf_shape_and_centres():
    num_rbf, r_max = 6, 5.0
    centres = np.linspace(0.0, r_max, num_rbf)
    for dtype in (jnp.float32, jnp.float64):
        rbf = gaussian_rbf(jnp.asarray(centres, dtype), num_rbf, r_max)
        assert rbf.shape == (num_rbf, num_rbf) and rbf.dtype == dtype
        # Gaussian k peaks (value 1) at centre k ...
        np.testing.assert_allclose(np.diag(np.asarray(rbf)), 1.0, rtol=1e-6)
        assert np.array_equal(np.argmax(np.asarray(rbf), axis=1), np.arange(num_rbf))
    # ... with width = spacing: exp(-(Δ/2)^2 / (2 Δ^2)) = exp(-1/8) half-way between two centres
    spacing = r_max / (num_rbf - 1)
    mid = gaussian_rbf(jnp.asarray([0.5 * spacing]), num_rbf, r_max)
    np.testing.assert_allclose(np.asarray(mid)[0, :2], math.exp(-1.0 / 8.0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gaussian_rbf(jnp.asarray([spacing]), num_rbf, r_max))[0, 0], math.exp(-0.5))
    with pytest.raises(ValueError, match="num_rbf"):
        gaussian_rbf(jnp.asarray([1.0]), 1, r_max)


def test_cosine_cutoff_value_and_slope_vanish_at_r_max():
    r_max = 4.0
    f = lambda r: cosine_cutoff(r, r_max)  # noqa: E731
    assert f(jnp.asarray(0.0)) == pytest.approx(1.0)
    assert f(jnp.asarray(r_max / 2)) == pytest.approx(0.5)
    r = jnp.linspace(0.0, 2 * r_max, 81)
    values = np.asarray(f(r))
    assert np.all(np.diff(values[r < r_max]) < 0) and np.all(values[np.asarray(r) >= r_max] == 0.0)
    df = jax.grad(f)
    for r0 in (r_max, r_max + 0.1):
        assert f(jnp.asarray(r0)) == 0.0 and df(jnp.asarray(r0)) == 0.0
    for delta in (1e-2, 1e-3, 1e-4):  # zero slope at r_max: f ~ (π δ / r_max)^2 / 4, f' ~ -π^2 δ / (2 r_max^2)
        x = jnp.asarray(r_max - delta)
        assert float(f(x)) == pytest.approx((math.pi * delta / r_max) ** 2 / 4, rel=1e-3)
        assert float(df(x)) == pytest.approx(-(math.pi**2) * delta / (2 * r_max**2), rel=1e-3)
    assert cosine_cutoff(jnp.ones(3, jnp.float32), r_max).dtype == jnp.float32


def test_polynomial_cutoff_is_smoother_than_cosine():
    """The default envelope also has zero curvature at r_max (force ~ δ², not ~ δ)."""
    r_max, delta = 3.0, 1e-3
    x = jnp.asarray(r_max - delta)
    poly_slope = jax.grad(lambda r: polynomial_envelope(r / r_max, 6))(x)
    cos_slope = jax.grad(lambda r: cosine_cutoff(r, r_max))(x)
    assert abs(float(poly_slope)) < 1e-5 < abs(float(cos_slope))


# ----------------------------------------------------------------------------- whole-model checks
COSINE = SchNetConfig(num_interactions=2, num_features=8, num_filters=8, num_rbf=8, cutoff_fn="cosine")


@pytest.fixture(scope="module")
def cosine_harness() -> Harness:
    return Harness(ModelTestCase(COSINE))


def test_suite_case_is_the_default_cutoff():
    assert MODEL_TEST_CASES["schnet"].config.cutoff_fn == SchNetConfig().cutoff_fn == "polynomial"


def test_cutoff_choice_changes_outputs(cosine_harness):
    default = get_harness("schnet")
    assert jax.tree.structure(default.params) == jax.tree.structure(cosine_harness.params)
    s = molecule(0)
    a = default.evaluate(s)
    b = cosine_harness.evaluate(s, params=default.params)  # same weights, other cutoff
    assert np.max(np.abs(a.node_energies - b.node_energies)) > 1e-4
    assert np.max(np.abs(a.forces - b.forces)) > 1e-4


def test_cosine_variant_symmetries_and_forces(cosine_harness):
    s = molecule(4)
    graphs = build_neighbour_graphs(s, R_MAX)
    ref = cosine_harness.evaluate(s, graphs)
    assert np.max(np.abs(ref.forces)) > 1e-3
    rng = np.random.default_rng(7)
    for improper in (False, True):
        assert_o3_equivariant(cosine_harness, s, random_rotation(rng, improper), 2.0)
    h, (i, a) = 1e-5, (2, 1)
    plus, minus = s.positions.copy(), s.positions.copy()
    plus[i, a] += h
    minus[i, a] -= h
    e_p = cosine_harness.evaluate(transformed(s, plus), graphs).energy[0]
    e_m = cosine_harness.evaluate(transformed(s, minus), graphs).energy[0]
    assert ref.forces[i, a] == pytest.approx(-(e_p - e_m) / (2 * h), rel=1e-6, abs=1e-9)


def test_cosine_variant_goes_to_zero_at_r_max(cosine_harness):
    """Energy gap ~ δ² and force ~ δ: continuous, but slower than the default envelope."""
    direction = np.array([1.0, 2.0, -2.0]) / 3.0

    def dimer(r):
        return structure([6, 8], np.array([np.zeros(3), r * direction]))

    far = cosine_harness.evaluate(dimer(R_MAX + 1e-6))
    assert np.all(far.forces == 0.0)
    gaps, forces = [], []
    for delta in (1e-2, 1e-3, 1e-4):
        near = cosine_harness.evaluate(dimer(R_MAX - delta))
        gaps.append(abs(near.energy[0] - far.energy[0]))
        forces.append(np.max(np.abs(near.forces)))
    assert gaps[2] < 1e-10 and forces[2] < 1e-6
    assert 30 < gaps[1] / gaps[2] < 300 and 3 < forces[1] / forces[2] < 30


def test_only_distances_within_r_max_matter():
    """SchNet sees distances only: the bond angle is invisible while the H–H pair is beyond r_max."""
    harness = get_harness("schnet")
    a, b = harness.evaluate(bent_triatomic(125.0)), harness.evaluate(bent_triatomic(160.0))
    assert a.energy[0] == pytest.approx(b.energy[0], abs=1e-12)
    np.testing.assert_allclose(a.node_energies, b.node_energies, rtol=0, atol=1e-12)
    assert np.max(np.abs(a.forces)) > 1e-3


def _module_inputs(dtype=jnp.float64, n_pad_edges: int = 0, pad_vector: float = 0.0):
    """A 3-atom chain (plus one padding node) as raw module inputs, with optional masked edges."""
    pos = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [1.5, 1.2, 0.3], [0.0, 0.0, 0.0]])
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    senders = np.array([s for s, _ in pairs] + [3] * n_pad_edges)
    receivers = np.array([r for _, r in pairs] + [3] * n_pad_edges)
    vectors = pos[senders] - pos[receivers]
    vectors[len(pairs) :] = pad_vector
    mask = np.arange(len(senders)) < len(pairs)
    species = np.array([0, 1, 2, 0])
    return jnp.asarray(vectors, dtype), jnp.asarray(species), jnp.asarray(senders), jnp.asarray(receivers), mask


def test_masked_edges_contribute_nothing():
    module = SchNetConfig(num_interactions=2, num_features=8, num_filters=8, num_rbf=8).build(
        num_species=3, r_max=R_MAX, avg_num_neighbours=2.0
    )
    params = module.init(jax.random.PRNGKey(1), *_module_inputs())
    ref = module.apply(params, *_module_inputs())
    for pad_vector in (0.0, 0.7):  # zero vectors (convention) and non-zero garbage inside r_max
        out = module.apply(params, *_module_inputs(n_pad_edges=5, pad_vector=pad_vector))
        np.testing.assert_array_equal(np.asarray(out)[:3], np.asarray(ref)[:3])
        np.testing.assert_array_equal(np.asarray(out)[3], np.asarray(ref)[3])
    grads = jax.grad(lambda v: module.apply(params, v, *_module_inputs(n_pad_edges=5)[1:]).sum())(
        _module_inputs(n_pad_edges=5)[0]
    )
    assert np.all(np.isfinite(np.asarray(grads))) and np.all(np.asarray(grads)[6:] == 0.0)


def test_float32_inputs_give_float32_outputs():
    module = SchNetConfig(num_interactions=1, num_features=4, num_filters=6, num_rbf=5).build(
        num_species=3, r_max=R_MAX, avg_num_neighbours=2.0
    )
    inputs = _module_inputs(jnp.float32)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), module.init(jax.random.PRNGKey(0), *inputs))
    assert module.apply(params, *inputs).dtype == jnp.float32


def test_normalise_neighbour_sum():
    """With the flag, each neighbour sum is divided by avg_num_neighbours (same as scaling the filters)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    rbf = jax.random.uniform(jax.random.PRNGKey(1), (7, 3))
    cut = jax.random.uniform(jax.random.PRNGKey(2), (7,))
    senders, receivers = jnp.array([0, 1, 2, 3, 1, 2, 0]), jnp.array([1, 0, 0, 2, 3, 3, 2])
    plain, normed = SchNetInteraction(5, 6), SchNetInteraction(5, 6, norm=4.0)
    params = plain.init(jax.random.PRNGKey(3), x, rbf, cut, senders, receivers)
    a = normed.apply(params, x, rbf, cut, senders, receivers)
    b = plain.apply(params, x, rbf, cut / 4.0, senders, receivers)
    c = plain.apply(params, x, rbf, cut, senders, receivers)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(np.asarray(a - c))) > 1e-3
    # the config flag switches it on, using the potential's avg_num_neighbours
    inputs = _module_inputs()
    cfg = SchNetConfig(num_interactions=2, num_features=8, num_filters=8, num_rbf=8)
    on = SchNetConfig(**{**cfg.__dict__, "normalise_neighbour_sum": True})
    params = cfg.build(num_species=3, r_max=R_MAX, avg_num_neighbours=3.0).init(jax.random.PRNGKey(0), *inputs)
    out = {
        (flag.normalise_neighbour_sum, avg): flag.build(num_species=3, r_max=R_MAX, avg_num_neighbours=avg).apply(
            params, *inputs
        )
        for flag in (cfg, on)
        for avg in (1.0, 3.0)
    }
    np.testing.assert_array_equal(out[(False, 1.0)], out[(False, 3.0)])  # flag off: avg is ignored
    np.testing.assert_allclose(out[(True, 1.0)], out[(False, 1.0)], rtol=1e-12)
    assert np.max(np.abs(np.asarray(out[(True, 3.0)] - out[(False, 3.0)]))) > 1e-4
