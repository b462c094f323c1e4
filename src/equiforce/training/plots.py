"""Training plots (matplotlib, no display needed): parity of predicted against reference energies and
forces, and the learning curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from equiforce.figures import pyplot, save_png
from equiforce.training.evaluate import Predictions, compute_metrics

__all__ = ["learning_curve_plot", "parity_plot"]


def parity_plot(pred: Predictions, path: str | Path, *, title: str = "") -> Path:
    """Write a two-panel PNG: energy per atom (meV/atom, mean removed from both axes) and force
    components (eV/Å), each with its MAE in the legend. Needs reference labels."""
    if pred.energy_ref is None or pred.forces_ref is None:
        raise ValueError("a parity plot needs reference energies and forces")
    m = compute_metrics(pred)
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4.6), constrained_layout=True)
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
    return save_png(fig, path)


def learning_curve_plot(history: list[dict], path: str | Path) -> dict[str, np.ndarray]:
    """Write a PNG of the training loss and the validation energy and force MAE per epoch (log scale), with
    dotted lines at the epochs where the plateau schedule lowered the learning rate.

    Args:
      history: the per-epoch records of ``metrics.jsonl`` (``epoch``, ``train_loss``,
        ``valid_energy_mae_meV``, ``valid_forces_mae_meV_per_A``, ``lr_factor``).
      path: the PNG to write (atomically).

    Returns:
      The series drawn, by name (for checking against ``metrics.jsonl``).

    Raises:
      ValueError: an empty history.
    """
    if not history:
        raise ValueError("no epochs to plot")
    epoch = np.array([h["epoch"] for h in history], dtype=np.float64)
    drawn = {
        "epoch": epoch,
        "train_loss": np.array([h["train_loss"] for h in history], dtype=np.float64),
        "valid_energy_mae_meV": np.array([h["valid_energy_mae_meV"] for h in history], dtype=np.float64),
        "valid_forces_mae_meV_per_A": np.array([h["valid_forces_mae_meV_per_A"] for h in history], dtype=np.float64),
    }
    factor = np.array([h.get("lr_factor", 1.0) for h in history], dtype=np.float64)
    drawn["lr_changes"] = epoch[1:][np.diff(factor) != 0]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    axes[0].semilogy(epoch, drawn["train_loss"], "o-", ms=3, label="training loss")
    axes[0].set_ylabel("loss")
    axes[1].semilogy(epoch, drawn["valid_energy_mae_meV"], "o-", ms=3, label="valid energy MAE [meV]")
    axes[1].semilogy(epoch, drawn["valid_forces_mae_meV_per_A"], "s-", ms=3, label="valid force MAE [meV/Å]")
    axes[1].set_ylabel("MAE")
    for ax in axes:
        for e in drawn["lr_changes"]:
            ax.axvline(e, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch" + (" (dotted: learning rate lowered)" if len(drawn["lr_changes"]) else ""))
        ax.legend(loc="upper right")
    save_png(fig, path)
    return drawn
