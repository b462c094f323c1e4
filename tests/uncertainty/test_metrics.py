"""Calibration metrics on errors drawn from a known Gaussian model."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.uncertainty.calibration import UncertaintyError, fit_scale
from equiforce.uncertainty.metrics import uncertainty_metrics


def test_a_true_sigma_is_calibrated_and_ranks_the_errors():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.1, 2.0, 200_000)
    err = sigma * rng.standard_normal(sigma.size)
    m = uncertainty_metrics(err, sigma)
    assert m["coverage_68"] == pytest.approx(0.6827, abs=0.005)
    assert m["coverage_95"] == pytest.approx(0.95, abs=0.003)
    assert m["miscalibration_area"] < 0.005
    expected_nll = np.mean(0.5 * np.log(2 * np.pi * sigma**2)) + 0.5
    assert m["nll"] == pytest.approx(expected_nll, abs=0.01)
    assert m["spearman"] > 0.3
    top = np.sort(sigma)[-20_000:]
    assert m["mae_top10"] == pytest.approx(np.sqrt(2 / np.pi) * top.mean(), rel=0.02)  # E|ε| = σ sqrt(2/π)
    assert m["mae_rest"] == pytest.approx(np.sqrt(2 / np.pi) * np.sort(sigma)[:-20_000].mean(), rel=0.02)


def test_a_wrong_sigma_shows_up():
    rng = np.random.default_rng(1)
    sigma = np.full(100_000, 0.5)
    err = sigma * rng.standard_normal(sigma.size)
    good = uncertainty_metrics(err, sigma)
    over = uncertainty_metrics(err, 2 * sigma)
    under = uncertainty_metrics(err, 0.5 * sigma)
    assert over["coverage_68"] > 0.9 and under["coverage_68"] < 0.4
    assert over["miscalibration_area"] > 0.1 and under["miscalibration_area"] > 0.1
    assert good["nll"] < over["nll"] and good["nll"] < under["nll"]
    assert np.isnan(good["spearman"])  # a constant σ ranks nothing
    # the maximum-likelihood scale recovers the factor
    assert fit_scale(err, 0.5 * sigma) == pytest.approx(2.0, rel=0.01)


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        uncertainty_metrics(np.ones(3), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="matching"):
        uncertainty_metrics(np.ones(3), np.ones(4))
    with pytest.raises(UncertaintyError):
        fit_scale(np.zeros(3), np.ones(3))
