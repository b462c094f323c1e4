"""The thermo plot (``equiforce plot``, and after ``equiforce md``) and the training learning curve: valid PNGs
of plausible size whose drawn data are the CSV's / metrics log's."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from ase import units

from equiforce.cli import main
from equiforce.data.errors import DataError
from equiforce.md.plots import plot_thermo
from equiforce.md.reporters import ThermoLog
from equiforce.training.plots import learning_curve_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _columns(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return {name: np.array([float(r[k]) for r in rows[1:]]) for k, name in enumerate(rows[0])}


def _assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes


@pytest.mark.parametrize("periodic", [False, True])
def test_thermo_plot_draws_the_csv(tmp_path, periodic):
    path = tmp_path / "thermo.csv"
    log = ThermoLog(path, periodic=periodic, extra_columns=("conserved_eV",))
    rng = np.random.default_rng(0)
    n = 30
    cols = {
        "potential_energy": -100.0 + rng.normal(size=n),
        "kinetic_energy": 2.0 + rng.random(n),
        "temperature": 300.0 + 10 * rng.normal(size=n),
        "conserved_eV": -98.0 + 1e-3 * rng.normal(size=n),
    }
    cols["total_energy"] = cols["potential_energy"] + cols["kinetic_energy"]
    if periodic:
        cols["pressure"] = 1e-3 * rng.normal(size=n)  # eV/Å³ in, GPa in the CSV
        cols["volume"] = 1000.0 + rng.normal(size=n)
    log.write(np.arange(n) * 10, np.arange(n) * 0.005, **cols)
    log.close()
    drawn = plot_thermo(path, tmp_path / "thermo.png", n_atoms=10)
    _assert_png(tmp_path / "thermo.png")
    csv_cols = _columns(path)
    np.testing.assert_array_equal(drawn["time_ps"], csv_cols["time_ps"])
    np.testing.assert_array_equal(drawn["temperature_K"], csv_cols["temperature_K"])
    for label, name in (
        ("potential", "potential_energy_eV"),
        ("total", "total_energy_eV"),
        ("conserved", "conserved_eV"),
    ):
        np.testing.assert_allclose(drawn[label], (csv_cols[name] - csv_cols[name][0]) / 10)
    assert ("pressure_GPa" in drawn) == periodic
    if periodic:
        np.testing.assert_allclose(drawn["pressure_GPa"], cols["pressure"] / units.GPa, rtol=1e-12)  # eV/Å³ → GPa
        np.testing.assert_array_equal(drawn["volume_A3"], csv_cols["volume_A3"])


def test_plot_command_and_bad_files(tmp_path, capsys):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not an equiforce thermo CSV"):
        plot_thermo(bad, tmp_path / "x.png")
    assert main(["plot", str(bad)]) == 2
    assert "not an equiforce thermo CSV" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.csv")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_md_writes_the_thermo_plot(trained_aspirin_model, tmp_path, capsys):
    thermo = tmp_path / "nvt.csv"
    args = ["md", trained_aspirin_model, "sample:test:0", "--steps", "40", "--report-interval", "10"]
    assert main([*args, "--thermo", str(thermo), "--no-progress"]) == 0
    assert "thermo plot written to" in capsys.readouterr().out
    _assert_png(thermo.with_suffix(".png"))
    assert main(["plot", str(thermo), "--out", str(tmp_path / "again.png"), "--n-atoms", "21"]) == 0
    _assert_png(tmp_path / "again.png")


def test_learning_curve_draws_the_history(tmp_path):
    history = [
        {
            "epoch": k + 1,
            "train_loss": 1.0 / (k + 1),
            "valid_energy_mae_meV": 100.0 / (k + 1),
            "valid_forces_mae_meV_per_A": 300.0 / (k + 1),
            "lr_factor": 1.0 if k < 3 else 0.8,
        }
        for k in range(6)
    ]
    drawn = learning_curve_plot(history, tmp_path / "curve.png")
    _assert_png(tmp_path / "curve.png")
    np.testing.assert_array_equal(drawn["epoch"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(drawn["valid_forces_mae_meV_per_A"], [300.0 / e for e in range(1, 7)])
    np.testing.assert_array_equal(drawn["lr_changes"], [4])
    with pytest.raises(ValueError, match="no epochs"):
        learning_curve_plot([], tmp_path / "empty.png")
