"""How good an uncertainty is: calibration and ranking metrics, and their plots.

For errors ``ε`` and predicted standard deviations ``σ`` (a Gaussian error model ``ε ~ N(0, σ²)``):

* ``nll``: mean Gaussian negative log-likelihood ``½ log(2πσ²) + ε²/(2σ²)`` (lower is better);
* ``miscalibration_area``: the area between the observed and the expected fraction of errors inside the
  central interval of every confidence level ``p`` (``|ε| ≤ z_p σ``), averaged over ``p ∈ (0, 1)``
  (0 for a perfectly calibrated σ; K. Tran et al., Mach. Learn.: Sci. Technol. 1, 025006 (2020),
  arXiv:1912.10066);
* ``coverage_68`` / ``coverage_95``: fraction of errors inside ``±1 σ`` and ``±1.96 σ`` (0.683 and 0.95 ideally);
* ``spearman``: Spearman rank correlation between σ and ``|ε|`` (does σ rank the errors?);
* ``mae_top10`` / ``mae_rest``: mean ``|ε|`` among the 10 % largest σ and among the rest.

Energies are judged per structure (eV), forces per Cartesian component (eV/Å) with the atom's σ_F.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from scipy import stats

from equiforce.figures import pyplot, save_png

__all__ = [
    "forces_per_structure",
    "per_structure_mean",
    "plot_reliability",
    "plot_sigma_vs_error",
    "uncertainty_metrics",
    "uncertainty_report",
]

_LEVELS = np.linspace(0.01, 0.99, 99)


def uncertainty_metrics(errors: np.ndarray, sigma: np.ndarray) -> dict[str, float]:
    """The metrics of the module doc for matching 1-d arrays of errors and σ (same unit).

    Raises:
      ValueError: different lengths, fewer than 2 values, or a σ that is not finite and positive.
    """
    err = np.abs(np.asarray(errors, np.float64).ravel())
    sig = np.asarray(sigma, np.float64).ravel()
    if err.shape != sig.shape or err.size < 2:
        raise ValueError(f"need matching errors and sigma with at least 2 values, got {err.shape} and {sig.shape}")
    if not np.all(np.isfinite(sig) & (sig > 0)):
        raise ValueError("every sigma must be finite and positive")
    z = err / sig
    nll = float(np.mean(0.5 * np.log(2 * np.pi * sig**2) + 0.5 * z**2))
    observed = _observed_fractions(z)
    area = float(np.mean(np.abs(observed - _LEVELS)))
    order = np.argsort(sig)
    n_top = max(1, round(0.1 * err.size))
    top, rest = order[-n_top:], order[:-n_top]
    rho = stats.spearmanr(sig, err).statistic if np.ptp(sig) > 0 else float("nan")
    return {
        "nll": nll,
        "miscalibration_area": area,
        "coverage_68": float(np.mean(z <= 1.0)),
        "coverage_95": float(np.mean(z <= stats.norm.ppf(0.975))),
        "spearman": float(rho),
        "mae_top10": float(np.mean(err[top])),
        "mae_rest": float(np.mean(err[rest])) if rest.size else float("nan"),
        "mean_sigma": float(np.mean(sig)),
        "rmse": float(np.sqrt(np.mean(err**2))),
    }


def _observed_fractions(z: np.ndarray) -> np.ndarray:
    """Fraction of ``|ε|/σ`` inside the central interval of each confidence level of :data:`_LEVELS`."""
    limits = stats.norm.ppf(0.5 + 0.5 * _LEVELS)
    return np.mean(z[None, :] <= limits[:, None], axis=1)


def _per_atom_sigma(pred: Any) -> np.ndarray:
    return np.repeat(np.asarray(pred.forces_uncertainty, np.float64), 3)


def uncertainty_report(pred: Any) -> dict[str, Any]:
    """Metrics for energies (per structure, eV) and forces (per component, eV/Å) of an
    :class:`~equiforce.uncertainty.calibration.UncertainPredictions` with labels, plus the Spearman rank
    correlation per structure between the mean σ_F and the force RMSE (``forces_per_structure_spearman``)."""
    out: dict[str, Any] = {}
    if pred.energy_ref is not None:
        out["energy"] = uncertainty_metrics(pred.energy - pred.energy_ref, pred.energy_uncertainty)
    if pred.forces_ref is not None:
        df = np.asarray(pred.forces - pred.forces_ref)
        out["forces"] = uncertainty_metrics(df.ravel(), _per_atom_sigma(pred))
        rmse, mean_sigma = forces_per_structure(pred)
        if rmse.size > 1 and np.ptp(mean_sigma) > 0:
            out["forces_per_structure_spearman"] = float(stats.spearmanr(mean_sigma, rmse).statistic)
    return out


def per_structure_mean(values: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """``[S, ...]`` mean over each structure's atoms of per-atom ``values`` ``[n_atoms_total, ...]`` (structures
    concatenated in order, ``n_atoms`` ``[S]`` each > 0)."""
    n_atoms = np.asarray(n_atoms)
    starts = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    sums = np.add.reduceat(np.asarray(values, np.float64), starts, axis=0)
    return sums / n_atoms.reshape(-1, *([1] * (sums.ndim - 1)))


def forces_per_structure(pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(force RMSE, mean σ_F)`` per structure, eV/Å."""
    df = np.asarray(pred.forces - pred.forces_ref)
    rmse = np.sqrt(per_structure_mean(np.mean(df**2, axis=1), pred.n_atoms))
    return rmse, per_structure_mean(pred.forces_uncertainty, pred.n_atoms)


def plot_reliability(pred: Any, path: str | os.PathLike) -> None:
    """Reliability diagram: observed against expected fraction of errors inside each central interval,
    for energies and forces (the diagonal is perfect calibration). Written as PNG (atomically)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    if pred.energy_ref is not None:
        z = np.abs(pred.energy - pred.energy_ref) / pred.energy_uncertainty
        ax.plot(_LEVELS, _observed_fractions(z), label="energy")
    if pred.forces_ref is not None:
        z = np.abs(np.asarray(pred.forces - pred.forces_ref)).ravel() / _per_atom_sigma(pred)
        ax.plot(_LEVELS, _observed_fractions(z), label="forces")
    ax.set(xlabel="expected fraction inside interval", ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_sigma_vs_error(pred: Any, path: str | os.PathLike) -> None:
    """σ against |error| on log axes, energies (per structure, meV) and forces (per component, meV/Å)."""
    plt = pyplot()
    panels = []
    if pred.energy_ref is not None:
        panels.append(("energy (meV)", pred.energy_uncertainty, np.abs(pred.energy - pred.energy_ref)))
    if pred.forces_ref is not None:
        panels.append(
            ("forces (meV/Å)", _per_atom_sigma(pred), np.abs(np.asarray(pred.forces - pred.forces_ref)).ravel())
        )
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 4.2), squeeze=False)
    for ax, (name, sig, err) in zip(axes[0], panels, strict=False):
        sig, err = 1e3 * np.asarray(sig), np.maximum(1e3 * np.asarray(err), 1e-6)
        ax.scatter(sig, err, s=3, alpha=0.4)
        lo, hi = min(sig.min(), err.min()), max(sig.max(), err.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xscale="log", yscale="log", xlabel=f"σ {name}", ylabel=f"|error| {name}")
    fig.tight_layout()
    save_png(fig, path)
