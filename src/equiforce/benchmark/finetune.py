"""Fine-tuning against training from scratch on a new molecule (issue 16 protocol).

A model pre-trained on rMD17 aspirin is fine-tuned (``model.init_from``) on a few frames of salicylic acid
(the same elements, another molecule); a network of the same architecture is trained from scratch on the
same frames, with the same epochs, schedule and seed. Both are tested on salicylic-acid frames none of them
saw. Data: the shipped samples (``sample:train`` for aspirin, ``sample:salicylic:*``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from equiforce.training.config import load_config
from equiforce.training.trainer import train

__all__ = ["FinetuneComparison", "compare_finetune_with_scratch"]


@dataclass(frozen=True)
class FinetuneComparison:
    """Test force and energy MAEs (meV/Å, meV) of the fine-tuned and the from-scratch model."""

    pretrain_forces_mae: float
    finetune_forces_mae: float
    scratch_forces_mae: float
    finetune_energy_mae: float
    scratch_energy_mae: float
    pretrain_s: float
    finetune_s: float
    scratch_s: float

    def table(self, n_frames: int) -> str:
        return "\n".join(
            [
                f"| salicylic acid, {n_frames} training frames | test force MAE (meV/Å) | test energy MAE (meV) | "
                "training time (s) |",
                "|---|---|---|---|",
                f"| fine-tuned from aspirin | {self.finetune_forces_mae:.1f} | {self.finetune_energy_mae:.1f} | "
                f"{self.finetune_s:.0f} |",
                f"| from scratch | {self.scratch_forces_mae:.1f} | {self.scratch_energy_mae:.1f} | "
                f"{self.scratch_s:.0f} |",
                f"| (aspirin model as it is) | {self.pretrain_forces_mae:.1f} | | {self.pretrain_s:.0f} |",
            ]
        )


def compare_finetune_with_scratch(
    out: str | Path,
    *,
    model: str = "mace",
    hyperparameters: dict[str, Any] | None = None,
    pretrain_frames: int = 500,
    pretrain_epochs: int = 30,
    frames: int = 50,
    epochs: int = 40,
    test_frames: int = 200,
    dtype: str = "float32",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> FinetuneComparison:
    """Pre-train on aspirin, then fine-tune and train from scratch on ``frames`` salicylic-acid frames.

    The fine-tuning and scratch runs share everything but the starting weights (and the fine-tuned model's
    inherited scale and neighbour normalisation): ``epochs``, cosine schedule, learning rate, batch size,
    seed, validation frames (10 further salicylic frames).
    """
    out = Path(out)
    hp = json.dumps(hyperparameters or {"num_interactions": 2, "num_features": 16, "l_max": 2, "correlation": 2})
    quiet = log or (lambda _msg: None)
    common = [
        "progress_bar=false",
        f"seed={seed}",
        f"model.dtype={dtype}",
        "model.uncertainty=false",
        "optim.schedule=cosine",
        "optim.learning_rate=0.01",
        "optim.batch_size=5",
        "optim.early_stopping_patience=null",
        "md_check.steps=0",
    ]
    pre_cfg = load_config(
        None,
        [
            *common,
            f"output_dir={out / 'pretrain'}",
            f"model.name={model}",
            f"model.hyperparameters={hp}",
            "data.train=sample:train",
            f"data.train_size={pretrain_frames}",
            "data.valid_fraction=0.05",
            "data.test=sample:salicylic:test",
            f"data.test_size={test_frames}",
            f"optim.max_epochs={pretrain_epochs}",
        ],
    )
    pre = train(pre_cfg, log=quiet)
    # 50 + 10 frames of the shipped salicylic sample: data.valid_fraction of (frames + 10) is 10 frames
    small = [
        *common,
        "data.train=sample:salicylic:train",
        f"data.train_size={frames}",
        f"data.valid_fraction={10 / (frames + 10)}",
        "data.test=sample:salicylic:test",
        f"data.test_size={test_frames}",
        f"optim.max_epochs={epochs}",
    ]
    fine = train(
        load_config(None, [*small, f"output_dir={out / 'finetune'}", f"model.init_from={pre.model_path}"]), log=quiet
    )
    scratch = train(
        load_config(
            None, [*small, f"output_dir={out / 'scratch'}", f"model.name={model}", f"model.hyperparameters={hp}"]
        ),
        log=quiet,
    )

    def mae(r: Any, key: str) -> float:
        return float(r.test_metrics[key])

    return FinetuneComparison(
        pretrain_forces_mae=mae(pre, "forces_mae_meV_per_A"),
        finetune_forces_mae=mae(fine, "forces_mae_meV_per_A"),
        scratch_forces_mae=mae(scratch, "forces_mae_meV_per_A"),
        finetune_energy_mae=mae(fine, "energy_mae_meV"),
        scratch_energy_mae=mae(scratch, "energy_mae_meV"),
        pretrain_s=float(pre.metadata["training_time_s"]),
        finetune_s=float(fine.metadata["training_time_s"]),
        scratch_s=float(scratch.metadata["training_time_s"]),
    )
