"""Fixed atoms in MD (issue 28 §2): a mask from ``fixed=`` and ase ``FixAtoms`` holds atoms still in every
ensemble, single runs and replicas, and the temperature counts ``3 (N - n_fixed)`` degrees of freedom."""

import jax
import numpy as np
import pytest
from ase.constraints import FixAtoms, FixBondLength

from equiforce.md import run_md, run_replicas
from equiforce.md.constraints import ConstraintError
from equiforce.md.inputs import load_structure
from equiforce.potentials import config_from_dict
from equiforce.potentials.potential import Potential

ENSEMBLES = ("nve", "nvt_langevin", "nvt_nose_hoover", "npt_nose_hoover")
FIXED = [0, 3, 7, 11]


@pytest.fixture(scope="module")
def tiny_model():
    """A small random float64 NequIP (untrained: enough to move atoms around; r_max 3 Å)."""
    jax.config.update("jax_enable_x64", True)
    potential = Potential(
        model=config_from_dict(
            {"name": "nequip", "num_interactions": 1, "num_features": 4, "l_max": 1, "parity": False}
        ),
        species=(1, 6, 8),
        r_max=3.0,
        atomic_energies=(0.0, 0.0, 0.0),
        avg_num_neighbours=6.0,
        dtype="float64",
    )
    return potential, potential.init(jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def molecule():
    return load_structure("sample:salicylic:test:0")  # 16 atoms, free space


def _boxed(atoms):
    boxed = atoms.copy()
    boxed.set_cell([9.0, 9.0, 9.0])
    boxed.center()
    boxed.set_pbc(True)
    return boxed


RUN = dict(steps=1000, report_interval=500, timestep_fs=0.25, temperature_K=300.0, progress=False, log=lambda _: None)


def _last_frame(path):
    """Positions (Å), velocities and cell (rows, Å) of the last frame of an H5MD trajectory, read with h5py
    (ase's ``set_positions`` would re-apply a ``FixAtoms`` on ``final_atoms`` and hide a moved atom)."""
    import h5py

    with h5py.File(path, "r") as f:
        (group,) = f["particles"].values()
        box = group["box"].get("edges")
        cell = None if box is None else np.asarray(box["value"][-1] if isinstance(box, h5py.Group) else box[()])
        return group["position/value"][-1], group["velocity/value"][-1], cell


def _check_still(start, positions, velocities, fixed, cell=None):
    """Fixed atoms exactly where they started (NPT, ``cell`` given: at the same fractional coordinates, to
    rounding) with zero velocity, while the others moved."""
    mask = np.zeros(len(start), bool)
    mask[fixed] = True
    if cell is not None:  # NPT: fixed atoms keep their fractional coordinates (they move with the box)
        fractional = np.linalg.solve(cell.T, positions.T).T  # cell rows are the lattice vectors
        np.testing.assert_allclose(fractional[mask], start.get_scaled_positions()[mask], rtol=0, atol=1e-12)
    else:
        np.testing.assert_array_equal(positions[mask], start.get_positions()[mask])
    np.testing.assert_array_equal(velocities[mask], 0.0)
    moved = np.linalg.norm(positions[~mask] - start.get_positions()[~mask], axis=1)
    assert moved.max() > 1e-3, "the free atoms did not move: the test would pass for a frozen run"


# Default run: a thermostat and the barostat; every ensemble in the slow target (each costs a compilation).
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "ensemble", [pytest.param(e, marks=() if e in ("nvt_langevin", "npt_nose_hoover") else _SLOW) for e in ENSEMBLES]
)
def test_fixed_atoms_do_not_move_in_a_single_run(tiny_model, molecule, ensemble, tmp_path):
    npt = ensemble == "npt_nose_hoover"
    atoms = _boxed(molecule) if npt else molecule.copy()
    atoms.set_constraint(FixAtoms(indices=FIXED[:2]))  # honoured, united with fixed=
    extra = {"barostat_tau_fs": 100.0, "pressure_GPa": -0.2} if npt else {}  # the box grows
    traj = tmp_path / "traj.h5"
    result = run_md(tiny_model, atoms, ensemble=ensemble, fixed=FIXED[2:], seed=2, trajectory=traj, **RUN, **extra)
    assert result.frames[-1].step == 1000
    positions, velocities, cell = _last_frame(traj)
    _check_still(atoms, positions, velocities, FIXED, cell)
    if npt:
        assert not np.allclose(result.final_atoms.get_cell()[:], atoms.get_cell()[:]), "the box did not change"


