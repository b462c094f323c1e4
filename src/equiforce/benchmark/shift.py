"""Distribution-shift test data built from the frames one has: bonds stretched beyond the training data.

Used by the uncertainty benchmark (``benchmarks/uncertainty.py``) and tests: a model's uncertainty should
rise on such frames.
"""

from __future__ import annotations

import numpy as np

from equiforce.data.structures import StructureSet

__all__ = ["stretched"]


def stretched(structures: StructureSet, stretch: float, seed: int) -> StructureSet:
    """Each structure with one random C-H bond stretched by ``stretch`` Å (the H moved along the bond);
    labels dropped (no reference for the new geometry)."""
    rng = np.random.default_rng(seed)
    atoms = []
    for k in range(len(structures)):
        a = structures.to_atoms(k)
        a.calc = None
        z = a.get_atomic_numbers()
        pos = a.get_positions()
        h = rng.choice(np.flatnonzero(z == 1))
        c_idx = np.flatnonzero(z == 6)
        c = c_idx[np.argmin(np.linalg.norm(pos[c_idx] - pos[h], axis=1))]
        if np.linalg.norm(pos[h] - pos[c]) > 1.3:  # the H of an OH group: stretch its O-H bond instead
            o_idx = np.flatnonzero(z == 8)
            c = o_idx[np.argmin(np.linalg.norm(pos[o_idx] - pos[h], axis=1))]
        bond = pos[h] - pos[c]
        pos[h] += stretch * bond / np.linalg.norm(bond)
        a.set_positions(pos)
        atoms.append(a)
    return StructureSet.from_atoms(atoms)
