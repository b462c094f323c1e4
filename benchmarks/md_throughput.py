"""MD throughput of equiforce's jit-compiled jax-md engine with untrained (randomly initialised) models.

Protocol of ../shared/BENCHMARKS.md:

* systems: **aspirin** (21 atoms, non-periodic, frame 0 of the shipped rMD17 test sample) and a periodic
  **water box** of 343 H2O = 1029 atoms, cubic 21.73 Å (1.0 g/cm³), built here on a 7×7×7 grid with seeded
  random orientations, no intermolecular pair closer than 1.7 Å (``--water-reps R`` makes a (7R)³-molecule
  box at the same density, for scaling);
* model (``--model``, any registered name): NequIP at the protocol's "default" size (4 layers, l_max 2, 32
  features with parity, radial MLP 1×128) or MACE at its protocol size (2 interactions, 64x0e+64x1o, l_max 3,
  correlation 3), random parameters from ``PRNGKey(0)``, E0s zero, r_max 5 Å; ``--hp`` overrides hyperparameters;
* NVE velocity Verlet from a Maxwell–Boltzmann start at 300 K, neighbour list with a 1 Å skin rebuilt inside
  the jitted loop (:class:`equiforce.md.engine.MDEngine`);
* "first call" = wall time of the first chunk, compilation included; then the median steps/s over
  ``--chunks`` timed chunks of ``--chunk`` steps each; atom-steps/s; edges; peak resident memory.

Caveats:

* The models are untrained. An untrained model pushes atoms apart at the usual 0.5 fs, the graph shrinks and
  steps/s looks better than it is; hence the tiny default timestep (0.01 fs) and the neighbour-count check:
  the number of directed pairs within r_max is computed with ``ase.neighborlist`` at the start and at the end,
  both are printed, and a warning is printed when it changed by more than 20 %.
* ``avg_num_neighbours`` is set to the measured mean neighbour count of the system (as a trained model's
  normalisation would be) so that the random network's outputs stay of order one; it does not change cost.
* Peak memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the whole process: with several systems/dtypes in one
  run it is the peak *so far*, i.e. it never decreases. Run one (system, dtype) per process for clean figures.
* The machine is shared and noisy: compare only within one run; quote medians and ratios.

    python benchmarks/md_throughput.py --systems aspirin water --dtype both --timestep-fs 0.01 --chunks 3
    python benchmarks/md_throughput.py --systems water --dtype float32 \
        --hp '{"num_interactions": 3, "num_features": 32, "l_max": 2, "parity": false}' --chunk 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

DEFAULT_HP = {
    "num_interactions": 4,
    "l_max": 2,
    "num_features": 32,
    "parity": True,
    "radial_mlp_hidden": 128,
    "radial_mlp_layers": 1,
}
#: protocol sizes per model (../shared/BENCHMARKS.md): NequIP "default"; MACE 64x0e+64x1o, l_max 3, correlation 3
PROTOCOL_HP: dict[str, dict[str, Any]] = {
    "nequip": DEFAULT_HP,
    "mace": {"num_interactions": 2, "num_features": 64, "l_max": 3, "hidden_l_max": 1, "correlation": 3},
}
DEFAULT_CHUNK = {"aspirin": 50, "water": 5}
WATER_DENSITY_G_CM3 = 1.0


# ---------------------------------------------------------------------------------------------- systems
def _random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 3, 3]`` uniformly random proper rotations (QR of Gaussian matrices, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    det = np.linalg.det(q)
    q[det < 0, :, 0] *= -1.0
    return q


def water_box(n_side: int = 7, *, seed: int = 0, min_distance: float = 1.7, max_tries: int = 200) -> Any:
    """Cubic periodic box of ``n_side**3`` H2O at 1.0 g/cm³, molecules on a grid with random orientations.

    Orientations of molecules with an atom closer than ``min_distance`` Å to another molecule are re-drawn
    until none is left.
    """
    from ase import Atoms
    from ase.build import molecule
    from ase.neighborlist import neighbor_list
    from ase.units import _amu

    h2o = molecule("H2O")
    local = h2o.get_positions() - h2o.get_center_of_mass()
    n_mol = n_side**3
    mass_g = h2o.get_masses().sum() * _amu * 1e3
    length = (n_mol * mass_g / WATER_DENSITY_G_CM3 * 1e24) ** (1.0 / 3.0)  # Å
    spacing = length / n_side
    grid = (np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * spacing
    rng = np.random.default_rng(seed)
    rot = _random_rotations(rng, n_mol)
    mol_of_atom = np.repeat(np.arange(n_mol), len(h2o))
    symbols = list(h2o.get_chemical_symbols()) * n_mol
    for _ in range(max_tries):
        pos = (grid[:, None, :] + np.einsum("mij,aj->mai", rot, local)).reshape(-1, 3)
        atoms = Atoms(symbols, positions=pos, cell=[length] * 3, pbc=True)
        i, j = neighbor_list("ij", atoms, min_distance)
        bad = np.unique(mol_of_atom[i[mol_of_atom[i] != mol_of_atom[j]]])
        if bad.size == 0:
            atoms.wrap()
            return atoms
        rot[bad] = _random_rotations(rng, bad.size)
    raise RuntimeError(f"could not place {n_mol} waters without intermolecular contacts < {min_distance} Å")


def build_system(name: str, args: argparse.Namespace) -> Any:
    if name == "aspirin":
        from equiforce.data.readers import load_sample

        atoms = load_sample("test").to_atoms(0)
        atoms.calc = None
        return atoms
    if name == "water":
        return water_box(args.water_side or args.water_grid * args.water_reps, seed=args.seed)
    raise ValueError(f"unknown system {name!r}")


def pair_count(atoms: Any, r_max: float) -> int:
    """Directed pairs within ``r_max`` (what the network sees as edges)."""
    from ase.neighborlist import neighbor_list

    return int(neighbor_list("i", atoms, r_max).size)


def min_intermolecular_distance(atoms: Any) -> float:
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, 3.0)
    mol = np.arange(len(atoms)) // 3
    inter = mol[i] != mol[j]
    return float(d[inter].min()) if inter.any() else float("inf")


# ---------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    import jax

    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "machine": platform.machine(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def device_peak_mb() -> float | None:
    """Peak memory in use on the first accelerator (MB), None where the backend does not report it (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"] / 1e6


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20  # Linux: KiB, macOS: bytes


# ---------------------------------------------------------------------------------------------- benchmark
def run_one(name: str, atoms: Any, dtype: str, hp: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from equiforce.md.engine import MDBlowUpError, MDConfig, MDEngine
    from equiforce.md.system import make_system
    from equiforce.potentials import config_from_dict
    from equiforce.potentials.potential import Potential

    species = tuple(sorted({int(z) for z in atoms.get_atomic_numbers()}))
    n_atoms = len(atoms)
    pairs_start = pair_count(atoms, args.r_max)
    avg_nn = args.avg_num_neighbours or max(pairs_start / n_atoms, 1.0)
    if args.model_file:  # a model file (e.g. an imported mace-torch model): its own architecture and weights
        from equiforce.potentials import load_model

        potential, params, _ = load_model(args.model_file)
        hp = {k: v for k, v in potential.model.to_dict().items() if k != "name"}
        if potential.dtype != ("float64" if dtype == "float64" else "float32"):
            raise SystemExit(f"{args.model_file} computes in {potential.dtype}, not {dtype}")
    else:
        potential = Potential(
            model=config_from_dict({"name": args.model, **hp}),
            species=species,
            r_max=args.r_max,
            atomic_energies=(0.0,) * len(species),
            avg_num_neighbours=float(avg_nn),
            dtype="float64" if dtype == "float64" else "float32",
        )
        params = potential.init(jax.random.PRNGKey(0))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    chunk = args.chunk or DEFAULT_CHUNK[name]
    config = MDConfig(
        ensemble="nve",
        timestep_fs=args.timestep_fs,
        temperature_K=args.temperature_K,
        report_interval=chunk,
        skin=args.skin,
        seed=args.seed,
        compact_edges=not args.no_compact_edges,
    )
    t0 = time.perf_counter()
    cell_list = {"auto": None, "on": True, "off": False}[args.cell_list]
    system = make_system(
        potential, params, atoms, skin=args.skin, precision=dtype, cell_list=cell_list, half_list=not args.full_list
    )
    engine = MDEngine(system, config, log=lambda msg: print(f"  [{name} {dtype}] {msg}", file=sys.stderr))
    state = engine.init(atoms.get_positions())
    jax.block_until_ready(state.position)
    setup_s = time.perf_counter() - t0
    capacity = int(engine.neighbor.idx.shape[-1])
    directed = 2 if system.half_list else 1

    result: dict[str, Any] = {
        "system": name,
        "dtype": dtype,
        "n_atoms": n_atoms,
        "periodic": bool(system.periodic),
        "hp": hp,
        "n_params": n_params,
        "timestep_fs": args.timestep_fs,
        "chunk_steps": chunk,
        "setup_s": setup_s,
        "pairs_start": pairs_start,
        "nl_capacity_start": capacity,
        "half_list": system.half_list,
        # directed pairs in the neighbour list (a half list stores each of them once per pair)
        "nl_pairs_start": directed * int(np.sum(np.asarray(engine.neighbor.idx[0]) < n_atoms)),
        "edge_capacity_start": engine.edge_capacity,
        "cell_list": system.cell_list,
        "error": None,
    }
    times: list[float] = []
    try:
        t0 = time.perf_counter()
        state, frame = engine.run_chunk(state)
        result["first_call_s"] = time.perf_counter() - t0
        result["T_first_K"] = frame.temperature
        for _ in range(args.chunks):
            t0 = time.perf_counter()
            state, frame = engine.run_chunk(state)
            times.append(time.perf_counter() - t0)
        result["T_end_K"] = frame.temperature
    except MDBlowUpError as err:
        result["error"] = f"blow-up: {err}"
    end = atoms.copy()
    end.set_positions(engine.positions(state))
    if system.periodic:
        end.wrap()
    result["pairs_end"] = pair_count(end, args.r_max)
    result["nl_capacity_end"] = int(engine.neighbor.idx.shape[-1])
    result["nl_pairs_end"] = directed * int(np.sum(np.asarray(engine.neighbor.idx[0]) < n_atoms))
    result["reallocations"] = engine.reallocations
    result["edge_capacity_end"] = engine.edge_capacity
    if args.cost_analysis and not result["error"]:
        unchunked = None
        if getattr(potential.model, "edge_chunk_size", 0) != 0:
            import dataclasses

            flat = potential.replace(model=dataclasses.replace(potential.model, edge_chunk_size=0))
            unchunked = make_system(
                flat, params, atoms, skin=args.skin, precision=dtype, cell_list=cell_list, half_list=system.half_list
            )
        result.update(cost_analysis(engine, state, args.cost_repeats, unchunked))
    result["chunk_s"] = times
    if times:
        med = float(np.median(times))
        result["steps_per_s"] = chunk / med
        result["steps_per_s_min_max"] = [chunk / max(times), chunk / min(times)]
        result["atom_steps_per_s"] = n_atoms * chunk / med
        result["ns_per_day_at_0.5fs"] = chunk / med * 0.5e-6 * 86400
    change = abs(result["pairs_end"] - pairs_start) / max(pairs_start, 1)
    result["pairs_change"] = change
    if change > args.max_pair_change:
        print(
            f"WARNING [{name} {dtype}]: neighbour count within r_max changed {pairs_start} -> {result['pairs_end']} "
            f"({100 * change:.0f} % > {100 * args.max_pair_change:.0f} %): the untrained model pushed atoms apart "
            "(or together); steps/s is not representative. Use a smaller --timestep-fs.",
            file=sys.stderr,
        )
    result["peak_rss_mb"] = peak_rss_mb()
    result["device_peak_mb"] = device_peak_mb()
    return result


def cost_analysis(engine: Any, state: Any, repeats: int, unchunked_system: Any = None) -> dict[str, Any]:
    """XLA's cost analysis of one jitted energy+forces call at ``state``, and its measured median time.

    XLA counts a loop body once, whatever its trip count, so the FLOPs of a model that evaluates its edges
    in blocks (``edge_chunk_size``, a ``lax.scan``) are taken from the same energy+forces with all edges at
    once (``unchunked_system``; compiled, never run), which is also the useful work (the blocked version
    recomputes its edge work in the backward pass, which is not counted). ``flops`` includes every edge slot
    (a few % of padding). The rate is flops / median time of the call the MD loop uses.
    """
    from functools import partial

    import jax

    space = engine._space_kwargs(state)

    def compiled_forces(energy_fn: Any) -> Any:
        def forces(position, neighbor):
            return jax.value_and_grad(energy_fn)(position, neighbor, **space)

        return jax.jit(forces).lower(state.position, engine.neighbor).compile()

    compiled = compiled_forces(engine.energy_fn)
    counted = compiled
    if unchunked_system is not None:
        capacity = engine.edge_capacity
        counted = compiled_forces(partial(unchunked_system.energy_fn, edge_capacity=capacity))
    cost = counted.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(state.position, engine.neighbor))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state.position, engine.neighbor))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    flops = float(cost.get("flops", float("nan")))
    return {
        "xla_flops": flops,
        "xla_bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "xla_temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1,
        "force_call_s": med,
        "gflops_per_s": flops / med / 1e9,
    }


