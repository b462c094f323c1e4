"""Crash recovery proven by random kills (slow target: ``python3 -m pytest -m slow tests/md/test_kill_recovery.py``).

Training and MD run as subprocesses of the command line and are killed with SIGKILL at random moments
(fixed seed), 20 times each; after every kill the *same command* is issued again until the job completes.
Checked: the job completes; it ends at the requested epoch / step; training's loss curve equals an
uninterrupted run's (rtol 1e-6, the resume tolerance of tests/training/test_trainer.py) and MD's
trajectory equals an uninterrupted run's (exact restart: 1e-9 Å); no duplicated or missing frames or rows
in the H5MD file, the thermo CSV and metrics.jsonl; every H5MD frame readable by plain h5py (after
``equiforce md --repair``) and by MDAnalysis; at most one chunk (MD) or one epoch (training) recomputed per kill.
Kill moments are uniform over the job's run time, so some land in file writes (checkpoint, model file,
H5MD frame, restart state); the previous files must then stay valid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from equiforce.md.reporters import read_h5md

pytestmark = pytest.mark.slow

KILLS = 20
SEED = 2026
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


def _run_until_done(cmd, cwd, rng, delays, kills_left, before_relaunch=None):
    """Run ``cmd`` until it exits 0, killing it at ``rng.uniform(*delays)`` s while kills remain.

    Returns (kills made, outputs of each launch)."""
    kills, outputs = 0, []
    while True:
        log = Path(cwd) / f"launch{len(outputs)}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
            if kills < kills_left:
                try:
                    proc.wait(timeout=rng.uniform(*delays))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
            else:
                proc.wait(timeout=900)
        outputs.append(log.read_text())
        if proc.returncode == 0:
            return kills, outputs
        assert proc.returncode == -signal.SIGKILL, f"launch failed (rc {proc.returncode}):\n{outputs[-1][-3000:]}"
        if before_relaunch is not None:
            before_relaunch()


def test_md_survives_random_kills(trained_aspirin_model, tmp_path):
    steps, interval = 6000, 100
    base = [sys.executable, "-m", "equiforce", "md", trained_aspirin_model, "sample:test:2", "--steps", str(steps)]
    opts = ["--report-interval", str(interval), "--seed", "3", "--out", "md.h5", "--thermo", "thermo.csv"]
    cmd = [*base, *opts, "--restart", "--no-progress"]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ref_dir, check=True, env=ENV, capture_output=True)
    job_s = time.perf_counter() - t0
    ref = read_h5md(ref_dir / "md.h5")
    rng = np.random.default_rng(SEED)
    total_kills, jobs, recomputed = 0, 0, []
    t_suite = time.perf_counter()
    while total_kills < KILLS:
        run_dir = tmp_path / f"job{jobs}"
        run_dir.mkdir()
        committed: list[int] = []

        def note_committed(run_dir=run_dir, committed=committed):
            path = run_dir / "md.h5"
            try:
                committed.append(int(read_h5md(path)["step"][-1]) if path.exists() else -1)
            except Exception:  # a file killed during creation: nothing committed
                committed.append(-1)

        kills, outputs = _run_until_done(cmd, run_dir, rng, (2.0, job_s), KILLS - total_kills, note_committed)
        total_kills += kills
        jobs += 1
        # a relaunch restarts at the last committed frame, or one chunk earlier (killed between a frame
        # and its restart state): at most one chunk recomputed per kill
        for last, out in zip(committed, outputs[1:], strict=True):
            m = re.search(r"restarting from .* at step (\d+)", out)
            start = int(m.group(1)) if m else 0
            assert last - start <= interval, (last, start)
            recomputed.append(max(0, last - start))
        subprocess.run([*base[:4], "--repair", "md.h5"], cwd=run_dir, check=True, env=ENV, capture_output=True)
        d = read_h5md(run_dir / "md.h5")
        assert list(d["step"]) == list(range(0, steps + 1, interval))
        np.testing.assert_allclose(d["positions"], ref["positions"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(d["velocities"], ref["velocities"], rtol=0, atol=1e-9)
        table = np.genfromtxt(run_dir / "thermo.csv", delimiter=",", names=True)
        assert list(table["step"].astype(int)) == list(range(0, steps + 1, interval))
        with h5py.File(run_dir / "md.h5", "r") as f:
            assert f["particles/all/position/value"].shape[0] == len(d["step"])
        mda = pytest.importorskip("MDAnalysis.coordinates.H5MD")
        reader = mda.H5MDReader(str(run_dir / "md.h5"))
        assert reader.n_frames == len(d["step"])
        reader.close()
    summary = {
        "kills": total_kills,
        "jobs": jobs,
        "lost_runs": 0,
        "chunks_recomputed": int(sum(r > 0 for r in recomputed)),
        "suite_s": round(time.perf_counter() - t_suite, 1),
        "job_s": round(job_s, 1),
    }
    print("MD kill suite:", json.dumps(summary))
    (Path(os.environ.get("EQUIFORCE_KILL_REPORT", tmp_path)) / "md_kills.json").write_text(json.dumps(summary))


def test_training_survives_random_kills(tmp_path):
    epochs = 6
    config = tmp_path / "train.yaml"
    config.write_text(
        "\n".join(
            [
                "output_dir: out",
                "progress_bar: false",
                "data:\n  train_size: 60\n  valid_fraction: 0.1\n  test: null",
                "model:\n  hyperparameters: {num_interactions: 1, num_features: 4, l_max: 1}",
                f"optim:\n  max_epochs: {epochs}\n  batch_size: 5",
                "md_check:\n  steps: 0",
            ]
        )
        + "\n"
    )
    cmd = [sys.executable, "-m", "equiforce", "train", "train.yaml", "--resume"]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "train.yaml").write_text(config.read_text())
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ref_dir, check=True, env=ENV, capture_output=True)
    job_s = time.perf_counter() - t0
    ref = [json.loads(x) for x in (ref_dir / "out/metrics.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(SEED)
    total_kills, jobs, recomputed = 0, 0, []
    t_suite = time.perf_counter()
    while total_kills < KILLS:
        run_dir = tmp_path / f"job{jobs}"
        run_dir.mkdir()
        (run_dir / "train.yaml").write_text(config.read_text())
        done: list[int] = []

        def note_epochs(run_dir=run_dir, done=done):
            path = run_dir / "out/metrics.jsonl"
            done.append(len(path.read_text().splitlines()) if path.exists() else 0)

        kills, outputs = _run_until_done(cmd, run_dir, rng, (2.0, job_s), KILLS - total_kills, note_epochs)
        total_kills += kills
        jobs += 1
        for finished, out in zip(done, outputs[1:], strict=True):
            m = re.search(r"resumed from .*: epoch (\d+)", out)
            start = int(m.group(1)) if m else 0
            assert finished - start <= 1, (finished, start)  # the checkpoint interval: one epoch
            recomputed.append(finished - start)
        got = [json.loads(x) for x in (run_dir / "out/metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
        for key in ("train_loss", "valid_loss", "valid_forces_mae_meV_per_A"):
            np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-6, err_msg=key)
        assert (run_dir / "out/model.eqf").is_file()
    summary = {
        "kills": total_kills,
        "jobs": jobs,
        "lost_runs": 0,
        "epochs_recomputed": int(sum(recomputed)),
        "suite_s": round(time.perf_counter() - t_suite, 1),
        "job_s": round(job_s, 1),
    }
    print("training kill suite:", json.dumps(summary))
    (Path(os.environ.get("EQUIFORCE_KILL_REPORT", tmp_path)) / "train_kills.json").write_text(json.dumps(summary))
