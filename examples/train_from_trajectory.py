"""Train an equiforce potential on a DFT trajectory file (extended XYZ or anything else equiforce reads).

    python examples/train_from_trajectory.py                      # demo: the shipped rMD17 aspirin frames
    python examples/train_from_trajectory.py --data my_md.extxyz  # your own labelled trajectory
    python examples/train_from_trajectory.py --tiny               # seconds: a toy model, just to see the flow

The data path is a plain file: without ``--data`` this script first writes frames of the shipped rMD17
aspirin sample to ``OUT/aspirin_train.extxyz`` (and a test file) with ``ase.io.write``, exactly as you would
export a DFT trajectory from another code, and then trains on that file. In a YAML config the same run is

    data:
      train: aspirin_train.extxyz   # any file ase reads, with energy= and forces (eV, eV/Å)
      test: aspirin_test.extxyz
    model:
      hyperparameters: {num_interactions: 2, l_max: 1, num_features: 16}

i.e. ``equiforce train that.yaml``. Here the config is built in Python with ``load_config(None, overrides)``
(the defaults plus ``key.sub=value`` overrides, as on the command line).

Outputs (in ``--out``): ``model.eqf`` (the trained potential, used by ``md_from_script.py`` and
``ase_relax_and_md.py``), ``metrics.jsonl``, ``final_metrics.json``, ``parity_test.png``, ``config.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_sample_trajectory(path: Path, split: str, n_frames: int) -> Path:
    """Write the first ``n_frames`` frames of the shipped rMD17 aspirin ``split`` as extended XYZ.

    Each ``ase.Atoms`` from :meth:`StructureSet.to_atoms` carries its DFT energy (eV) and forces (eV/Å)
    in a SinglePointCalculator; ``ase.io.write`` puts them into the extxyz comment line / ``forces`` column.
    """
    import ase.io

    from equiforce.data import load_sample

    structures = load_sample(split)
    frames = [structures.to_atoms(k) for k in range(min(n_frames, len(structures)))]
    ase.io.write(path, frames, format="extxyz")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an equiforce potential on a DFT trajectory file.")
    p.add_argument("--data", type=Path, help="labelled training file (default: export the shipped aspirin sample)")
    p.add_argument("--test", type=Path, help="labelled test file (default with --data: none)")
    p.add_argument("--format", help="force a reader: rmd17, md17, nequip, hdf5 or an ase format name")
    p.add_argument("--energy-unit", default="eV", help="energy unit of the file when its format does not fix it")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "train_from_trajectory", help="output folder")
    p.add_argument("--frames", type=int, help="frames exported from the sample for training (default 200)")
    p.add_argument("--test-frames", type=int, help="frames exported from the sample for testing (default 200)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs (default 100)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget for training (default 5)")
    p.add_argument("--r-max", type=float, default=5.0, help="cutoff radius in Å")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy model and data for a quick smoke run (tests)")
    return p.parse_args(argv)


def build_overrides(args: argparse.Namespace, train_file: Path, test_file: Path | None) -> list[str]:
    """The training config as ``key.sub=value`` overrides of the defaults (see the README's reference)."""
    if args.tiny:
        model = "{num_interactions: 1, num_features: 4, l_max: 1, parity: false}"
    else:
        model = "{num_interactions: 2, num_features: 16, l_max: 1, parity: false}"
    overrides = [
        f"seed={args.seed}",
        f"output_dir={args.out.resolve()}",  # absolute: relative paths are relative to the config's folder
        f"data.train={train_file.resolve()}",
        f"data.test={test_file.resolve() if test_file is not None else 'null'}",
        "data.valid_fraction=0.1",  # validation frames drawn (seeded) from the training file
        f"data.energy_unit={args.energy_unit}",
        f"model.r_max={args.r_max}",
        f"model.hyperparameters={model}",
        "optim.batch_size=5",
        f"optim.max_epochs={args.epochs if args.epochs is not None else (2 if args.tiny else 100)}",
        f"optim.time_budget_minutes={args.minutes}",
        "optim.plateau_patience=3",
    ]
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.tiny:
        # No post-training NVE energy-conservation check and no progress bar: a smoke run, not a model.
        overrides += ["md_check.steps=0", "progress_bar=false"]
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from equiforce.training import load_config, train

    args.out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        # Demo data: export frames of the shipped DFT sample to extxyz, as another code would.
        n_train = args.frames if args.frames is not None else (30 if args.tiny else 200)
        n_test = args.test_frames if args.test_frames is not None else (10 if args.tiny else 200)
        train_file = write_sample_trajectory(args.out / "aspirin_train.extxyz", "train", n_train)
        test_file = write_sample_trajectory(args.out / "aspirin_test.extxyz", "test", n_test)
        print(f"wrote {n_train} training frames to {train_file} and {n_test} test frames to {test_file}")
    else:
        train_file, test_file = args.data, args.test

    cfg = load_config(None, build_overrides(args, train_file, test_file))
    result = train(cfg)  # logs one line per epoch; writes model.eqf and the metrics files to cfg.output_dir

    print(f"stopped because: {result.stopped_because} after {len(result.history)} epoch(s)")
    for name, metrics in (("validation", result.valid_metrics), ("test", result.test_metrics)):
        if metrics:
            print(
                f"{name}: energy MAE {metrics['energy_mae_meV']:.1f} meV "
                f"({metrics['energy_per_atom_mae_meV']:.2f} meV/atom), "
                f"forces MAE {metrics['forces_mae_meV_per_A']:.1f} meV/Å"
            )
    print(f"model: {result.model_path}")
    print(f"next:  python {HERE / 'md_from_script.py'} --model {result.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
