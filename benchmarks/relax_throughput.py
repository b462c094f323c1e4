"""Batched relaxation (``equiforce.md.relax``) against ASE one structure at a time, same model, same fmax.

100 small structures are relaxed twice: all at once with :func:`equiforce.md.relax.relax` (FIRE in jax-md,
vmapped over the padded batch, one compiled program), and one after the other with ``ase.optimize.FIRE``
(``FrechetCellFilter`` with ``--cell``) through :class:`~equiforce.md.EquiforceCalculator` (one calculator, so
it compiles once). Prints wall times (the first call of each side includes its compilation; the batched relax is
then run again warm), the throughput ratio, and how far the two sides' energies agree.

Default structures: fcc copper cells (4 atoms, a = 3.45 Å, each rattled by 0.1 Å with its own seed) for a float64
SchNet with fixed random weights (r_max 4.5 Å, whose fcc minimum is near 3.38 Å). With MODEL and
``--structures FILE`` any model and structure file can be used instead.

    python benchmarks/relax_throughput.py [MODEL] [--structures FILE] [--n 100] [--fmax 0.05] [--cell]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # ASE's cell filter: scipy on 3x3 matrices, one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import numpy as np


def _copper_model():
    import jax

    from equiforce.potentials import Potential
    from equiforce.potentials.schnet import SchNetConfig

    jax.config.update("jax_enable_x64", True)
    potential = Potential(
        SchNetConfig(num_interactions=2, num_features=8, num_filters=8, num_rbf=8),
        species=(29,),
        r_max=4.5,
        atomic_energies=(-1.0,),
        avg_num_neighbours=12.0,
        dtype="float64",
    )
    return potential, potential.init(jax.random.PRNGKey(2))


def _copper_structures(n: int):
    from ase.build import bulk

    out = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.45, cubic=True)
        atoms.rattle(0.1, seed=k)
        out.append(atoms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model file (default: the random SchNet for copper)")
    ap.add_argument("--structures", default=None, help="structure file (default: rattled fcc copper cells)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--fmax", type=float, default=0.05)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--cell", action="store_true", help="relax the cells too (ASE: FrechetCellFilter)")
    args = ap.parse_args()

    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from equiforce.md import EquiforceCalculator
    from equiforce.md.relax import read_structures_for_relax, relax

    if args.model is None:
        model = _copper_model()
        calc = EquiforceCalculator.from_potential(*model)
        label = "random float64 SchNet (Cu, r_max 4.5 Å)"
    else:
        from equiforce.potentials.model_io import enable_x64_for

        enable_x64_for(args.model)
        model = args.model
        calc = EquiforceCalculator(args.model)
        label = args.model
    if args.structures is None:
        structures = _copper_structures(args.n)
    else:
        structures = read_structures_for_relax(args.structures)[: args.n]
    n_atoms = sorted({len(a) for a in structures})
    print(f"{len(structures)} structures ({n_atoms} atoms), model {label}, fmax {args.fmax} eV/Å, cell={args.cell}")

    t = time.perf_counter()
    cold = relax(model, structures, fmax=args.fmax, max_steps=args.max_steps, cell=args.cell)
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    warm = relax(model, structures, fmax=args.fmax, max_steps=args.max_steps, cell=args.cell)
    t_warm = time.perf_counter() - t
    print(
        f"equiforce relax, batched: {t_cold:.2f} s first call (compilation included), {t_warm:.2f} s warm; "
        f"{int(warm.converged.sum())}/{len(warm)} converged, steps median {int(np.median(warm.steps))} "
        f"max {int(warm.steps.max())}"
    )
    assert np.array_equal(cold.energy, warm.energy)

    energies, steps, converged = [], [], 0
    t = time.perf_counter()
    t_first = None
    for atoms in structures:
        a = atoms.copy()
        a.calc = calc
        opt = FIRE(FrechetCellFilter(a) if args.cell else a, logfile=None)
        converged += bool(opt.run(fmax=args.fmax, steps=args.max_steps))
        energies.append(a.get_potential_energy())
        steps.append(opt.nsteps)
        if t_first is None:
            t_first = time.perf_counter() - t
    t_ase = time.perf_counter() - t
    per_atom = np.abs(np.asarray(energies) - warm.energy) / np.array([len(a) for a in structures])
    print(
        f"ASE FIRE one at a time: {t_ase:.2f} s ({t_first:.2f} s of it the first structure, with compilation); "
        f"{converged}/{len(structures)} converged, steps median {int(np.median(steps))} max {max(steps)}"
    )
    print(
        f"throughput ratio (ASE / batched): {t_ase / t_warm:.1f}x warm, {t_ase / t_cold:.1f}x with compilation; "
        f"without ASE's first structure: {(t_ase - t_first) / t_warm:.1f}x"
    )
    print(
        f"final energies, |batched − ASE| per atom: median {np.median(per_atom):.2e}, max {per_atom.max():.2e} eV/atom "
        f"(fmax {args.fmax}: the two FIRE paths may end in different nearby minima)"
    )


if __name__ == "__main__":
    main()
