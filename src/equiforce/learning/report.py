"""The reports of an active-learning run: per generation and for the whole run, JSON + Markdown + CSV + plots.

All files are written atomically and rebuilt from the state's generation records, so each generation appears
exactly once however often the run was killed and resumed.

Files (``OUTPUT_DIR``): ``report.json`` (the records), ``report.md`` (a table per generation),
``report.csv`` (one row per generation), ``report.png`` (labels used, held-out force MAE and MD time below the
upper threshold per generation); per generation ``gen_NNN/report.json`` and ``gen_NNN/sigma.png`` (the
distribution of the frames' largest σ_F per condition, the thresholds marked).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.atomic import atomic_write_bytes

__all__ = ["plot_sigma", "write_generation_report", "write_run_report"]

CSV_COLUMNS = (
    "generation",
    "labels_used",
    "n_labelled",
    "n_failed",
    "n_candidates",
    "min_time_below_upper_ps",
    "coverage95_previous_model",
    "coverage95_before_recalibration",
    "coverage95_after_recalibration",
    "test_forces_mae_meV_per_A",
    "test_energy_mae_meV_per_atom",
    "test_coverage95",
)


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n").encode()


def write_generation_report(folder: Path, record: dict[str, Any]) -> None:
    """``folder/report.json`` of one generation."""
    atomic_write_bytes(folder / "report.json", _json(record))


def plot_sigma(path: Path, sigma_by_condition: dict[str, list[float]], lower: float, upper: float) -> None:
    """Histogram of the MD frames' largest per-atom σ_F (eV/Å) per condition, thresholds as lines."""
    from equiforce.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = [np.asarray(v) for v in sigma_by_condition.values() if len(v)]
    if values:
        hi = max(float(np.max(np.concatenate(values))), upper) * 1.05
        bins = np.linspace(0.0, hi, 40)
        for name, v in sigma_by_condition.items():
            if len(v):
                ax.hist(v, bins=bins, histtype="step", label=name)
    ax.axvline(lower, color="k", ls="--", lw=1, label="lower")
    ax.axvline(upper, color="r", ls="--", lw=1, label="upper")
    ax.set_xlabel("largest per-atom σ_F of a frame (eV/Å)")
    ax.set_ylabel("MD frames")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    cal = rec.get("calibration") or {}
    test = rec.get("test") or {}
    times = [c["min_time_below_upper_ps"] for c in (rec.get("conditions") or {}).values()]
    return {
        "generation": rec["generation"],
        "labels_used": rec.get("labels_used"),
        "n_labelled": rec.get("n_labelled"),
        "n_failed": rec.get("n_failed"),
        "n_candidates": rec.get("n_candidates"),
        "min_time_below_upper_ps": min(times) if times else None,
        "coverage95_previous_model": cal.get("previous_model"),
        "coverage95_before_recalibration": cal.get("before"),
        "coverage95_after_recalibration": cal.get("after"),
        "test_forces_mae_meV_per_A": test.get("forces_mae_meV_per_A"),
        "test_energy_mae_meV_per_atom": test.get("energy_mae_meV_per_atom"),
        "test_coverage95": test.get("coverage95"),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_run_report(folder: Path, records: list[dict[str, Any]], finished: str | None) -> None:
    """``report.json``, ``report.md``, ``report.csv`` and ``report.png`` of the run from its generation records
    (one per generation, in order)."""
    atomic_write_bytes(folder / "report.json", _json({"finished": finished, "generations": records}))
    rows = [_row(r) for r in records]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "report.csv", buf.getvalue().encode())
    lines = ["# Active learning report", "", f"Status: {finished or 'running'}", ""]
    lines.append("| " + " | ".join(CSV_COLUMNS) + " |")
    lines.append("|" + "---|" * len(CSV_COLUMNS))
    lines += ["| " + " | ".join(_fmt(r[c]) for c in CSV_COLUMNS) + " |" for r in rows]
    lines += ["", "Coverage: the fraction of force components inside the 95 % interval (±1.96 σ_F) on the frames the"]
    lines += [
        "generation labelled: of the model that picked them (`previous_model`), of the new model before and after"
    ]
    lines += [
        "recalibration on them. Times: the shortest MD time a replica of any condition ran below the upper threshold."
    ]
    for rec in records:
        lines += ["", f"## Generation {rec['generation']}", ""]
        for name, c in (rec.get("conditions") or {}).items():
            lines.append(
                f"- {name}: {c['min_time_below_upper_ps']:.4g} ps below the upper threshold (shortest replica), "
                f"{c['n_stopped']}/{c['n_replicas']} replicas stopped"
            )
        if rec.get("failures"):
            lines.append(
                f"- labelling failures: {len(rec['failures'])} (see gen_{rec['generation']:03d}/failures.jsonl)"
            )
    atomic_write_bytes(folder / "report.md", ("\n".join(lines) + "\n").encode())
    _plot_run(folder / "report.png", rows)


def _plot_run(path: Path, rows: list[dict[str, Any]]) -> None:
    from equiforce.figures import pyplot, save_png

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    gens = [r["generation"] for r in rows]
    mae = [np.nan if r["test_forces_mae_meV_per_A"] is None else r["test_forces_mae_meV_per_A"] for r in rows]
    labels = [r["labels_used"] or 0 for r in rows]
    axes[0].plot(labels, mae, "o-")
    axes[0].set_xlabel("labels used")
    axes[0].set_ylabel("test force MAE (meV/Å)")
    t = [np.nan if r["min_time_below_upper_ps"] is None else r["min_time_below_upper_ps"] for r in rows]
    axes[1].plot(gens, t, "s-")
    axes[1].set_xlabel("generation")
    axes[1].set_ylabel("MD time below upper σ (ps)")
    fig.tight_layout()
    save_png(fig, path)
