"""The periodic-materials benchmark: energy per atom, force and stress errors, and NVE on a supercell.

``equiforce benchmark rmd17`` measures molecules; this command does the same for periodic data with
stress, e.g. the LiPS20 Li–P–S AIMD systems (EGraFFBench, Bihani et al. 2023, arXiv:2310.02428) and
DeePMD-kit's liquid-water example. It runs offline on files the user has: any path
:func:`equiforce.data.readers.read_structures` reads (a DeePMD folder, extxyz with stress, ASE db, HDF5, ...).

Protocol, per dataset (one path = one dataset; a folder with several DeePMD systems is pooled):

* the frames are split once, seeded (``seed``), into a test set (``test_fraction`` of them, at most
  ``test_frames``) and a training pool; ``valid_fraction`` of the pool is held out for validation and
  ``train_frames`` of the rest (written shuffled, so a random subset) are trained on;
* every model trains with the same loss (energy per atom, forces, stress), optimiser, EMA and schedule
  under a wall-clock budget (compilation included); its size and learning rate come from
  :mod:`equiforce.benchmark.presets`, as for rMD17;
* test errors: energy per atom (meV/atom, raw: E0s re-fitted after training), forces (meV/Å), stress
  (meV/Å³, ASE sign, over the frames that have a stress label);
* NVE on a supercell of the first validation frame (``nve_supercell`` repetitions, more where the cutoff
  needs it): drift of the total energy, meV/atom/ps.

AIMD frames are correlated in time, so a random split measures interpolation between nearby frames, as in
EGraFFBench's protocol: it ranks models, it does not promise the error on unseen conditions.

Outputs in ``out_dir``: the split data as HDF5 in ``data/``, one training run per (dataset, model) in
``<dataset>_<model>/``, and ``results.json`` / ``results.md`` (rewritten atomically after every run). A
finished run with an unchanged configuration is reused and an interrupted one resumes, as for rMD17.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from equiforce.benchmark.presets import Preset, get_preset
from equiforce.benchmark.protocol import device_description, fmt_time, protocol_config, train_or_reuse
from equiforce.data.errors import DataError
from equiforce.data.hdf5 import read_hdf5, write_hdf5
from equiforce.potentials.model_io import atomic_write_bytes, enable_x64_for, load_model

__all__ = [
    "MaterialsResult",
    "MaterialsSettings",
    "markdown_table",
    "materials_config",
    "prepare_dataset",
    "run_materials_benchmark",
]


@dataclasses.dataclass(frozen=True)
class MaterialsSettings:
    """What to run.

    Attributes:
      datasets: paths of the datasets (anything :func:`~equiforce.data.readers.read_structures` reads).
      names: a short name per dataset for the run folders and the table (default: from the path).
      models: registered model names with a preset.
      budget_minutes: wall-clock training budget per (dataset, model), compilation included.
      size: preset size, ``"cpu"`` or ``"paper"``.
      dtype: ``"float32"`` or ``"float64"``.
      out_dir: where the split data, runs and tables go.
      format: reader format for every dataset (``None``: detected).
      test_fraction: share of each dataset's frames held out for testing, in (0, 1).
      test_frames: at most this many test frames (``None``: all of ``test_fraction``).
      train_frames: training frames from the pool (``None``: all that validation leaves).
      valid_fraction: share of the pool held out for validation (before ``train_frames`` is applied).
      stress_weight: weight of the stress term of the loss (stress in eV/Å³; energy is per atom; see
        :class:`~equiforce.training.config.LossConfig`).
      nve_supercell: minimal repetitions of the NVE check's start cell.
      md_check_steps: NVE steps after training (0: no check).
      seed: split, initialisation and shuffling seed.
      max_epochs: upper bound on epochs (the budget usually stops first).
      force: retrain even if a finished run with the same configuration exists.
      progress_bar: show the training progress bar.
    """

    datasets: tuple[str, ...]
    names: tuple[str, ...] | None = None
    models: tuple[str, ...] = ("mace", "nequip")
    budget_minutes: float = 15.0
    size: str = "cpu"
    dtype: str = "float32"
    out_dir: str = "runs/benchmark_materials"
    format: str | None = None
    test_fraction: float = 0.2
    test_frames: int | None = None
    train_frames: int | None = None
    valid_fraction: float = 0.05
    stress_weight: float = 1.0e4
    nve_supercell: tuple[int, int, int] = (2, 2, 2)
    md_check_steps: int = 1000
    seed: int = 0
    max_epochs: int = 100_000
    force: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("no dataset given")
        if self.names is not None and len(self.names) != len(self.datasets):
            raise ValueError(f"{len(self.names)} names for {len(self.datasets)} datasets")
        names = self.dataset_names
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must differ, got {list(names)} (give names)")
        for m in self.models:
            get_preset(m, self.size)  # raises on unknown model / size
        if not self.budget_minutes > 0:
            raise ValueError("budget_minutes must be positive")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must lie in (0, 1), got {self.valid_fraction}")
        for name in ("train_frames", "test_frames"):
            v = getattr(self, name)
            if v is not None and v < 2:
                raise ValueError(f"{name} must be >= 2")
        if len(self.nve_supercell) != 3 or min(self.nve_supercell) < 1:
            raise ValueError(f"nve_supercell must be three integers >= 1, got {self.nve_supercell}")
        if self.stress_weight < 0:
            raise ValueError("stress_weight must be >= 0")

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """The names of the datasets: given, or the path's last component(s) made file-name safe."""
        if self.names is not None:
            return tuple(self.names)
        return tuple(_name_of(p) for p in self.datasets)


