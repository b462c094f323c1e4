"""Kill-and-resume of ``equiforce learn`` (issue 29): kills at many points, the same command after each, until the
run finishes; then counts the labels computed more than once (target 0) and checks the report.

Tiny EMT copper (32-atom cells, a SchNet of 385 parameters), 2 generations after the start, 3 labels each,
a ``python:`` EMT labeller that logs each frame it computes. Each kill is an ``EQUIFORCE_FAULT`` point
(:mod:`equiforce.faults`) in a fresh process: a label between its computation and its append, a trajectory
frame, the state file, a training checkpoint, a model file. The kill list is walked in order; a point the run
no longer reaches (it has passed it) simply lets the run go further, and the next kill applies.

    python benchmarks/al_kill_resume.py [--out DIR]

Prints one JSON line: kills landed, runs, generations, labels computed, labels computed twice, generations in
the report, wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import yaml
from ase.build import bulk

LABELLER = """
import os
from ase.calculators.emt import EMT

class Logged(EMT):
    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        with open(os.environ["AL_CALL_LOG"], "a") as fh:
            fh.write(atoms.info.get("al_id", "?") + "\\n")
        super().calculate(atoms, properties, system_changes)

def make():
    return Logged()
"""

#: the kills, in order: <write>:<part>:<occurrence> (occurrences count within one process)
KILLS = (
    "al-label:computed:3",  # generation 0: the third start label, computed, not appended
    "checkpoint:tmp-written:1",  # generation 0 training's first checkpoint
    "model:replaced:1",  # the first model file of a training
    "h5md-frame:appended:2",  # generation 1 MD
    "al-label:computed:2",  # generation 1: the second label
    "file:tmp-synced:3",  # an atomic file (state, report, ...)
    "al-label:appended:1",  # generation 2: a label appended, its pending file not yet removed
)


def cu(seed: int, rattle: float):
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    if rattle:
        a.rattle(rattle, seed=seed)
    return a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/al_kill_resume")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "al_counting.py").write_text(LABELLER)
    ase.io.write(out / "start.extxyz", [cu(k, 0.05) for k in range(6)])
    ase.io.write(out / "seeds.extxyz", cu(0, 0.0))
    cfg = {
        "output_dir": "run",
        "start": {"structures": "start.extxyz"},
        "seeds": "seeds.extxyz",
        "labeller": {"kind": "python", "function": "al_counting:make"},
        "md": {"conditions": [{"temperature_K": 1200}], "timestep_fs": 2.0, "target_ps": 0.04, "report_interval": 10},
        "selection": {"lower": 0.001, "upper": 0.02, "batch_size": 3, "candidates": 2},
        "budget": {"max_labels": 6, "max_generations": 2},
        "training": {
            "config": {
                "model": {
                    "name": "schnet",
                    "r_max": 3.0,
                    "hyperparameters": {"num_interactions": 1, "num_features": 8, "num_filters": 8, "num_rbf": 6},
                },
                "optim": {"max_epochs": 2, "batch_size": 4},
                "data": {"valid_fraction": 0.34},
            }
        },
    }
    config = out / "al.yaml"
    config.write_text(yaml.safe_dump(cfg))
    calls = out / "calls.log"
    calls.unlink(missing_ok=True)
    env = {
        **os.environ,
        "AL_CALL_LOG": str(calls),
        "PYTHONPATH": f"{out}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "equiforce", "learn", str(config)]
    t0 = time.perf_counter()
    landed, runs = [], 0
    for kill in (*KILLS, None):
        run_env = dict(env) if kill is None else {**env, "EQUIFORCE_FAULT": kill}
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
        runs += 1
        if proc.returncode == 0:
            if kill is not None:
                print(f"{kill}: not reached, the run finished", file=sys.stderr)
            break
        if "EQUIFORCE_FAULT: killed at" not in proc.stderr:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        landed.append(kill)
        print(f"killed at {kill}", file=sys.stderr)
    else:
        return 1
    ids = calls.read_text().split()
    twice = {k: n for k, n in collections.Counter(ids).items() if n > 1}
    report = json.loads((out / "run" / "report.json").read_text())
    gens = [g["generation"] for g in report["generations"]]
    print(
        json.dumps(
            {
                "kills": len(landed),
                "kill_points": landed,
                "runs": runs,
                "generations": gens,
                "labels_computed": len(ids),
                "distinct_labels": len(set(ids)),
                "labels_computed_twice": len(twice),
                "report_generations_once": gens == sorted(set(gens)),
                "finished": report["finished"],
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0 if not twice and gens == sorted(set(gens)) else 1


if __name__ == "__main__":
    sys.exit(main())
