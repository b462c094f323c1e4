"""Harmonic vibrations of molecules and phonons of crystals from the exact Hessian of a potential.

The Hessian comes from :meth:`equiforce.potentials.Potential.hessian` (forward-over-reverse automatic
differentiation: exact, no displacement step). Frequencies and modes of a molecule are ASE's
:class:`ase.vibrations.VibrationsData` (mass-weighted Hessian, frequencies in cm⁻¹); phonons of a crystal are
phonopy's (Togo, J. Phys. Soc. Jpn. 92, 012001 (2023), arXiv:2212.11755), with the supercell force
constants set from the exact Hessian instead of phonopy's finite displacements.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from equiforce.md.calculator import EquiforceCalculator

__all__ = ["STATIONARY_FMAX", "NonStationaryWarning", "phonons", "vibrations"]

#: eV/Å: above this largest force a structure is not a stationary point (its harmonic frequencies are not
#: normal modes); the same order as the ``fmax`` of a converged ASE optimisation
STATIONARY_FMAX = 0.01


class NonStationaryWarning(UserWarning):
    """The Hessian was taken at a structure with non-zero forces: its frequencies are not normal modes."""


def _check_stationary(calc: EquiforceCalculator, atoms: Any, fmax: float) -> None:
    probe = atoms.copy()
    probe.calc = calc
    largest = float(np.max(np.linalg.norm(probe.get_forces(), axis=1)))
    if largest > fmax:
        warnings.warn(
            f"the largest force is {largest:.3g} eV/Å (> {fmax} eV/Å): this structure is not a stationary "
            "point, so its harmonic frequencies are not normal modes (relax it first, e.g. `--relax`)",
            NonStationaryWarning,
            stacklevel=3,
        )


def vibrations(
    calc: EquiforceCalculator, atoms: Any, *, block_size: int | None = None, fmax: float = STATIONARY_FMAX
) -> Any:
    """Harmonic vibrations of ``atoms`` from the exact Hessian.

    Args:
      calc: the potential's calculator.
      atoms: the structure (ideally relaxed; a molecule has six near-zero translation/rotation modes, five
        if linear).
      block_size: Hessian rows computed at once (see :meth:`EquiforceCalculator.get_hessian`).
      fmax: warn (:class:`NonStationaryWarning`) when the largest force exceeds this, eV/Å.

    Returns:
      :class:`ase.vibrations.VibrationsData`: ``get_frequencies()`` in cm⁻¹ (imaginary ones complex),
      ``get_modes()``, ``tabulate()``, ``write_jmol()``, ``get_zero_point_energy()`` (eV).

    Raises:
      ValueError: the calculator's errors (unknown species: ``UnknownSpeciesError``, overlapping atoms, ...).
    """
    from ase.vibrations import VibrationsData

    _check_stationary(calc, atoms, fmax)
    hessian = calc.get_hessian(atoms, block_size=block_size)
    return VibrationsData.from_2d(atoms.copy(), hessian)


def phonons(
    calc: EquiforceCalculator,
    unitcell: Any,
    supercell_matrix: Sequence[int] | np.ndarray,
    *,
    primitive_matrix: Any = "auto",
    block_size: int | None = None,
) -> Any:
    """A :class:`phonopy.Phonopy` of ``unitcell`` whose force constants are the exact Hessian of its supercell.

    Args:
      calc: the potential's calculator.
      unitcell: a periodic ``ase.Atoms`` (relaxed).
      supercell_matrix: phonopy's supercell matrix (3 integers or 3x3); the supercell must be at least
        twice the cutoff wide for the force constants to be those of the crystal.
      primitive_matrix: phonopy's ``primitive_matrix`` (default ``"auto"``: the primitive cell phonopy finds;
        ``"P"``: the unit cell as given).
      block_size: Hessian rows computed at once.

    Returns:
      The Phonopy object with ``force_constants`` set (eV/Å²); e.g. ``get_frequencies(q)`` (THz),
      ``run_band_structure``, ``run_mesh``, ``run_thermal_properties``.

    Raises:
      ImportError: phonopy is not installed (``pip install 'equiforce[phonons]'``).
      ValueError: a structure that is not periodic in all three directions.
    """
    try:
        from phonopy import Phonopy
        from phonopy.structure.atoms import PhonopyAtoms
    except ImportError as err:
        raise ImportError("phonons need phonopy: pip install 'equiforce[phonons]' (or pip install phonopy)") from err
    import ase

    if not np.all(unitcell.get_pbc()):
        raise ValueError("phonons need a structure periodic in all three directions")
    cell = PhonopyAtoms(
        symbols=unitcell.get_chemical_symbols(),
        cell=np.asarray(unitcell.get_cell()[:]),
        scaled_positions=unitcell.get_scaled_positions(),
        masses=unitcell.get_masses(),
    )
    with warnings.catch_warnings():
        # phonopy 4 warns that "auto" is its new default; here "auto" is asked for on purpose
        warnings.filterwarnings("ignore", message="primitive_matrix defaulted to 'auto'")
        phonon = Phonopy(cell, supercell_matrix=supercell_matrix, primitive_matrix=primitive_matrix)
    sc = phonon.supercell
    atoms = ase.Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
    n = len(atoms)
    hessian = calc.get_hessian(atoms, block_size=block_size).reshape(n, 3, n, 3)
    phonon.force_constants = np.ascontiguousarray(hessian.transpose(0, 2, 1, 3))
    return phonon
