"""Shared MD fixtures: a small NequIP potential trained for a few epochs on the shipped aspirin sample."""

import jax
import pytest

from equiforce.potentials import load_model
from equiforce.training import load_config, train
from tests.conftest import built_once


@pytest.fixture(scope="session")
def trained_aspirin_model(tmp_path_factory) -> str:
    """Path of a float64 model trained briefly on rMD17 aspirin (physically sensible, stable MD)."""
    return built_once(tmp_path_factory, "md-aspirin-model", _train_aspirin_model)


def _train_aspirin_model(out) -> str:
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            "data.train_size=150",
            "data.test=null",
            "model.dtype=float64",
            "model.hyperparameters={num_interactions: 1, num_features: 8, l_max: 1, parity: false}",
            "optim.max_epochs=6",
            "optim.learning_rate=0.01",
            "optim.batch_size=5",
            "md_check.steps=400",
            "model.uncertainty=false",  # MD with σ: tests/uncertainty
            "md_check.timestep_fs=0.25",
        ],
    )
    result = train(cfg, log=lambda _: None)
    return str(result.model_path)


@pytest.fixture(scope="session")
def aspirin_potential(trained_aspirin_model):
    jax.config.update("jax_enable_x64", True)
    potential, params, _ = load_model(trained_aspirin_model)
    return potential, params
