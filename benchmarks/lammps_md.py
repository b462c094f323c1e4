"""equiforce inside LAMMPS: one-rank overhead against equiforce's own engine, 1 -> 2 rank scaling, ghost atoms,
NVE drift of both engines and NPT of a crystal (BENCHMARKS.md, "LAMMPS").

    python benchmarks/lammps_md.py [--model cu.eqf] [--out benchmarks/runs/lammps] [--rounds 2]

Without ``--model`` it trains the NequIP of ``examples/npt_crystal.py`` (2 layers, l_max 1, 16 features,
r_max 4 Å, float32) on EMT copper for 3 minutes: a periodic model with stress, so NVE and NPT are physical.
Every LAMMPS run is a subprocess (``mpirun -n K python benchmarks/lammps_md.py --worker ...``) with one XLA CPU
thread per rank (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``), so K ranks
use K cores; equiforce's engine (``run_md``) gets the same single thread. Compared runs are interleaved
(A, B, A, B, ...) because the machine is shared. Writes ``results.json`` in ``--out`` and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NKTV2P = 1.6021765e6  # bar per eV/Å³ (LAMMPS metal)


def cu_box(n: int, a: float = 3.6, seed: int = 0, temperature: float = 300.0):
    """fcc Cu, n x n x n cubic cells (4 n³ atoms), Maxwell–Boltzmann velocities (seeded, no net momentum)."""
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((n, n, n))
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    Stationary(atoms)
    del units
    return atoms


def train(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    from npt_crystal import make_emt_data

    from equiforce.training import load_config
    from equiforce.training import train as run_training

    data = make_emt_data(out / "cu_train.extxyz", 60)
    overrides = [
        f"data.train={data}",
        "data.test=null",
        "data.valid_fraction=0.1",
        f"output_dir={out / 'train'}",
        "model.name=nequip",
        "model.r_max=4.0",
        "loss.stress_weight=1e4",
        "optim.batch_size=4",
        "model.uncertainty=false",
        "md_check.steps=0",
        "progress_bar=false",
        "model.hyperparameters={num_interactions: 2, l_max: 1, num_features: 16}",
        "optim.max_epochs=300",
        "optim.learning_rate=0.01",
        "optim.time_budget_minutes=8",
    ]
    return run_training(load_config(None, overrides)).model_path


# ----------------------------------------------------------------------------------------------- LAMMPS worker
def worker(args: argparse.Namespace) -> None:
    """One LAMMPS job (under mpirun): read the structure, attach, run; rank 0 writes a JSON result."""
    os.environ.setdefault("XLA_FLAGS", ONE_THREAD)
    import ase.io

    from equiforce.lammps import attach, import_lammps

    lammps, MPI = import_lammps()
    comm = MPI.COMM_WORLD
    atoms = ase.io.read(args.structure)
    data = Path(args.result).with_suffix(".data")
    ase.io.write(data, atoms, format="lammps-data", masses=True, velocities=True, units="metal")
    comm.Barrier()
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(
        "units metal\natom_style atomic\natom_modify map array\nboundary p p p\n"
        f"read_data {data}\npair_style zero 4.0\npair_coeff * *\nneighbor 1.0 bin\n"
        "neigh_modify every 1 delay 0 check yes"
    )
    fix = attach(lmp, args.model, ["Cu"], skin=1.0)
    lmp.command(f"timestep {args.timestep_fs / 1000}")
    lmp.command("fix nve all nve")
    lmp.command("thermo_style custom step pe ke etotal temp press vol")
    result: dict = {"ranks": comm.Get_size(), "atoms": len(atoms)}
    if args.job == "speed":
        lmp.command("thermo 0")
        lmp.command(f"run {args.warmup}")  # compiles
        traces = fix.trace_count
        comm.Barrier()
        t0 = time.perf_counter()
        lmp.command(f"run {args.steps}")
        comm.Barrier()
        wall = time.perf_counter() - t0
        result.update(s_per_step=wall / args.steps, recompiles_in_timed_run=fix.trace_count - traces)
    elif args.job == "nve":
        rows = []
        lmp.command("variable e equal etotal")
        every = args.every
        lmp.command("run 0")
        for k in range(args.steps // every + 1):
            if k:
                lmp.command(f"run {every} pre no post no")
            rows.append((k * every, lmp.get_thermo("etotal"), lmp.get_thermo("temp")))
        result.update(rows=rows)
    fix.raise_if_failed()
    fractions = comm.gather(fix.ghost_fraction, root=0)
    graph_atoms = comm.gather(fix.atoms_in_graph / max(fix.calls, 1), root=0)
    if comm.Get_rank() == 0:
        result.update(ghost_fraction=fractions, atoms_in_graph=graph_atoms)
        Path(args.result).write_text(json.dumps(result))
    lmp.close()


def lammps_job(ranks: int, job: str, model: Path, structure: Path, result: Path, **kw) -> dict:
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun), "-n", str(ranks), sys.executable, __file__, "--worker", job, "--model", str(model)]
    cmd += ["--structure", str(structure), "--result", str(result)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, XLA_FLAGS=ONE_THREAD, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def engine_speed(model: Path, atoms, steps: int, warmup: int, timestep_fs: float) -> float:
    """Seconds per NVE step of run_md: its own throughput after the first chunk (which compiles), from a second
    call (the first one warms the process, as LAMMPS' warm-up run does)."""
    from equiforce.md import run_md

    for _ in range(2):
        res = run_md(str(model), atoms, ensemble="nve", timestep_fs=timestep_fs, steps=warmup + steps,
                     report_interval=warmup, progress=False)  # fmt: skip
    return 1.0 / res.steps_per_s


def equilibrated(model: Path, atoms, steps: int = 200):
    """The state after ``steps`` NVE steps of run_md (so neither engine grows its lists in the timed runs)."""
    from equiforce.md import run_md

    res = run_md(str(model), atoms, ensemble="nve", timestep_fs=2.0, steps=steps, report_interval=steps,
                 progress=False)  # fmt: skip
    return res.final_atoms


def ghost_fraction_cube(d: float, shell: float) -> float:
    """Ghosts / all atoms in a rank's graph for a cubic subdomain of side d (Å) and a shell of depth ``shell``
    (Å) at uniform density: the graph covers the cube grown by a ball (Minkowski sum)."""
    v_local = d**3
    v_all = d**3 + 6 * d**2 * shell + 3 * np.pi * d * shell**2 + 4 / 3 * np.pi * shell**3
    return 1 - v_local / v_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs" / "lammps")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["overhead", "scaling", "nve", "npt"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--structure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--timestep-fs", type=float, default=2.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.job = args.worker
        worker(args)
        return
    os.environ["XLA_FLAGS"] = ONE_THREAD  # equiforce's engine in this process: one thread, like one rank
    import jax

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or train(args.out)
    from equiforce.potentials.model_io import enable_x64_for, read_header

    enable_x64_for(model)
    header = read_header(model)["potential"]
    results: dict = {"model": str(model), "r_max": header["r_max"], "dtype": header["dtype"], "xla_flags": ONE_THREAD}
    del jax

    if "overhead" in args.only:  # one rank, 864 atoms, NVE, 2 fs
        atoms = equilibrated(model, cu_box(6))
        s = args.out / "cu864.extxyz"
        atoms.write(s)
        rounds = []
        for r in range(args.rounds):
            lmp = lammps_job(1, "speed", model, s, args.out / f"speed1_{r}.json", steps=100, warmup=5)
            eng = engine_speed(model, atoms, 100, 10, 2.0)
            rounds.append({"lammps_s_per_step": lmp["s_per_step"], "engine_s_per_step": eng,
                           "recompiles": lmp["recompiles_in_timed_run"]})  # fmt: skip
            print(f"overhead round {r}: LAMMPS {lmp['s_per_step'] * 1e3:.1f} ms/step, run_md {eng * 1e3:.1f} ms/step, "
                  f"ratio {lmp['s_per_step'] / eng:.2f}", flush=True)  # fmt: skip
        results["overhead"] = {"atoms": len(atoms), "rounds": rounds}

    if "scaling" in args.only:  # 4000 atoms, 1 and 2 ranks, one core each
        atoms = cu_box(10)
        s = args.out / "cu4000.extxyz"
        atoms.write(s)
        rounds = []
        for r in range(args.rounds):
            one = lammps_job(1, "speed", model, s, args.out / f"scal1_{r}.json", steps=10, warmup=8)
            two = lammps_job(2, "speed", model, s, args.out / f"scal2_{r}.json", steps=10, warmup=8)
            rounds.append({"one": one, "two": two})
            print(f"scaling round {r}: 1 rank {one['s_per_step']:.2f} s/step, 2 ranks {two['s_per_step']:.2f} s/step "
                  f"(speed-up {one['s_per_step'] / two['s_per_step']:.2f}); atoms in each rank's graph "
                  f"{two['atoms_in_graph']}, ghost fraction {two['ghost_fraction']}", flush=True)  # fmt: skip
        results["scaling"] = {"atoms": len(atoms), "rounds": rounds}

    layers = 2
    shell = 2 * layers * header["r_max"]
    sides = [10, 20, 30, 40, 57, 80, 120, 200]
    results["ghost_fraction_model"] = {
        "shell_A": shell,
        "side_A": sides,
        "ghost_fraction": [ghost_fraction_cube(d, shell) for d in sides],
        "allegro_r5_shell_10A": [ghost_fraction_cube(d, 10.0) for d in sides],
        "mace_r5_L2_shell_20A": [ghost_fraction_cube(d, 20.0) for d in sides],
    }

    if "nve" in args.only:  # 256 atoms, 2 fs, 2 ps, same start for both engines
        from equiforce.md import run_md

        atoms = cu_box(4, seed=1)
        s = args.out / "cu256.extxyz"
        atoms.write(s)
        lmp = lammps_job(1, "nve", model, s, args.out / "nve.json", steps=1000, every=20)
        rows = np.array(lmp["rows"])
        t_ps = rows[:, 0] * 2.0e-3
        drift_lmp = np.polyfit(t_ps, rows[:, 1], 1)[0] / len(atoms) * 1e3
        res = run_md(str(model), atoms, ensemble="nve", timestep_fs=2.0, steps=1000, report_interval=20,
                     progress=False)  # fmt: skip
        e = np.array([f.potential_energy + f.kinetic_energy for f in res.frames])
        t = np.array([f.time_ps for f in res.frames])
        drift_eng = np.polyfit(t, e, 1)[0] / len(atoms) * 1e3
        results["nve"] = {
            "atoms": len(atoms), "timestep_fs": 2.0, "steps": 1000,
            "lammps_drift_meV_atom_ps": drift_lmp, "engine_drift_meV_atom_ps": drift_eng,
            "lammps_etotal_std_meV_atom": float(np.std(rows[:, 1]) / len(atoms) * 1e3),
            "engine_etotal_std_meV_atom": float(np.std(e) / len(atoms) * 1e3),
            "lammps_T_mean": float(rows[len(rows) // 2 :, 2].mean()),
            "engine_T_mean": float(np.mean([f.temperature for f in res.frames[len(res.frames) // 2 :]])),
        }  # fmt: skip
        print(f"NVE: {results['nve']}", flush=True)

    if "npt" in args.only:  # 256 atoms, 1 % expanded, the documented input through `equiforce lammps` (one rank)
        import ase.io

        atoms = cu_box(4, a=3.6 * 1.01, seed=2)
        ase.io.write(args.out / "cu256.data", atoms, format="lammps-data", masses=True, units="metal")
        mpirun = Path(sys.executable).parent / "mpirun"
        cmd = [str(mpirun), "-n", "1", sys.executable, "-m", "equiforce", "lammps", str(Path(model).resolve()),
               str(ROOT / "examples" / "lammps" / "npt_crystal.in"), "--var", "data", "cu256.data",
               "--var", "steps", "2000", "--log", "npt.log", "--no-screen"]  # fmt: skip
        env = dict(os.environ, XLA_FLAGS=ONE_THREAD)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.out)
        if done.returncode != 0:
            raise RuntimeError(f"NPT failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        table = [line.split() for line in (args.out / "npt.log").read_text().splitlines()]
        head = next(i for i, r in enumerate(table) if r[:2] == ["Step", "Temp"])
        rows = []
        for r in table[head + 1 :]:
            try:
                rows.append([float(v) for v in r])
            except ValueError:
                break
        rows = np.array(rows)  # Step Temp Press Vol PotEng
        half = rows[len(rows) // 2 :]
        a = (half[:, 3].mean() / len(atoms) * 4) ** (1 / 3)
        results["npt"] = {
            "atoms": len(atoms), "steps": int(rows[-1, 0]), "wall_s": time.perf_counter() - t0,
            "volume_start": float(rows[0, 3]), "volume_mean_second_half": float(half[:, 3].mean()),
            "volume_std_second_half": float(half[:, 3].std()), "pressure_mean_bar": float(half[:, 2].mean()),
            "temperature_mean": float(half[:, 1].mean()), "lattice_constant": float(a),
        }  # fmt: skip
        print(f"NPT: {results['npt']}", flush=True)

    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
