"""NVE energy conservation and speed of a trained model in float32, float64 and mixed precision, one process.

Mixed precision (``run_md(..., precision="mixed")``): float32 network; float64 positions, per-atom energy sums
and integrator. The targets of issue 5: NVE drift within 2x of full float64, speed within 1.2x of full
float32. Every run starts from the same structure and velocities (seeded) and uses the same time step; the
drift is the slope of the conserved energy (meV/atom/ps), the fluctuation its standard deviation around the
fit; steps/s excludes the first (compiling) chunk.

    python benchmarks/precision.py MODEL.eqf sample:test:0 --timestep-fs 0.5 --steps 4000
"""

from __future__ import annotations

import argparse
import json

import jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a trained model file (.eqf)")
    ap.add_argument("structure", help="structure (path, path@index or sample:test:K)")
    ap.add_argument("--timestep-fs", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--report-interval", type=int, default=100)
    ap.add_argument("--temperature-K", type=float, default=300.0)
    ap.add_argument("--precisions", nargs="+", default=["float32", "mixed", "float64"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)

    from equiforce.md.run import load_structure, run_md
    from equiforce.potentials.model_io import load_model

    potential, params, _ = load_model(args.model)
    atoms = load_structure(args.structure)
    rows = []
    for precision in args.precisions:
        r = run_md(
            (potential, params),
            atoms,
            ensemble="nve",
            temperature_K=args.temperature_K,
            timestep_fs=args.timestep_fs,
            steps=args.steps,
            report_interval=args.report_interval,
            precision=precision,
            progress=False,
            log=lambda _: None,
        )
        row = {
            "precision": precision,
            "steps_per_s": r.steps_per_s,
            "first_chunk_s": r.first_chunk_s,
            "drift_meV_per_atom_per_ps": r.drift_meV_per_atom_per_ps,
            "fluctuation_meV_per_atom": r.fluctuation_meV_per_atom,
            "final_T_K": r.frames[-1].temperature,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{potential.model.name} ({potential.dtype} file), {len(atoms)} atoms, NVE {args.steps} steps of "
        f"{args.timestep_fs} fs\n"
    )
    print("| precision | steps/s | first chunk s | drift meV/atom/ps | fluctuation meV/atom | final T K |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['precision']} | {row['steps_per_s']:.1f} | {row['first_chunk_s']:.1f} "
            f"| {row['drift_meV_per_atom_per_ps']:+.4f} | {row['fluctuation_meV_per_atom']:.4f} "
            f"| {row['final_T_K']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
