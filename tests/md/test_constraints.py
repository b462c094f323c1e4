"""md/constraints.fixed_mask: FixAtoms and explicit indices united into one mask; everything else refused."""

import numpy as np
import pytest
from ase.build import molecule
from ase.constraints import FixAtoms, FixBondLength, FixCartesian

from equiforce.md.constraints import ConstraintError, fixed_mask


def _atoms():
    return molecule("CH3CH2OH")  # 9 atoms


def test_no_constraint_no_fixed_gives_all_false():
    mask = fixed_mask(_atoms())
    assert mask.dtype == bool and mask.shape == (9,) and not mask.any()


def test_fixatoms_read_and_united_with_explicit_indices():
    atoms = _atoms()
    atoms.set_constraint(FixAtoms(indices=[0, 3]))
    mask = fixed_mask(atoms, fixed=[3, 7])
    assert np.flatnonzero(mask).tolist() == [0, 3, 7]


def test_fixatoms_mask_form_and_several_fixatoms():
    atoms = _atoms()
    m = np.zeros(9, dtype=bool)
    m[[1, 2]] = True
    atoms.set_constraint([FixAtoms(mask=m), FixAtoms(indices=[8])])
    assert np.flatnonzero(fixed_mask(atoms)).tolist() == [1, 2, 8]


def test_explicit_boolean_mask():
    m = np.zeros(9, dtype=bool)
    m[4] = True
    assert np.flatnonzero(fixed_mask(_atoms(), fixed=m)).tolist() == [4]


@pytest.mark.parametrize(
    "constraint,name",
    [(FixBondLength(0, 1), "FixBondLength"), (FixCartesian(0, mask=(1, 0, 0)), "FixCartesian")],
)
def test_other_constraints_refused_by_name(constraint, name):
    atoms = _atoms()
    atoms.set_constraint([FixAtoms(indices=[0]), constraint])
    with pytest.raises(ConstraintError, match=rf"{name}.*not supported"):
        fixed_mask(atoms)


@pytest.mark.parametrize("bad", [[9], [-1], [0, 12]])
def test_out_of_range_indices_refused(bad):
    with pytest.raises(ConstraintError, match=r"out of range.*9 atoms"):
        fixed_mask(_atoms(), fixed=bad)


def test_wrong_mask_shape_and_non_integer_refused():
    with pytest.raises(ConstraintError, match=r"shape \(9,\)"):
        fixed_mask(_atoms(), fixed=np.zeros(5, dtype=bool))
    with pytest.raises(ConstraintError, match="integers"):
        fixed_mask(_atoms(), fixed=[0.5])
