"""Throughput of many MD replicas in one program (equiforce.md.replicas) against one replica.

Protocol of ../shared/BENCHMARKS.md: aspirin (21 atoms, frame 0 of the shipped rMD17 test sample), an untrained
MACE (``--hp``, default a small one: 2 interactions, 32x0e+32x1o, l_max 2, correlation 2; ``--protocol-size``
for the protocol's 64x0e+64x1o, l_max 3, correlation 3), random parameters from ``PRNGKey(0)``, r_max 5 Å,
NVE from Maxwell–Boltzmann at 300 K with a tiny time step (0.01 fs: an untrained model pushes the atoms apart
at 0.5 fs and the graph shrinks), neighbour pairs within r_max counted at the start and the end.

Measured, one after the other in one process (compare only within one run):

* ``single``: one aspirin with the single-structure engine (:class:`equiforce.md.engine.MDEngine`, what
  ``run_md`` runs);
* ``replicas_1``: one aspirin through :class:`equiforce.md.replicas.ReplicaEngine`;
* ``replicas_K``: ``--replicas`` K aspirin copies (different seeds) through the same engine.

For each: the first chunk's wall time (compilation included), then the median over ``--chunks`` timed chunks
of steps/s and atom-steps/s (atoms × steps × live replicas per second); the figure of merit is the ratio of
atom-steps/s of K replicas to one replica. On CPU the batch gains only per-step overhead (the cores are busy
with one aspirin already); on a GPU the batch fills the device.

    python benchmarks/replicas.py --replicas 64 --chunks 3 --chunk 10 --out /tmp/replicas.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np

SMALL_HP = {"num_interactions": 2, "num_features": 32, "l_max": 2, "hidden_l_max": 1, "correlation": 2}
PROTOCOL_HP = {"num_interactions": 2, "num_features": 64, "l_max": 3, "hidden_l_max": 1, "correlation": 3}


def pair_count(positions: np.ndarray, r_max: float) -> int:
    """Directed pairs within ``r_max`` of one non-periodic structure."""
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return int(np.sum((d < r_max) & (d > 0)))


def make_potential(atoms: Any, hp: dict[str, Any], dtype: str, r_max: float) -> tuple[Any, Any]:
    import jax

    from equiforce.potentials import config_from_dict
    from equiforce.potentials.potential import Potential

    species = tuple(sorted({int(z) for z in atoms.get_atomic_numbers()}))
    potential = Potential(
        model=config_from_dict({"name": "mace", **hp}),
        species=species,
        r_max=r_max,
        atomic_energies=(0.0,) * len(species),
        avg_num_neighbours=max(pair_count(atoms.get_positions(), r_max) / len(atoms), 1.0),
        dtype="float64" if dtype == "float64" else "float32",
    )
    return potential, potential.init(jax.random.PRNGKey(0))


def timed(run_chunk: Any, n_chunks: int) -> tuple[float, list[float]]:
    """(first chunk s, [s per timed chunk])."""
    t0 = time.perf_counter()
    run_chunk()
    first = time.perf_counter() - t0
    times = []
    for _ in range(n_chunks):
        t0 = time.perf_counter()
        run_chunk()
        times.append(time.perf_counter() - t0)
    return first, times


def bench_single(potential: Any, params: Any, atoms: Any, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from equiforce.md.engine import MDConfig, MDEngine
    from equiforce.md.system import make_system

    config = MDConfig(ensemble="nve", timestep_fs=args.timestep_fs, report_interval=args.chunk, seed=0)
    engine = MDEngine(make_system(potential, params, atoms, precision=args.dtype), config, log=lambda _: None)
    box = {"state": engine.init(atoms.get_positions())}

    def chunk() -> None:
        box["state"], _ = engine.run_chunk(box["state"])
        jax.block_until_ready(box["state"].position)

    first, times = timed(chunk, args.chunks)
    end = np.asarray(box["state"].position, np.float64)
    return summary("single", 1, len(atoms), args.chunk, first, times, [pair_count(end, args.r_max)])


def bench_replicas(potential: Any, params: Any, atoms: Any, k: int, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from equiforce.md.replicas import ReplicaEngine

    engine = ReplicaEngine(
        potential,
        params,
        [atoms] * k,
        ensemble="nve",
        timestep_fs=args.timestep_fs,
        report_interval=args.chunk,
        seed=list(range(k)),
        precision=args.dtype,
        log=lambda msg: print(f"  [{k} replicas] {msg}", file=sys.stderr),
    )
    box = {"state": engine.init()}

    def chunk() -> None:
        box["state"], _, _ = engine.run_chunk(box["state"])

    first, times = timed(chunk, args.chunks)
    if not engine.alive.all():
        print(f"  [{k} replicas] stopped: {[r for r in engine.stop_reasons if r]}", file=sys.stderr)
    host = jax.device_get(box["state"])
    pairs = [pair_count(engine.atoms(host, i).get_positions(), args.r_max) for i in range(k)]
    result = summary(f"replicas_{k}", k, len(atoms), args.chunk, first, times, pairs)
    result.update(n_devices=engine.n_devices, neighbour_capacity=engine.capacity, reallocations=engine.reallocations)
    return result


def summary(
    name: str, k: int, n_atoms: int, chunk: int, first: float, times: list[float], pairs_end: list[int]
) -> dict[str, Any]:
    s = float(np.median(times))
    return {
        "name": name,
        "replicas": k,
        "atoms_per_replica": n_atoms,
        "first_chunk_s": first,
        "chunk_s": times,
        "steps_per_s": chunk / s,
        "atom_steps_per_s": k * n_atoms * chunk / s,
        "pairs_end_min_max": [min(pairs_end), max(pairs_end)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--protocol-size", action="store_true", help="the protocol's MACE (64 channels, l_max 3)")
    p.add_argument("--hp", type=json.loads, default=None, help="MACE hyperparameters (JSON), overrides the size")
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--timestep-fs", type=float, default=0.01)
    p.add_argument("--chunk", type=int, default=10, help="steps per chunk")
    p.add_argument("--chunks", type=int, default=3, help="timed chunks after the first")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from equiforce.data import load_sample

    atoms = load_sample("test").to_atoms(0)
    atoms.calc = None
    hp = args.hp or (PROTOCOL_HP if args.protocol_size else SMALL_HP)
    potential, params = make_potential(atoms, hp, args.dtype, args.r_max)
    device = jax.devices()[0]
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {device.platform} x{len(jax.devices())}",
        "load_average": list(getattr(__import__("os"), "getloadavg", lambda: (float("nan"),) * 3)()),
        "model": {"name": "mace", **hp},
        "dtype": args.dtype,
        "timestep_fs": args.timestep_fs,
        "chunk_steps": args.chunk,
        "pairs_start": pair_count(atoms.get_positions(), args.r_max),
    }
    runs = [bench_single(potential, params, atoms, args), bench_replicas(potential, params, atoms, 1, args)]
    runs.append(bench_replicas(potential, params, atoms, args.replicas, args))
    by = {r["name"]: r for r in runs}
    k = args.replicas
    info["ratio_atom_steps_K_vs_1_replica"] = (
        by[f"replicas_{k}"]["atom_steps_per_s"] / by["replicas_1"]["atom_steps_per_s"]
    )
    info["ratio_atom_steps_K_vs_single_engine"] = (
        by[f"replicas_{k}"]["atom_steps_per_s"] / by["single"]["atom_steps_per_s"]
    )
    info["runs"] = runs
    print(f"{'run':<14} {'first chunk s':>13} {'steps/s':>9} {'atom-steps/s':>13} {'pairs end':>10}")
    for r in runs:
        print(
            f"{r['name']:<14} {r['first_chunk_s']:>13.1f} {r['steps_per_s']:>9.2f} {r['atom_steps_per_s']:>13.0f} "
            f"{'-'.join(map(str, r['pairs_end_min_max'])):>10}"
        )
    print(
        f"pairs within r_max at the start: {info['pairs_start']}; atom-steps/s of {k} replicas vs 1 replica: "
        f"{info['ratio_atom_steps_K_vs_1_replica']:.2f}x, vs the single engine: "
        f"{info['ratio_atom_steps_K_vs_single_engine']:.2f}x; load average {info['load_average']}"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(info, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
