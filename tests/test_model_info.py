"""equiforce info's summary (equiforce.model_info) on hand-written headers: each field the file holds appears with
its value, in words; a header with nothing but the potential still reads."""

from __future__ import annotations

from equiforce.model_info import describe_header

POTENTIAL = {
    "model": {"name": "mace_compat", "num_interactions": 2},
    "species": [1, 8],
    "r_max": 6.0,
    "atomic_energies": [-13.587, -2041.84],
    "scale": 0.75,
    "shift": 0.125,
    "avg_num_neighbours": 17.5,
    "dtype": "float64",
    "ensemble_size": 1,
}


def _lines(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    last = ""
    for line in text.splitlines()[1:]:
        label, rest = line[:14].strip(), line[14:]
        last = label.rstrip(":") or last
        out.setdefault(last, []).append(rest)
    return out


def test_a_fine_tuned_import_with_a_time_limited_nve_check_and_llpr():
    header = {
        "format": "equiforce-model",
        "format_version": 2,
        "equiforce_version": "9.9.9",
        "potential": POTENTIAL,
        "metadata": {
            "n_train": 120,
            "n_valid": 12,
            "n_test": None,
            "config": {"data": {"train": "water.extxyz", "test": None}},
            "trained_epochs": 40,
            "best_epoch": 37,
            "training_time_s": 600.0,
            "stopped_because": "time_budget",
            "valid_metrics": {
                "energy_mae_meV": 3.25,
                "energy_per_atom_mae_meV": 1.08,
                "energy_rmse_meV": 4.5,
                "forces_mae_meV_per_A": 41.5,
                "forces_rmse_meV_per_A": 60.0,
            },
            "nve_check": {
                "status": "passed",
                "passed": True,
                "drift_meV_per_atom_per_ps": -0.0421,
                "fluctuation_meV_per_atom": 0.31,
                "threshold_meV_per_atom_per_ps": 1.0,
                "steps": 450,
                "steps_requested": 2000,
                "time_ps": 0.225,
                "timestep_fs": 0.5,
                "time_limit_s": 150.0,
                "stopped_by_time_limit": True,
                "n_atoms": 252,
                "supercell": [1, 2, 2],
            },
            "uncertainty": {"method": "llpr", "energy_scale": 0.43, "forces_scale": 0.61, "n_valid": 12},
            "lineage": [
                {"init_from": "/m/mp0b3.eqf", "sha256": "ab" * 32, "model": "mace_compat", "trained_on": None},
                {"kind": "import", "from": "mace-torch 0.3.16", "file": "mp0b3.model"},
            ],
        },
    }
    text = describe_header(header, n_parameters=3_868_432)
    assert text.splitlines()[0] == "equiforce-model v2, written by equiforce 9.9.9"
    lines = _lines(text)
    assert lines["model"][0] == "mace_compat, 3,868,432 parameters, float64, r_max 6 Å"
    assert lines["model"][1] == "num_interactions=2"
    assert lines["species"] == ["H, O"]
    assert lines["E0s"] == ["H -13.5870, O -2041.8400 eV"]
    assert lines["scale/shift"] == ["scale 0.75 eV, shift 0.125 eV/atom, 17.5 neighbours on average"]
    assert lines["trained on"] == ["water.extxyz; 120 train / 12 valid structures"]
    assert lines["training"] == ["40 epochs (best 37) in 10.0 min, stopped by time budget"]
    assert lines["valid errors"][0].startswith("energy MAE 3.2 meV (1.08 meV/atom)")
    nve = lines["NVE check"][0]
    assert nve.startswith("passed: drift -0.042 meV/atom/ps (limit ±1.0), fluctuation 0.310 meV/atom")
    assert "450 steps of 0.5 fs = 0.225 ps of 2000 asked (time limit 2.5 min), 252 atoms (1x2x2 supercell)" in nve
    assert lines["uncertainty"] == ["llpr, calibrated (σ_E scale 0.43, σ_F scale 0.61 on 12 validation structures)"]
    assert lines["lineage"][0] == f"fine-tuned from /m/mp0b3.eqf (mace_compat, sha256 {'ab' * 6}…)"
    assert lines["lineage"][1] == "imported from mace-torch 0.3.16 (mp0b3.model)"
    assert "test errors" not in lines


def test_a_bare_header_reads():
    text = describe_header({"potential": POTENTIAL})
    lines = _lines(text)
    assert lines["uncertainty"] == ["none"] and lines["species"] == ["H, O"]
    assert not {"trained on", "training", "NVE check", "lineage", "imported"} & set(lines)
