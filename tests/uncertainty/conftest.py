"""Committee and single (LLPR) models trained once on the low-energy part of the shipped aspirin sample, and
the distribution-shift test sets built from the same sample."""

from __future__ import annotations

import ase.io
import jax
import numpy as np
import pytest

from equiforce.data.readers import load_sample
from equiforce.potentials import load_model
from equiforce.training.config import load_config
from equiforce.training.trainer import train
from tests.conftest import built_once

HP = "model.hyperparameters={num_interactions: 2, num_features: 8, l_max: 1, correlation: 2}"


@pytest.fixture(scope="session")
def shift_data():
    """Train/valid (energies below the 70 % quantile), in-distribution test (also below) and high-energy test
    (above the 97 % quantile) frames of the shipped sample."""
    train_set, test_set = load_sample("train"), load_sample("test")
    cut = float(np.quantile(train_set.energy, 0.7))
    high = float(np.quantile(train_set.energy, 0.97))
    rng = np.random.default_rng(0)
    low = rng.permutation(np.flatnonzero(train_set.energy <= cut))
    return {
        "train": train_set.subset(low[:120]),
        "valid": train_set.subset(low[120:160]),
        "in": test_set.subset(rng.permutation(np.flatnonzero(test_set.energy <= cut))[:60]),
        "high": test_set.subset(np.flatnonzero(test_set.energy >= high)),
    }


def _train(tmp, data, members: int) -> str:
    for name in ("train", "valid"):
        s = data[name]
        ase.io.write(tmp / f"{name}.extxyz", [s.to_atoms(k) for k in range(len(s))], format="extxyz")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp / f'k{members}'}",
            "progress_bar=false",
            f"data.train={tmp / 'train.extxyz'}",
            f"data.valid={tmp / 'valid.extxyz'}",
            "data.test=null",
            "model.dtype=float64",
            "model.name=mace",
            HP,
            f"model.ensemble_size={members}",
            "optim.max_epochs=8",
            "optim.learning_rate=0.01",
            "optim.schedule=cosine",
            "optim.batch_size=5",
            "md_check.steps=0",
        ],
    )
    return str(train(cfg, log=lambda _: None).model_path)


@pytest.fixture(scope="session")
def committee_model(tmp_path_factory, shift_data) -> str:
    """Path of a float64 committee of 3 members trained on the low-energy frames."""
    jax.config.update("jax_enable_x64", True)
    return built_once(tmp_path_factory, "uncertainty-committee", lambda folder: _train(folder, shift_data, 3))


@pytest.fixture(scope="session")
def llpr_model(tmp_path_factory, shift_data) -> str:
    """Path of a float64 single network (LLPR uncertainty fitted after training) on the same frames."""
    jax.config.update("jax_enable_x64", True)
    return built_once(tmp_path_factory, "uncertainty-llpr", lambda folder: _train(folder, shift_data, 1))


@pytest.fixture(scope="session")
def committee(committee_model):
    jax.config.update("jax_enable_x64", True)
    return load_model(committee_model)[:2]


@pytest.fixture(scope="session")
def llpr(llpr_model):
    jax.config.update("jax_enable_x64", True)
    return load_model(llpr_model)[:2]
