"""Exact Hessians, vibrations and phonons (``Potential.hessian``, ``EquiforceCalculator.get_hessian``,
``equiforce.vibrations``) against finite differences: ASE's ``Vibrations`` and phonopy's displacements."""

from __future__ import annotations

import ase
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.optimize import BFGS
from ase.vibrations import Vibrations

from equiforce.data.readers import load_sample
from equiforce.md.calculator import EquiforceCalculator
from equiforce.potentials.potential import Potential, UnknownSpeciesError
from equiforce.vibrations import NonStationaryWarning, phonons, vibrations
from tests.potentials.property_suite import MODEL_TEST_CASES


@pytest.fixture(scope="module")
def calc(aspirin_potential):
    jax.config.update("jax_enable_x64", True)
    return EquiforceCalculator.from_potential(*aspirin_potential)


@pytest.fixture(scope="module")
def relaxed(calc):
    atoms = load_sample("test").to_atoms(0)
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=2000)
    assert np.max(np.linalg.norm(atoms.get_forces(), axis=1)) < 1e-4
    atoms.calc = None
    return atoms


def test_hessian_is_the_derivative_of_the_forces(calc):
    """Central differences of the forces (float64) give the same matrix; it is symmetric; rows in blocks
    give the same matrix as all at once."""
    atoms = load_sample("test").to_atoms(3)
    hess = calc.get_hessian(atoms)
    n = len(atoms)
    assert hess.shape == (3 * n, 3 * n) and hess.dtype == np.float64
    np.testing.assert_allclose(hess, hess.T, rtol=0, atol=1e-9 * np.abs(hess).max())
    np.testing.assert_allclose(calc.get_hessian(atoms, block_size=7), hess, rtol=0, atol=1e-10 * np.abs(hess).max())
    h = 1e-4
    rng = np.random.default_rng(0)
    for k in rng.choice(3 * n, 4, replace=False):
        i, a = divmod(int(k), 3)
        cols = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, a] += sign * h
            moved.calc = calc
            cols.append(-moved.get_forces().ravel())
        fd = (cols[0] - cols[1]) / (2 * h)
        np.testing.assert_allclose(hess[:, k], fd, rtol=0, atol=2e-5 * np.abs(hess).max() + 1e-6)


def test_frequencies_match_ase_finite_differences(calc, relaxed, tmp_path):
    """On relaxed aspirin: frequencies above 100 cm⁻¹ within 1 cm⁻¹ of ASE's Vibrations (finite
    differences through the calculator), and the six translations/rotations near zero."""
    vib = vibrations(calc, relaxed)
    ours = np.asarray(vib.get_frequencies())
    atoms = relaxed.copy()
    atoms.calc = calc
    reference = Vibrations(atoms, name=str(tmp_path / "vib"), delta=0.005, nfree=4)
    reference.run()
    theirs = np.asarray(reference.get_frequencies())
    assert ours.shape == theirs.shape == (3 * len(atoms),)
    high = np.abs(theirs.real) > 100.0
    assert high.sum() >= 3 * len(atoms) - 12  # aspirin has a few soft torsions below 100 cm⁻¹
    np.testing.assert_allclose(ours.real[high], theirs.real[high], rtol=0, atol=1.0)
    assert np.all(np.abs(ours[:6]) < 10.0), ours[:8]  # translations (exactly 0) and rotations
    assert np.all(np.abs(ours[6:].imag) == 0) and np.all(ours[6:].real > 10.0)


def test_unrelaxed_structure_warns_and_unknown_species_fail(calc):
    atoms = load_sample("test").to_atoms(5)
    with pytest.warns(NonStationaryWarning, match="not a stationary point"):
        vib = vibrations(calc, atoms)
    assert np.asarray(vib.get_frequencies()).shape == (3 * len(atoms),)
    with pytest.raises(UnknownSpeciesError, match="Si"):
        calc.get_hessian(ase.Atoms("Si2", positions=[[0, 0, 0], [0, 0, 2.3]]))


def test_phonons_from_the_exact_hessian_match_phonopy_displacements():
    """Diamond Si, 2x2x2 conventional supercell: band frequencies at Γ, X, L from the exact-Hessian force
    constants equal phonopy's finite-displacement ones."""
    jax.config.update("jax_enable_x64", True)
    potential = Potential(
        MODEL_TEST_CASES["mace"].config, species=(14,), r_max=3.0, atomic_energies=(-1.0,), dtype="float64"
    )
    calc = EquiforceCalculator.from_potential(potential, potential.init(jax.random.PRNGKey(4)))
    unit = bulk("Si", "diamond", a=5.43, cubic=True)
    exact = phonons(calc, unit, [2, 2, 2])  # primitive cell found by phonopy: the fcc one, as "F" below
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    cell = PhonopyAtoms(
        symbols=unit.get_chemical_symbols(), cell=unit.cell[:], scaled_positions=unit.get_scaled_positions()
    )
    fd = Phonopy(cell, supercell_matrix=[2, 2, 2], primitive_matrix="F")
    fd.generate_displacements(distance=0.01, is_plusminus=True)
    forces = []
    for sc in fd.supercells_with_displacements:
        a = ase.Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        forces.append(a.get_forces())
    fd.forces = np.array(forces)
    fd.produce_force_constants()
    for q in ([0, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0.5]):
        f_exact, f_fd = exact.get_frequencies(q), fd.get_frequencies(q)
        assert np.ptp(f_exact) > 0.1  # a non-trivial spectrum (THz)
        np.testing.assert_allclose(f_exact, f_fd, rtol=0, atol=2e-3 * np.abs(f_fd).max() + 1e-3)
    with pytest.raises(ValueError, match="periodic"):
        phonons(calc, ase.Atoms("Si", positions=[[0, 0, 0]]), [1, 1, 1])


def test_vibrations_command(trained_aspirin_model, tmp_path, capsys):
    import json

    from equiforce.cli import main

    out = tmp_path / "vib"
    args = ["vibrations", trained_aspirin_model, "sample:test:0", "--relax", "0.005", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Zero-point energy" in printed and "relaxed in" in printed
    record = json.loads((out / "frequencies.json").read_text())
    assert len(record["frequencies_cm-1"]) == 63
    assert max(record["frequencies_cm-1"]) > 2500  # the X-H stretches
    assert (out / "modes.xyz").stat().st_size > 0
    assert main(["vibrations", trained_aspirin_model, str(tmp_path / "missing.xyz"), "--out", str(out)]) == 2


def test_phonons_without_phonopy_is_a_clear_error(calc, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "phonopy", None)  # import phonopy now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'equiforce\[phonons\]'"):
        phonons(calc, bulk("Si", "diamond", a=5.43), [1, 1, 1])
