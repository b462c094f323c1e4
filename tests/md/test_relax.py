"""md/relax.py: batched FIRE (jax-md) against ASE's optimisers through EquiforceCalculator on the same model.

Two models: the briefly trained float64 aspirin NequIP of tests/md/conftest.py (a molecule with a real minimum),
and a float64 SchNet with fixed random weights for copper (r_max 4.5 Å) whose energy per atom of fcc has a
minimum near a = 3.38 Å (E(a) repulsive below, rising above): the lattice constant is a property of that model,
found independently by a one-dimensional minimisation of E(a) through the ASE calculator.
"""

import contextlib

import ase.io
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.constraints import FixAtoms, FixBondLength
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE
from scipy.optimize import minimize_scalar

from equiforce.data.readers import load_sample
from equiforce.md import EquiforceCalculator
from equiforce.md.constraints import ConstraintError
from equiforce.md.relax import relax
from equiforce.potentials import Potential, UnknownSpeciesError
from tests.potentials.property_suite import MODEL_TEST_CASES


@pytest.fixture(scope="module")
def copper():
    jax.config.update("jax_enable_x64", True)
    potential = Potential(
        MODEL_TEST_CASES["schnet"].config,
        species=(29,),
        r_max=4.5,
        atomic_energies=(-1.0,),
        avg_num_neighbours=12.0,
        dtype="float64",
    )
    return potential, potential.init(jax.random.PRNGKey(2))


