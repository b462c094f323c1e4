"""Units the readers accept, and their conversion factors to ASE's (eV, Å), from :mod:`ase.units`.

Kept apart from :mod:`equiforce.data.readers` (which re-exports everything here) so that the format modules the
readers dispatch to (:mod:`equiforce.data.deepmd`) can use the factors without importing the readers.
"""

from __future__ import annotations

from ase import units

from equiforce.data.errors import DataError

__all__ = ["ENERGY_UNITS", "LENGTH_UNITS", "energy_factor", "length_factor"]

#: Energy units accepted by the readers, as multiples of 1 eV.
ENERGY_UNITS: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": units.kcal / units.mol,
    "kJ/mol": units.kJ / units.mol,
    "Hartree": units.Hartree,
    "Ha": units.Hartree,
    "Ry": units.Rydberg,
    "Rydberg": units.Rydberg,
}

#: Length units accepted by the readers, as multiples of 1 Å.
LENGTH_UNITS: dict[str, float] = {
    "Å": 1.0,
    "A": 1.0,
    "Ang": 1.0,
    "Angstrom": 1.0,
    "Bohr": units.Bohr,
    "nm": units.nm,
}


def energy_factor(unit: str) -> float:
    """Multiply an energy in ``unit`` by this to get eV.

    Raises:
      DataError: ``unit`` is not one of :data:`ENERGY_UNITS`.
    """
    try:
        return float(ENERGY_UNITS[unit])
    except (KeyError, TypeError):
        raise DataError(f"unknown energy unit {unit!r}; known: {sorted(ENERGY_UNITS)}") from None


def length_factor(unit: str) -> float:
    """Multiply a length in ``unit`` by this to get Å.

    Raises:
      DataError: ``unit`` is not one of :data:`LENGTH_UNITS`.
    """
    try:
        return float(LENGTH_UNITS[unit])
    except (KeyError, TypeError):
        raise DataError(f"unknown length unit {unit!r}; known: {sorted(LENGTH_UNITS)}") from None
