"""Power-law recalibration of σ (issue 29 §4): the fit against synthetic data with a known law, and
``recalibrate`` on a model against an independent computation of what the calibrated σ must be."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from equiforce.data.structures import StructureSet
from equiforce.potentials import Potential
from equiforce.potentials.uncertainty import UncertaintyConfig
from equiforce.uncertainty.calibration import (
    UncertaintyError,
    fit_power_law,
    fit_scale,
    fit_structure_power_law,
    predict_uncertainties,
    recalibrate,
)
from tests.potentials.property_suite import MODEL_TEST_CASES, molecule

Z95 = stats.norm.ppf(0.975)


def _synthetic(rng: np.random.Generator, n: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw σ log-uniform over a decade (0.02–0.2 eV/Å) and Gaussian errors of standard deviation a·σ^b."""
    sigma = np.exp(rng.uniform(np.log(0.02), np.log(0.2), n))
    return a * sigma**b * rng.standard_normal(n), sigma


@pytest.mark.parametrize(("a", "b"), [(0.9, 1.0), (6.0, 2.0), (0.3, 0.6)])
def test_power_law_fit_recovers_a_known_exponent_and_covers_held_out_data(a, b):
    rng = np.random.default_rng(29)
    err, sig = _synthetic(rng, 20_000, a, b)
    a_fit, b_fit = fit_power_law(err, sig)
    assert abs(b_fit - b) < 0.03
    assert abs(a_fit / a - 1) < 0.1
    # held-out data drawn independently from the same law: 95 % of errors inside ±1.96 a σ^b, at low and high σ
    err_h, sig_h = _synthetic(np.random.default_rng(30), 20_000, a, b)
    inside = np.abs(err_h) <= Z95 * a_fit * sig_h**b_fit
    assert 0.94 < inside.mean() < 0.96
    top = sig_h > np.quantile(sig_h, 0.9)
    assert 0.93 < inside[top].mean() < 0.97


def test_one_scale_factor_cannot_cover_the_tails_the_power_law_covers():
    """The failure the power law exists for: σ_raw rising too little (b = 2). One scale factor fitted on the same
    data covers the large-σ errors far less than 95 %, so the test above would fail with b fixed to 1."""
    err, sig = _synthetic(np.random.default_rng(31), 20_000, 6.0, 2.0)
    s = fit_scale(err, sig)
    top = sig > np.quantile(sig, 0.9)
    assert np.mean(np.abs(err[top]) <= Z95 * s * sig[top]) < 0.85


def _synthetic_structures(rng: np.random.Generator, n_struct: int, a: float, b: float, q: float):
    """9-atom structures: a structure level of σ log-uniform over a factor 4, atoms scattered ×/÷ 2 around it;
    force errors of standard deviation a·σ_i^b·σ̄_s^q, σ̄_s the structure's mean σ (computed here with numpy)."""
    n_atoms = np.full(n_struct, 9)
    level = np.exp(rng.uniform(np.log(0.03), np.log(0.12), n_struct))
    sigma = np.repeat(level, 9) * np.exp(rng.uniform(-np.log(2), np.log(2), 9 * n_struct))
    bar = np.repeat(sigma.reshape(n_struct, 9).mean(1), 9)
    err = (a * sigma**b * bar**q)[:, None] * rng.standard_normal((9 * n_struct, 3))
    return err, sigma, bar, n_atoms


def test_structure_power_law_recovers_known_exponents_and_covers_held_out_structures():
    """σ rising with the structure more steeply (b + q = 2) than between atoms (b = 0.8): the fit finds both,
    and its σ covers 95 % of held-out errors, also on the structures with the largest σ̄ (the shifted ones)."""
    a, b, q = 20.0, 0.8, 1.2
    err, sigma, _, n_atoms = _synthetic_structures(np.random.default_rng(40), 3000, a, b, q)
    a_fit, b_fit, q_fit = fit_structure_power_law(err, sigma, n_atoms)
    assert abs(b_fit - b) < 0.05 and abs(q_fit - q) < 0.1
    err_h, sig_h, bar_h, _ = _synthetic_structures(np.random.default_rng(41), 3000, a, b, q)
    inside = np.abs(err_h) <= Z95 * (a_fit * sig_h**b_fit * bar_h**q_fit)[:, None]
    assert 0.94 < inside.mean() < 0.96
    top = bar_h > np.quantile(bar_h, 0.9)
    assert 0.93 < inside[top].mean() < 0.97
    # the atom-level power law alone (q = 0) fitted on the same data misses the high-σ̄ structures
    a1, b1 = fit_power_law(err, np.repeat(sigma[:, None], 3, axis=1))
    assert np.mean(np.abs(err_h[top]) <= Z95 * (a1 * sig_h[top] ** b1)[:, None]) < 0.9


