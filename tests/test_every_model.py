"""Every registered model through the shared machinery, with no model-specific code on the way.

For each model of ``equiforce.potentials.MODELS`` (its tiny configuration from the property suite):
the training CLI path trains it by name and writes a model file, the model file loads into the ASE
calculator with the same energies and forces as the in-memory potential, and jax-md NVE with it conserves
energy. The physics of each network is checked in tests/potentials/property_suite.py.
"""

from __future__ import annotations

import dataclasses

import ase.build
import jax
import numpy as np
import pytest

from equiforce.data import load_sample
from equiforce.md import EquiforceCalculator, run_md
from equiforce.potentials import MODELS, load_model
from equiforce.training import load_config, train
from tests.potentials.property_suite import MODEL_TEST_CASES, get_harness

# The default run takes MACE (the default model) and Allegro (strictly local, the other code path); NequIP,
# PaiNN and SchNet are trained end to end by the slow target (NequIP also by tests/training and tests/test_cli
# in the default run; every model's physics is in the property suite).
DEFAULT_RUN = ("allegro", "mace")


@pytest.fixture(
    scope="module",
    params=[m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in sorted(MODELS)],
)
def trained(request, tmp_path_factory):
    """(name, model path, train result) of a float64 model trained by the trainer for 3 epochs."""
    jax.config.update("jax_enable_x64", True)
    name = request.param
    hp = {k: v for k, v in MODEL_TEST_CASES[name].config.to_dict().items() if k != "name"}
    out = tmp_path_factory.mktemp(f"train_{name}")
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            "data.train_size=20",
            "data.test=null",
            "model.dtype=float64",
            f"model.name={name}",
            "optim.max_epochs=3",
            "optim.learning_rate=0.01",
            "optim.batch_size=5",
            "md_check.steps=0",
            "model.uncertainty=false",  # LLPR for every model: tests/uncertainty (linear in its last layer)
        ],
    )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hyperparameters=hp))
    result = train(cfg, log=lambda _: None)
    return name, result


def test_trains_by_name_and_lowers_the_loss(trained):
    name, result = trained
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0], f"{name}: training loss did not fall: {losses}"
    potential, _, header = load_model(result.model_path)
    assert potential.model.name == name
    assert header["potential"]["model"]["name"] == name


def test_calculator_from_file_matches_potential(trained):
    """The model file in ASE's calculator: same energy, forces and stress as the in-memory potential."""
    _, result = trained
    # A periodic cell of the trained species (H, C, O): stress is part of the shared interface.
    atoms = ase.build.molecule("CH3OH")
    atoms.set_cell([6.0, 6.5, 7.0])
    atoms.center()
    atoms.pbc = True
    atoms.calc = EquiforceCalculator(result.model_path)
    ref = atoms.copy()
    ref.calc = EquiforceCalculator.from_potential(result.potential, result.params)
    np.testing.assert_allclose(atoms.get_potential_energy(), ref.get_potential_energy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(atoms.get_stress(), ref.get_stress(), rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(atoms.get_forces())) > 1e-3 and np.max(np.abs(atoms.get_stress())) > 0


def test_nve_conserves_energy(trained):
    name, result = trained
    atoms = load_sample("test").to_atoms(3)
    md = run_md(
        result.model_path,
        atoms,
        ensemble="nve",
        temperature_K=100.0,
        timestep_fs=0.25,
        steps=400,  # 100 fs: several vibrational periods of the C-H stretch (11 fs)
        report_interval=50,
        progress=False,
        log=lambda _: None,
    )
    conserved = np.array([fr.conserved for fr in md.frames])
    kinetic = np.array([fr.kinetic_energy for fr in md.frames])
    assert np.all(np.isfinite(conserved)) and np.all(kinetic > 0)
    # the total energy stays constant to 1 % of the potential energy's swings (energy flows back and forth)
    potential_swing = np.ptp([fr.potential_energy for fr in md.frames])
    assert potential_swing > 1e-3, name  # the atoms moved: the check is not vacuous
    assert np.ptp(conserved) < 1e-2 * potential_swing, name


def test_every_model_has_a_small_test_configuration():
    assert set(MODEL_TEST_CASES) == set(MODELS)
    for name in MODELS:
        assert get_harness(name).potential.model.name == name
