"""Active-learning selection: uncertainty first, no near-copies, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.data.structures import StructureSet
from equiforce.potentials import UnknownSpeciesError
from equiforce.uncertainty.calibration import predict_uncertainties
from equiforce.uncertainty.select import farthest_point_sampling, read_pool, select_structures, write_selection


def test_farthest_point_sampling_spreads_out():
    x = np.array([[0.0], [0.1], [5.0], [5.1], [10.0]])
    assert list(farthest_point_sampling(x, 3, first=0)) == [0, 4, 2]


def test_selection_prefers_uncertain_and_skips_near_copies(committee, shift_data, tmp_path):
    potential, params = committee
    pool = StructureSet.concatenate([shift_data["in"].subset(np.arange(30)), shift_data["high"]])
    sigma = predict_uncertainties(potential, params, pool).forces_uncertainty
    per_structure = np.add.reduceat(sigma, np.concatenate([[0], np.cumsum(pool.n_atoms)])[:-1]) / pool.n_atoms
    top = int(np.argmax(per_structure))
    copies = StructureSet.concatenate([pool] + [pool.subset([top])] * 5)  # 5 exact copies of the most uncertain
    idx, sig = select_structures(potential, params, copies, 5, candidates=3)
    assert len(set(idx.tolist())) == 5
    assert idx[0] in [top, *range(len(pool), len(copies))]
    duplicates = [k for k in idx if k == top or k >= len(pool)]
    assert len(duplicates) == 1  # farthest-point sampling never picks a second copy
    assert np.mean(sig[idx]) > np.median(sig)
    path = write_selection(tmp_path / "pick.extxyz", copies, idx, sig)
    back = read_pool(path)
    assert len(back) == 5 and back.energy is None


def test_selection_errors(committee, shift_data):
    potential, params = committee
    pool = shift_data["in"].subset(np.arange(3))
    with pytest.raises(ValueError, match="cannot select 4 structures from a pool of 3"):
        select_structures(potential, params, pool, 4)
    with pytest.raises(ValueError, match="at least one"):
        select_structures(potential, params, pool, 0)
    alien = StructureSet(
        atomic_numbers=np.array([1, 7], np.int32),
        positions=np.array([[0.0, 0, 0], [1.0, 0, 0]]),
        n_atoms=np.array([2]),
        cell=np.zeros((1, 3, 3)),
        pbc=np.zeros((1, 3), bool),
    )
    with pytest.raises(UnknownSpeciesError):
        select_structures(potential, params, alien, 1)
