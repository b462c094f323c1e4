"""σ under a real temperature shift (issue 29 §4), on the shipped GFN2-xTB ethanol data (slow: trains a model).

A small MACE trained on 80 frames of 300 K MD with LLPR calibrated on 20 others (what training does), then
``recalibrate`` on those 20 plus 10 frames each of 600 K and 1000 K MD. On the 300/600/1000 K test sets the
recalibrated model's own σ_F (``predict_uncertainties``) must cover 90–98 % of the force components in its
95 % interval, and rank structures (Spearman ρ of mean σ_F against force RMSE ≥ 0.5); the model as trained
(one scale fitted at 300 K) must under-cover at 1000 K, so the test sees the shift it exists for.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import stats

DATA = Path(__file__).parents[2] / "benchmarks" / "data" / "al_ethanol"


@pytest.mark.slow
def test_recalibrated_llpr_sigma_covers_force_errors_at_300_600_1000_k(tmp_path):
    import ase.io

    from equiforce.data.readers import read_structures
    from equiforce.data.structures import StructureSet
    from equiforce.training.config import load_config
    from equiforce.training.trainer import train
    from equiforce.uncertainty.calibration import predict_uncertainties, recalibrate
    from equiforce.uncertainty.metrics import forces_per_structure

    jax.config.update("jax_enable_x64", True)
    start = read_structures(DATA / "start_300K.xyz")
    perm = np.random.default_rng(0).permutation(len(start))
    train_set, valid = start.subset(perm[:80]), start.subset(perm[80:100])
    for name, s in (("train", train_set), ("valid", valid)):
        ase.io.write(tmp_path / f"{name}.extxyz", [s.to_atoms(k) for k in range(len(s))], format="extxyz")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "progress_bar=false",
            f"data.train={tmp_path / 'train.extxyz'}",
            f"data.valid={tmp_path / 'valid.extxyz'}",
            "data.test=null",
            "model.name=mace",
            'model.hyperparameters={"num_interactions": 2, "num_features": 16, "l_max": 2, "correlation": 2}',
            "optim.max_epochs=60",
            "optim.batch_size=8",
            "optim.learning_rate=0.01",
            "optim.schedule=cosine",
            "optim.early_stopping_patience=null",
            "md_check.steps=0",
            "seed=0",
        ],
    )
    result = train(cfg, log=lambda s: None)
    pot, params = result.potential, result.params
    assert pot.uncertainty_config.method == "llpr"
    shifted = [read_structures(DATA / f"expert_{t}K.xyz").subset(np.arange(10)) for t in (600, 1000)]
    new_pot, new_params, record = recalibrate(pot, params, StructureSet.concatenate([valid, *shifted]))
    z95 = stats.norm.ppf(0.975)
    for t in (300, 600, 1000):
        test = read_structures(DATA / f"test_{t}K.xyz")
        pred = predict_uncertainties(new_pot, new_params, test)
        err = np.abs(pred.forces - test.forces)
        coverage = np.mean(err <= z95 * pred.forces_uncertainty[:, None])
        rmse, mean_sigma = forces_per_structure(pred)
        rho = stats.spearmanr(mean_sigma, rmse).statistic
        assert 0.90 <= coverage <= 0.98, (t, coverage, record["forces"])
        assert rho >= 0.5, (t, rho)
        if t == 1000:
            before = predict_uncertainties(pot, params, test)
            coverage_before = np.mean(np.abs(before.forces - test.forces) <= z95 * before.forces_uncertainty[:, None])
            assert coverage_before < 0.9, coverage_before