@pytest.mark.parametrize(
    "ensemble", [pytest.param(e, marks=() if e == "nvt_nose_hoover" else _SLOW) for e in ENSEMBLES[:3]]
)
def test_fixed_atoms_do_not_move_in_replicas(tiny_model, molecule, ensemble):
    other = molecule.copy()
    other.rattle(0.02, seed=1)
    fixed = [FIXED, [1, 2]]
    result = run_replicas(tiny_model, [molecule, other], ensemble=ensemble, fixed=fixed, seed=[4, 5], devices=1, **RUN)
    for rep, start, f in zip(result.replicas, (molecule, other), fixed, strict=True):
        assert rep.stopped_because is None and rep.steps == 1000
        _check_still(start, rep.final_atoms.get_positions(), rep.final_atoms.get_velocities(), f)


@pytest.mark.parametrize("ensemble", ["nve", "nvt_langevin"])
def test_temperature_counts_the_free_atoms_only(tiny_model, molecule, ensemble):
    """Step 0: the kinetic energy computed here from the velocities over 3 (N - n_fixed) degrees of freedom
    (not 3N - 3 or 3N) gives the target the velocities were drawn at, and the engine reports it."""
    from ase import units

    from equiforce.md import MDConfig, MDEngine, make_system

    system = make_system(*tiny_model, molecule, fixed=FIXED)
    engine = MDEngine(system, MDConfig(ensemble=ensemble, temperature_K=300.0))
    state = engine.init(molecule.get_positions())
    v = engine.velocities(state)
    assert np.all(v[FIXED] == 0.0)
    ke = 0.5 * np.sum(molecule.get_masses()[:, None] * v**2)
    t = 2 * ke / (3 * (len(molecule) - len(FIXED)) * units.kB)
    assert t == pytest.approx(300.0, rel=1e-9)
    assert engine.observe(state).temperature == pytest.approx(t, rel=1e-9)


def test_bad_fixed_atoms_are_refused_by_name(tiny_model, molecule):
    with pytest.raises(ConstraintError, match="out of range"):
        run_md(tiny_model, molecule, ensemble="nve", fixed=[99], **RUN)
    with pytest.raises(ConstraintError, match="all 16 atoms are fixed"):
        run_md(tiny_model, molecule, ensemble="nve", fixed=list(range(16)), **RUN)
    bonded = molecule.copy()
    bonded.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ConstraintError, match="replica 1: constraint FixBondLength"):
        run_replicas(tiny_model, [molecule, bonded], ensemble="nve", devices=1, **RUN)


@pytest.mark.slow
def test_thermostat_temperature_matches_the_target_over_the_free_degrees_of_freedom(tiny_model, molecule):
    """Nosé–Hoover keeps <2 E_kin> = N_f kT for the N_f it is given (the chain's equation of motion); here
    the time average over 16 replicas, from velocities and masses, over 3 (N - n_fixed) degrees of freedom is
    within 2 % of 300 K, and over the uncounted 3N - 3 it is not (half the atoms are fixed)."""
    from ase import units

    fixed = list(range(0, 16, 2))
    structures = []
    for k in range(16):
        atoms = molecule.copy()
        atoms.rattle(0.01, seed=k)
        structures.append(atoms)
    result = run_replicas(
        tiny_model,
        structures,
        ensemble="nvt_nose_hoover",
        fixed=[fixed] * 16,
        thermostat_tau_fs=10.0,
        seed=list(range(16)),
        devices=1,
        **{**RUN, "steps": 8000, "report_interval": 20, "timestep_fs": 0.5},
    )
    kinetic = np.array([[f.kinetic_energy for f in rep.frames[100:]] for rep in result.replicas])
    dof_free, dof_all = 3 * (16 - len(fixed)), 3 * 16 - 3
    t_free = 2 * kinetic.mean() / (dof_free * units.kB)
    t_all = 2 * kinetic.mean() / (dof_all * units.kB)
    assert t_free == pytest.approx(300.0, rel=0.02)
    assert abs(t_all / 300.0 - 1) > 0.02
    reported = np.mean([[f.temperature for f in rep.frames[100:]] for rep in result.replicas])
    assert reported == pytest.approx(t_free, rel=1e-9)
