"""The loop's σ recalibration each generation (benchmark findings on few frames and on shifted frames alone):
it fits on the in-distribution start frames together with the loop's labels, and below
``RECALIBRATE_MIN_STRUCTURES`` frames it fits only the scale (``b = 1, q = 0``), checked against a numpy fit of
the scale on the same frames. Cheap: no training, no MD; one tiny committee's predictions."""

from __future__ import annotations

import dataclasses

import ase.io
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

import equiforce.uncertainty.calibration as calibration
from equiforce.data.structures import StructureSet
from equiforce.learning.labelling import LABELLED
from equiforce.learning.loop import RECALIBRATE_MIN_STRUCTURES, _calibration_frames, _recalibrate
from equiforce.potentials import Potential
from equiforce.potentials.uncertainty import UncertaintyConfig
from equiforce.uncertainty.calibration import predict_uncertainties
from tests.potentials.property_suite import MODEL_TEST_CASES, molecule


def _cu_frames(n: int, tag: str) -> list:
    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.rattle(0.05, seed=k)
        a.calc = EMT()
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        a.info["al_id"] = f"{tag}-{k}"
        frames.append(a)
    return frames


def test_calibration_frames_are_the_start_frames_and_every_generations_labels(tmp_path):
    """start.data (4) and generation 0's labels (2) are the in-distribution frames; generations 1..g's labels the
    shifted ones; a later generation's labels are not used yet."""
    ase.io.write(tmp_path / "start.extxyz", _cu_frames(4, "data"))
    for g, n in ((0, 2), (1, 3), (2, 2), (3, 1)):
        (tmp_path / f"gen_{g:03d}").mkdir()
        ase.io.write(tmp_path / f"gen_{g:03d}" / LABELLED, _cu_frames(n, f"g{g}"))
    in_dist, shifted = _calibration_frames(tmp_path, tmp_path / "start.extxyz", 2)
    assert len(in_dist) == 6 and len(shifted) == 5
    assert [a.info["al_id"].split("-")[0] for a in shifted] == ["g1"] * 3 + ["g2"] * 2
    assert all(a.calc is not None for a in in_dist + shifted)
    # start.model only (no start data, no generation-0 labels): the shifted frames alone
    in_dist, shifted = _calibration_frames(tmp_path / "none", None, 1)
    assert in_dist == [] and shifted == []


@pytest.mark.parametrize(("n_in", "n_shifted"), [(6, 5), (RECALIBRATE_MIN_STRUCTURES - 5, 5)])
def test_recalibrate_gets_every_frame_and_fixes_the_exponents_below_the_minimum(monkeypatch, n_in, n_shifted):
    """A spy in place of recalibrate: it receives the in-distribution and the shifted frames (their sum), with
    exponents fixed (scale only) below RECALIBRATE_MIN_STRUCTURES and fitted from it on."""
    calls = []

    def spy(potential, params, frames, **kwargs):
        calls.append((len(frames), kwargs.get("exponent", True)))
        return potential, params, {"spy": True}

    monkeypatch.setattr(calibration, "recalibrate", spy)
    frames = _cu_frames(n_in + n_shifted, "x")
    _, _, info = _recalibrate(None, None, frames[:n_in], frames[n_in:])
    enough = n_in + n_shifted >= RECALIBRATE_MIN_STRUCTURES
    assert calls == [(n_in + n_shifted, enough)]
    assert info["fit"] == ("power_law" if enough else "scale")
    assert (info["n_frames"], info["n_in_distribution"], info["n_shifted"]) == (n_in + n_shifted, n_in, n_shifted)


def _labelled_molecules(n: int) -> list:
    """Random molecules with made-up labels (a harmonic pull of every atom towards its molecule's centre)."""
    s = StructureSet.concatenate([molecule(k, 7) for k in range(n)])
    centre = np.concatenate([np.repeat(s.positions[s.atom_slice(k)].mean(0, keepdims=True), 7, 0) for k in range(n)])
    energy = np.array([0.4 * np.sum((s.positions[s.atom_slice(k)] - centre[s.atom_slice(k)]) ** 2) for k in range(n)])
    s = dataclasses.replace(s, energy=energy, forces=-0.8 * (s.positions - centre))
    return [s.to_atoms(k) for k in range(n)]


def test_few_frames_fit_the_scale_only_and_enough_frames_the_power_law():
    """On 9 frames the calibrated σ_F is s·σ_raw with s the maximum-likelihood scale computed here with numpy
    (sqrt(mean(ε²/σ_raw²)) over force components), exponents 1 and 0; on 24 frames the power law is fitted."""
    jax.config.update("jax_enable_x64", True)
    pot = Potential(
        model=MODEL_TEST_CASES["schnet"].config,
        species=(1, 6, 8),
        r_max=4.0,
        atomic_energies=(-1.0, -2.0, -3.0),
        dtype="float64",
        ensemble_size=2,
        uncertainty=UncertaintyConfig("committee", forces_scale=200.0, forces_exponent=0.45),
    )
    params = pot.init(jax.random.PRNGKey(3))
    mols = _labelled_molecules(RECALIBRATE_MIN_STRUCTURES + 4)
    few = mols[:9]
    new_pot, _, info = _recalibrate(pot, params, few[:6], few[6:])
    cfg = new_pot.uncertainty_config
    assert info["fit"] == "scale"
    assert (cfg.forces_exponent, cfg.forces_structure_exponent, cfg.energy_exponent) == (1.0, 0.0, 1.0)
    s = StructureSet.from_atoms(few, require_labels=True)
    raw = predict_uncertainties(pot.replace(uncertainty=UncertaintyConfig("committee")), params, s)
    scale = np.sqrt(np.mean(((raw.forces - s.forces) / raw.forces_uncertainty[:, None]) ** 2))
    assert cfg.forces_scale == pytest.approx(scale, rel=1e-9)
    assert cfg.energy_scale == pytest.approx(np.sqrt(np.mean(((raw.energy - s.energy) / raw.energy_uncertainty) ** 2)))

    new_pot, _, info = _recalibrate(pot, params, mols[:6], mols[6:])
    cfg = new_pot.uncertainty_config
    assert info["fit"] == "power_law" and info["n_frames"] == len(mols) >= RECALIBRATE_MIN_STRUCTURES
    assert cfg.forces_exponent != 1.0 and cfg.forces_structure_exponent != 0.0
