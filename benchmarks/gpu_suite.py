"""One GPU benchmark run within a time budget: MD, training step, scaling with atoms, replicas (issue 14 §5).

Run by ``benchmarks/gpu_suite.sh`` (which installs the CUDA build of jax into a fresh venv first) or directly in
an environment that has equiforce and a GPU jax::

    python benchmarks/gpu_suite.py --out runs/gpu_suite --budget-s 480

Every measurement is one process of the existing benchmark scripts (``md_throughput.py``, ``train_step.py``,
``replicas.py`` when present), so peak memory is clean and a crash or an out-of-memory error costs one entry,
not the run. Measurements run in order of importance and each gets at most what is left of ``--budget-s``;
whatever does not fit is listed as skipped. In order:

1. the device, and the defaults chosen for it (:func:`device_defaults`: the edge blocking of MACE/NequIP,
   the data-parallel device count), printed and recorded;
2. MD steps/s on aspirin (21 atoms) and the 1029-atom water box, MACE and NequIP at the protocol sizes of
   ``../shared/BENCHMARKS.md``, in float32, float64 and mixed precision;
3. the training step time (MACE, batch 16, float32);
4. steps/s and device memory against the number of atoms (MACE float32, water boxes of growing size) up to
   the first size that fails (the memory limit) or the budget;
5. the throughput of 64 aspirin replicas against one (when ``benchmarks/replicas.py`` exists).

Writes ``gpu_suite.json`` and ``gpu_suite.md`` to ``--out`` after every measurement (a run cut short keeps
what it measured). ``--quick`` shrinks every measurement (for checking the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def device_defaults() -> dict[str, Any]:
    """What equiforce chooses on this device kind (the defaults tuned per device, printed by the suite)."""
    import jax

    from equiforce.potentials.layers import resolve_edge_chunk
    from equiforce.training.parallel import resolve_devices

    water_pairs = 1029 * 70  # about the water box's pairs within 5 Å (half list)
    return {
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "edge_chunk_size (MACE/NequIP, water box, half list)": resolve_edge_chunk(None, water_pairs, half_list=True),
        "edge_chunk_size (aspirin)": resolve_edge_chunk(None, 21 * 20, half_list=True),
        "parallel.devices default": len(resolve_devices(None)),
    }


class Suite:
    """Runs the measurements within the budget and keeps the results on disk."""

    def __init__(self, out: Path, budget_s: float, quick: bool) -> None:
        self.out, self.budget_s, self.quick = out, budget_s, quick
        self.start = time.perf_counter()
        self.entries: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def run(self, name: str, cmd: list[str], json_out: Path | None = None, min_s: float = 20.0) -> dict | None:
        """One measurement process; its JSON (or its last JSON line on stdout) is recorded under ``name``."""
        left = self.left()
        if left < min_s:
            self.entries.append({"name": name, "status": "skipped (budget)"})
            self.save()
            return None
        print(f"$ {' '.join(cmd)}   (at most {left:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=HERE.parent)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            rc, text = -1, "timeout (budget)"
        wall = time.perf_counter() - t0
        with open(self.out / "log.txt", "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{text}\n(rc {rc}, {wall:.0f} s)\n\n")
        data = None
        if json_out is not None and json_out.is_file():
            data = json.loads(json_out.read_text())
        else:
            lines = [line for line in text.splitlines() if line.startswith("{")]
            data = json.loads(lines[-1]) if lines and rc == 0 else None
        status = "ok" if rc == 0 and data is not None else f"failed (rc {rc}: {text.strip().splitlines()[-1:]})"
        self.entries.append({"name": name, "status": status, "wall_s": wall, "result": data})
        self.save()
        return data if rc == 0 else None

    def save(self) -> None:
        doc = {"info": self.info, "budget_s": self.budget_s, "entries": self.entries}
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, self.out / "gpu_suite.json")
        (self.out / "gpu_suite.md").write_text(markdown(doc))


def _md_rows(entry: dict[str, Any]) -> list[str]:
    rows = []
    for r in (entry.get("result") or {}).get("results", []):
        dev = r.get("device_peak_mb")
        rows.append(
            f"| {entry['name']} | {r['system']} | {r['dtype']} | {r['n_atoms']} | "
            f"{r.get('steps_per_s') or float('nan'):.1f} | {r.get('atom_steps_per_s') or float('nan'):.3g} | "
            f"{r.get('first_call_s') or float('nan'):.1f} | {'–' if dev is None else f'{dev:.0f}'} | "
            f"{r.get('error') or ''} |"
        )
    return rows


def markdown(doc: dict[str, Any]) -> str:
    info = doc["info"]
    lines = [
        f"Device: {info.get('devices')}; {info.get('gpu', '')}",
        f"Defaults chosen for this device: {json.dumps(info.get('defaults', {}))}",
        "",
        "| measurement | system | dtype | atoms | steps/s | atom-steps/s | first chunk (s) | device peak (MB) | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    other = []
    for entry in doc["entries"]:
        rows = _md_rows(entry) if entry.get("status") == "ok" else []
        if rows:
            lines += rows
        else:
            other.append(entry)
    for entry in other:
        result = entry.get("result")
        summary = json.dumps(result)[:300] if result else ""
        lines.append(f"\n- {entry['name']}: {entry['status']} {summary}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu_suite")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget of all measurements")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (to check the script on a CPU)")
    ap.add_argument("--water-sides", nargs="+", type=int, default=[7, 11, 15, 20, 25, 30, 36])
    args = ap.parse_args()
    suite = Suite(Path(args.out), args.budget_s, args.quick)

    suite.info["defaults"] = device_defaults()
    suite.info["devices"] = suite.info["defaults"]["devices"]
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        suite.info["gpu"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        suite.info["gpu"] = "nvidia-smi not available"
    print(f"# device {suite.info['devices']} {suite.info['gpu']}")
    print(f"# defaults chosen for this device: {json.dumps(suite.info['defaults'])}", flush=True)
    suite.save()

    py, out = sys.executable, suite.out
    chunks = ["--chunks", "1" if args.quick else "3"]
    dtypes = ["float32"] if args.quick else ["float32", "float64", "mixed"]
    systems = ["aspirin"] if args.quick else ["aspirin", "water"]
    # 2. MD, the protocol sizes: one process per (model, system) running the three precisions
    for model in ["mace"] if args.quick else ["mace", "nequip"]:
        for system in systems:
            chunk = ["--chunk", "5" if args.quick else ("200" if system == "aspirin" else "20")]
            j = out / f"md_{model}_{system}.json"
            cmd = [py, str(HERE / "md_throughput.py"), "--model", model, "--systems", system, "--dtype", *dtypes]
            suite.run(f"MD {model}", cmd + chunk + chunks + ["--json", str(j)], j)
    # 3. the training step
    cmd = [py, str(HERE / "train_step.py"), "--model", "mace", "--dtype", "float32", "--batch-size", "16"]
    from md_throughput import PROTOCOL_HP

    suite.run("train step MACE float32 batch 16", [*cmd, "--repeats", "3", "--hp", json.dumps(PROTOCOL_HP["mace"])])
    # 4. scaling with the number of atoms, up to the first failure (memory) or the budget
    for side in [4] if args.quick else args.water_sides:
        j = out / f"scaling_water{side}.json"
        cmd = [py, str(HERE / "md_throughput.py"), "--model", "mace", "--systems", "water", "--dtype", "float32"]
        cmd += ["--water-side", str(side), "--chunk", "2" if args.quick else "10", *chunks, "--json", str(j)]
        if suite.run(f"scaling MACE water {3 * side**3} atoms", cmd, j, min_s=40.0) is None:
            break  # the memory limit (or the budget)
    # 5. replicas (the script comes with many-replica MD)
    if (HERE / "replicas.py").is_file():
        j = out / "replicas.json"
        size = ["--replicas", "4", "--chunk", "2", "--chunks", "1"] if args.quick else ["--replicas", "64"]
        cmd = [py, str(HERE / "replicas.py"), *size, *([] if args.quick else ["--protocol-size"]), "--out", str(j)]
        suite.run("replicas (aspirin)", cmd, j)
    else:
        suite.entries.append({"name": "replicas (aspirin)", "status": "skipped (benchmarks/replicas.py missing)"})
    suite.save()
    print((out / "gpu_suite.md").read_text())


if __name__ == "__main__":
    main()
