"""run_md: outputs, exact restart from the H5MD file, the post-training NVE gate, float32 drift."""

import dataclasses

import jax
import numpy as np
import pytest

from equiforce.data.errors import DataError
from equiforce.md.reporters import read_h5md
from equiforce.md.run import load_structure, run_md
from equiforce.potentials import read_header


def test_run_md_writes_trajectory_and_thermo(trained_aspirin_model, tmp_path):
    traj, thermo = tmp_path / "traj.h5", tmp_path / "thermo.csv"
    r = run_md(
        trained_aspirin_model,
        "sample:test:3",
        ensemble="nvt_langevin",
        steps=300,
        report_interval=100,
        trajectory=traj,
        thermo=thermo,
        progress=False,
    )
    d = read_h5md(traj)
    assert list(d["step"]) == [0, 100, 200, 300]  # frame 0 is the starting structure
    assert d["positions"].shape == (4, 21, 3)
    np.testing.assert_allclose(d["time"], [0.0, 0.05, 0.1, 0.15])
    np.testing.assert_allclose(d["positions"][0], load_structure("sample:test:3").get_positions(), atol=1e-12)
    np.testing.assert_allclose(d["positions"][-1], r.final_atoms.get_positions(), rtol=0, atol=1e-12)
    rows = thermo.read_text().splitlines()
    assert rows[0].startswith("step,time_ps,potential_energy_eV") and len(rows) == 5
    assert [int(r.split(",")[0]) for r in rows[1:]] == [0, 100, 200, 300]
    assert r.steps == 300 and r.ns_per_day > 0 and r.reallocations == 0


