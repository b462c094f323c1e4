"""Inputs of the active-learning example (cu_emt.yaml): EMT copper, a 32-atom fcc cell.

Writes, beside this script (or into the folder given as the first argument):

* ``start.extxyz``: 8 unlabelled cells rattled by 0.05 Å (near 300 K): the loop labels them first;
* ``seeds.extxyz``: the perfect cell, from which every MD condition starts;
* ``test.extxyz``: 12 EMT-labelled cells rattled by 0.15 Å (hotter configurations): the held-out set.

    python examples/active_learning/make_inputs.py && equiforce learn examples/active_learning/cu_emt.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import ase.io
from ase.build import bulk
from ase.calculators.emt import EMT


def cell(seed: int, rattle: float):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)  # 7.22 Å: more than 2 r_max (3.0 Å) for MD
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(folder / "start.extxyz", [cell(k, 0.05) for k in range(8)])
    ase.io.write(folder / "seeds.extxyz", cell(0, 0.0))
    test = []
    for k in range(12):
        atoms = cell(1000 + k, 0.15)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        test.append(atoms)
    ase.io.write(folder / "test.extxyz", test)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
