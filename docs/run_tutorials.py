"""Run every script that a documentation page includes, on small settings, and fail if any of them fails.

    python docs/run_tutorials.py [--out DIR] [--only NAME ...]

The tutorial pages include these scripts verbatim (``--8<-- "examples/NAME.py"``), so a page can never show
code that does not run: CI runs this after building the site (``.ci/run``). The scripts run as a user runs
them (``python examples/NAME.py ...``, each in a fresh process) in the order below, where later tutorials
use the model the first one trained. ``check_pages`` also fails when a page includes a script this list
does not run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tutorial_runs(out: Path) -> list[tuple[str, list[str]]]:
    """(script name, arguments) in run order; ``out`` is the working folder."""
    model = str(out / "train" / "model.eqf")
    cu_model = str(out / "npt" / "train" / "model.eqf")
    return [
        ("train_from_trajectory", ["--tiny", "--out", str(out / "train")]),
        ("md_from_script", ["--model", model, "--steps", "100", "--report-interval", "10", "--no-progress",
                            "--out", str(out / "md")]),
        ("md_replicas", ["--model", model, "--replicas", "3", "--steps", "40", "--report-interval", "20",
                         "--no-progress", "--out", str(out / "replicas")]),
        ("ase_relax_and_md", ["--model", model, "--relax-steps", "10", "--md-steps", "40", "--log-interval", "10",
                              "--out", str(out / "ase")]),
        ("npt_crystal", ["--tiny", "--out", str(out / "npt")]),
        ("precision", ["--model", model, "--steps", "100"]),
        ("uncertainty_md", ["--tiny", "--out", str(out / "uncertainty")]),
        ("finetune", ["--tiny", "--out", str(out / "finetune")]),
        ("vibrations", ["--model", model, "--max-relax-steps", "20", "--phonons", cu_model,
                        "--out", str(out / "vibrations")]),
        ("benchmark_quick", ["--tiny", "--out", str(out / "benchmark")]),
        ("parallel_training", ["--simulate-cpu-devices", "2", "--tiny", "--out", str(out / "parallel")]),
    ]  # fmt: skip


def included_scripts() -> dict[str, set[str]]:
    """Page (relative to ``docs/``) → the ``examples/`` scripts it includes (``--8<-- "examples/X.py"``)."""
    docs = ROOT / "docs"
    return {
        str(page.relative_to(docs)): set(re.findall(r'^--8<--\s+"examples/(\w+)\.py"', page.read_text(), re.M))
        for page in sorted(docs.rglob("*.md"))
    }


def check_pages(names: set[str]) -> list[str]:
    """Scripts included by a page that :func:`tutorial_runs` does not run, and tutorial pages that include no
    script (a broken include directive would otherwise pass unnoticed)."""
    pages = included_scripts()
    problems = sorted(set().union(*pages.values()) - names)
    problems += [f"{page}: includes no script" for page, s in pages.items() if page.startswith("tutorials/") and not s]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--only", nargs="+", default=None, help="run only these scripts (names without .py)")
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="equiforce_tutorials_"))
    runs = tutorial_runs(out)
    missing = check_pages({name for name, _ in runs})
    if missing:
        print(f"pages include scripts that are not run here: {missing}", file=sys.stderr)
        return 1
    failed = []
    for name, script_args in runs:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), *script_args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        took = time.perf_counter() - start
        status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode})"
        print(f"{name:24s} {status:20s} {took:6.1f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
            print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    print(f"all tutorial scripts ran ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