def test_restart_equals_uninterrupted_run(trained_aspirin_model, tmp_path):
    """300 steps, then a restart of the same command with steps=500, equal 500 uninterrupted steps (Langevin
    noise and the bath heat in the conserved quantity too); re-issuing it is a no-op; more_steps adds."""
    kw = {"ensemble": "nvt_langevin", "report_interval": 100, "progress": False, "seed": 7}
    full = run_md(
        trained_aspirin_model, "sample:test:5", steps=500, trajectory=tmp_path / "a.h5", thermo=tmp_path / "a.csv", **kw
    )
    b_files = {"trajectory": tmp_path / "b.h5", "thermo": tmp_path / "b.csv"}
    run_md(trained_aspirin_model, "sample:test:5", steps=300, **b_files, **kw)
    # a kill after the thermo row of step 400 but before its trajectory frame leaves an extra CSV row
    with open(tmp_path / "b.csv", "a") as fh:
        fh.write("400,0.2,1,1,1,1,1\n")
    rest = run_md(trained_aspirin_model, "sample:test:5", steps=500, restart=True, **b_files, **kw)
    assert rest.steps == 200 and [f.step for f in rest.frames] == [400, 500]
    a, b = read_h5md(tmp_path / "a.h5"), read_h5md(tmp_path / "b.h5")
    assert list(b["step"]) == list(a["step"]) == [0, 100, 200, 300, 400, 500]
    np.testing.assert_allclose(b["positions"], a["positions"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(b["velocities"], a["velocities"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(rest.final_atoms.get_positions(), full.final_atoms.get_positions(), atol=1e-9)
    ta = np.genfromtxt(tmp_path / "a.csv", delimiter=",", names=True)
    tb = np.genfromtxt(tmp_path / "b.csv", delimiter=",", names=True)
    assert list(tb["step"]) == [0, 100, 200, 300, 400, 500]
    np.testing.assert_allclose(tb["conserved_eV"], ta["conserved_eV"], rtol=0, atol=1e-8)

    again = run_md(trained_aspirin_model, "sample:test:5", steps=500, restart=True, **b_files, **kw)
    assert again.steps == 0 and again.frames == []
    assert list(read_h5md(tmp_path / "b.h5")["step"]) == [0, 100, 200, 300, 400, 500]
    more = run_md(trained_aspirin_model, "sample:test:5", steps=500, restart=True, more_steps=150, **b_files, **kw)
    assert [f.step for f in more.frames] == [600, 700]
    with pytest.raises(ValueError, match="restart"):
        run_md(trained_aspirin_model, "sample:test:5", more_steps=100, **b_files, **kw)
    # the same command before any file exists starts a new run (a job killed before its first frame)
    fresh = run_md(trained_aspirin_model, "sample:test:5", steps=100, restart=True, trajectory=tmp_path / "c.h5", **kw)
    assert [f.step for f in fresh.frames] == [0, 100]


def test_training_reports_nve_gate(trained_aspirin_model):
    """The model file carries the post-training NVE drift next to its MAE. The fixture's gate is short
    (400 steps of 0.25 fs = 0.1 ps), so its slope is mostly fluctuation: bound 5 meV/atom/ps; the
    long float64 bound (1 meV/atom/ps over 0.5 ps) is in test_engine.py."""
    meta = read_header(trained_aspirin_model)["metadata"]
    nve = meta["nve_check"]
    assert nve["blew_up"] is False
    assert abs(nve["drift_meV_per_atom_per_ps"]) < 5.0
    assert nve["fluctuation_meV_per_atom"] < 1.0
    assert "forces_mae_meV_per_A" in meta["valid_metrics"]


def test_float32_nve_drift_is_bounded(aspirin_potential):
    """The same network in float32 (E0s kept out of the float32 sum): |drift| < 5 meV/atom/ps over 0.5 ps."""
    potential, params = aspirin_potential
    pot32 = potential.replace(dtype="float32")
    params32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    r = run_md(
        (pot32, params32),
        "sample:test:0",
        ensemble="nve",
        timestep_fs=0.25,
        steps=2000,
        report_interval=100,
        progress=False,
    )
    assert abs(r.drift_meV_per_atom_per_ps) < 5.0, r.drift_meV_per_atom_per_ps
    assert r.fluctuation_meV_per_atom < 5.0


def test_load_structure_specs(tmp_path):
    import ase.io

    a = load_structure("sample:train:2")
    assert len(a) == 21
    path = tmp_path / "x.extxyz"
    ase.io.write(path, [a, a])
    assert len(load_structure(f"{path}@0")) == 21
    with pytest.raises(FileNotFoundError):
        load_structure(tmp_path / "missing.xyz")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(DataError, match=r"empty\.xyz"):
        load_structure(tmp_path / "empty.xyz")


def test_blow_up_keeps_trajectory_and_writes_last_good_frame(trained_aspirin_model, tmp_path):
    import ase.io

    from equiforce.md import MDBlowUpError

    traj = tmp_path / "hot.h5"
    with pytest.raises(MDBlowUpError) as info:
        run_md(
            trained_aspirin_model,
            "sample:test:0",
            ensemble="nve",
            timestep_fs=20.0,
            temperature_K=3000.0,
            steps=2000,
            report_interval=20,
            max_temperature_K=1e4,
            trajectory=traj,
            progress=False,
            log=lambda _: None,
        )
    good = info.value.last_good_atoms
    assert np.all(np.isfinite(good.get_positions()))
    written = ase.io.read(tmp_path / "hot_last_good.extxyz")
    np.testing.assert_allclose(written.get_positions(), good.get_positions(), atol=1e-8)
    frames = read_h5md(traj)
    assert np.all(np.isfinite(frames["positions"]))  # only good chunks were committed
    if len(frames["step"]):
        np.testing.assert_allclose(frames["positions"][-1], good.get_positions(), atol=1e-8)


def test_nve_check_stops_at_its_time_limit_and_says_how_far_it_ran(aspirin_potential, monkeypatch):
    """md_check.max_minutes: the check logs its expected time after a timed chunk, stops at the limit and records
    the steps and picoseconds it ran. run_md reads a fake clock that advances 1 s per reading (no real timing);
    the same check without a limit runs every step."""
    from equiforce.data import load_sample
    from equiforce.md import run as md_run
    from equiforce.training.config import MDCheckConfig
    from equiforce.training.nve_check import energy_conservation_check

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            self.now += 1.0
            return self.now

    potential, params = aspirin_potential
    valid = load_sample("test").subset([0])
    check = MDCheckConfig(steps=1000, timestep_fs=0.25, report_interval=50, max_minutes=0.5)
    monkeypatch.setattr(md_run, "time", Clock())
    lines: list[str] = []
    limited = energy_conservation_check(potential, params, valid, check, lines.append)
    assert limited["time_limit_s"] == 30.0 and limited["stopped_by_time_limit"] is True
    assert limited["steps_requested"] == 1000 and 100 <= limited["steps"] < 1000 and limited["steps"] % 50 == 0
    assert limited["time_ps"] == pytest.approx(limited["steps"] * 0.25e-3, rel=1e-12)
    expected = next(i for i, line in enumerate(lines) if "1000 steps expected to take" in line)
    stop = next(i for i, line in enumerate(lines) if "time limit of 30 s reached" in line)
    assert expected < stop and "stops it at about step" in lines[expected]
    verdict = lines[-1]
    assert f"{limited['steps']} steps of 0.25 fs = " in verdict and "1000 asked, stopped by the time limit" in verdict

    lines.clear()
    unlimited = dataclasses.replace(check, max_minutes=None)
    full = energy_conservation_check(potential, params, valid, unlimited, lines.append)
    assert full["time_limit_s"] is None and full["stopped_by_time_limit"] is False
    assert full["steps"] == 1000 and full["time_ps"] == pytest.approx(0.25)
    assert any("1000 steps expected to take" in line for line in lines)


def test_nve_check_time_limit_follows_the_training_budget():
    from equiforce.training.config import MDCheckConfig
    from equiforce.training.nve_check import check_time_limit_s

    assert check_time_limit_s(MDCheckConfig(), None) is None
    assert check_time_limit_s(MDCheckConfig(), 10.0) == 150.0  # a quarter of a 10-minute budget
    assert check_time_limit_s(MDCheckConfig(), 2.0) == 60.0  # at least a minute
    assert check_time_limit_s(MDCheckConfig(max_minutes=4.0), 10.0) == 240.0  # asked for: wins
