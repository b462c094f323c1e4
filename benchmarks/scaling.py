"""Scaling of equiforce MD with the number of atoms: atom-steps/s and peak memory, table and PNG plot.

Aspirin (21 atoms) and periodic water boxes of n³ H2O at 1.0 g/cm³ (``md_throughput.water_box``), each run in
its own process by ``md_throughput.py`` (NVE, 0.01 fs, untrained model at the protocol size of
``../shared/BENCHMARKS.md``), so that the peak resident memory of every size is its own. Writes
``scaling.json``, ``scaling.md`` and ``scaling.png`` (atom-steps/s and peak memory against atoms, log-log,
with a linear-memory guide through the largest size) to ``--out``.

    python benchmarks/scaling.py --model mace --water-sides 4 5 7 11 15 18 --out runs/scaling
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_size(system: str, side: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any] | None:
    tag = "aspirin" if system == "aspirin" else f"water{side}"
    out = out_dir / f"{args.model}_{tag}_{args.dtype}.json"
    cmd = [sys.executable, str(HERE / "md_throughput.py"), "--model", args.model, "--systems", system]
    cmd += ["--dtype", args.dtype, "--chunks", str(args.chunks), "--json", str(out)]
    if system == "water":
        cmd += ["--water-side", str(side), "--chunk", str(max(1, round(args.water_steps * 1029 / (3 * side**3))))]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        return None
    r = json.loads(out.read_text())["results"][0]
    line = next((x for x in proc.stdout.splitlines() if x.startswith(f"#   {system}")), "")
    print(line, flush=True)
    return r


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = np.array([r["n_atoms"] for r in rows], float)
    rate = np.array([r.get("atom_steps_per_s", np.nan) for r in rows], float)
    mem = np.array([r["peak_rss_mb"] / 1024 for r in rows], float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.loglog(n, rate, "o-")
    a1.set_xlabel("atoms")
    a1.set_ylabel("atom-steps / s")
    a1.set_title("throughput")
    a1.grid(True, which="both", alpha=0.3)
    a2.loglog(n, mem, "o-", label="peak RSS")
    slope = (mem[-1] - mem[0]) / (n[-1] - n[0])
    guide = mem[0] + slope * (n - n[0])
    a2.loglog(n, guide, "--", color="gray", label="linear through first and last")
    a2.set_xlabel("atoms")
    a2.set_ylabel("peak memory (GiB)")
    a2.set_title("memory")
    a2.legend()
    a2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mace")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "mixed"])
    ap.add_argument("--water-sides", nargs="+", type=int, default=[4, 5, 7, 11, 15, 18])
    ap.add_argument("--no-aspirin", action="store_true")
    ap.add_argument("--water-steps", type=float, default=6.0, help="steps per chunk at 1029 atoms (scaled ∝ 1/N)")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="runs/scaling")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = ([] if args.no_aspirin else [("aspirin", 0)]) + [("water", s) for s in args.water_sides]
    rows = []
    for system, side in sizes:
        r = run_size(system, side, args, out_dir)
        if r is None:
            print(f"{system} {side}: failed (out of memory or time?); stopping here", file=sys.stderr)
            break
        rows.append(r)
    head = "| system | atoms | edges within r_max | steps/s | atom-steps/s | first call s | peak RSS MB | MB per atom |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["system"] if r["system"] == "aspirin" else f"water {round((r['n_atoms'] / 3) ** (1 / 3))}³"
        lines.append(
            f"| {name} | {r['n_atoms']} | {r['pairs_start']} | {r.get('steps_per_s', float('nan')):.4g} "
            f"| {r.get('atom_steps_per_s', float('nan')):.4g} | {r.get('first_call_s', float('nan')):.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / r['n_atoms']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    (out_dir / "scaling.md").write_text(table + "\n")
    (out_dir / "scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if rows:
        plot(rows, out_dir / "scaling.png", f"equiforce {args.model} ({args.dtype}), NVE MD, 2-core CPU")
        print(f"plot: {out_dir / 'scaling.png'}")


if __name__ == "__main__":
    main()
