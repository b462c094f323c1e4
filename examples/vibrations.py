"""Harmonic vibrations of a molecule and phonons of a crystal from the exact Hessian of a trained potential.

    python -m equiforce train examples/aspirin_cpu.yaml   # once: writes examples/runs/aspirin_cpu/model.eqf
    python examples/vibrations.py                         # relax aspirin, print its frequencies (cm⁻¹)
    python examples/vibrations.py --model my.eqf --structure molecule.xyz
    python examples/vibrations.py --phonons cu.eqf        # also: Cu phonons at Γ and X (a periodic model)

The Hessian is the exact second derivative of the model's energy (forward-over-reverse: ``jax.jvp`` of
``jax.grad``; no finite displacements), ``[3N, 3N]`` in eV/Å². Frequencies of an unrelaxed structure are not
normal modes, so the structure is relaxed first with ASE's BFGS through
:class:`~equiforce.md.EquiforceCalculator`; :func:`equiforce.vibrations.vibrations` warns
(``NonStationaryWarning``) when the largest per-atom force is still above 0.01 eV/Å. Phonons go through
phonopy (``pip install 'equiforce[phonons]'``) with the force constants taken from the Hessian of a
supercell. Outputs in ``--out``: ``relaxed.extxyz`` and ``modes.xyz`` (every normal mode, for Jmol or
``ase gui``).

The command line does the molecule part too: ``equiforce vibrations MODEL STRUCTURE --out modes/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Vibrations and phonons from the exact Hessian of a potential.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (.eqf)")
    p.add_argument("--structure", default="sample:test:0", help="molecule: a file ase reads, or sample:test:K")
    p.add_argument("--fmax", type=float, default=0.005, help="relax until the largest force is below this, eV/Å")
    p.add_argument("--max-relax-steps", type=int, default=500, help="BFGS steps at most")
    p.add_argument("--phonons", type=Path, help="a periodic fcc-Cu model file: also compute Cu phonons")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "vibrations", help="output folder")
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
    import warnings

    import ase.io
    import numpy as np
    from ase.optimize import BFGS

    from equiforce.md import EquiforceCalculator, load_structure
    from equiforce.vibrations import NonStationaryWarning, vibrations

    args.out.mkdir(parents=True, exist_ok=True)
    calc = EquiforceCalculator(args.model)
    atoms = load_structure(args.structure)
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    converged = opt.run(fmax=args.fmax, steps=args.max_relax_steps)
    fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    print(f"{atoms.get_chemical_formula()}: relaxed in {opt.nsteps} BFGS steps, largest force {fmax:.4f} eV/Å")
    if not converged:
        print(f"not converged to {args.fmax} eV/Å in {args.max_relax_steps} steps: the frequencies are approximate")
    ase.io.write(args.out / "relaxed.extxyz", atoms)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonStationaryWarning)
        vib = vibrations(calc, atoms)  # ase.vibrations.VibrationsData from the exact Hessian
    for w in caught:
        print(f"warning: {w.message}")
    freqs = vib.get_frequencies()  # cm⁻¹, imaginary ones as complex numbers
    real = np.sort(freqs.real[np.abs(freqs.imag) < 1e-9])
    print(f"{len(freqs)} modes; the six smallest |ν| (translations, rotations): {np.sort(np.abs(freqs))[:6].round(1)}")
    print(f"highest frequencies (cm⁻¹): {real[-5:].round(1)}")
    print(f"zero-point energy: {vib.get_zero_point_energy():.4f} eV")
    vib.write_jmol(args.out / "modes.xyz")  # every mode, for Jmol or ase gui
    print(f"normal modes written to {args.out / 'modes.xyz'}")

    if args.phonons:
        from ase.build import bulk

        from equiforce.vibrations import phonons

        cu = bulk("Cu", "fcc", a=3.6)  # the primitive cell; 4x4x4 supercell (64 atoms, 10.2 Å)
        phonon = phonons(EquiforceCalculator(args.phonons), cu, [4, 4, 4], primitive_matrix="P")
        result = phonon.run_qpoints([[0, 0, 0], [0.5, 0, 0.5]])  # Γ and X, reduced coordinates
        # phonopy >= 4 returns the result; older versions keep it for get_qpoints_dict()
        freqs = result.frequencies if result is not None else phonon.get_qpoints_dict()["frequencies"]
        for name, f in zip(("Γ", "X"), freqs, strict=True):
            print(f"Cu phonons at {name}: {np.round(f, 3)} THz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
