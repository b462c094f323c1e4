"""NPT molecular dynamics of a crystal: train a periodic potential with stress, then let the cell relax at T, P.

    python examples/npt_crystal.py                 # fcc Cu: EMT labels, a small NequIP, 2 ps NPT at 300 K, 0 GPa
    python examples/npt_crystal.py --model my.eqf --structure POSCAR --pressure 1.0
    python examples/npt_crystal.py --tiny          # seconds: a toy model, just to see the flow

Without ``--model`` the script makes its own periodic training data, so that it runs anywhere: strained and
rattled fcc copper cells labelled with ASE's EMT potential (energy eV, forces eV/Å, stress eV/Å³ in ASE's
sign), written to extended XYZ exactly as DFT data from another code would be. It trains on energies, forces
*and stress* (``loss.stress_weight``), which NPT needs: the barostat is driven by the virial.

The NPT run (``ensemble="npt_nose_hoover"``, jax-md's Nosé–Hoover chains for particles and box) starts from
a 3x3x3 supercell with the lattice constant deliberately 1 % off, and the cell finds the model's equilibrium
volume. Outputs in ``--out``: ``cu_train.extxyz``, the training run (``model.eqf``, ...), ``npt.h5``,
``npt.csv`` (volume Å³ and pressure GPa per frame) and ``npt.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_emt_data(path: Path, n_frames: int, seed: int = 0) -> Path:
    """Strained and rattled 32-atom fcc Cu cells with EMT energy, forces and stress, as extended XYZ."""
    import ase.io
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        strain = np.eye(3) + 0.02 * rng.normal(size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.positions += 0.05 * rng.normal(size=atoms.positions.shape)
        atoms.calc = EMT()
        labels = dict(energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
        atoms.calc = SinglePointCalculator(atoms, **labels)  # what a DFT code's output looks like to ase
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def train_model(out: Path, tiny: bool) -> Path:
    from equiforce.training import load_config, train

    data = make_emt_data(out / "cu_train.extxyz", 20 if tiny else 200)
    overrides = [
        f"data.train={data}",
        "data.test=null",
        "data.valid_fraction=0.1",
        f"output_dir={out / 'train'}",
        "model.name=nequip",
        "model.r_max=4.0",  # Å; the NPT cell (10.8 Å) must stay wider than 2 r_max
        "loss.stress_weight=1e4",  # stress in eV/Å³ is small: weight it up
        "optim.batch_size=4",
        "model.uncertainty=false",
        "md_check.steps=0",
        "progress_bar=false",
    ]
    if tiny:
        overrides += [
            "model.hyperparameters={num_interactions: 1, l_max: 1, num_features: 4, num_bessel: 4}",
            "optim.max_epochs=2",
        ]
    else:
        overrides += [
            "model.hyperparameters={num_interactions: 2, l_max: 1, num_features: 16}",
            "optim.max_epochs=60",
            "optim.time_budget_minutes=5",
        ]
    return train(load_config(None, overrides)).model_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="NPT MD of a crystal with an equiforce potential.")
    p.add_argument("--model", type=Path, help="a periodic model file (default: train one on EMT copper)")
    p.add_argument("--structure", help="start structure, any file ase reads (default: fcc Cu 3x3x3, a 1 %% off)")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--pressure", type=float, default=0.0, help="GPa")
    p.add_argument("--steps", type=int, default=4000, help="MD steps of --timestep fs")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "npt_crystal", help="output folder")
    p.add_argument("--tiny", action="store_true", help="a toy model and 200 steps, in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ase.io
    import numpy as np
    from ase.build import bulk

    from equiforce.md import run_md
    from equiforce.md.plots import plot_thermo, read_thermo

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or train_model(args.out, args.tiny)
    if args.structure:
        atoms = ase.io.read(args.structure)
    else:
        atoms = bulk("Cu", "fcc", a=3.6 * 1.01, cubic=True).repeat((3, 3, 3))  # 108 atoms, 1 % expanded
    steps = 200 if args.tiny else args.steps
    result = run_md(
        model,
        atoms,
        ensemble="npt_nose_hoover",  # Nosé–Hoover chains for the particles and the box (jax-md)
        temperature_K=args.temperature,
        pressure_GPa=args.pressure,  # target pressure; the box follows the model's stress
        timestep_fs=args.timestep,
        steps=steps,
        report_interval=50,
        trajectory=args.out / "npt.h5",
        thermo=args.out / "npt.csv",
        progress=False,
    )
    thermo = read_thermo(args.out / "npt.csv")  # columns by name: volume_A3, pressure_GPa, temperature_K, ...
    half = len(thermo["volume_A3"]) // 2
    v0, v, p = thermo["volume_A3"][0], thermo["volume_A3"][half:], thermo["pressure_GPa"][half:]
    print(
        f"{len(atoms)} atoms, {result.steps} steps of {args.timestep} fs at {args.temperature:g} K, "
        f"{args.pressure:g} GPa: volume {v0:.1f} -> {np.mean(v):.1f} Å³ (mean of the second half), "
        f"mean pressure {np.mean(p):+.2f} GPa, {result.steps_per_s:.1f} steps/s"
    )
    a = (np.mean(v) / len(atoms) * 4) ** (1 / 3)  # fcc: 4 atoms per cubic cell
    print(f"lattice constant from the mean volume: {a:.3f} Å (the start: {3.6 * 1.01:.3f} Å)")
    plot_thermo(args.out / "npt.csv", args.out / "npt.png", n_atoms=len(atoms))
    print(f"trajectory {args.out / 'npt.h5'}, thermo {args.out / 'npt.csv'}, plot {args.out / 'npt.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