def _name_of(path: str) -> str:
    p = Path(path)
    stem = p.stem if p.is_file() else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "dataset"


@dataclasses.dataclass(frozen=True)
class MaterialsResult:
    """One (dataset, model) run, as written to ``results.json``."""

    dataset: str
    path: str
    model: str
    size: str
    dtype: str
    hyperparameters: dict[str, Any]
    n_params: int
    formulas: list[str]
    atoms_per_frame: list[int]
    n_train: int
    n_valid: int
    n_test: int
    n_test_with_stress: int
    epochs: int
    training_time_s: float
    stopped_because: str
    energy_per_atom_mae_meV: float
    forces_mae_meV_per_A: float
    stress_mae_meV_per_A3: float | None
    energy_per_atom_rmse_meV: float
    forces_rmse_meV_per_A: float
    stress_rmse_meV_per_A3: float | None
    nve_atoms: int | None
    nve_supercell: list[int] | None
    nve_drift_meV_per_atom_per_ps: float | None
    nve_status: str
    device: str
    model_path: str


# ------------------------------------------------------------------------------------------------ data
def prepare_dataset(
    settings: MaterialsSettings, index: int, log: Callable[[str], None] = print
) -> tuple[Path, Path, dict[str, Any]]:
    """Split dataset ``index`` (seeded) and write the training pool (shuffled) and the test set as HDF5.

    The files are written once per (dataset, split settings) and reused after; a sidecar JSON records the
    source path and the split so that a changed split is never mixed up with an old one.

    Returns:
      ``(train_path, test_path, info)`` with ``info``: formulas, atoms per frame, frame counts.

    Raises:
      DataError: the dataset cannot be read, has no energy/forces labels, or has too few frames.
    """
    from equiforce.data.readers import read_structures

    name = settings.dataset_names[index]
    source = Path(settings.datasets[index]).expanduser().resolve()
    folder = Path(settings.out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    key = {
        "source": str(source),
        "format": settings.format,
        "seed": settings.seed,
        "test_fraction": settings.test_fraction,
        "test_frames": settings.test_frames,
    }
    train_path, test_path = folder / f"{name}_train.h5", folder / f"{name}_test.h5"
    info_path = folder / f"{name}_split.json"
    if train_path.is_file() and test_path.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if info.get("key") == key:
                read_hdf5(train_path, slice(0, 1))  # a truncated or foreign file must not pass silently
                read_hdf5(test_path, slice(0, 1))
                return train_path, test_path, info
        except (DataError, ValueError, OSError):
            pass
    data = read_structures(source, settings.format)
    if data.energy is None or data.forces is None:
        raise DataError(f"{source}: the benchmark needs energy and forces labels")
    n = len(data)
    n_test = min(max(1, round(settings.test_fraction * n)), settings.test_frames or n)
    if n - n_test < 4:
        raise DataError(f"{source}: {n} frames are too few for a test set of {n_test} and a training set")
    order = np.random.default_rng(settings.seed).permutation(n)
    test, pool = data.subset(np.sort(order[:n_test])), data.subset(order[n_test:])
    write_hdf5(train_path, pool, overwrite=True)
    write_hdf5(test_path, test, overwrite=True)
    formulas = sorted({data.to_atoms(k).get_chemical_formula() for k in _first_of_each_size(data)})
    info = {
        "key": key,
        "formulas": formulas,
        "atoms_per_frame": sorted({int(a) for a in data.n_atoms}),
        "n_frames": n,
        "n_test": n_test,
        "n_pool": n - n_test,
        "n_test_with_stress": int(np.sum(test.has_stress)),
    }
    atomic_write_bytes(info_path, json.dumps(info, indent=2).encode())
    log(f"{name}: {n} frames ({', '.join(formulas)}) -> {n - n_test} for training, {n_test} for testing, in {folder}")
    return train_path, test_path, info


def _first_of_each_size(data: Any) -> list[int]:
    """One frame index per distinct composition (element counts) — enough to name the formulas."""
    seen: dict[tuple, int] = {}
    for k in range(len(data)):
        seen.setdefault(tuple(np.bincount(data.atomic_numbers[data.atom_slice(k)], minlength=119)), k)
    return sorted(seen.values())


# --------------------------------------------------------------------------------------------- configs
def materials_config(preset: Preset, settings: MaterialsSettings, train_path: Path, test_path: Path, run_dir: Path):
    """The :class:`~equiforce.training.config.TrainConfig` of one run (the shared protocol + the preset)."""
    from equiforce.training.config import DataConfig, MDCheckConfig

    return protocol_config(
        preset,
        seed=settings.seed,
        run_dir=run_dir,
        data=DataConfig(
            train=str(Path(train_path).resolve()),
            valid_fraction=settings.valid_fraction,
            split_seed=settings.seed,
            test=str(Path(test_path).resolve()),
            format="hdf5",
            train_size=settings.train_frames,
        ),
        dtype=settings.dtype,
        budget_minutes=settings.budget_minutes,
        max_epochs=settings.max_epochs,
        md_check=MDCheckConfig(
            steps=settings.md_check_steps, supercell=tuple(settings.nve_supercell), timestep_fs=1.0, report_interval=20
        ),
        progress_bar=settings.progress_bar,
        stress_weight=settings.stress_weight,
        uncertainty=False,
    )


# ----------------------------------------------------------------------------------------------- runs
def _run_one(settings: MaterialsSettings, index: int, model: str, log: Callable[[str], None]) -> MaterialsResult:
    name = settings.dataset_names[index]
    preset = get_preset(model, settings.size)
    train_path, test_path, info = prepare_dataset(settings, index, log)
    run_dir = Path(settings.out_dir) / f"{name}_{model}"
    cfg = materials_config(preset, settings, train_path, test_path, run_dir)
    meta = train_or_reuse(cfg, run_dir, force=settings.force, label=f"{name}/{model}", log=log)
    enable_x64_for(run_dir / "model.eqf")
    _, params, _ = load_model(run_dir / "model.eqf")
    tm = meta["test_metrics"] or {}
    nve = meta.get("nve_check") or {}
    drift = nve.get("drift_meV_per_atom_per_ps")
    return MaterialsResult(
        dataset=name,
        path=str(settings.datasets[index]),
        model=model,
        size=settings.size,
        dtype=settings.dtype,
        hyperparameters=dict(preset.hyperparameters),
        n_params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
        formulas=list(info["formulas"]),
        atoms_per_frame=list(info["atoms_per_frame"]),
        n_train=int(meta["n_train"]),
        n_valid=int(meta["n_valid"]),
        n_test=int(meta["n_test"] or 0),
        n_test_with_stress=int(info["n_test_with_stress"]),
        epochs=int(meta["trained_epochs"]),
        training_time_s=float(meta["training_time_s"]),
        stopped_because=str(meta["stopped_because"]),
        energy_per_atom_mae_meV=float(tm.get("energy_per_atom_mae_meV", float("nan"))),
        forces_mae_meV_per_A=float(tm.get("forces_mae_meV_per_A", float("nan"))),
        stress_mae_meV_per_A3=tm.get("stress_mae_meV_per_A3"),
        energy_per_atom_rmse_meV=float(tm.get("energy_per_atom_rmse_meV", float("nan"))),
        forces_rmse_meV_per_A=float(tm.get("forces_rmse_meV_per_A", float("nan"))),
        stress_rmse_meV_per_A3=tm.get("stress_rmse_meV_per_A3"),
        nve_atoms=nve.get("n_atoms"),
        nve_supercell=nve.get("supercell"),
        nve_drift_meV_per_atom_per_ps=None if drift is None or not np.isfinite(drift) else float(drift),
        nve_status=str(nve.get("status", "off")),
        device=device_description(),
        model_path=str(run_dir / "model.eqf"),
    )


def run_materials_benchmark(settings: MaterialsSettings, log: Callable[[str], None] = print) -> list[MaterialsResult]:
    """Run every (dataset, model) of ``settings`` in turn; rewrite the tables after each run.

    Returns:
      The results in run order (dataset-major).

    Raises:
      DataError: a dataset cannot be read, lacks energy/force labels or has too few frames.
      ValueError: a bad setting (raised before any training).
    """
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[MaterialsResult] = []
    for i, name in enumerate(settings.dataset_names):
        for model in settings.models:
            log(f"=== {name} / {model} ({settings.size} size, {settings.budget_minutes:g} min budget)")
            results.append(_run_one(settings, i, model, log))
            _write_tables(settings, results)
    log(f"results: {out / 'results.md'}")
    return results


def _write_tables(settings: MaterialsSettings, results: Sequence[MaterialsResult]) -> None:
    out = Path(settings.out_dir)
    payload = {"settings": dataclasses.asdict(settings), "results": [dataclasses.asdict(r) for r in results]}
    atomic_write_bytes(out / "results.json", json.dumps(payload, indent=2).encode())
    atomic_write_bytes(out / "results.md", markdown_table(settings, results).encode())


def markdown_table(settings: MaterialsSettings, results: Sequence[MaterialsResult]) -> str:
    """The results as a Markdown section: protocol line, table, model sizes."""
    devices = sorted({r.device for r in results}) or [device_description()]
    train = "the rest of the pool" if settings.train_frames is None else f"{settings.train_frames} frames of the rest"
    lines = [
        f"## Periodic materials: {settings.size}-size models, {settings.dtype}",
        "",
        f"Seeded random split (seed {settings.seed}): {settings.test_fraction:g} of each dataset's frames for "
        f"testing, {settings.valid_fraction:g} of the others for validation, training on {train}; loss weights "
        f"energy/atom 1, forces 10, stress {settings.stress_weight:g}; wall-clock budget "
        f"{settings.budget_minutes:g} min per model (compilation included); device: {', '.join(devices)}. "
        "Energy errors per atom, raw (E0s re-fitted after training); stress in ASE's sign over the test frames "
        "with a stress label. NVE: "
        f"{settings.md_check_steps} steps of 1 fs at 300 K from a validation frame, on at least a "
        f"{'x'.join(map(str, settings.nve_supercell))} supercell.",
        "",
        "| Dataset | Atoms | Model | Parameters | Train / test | Epochs | Run time | E MAE (meV/atom) "
        "| F MAE (meV/Å) | σ MAE (meV/Å³) | NVE atoms | NVE drift (meV/atom/ps) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        stress = "—" if r.stress_mae_meV_per_A3 is None else f"{r.stress_mae_meV_per_A3:.2f}"
        if settings.md_check_steps == 0:
            drift = "—"
        elif r.nve_status == "blew_up":
            drift = "blew up"
        elif r.nve_drift_meV_per_atom_per_ps is None:
            drift = r.nve_status
        else:
            drift = f"{r.nve_drift_meV_per_atom_per_ps:+.3f}"
        atoms = "/".join(map(str, r.atoms_per_frame))
        lines.append(
            f"| {r.dataset} ({', '.join(r.formulas)}) | {atoms} | {r.model} | {r.n_params:,} "
            f"| {r.n_train} / {r.n_test} | {r.epochs} | {fmt_time(r.training_time_s)} "
            f"| {r.energy_per_atom_mae_meV:.2f} | {r.forces_mae_meV_per_A:.1f} | {stress} "
            f"| {r.nve_atoms if r.nve_atoms is not None else '—'} | {drift} |"
        )
    lines += ["", "Model sizes (hyperparameters):", ""]
    for model in dict.fromkeys(r.model for r in results):
        hp = next(r.hyperparameters for r in results if r.model == model)
        lines.append(f"- {model}: " + ", ".join(f"{k}={v}" for k, v in hp.items()))
    return "\n".join(lines) + "\n"
