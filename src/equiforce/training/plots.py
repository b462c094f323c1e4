"""Parity plots of predicted against reference energies and forces (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from equiforce.training.evaluate import Predictions, compute_metrics

__all__ = ["parity_plot"]


def parity_plot(pred: Predictions, path: str | Path, *, title: str = "") -> Path:
    """Write a two-panel PNG: energy per atom (meV/atom, mean removed from both axes) and force
    components (eV/Å), each with its MAE in the legend. Needs reference labels."""
    if pred.energy_ref is None or pred.forces_ref is None:
        raise ValueError("a parity plot needs reference energies and forces")
    m = compute_metrics(pred)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
    e_ref = pred.energy_ref / pred.n_atoms
    e_pred = pred.energy / pred.n_atoms
    offset = float(np.mean(e_ref))
    ax = axes[0]
    ax.scatter(
        1e3 * (e_ref - offset),
        1e3 * (e_pred - offset),
        s=6,
        alpha=0.6,
        label=f"MAE {m['energy_per_atom_mae_meV']:.2f} meV/atom",
    )
    ax.set_xlabel(f"DFT energy per atom − {offset:.4f} eV  [meV/atom]")
    ax.set_ylabel("predicted  [meV/atom]")
    ax = axes[1]
    ax.scatter(
        pred.forces_ref.ravel(), pred.forces.ravel(), s=2, alpha=0.3, label=f"MAE {m['forces_mae_meV_per_A']:.1f} meV/Å"
    )
    ax.set_xlabel("DFT force component [eV/Å]")
    ax.set_ylabel("predicted [eV/Å]")
    for ax in axes:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
