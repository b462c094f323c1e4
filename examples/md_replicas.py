"""Run many MD replicas together in one jit-compiled program (one per structure, each with its own thermostat).

    python -m equiforce train examples/aspirin_cpu.yaml     # once: writes examples/runs/aspirin_cpu/model.eqf
    python examples/md_replicas.py                          # 8 aspirin replicas, 300-650 K, 1000 steps
    python examples/md_replicas.py --model my.eqf --replicas 64 --steps 20000

:func:`equiforce.md.run_replicas` (what ``run_md`` does when given a list) pads the replicas to one atom
count, evaluates a device's replicas as one disjoint graph and shards the replica axis over the devices (every GPU,
or ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` CPU devices). Each replica gets its own seed,
Langevin temperature and friction, and its own files in ``--out``: ``traj_<k>.h5`` and ``thermo_<k>.csv``.
A replica that blows up stops alone; its result says why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Many Langevin MD replicas in one program.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (.eqf)")
    p.add_argument("--replicas", type=int, default=8, help="replicas: frames 0, 1, ... of the shipped aspirin")
    p.add_argument("--steps", type=int, default=1000, help="MD steps per replica")
    p.add_argument("--report-interval", type=int, default=100, help="steps between trajectory frames")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "md_replicas", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        print(f"no model file at {args.model}; train one first, then pass --model PATH", file=sys.stderr)
        return 2

    from equiforce.md import load_structure, run_md

    structures = [load_structure(f"sample:test:{k}") for k in range(args.replicas)]
    temperatures = [300.0 + 50.0 * k for k in range(args.replicas)]  # one thermostat per replica
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_md(
        args.model,
        structures,  # a list: all replicas in one jit-compiled program
        ensemble="nvt_langevin",
        temperature_K=temperatures,
        friction_per_ps=5.0,
        seed=list(range(args.replicas)),
        timestep_fs=0.5,
        steps=args.steps,
        report_interval=args.report_interval,
        trajectory=args.out / "traj_{replica}.h5",
        thermo=args.out / "thermo_{replica}.csv",
        progress=not args.no_progress,
    )
    print(f"{len(structures)} replicas on {result.n_devices} device(s): {result.atom_steps_per_s:.0f} atom-steps/s")
    print("replica  target K  mean T (K)  steps  stopped")
    for rep, target in zip(result.replicas, temperatures, strict=True):
        mean_t = sum(f.temperature for f in rep.frames[1:]) / max(len(rep.frames) - 1, 1)
        print(f"{rep.index:>7}  {target:>8.0f}  {mean_t:>10.0f}  {rep.steps:>5}  {rep.stopped_because or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
