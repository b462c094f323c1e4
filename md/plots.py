"""Plots of an MD run's thermo CSV (written by :class:`~equiforce.md.reporters.ThermoLog`).

``equiforce plot thermo.csv`` and the end of ``equiforce md`` draw, against time (ps): the temperature (K);
the potential, total and (where logged) conserved energy per atom (eV/atom, each minus its first value); and,
for NPT, the volume (Å³) and pressure (GPa).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from equiforce.data.errors import DataError
from equiforce.figures import pyplot, save_png

__all__ = ["plot_thermo", "read_thermo"]

_REQUIRED = ("time_ps", "potential_energy_eV", "total_energy_eV", "temperature_K")


def read_thermo(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a thermo CSV as float64 arrays, by name.

    Raises:
      DataError: no such file, not a CSV with the thermo columns (``time_ps``, ``potential_energy_eV``,
        ``total_energy_eV``, ``temperature_K``), no data rows, or a value that is not a number.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read a thermo CSV ({err})") from err
    if not rows or any(c not in rows[0] for c in _REQUIRED):
        raise DataError(f"{path}: not an equiforce thermo CSV (needs the columns {list(_REQUIRED)})")
    header, data = rows[0], [r for r in rows[1:] if r]
    if not data:
        raise DataError(f"{path}: the thermo CSV has no data rows")
    try:
        table = np.array([[float(v) for v in r] for r in data if len(r) == len(header)], dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{path}: a value is not a number ({err})") from err
    return {name: table[:, k] for k, name in enumerate(header)}


def plot_thermo(csv_path: str | Path, png_path: str | Path, *, n_atoms: int | None = None) -> dict[str, np.ndarray]:
    """Draw the thermo CSV as a PNG (see the module doc); energies per atom when ``n_atoms`` is given.

    Returns:
      The series drawn, by label (what the panels show, for checking against the CSV).

    Raises:
      DataError: see :func:`read_thermo`.
    """
    t = read_thermo(csv_path)
    plt = pyplot()
    npt = "volume_A3" in t and "pressure_GPa" in t
    fig, axes = plt.subplots(4 if npt else 2, 1, figsize=(7, 8 if npt else 5), sharex=True, constrained_layout=True)
    time = t["time_ps"]
    drawn: dict[str, np.ndarray] = {"time_ps": time, "temperature_K": t["temperature_K"]}
    axes[0].plot(time, t["temperature_K"], lw=1)
    axes[0].set_ylabel("temperature [K]")
    per = float(n_atoms) if n_atoms else 1.0
    unit = "eV/atom" if n_atoms else "eV"
    for name, label in (
        ("potential_energy_eV", "potential"),
        ("total_energy_eV", "total"),
        ("conserved_eV", "conserved"),
    ):
        if name in t:
            series = (t[name] - t[name][0]) / per
            drawn[label] = series
            axes[1].plot(time, series, lw=1, label=label)
    axes[1].set_ylabel(f"energy − first value [{unit}]")
    axes[1].legend(loc="best")
    if npt:
        drawn["volume_A3"], drawn["pressure_GPa"] = t["volume_A3"], t["pressure_GPa"]
        axes[2].plot(time, t["volume_A3"], lw=1)
        axes[2].set_ylabel("volume [Å³]")
        axes[3].plot(time, t["pressure_GPa"], lw=1)
        axes[3].set_ylabel("pressure [GPa]")
    axes[-1].set_xlabel("time [ps]")
    fig.suptitle(Path(csv_path).name)
    save_png(fig, png_path)
    return drawn
