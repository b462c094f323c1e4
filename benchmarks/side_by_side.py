"""equiforce and the peer MLIP codes side by side, in one run, with identical systems, sizes and protocol.

Protocol of ``../shared/BENCHMARKS.md`` (untrained models, r_max 5 Å, species H C N O, NVE velocity Verlet at
0.01 fs from a 300 K Maxwell–Boltzmann start, medians over timed chunks after a warm-up chunk, neighbour count
checked at the start and the end). The harness

1. writes the systems once: **aspirin** (21 atoms, frame 0 of the shipped rMD17 test sample), the periodic
   **water** box (343 H2O = 1029 atoms, 21.73 Å, built by ``md_throughput.water_box``) and a training file of
   16 aspirin configurations (energies and forces in eV, eV/Å);
2. runs, one process per (code, system, precision) so that peak memory is clean:
   equiforce (``md_throughput.py`` for MD, ``train_step.py`` for one training step) and each peer runner of
   ``benchmarks/peers/`` with the python of its own virtual environment (``benchmarks/peers/setup.sh``), for
   every peer whose venv exists;
3. prints and writes (``--out``: ``results.json``, ``results.md``) a table of MD steps/s, atom-steps/s,
   first-call time, training step time, peak memory and the ratio equiforce / peer, with the machine.

Peers per equiforce model: MACE ↔ mace-torch (ASE), mlip MACE (its jax-md engine and its ASE calculator);
NequIP ↔ nequip (ASE), mlip has no NequIP runner here. Allegro runs with ``--peer-models allegro``.

    python benchmarks/side_by_side.py --model mace --systems aspirin water --dtypes float32 float64 --out runs/sbs
    python benchmarks/side_by_side.py --model nequip --systems aspirin --dtypes float32 --out runs/sbs_nequip

The machine is noisy: compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from md_throughput import PROTOCOL_HP, machine_info, water_box  # noqa: E402

#: (label, venv, runner, extra arguments, time a training step) of the peers compared with each model
PEERS: dict[str, list[tuple[str, str, str, list[str], bool]]] = {
    "mace": [
        ("mace-torch (ASE)", "mace-torch", "mace_torch_bench.py", [], True),
        ("mlip MACE (jax-md)", "mlip", "mlip_bench.py", ["--md-path", "jax-md"], True),
        ("mlip MACE (ASE)", "mlip", "mlip_bench.py", ["--md-path", "ase"], False),
    ],
    "nequip": [("nequip (ASE)", "nequip", "nequip_bench.py", ["--model", "nequip"], True)],
    "allegro": [("allegro (ASE)", "nequip", "nequip_bench.py", ["--model", "allegro"], True)],
}
CHUNK = {"aspirin": 50, "water": 2}


def write_inputs(work: Path) -> dict[str, Path]:
    """The systems and the training file as extxyz (ASE's units: Å, eV, eV/Å)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from equiforce.data.readers import load_sample

    aspirin = load_sample("test").to_atoms(0)
    aspirin.calc = None
    paths = {"aspirin": work / "aspirin.extxyz", "water": work / "water.extxyz", "train": work / "train16.extxyz"}
    ase.io.write(paths["aspirin"], aspirin)
    ase.io.write(paths["water"], water_box(7))
    train = load_sample("train")
    frames = []
    for i in range(16):
        atoms = train.to_atoms(i)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    ase.io.write(paths["train"], frames)
    return paths


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, str]:
    print("  $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = f"{err.stdout or ''}{err.stderr or ''}\nTIMEOUT after {timeout} s", -1
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n(rc {rc}, {time.perf_counter() - t0:.0f} s)\n\n")
    return rc, out


def equiforce_md(model: str, system: str, dtype: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"equiforce_{model}_{system}_{dtype}.json"
    cmd = [sys.executable, str(HERE / "md_throughput.py"), "--model", model, "--systems", system, "--dtype", dtype]
    # equiforce evaluates thermo (energy, and the virial for the pressure of periodic systems) once per chunk:
    # about one extra force call, amortised over report_interval (100) steps in real runs, so its water chunks
    # are longer than the peers' (whose cost per step does not depend on the chunk)
    chunk = args.chunk.get(system, CHUNK[system]) if system != "water" else args.equiforce_chunk_water
    cmd += ["--chunk", str(chunk), "--chunks", str(args.chunks), "--json", str(out)]
    if args.cost_analysis and system == "water":
        cmd += ["--cost-analysis"]
    run(cmd, args.timeout, work / "log.txt")
    if not out.is_file():
        return {"error": "no result (see log.txt)"}
    r = json.loads(out.read_text())["results"][0]
    return {
        "steps_per_s": r.get("steps_per_s"),
        "atom_steps_per_s": r.get("atom_steps_per_s"),
        "first_call_s": r.get("first_call_s"),
        "peak_rss_mb": r.get("peak_rss_mb"),
        "pairs": [r.get("pairs_start"), r.get("pairs_end")],
        "n_params": r.get("n_params"),
        "gflops_per_s": r.get("gflops_per_s"),
        "error": r.get("error"),
    }


def equiforce_train(model: str, dtype: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if dtype == "mixed":
        return {}
    cmd = [sys.executable, str(HERE / "train_step.py"), "--model", model, "--dtype", dtype, "--batch-size", "16"]
    cmd += ["--repeats", str(args.train_steps), "--hp", json.dumps(PROTOCOL_HP.get(model, {}))]
    rc, out = run(cmd, args.timeout, work / "log.txt")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if rc != 0 or not lines:
        return {"train_error": "failed (see log.txt)"}
    r = json.loads(lines[-1])
    return {"train_step_s": r["train_step_s_median"], "train_first_s": r["first_step_s"]}


def peer_run(
    peer: tuple[str, str, str, list[str], bool],
    system: str,
    dtype: str,
    paths: dict[str, Path],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any] | None:
    """One peer runner in its own venv; None when the venv is not installed."""
    label, venv, runner, extra, train = peer
    python = Path(args.peers_dir) / venv / "bin" / "python"
    if not python.is_file():
        return None
    tag = label.replace(" ", "_").replace("(", "").replace(")", "")
    out = work / f"{tag}_{system}_{dtype}.json"
    cmd = [str(python), str(HERE / "peers" / runner), *extra, "--structure", str(paths[system])]
    cmd += ["--system-name", system, "--dtype", dtype, "--timestep-fs", "0.01", "--temperature-K", "300"]
    cmd += ["--chunk", str(args.chunk.get(system, CHUNK[system])), "--chunks", str(args.chunks), "--r-max", "5.0"]
    if train and system == "aspirin" and args.train_steps:
        cmd += ["--train-data", str(paths["train"]), "--train-batch", "16", "--train-steps", str(args.train_steps)]
    cmd += ["--json", str(out)]
    run(cmd, args.timeout, work / "log.txt")
    if not out.is_file():
        return {"error": "no result (see log.txt)"}
    r = json.loads(out.read_text())
    r["pairs"] = [r.get("pairs_start"), r.get("pairs_end")]
    return r


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| system | precision | code | steps/s | atom-steps/s | equiforce / this | first call s | train s/step "
        "| equiforce train / this | peak RSS MB | pairs start → end | note |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [head]
    for r in rows:
        note = (r.get("error") or "")[:60]
        lines.append(
            f"| {r['system']} | {r['dtype']} | {r['code']} | {_fmt(r.get('steps_per_s'))} "
            f"| {_fmt(r.get('atom_steps_per_s'))} | {_fmt(r.get('ratio'), 2)} | {_fmt(r.get('first_call_s'))} "
            f"| {_fmt(r.get('train_step_s'))} | {_fmt(r.get('train_ratio'), 2)} | {_fmt(r.get('peak_rss_mb'), 4)} "
            f"| {r.get('pairs', ['–', '–'])[0]} → {r.get('pairs', ['–', '–'])[1]} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mace", choices=sorted(PEERS))
    ap.add_argument("--systems", nargs="+", default=["aspirin", "water"], choices=["aspirin", "water"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64", "mixed"])
    ap.add_argument("--peers", nargs="*", default=None, help="labels to run (default: every installed peer)")
    ap.add_argument("--chunks", type=int, default=3, help="timed chunks after the warm-up chunk")
    ap.add_argument("--chunk-aspirin", type=int, default=CHUNK["aspirin"])
    ap.add_argument("--chunk-water", type=int, default=CHUNK["water"])
    ap.add_argument("--equiforce-chunk-water", type=int, default=10, help="equiforce's steps per chunk (thermo)")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--cost-analysis", action="store_true", help="XLA FLOP rate of equiforce on the water box")
    ap.add_argument("--peers-dir", default=os.environ.get("EQF_PEERS_DIR", str(HERE / ".peers")))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    ap.add_argument("--out", default="runs/side_by_side")
    args = ap.parse_args()
    args.chunk = {"aspirin": args.chunk_aspirin, "water": args.chunk_water}
    if args.no_train:
        args.train_steps = 0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="inputs_", dir=out_dir))
    paths = write_inputs(work)
    machine = machine_info()
    print(f"# {machine['cpu']}, {machine['nproc']} cores, jax {machine['jax']}, git {machine['git_commit']}")
    peers = [p for p in PEERS[args.model] if args.peers is None or p[0] in args.peers]
    rows: list[dict[str, Any]] = []
    for system in args.systems:
        for dtype in args.dtypes:
            print(f"# {system} {dtype}", flush=True)
            ours = {"system": system, "dtype": dtype, "code": f"equiforce {args.model}"}
            ours.update(equiforce_md(args.model, system, dtype, args, work))
            if system == "aspirin" and args.train_steps:
                ours.update(equiforce_train(args.model, dtype, args, work))
            rows.append(ours)
            if dtype == "mixed":  # no peer has a mixed-precision mode
                print(markdown([ours]), flush=True)
                continue
            for peer in peers:
                r = peer_run(peer, system, dtype, paths, args, work)
                if r is None:
                    print(f"  (peer {peer[0]} not installed in {args.peers_dir}; bash benchmarks/peers/setup.sh)")
                    continue
                row = {**r, "system": system, "dtype": dtype, "code": peer[0], "package": r.get("code")}
                if ours.get("steps_per_s") and r.get("steps_per_s"):
                    row["ratio"] = ours["steps_per_s"] / r["steps_per_s"]
                if ours.get("train_step_s") and r.get("train_step_s"):
                    row["train_ratio"] = ours["train_step_s"] / r["train_step_s"]
                rows.append(row)
            print(markdown([r for r in rows if r["system"] == system and r["dtype"] == dtype]), flush=True)
    table = markdown(rows)
    header = (
        f"Machine: {machine['cpu']} ({machine['nproc']} cores), jax {machine['jax']}, git {machine['git_commit']}, "
        f"{machine['date']}. equiforce model: {args.model} {json.dumps(PROTOCOL_HP.get(args.model, {}))}. "
        "Ratios: equiforce steps/s ÷ peer steps/s (> 1: equiforce faster); train: equiforce s/step ÷ peer s/step "
        "(< 1: equiforce faster)."
    )
    print("\n" + header + "\n\n" + table)
    (out_dir / "results.md").write_text(header + "\n\n" + table + "\n")
    (out_dir / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
