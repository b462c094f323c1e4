"""Every output of an MD run, written through the public API, re-derived from first principles.

The references are independent of the code under test: kinetic energies and temperatures from the stored
velocities and masses with CODATA constants (not ase.units), forces, energies and stress from the ASE
calculator at the stored positions, the trajectory read back with MDAnalysis, throughput against a clock
outside the run, per-atom energies against two molecules computed apart, metrics from a loop through the ASE
calculator with numpy.
"""

import time

import h5py
import numpy as np
import pytest

from equiforce.data import load_sample
from equiforce.md import EquiforceCalculator, read_h5md, run_md
from equiforce.md import run as run_module
from equiforce.md.ensembles import ENSEMBLES
from equiforce.training.evaluate import evaluate

# CODATA 2018, exact or as published; deliberately not ase.units
AMU_KG = 1.66053906660e-27
EV_J = 1.602176634e-19
KB_EV_PER_K = 8.617333262e-5
GPA_PER_EV_PER_A3 = EV_J / 1e-30 / 1e9  # 160.2 GPa per eV/Å³
# ½ m v² with m in amu and v in Å/ps, in eV
AMU_A2_PER_PS2_IN_EV = AMU_KG * (1e-10 / 1e-12) ** 2 / EV_J


def _kinetic_eV(masses, velocities_A_per_ps):
    return 0.5 * np.sum(masses[:, None] * velocities_A_per_ps**2) * AMU_A2_PER_PS2_IN_EV


