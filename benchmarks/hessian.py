"""Exact Hessian (forward-over-reverse) against ASE's finite differences through the calculator.

Times, on one structure: the exact Hessian (after compilation; best of ``--repeat``), the same in row
blocks, and ASE's ``Vibrations`` (6N force calls with ``nfree=2``); and compares their frequencies.

    python benchmarks/hessian.py MODEL [STRUCTURE] [--relax 1e-4]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("structure", nargs="?", default="sample:test:0")
    ap.add_argument("--relax", type=float, default=1e-4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    from ase.optimize import BFGS
    from ase.vibrations import Vibrations

    from equiforce.md.calculator import EquiforceCalculator
    from equiforce.md.run import load_structure
    from equiforce.potentials.model_io import enable_x64_for
    from equiforce.vibrations import vibrations

    enable_x64_for(args.model)
    calc = EquiforceCalculator(args.model)
    atoms = load_structure(args.structure)
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=args.relax, steps=5000)
    atoms.get_forces()  # compile the force call before timing finite differences

    def best(fn) -> float:
        fn()  # compile
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_exact = best(lambda: calc.get_hessian(atoms))
    t_block = best(lambda: calc.get_hessian(atoms, block_size=args.block_size))
    ours = np.asarray(vibrations(calc, atoms).get_frequencies())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        vib = Vibrations(atoms, name=f"{tmp}/vib", delta=0.01, nfree=2)
        vib.run()
        t_fd = time.perf_counter() - t
        theirs = np.asarray(vib.get_frequencies())
    high = np.abs(theirs.real) > 100
    n = len(atoms)
    pot = calc.potential
    print(f"| {atoms.get_chemical_formula()} ({n} atoms, {pot.model.name}, {pot.dtype}) | time (s) |")
    print("|---|---|")
    print(f"| exact Hessian, all {3 * n} rows at once | {t_exact:.4f} |")
    print(f"| exact Hessian, blocks of {args.block_size} rows | {t_block:.4f} |")
    print(f"| ASE Vibrations, {6 * n} force calls (delta 0.01 Å, nfree 2) | {t_fd:.4f} |")
    diff = np.abs(ours.real[high] - theirs.real[high])
    print(
        f"\nfrequencies above 100 cm⁻¹: max |exact − finite differences| = {diff.max():.3f} cm⁻¹ ({high.sum()} modes)"
    )


if __name__ == "__main__":
    main()
