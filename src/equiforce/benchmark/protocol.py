"""What the accuracy benchmarks share: the training protocol, reuse-or-resume of a run, the device line.

Every benchmark (:mod:`~equiforce.benchmark.rmd17`, :mod:`~equiforce.benchmark.materials`) trains each model
with the same loss, optimiser (AMSGrad), EMA (0.99), plateau schedule and gradient clipping under a wall-clock
budget; only the model's size and learning rate come from its :class:`~equiforce.benchmark.presets.Preset`.
A finished run whose configuration is unchanged is reused, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from equiforce.benchmark.presets import Preset

__all__ = ["device_description", "fmt_time", "protocol_config", "train_or_reuse"]


def protocol_config(
    preset: Preset,
    *,
    seed: int,
    run_dir: Path,
    data: Any,
    dtype: str,
    budget_minutes: float,
    max_epochs: int,
    md_check: Any,
    progress_bar: bool,
    stress_weight: float = 0.0,
    uncertainty: bool = True,
):
    """The :class:`~equiforce.training.config.TrainConfig` of one benchmark run: the shared protocol (loss
    1·(ΔE/N)² + 10·ΔF² [+ stress_weight·Δσ²], AMSGrad, warm-up 1 epoch, plateau schedule (patience 3, factor
    0.8), EMA 0.99, clipping 10, early stopping after 30 epochs) with the preset's model, cutoff, learning
    rate and batch size, and the given data and NVE-check sections."""
    from equiforce.training.config import LossConfig, ModelSection, OptimConfig, TrainConfig

    return TrainConfig(
        seed=seed,
        output_dir=str(Path(run_dir).resolve()),
        data=data,
        model=ModelSection(
            name=preset.model,
            r_max=preset.r_max,
            dtype=dtype,
            atomic_energies="fit",
            hyperparameters=dict(preset.hyperparameters),
            uncertainty=uncertainty,
        ),
        loss=LossConfig(energy_weight=1.0, forces_weight=10.0, stress_weight=stress_weight, kind="mse"),
        optim=OptimConfig(
            optimizer="amsgrad",
            learning_rate=preset.learning_rate,
            batch_size=preset.batch_size,
            warmup_epochs=1.0,
            schedule="plateau",
            plateau_patience=3,
            plateau_factor=0.8,
            ema_decay=0.99,
            clip_grad_norm=10.0,
            max_epochs=max_epochs,
            time_budget_minutes=budget_minutes,
            early_stopping_patience=30,
        ),
        md_check=md_check,
        progress_bar=progress_bar,
    )


def _normalised(d: dict[str, Any]) -> Any:
    return json.loads(json.dumps(d, default=str))


def train_or_reuse(cfg: Any, run_dir: Path, *, force: bool, label: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Train ``cfg`` unless ``run_dir`` holds a finished run of the same configuration; resume an interrupted
    one (or start afresh when its checkpoint is of another configuration).

    Returns:
      The run's ``final_metrics.json`` as a dict.
    """
    from equiforce.training.config import ConfigError
    from equiforce.training.trainer import train

    final = run_dir / "final_metrics.json"
    if final.is_file() and not force:
        meta = json.loads(final.read_text())
        if meta.get("config") == _normalised(cfg.to_dict()) and (run_dir / "model.eqf").is_file():
            log(f"{label}: reusing the finished run in {run_dir} (--force retrains)")
            return meta
    if (run_dir / "checkpoints" / "last.ckpt").is_file() and not force:
        try:
            train(cfg, resume=True, log=log)
        except ConfigError as err:  # a checkpoint of another configuration: start afresh
            log(f"{label}: not resuming ({err}); training from scratch")
            train(cfg, log=log)
    else:
        train(cfg, log=log)
    return json.loads(final.read_text())


def device_description() -> str:
    """``"CPU: <model name> (<n> cores)"`` or the accelerator's kind, e.g. ``"GPU: NVIDIA H200"``."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"CPU: {name} ({cores} cores)"
    return f"{dev.platform.upper()}: {dev.device_kind}"


def fmt_time(seconds: float) -> str:
    """``"M min SS s"``."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"
