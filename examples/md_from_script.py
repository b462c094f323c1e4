"""Run NVT (Langevin) molecular dynamics with a trained equiforce potential from a Python script.

    python -m equiforce train examples/aspirin_cpu.yaml     # once: writes examples/runs/aspirin_cpu/model.eqf
    python examples/md_from_script.py                       # 2000 steps of aspirin at 300 K
    python examples/md_from_script.py --model my.eqf --structure start.extxyz --steps 20000

:func:`equiforce.md.run_md` compiles the whole integrator (jax-md) and runs it in chunks of
``--report-interval`` steps; after each chunk one frame goes to the H5MD trajectory (positions Å,
velocities Å/ps, energies eV) and one row to the thermo CSV. The run is restartable exactly from the
trajectory file (``run_md(..., restart=True)``). Outputs in ``--out``: ``md.h5``, ``thermo.csv``,
``final.extxyz`` (the last frame, positions and velocities).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="NVT Langevin MD with a trained equiforce potential.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (.eqf)")
    p.add_argument(
        "--structure",
        default="sample:test:0",
        help="starting structure: any file ase reads (path or path@index, default its last frame), "
        "or sample:test:K / sample:train:K for frame K of the shipped rMD17 aspirin data",
    )
    p.add_argument("--steps", type=int, default=2000, help="MD steps (rounded up to whole report intervals)")
    p.add_argument("--timestep", type=float, default=0.5, help="time step in fs")
    p.add_argument("--temperature", type=float, default=300.0, help="thermostat temperature in K")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction in 1/ps")
    p.add_argument("--report-interval", type=int, default=50, help="steps between trajectory frames")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat noise")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "md_from_script", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        print(
            f"no model file at {args.model}; train one first (`python -m equiforce train examples/aspirin_cpu.yaml`"
            " or `python examples/train_from_trajectory.py`), then pass --model PATH",
            file=sys.stderr,
        )
        return 2

    import ase.io
    import numpy as np
    from ase import Atoms

    from equiforce.md import ASE_VELOCITY_TO_A_PER_PS, load_structure, read_h5md, run_md

    atoms = load_structure(args.structure)  # an ase.Atoms; a DFT label calculator on it is ignored
    args.out.mkdir(parents=True, exist_ok=True)
    trajectory, thermo = args.out / "md.h5", args.out / "thermo.csv"
    print(f"{len(atoms)} atoms ({atoms.get_chemical_formula()}), model {args.model}")

    result = run_md(
        args.model,  # a model file path, or (potential, params) from equiforce.potentials.load_model
        atoms,
        ensemble="nvt_langevin",  # also "nve" and "nvt_nose_hoover"
        temperature_K=args.temperature,  # initial Maxwell-Boltzmann velocities and thermostat target
        timestep_fs=args.timestep,
        steps=args.steps,
        report_interval=args.report_interval,
        friction_per_ps=args.friction,
        seed=args.seed,
        trajectory=trajectory,
        thermo=thermo,
        progress=not args.no_progress,
    )
    last = result.frames[-1]
    print(
        f"ran {result.steps} steps ({result.steps * args.timestep / 1000:.3f} ps): "
        f"{result.ns_per_day:.3g} ns/day ({result.steps_per_s:.1f} steps/s after "
        f"{result.first_chunk_s:.1f} s for the first chunk, compilation included)"
    )
    print(f"final temperature {last.temperature:.1f} K, potential energy {last.potential_energy:.4f} eV")

    # Reading the outputs back. The H5MD file holds every reported frame (committed frames only, so it is
    # readable while a run is going on or after it was killed).
    traj = read_h5md(trajectory)
    temperatures = traj["observables"]["temperature"]
    print(
        f"{trajectory}: {len(traj['step'])} frames, positions {traj['positions'].shape} Å, "
        f"mean temperature {np.mean(temperatures):.1f} K, last step {int(traj['step'][-1])}"
    )
    # The thermo CSV has a header row: step,time_ps,potential_energy_eV,...,temperature_K,conserved_eV.
    table = np.genfromtxt(thermo, delimiter=",", names=True)
    print(f"{thermo}: {table.size} rows, columns {', '.join(table.dtype.names)}")
    # Any frame as an ase.Atoms, e.g. to continue with ASE or to look at it in a viewer (velocities Å/ps ->
    # ASE units; result.final_atoms is the same last state).
    final = Atoms(numbers=traj["species"], positions=traj["positions"][-1], pbc=traj["pbc"])
    final.set_velocities(traj["velocities"][-1] / ASE_VELOCITY_TO_A_PER_PS)
    ase.io.write(args.out / "final.extxyz", final)
    print(f"last frame written to {args.out / 'final.extxyz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
