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
   The codes are interleaved over ``--rounds R`` rounds (default 3) per (system, precision): round 1 runs
   equiforce and then each peer once, round 2 runs them all again, and so on, so that every code sees the
   same slow and quiet spells of a shared machine;
3. prints and writes (``--out``: ``results.json``, ``results.md``) a table of MD steps/s, atom-steps/s,
   first-call time, training step time, peak memory and the ratio equiforce / peer, with the machine. Each
   ratio is taken per round (equiforce's round-r figure over the peer's round-r figure) and reported as the
   median over the rounds with its minimum and maximum (``3.2 (2.5–4.0)``); a code's own figures are the
   medians over its rounds (peak memory: the maximum; the per-round results are in the JSON).

Peers per equiforce model: MACE ↔ mace-torch (ASE), mlip MACE (its jax-md engine and its ASE calculator);
NequIP ↔ nequip (ASE), mlip has no NequIP runner here. Allegro runs with ``--peer-models allegro``.

    python benchmarks/side_by_side.py --model mace --systems aspirin water --dtypes float32 float64 --out runs/sbs
    python benchmarks/side_by_side.py --model nequip --systems aspirin --dtypes float32 --out runs/sbs_nequip
    python benchmarks/side_by_side.py --model mace --imported-mace --out runs/sbs_imported   # issue 16 §5

``--imported-mace``: mace-torch builds its protocol-size model of each system, ``equiforce import mace`` converts
it (this environment needs ``pip install -e '.[mace-import]'``), and equiforce and mace-torch both run that one
model file, so they compute the same function; mlip runs its own protocol-size MACE as without the flag.

The machine is noisy: compare only ratios from one run, and quote them with their range over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    if getattr(args, "imported", {}).get((system, dtype)):
        cmd += ["--model-file", str(args.imported[system, dtype][1])]
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


def peer_python(peer: tuple[str, str, str, list[str], bool], args: argparse.Namespace) -> Path | None:
    """The python of a peer's venv (``<peers-dir>/<venv>/bin/python``); None when it is not installed."""
    python = Path(args.peers_dir) / peer[1] / "bin" / "python"
    return python if python.is_file() else None


def peer_run(
    peer: tuple[str, str, str, list[str], bool],
    system: str,
    dtype: str,
    paths: dict[str, Path],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any] | None:
    """One peer runner in its own venv; None when the venv is not installed."""
    label, _venv, runner, extra, train = peer
    python = peer_python(peer, args)
    if python is None:
        return None
    tag = label.replace(" ", "_").replace("(", "").replace(")", "")
    out = work / f"{tag}_{system}_{dtype}.json"
    cmd = [str(python), str(HERE / "peers" / runner), *extra, "--structure", str(paths[system])]
    cmd += ["--system-name", system, "--dtype", dtype, "--timestep-fs", "0.01", "--temperature-K", "300"]
    cmd += ["--chunk", str(args.chunk.get(system, CHUNK[system])), "--chunks", str(args.chunks), "--r-max", "5.0"]
    if runner == "mace_torch_bench.py" and getattr(args, "imported", {}).get((system, dtype)):
        cmd += ["--model-file", str(args.imported[system, dtype][0])]
    if train and system == "aspirin" and args.train_steps:
        cmd += ["--train-data", str(paths["train"]), "--train-batch", "16", "--train-steps", str(args.train_steps)]
    cmd += ["--json", str(out)]
    run(cmd, args.timeout, work / "log.txt")
    if not out.is_file():
        return {"error": "no result (see log.txt)"}
    r = json.loads(out.read_text())
    r["pairs"] = [r.get("pairs_start"), r.get("pairs_end")]
    return r


def prepare_imported_mace(
    system: str, dtypes: Sequence[str], paths: dict[str, Path], args: argparse.Namespace, work: Path
) -> dict[tuple[str, str], tuple[Path, Path]]:
    """``{(system, dtype): (mace-torch file, equiforce file)}``: mace-torch builds its protocol-size model of
    ``system`` (in its own venv, float64) and ``equiforce import mace`` converts it for each dtype, so both codes
    run the same function (issue 16 §5). Needs ``equiforce[mace-import]`` in this interpreter's environment."""
    peer = next(p for p in PEERS["mace"] if p[2] == "mace_torch_bench.py")
    python = peer_python(peer, args)
    if python is None:
        raise SystemExit("--imported-mace needs the mace-torch peer venv (bash benchmarks/peers/setup.sh mace-torch)")
    model_file = work / f"mace_torch_{system}.model"
    cmd = [str(python), str(HERE / "peers" / "mace_torch_bench.py"), "--structure", str(paths[system])]
    cmd += ["--system-name", system, "--dtype", "float64", "--r-max", "5.0", "--save-model", str(model_file)]
    cmd += ["--json", str(work / f"save_{system}.json")]
    run(cmd, args.timeout, work / "log.txt")
    if not model_file.is_file():
        raise SystemExit(f"mace-torch did not write {model_file} (see {work / 'log.txt'})")
    out: dict[tuple[str, str], tuple[Path, Path]] = {}
    for dtype in dtypes:
        if dtype == "mixed":
            continue
        eqf = work / f"imported_{system}_{dtype}.eqf"
        rc, text = run(
            [sys.executable, "-m", "equiforce", "import", "mace", str(model_file), str(eqf), "--dtype", dtype],
            args.timeout,
            work / "log.txt",
        )
        if rc != 0:
            raise SystemExit(f"equiforce import mace failed (needs `pip install -e '.[mace-import]'`): {text[-500:]}")
        out[system, dtype] = (model_file, eqf)
    return out


