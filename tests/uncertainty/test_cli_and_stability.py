"""Command line of the uncertainty features, and the MD stability benchmark."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest

from equiforce.benchmark.stability import bonds_of, distance_histogram, run_stability, stability_table
from equiforce.cli import main
from equiforce.md.run import load_structure
from equiforce.potentials import load_model, save_model
from equiforce.potentials.uncertainty import network_params


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def _frames(path, spec: str, n: int, labels: bool = True):
    frames = [load_structure(f"{spec}:{k}") for k in range(n)]
    for a in frames if not labels else []:
        a.calc = None
    ase.io.write(path, frames)
    return str(path)


def test_evaluate_uncertainty_prints_metrics_and_draws_plots(committee_model, tmp_path, capsys):
    data = _frames(tmp_path / "test.extxyz", "sample:test", 40)
    report = tmp_path / "report.json"
    args = ["evaluate", committee_model, data, "--uncertainty", "--plot-dir", str(tmp_path), "--json", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    for label in ("Gaussian NLL", "miscalibration area", "coverage 95 %", "Spearman", "MAE, top 10 % σ"):
        assert label in out
    # the --json report holds the printed Spearman ρ, and no temporary file of its atomic write is left
    spearman = json.loads(report.read_text())["forces_per_structure_spearman"]
    assert f"{spearman:.3f}" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name.rsplit("_", 1)[-1] for p in pngs] == ["reliability.png", "error.png"]
    assert all(_is_png(p) for p in pngs)


def test_calibrate_adds_llpr_to_a_plain_model(llpr_model, tmp_path, capsys):
    potential, params, _ = load_model(llpr_model)
    plain = save_model(tmp_path / "plain.eqf", potential.single(), network_params(params))
    data = _frames(tmp_path / "train.extxyz", "sample:train", 60)
    assert main(["evaluate", str(plain), data, "--uncertainty"]) == 2
    assert "has no uncertainty" in capsys.readouterr().err
    out = tmp_path / "cal.eqf"
    assert main(["calibrate", str(plain), data, "--out", str(out)]) == 0
    calibrated, cal_params, header = load_model(out)
    assert calibrated.uncertainty.method == "llpr" and header["metadata"]["uncertainty"]["method"] == "llpr"
    np.testing.assert_array_equal(
        cal_params["params"]["interaction_0"]["readout"]["kernel"],
        params["params"]["interaction_0"]["readout"]["kernel"],
    )
    # data without forces cannot calibrate
    nolabels = _frames(tmp_path / "nolabels.extxyz", "sample:train", 12, labels=False)
    assert main(["calibrate", str(plain), nolabels]) == 2
    assert "forces" in capsys.readouterr().err


def test_select_and_md_flags_refuse_bad_input(committee_model, tmp_path, capsys):
    pool = tmp_path / "pool.extxyz"
    ase.io.write(pool, [load_structure(f"sample:test:{k}") for k in range(3)])
    assert main(["select", str(pool), "--model", committee_model, "--n", "5", "--out", str(tmp_path / "x")]) == 2
    assert "cannot select 5 structures from a pool of 3" in capsys.readouterr().err
    assert main(["select", str(pool), "--model", committee_model, "--n", "2", "--out", str(tmp_path / "p.xyz")]) == 0
    assert len(ase.io.read(tmp_path / "p.xyz", ":")) == 2
    args = ["md", committee_model, "sample:test:0", "--steps", "10", "--no-progress", "--uncertainty-threshold"]
    assert main([*args, "0"]) == 2
    assert "uncertainty_threshold" in capsys.readouterr().err


def test_stability_pieces():
    atoms = load_structure("sample:test:0")
    assert len(bonds_of(atoms)) == 21  # aspirin, C9H8O4: 21 covalent bonds
    h = distance_histogram(atoms.get_positions()[None], r_hist=10.0, dr=0.1)
    assert np.sum(h) * 0.1 == pytest.approx(1.0)


def test_stability_run_detects_a_bond_deviation(committee, shift_data):
    atoms = load_structure("sample:test:0")
    strict = run_stability(
        committee, atoms, seeds=(0,), time_ps=0.05, check_interval=20, max_deviation=1e-3, log=lambda _: None
    )
    assert np.isfinite(strict[0].unstable_ps) and strict[0].unstable_ps == pytest.approx(0.01)
    relaxed = run_stability(
        committee,
        atoms,
        reference=shift_data["in"],
        seeds=(0, 1),
        time_ps=0.05,
        check_interval=20,
        temperature_K=300,
        uncertainty_threshold=1e-6,
        log=lambda _: None,
    )
    for r in relaxed:
        assert np.isnan(r.unstable_ps) and r.simulated_ps == pytest.approx(0.05)
        assert r.first_uncertain_ps == pytest.approx(0.0005)  # step 1: the threshold is below every σ
        assert 0 < r.hr_mae < 2
    table = stability_table(relaxed, title="t", time_ps=0.05)
    assert table.count("\n| ") == 3 and "0 of 2 runs became unstable" in table
