"""Choosing the MD precision: the same NVE run in float32, mixed and float64, energy drift against speed.

    python -m equiforce train examples/aspirin_cpu.yaml   # once: writes examples/runs/aspirin_cpu/model.eqf
    python examples/precision.py                          # 4000 NVE steps of aspirin in each precision
    python examples/precision.py --model my.eqf --structure start.extxyz --steps 20000

``run_md(..., precision=...)``:

* ``float32``: network, positions and integrator in float32. Fastest; energies are summed without the
  constant Σ E0, so even a molecule whose total energy is −17,600 eV resolves meV changes.
* ``mixed``: float32 network; float64 positions, per-atom energy sums and integrator. Nearly float32's speed,
  and round-off no longer accumulates in the positions over long runs.
* ``float64``: everything in float64 (the network's weights are cast). Slowest; the reference.

``mixed`` and ``float64`` need JAX's 64-bit types (``jax_enable_x64``). ``run_md`` switches them on itself
while the program holds no JAX array yet, and refuses otherwise (arrays made before would silently stay 32-bit);
this script runs several precisions in one program, so it switches them on at start-up. A float32 run keeps
its float32 network, positions and integrator either way.
The table printed at the end has the drift of the total energy (meV/atom/ps), its fluctuation
and the steps per second of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="NVE in float32, mixed and float64: drift against speed.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (.eqf)")
    p.add_argument("--structure", default="sample:test:0", help="a file ase reads, or sample:test:K")
    p.add_argument("--steps", type=int, default=4000, help="NVE steps per precision")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--temperature", type=float, default=300.0, help="initial temperature, K")
    p.add_argument("--precisions", nargs="+", default=["float32", "mixed", "float64"])
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
    if any(p != "float32" for p in args.precisions):
        import jax

        jax.config.update("jax_enable_x64", True)  # before any JAX array exists (see the docstring)
    from equiforce.md import load_structure, run_md

    atoms = load_structure(args.structure)
    rows = []
    for precision in args.precisions:
        result = run_md(
            args.model,
            atoms,
            ensemble="nve",
            temperature_K=args.temperature,
            timestep_fs=args.timestep,
            steps=args.steps,
            report_interval=max(args.steps // 20, 1),
            precision=precision,
            seed=0,  # the same initial velocities in every run
            progress=False,
        )
        rows.append((precision, result))
    print(f"{atoms.get_chemical_formula()}, {args.steps} NVE steps of {args.timestep} fs from {args.temperature:g} K")
    print("| precision | drift (meV/atom/ps) | fluctuation (meV/atom) | steps/s |")
    print("|---|---:|---:|---:|")
    for precision, r in rows:
        print(
            f"| {precision} | {r.drift_meV_per_atom_per_ps:+.4f} | {r.fluctuation_meV_per_atom:.4f} "
            f"| {r.steps_per_s:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
