"""Error metrics of a potential on a labelled structure set (energy and force MAE/RMSE, stress).

Used for validation during training, for the test set at the end, and by ``equiforce evaluate``. The
predictions themselves come from :mod:`equiforce.potentials.predict` (re-exported here under the same names).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from equiforce.data.structures import StructureSet
from equiforce.potentials.potential import Potential
from equiforce.potentials.predict import Predictions, _predict_fn, e0_sum, padded_batches, predict

__all__ = ["Predictions", "_predict_fn", "compute_metrics", "e0_sum", "evaluate", "padded_batches", "predict"]


def compute_metrics(pred: Predictions) -> dict[str, float]:
    """MAE/RMSE of energy (meV and meV/atom), forces (meV/Å) and stress (meV/Å³) where labels exist."""
    m: dict[str, float] = {}
    if pred.energy_ref is not None:
        de = pred.energy - pred.energy_ref
        dea = de / pred.n_atoms
        m.update(
            energy_mae_meV=1e3 * float(np.mean(np.abs(de))),
            energy_rmse_meV=1e3 * float(np.sqrt(np.mean(de**2))),
            energy_per_atom_mae_meV=1e3 * float(np.mean(np.abs(dea))),
            energy_per_atom_rmse_meV=1e3 * float(np.sqrt(np.mean(dea**2))),
        )
    if pred.forces_ref is not None:
        df = pred.forces - pred.forces_ref
        m.update(
            forces_mae_meV_per_A=1e3 * float(np.mean(np.abs(df))),
            forces_rmse_meV_per_A=1e3 * float(np.sqrt(np.mean(df**2))),
        )
    if pred.stress is not None and pred.stress_ref is not None:
        ok = np.all(np.isfinite(pred.stress_ref), axis=-1)
        if np.any(ok):
            ds = pred.stress[ok] - pred.stress_ref[ok]
            m.update(
                stress_mae_meV_per_A3=1e3 * float(np.mean(np.abs(ds))),
                stress_rmse_meV_per_A3=1e3 * float(np.sqrt(np.mean(ds**2))),
            )
    return m


def evaluate(potential: Potential, params: Any, structures: StructureSet, **kwargs: Any) -> dict[str, float]:
    """:func:`predict` then :func:`compute_metrics`."""
    return compute_metrics(predict(potential, params, structures, **kwargs))
