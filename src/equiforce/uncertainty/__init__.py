"""Uncertainty: calibration, its report, and what uses it (sample selection for labelling).

The per-prediction computations (committee spread, last-layer prediction rigidity) live with the models in
:mod:`equiforce.potentials.uncertainty`; this package fits and judges them:

* :mod:`~equiforce.uncertainty.calibration`: fit the LLPR of a trained network, fit calibration factors on a
  validation set, and ``equiforce calibrate``; ``recalibrate`` refits them on newly labelled (shifted) frames;
* :mod:`~equiforce.uncertainty.metrics`: Gaussian NLL, miscalibration area, interval coverage, Spearman
  rank correlation, the error of the most uncertain predictions; reliability and σ-versus-error plots;
* :mod:`~equiforce.uncertainty.select`: pick structures to label by uncertainty and diversity.
"""

from equiforce.uncertainty.calibration import (
    UncertaintyError,
    calibrate,
    fit_llpr,
    fit_scale,
    predict_uncertainties,
    recalibrate,
)
from equiforce.uncertainty.metrics import uncertainty_metrics

__all__ = [
    "UncertaintyError",
    "calibrate",
    "fit_llpr",
    "fit_scale",
    "predict_uncertainties",
    "recalibrate",
    "uncertainty_metrics",
]
