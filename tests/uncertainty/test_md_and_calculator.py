"""Uncertainty in the ASE calculator, in MD (per step, inside the chunk) and its threshold actions."""

from __future__ import annotations

import ase.io
import jax
import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError

from equiforce.md import EquiforceCalculator, run_md
from equiforce.md.reporters import read_h5md
from equiforce.md.run import load_structure
from equiforce.md.system import make_system
from equiforce.potentials.uncertainty import network_params


@pytest.fixture(params=["committee", "llpr"])
def model(request):
    return request.getfixturevalue(request.param)


def test_calculator_reports_calibrated_uncertainties(model, shift_data):
    potential, params = model
    atoms = shift_data["in"].to_atoms(0)
    atoms.calc = EquiforceCalculator.from_potential(potential, params)
    energy = atoms.get_potential_energy()
    sigma_e = atoms.calc.get_property("energy_uncertainty")
    sigma_f = atoms.calc.get_property("forces_uncertainty")
    assert sigma_e > 0 and sigma_f.shape == (len(atoms),) and np.all(sigma_f > 0)
    if potential.ensemble_size > 1:
        members = atoms.calc.get_property("member_energies")
        assert members.shape == (potential.ensemble_size,)
        np.testing.assert_allclose(energy, members.mean(), atol=1e-9)
        raw = np.std(members, ddof=1) * potential.uncertainty.energy_scale
        np.testing.assert_allclose(sigma_e, raw, rtol=1e-9)
    # energy and forces are those of potentials without any uncertainty: the mean of the committee's members,
    # each a plain network, or the single network without its LLPR collection
    net = network_params(params)
    plain = (
        [
            EquiforceCalculator.from_potential(potential.single(), potential.member_params(net, k))
            for k in range(potential.ensemble_size)
        ]
        if potential.ensemble_size > 1
        else [EquiforceCalculator.from_potential(potential.single(), net)]
    )
    assert all(c.potential.uncertainty_config is None for c in plain)
    bare = atoms.copy()
    np.testing.assert_allclose(atoms.get_forces(), np.mean([c.get_forces(bare) for c in plain], axis=0), atol=1e-9)
    np.testing.assert_allclose(energy, np.mean([c.get_potential_energy(bare) for c in plain]), atol=1e-9)


def test_calculator_without_uncertainty_says_so(llpr, shift_data):
    potential, params = llpr
    atoms = shift_data["in"].to_atoms(0)
    atoms.calc = EquiforceCalculator.from_potential(potential.single(), network_params(params))
    with pytest.raises(PropertyNotImplementedError, match="no uncertainty"):
        atoms.calc.get_property("forces_uncertainty", atoms)


def test_md_uncertainty_function_gives_the_energy_gradient(model):
    """The per-step path (energy, forces, σ) gives forces = -∂E/∂positions of the plain energy function."""
    potential, params = model
    atoms = load_structure("sample:test:0")
    system = make_system(potential, params, atoms, precision="float64")
    pos = jax.numpy.asarray(atoms.get_positions())
    nbr = system.neighbor_fn.allocate(pos)
    energy, forces, sigma_e, sigma_f = jax.jit(system.uncertainty_fn)(pos, nbr)
    np.testing.assert_allclose(energy, jax.jit(system.energy_fn)(pos, nbr), atol=1e-9)
    np.testing.assert_allclose(forces, -jax.jit(jax.grad(system.energy_fn))(pos, nbr), atol=1e-9)
    calc = EquiforceCalculator.from_potential(potential, params)
    calc.get_potential_energy(atoms)
    np.testing.assert_allclose(sigma_e, calc.results["energy_uncertainty"], rtol=1e-8)
    np.testing.assert_allclose(sigma_f, calc.results["forces_uncertainty"], rtol=1e-8)


def test_md_writes_per_frame_uncertainty_equal_to_the_calculator(committee, tmp_path):
    potential, params = committee
    traj, thermo = tmp_path / "t.h5", tmp_path / "t.csv"
    run_md(
        (potential, params),
        "sample:test:0",
        ensemble="nvt_langevin",
        temperature_K=300,
        steps=40,
        report_interval=20,
        trajectory=traj,
        thermo=thermo,
        progress=False,
        log=lambda _: None,
    )
    data = read_h5md(traj)
    rows = np.genfromtxt(thermo, delimiter=",", names=True)
    calc = EquiforceCalculator.from_potential(potential, params)
    atoms = load_structure("sample:test:0")
    for k in range(len(data["step"])):
        atoms.set_positions(data["positions"][k])
        calc.calculate(atoms, ["energy", "energy_uncertainty", "forces_uncertainty"])
        sigma_e, sigma_f = calc.results["energy_uncertainty"], calc.results["forces_uncertainty"].max()
        np.testing.assert_allclose(data["observables"]["energy_uncertainty"][k], sigma_e, rtol=1e-6)
        np.testing.assert_allclose(data["observables"]["max_forces_uncertainty"][k], sigma_f, rtol=1e-6)
        np.testing.assert_allclose(rows["energy_uncertainty_eV"][k], sigma_e, rtol=1e-6)
        np.testing.assert_allclose(rows["max_forces_uncertainty_eV_per_A"][k], sigma_f, rtol=1e-6)


def test_threshold_record_and_stop(committee, tmp_path):
    potential, params = committee
    traj = tmp_path / "r.h5"
    base = dict(ensemble="nvt_langevin", temperature_K=600, report_interval=10, progress=False, log=lambda _: None)
    # a threshold below every σ: each chunk records its first step at least min_spacing after the last record
    result = run_md(
        (potential, params),
        "sample:test:0",
        steps=60,
        trajectory=traj,
        uncertainty_threshold=1e-6,
        uncertainty_min_spacing=25,
        **base,
    )
    steps = [e["step"] for e in result.uncertainty_events]
    assert steps[0] == 1 and np.all(np.diff(steps) >= 25)
    frames = ase.io.read(tmp_path / "r_uncertain.extxyz", ":")
    assert [a.info["step"] for a in frames] == steps
    calc = EquiforceCalculator.from_potential(potential, params)
    for a, event in zip(frames, result.uncertainty_events, strict=True):
        calc.calculate(a, ["energy", "forces_uncertainty"])
        sigma = calc.results["forces_uncertainty"]
        np.testing.assert_allclose(sigma.max(), event["max_forces_uncertainty"], rtol=1e-6)
        assert int(np.argmax(sigma)) == event["atom"] == a.info["uncertain_atom"]
    # stop: the run ends after the chunk of the first uncertain step, keeping its trajectory frame
    stop = run_md(
        (potential, params),
        "sample:test:0",
        steps=100,
        trajectory=tmp_path / "s.h5",
        uncertainty_threshold=1e-6,
        uncertainty_action="stop",
        **base,
    )
    assert stop.stopped_because is not None and "step 1: atom" in stop.stopped_because
    assert list(read_h5md(tmp_path / "s.h5")["step"]) == [0, 10]


def test_threshold_bad_input(committee, llpr):
    potential, params = committee
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="uncertainty_threshold"):
            run_md((potential, params), "sample:test:0", steps=10, uncertainty_threshold=bad, progress=False)
    plain, net = llpr[0].single(), network_params(llpr[1])
    with pytest.raises(ValueError, match="needs a potential with an uncertainty"):
        run_md((plain, net), "sample:test:0", steps=10, uncertainty_threshold=0.1, progress=False)
    with pytest.raises(ValueError, match="uncertainty_action"):
        run_md((potential, params), "sample:test:0", steps=10, uncertainty_threshold=0.1, uncertainty_action="x")
