"""Use a trained equiforce potential as an ASE calculator: relax aspirin with BFGS, then run Langevin MD.

    python examples/ase_relax_and_md.py                       # model from examples/runs/aspirin_cpu/model.eqf
    python examples/ase_relax_and_md.py --model my.eqf --structure start.extxyz --md-steps 1000

:class:`equiforce.md.EquiforceCalculator` works with anything in ASE (optimisers, ``ase.md`` integrators,
constraints, NEB, ...). It evaluates one structure per call on the host side (neighbour list + jitted
potential), so it is the flexible route; for long MD, ``md_from_script.py`` (``run_md``, the whole
integrator compiled with jax-md) is much faster. Outputs in ``--out``: ``relax.traj`` (BFGS steps),
``relaxed.extxyz``, ``md.traj`` (MD frames; ASE trajectories, read with ``ase.io.read(path, ":")``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="BFGS relaxation and Langevin MD through the equiforce ASE calculator.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (.eqf)")
    p.add_argument("--structure", type=Path, help="any file ase reads (its last frame); default: aspirin")
    p.add_argument("--fmax", type=float, default=0.05, help="BFGS convergence: largest force in eV/Å")
    p.add_argument("--relax-steps", type=int, default=200, help="at most this many BFGS steps")
    p.add_argument("--md-steps", type=int, default=200, help="Langevin MD steps")
    p.add_argument("--timestep", type=float, default=0.5, help="MD time step in fs")
    p.add_argument("--temperature", type=float, default=300.0, help="MD temperature in K")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
    p.add_argument("--log-interval", type=int, default=20, help="MD steps between printed lines and saved frames")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "runs" / "ase_relax_and_md", help="output folder")
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
    import jax
    import numpy as np
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.optimize import BFGS

    try:  # ASE >= 3.29; MaxwellBoltzmannDistribution before
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    from equiforce.data import load_sample
    from equiforce.md import EquiforceCalculator
    from equiforce.potentials import read_header

    # ---------------------------------------------------------------- the structure and the calculator
    if args.structure is None:
        atoms = load_sample("test").to_atoms(0)  # aspirin, with its DFT energy/forces as a SinglePointCalculator
        print(f"rMD17 aspirin test frame 0: DFT energy {atoms.get_potential_energy():.4f} eV")
    else:
        atoms = ase.io.read(args.structure, index=-1)

    # A float64 model needs JAX's 64-bit mode, switched on before the calculator is created.
    if read_header(args.model)["potential"].get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)
    atoms.calc = EquiforceCalculator(args.model)  # replaces the DFT labels: from now on the model computes
    e_start = atoms.get_potential_energy()  # eV
    f_start = np.abs(atoms.get_forces()).max()  # eV/Å
    print(f"{atoms.get_chemical_formula()}: model energy {e_start:.4f} eV, max |force component| {f_start:.3f} eV/Å")

    # ---------------------------------------------------------------- relaxation
    args.out.mkdir(parents=True, exist_ok=True)
    # maxstep bounds each BFGS step (Å); steps bounds the number of steps (an unconverged run just stops).
    opt = BFGS(atoms, maxstep=0.1, trajectory=str(args.out / "relax.traj"), logfile="-")
    converged = opt.run(fmax=args.fmax, steps=args.relax_steps)
    e_relaxed = atoms.get_potential_energy()
    print(
        f"BFGS {'converged' if converged else 'stopped unconverged'} after {opt.get_number_of_steps()} steps: "
        f"energy {e_start:.4f} -> {e_relaxed:.4f} eV ({e_relaxed - e_start:+.4f} eV)"
    )
    ase.io.write(args.out / "relaxed.extxyz", atoms)  # positions, energy and forces of the relaxed structure

    # ---------------------------------------------------------------- Langevin MD (ase.md, ASE units)
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)  # Maxwell-Boltzmann velocities
    Stationary(atoms)  # no centre-of-mass momentum
    ZeroRotation(atoms)  # no overall rotation (a free molecule)
    atoms.set_constraint(FixCom())  # keep the centre of mass fixed under the random thermostat kicks
    dyn = Langevin(
        atoms,
        timestep=args.timestep * units.fs,
        temperature_K=args.temperature,
        friction=args.friction / units.fs,
        fixcm=False,  # FixCom above does this (Langevin's own fixcm is deprecated in recent ASE)
        rng=rng,
        trajectory=str(args.out / "md.traj"),
        loginterval=args.log_interval,
    )

    def report() -> None:
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        print(
            f"step {dyn.nsteps:5d}  t {dyn.get_time() / units.fs:7.1f} fs  Epot {epot:.4f} eV  "
            f"Etot {epot + ekin:.4f} eV  T {atoms.get_temperature():6.1f} K"
        )

    dyn.attach(report, interval=args.log_interval)
    dyn.run(args.md_steps)
    print(f"MD done: {args.md_steps} steps of {args.timestep} fs, final temperature {atoms.get_temperature():.1f} K")
    return 0


if __name__ == "__main__":
    sys.exit(main())