@pytest.fixture(scope="module")
def nve_run(trained_aspirin_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross")
    traj, thermo = out / "md.h5", out / "thermo.csv"
    clock = {"writes": []}  # outside clock: the call, and the moment each frame reaches the output writer
    real_write = run_module.RunOutputs.write

    def timed_write(self, *args, **kwargs):
        clock["writes"].append(time.perf_counter())
        return real_write(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module.RunOutputs, "write", timed_write)
        clock["start"] = time.perf_counter()
        result = run_md(
            trained_aspirin_model,
            "sample:test:4",
            ensemble="nve",
            temperature_K=300.0,
            timestep_fs=0.5,
            steps=200,
            report_interval=50,
            trajectory=traj,
            thermo=thermo,
            write_forces=True,
            progress=False,
            log=lambda _: None,
        )
        clock["end"] = time.perf_counter()
    return result, read_h5md(traj), np.genfromtxt(thermo, delimiter=",", names=True), traj, clock


def test_temperature_and_kinetic_energy_from_stored_velocities(nve_run):
    """½mv² of the H5MD velocities (Å/ps) equals the thermo kinetic energy, and 2 KE / (dof k_B) its
    temperature (dof = 3N − 3 for NVE). A velocity unit error of any size fails this."""
    _, traj, table, *_ = nve_run
    n = len(traj["species"])
    ke = np.array([_kinetic_eV(traj["masses"], v) for v in traj["velocities"]])
    np.testing.assert_allclose(table["kinetic_energy_eV"], ke, rtol=1e-6)
    np.testing.assert_allclose(traj["observables"]["kinetic_energy"], ke, rtol=1e-6)
    temperature = 2.0 * ke / ((3 * n - 3) * KB_EV_PER_K)
    np.testing.assert_allclose(table["temperature_K"], temperature, rtol=1e-6)
    assert temperature[0] == pytest.approx(300.0, rel=1e-6)  # frame 0: the initial velocities


def test_h5md_units_attributes_match_the_values(nve_run):
    _, traj, table, path, _ = nve_run
    with h5py.File(path, "r") as f:  # a cleanly closed file opens with plain h5py
        allp = f["particles/all"]
        assert allp["position/value"].attrs["unit"] == "Angstrom"
        assert allp["velocity/value"].attrs["unit"] == "Angstrom ps-1"
        assert allp["force/value"].attrs["unit"] == "eV Angstrom-1"
        assert allp["position/time"].attrs["unit"] == "ps"
        assert allp["mass"].attrs["unit"] == "u"
        assert f["observables/potential_energy/value"].attrs["unit"] == "eV"
        assert f["observables/temperature/value"].attrs["unit"] == "K"
    # the times are step × dt in ps; masses in amu
    np.testing.assert_allclose(traj["time"], traj["step"] * 0.5e-3, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["time_ps"], traj["time"], rtol=0, atol=1e-12)
    assert traj["masses"][traj["species"] == 6][0] == pytest.approx(12.011, abs=1e-3)


def test_trajectory_energies_and_forces_equal_the_calculator(nve_run, trained_aspirin_model):
    """The stored forces and the thermo potential energy are those of the ASE calculator at the stored
    positions; total = potential + kinetic."""
    _, traj, table, *_ = nve_run
    calc = EquiforceCalculator(trained_aspirin_model)
    atoms = load_sample("test").to_atoms(4)
    atoms.calc = calc
    for k in range(len(traj["step"])):
        atoms.set_positions(traj["positions"][k])
        np.testing.assert_allclose(traj["forces"][k], atoms.get_forces(), rtol=0, atol=1e-8)
        energy = atoms.get_potential_energy()
        assert table["potential_energy_eV"][k] == pytest.approx(energy, rel=0, abs=1e-8)
    np.testing.assert_allclose(
        table["total_energy_eV"], table["potential_energy_eV"] + table["kinetic_energy_eV"], rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(table["conserved_eV"], table["total_energy_eV"], rtol=0, atol=1e-12)  # NVE


def test_throughput_agrees_with_a_clock_outside_the_run(nve_run):
    """The reported timings against ``time.perf_counter`` read outside ``run_md``: around the whole call and
    as each frame reaches the output writer. The reported stepping time (after the first chunk, which holds the
    compilation) must cover the outside span from the first chunk's frame to the last frame and exceed it by
    little (the last write and closing the files); the throughput is then the simulated time over that span,
    within the band those writes allow. A throughput off by a unit or a wrong step count fails this; no speed
    is required."""
    result, traj, _, _, clock = nve_run
    assert result.steps == 200 and int(traj["step"][-1]) == 200
    writes = np.asarray(clock["writes"])
    assert len(writes) == 5  # frame 0, then one frame per chunk of 50 steps
    outside_total = clock["end"] - clock["start"]
    span = writes[-1] - writes[1]  # chunks 2-4 and the writes of frames 1-3, timed from outside
    stepping_s = 150 / result.steps_per_s  # the 150 steps after the first chunk, as the run reports them
    assert result.first_chunk_s + result.wall_s <= outside_total
    assert stepping_s == pytest.approx(result.wall_s, rel=1e-6)
    assert 0.95 * span <= stepping_s <= 2.0 * span + 0.5
    simulated_ns = 150 * 0.5e-6  # 150 steps of 0.5 fs
    days = np.array([2.0 * span + 0.5, 0.95 * span]) / 86400.0  # the band above, in days
    assert simulated_ns / days[0] <= result.ns_per_day <= simulated_ns / days[1]


def test_per_atom_energies_of_two_distant_molecules_are_each_molecules_own(aspirin_potential):
    """Two aspirin frames farther apart than the receptive field (r_max × interactions): each atom's energy in
    the pair equals its energy in its own molecule computed alone, and the pair's energy the sum of the two. A
    per-atom split that is not local (e.g. the total spread evenly) or an E0/shift counted per structure fails."""
    potential, params = aspirin_potential
    reach = potential.r_max * potential.model.num_interactions
    sample = load_sample("test")
    a, b = sample.to_atoms(0), sample.to_atoms(1)
    b.translate([4.0 * reach + 30.0, 0.0, 0.0])
    pair = a + b
    gap = np.min(np.linalg.norm(a.positions[:, None] - b.positions[None], axis=-1))
    assert gap > 2 * reach
    calc = EquiforceCalculator.from_potential(potential, params)
    pair.calc = calc  # first: its padding budget then fits each molecule too (one compilation)
    pair_energies, pair_energy = pair.get_potential_energies(), pair.get_potential_energy()
    alone = []
    for atoms in (a, b):
        atoms.calc = calc
        alone.append((atoms.get_potential_energy(), atoms.get_potential_energies()))
    np.testing.assert_allclose(pair_energies, np.concatenate([e for _, e in alone]), rtol=0, atol=1e-8)
    assert pair_energy == pytest.approx(alone[0][0] + alone[1][0], rel=0, abs=1e-8)
    # the molecules differ, so equal per-atom energies are not a coincidence of identical inputs
    assert abs(alone[0][0] - alone[1][0]) > 1e-4


def test_evaluate_equals_a_loop_through_the_ase_calculator(aspirin_potential, trained_aspirin_model):
    """``evaluate``'s MAE/RMSE against energies and forces from the ASE calculator (the model file, one
    structure at a time) and numpy; both in meV and meV/Å."""
    potential, params = aspirin_potential
    structures = load_sample("test").subset(range(6))
    calc = EquiforceCalculator(trained_aspirin_model)
    de, dea, df = [], [], []
    for k in range(len(structures)):
        atoms = structures.to_atoms(k)
        e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()  # the labels (a SinglePointCalculator)
        atoms.calc = calc
        de.append(atoms.get_potential_energy() - e_ref)
        dea.append(de[-1] / len(atoms))
        df.append(atoms.get_forces() - f_ref)
    de, dea, df = np.array(de), np.array(dea), np.concatenate(df)
    expected = {
        "energy_mae_meV": 1e3 * np.mean(np.abs(de)),
        "energy_rmse_meV": 1e3 * np.sqrt(np.mean(de**2)),
        "energy_per_atom_mae_meV": 1e3 * np.mean(np.abs(dea)),
        "energy_per_atom_rmse_meV": 1e3 * np.sqrt(np.mean(dea**2)),
        "forces_mae_meV_per_A": 1e3 * np.mean(np.abs(df)),
        "forces_rmse_meV_per_A": 1e3 * np.sqrt(np.mean(df**2)),
    }
    metrics = evaluate(potential, params, structures, batch_size=4)
    assert set(expected) <= set(metrics)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-7, abs=1e-6), key


def _aspirin_in_box(size):
    atoms = load_sample("test").to_atoms(0)
    atoms.set_cell([size, size, size])
    atoms.center()
    atoms.pbc = True
    return atoms


def test_periodic_pressure_and_langevin_temperature(aspirin_potential, tmp_path):
    """Periodic Langevin run: the thermo pressure (GPa) is −tr(σ)/3 of the calculator's stress plus the
    kinetic term 2 KE / 3V; temperatures use 3N degrees of freedom (the noise moves the centre of mass)."""
    potential, params = aspirin_potential
    atoms = _aspirin_in_box(16.0)
    traj, thermo = tmp_path / "p.h5", tmp_path / "p.csv"
    run_md(
        (potential, params),
        atoms,
        ensemble="nvt_langevin",
        timestep_fs=0.5,
        steps=40,
        report_interval=20,
        trajectory=traj,
        thermo=thermo,
        progress=False,
        log=lambda _: None,
    )
    d, table = read_h5md(traj), np.genfromtxt(thermo, delimiter=",", names=True)
    calc = EquiforceCalculator.from_potential(potential, params)
    n = len(atoms)
    assert ENSEMBLES["nvt_langevin"].degrees_of_freedom(n) == 3 * n
    for k in range(len(d["step"])):
        frame = atoms.copy()
        frame.set_cell(d["box"][k])
        frame.set_positions(d["positions"][k])
        frame.calc = calc
        ke = _kinetic_eV(d["masses"], d["velocities"][k])
        volume = abs(np.linalg.det(d["box"][k]))
        pressure = -np.trace(frame.get_stress(voigt=False)) / 3.0 + 2.0 * ke / (3.0 * volume)
        assert table["pressure_GPa"][k] == pytest.approx(pressure * GPA_PER_EV_PER_A3, rel=1e-6, abs=1e-9)
        assert table["volume_A3"][k] == pytest.approx(volume, rel=1e-12)
        assert table["temperature_K"][k] == pytest.approx(2 * ke / (3 * n * KB_EV_PER_K), rel=1e-6)

    # MDAnalysis' H5MD reader gets positions, velocities (its native Å/ps), box, times and the frame spacing dt.
    # (It knows no eV-based force unit and refuses files with forces: read those with read_h5md.)
    mda_h5md = pytest.importorskip("MDAnalysis.coordinates.H5MD")
    reader = mda_h5md.H5MDReader(str(traj))
    try:
        assert reader.n_frames == len(d["step"]) == 3
        assert reader.ts.dt == pytest.approx(0.01)  # 20 steps of 0.5 fs, in ps
        for k, ts in enumerate(reader):
            assert ts.time == pytest.approx(d["time"][k])
            assert ts.data["step"] == d["step"][k]
            np.testing.assert_allclose(ts.positions, d["positions"][k], rtol=1e-6, atol=1e-5)  # float32
            np.testing.assert_allclose(ts.velocities, d["velocities"][k], rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(ts.dimensions, [16.0, 16.0, 16.0, 90, 90, 90], atol=1e-5)
    finally:
        reader.close()
