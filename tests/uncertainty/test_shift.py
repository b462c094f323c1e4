"""Distribution shift: σ must rise where the error rises (issue 13, section 3)."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.benchmark.shift import stretched
from equiforce.uncertainty.calibration import predict_uncertainties
from equiforce.uncertainty.metrics import forces_per_structure


@pytest.fixture(params=["committee", "llpr"])
def model(request):
    return request.getfixturevalue(request.param)


def test_sigma_rises_on_high_energy_frames_where_the_error_rises(model, shift_data):
    potential, params = model
    pred_in = predict_uncertainties(potential, params, shift_data["in"])
    pred_high = predict_uncertainties(potential, params, shift_data["high"])
    rmse_in, sigma_in = forces_per_structure(pred_in)
    rmse_high, sigma_high = forces_per_structure(pred_high)
    assert rmse_high.mean() > 1.1 * rmse_in.mean()  # the premise: the shifted frames are harder
    assert sigma_high.mean() > 1.1 * sigma_in.mean()
    # over both sets together, structures with larger σ_F have larger force errors
    from scipy.stats import spearmanr

    rho = spearmanr(np.concatenate([sigma_in, sigma_high]), np.concatenate([rmse_in, rmse_high])).statistic
    assert rho > 0.2


def test_sigma_rises_on_stretched_bonds(model, shift_data):
    potential, params = model
    base = shift_data["in"].subset(np.arange(20))
    far = stretched(base, 0.4, seed=0)
    s_base = predict_uncertainties(potential, params, base).forces_uncertainty.reshape(20, -1)
    s_far = predict_uncertainties(potential, params, far).forces_uncertainty.reshape(20, -1)
    assert np.median(s_far.max(axis=1) / s_base.max(axis=1)) > 1.2