def run_rounds(
    runners: Sequence[tuple[str, Callable[[], dict[str, Any]]]], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every code once per round, round after round: ``A B C, A B C, ...`` (interleaved, never ``A A A``).

    Args:
      runners: ``(label, run)`` per code, in the order each round runs them; ``run()`` starts one measurement
        (one process) and returns its result (``{"error": ...}`` when it failed).
      rounds: the number of rounds R >= 1.

    Returns:
      Each label's R results, in round order.

    Raises:
      ValueError: ``rounds < 1``.
    """
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in runners}
    for r in range(rounds):
        for label, run_once in runners:
            print(f"  round {r + 1}/{rounds}: {label}", flush=True)
            results[label].append(run_once())
    return results


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and bool(np.isfinite(x)) and x > 0


def ratio_stats(ours: Sequence[Any], theirs: Sequence[Any]) -> dict[str, Any] | None:
    """The per-round ratios ``ours[r] / theirs[r]`` and their median, minimum and maximum.

    Args:
      ours, theirs: one figure per round (steps/s, or s/step for the training step); a round where either is
        missing (None, not positive or not finite: a failed run) is left out.

    Returns:
      ``{"median", "min", "max", "rounds": [ratio per round, None where left out], "n": rounds used}``, or
      None when no round has both figures.
    """
    per_round = [a / b if _finite(a) and _finite(b) else None for a, b in zip(ours, theirs, strict=True)]
    used = [x for x in per_round if x is not None]
    if not used:
        return None
    return {
        "median": float(np.median(used)),
        "min": float(min(used)),
        "max": float(max(used)),
        "rounds": per_round,
        "n": len(used),
    }


#: figures whose median over the rounds a row reports (peak memory: the maximum)
MEDIAN_KEYS = ("steps_per_s", "atom_steps_per_s", "first_call_s", "train_step_s", "train_first_s", "gflops_per_s")


def summarise_rounds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One code's row from its per-round results: medians of the timings (:data:`MEDIAN_KEYS`), the largest
    peak memory, the pair counts of the round whose end count moved furthest from its start, the other
    fields of the first round, every distinct error, and the per-round results under ``"rounds"``."""
    row = {k: v for k, v in results[0].items() if k not in (*MEDIAN_KEYS, "peak_rss_mb", "error", "train_error")}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in results if _finite(r.get(key))]
        row[key] = float(np.median(values)) if values else None
    rss = [r["peak_rss_mb"] for r in results if _finite(r.get("peak_rss_mb"))]
    row["peak_rss_mb"] = max(rss) if rss else None
    pairs = [r["pairs"] for r in results if isinstance(r.get("pairs"), list) and None not in r["pairs"]]
    if pairs:
        row["pairs"] = max(pairs, key=lambda p: abs(p[1] - p[0]))
    for key in ("error", "train_error"):
        errors = list(dict.fromkeys(str(r[key]) for r in results if r.get(key)))
        row[key] = "; ".join(errors) or None
    row["rounds"] = list(results)
    return row


