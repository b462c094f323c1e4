"""Calibration judged on data it was not fitted on (issue 27, item 3).

The committee's scales and the LLPR factors are fitted on the validation frames (``shift_data["valid"]``, from
the shipped training file); here the calibrated σ is judged on frames of the shipped *test* file that neither
training nor calibration saw: in distribution (energies below the training cut), the 95 % interval
``|ε| ≤ 1.96 σ`` must hold 85–99 % of the force components (a σ whose calibration fits only the frames it was
scaled on lands outside). On shifted frames (the highest-energy test frames, above the
97 % energy quantile of the training file) the coverage is printed for the record; only what holds robustly is
asserted there: σ grows with the error, so the force coverage stays above 80 % (energies, 60 and about 30
values, are printed only).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from equiforce.uncertainty.calibration import predict_uncertainties

Z95 = stats.norm.ppf(0.975)


def _coverage(pred) -> tuple[float, float]:
    """(fraction of force components with ``|ε| ≤ 1.96 σ_F``, same for energies), computed here with numpy."""
    dfs = np.abs(pred.forces - pred.forces_ref)
    cov_f = float(np.mean(dfs <= Z95 * pred.forces_uncertainty[:, None]))
    cov_e = float(np.mean(np.abs(pred.energy - pred.energy_ref) <= Z95 * pred.energy_uncertainty))
    return cov_f, cov_e


@pytest.fixture(params=["committee", "llpr"])
def model(request):
    return request.param, request.getfixturevalue(request.param)


def test_calibrated_sigma_covers_held_out_force_errors(model, shift_data):
    name, (potential, params) = model
    held_out = shift_data["in"]
    # the held-out frames are disjoint from those the model was trained and calibrated on
    seen = np.concatenate([shift_data["train"].positions, shift_data["valid"].positions])
    assert not np.any(np.isin(held_out.positions[:, 0], seen[:, 0]))
    figures = {}
    for label, s in (
        ("valid (fitted on)", shift_data["valid"]),
        ("held-out test", held_out),
        ("high-energy test", shift_data["high"]),
    ):
        figures[label] = _coverage(predict_uncertainties(potential, params, s))
    print(f"\n{name}: 95 % coverage of force components / energies")
    for label, (cov_f, cov_e) in figures.items():
        print(f"  {label:>22}: forces {cov_f:.3f}, energies {cov_e:.3f}")
    cov_f, _ = figures["held-out test"]
    assert 0.85 <= cov_f <= 0.99, f"{name}: 95 % interval covers {cov_f:.3f} of held-out force components"
    # shifted: recorded above; asserted only loosely (0.945 committee, 0.910 LLPR when written)
    assert figures["high-energy test"][0] >= 0.8