def _one_blas_thread():
    """ASE's FrechetCellFilter calls scipy's expm_frechet/logm on 3x3 matrices; on a loaded machine a multi-threaded
    BLAS spends most of its time waiting for its threads (~10 ms per 3x3 solve)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _aspirin(k: int):
    return load_sample("test").to_atoms(k)


def test_fcc_lattice_constant_matches_ase_frechet_and_a_scan(copper):
    start = bulk("Cu", "fcc", a=3.6)  # primitive cell, 1 atom, 0.2 Å above the minimum
    res = relax(copper, start, cell=True, fmax=1e-5, max_steps=2000)
    assert res.converged[0] and res.fmax[0] <= 1e-5
    mine = res.atoms[0]
    lengths = mine.cell.lengths()
    np.testing.assert_allclose(mine.cell.angles(), 60.0, atol=1e-6)  # still fcc (hydrostatic by symmetry)
    a_mine = lengths.mean() * np.sqrt(2)

    calc = EquiforceCalculator.from_potential(*copper)

    def energy(a):
        atoms = bulk("Cu", "fcc", a=a)
        atoms.calc = calc
        return atoms.get_potential_energy()

    scan = minimize_scalar(energy, bounds=(3.2, 3.6), method="bounded", options={"xatol": 1e-7})
    assert abs(a_mine - scan.x) < 1e-4, (a_mine, scan.x)
    assert abs(res.energy[0] - scan.fun) < 1e-6

    ref = start.copy()
    ref.calc = calc
    with _one_blas_thread():
        FIRE(FrechetCellFilter(ref), logfile=None).run(fmax=1e-5, steps=2000)
    a_ase = ref.cell.lengths().mean() * np.sqrt(2)
    assert abs(a_mine - a_ase) < 1e-4, (a_mine, a_ase)
    assert abs(res.energy[0] - ref.get_potential_energy()) < 1e-6
    assert abs(res.energy[0] - mine.get_potential_energy()) < 1e-12  # results stored on the atoms
    assert np.abs(mine.get_stress()).max() < 1e-5  # relaxed cell: no stress left


@pytest.mark.slow
def test_rattled_crystal_with_cell_matches_ase_frechet_fire(copper):
    start = bulk("Cu", "fcc", a=3.6, cubic=True)
    start.rattle(0.05, seed=3)
    res = relax(copper, start, cell=True, fmax=1e-4, max_steps=3000)
    assert res.converged[0]
    ref = start.copy()
    ref.calc = EquiforceCalculator.from_potential(*copper)
    with _one_blas_thread():
        assert FIRE(FrechetCellFilter(ref), logfile=None).run(fmax=1e-4, steps=3000)
    n = len(ref)
    assert abs(res.energy[0] - ref.get_potential_energy()) / n < 1e-6
    np.testing.assert_allclose(res.atoms[0].cell.cellpar()[:3], ref.cell.cellpar()[:3], atol=1e-4)
    assert not np.allclose(res.atoms[0].cell[:], start.cell[:], atol=1e-2)  # the cell did move


def test_molecule_matches_ase_bfgs(aspirin_potential):
    start = _aspirin(0)
    res = relax(aspirin_potential, start, fmax=1e-4, max_steps=5000)
    assert res.converged[0] and res.steps[0] > 10
    ref = start.copy()
    ref.calc = EquiforceCalculator.from_potential(*aspirin_potential)
    assert BFGS(ref, logfile=None).run(fmax=1e-4, steps=2000)
    n = len(ref)
    assert abs(res.energy[0] - ref.get_potential_energy()) / n < 1e-6
    e_start = ref.calc.get_potential_energy(start)
    assert res.energy[0] < e_start - 1e-3  # it did go downhill
    # the same minimum: positions agree (soft modes allow some slack at fmax 1e-4)
    assert np.abs(res.atoms[0].positions - ref.positions).max() < 0.02
    assert np.abs(res.atoms[0].get_forces()).max() <= 1e-4


def test_fixed_atoms_do_not_move_and_the_free_ones_reach_fmax(aspirin_potential):
    start = _aspirin(3)
    start.set_constraint(FixAtoms(indices=[0, 1, 2]))
    res = relax(aspirin_potential, start, fmax=1e-3, max_steps=2000, fixed=[7])
    assert res.converged[0]
    out = res.atoms[0]
    fixed = np.array([0, 1, 2, 7])
    assert np.array_equal(out.positions[fixed], start.positions[fixed])  # exactly, not approximately
    free = np.setdiff1d(np.arange(len(start)), fixed)
    assert np.abs(out.positions[free] - start.positions[free]).max() > 1e-3
    # forces of an independent evaluation: the free atoms are relaxed, the fixed ones are not
    check = out.copy()
    check.calc = EquiforceCalculator.from_potential(*aspirin_potential)
    forces = check.get_forces(apply_constraint=False)
    assert np.linalg.norm(forces[free], axis=1).max() <= 1e-3 * (1 + 1e-6)
    assert np.linalg.norm(forces[fixed], axis=1).max() > 1e-2
    assert isinstance(out.constraints[0], FixAtoms)  # the constraint is kept on the output


def test_batch_equals_one_at_a_time(aspirin_potential):
    structures = [_aspirin(0), _aspirin(3)]
    structures[1].set_constraint(FixAtoms(indices=[4]))
    batch = relax(aspirin_potential, structures, fmax=5e-3, max_steps=1000)
    assert batch.converged.all()
    # batch_size=1: one padded batch per structure (each alone in its own vmapped program), input order kept
    one = relax(aspirin_potential, structures[::-1], fmax=5e-3, max_steps=1000, batch_size=1)
    for k, j in enumerate((1, 0)):
        assert one.steps[k] == batch.steps[j]
        np.testing.assert_allclose(one.atoms[k].positions, batch.atoms[j].positions, rtol=0, atol=1e-8)
        assert abs(one.energy[k] - batch.energy[j]) < 1e-8
    assert batch.steps[0] != batch.steps[1]  # each stopped on its own


def test_max_steps_stops_unconverged(aspirin_potential):
    res = relax(aspirin_potential, _aspirin(0), fmax=1e-6, max_steps=7)
    assert not res.converged[0] and res.steps[0] == 7 and res.fmax[0] > 1e-6
    assert res.atoms[0].info["relax_converged"] is False and res.atoms[0].info["relax_steps"] == 7


def test_bad_input_is_refused_with_a_clear_error(aspirin_potential, copper, tmp_path):
    good = _aspirin(0)
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fmax must be a positive"):
            relax(aspirin_potential, good, fmax=bad)
    with pytest.raises(ValueError, match="max_steps"):
        relax(aspirin_potential, good, max_steps=-1)
    nan = good.copy()
    nan.positions[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"structure 1: positions contain NaN.*\[4\]"):
        relax(aspirin_potential, [good, nan])
    with pytest.raises(UnknownSpeciesError, match=r"structure 0: .*Cu"):
        relax(aspirin_potential, bulk("Cu", "fcc", a=3.6))
    with pytest.raises(ValueError, match="structure 0: cell relaxation needs a fully periodic"):
        relax(aspirin_potential, good, cell=True)
    bond = good.copy()
    bond.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ConstraintError, match=r"structure 0: .*FixBondLengths? .*not supported"):
        relax(aspirin_potential, bond)
    with pytest.raises(ConstraintError, match="out of range"):
        relax(aspirin_potential, good, fixed=[len(good)])
    overlap = good.copy()
    overlap.positions[1] = overlap.positions[0] + 0.1
    with pytest.raises(ValueError, match="structure 0: atoms 0 and 1 overlap"):
        relax(aspirin_potential, overlap)
    with pytest.raises(FileNotFoundError, match="not found"):
        relax(aspirin_potential, tmp_path / "missing.extxyz")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        relax(tmp_path / "missing.eqf", good)


def test_relax_command(trained_aspirin_model, tmp_path, capsys):
    from equiforce.cli import main

    inp, out = tmp_path / "in.extxyz", tmp_path / "relaxed.extxyz"
    frames = [_aspirin(0), _aspirin(3)]
    ase.io.write(inp, frames)
    rc = main(["relax", trained_aspirin_model, str(inp), "--out", str(out), "--fmax", "0.01", "--fix", "0", "3"])
    text = capsys.readouterr().out
    assert rc == 0 and "2/2 structures converged" in text and str(out) in text
    back = ase.io.read(out, ":")
    assert len(back) == 2
    for before, after in zip(frames, back, strict=True):
        assert np.array_equal(after.positions[[0, 3]], before.positions[[0, 3]])
        assert after.get_potential_energy() < EquiforceCalculator(trained_aspirin_model).get_potential_energy(before)
        assert after.info["relax_converged"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    for argv, message in [
        (["relax", trained_aspirin_model, str(tmp_path / "nope.xyz"), "--out", str(out)], "not found"),
        (["relax", trained_aspirin_model, str(inp), "--out", str(out), "--fmax", "0"], "fmax must be a positive"),
        (["relax", trained_aspirin_model, str(inp), "--out", str(out), "--fix", "99"], "out of range"),
        (["relax", trained_aspirin_model, str(inp), "--out", str(out), "--cell"], "fully periodic"),
    ]:
        assert main(argv) != 0
        captured = capsys.readouterr()
        assert message in captured.err + captured.out
        assert "Traceback" not in captured.err


_SHARDED = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from ase.build import bulk
from equiforce.md.relax import relax
from equiforce.potentials import Potential
from tests.potentials.property_suite import MODEL_TEST_CASES
assert jax.device_count() == 2
pot = Potential(MODEL_TEST_CASES["schnet"].config, species=(29,), r_max=4.5, atomic_energies=(-1.0,),
                avg_num_neighbours=12.0, dtype="float64")
model = (pot, pot.init(jax.random.PRNGKey(2)))
crystals = []
for k in range(3):  # 3 structures on 2 devices: one padding structure
    atoms = bulk("Cu", "fcc", a=3.5, cubic=True)
    atoms.rattle(0.05, seed=k)
    crystals.append(atoms)
one = relax(model, crystals, cell=True, fmax=1e-3, max_steps=500)
two = relax(model, crystals, cell=True, fmax=1e-3, max_steps=500, devices=2)
assert one.converged.all() and two.converged.all()
assert np.array_equal(one.steps, two.steps), (one.steps, two.steps)
for a, b in zip(one.atoms, two.atoms):
    assert np.abs(a.positions - b.positions).max() < 1e-10
    assert np.abs(a.cell[:] - b.cell[:]).max() < 1e-10
print("OK", one.steps)
"""


@pytest.mark.slow
def test_sharded_over_two_devices_equals_one_device():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
