"""The accuracy benchmarks from Python: rMD17 (molecules) and periodic materials with stress.

    python examples/benchmark_quick.py --rmd17-dir ../rmd17-npz --materials lips20/beta-Li3PS4 water/
    python examples/benchmark_quick.py --tiny      # seconds: one epoch on a few frames, to see the flow

The same runs from the shell::

    equiforce benchmark rmd17 --data-dir ../rmd17-npz --molecules aspirin ethanol --models mace nequip \\
        --budget-minutes 30 --out runs/benchmark_rmd17
    equiforce benchmark materials lips20/beta-Li3PS4 water/ --models mace nequip --budget-minutes 15 \\
        --out runs/benchmark_materials

Both train every model under one shared protocol (loss, optimiser, EMA, plateau schedule, a wall-clock budget
per model, compilation included), evaluate it on held-out frames, run an NVE energy-conservation check, and
write ``results.md`` (a Markdown table) and ``results.json``. A finished run with the same settings is reused
and an interrupted one resumes, so re-issuing a command after a kill loses nothing.

* rMD17: the official split files (``rmd17_<molecule>_{train,test}_<kk>.npz`` of GitHub
  ``andersx/rmd17-npz``); 950 training / 50 validation / 1000 test frames; errors beside the published ones.
* materials: any periodic data (a DeePMD folder, extxyz with stress, ...); a seeded random split; energy
  per atom, force and stress errors; NVE on a supercell.

``--tiny`` lays out the shipped aspirin split-01 files as an rMD17 folder and makes a small EMT copper
dataset in DeePMD's layout (virial W = −σV, DeePMD's sign), and trains one epoch on a few frames of each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tiny_data(out: Path) -> tuple[Path, Path]:
    """An rMD17 folder with the shipped aspirin split 01, and EMT Cu frames written as a DeePMD system."""
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from equiforce.data.readers import sample_path

    rmd17 = out / "rmd17"
    rmd17.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        shutil.copy(sample_path(f"rmd17_aspirin_{part}_01.npz"), rmd17 / f"rmd17_aspirin_{part}_01.npz")
    system = out / "cu_deepmd"
    (system / "set.000").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    boxes, coords, energies, forces, virials = [], [], [], [], []
    for _ in range(20):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.01 * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.positions += 0.05 * rng.normal(size=atoms.positions.shape)
        atoms.calc = EMT()
        boxes.append(atoms.cell[:].reshape(9))
        coords.append(atoms.positions.reshape(-1))
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces().reshape(-1))
        virials.append((-atoms.get_stress(voigt=False) * atoms.get_volume()).reshape(9))  # DeePMD: W = −σ V
    (system / "type.raw").write_text(" ".join(["0"] * 32))
    (system / "type_map.raw").write_text("Cu")
    for name, values in (("box", boxes), ("coord", coords), ("energy", energies), ("force", forces),
                         ("virial", virials)):  # fmt: skip
        np.save(system / "set.000" / f"{name}.npy", np.asarray(values))
    return rmd17, system


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The rMD17 and materials benchmarks from Python.")
    p.add_argument("--rmd17-dir", type=Path, help="folder of rmd17_<molecule>_{train,test}_<kk>.npz files")
    p.add_argument("--materials", nargs="*", default=[], help="periodic datasets (DeePMD folders, extxyz, ...)")
    p.add_argument("--models", nargs="+", default=["mace", "nequip"])
    p.add_argument("--budget-minutes", type=float, default=15.0, help="training budget per model")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "benchmarks", help="output folder")
    p.add_argument("--tiny", action="store_true", help="one epoch on a few frames, in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from equiforce.benchmark.materials import MaterialsSettings, run_materials_benchmark
    from equiforce.benchmark.rmd17 import BenchmarkSettings, run_benchmark

    rmd17_dir, materials = args.rmd17_dir, [str(p) for p in args.materials]
    quick: dict = {}
    if args.tiny:
        rmd17_dir, cu = tiny_data(args.out / "data")
        materials = [str(cu)]
        quick = dict(max_epochs=1, progress_bar=False)
    models = ("nequip",) if args.tiny else tuple(args.models)
    if rmd17_dir is not None:
        settings = BenchmarkSettings(
            molecules=("aspirin",),
            models=models,
            budget_minutes=args.budget_minutes,
            data_dir=str(rmd17_dir),
            out_dir=str(args.out / "rmd17"),
            **(dict(train_frames=10, test_frames=10, md_check_steps=0, **quick) if args.tiny else {}),
        )
        run_benchmark(settings)
        print((args.out / "rmd17" / "results.md").read_text())
    if materials:
        settings = MaterialsSettings(
            datasets=tuple(materials),
            models=models,
            budget_minutes=args.budget_minutes,
            out_dir=str(args.out / "materials"),
            **(dict(train_frames=10, md_check_steps=0, **quick) if args.tiny else {}),
        )
        run_materials_benchmark(settings)
        print((args.out / "materials" / "results.md").read_text())
    if rmd17_dir is None and not materials:
        print("nothing to run: give --rmd17-dir and/or --materials (or --tiny)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