def _fmt_ratio(stats: dict[str, Any] | None) -> str:
    """``median (min–max)`` of :func:`ratio_stats`; the median alone when the range is one value."""
    if stats is None:
        return "–"
    median = _fmt(stats["median"], 2)
    if stats["n"] < 2:
        return median
    return f"{median} ({_fmt(stats['min'], 2)}–{_fmt(stats['max'], 2)})"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table; each ratio as ``median (min–max)`` over the rounds."""
    head = (
        "| system | precision | code | steps/s | atom-steps/s | equiforce / this | first call s | train s/step "
        "| equiforce train / this | peak RSS MB | pairs start → end | note |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [head]
    for r in rows:
        note = (r.get("error") or r.get("train_error") or "")[:60]
        lines.append(
            f"| {r['system']} | {r['dtype']} | {r['code']} | {_fmt(r.get('steps_per_s'))} "
            f"| {_fmt(r.get('atom_steps_per_s'))} | {_fmt_ratio(r.get('ratio_stats'))} | {_fmt(r.get('first_call_s'))} "
            f"| {_fmt(r.get('train_step_s'))} | {_fmt_ratio(r.get('train_ratio_stats'))} "
            f"| {_fmt(r.get('peak_rss_mb'), 4)} "
            f"| {r.get('pairs', ['–', '–'])[0]} → {r.get('pairs', ['–', '–'])[1]} | {note} |"
        )
    return "\n".join(lines)


def _jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON (the imported model files keyed by "system/dtype")."""
    out = dict(vars(args))
    out["imported"] = {f"{s}/{d}": [str(p) for p in files] for (s, d), files in args.imported.items()}
    return out


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
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds per system and precision (each code once per round); ratios: median (min–max)",
    )
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument(
        "--imported-mace",
        action="store_true",
        help="equiforce and mace-torch run the same mace-torch model (equiforce imports it); mlip runs its own "
        "protocol-size MACE; no training step",
    )
    ap.add_argument("--cost-analysis", action="store_true", help="XLA FLOP rate of equiforce on the water box")
    ap.add_argument("--peers-dir", default=os.environ.get("EQF_PEERS_DIR", str(HERE / ".peers")))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    ap.add_argument("--out", default="runs/side_by_side")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    args.chunk = {"aspirin": args.chunk_aspirin, "water": args.chunk_water}
    if args.imported_mace and args.model != "mace":
        ap.error("--imported-mace compares MACE models: use it with --model mace")
    if args.no_train or args.imported_mace:  # the training step is compared on the protocol models only
        args.train_steps = 0
    args.imported = {}

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="inputs_", dir=out_dir))
    paths = write_inputs(work)
    machine = machine_info()
    print(f"# {machine['cpu']}, {machine['nproc']} cores, jax {machine['jax']}, git {machine['git_commit']}")
    peers = [p for p in PEERS[args.model] if args.peers is None or p[0] in args.peers]
    installed = [p for p in peers if peer_python(p, args) is not None]
    for peer in peers:
        if peer not in installed:
            print(f"  (peer {peer[0]} not installed in {args.peers_dir}; bash benchmarks/peers/setup.sh)")
    rows: list[dict[str, Any]] = []
    for system in args.systems:
        if args.imported_mace:
            args.imported.update(prepare_imported_mace(system, args.dtypes, paths, args, work))
        for dtype in args.dtypes:
            print(f"# {system} {dtype}", flush=True)
            ours_label = f"equiforce {args.model}"

            def ours_once(system: str = system, dtype: str = dtype) -> dict[str, Any]:
                r = equiforce_md(args.model, system, dtype, args, work)
                if system == "aspirin" and args.train_steps:
                    r.update(equiforce_train(args.model, dtype, args, work))
                return r

            runners: list[tuple[str, Callable[[], dict[str, Any]]]] = [(ours_label, ours_once)]
            if dtype != "mixed":  # no peer has a mixed-precision mode
                for peer in installed:

                    def peer_once(peer=peer, s: str = system, d: str = dtype) -> dict[str, Any]:
                        return peer_run(peer, s, d, paths, args, work) or {"error": "not installed"}

                    runners.append((peer[0], peer_once))
            results = run_rounds(runners, args.rounds)
            ours = {**summarise_rounds(results[ours_label]), "system": system, "dtype": dtype, "code": ours_label}
            rows.append(ours)
            for label, _ in runners[1:]:
                row = summarise_rounds(results[label])
                row = {**row, "system": system, "dtype": dtype, "code": label, "package": row.get("code")}
                ours_rounds, theirs_rounds = results[ours_label], results[label]
                for key, name in (("steps_per_s", "ratio"), ("train_step_s", "train_ratio")):
                    stats = ratio_stats([r.get(key) for r in ours_rounds], [r.get(key) for r in theirs_rounds])
                    row[f"{name}_stats"] = stats
                    row[name] = None if stats is None else stats["median"]
                rows.append(row)
            print(markdown([r for r in rows if r["system"] == system and r["dtype"] == dtype]), flush=True)
    table = markdown(rows)
    header = (
        f"Machine: {machine['cpu']} ({machine['nproc']} cores), jax {machine['jax']}, git {machine['git_commit']}, "
        f"{machine['date']}. equiforce model: "
        + (
            "mace-torch's protocol-size ScaleShiftMACE imported with `equiforce import mace` (mace-torch runs the same "
            "file; mlip its own protocol-size MACE). "
            if args.imported_mace
            else f"{args.model} {json.dumps(PROTOCOL_HP.get(args.model, {}))}. "
        )
        + "Ratios: equiforce steps/s ÷ peer steps/s (> 1: equiforce faster); train: equiforce s/step ÷ peer s/step "
        f"(< 1: equiforce faster). The codes ran interleaved over {args.rounds} round(s) (each code once per round); "
        "each ratio is taken per round and given as median (min–max) over the rounds, each code's own figures "
        "as medians over its rounds (peak RSS: the maximum)."
    )
    print("\n" + header + "\n\n" + table)
    (out_dir / "results.md").write_text(header + "\n\n" + table + "\n")
    doc = {"machine": machine, "args": _jsonable_args(args), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