def matmul_peak_gflops(dtype: str = "float32", n: int = 4096, repeats: int = 5) -> float:
    """Measured peak of this machine: the best rate of a jitted ``n x n`` matmul (2 n³ flops), GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| system | dtype | atoms | edges (start → end) | NL capacity | edge slots | first call s | steps/s (median) "
        "| steps/s min–max | atom-steps/s | peak RSS MB | GFLOP/s (XLA) | note |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in results:
        sps = f"{r['steps_per_s']:.4g}" if "steps_per_s" in r else "–"
        rng = "–" if "steps_per_s_min_max" not in r else "{:.4g}–{:.4g}".format(*r["steps_per_s_min_max"])
        asps = f"{r['atom_steps_per_s']:.4g}" if "atom_steps_per_s" in r else "–"
        first = f"{r['first_call_s']:.1f}" if "first_call_s" in r else "–"
        gflops = f"{r['gflops_per_s']:.2f}" if "gflops_per_s" in r else "–"
        notes = []
        if r["error"]:
            notes.append(r["error"].split(":")[0])
        if r["pairs_change"] > 0.2:
            notes.append(f"edges changed {100 * r['pairs_change']:.0f} %")
        if r["reallocations"]:
            notes.append(f"{r['reallocations']} NL realloc")
        rows.append(
            f"| {r['system']} | {r['dtype']} | {r['n_atoms']} | {r['pairs_start']} → {r['pairs_end']} "
            f"| {r['nl_capacity_end']} | {r['edge_capacity_end'] or '–'} | {first} | {sps} | {rng} | {asps} "
            f"| {r['peak_rss_mb']:.0f} | {gflops} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", nargs="+", default=["aspirin", "water"], choices=["aspirin", "water"])
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=["float32", "float64", "mixed", "both"],
        help="precisions to run (both = float32 float64); mixed: float32 network, float64 integrator",
    )
    ap.add_argument("--no-compact-edges", action="store_true", help="evaluate every neighbour-list slot")
    ap.add_argument("--cell-list", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--full-list", action="store_true", help="full (Sparse) neighbour list, not each pair once")
    ap.add_argument("--water-side", type=int, default=0, help="molecules per box side (overrides grid x reps)")
    ap.add_argument("--cost-analysis", action="store_true", help="XLA FLOPs of one energy+forces call vs its time")
    ap.add_argument("--cost-repeats", type=int, default=3)
    ap.add_argument("--peak", action="store_true", help="measure the float32 matmul peak (4096²) first")
    ap.add_argument("--model", default="nequip", help="registered model name (default: nequip)")
    ap.add_argument(
        "--model-file", default=None, help="run this model file instead of a random --model (e.g. an imported one)"
    )
    ap.add_argument("--hp", default="{}", help="hyperparameters as JSON, overriding the protocol size of --model")
    ap.add_argument("--timestep-fs", type=float, default=0.01)
    ap.add_argument("--temperature-K", type=float, default=300.0)
    ap.add_argument("--chunks", type=int, default=3, help="timed chunks after the first (compiling) one")
    ap.add_argument("--chunk", type=int, default=0, help="steps per chunk (default: aspirin 50, water 5)")
    ap.add_argument("--r-max", type=float, default=5.0)
    ap.add_argument("--skin", type=float, default=1.0)
    ap.add_argument("--avg-num-neighbours", type=float, default=0.0, help="0: the system's measured mean")
    ap.add_argument("--water-grid", type=int, default=7, help="molecules per box side (7: 343 H2O, 21.73 Å)")
    ap.add_argument("--water-reps", type=int, default=1, help="multiply the molecules per side (same density)")
    ap.add_argument("--max-pair-change", type=float, default=0.2, help="warn above this relative change")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write machine info and results to this file")
    args = ap.parse_args()
    if args.chunks < 1:
        ap.error("--chunks must be >= 1")

    import jax

    dtypes: list[str] = []
    for d in args.dtype:
        dtypes += ["float32", "float64"] if d == "both" else [d]
    if "float64" in dtypes or "mixed" in dtypes:
        jax.config.update("jax_enable_x64", True)
    hp = {**PROTOCOL_HP.get(args.model, {}), **json.loads(args.hp)}
    machine = machine_info()
    print(
        f"# machine: {machine['cpu']} ({machine['machine']}), {machine['nproc']} cores available, "
        f"python {machine['python']}, jax {machine['jax']}, devices {machine['devices']}, "
        f"git {machine['git_commit'] or '?'}, {machine['date']}"
    )
    print(f"# model: {args.model} {json.dumps(hp)}; r_max {args.r_max} Å, skin {args.skin} Å; untrained (PRNGKey(0))")
    print(f"# NVE velocity Verlet, {args.temperature_K:g} K MB start, timestep {args.timestep_fs:g} fs")
    if args.peak:
        machine["matmul_peak_gflops_float32"] = matmul_peak_gflops("float32")
        print(f"# float32 matmul peak (jax, 4096²): {machine['matmul_peak_gflops_float32']:.1f} GFLOP/s", flush=True)
    results = []
    for name in args.systems:
        atoms = build_system(name, args)
        desc = f"{len(atoms)} atoms, pbc={bool(atoms.pbc.all())}"
        if name == "water":
            dmin = min_intermolecular_distance(atoms)
            desc += f", cubic {atoms.cell[0, 0]:.2f} Å, min intermolecular distance {dmin:.2f} Å"
        print(f"# {name}: {desc}", flush=True)
        for dtype in dtypes:
            r = run_one(name, atoms, dtype, hp, args)
            results.append(r)
            times = ", ".join(f"{t:.3g}" for t in r["chunk_s"])
            print(
                f"#   {name} {dtype}: {r['n_params']} params, setup {r['setup_s']:.1f} s, "
                f"first chunk {r.get('first_call_s', float('nan')):.1f} s, timed chunks [{times}] s of "
                f"{r['chunk_steps']} steps; pairs within r_max {r['pairs_start']} -> {r['pairs_end']}; "
                f"NL capacity {r['nl_capacity_start']} -> {r['nl_capacity_end']} "
                f"(valid {r['nl_pairs_start']} -> {r['nl_pairs_end']}, r_max+skin); "
                f"T {r.get('T_first_K', float('nan')):.0f} -> {r.get('T_end_K', float('nan')):.0f} K; "
                f"edge capacity {r['edge_capacity_start']} -> {r['edge_capacity_end']}; cell list {r['cell_list']}; "
                f"half list {r['half_list']}; "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
                + (
                    f"; XLA {r['xla_flops'] / 1e9:.2f} GFLOP per energy+forces call in {r['force_call_s']:.3g} s "
                    f"= {r['gflops_per_s']:.2f} GFLOP/s, {r['xla_bytes_accessed'] / 1e9:.2f} GB accessed, "
                    f"temp {r['xla_temp_bytes'] / 1e6:.0f} MB"
                    if "xla_flops" in r
                    else ""
                )
                + (f"; {r['error']}" if r["error"] else ""),
                flush=True,
            )
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
