"""StructureSet validation and round trips (subset, concatenate, to_atoms/from_atoms)."""

import numpy as np
import pytest

from equiforce.data import DataError, StructureSet


def make_set(rng: np.random.Generator, sizes=(3, 5, 2), stress: bool = True) -> StructureSet:
    n = len(sizes)
    total = sum(sizes)
    cell = np.stack([np.diag(rng.uniform(4.0, 6.0, 3)) for _ in range(n)])
    return StructureSet(
        atomic_numbers=rng.integers(1, 30, total),
        positions=rng.uniform(0.0, 4.0, (total, 3)),
        n_atoms=np.array(sizes),
        cell=cell,
        pbc=np.ones((n, 3), dtype=bool),
        energy=rng.normal(size=n),
        forces=rng.normal(size=(total, 3)),
        stress=rng.normal(size=(n, 6)) if stress else None,
    )


def test_nan_positions_rejected(rng):
    s = make_set(rng)
    pos = s.positions.copy()
    pos[4, 1] = np.nan  # row 4 is atom 1 of structure 1 (structure 0 has 3 atoms)
    with pytest.raises(DataError, match=r"NaN.*structure 1, atom 1\b"):
        StructureSet(s.atomic_numbers, pos, s.n_atoms, s.cell, s.pbc)


def test_empty_structure_rejected(rng):
    with pytest.raises(DataError, match="empty"):
        StructureSet(
            atomic_numbers=[1, 1],
            positions=np.zeros((2, 3)),
            n_atoms=[2, 0],
            cell=np.zeros((2, 3, 3)),
            pbc=np.zeros((2, 3), bool),
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("positions", np.zeros((9, 3))),
        ("atomic_numbers", np.ones(11, int)),
        ("cell", np.zeros((2, 3, 3))),
        ("energy", np.zeros(4)),
        ("forces", np.zeros((10, 2))),
    ],
)
def test_mismatched_shapes_rejected(rng, field, value):
    s = make_set(rng)
    names = ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces")
    kwargs = {k: getattr(s, k) for k in names}
    kwargs[field] = value
    with pytest.raises(DataError):
        StructureSet(**kwargs)


def test_subset_and_concatenate_round_trip(rng):
    s = make_set(rng)
    a, b = s.subset([0, 1]), s.subset([2])
    joined = StructureSet.concatenate([a, b])
    for name in ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces", "stress"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(s, name))
    rev = s.subset([2, 0])
    np.testing.assert_array_equal(rev.positions[: s.n_atoms[2]], s.positions[s.atom_slice(2)])
    np.testing.assert_array_equal(rev.energy, s.energy[[2, 0]])


def test_to_atoms_round_trip(rng):
    s = make_set(rng)
    back = StructureSet.from_atoms([s.to_atoms(k) for k in range(len(s))])
    for name in ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces", "stress"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))


def test_partial_nan_stress_row_rejected(rng):
    """A row of NaN means "no stress label"; a single NaN or inf in a labelled row is bad data."""
    s = make_set(rng)
    stress = s.stress.copy()
    stress[0] = np.nan  # fine: structure 0 has no stress label
    stress[2, 4] = np.nan
    kwargs = {k: getattr(s, k) for k in ("atomic_numbers", "positions", "n_atoms", "cell", "pbc")}
    with pytest.raises(DataError, match=r"stress.*structure 2\b"):
        StructureSet(**kwargs, stress=stress)
    stress[2] = np.nan
    assert list(StructureSet(**kwargs, stress=stress).has_stress) == [False, True, False]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("atomic_numbers", np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1]), r"1\.\.118, got 0 at structure 1, atom 1\b"),
        ("forces", "nan", r"forces.*structure 2, atom 0\b"),
        ("energy", [0.0, np.inf, 0.0], r"energy.*structure 1\b"),
        ("cell", "nan-cell", r"cell.*structure 2\b"),
        ("n_atoms", np.array([3.0, 5.0, 2.0]), r"n_atoms has dtype float64"),
        ("pbc", np.full((3, 3), 2), r"pbc must be booleans"),
    ],
)
def test_bad_values_name_structure_and_atom(rng, field, value, match):
    s = make_set(rng)
    names = ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces")
    kwargs = {k: getattr(s, k) for k in names}
    if isinstance(value, str) and value == "nan":
        value = s.forces.copy()
        value[8, 1] = np.nan  # row 8 is atom 0 of structure 2 (sizes 3, 5, 2)
    elif isinstance(value, str) and value == "nan-cell":
        value = s.cell.copy()
        value[2, 0, 0] = np.nan
    kwargs[field] = value
    with pytest.raises(DataError, match=match):
        StructureSet(**kwargs)
