"""Fixed atoms: one boolean mask, read from ``ase.constraints.FixAtoms`` and/or an explicit index list.

The mask is what MD and the minimiser use: a fixed atom gets zero force and zero velocity and never moves,
and it removes 3 degrees of freedom from the temperature. Only ``FixAtoms`` is understood; any other ASE
constraint on the input is refused with an error naming it, rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ConstraintError", "fixed_mask"]


class ConstraintError(ValueError):
    """A constraint or a list of fixed atoms equiforce cannot honour (a ``ValueError``)."""


def _mask_from(fixed, n_atoms: int, what: str) -> np.ndarray:
    arr = np.asarray(fixed)
    if arr.dtype == bool:
        if arr.shape != (n_atoms,):
            raise ConstraintError(
                f"{what}: a boolean mask must have shape ({n_atoms},) (one entry per atom), got {arr.shape}"
            )
        return arr.copy()
    if arr.size == 0:
        return np.zeros(n_atoms, dtype=bool)
    if arr.ndim != 1:
        raise ConstraintError(f"{what}: expected a 1-D list of atom indices or a boolean mask, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ConstraintError(f"{what}: atom indices must be integers, got {arr.tolist()!r}")
    bad = arr[(arr < 0) | (arr >= n_atoms)]
    if bad.size:
        raise ConstraintError(
            f"{what}: atom index {sorted(set(bad.tolist()))} out of range for a structure of {n_atoms} atoms "
            f"(valid: 0 to {n_atoms - 1})"
        )
    mask = np.zeros(n_atoms, dtype=bool)
    mask[arr] = True
    return mask


def fixed_mask(atoms, fixed: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """The atoms held fixed: the ``FixAtoms`` constraints on ``atoms`` together with ``fixed``.

    Args:
      atoms: an ``ase.Atoms`` with N atoms. Its ``FixAtoms`` constraints are read (several are united).
      fixed: more atoms to fix: a list/array of integer indices in ``[0, N)`` (repeats allowed), or a boolean
        mask of shape ``(N,)``; ``None`` or empty for none.

    Returns:
      np.ndarray, dtype bool, shape ``(N,)``: True for a fixed atom (the union of both sources).

    Raises:
      ConstraintError (a ``ValueError``): ``atoms`` carries a constraint other than ``FixAtoms`` (e.g.
        ``FixBondLength``, ``FixCartesian``, ``FixSymmetry``: not supported), or an index is out of range,
        not an integer, or a mask has the wrong shape.
    """
    n_atoms = len(atoms)
    mask = np.zeros(n_atoms, dtype=bool)
    from ase.constraints import FixAtoms

    for constraint in getattr(atoms, "constraints", None) or []:
        if type(constraint) is not FixAtoms:
            raise ConstraintError(
                f"constraint {type(constraint).__name__} on the input structure is not supported: only "
                f"ase.constraints.FixAtoms is (remove it with atoms.set_constraint() or use FixAtoms)"
            )
        mask |= _mask_from(np.asarray(constraint.index), n_atoms, "FixAtoms on the input structure")
    if fixed is not None:
        mask |= _mask_from(fixed, n_atoms, "fixed atoms")
    return mask
