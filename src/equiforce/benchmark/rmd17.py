"""The reproducible rMD17 benchmark: train each model on one official split, test, tabulate beside the papers.

Protocol (the field's standard one, e.g. MACE, arXiv:2206.07697, Sec. 5.1): 950 training and 50 validation
frames drawn (seeded) from the 1,000 frames of split ``k``'s training file, the error measured on the 1,000
frames of split ``k``'s test file. Every model trains with the same loss, optimiser, EMA and schedule under a
wall-clock budget (compilation included); only its size and learning rate come from
:mod:`equiforce.benchmark.presets`. Energies are compared raw (E0s re-fitted after training, see the trainer).

Data: a directory of per-split files ``rmd17_<molecule>_{train,test}_<kk>.npz`` (the layout of GitHub
``andersx/rmd17-npz``) when ``data_dir`` is given, else the full rMD17 archive through the download cache
(:func:`equiforce.data.download.load_rmd17`). Either way the two sets are checked not to overlap and are
written once to native HDF5 files in ``<out_dir>/data/``.

Outputs in ``out_dir``: one training run per (molecule, model) in ``<molecule>_<model>/`` (model file,
metrics, checkpoints), ``results.json`` and ``results.md`` (the Markdown table), both rewritten atomically
after every run. A finished run whose configuration is unchanged is reused; an interrupted one resumes from
its checkpoint, so an interrupted benchmark loses nothing.

References:
  rMD17: A. S. Christensen, O. A. von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018 (2020),
  arXiv:2007.09593. Published errors: I. Batatia et al., "MACE", NeurIPS 2022, arXiv:2206.07697, Table 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from equiforce.benchmark.presets import Preset, get_preset
from equiforce.benchmark.protocol import device_description, fmt_time, protocol_config, train_or_reuse
from equiforce.data.download import RMD17_MOLECULES, load_rmd17, load_rmd17_split
from equiforce.data.errors import DataError
from equiforce.data.hdf5 import read_hdf5, write_hdf5
from equiforce.data.structures import StructureSet
from equiforce.potentials.model_io import atomic_write_bytes, enable_x64_for, load_model

__all__ = [
    "PUBLISHED",
    "PUBLISHED_SOURCE",
    "BenchmarkResult",
    "BenchmarkSettings",
    "benchmark_config",
    "device_description",
    "load_split",
    "markdown_table",
    "prepare_data",
    "run_benchmark",
]

#: (molecule, model) → (energy MAE meV, force MAE meV/Å) on rMD17 with 950 training frames.
PUBLISHED: dict[tuple[str, str], tuple[float, float]] = {
    ("aspirin", "mace"): (2.2, 6.6),
    ("aspirin", "allegro"): (2.3, 7.3),
    ("aspirin", "nequip"): (2.3, 8.2),
    ("ethanol", "mace"): (0.4, 2.1),
    ("ethanol", "nequip"): (0.4, 2.8),
}
PUBLISHED_SOURCE = (
    "Batatia et al., MACE, NeurIPS 2022 (arXiv:2206.07697), Table 2: rMD17, 950 training frames, "
    "MAE in meV (energy) and meV/Å (forces); paper-size models trained to convergence on GPUs"
)
DEFAULT_MODELS: tuple[str, ...] = ("mace", "allegro", "nequip", "painn", "schnet")


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
    """What to run.

    Attributes:
      molecules: rMD17 molecule names (see :data:`~equiforce.data.download.RMD17_MOLECULES`).
      models: registered model names with a preset.
      split: official split 1..5.
      budget_minutes: wall-clock training budget per (molecule, model), compilation included.
      size: preset size, ``"cpu"`` or ``"paper"``.
      dtype: ``"float32"`` or ``"float64"``.
      out_dir: where runs, data copies and the tables go.
      data_dir: folder of per-split npz files; ``None`` uses the full archive through ``cache``.
      cache: download cache for the full archive (default: ``$EQUIFORCE_CACHE`` or ``~/.cache/equiforce``).
      seed: initialisation and shuffling seed.
      max_epochs: upper bound on epochs (the budget usually stops first).
      train_frames, test_frames: use fewer frames (quick checks only; the table says so).
      md_check_steps: NVE steps of the energy-conservation check after training (0: off).
      force: retrain even if a finished run with the same configuration exists.
      progress_bar: show the training progress bar.
    """

    molecules: tuple[str, ...] = ("aspirin", "ethanol")
    models: tuple[str, ...] = DEFAULT_MODELS
    split: int = 1
    budget_minutes: float = 30.0
    size: str = "cpu"
    dtype: str = "float32"
    out_dir: str = "runs/benchmark_rmd17"
    data_dir: str | None = None
    cache: str | None = None
    seed: int = 0
    max_epochs: int = 100_000
    train_frames: int | None = None
    test_frames: int | None = None
    md_check_steps: int = 1000
    force: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for m in self.molecules:
            if m not in RMD17_MOLECULES:
                raise ValueError(f"unknown rMD17 molecule {m!r}; known: {list(RMD17_MOLECULES)}")
        for m in self.models:
            get_preset(m, self.size)  # raises on unknown model / size
        if self.split not in (1, 2, 3, 4, 5):
            raise ValueError(f"split must be 1..5, got {self.split}")
        if not self.budget_minutes > 0:
            raise ValueError("budget_minutes must be positive")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("train_frames", "test_frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def standard_protocol(self) -> bool:
        """True when the full 950/50/1000 frames are used."""
        return self.train_frames is None and self.test_frames is None


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """One (molecule, model) run, as written to ``results.json``."""

    molecule: str
    model: str
    size: str
    dtype: str
    hyperparameters: dict[str, Any]
    n_params: int
    n_train: int
    n_valid: int
    n_test: int
    epochs: int
    training_time_s: float
    first_step_s: float | None
    stopped_because: str
    energy_mae_meV: float
    forces_mae_meV_per_A: float
    energy_rmse_meV: float
    forces_rmse_meV_per_A: float
    nve_drift_meV_per_atom_per_ps: float | None
    device: str
    model_path: str

    @property
    def published(self) -> tuple[float, float] | None:
        return PUBLISHED.get((self.molecule, self.model))


# ------------------------------------------------------------------------------------------------ data
def load_split(
    molecule: str, split: int = 1, data_dir: str | os.PathLike | None = None, cache: str | os.PathLike | None = None
) -> tuple[StructureSet, StructureSet]:
    """Train (1,000 frames) and test (1,000 frames) sets of an official rMD17 split, in eV, eV/Å, Å.

    Raises:
      DataError: missing files (the message says which), overlapping sets, offline without the archive.
    """
    if data_dir is not None:
        return load_rmd17_split(data_dir, molecule, split)
    return load_rmd17(molecule, split, cache=cache)


def prepare_data(settings: BenchmarkSettings, molecule: str, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """HDF5 copies of the split's train and test sets in ``<out_dir>/data/`` (written once, then reused).

    Returns:
      ``(train_path, test_path)``.
    """
    folder = Path(settings.out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train_path = folder / f"rmd17_{molecule}_train_{settings.split:02d}.h5"
    test_path = folder / f"rmd17_{molecule}_test_{settings.split:02d}.h5"
    if not (train_path.is_file() and test_path.is_file()):
        train, test = load_split(molecule, settings.split, settings.data_dir, settings.cache)
        write_hdf5(train_path, train, overwrite=True)
        write_hdf5(test_path, test, overwrite=True)
        log(f"{molecule}: {len(train)} train and {len(test)} test frames of split {settings.split:02d} -> {folder}")
    else:
        try:  # a truncated or foreign file must not pass silently
            read_hdf5(train_path, slice(0, 1))
            read_hdf5(test_path, slice(0, 1))
        except DataError:
            train_path.unlink(missing_ok=True)
            test_path.unlink(missing_ok=True)
            return prepare_data(settings, molecule, log)
    return train_path, test_path


# --------------------------------------------------------------------------------------------- configs
def benchmark_config(preset: Preset, settings: BenchmarkSettings, train_path: Path, test_path: Path, run_dir: Path):
    """The :class:`~equiforce.training.config.TrainConfig` of one run (shared protocol + the model's preset)."""
    from equiforce.training.config import DataConfig, MDCheckConfig

    return protocol_config(
        preset,
        seed=settings.seed,
        run_dir=run_dir,
        data=DataConfig(
            train=str(Path(train_path).resolve()),
            valid_fraction=0.05,  # 50 of the 1,000 frames; 950 for training
            split_seed=settings.split,
            test=str(Path(test_path).resolve()),
            train_size=settings.train_frames,
            test_size=settings.test_frames,
        ),
        dtype=settings.dtype,
        budget_minutes=settings.budget_minutes,
        max_epochs=settings.max_epochs,
        md_check=MDCheckConfig(steps=settings.md_check_steps),
        progress_bar=settings.progress_bar,
    )


# ----------------------------------------------------------------------------------------------- runs
def _run_one(settings: BenchmarkSettings, molecule: str, model: str, log: Callable[[str], None]) -> BenchmarkResult:
    preset = get_preset(model, settings.size)
    train_path, test_path = prepare_data(settings, molecule, log)
    run_dir = Path(settings.out_dir) / f"{molecule}_{model}"
    cfg = benchmark_config(preset, settings, train_path, test_path, run_dir)
    meta = train_or_reuse(cfg, run_dir, force=settings.force, label=f"{molecule}/{model}", log=log)
    enable_x64_for(run_dir / "model.eqf")  # a reused float64 run loads without the trainer having switched x64 on
    _, params, _ = load_model(run_dir / "model.eqf")
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    tm = meta["test_metrics"] or {}
    nve = meta.get("nve_check") or {}
    return BenchmarkResult(
        molecule=molecule,
        model=model,
        size=settings.size,
        dtype=settings.dtype,
        hyperparameters=dict(preset.hyperparameters),
        n_params=n_params,
        n_train=int(meta["n_train"]),
        n_valid=int(meta["n_valid"]),
        n_test=int(meta["n_test"] or 0),
        epochs=int(meta["trained_epochs"]),
        training_time_s=float(meta["training_time_s"]),
        first_step_s=meta.get("first_step_s"),
        stopped_because=str(meta["stopped_because"]),
        energy_mae_meV=float(tm.get("energy_mae_meV", float("nan"))),
        forces_mae_meV_per_A=float(tm.get("forces_mae_meV_per_A", float("nan"))),
        energy_rmse_meV=float(tm.get("energy_rmse_meV", float("nan"))),
        forces_rmse_meV_per_A=float(tm.get("forces_rmse_meV_per_A", float("nan"))),
        nve_drift_meV_per_atom_per_ps=None if nve.get("blew_up", True) else nve.get("drift_meV_per_atom_per_ps"),
        device=device_description(),
        model_path=str(run_dir / "model.eqf"),
    )


def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> list[BenchmarkResult]:
    """Run every (molecule, model) of ``settings`` in turn; rewrite the tables after each run.

    Returns:
      The results in run order (molecule-major).

    Raises:
      DataError: the split files are missing or bad.
      ValueError: a bad setting (raised before any training).
    """
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[BenchmarkResult] = []
    for molecule in settings.molecules:
        for model in settings.models:
            log(f"=== rMD17 {molecule} / {model} ({settings.size} size, {settings.budget_minutes:g} min budget)")
            results.append(_run_one(settings, molecule, model, log))
            _write_tables(settings, results)
    log(f"results: {out / 'results.md'}")
    return results


def _write_tables(settings: BenchmarkSettings, results: Sequence[BenchmarkResult]) -> None:
    out = Path(settings.out_dir)
    payload = {
        "settings": dataclasses.asdict(settings),
        "published_source": PUBLISHED_SOURCE,
        "results": [dataclasses.asdict(r) for r in results],
    }
    atomic_write_bytes(out / "results.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "results.md", markdown_table(settings, results).encode())


def markdown_table(settings: BenchmarkSettings, results: Sequence[BenchmarkResult]) -> str:
    """The results as a Markdown section: protocol line, table, published-values source."""
    devices = sorted({r.device for r in results}) or [device_description()]
    if settings.standard_protocol:
        frames = "950 training / 50 validation frames of the split's training file, 1,000 test frames"
    else:
        frames = (
            f"NON-STANDARD quick check: {settings.train_frames or 950} training frames, "
            f"{settings.test_frames or 1000} test frames"
        )
    lines = [
        f"## rMD17 split {settings.split:02d}: {settings.size}-size models, {settings.dtype}",
        "",
        f"{frames}; wall-clock budget {settings.budget_minutes:g} min per model (compilation included); "
        f"device: {', '.join(devices)}. Run time: training (stopped by the budget or max_epochs), then the "
        "test evaluation and the NVE check. Energy errors are raw (E0s re-fitted after training).",
        "",
        "| Molecule | Model | Parameters | Epochs | Run time | E MAE (meV) | F MAE (meV/Å) "
        "| Published E / F | NVE drift (meV/atom/ps) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        pub = f"{r.published[0]:g} / {r.published[1]:g}" if r.published else "—"
        drift = "blew up" if r.nve_drift_meV_per_atom_per_ps is None else f"{r.nve_drift_meV_per_atom_per_ps:+.3f}"
        if settings.md_check_steps == 0:
            drift = "—"
        lines.append(
            f"| {r.molecule} | {r.model} | {r.n_params:,} | {r.epochs} | {fmt_time(r.training_time_s)} "
            f"| {r.energy_mae_meV:.1f} | {r.forces_mae_meV_per_A:.1f} | {pub} | {drift} |"
        )
    lines += ["", f"Published: {PUBLISHED_SOURCE}.", ""]
    lines.append("Model sizes (hyperparameters):")
    lines.append("")
    for model in dict.fromkeys(r.model for r in results):
        hp = next(r.hyperparameters for r in results if r.model == model)
        lines.append(f"- {model}: " + ", ".join(f"{k}={v}" for k, v in hp.items()))
    return "\n".join(lines) + "\n"
