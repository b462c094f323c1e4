"""Generate the ethanol distribution-shift data of issue 29 (§3, §4): GFN2-xTB Langevin MD at 300, 600, 1000 K.

Ground truth is GFN2-xTB through ``tblite`` (``pip install tblite``, the ``xtb`` extra). The molecule is built
with ``ase.build.molecule("CH3CH2OH")``, so nothing outside this repository is needed and a clean clone
regenerates the files bit for bit (fixed seeds, ``OMP_NUM_THREADS=1``; tblite's SCF is deterministic on one
thread).

For each temperature T one trajectory is run with ``ase.md.langevin.Langevin`` (time step 0.5 fs, friction
0.02 fs⁻¹, seed ``base_seed + T``), started from Maxwell–Boltzmann velocities at T. After ``--equilibrate``
steps a frame is kept every ``--stride`` steps. The kept frames are split in time order:

* 300 K: the first ``--pool`` frames are the start pool (``start_300K.xyz``: training/calibration frames of the
  model that must then run hot), the next ``--test`` frames the 300 K test set;
* 600 K and 1000 K: the first ``--test`` frames are the test set, the next ``--expert`` frames the expert pool
  (strategy (c) of issue 29 §3: frames from ground-truth MD at the target temperature).

Every file is extended XYZ with the xTB energy (eV) and forces (eV/Å) as ASE's single-point results
(``atoms.get_potential_energy()``, ``atoms.get_forces()`` after ``ase.io.read``), plus ``info`` keys
``temperature_K``, ``md_step``, ``seed`` and ``method``. A temperature whose files all exist is skipped, so a
killed run continues where it stopped; files are written atomically (temporary file, then ``os.replace``).

    OMP_NUM_THREADS=1 python benchmarks/al_shift_data.py --out benchmarks/data/al_ethanol
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TEMPERATURES_K = (300, 600, 1000)
BASE_SEED = 29_000


def _write_extxyz_atomic(path: Path, frames: list) -> None:
    """Write ``frames`` (list of ``ase.Atoms`` with single-point results) to ``path`` atomically."""
    import ase.io

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ase.io.write(tmp, frames, format="extxyz")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are shipped data files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _labelled_copy(atoms, energy: float, forces: np.ndarray, info: dict):
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.set_constraint()
    frame.info.update(info)
    frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=np.array(forces, dtype=float))
    return frame


def run_temperature(
    temperature_k: float,
    n_frames: int,
    *,
    equilibrate: int,
    stride: int,
    seed: int,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.02,
    method: str = "GFN2-xTB",
) -> tuple[list, dict]:
    """Run one Langevin trajectory and return ``n_frames`` labelled frames plus timing figures.

    Frames are taken every ``stride`` steps after ``equilibrate`` steps; energies in eV, forces in eV/Å
    (what the tblite ASE calculator returns)."""
    from ase import units
    from ase.build import molecule
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from tblite.ase import TBLite

    atoms = molecule("CH3CH2OH")
    atoms.calc = TBLite(method=method, verbosity=0)
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ASE 3.29 prefers thermalize_momenta; same draw
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())  # ASE's recommended replacement of Langevin(fixcm=True)
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature_k,
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )
    frames = []
    t0 = time.perf_counter()
    dyn.run(equilibrate)
    step = equilibrate
    while len(frames) < n_frames:
        dyn.run(stride)
        step += stride
        info = {"temperature_K": float(temperature_k), "md_step": int(step), "seed": int(seed), "method": method}
        frames.append(
            _labelled_copy(atoms, atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False), info)
        )
    wall = time.perf_counter() - t0
    n_steps = equilibrate + n_frames * stride
    return frames, {"temperature_K": temperature_k, "steps": n_steps, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "al_ethanol")
    parser.add_argument("--pool", type=int, default=100, help="300 K start-pool frames")
    parser.add_argument("--test", type=int, default=100, help="test frames per temperature")
    parser.add_argument("--expert", type=int, default=100, help="expert-pool frames at 600 and 1000 K")
    parser.add_argument("--equilibrate", type=int, default=2000, help="MD steps before the first kept frame")
    parser.add_argument("--stride", type=int, default=100, help="MD steps between kept frames")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES_K))
    parser.add_argument("--force", action="store_true", help="regenerate files that already exist")
    args = parser.parse_args(argv)
    for name in ("pool", "test", "expert", "equilibrate", "stride"):
        if getattr(args, name) < (0 if name in ("equilibrate", "expert") else 1):
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("warning: OMP_NUM_THREADS is not 1; tblite's results may differ in the last digits", file=sys.stderr)
    try:
        import tblite.ase  # noqa: F401
    except ImportError:
        print("error: this script needs tblite (pip install tblite, or the 'xtb' extra)", file=sys.stderr)
        return 2

    log = []
    for temp in args.temperatures:
        t = round(temp)
        if t == 300:
            files = {"start_300K.xyz": args.pool, "test_300K.xyz": args.test}
        else:
            files = {f"test_{t}K.xyz": args.test, f"expert_{t}K.xyz": args.expert}
        files = {k: v for k, v in files.items() if v > 0}
        if not args.force and all((args.out / name).exists() for name in files):
            print(f"{t} K: files exist, skipped ({', '.join(files)})")
            continue
        seed = BASE_SEED + t
        frames, timing = run_temperature(
            float(temp), sum(files.values()), equilibrate=args.equilibrate, stride=args.stride, seed=seed
        )
        start = 0
        for name, count in files.items():
            _write_extxyz_atomic(args.out / name, frames[start : start + count])
            start += count
        timing["seed"] = seed
        timing["files"] = files
        log.append(timing)
        print(json.dumps(timing), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
