"""E0 fit (well-posed and rank-deficient), force RMS, residual statistics."""

import logging

import numpy as np
import pytest

from equiforce.data import DataError, StructureSet
from equiforce.data.readers import load_sample
from equiforce.data.statistics import (
    DatasetStatistics,
    check_atomic_energies,
    composition_matrix,
    compute_statistics,
    energy_per_atom_residual_stats,
    fit_atomic_energies,
    force_rms,
)

E0 = {1: -13.6, 6: -1029.5, 8: -2041.3}


def molecules(rng, formulas, energy_noise=0.0):
    zs = [np.array(f) for f in formulas]
    total = sum(z.size for z in zs)
    energy = np.array([sum(E0[int(x)] for x in z) for z in zs]) + energy_noise * rng.normal(size=len(zs))
    return StructureSet(
        atomic_numbers=np.concatenate(zs),
        positions=rng.normal(size=(total, 3)),
        n_atoms=[z.size for z in zs],
        cell=np.zeros((len(zs), 3, 3)),
        pbc=np.zeros((len(zs), 3), bool),
        energy=energy,
        forces=np.ones((total, 3)) * 0.5,
    )


def test_composition_matrix(rng):
    s = molecules(rng, [[8, 1, 1], [6, 1, 1, 1, 1]])
    np.testing.assert_array_equal(composition_matrix(s), [[2, 0, 1], [4, 1, 0]])
    with pytest.raises(DataError, match="not in species"):
        composition_matrix(s, species=[1, 8])


def test_multi_composition_recovers_e0(rng, caplog):
    s = molecules(rng, [[8, 1, 1], [6, 1, 1, 1, 1], [6, 8], [6, 6, 1, 1], [8, 8]])
    with caplog.at_level(logging.WARNING, logger="equiforce.data.statistics"):
        fit = fit_atomic_energies(s)
    assert not caplog.records
    assert set(fit) == {1, 6, 8}
    for z, v in E0.items():
        assert abs(fit[z] - v) < 1e-9 * abs(v)
    mean, std = energy_per_atom_residual_stats(s, fit)
    assert abs(mean) < 1e-9 and std < 1e-9


def test_single_composition_well_posed(caplog):
    s = load_sample("train")
    with caplog.at_level(logging.WARNING, logger="equiforce.data.statistics"):
        fit = fit_atomic_energies(s)
    assert any("not individually determined" in r.getMessage() for r in caplog.records)
    assert all(np.isfinite(v) for v in fit.values())
    counts = composition_matrix(s)[0]  # aspirin C9H8O4, species (1, 6, 8)
    np.testing.assert_array_equal(counts, [8, 9, 4])
    composed = float(counts @ np.array([fit[1], fit[6], fit[8]]))
    mean_e = float(s.energy.mean())
    assert abs(composed - mean_e) <= 1e-8 * abs(mean_e)
    # closest to a common per-atom energy: all equal here
    assert max(fit.values()) - min(fit.values()) < 1e-9 * abs(mean_e)
    mean, _ = energy_per_atom_residual_stats(s, fit)
    assert abs(mean) < 1e-9


def test_rank_deficient_mixed_compositions(rng):
    # H2O and H4O2 are proportional: rank 1 < 2 species
    s = molecules(rng, [[8, 1, 1], [8, 8, 1, 1, 1, 1]], energy_noise=0.1)
    fit = fit_atomic_energies(s)
    c = composition_matrix(s)
    resid = s.energy - c @ np.array([fit[1], fit[8]])
    assert np.all(np.isfinite(resid))
    # extra species requested but absent gets the common value
    fit2 = fit_atomic_energies(s, species=[1, 8, 14])
    assert np.isfinite(fit2[14])


def test_user_e0s_and_errors(rng):
    s = molecules(rng, [[8, 1, 1]])
    assert check_atomic_energies({"1": -1, 8: -2.5, 6: 0.0}, [1, 8]) == {1: -1.0, 8: -2.5, 6: 0.0}
    with pytest.raises(DataError, match=r"species \[8\]"):
        check_atomic_energies({1: -1.0}, [1, 8])
    with pytest.raises(DataError, match="not finite"):
        check_atomic_energies({1: np.nan, 8: 1.0}, [1, 8])
    st = compute_statistics(s, e0s={1: -13.6, 8: -2041.3})
    assert st.energy_per_atom_residual_mean == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DataError):
        compute_statistics(s, e0s="guess")
    no_e = StructureSet(s.atomic_numbers, s.positions, s.n_atoms, s.cell, s.pbc)
    with pytest.raises(DataError, match="energy"):
        fit_atomic_energies(no_e)
    with pytest.raises(DataError, match="force"):
        force_rms(no_e)


def test_force_rms_and_bundle(rng):
    s = molecules(rng, [[8, 1, 1], [6, 1, 1, 1, 1], [6, 8]])
    assert force_rms(s) == pytest.approx(0.5, rel=1e-15)
    st = compute_statistics(s)
    assert isinstance(st, DatasetStatistics)
    assert st.n_structures == 3 and st.species == (1, 6, 8) and st.avg_num_neighbours is None
    assert st.force_rms == pytest.approx(0.5)
    assert DatasetStatistics.from_dict(st.to_dict()) == st
    sample = compute_statistics(load_sample("test"))
    assert 0.9 < sample.force_rms < 1.5  # eV/Å (converted from kcal/mol/Å)