def test_power_law_fit_bad_input():
    with pytest.raises(UncertaintyError, match="positive uncertainty"):
        fit_power_law(np.ones(4), np.zeros(4))
    with pytest.raises(UncertaintyError, match="all zero"):
        fit_power_law(np.zeros(4), np.ones(4))
    with pytest.raises(UncertaintyError, match="differ in size"):
        fit_power_law(np.ones(4), np.ones(3))
    # no spread of σ: b is not determined, so the fit is one scale factor
    assert fit_power_law(np.array([1.0, -3.0]), np.array([2.0, 2.0]))[1] == 1.0


def test_exponent_must_be_positive():
    with pytest.raises(ValueError, match="forces_exponent"):
        UncertaintyConfig("llpr", forces_exponent=0.0)
    with pytest.raises(ValueError, match="forces_structure_exponent"):
        UncertaintyConfig("llpr", forces_structure_exponent=float("nan"))
    with pytest.raises(UncertaintyError, match="must match"):
        fit_structure_power_law(np.ones((5, 3)), np.ones(5), np.array([2, 2]))


def _labelled_frames() -> StructureSet:
    """Six random molecules with made-up labels: a harmonic pull of every atom towards its molecule's centre."""
    s = StructureSet.concatenate([molecule(k, 7) for k in range(6)])
    centre = np.concatenate([np.repeat(s.positions[s.atom_slice(k)].mean(0, keepdims=True), 7, 0) for k in range(6)])
    energy = np.array([0.4 * np.sum((s.positions[s.atom_slice(k)] - centre[s.atom_slice(k)]) ** 2) for k in range(6)])
    return dataclasses.replace(s, energy=energy, forces=-0.8 * (s.positions - centre))


def test_recalibrate_a_committee_gives_the_power_law_of_its_raw_spread():
    """The recalibrated model's σ_F equals a·σ_raw,i^b·σ̄_raw,s^q of the uncalibrated model's σ (independent
    prediction, structure means by numpy over the real atoms only, so padding must not enter), and the reported
    coverages are those of the predictions before and after."""
    jax.config.update("jax_enable_x64", True)
    frames = _labelled_frames()
    pot = Potential(
        model=MODEL_TEST_CASES["schnet"].config,
        species=(1, 6, 8),
        r_max=4.0,
        atomic_energies=(-1.0, -2.0, -3.0),
        dtype="float64",
        ensemble_size=2,
        uncertainty=UncertaintyConfig("committee", forces_scale=2.0, energy_scale=3.0),
    )
    params = pot.init(jax.random.PRNGKey(3))
    new_pot, new_params, record = recalibrate(pot, params, frames, min_energy_structures=100)
    cfg = new_pot.uncertainty_config
    assert record["forces"]["exponent"] == cfg.forces_exponent != 1.0
    assert cfg.energy_exponent == 1.0  # fewer frames than min_energy_structures: one scale factor
    raw = predict_uncertainties(pot.replace(uncertainty=UncertaintyConfig("committee")), params, frames)
    new = predict_uncertainties(new_pot, new_params, frames)
    assert cfg.forces_structure_exponent == record["forces"]["structure_exponent"] != 0.0
    bar = np.repeat(raw.forces_uncertainty.reshape(6, 7).mean(1), 7)
    expected = cfg.forces_scale * raw.forces_uncertainty**cfg.forces_exponent * bar**cfg.forces_structure_exponent
    np.testing.assert_allclose(new.forces_uncertainty, expected, rtol=1e-9)
    np.testing.assert_allclose(new.energy_uncertainty, cfg.energy_scale * raw.energy_uncertainty, rtol=1e-9)
    err = np.abs(new.forces - frames.forces)
    np.testing.assert_allclose(raw.forces, new.forces, atol=1e-12)
    for sigma, key in (
        (2.0 * raw.forces_uncertainty, "coverage_95_before"),
        (new.forces_uncertainty, "coverage_95_after"),
    ):
        assert record["forces"][key] == pytest.approx(np.mean(err <= Z95 * sigma[:, None]))
    assert record["forces"]["nll_after"] <= record["forces"]["nll_before"]


def test_recalibrate_bad_input():
    jax.config.update("jax_enable_x64", True)
    pot = Potential(
        model=MODEL_TEST_CASES["schnet"].config, species=(1, 6, 8), r_max=4.0, atomic_energies=(0.0, 0.0, 0.0)
    )
    # both are refused before any prediction, so no parameters are needed
    with pytest.raises(UncertaintyError, match="no uncertainty"):
        recalibrate(pot, {}, _labelled_frames())
    unlabelled = dataclasses.replace(_labelled_frames(), energy=None, forces=None)
    with pytest.raises(UncertaintyError, match="labels"):
        recalibrate(pot.replace(ensemble_size=2), {}, unlabelled)
    with pytest.raises(UncertaintyError, match="StructureSet or a list"):
        recalibrate(pot.replace(ensemble_size=2), {}, 3)
