"""Streaming training data (issue 14 §3): peak memory against the dataset size, and the data pipeline's
speed against the training step's.

Builds real-shaped data: rMD17 aspirin frames (``../shared/data/rmd17``, split 01 train, 1000 frames) repeated
with Gaussian noise on the positions (``--noise`` Å; labels copied: the data are for timing and memory, not
for accuracy), written as rMD17-layout npz files of ``--frames-per-file`` frames and converted with
``equiforce preprocess`` (graphs stored, ``--r-max``). Then, for a small and a large file:

* training (``equiforce.training.train`` in a child process, ``data.streaming: true``, the config's default
  NequIP, float32, batch ``--batch-size``, a fixed 200-frame validation file, stopped by a time budget)
  reports its peak RSS (``ru_maxrss``) and the median training-step time (the step timed to completion,
  compilation excluded);
* the pipeline alone: batches per second of :meth:`HDF5Stream.batches` (shuffled random reads from the
  file, collation to the padded budget, transfer to the device), the work the prefetch thread does.

Writes ``results.json`` into ``--out``. Not a test: timings and memory depend on the machine and its load.

    python benchmarks/streaming.py --small 10000 --large 200000 --out runs/bench_streaming
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RMD17 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rmd17"


def make_inputs(root: Path, frames: int, per_file: int, noise: float, seed: int) -> list[Path]:
    """rMD17-layout npz files holding ``frames`` noisy copies of the aspirin training frames."""
    src = np.load(RMD17 / "rmd17_aspirin_train_01.npz")
    z, coords, energies, forces = src["nuclear_charges"], src["coords"], src["energies"], src["forces"]
    rng = np.random.default_rng(seed)
    files = []
    for i, a in enumerate(range(0, frames, per_file)):
        n = min(per_file, frames - a)
        pick = np.arange(a, a + n) % len(coords)
        path = root / f"aspirin_noisy_{frames}_{i:03d}.npz"
        if not path.exists():
            pos = coords[pick] + rng.normal(scale=noise, size=(n, *coords.shape[1:]))
            np.savez(path, nuclear_charges=z, coords=pos, energies=energies[pick], forces=forces[pick])
        files.append(path)
    return files


def preprocess_file(root: Path, frames: int, args: argparse.Namespace) -> tuple[Path, float]:
    out = root / f"aspirin_{frames}.h5"
    if out.exists():
        return out, float("nan")
    inputs = make_inputs(root, frames, args.frames_per_file, args.noise, args.seed)
    cmd = ["equiforce", "preprocess", *map(str, inputs), str(out), "--r-max", str(args.r_max)]
    print("$", " ".join(cmd[:3]), "...", " ".join(cmd[-3:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    for p in inputs:
        p.unlink()
    return out, seconds


def child_train(config_json: str) -> None:
    """In a child process: train as configured, print peak RSS and step times as JSON."""
    import jax

    from equiforce.training import trainer
    from equiforce.training.config import load_config

    spec = json.loads(config_json)
    cfg = load_config(None, spec["overrides"])
    times: list[float] = []
    real = trainer.make_train_step

    def timed(*a, **k):
        fn = real(*a, **k)

        def step(state, batch, weights=None):
            t0 = time.perf_counter()
            out = fn(state, batch, weights)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            return out

        return step

    trainer.make_train_step = timed
    t0 = time.perf_counter()
    trainer.train(cfg, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = times[1:]
    print(
        "RESULT "
        + json.dumps(
            {
                "peak_rss_MB": rss_mb,
                "steps": len(times),
                "step_median_s": statistics.median(steps) if steps else None,
                "wall_s": wall,
            }
        ),
        flush=True,
    )


def train_run(path: Path, valid: Path, out: Path, args: argparse.Namespace) -> dict:
    overrides = [
        f"output_dir={out}",
        f"data.train={path}",
        f"data.valid={valid}",
        "data.test=null",
        "data.streaming=true",
        f"data.statistics_size={args.statistics_size}",
        f"model.r_max={args.r_max}",
        f"optim.batch_size={args.batch_size}",
        f"optim.time_budget_minutes={args.train_minutes}",
        "optim.max_epochs=1",
        "md_check.steps=0",
        "model.uncertainty=false",
        "progress_bar=false",
    ]
    proc = subprocess.run(
        [sys.executable, __file__, "_child", json.dumps({"overrides": overrides})],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def pipeline_rate(path: Path, args: argparse.Namespace, n_batches: int) -> float:
    """Batches per second the streaming reader delivers (read, collate, device transfer), shuffled."""
    import jax
    import jax.numpy as jnp

    from equiforce.data.graph import collate, estimate_budget
    from equiforce.data.streaming import HDF5Stream

    with HDF5Stream(path, args.r_max) as stream:
        budget = estimate_budget(stream.n_atoms, stream.n_edges, args.batch_size)

        def make(group, s, graphs):
            return jax.tree.map(jnp.asarray, collate(s, graphs, range(len(group)), budget, np.float32))

        batches = stream.batches(args.batch_size, budget, make, seed=0, prefetch=8)
        next(batches)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            jax.block_until_ready(next(batches))
        rate = n_batches / (time.perf_counter() - t0)
        batches.close()
    return rate


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        child_train(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=10_000, help="frames of the small file")
    ap.add_argument("--large", type=int, default=1_000_000, help="frames of the large file")
    ap.add_argument("--frames-per-file", type=int, default=50_000)
    ap.add_argument("--noise", type=float, default=0.01, help="Gaussian noise on positions, Å")
    ap.add_argument("--r-max", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=5)
    ap.add_argument("--statistics-size", type=int, default=1000)
    ap.add_argument("--train-minutes", type=float, default=1.0, help="training time budget per run")
    ap.add_argument("--pipeline-batches", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_streaming")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    valid = root / "valid.h5"
    if not valid.exists():
        from equiforce.data import read_rmd17_npz, write_hdf5

        write_hdf5(valid, read_rmd17_npz(RMD17 / "rmd17_aspirin_test_01.npz").subset(np.arange(200)))
    results: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    for name, frames in (("small", args.small), ("large", args.large)):
        path, prep_s = preprocess_file(root, frames, args)
        run = train_run(path, valid, root / f"run_{name}", args)
        rate = pipeline_rate(path, args, args.pipeline_batches)
        results[name] = {
            "frames": frames,
            "file_GB": path.stat().st_size / 1e9,
            "preprocess_s": prep_s,
            **run,
            "pipeline_batches_per_s": rate,
        }
        print(name, json.dumps(results[name]), flush=True)
    s, g = results["small"], results["large"]
    results["rss_ratio_large_over_small"] = g["peak_rss_MB"] / s["peak_rss_MB"]
    for name in ("small", "large"):
        r = results[name]
        if r["step_median_s"]:  # batches the pipeline delivers in the time of one training step
            r["pipeline_over_step"] = r["pipeline_batches_per_s"] * r["step_median_s"]
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
