"""Crash recovery proven by kills: random ones, and injected ones inside every kind of write.

Targets (marker ``kills``, also ``slow``, so neither is in the default run):

* full: ``python3 -m pytest -m slow tests/md/test_kill_recovery.py`` (20 random kills of MD and 20 of
  training, plus the injected ones);
* reduced (``.ci/run``): ``EQUIFORCE_KILLS=5 python3 -m pytest -m kills tests/md/test_kill_recovery.py``
  (``EQUIFORCE_KILLS`` random kills each, plus all the injected ones).

**Random kills.** Training and MD run as subprocesses of the command line and are killed with SIGKILL at
random moments (fixed seed); after every kill the *same command* is issued again until the job completes.
Each launch records the write points it passed (``EQUIFORCE_FAULT_TRACE``, :mod:`equiforce.faults`), so
the suite counts the kills that landed inside a write (after one part of a write and before its last).

**Injected kills.** ``EQUIFORCE_FAULT=<write>:<part>:<n>`` makes the process kill itself between two
parts of a write, for every part boundary of: the training checkpoint, the model file (``best.eqf`` and the
final ``model.eqf``), the metrics line, the H5MD frame, the H5MD restart state (and the H5MD structural
change of its first write, made outside SWMR mode), and a ``preprocess`` part and the joined file. The
active-learning label gets its place here once it exists (:data:`INJECTED_AL_LABEL`). Each kill is
followed by the same command (without the fault), which must recover; a job's launches are chained (each
relaunch recovers from the previous kill and is killed at the next point), the last runs to the end. A kill
is shown to have landed where named: the process said so (``EQUIFORCE_FAULT: killed at ...``) and died by
SIGKILL, and for the parts of an atomic file a temporary file is left beside the target.

Checked for every job: it completes; MD's trajectory and thermo values (every column) equal an
uninterrupted run's (exact restart: 1e-9 Å, 1e-9 eV); no duplicated or missing frames or rows; every H5MD
frame readable by plain h5py (after ``equiforce md --repair``) and MDAnalysis; training's loss curve equals
an uninterrupted run's (rtol 1e-6, the resume tolerance of tests/training/test_trainer.py) and its final
model file's parameters equal the uninterrupted run's, parameter by parameter (:data:`PARAM_RTOL`); at most
one chunk (MD) or one epoch (training) recomputed per kill; a file left unreadable by a kill is a failure
unless nothing had been committed to it. ``lost_runs`` counts the jobs that failed any check (measured; the
test then fails); the work lost is the chunks / epochs recomputed.
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
from flax.serialization import to_state_dict
from flax.traverse_util import flatten_dict

from equiforce import faults
from equiforce.data.errors import DataError
from equiforce.md.reporters import clear_stale_write_flags, read_h5md
from equiforce.potentials.model_io import load_model

pytestmark = [pytest.mark.slow, pytest.mark.kills]

KILLS = int(os.environ.get("EQUIFORCE_KILLS", "20"))
SEED = 2026
ENV = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.TRACE_ENV)}
ENV.update({"PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"})
#: final model parameters of a killed-and-resumed training run vs the uninterrupted run's (relative)
PARAM_RTOL = 1e-6
#: the last part of each write (a trace ending on another part means the kill landed inside that write)
LAST_PART = {
    "checkpoint": "replaced",
    "model": "replaced",
    "file": "replaced",
    "h5md-frame": "committed",
    "restart-state": "activated",
    "h5md-structure": "changed",
    "metrics-line": "written",
    "preprocess-part": "replaced",
    "hdf5": "replaced",
}
#: the active-learning label write: add its parts here (and a chain below) once it exists
INJECTED_AL_LABEL: list[str] = []

TRAIN_YAML = "\n".join(
    [
        "output_dir: out",
        "progress_bar: false",
        "data:\n  train_size: 60\n  valid_fraction: 0.1\n  test: null",
        "model:\n  hyperparameters: {num_interactions: 1, num_features: 4, l_max: 1}",
        "optim:\n  max_epochs: 6\n  batch_size: 5",
        "md_check:\n  steps: 0",
    ]
)
TRAIN_EPOCHS = 6
TRAIN_CMD = [sys.executable, "-m", "equiforce", "train", "train.yaml", "--resume"]


def _report(name: str, summary: dict) -> None:
    print(f"{name}:", json.dumps(summary))
    folder = Path(os.environ.get("EQUIFORCE_KILL_REPORT", "."))
    if "EQUIFORCE_KILL_REPORT" in os.environ:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(summary))


def _launch(cmd, cwd: Path, n: int, *, kill_after: float | None = None, fault: str | None = None):
    """Launch number ``n`` of ``cmd`` in ``cwd``, SIGKILLed after ``kill_after`` s if still running, or at the
    injected ``fault``. Returns (return code, output, write points passed)."""
    log, trace = cwd / f"launch{n}.log", cwd / f"trace{n}.txt"
    env = {**ENV, faults.TRACE_ENV: str(trace), **({faults.ENV: fault} if fault else {})}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=kill_after if kill_after is not None else 900)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if kill_after is None:
                raise AssertionError(f"launch {n} of {cmd} did not finish in 900 s") from None
    points = trace.read_text().split() if trace.exists() else []
    return proc.returncode, log.read_text(), points


def _inside_write(points: list[str]) -> bool:
    """Whether a launch killed after passing ``points`` died inside a write (between two of its parts)."""
    if not points:
        return False
    write, part = points[-1].split(":")
    return LAST_PART.get(write) != part


#: what a lost run may raise (it is then counted, reported, and the test fails at the end)
LOST = (AssertionError, ValueError, OSError, subprocess.CalledProcessError)


def _run_until_done(cmd, cwd: Path, rng, delays, kills_left: int, tally: dict, before_relaunch=None):
    """Run ``cmd`` until it exits 0, killing it at ``rng.uniform(*delays)`` s while kills remain; counts the
    kills (and those inside a write) into ``tally`` as they happen.

    Returns (outputs of each launch, write points passed by each launch)."""
    kills, outputs, traces = 0, [], []
    while True:
        n = len(outputs)
        if n > 3 * kills_left + 3:
            raise AssertionError(f"no completion after {n} launches")
        delay = rng.uniform(*delays) if kills < kills_left else None
        rc, out, points = _launch(cmd, cwd, n, kill_after=delay)
        outputs.append(out)
        traces.append(points)
        if rc == 0:
            return outputs, traces
        if rc != -signal.SIGKILL:
            raise AssertionError(f"launch {n} failed (rc {rc}):\n{out[-3000:]}")
        kills += 1
        tally["kills"] += 1
        tally["inside"] += _inside_write(points)
        if before_relaunch is not None:
            before_relaunch(traces)


# ----------------------------------------------------------------------------------------------- MD


def _md_cmd(model: str, steps: int, interval: int) -> tuple[list[str], list[str]]:
    base = [sys.executable, "-m", "equiforce", "md", model, "sample:test:2", "--steps", str(steps)]
    opts = ["--report-interval", str(interval), "--seed", "3", "--out", "md.h5", "--thermo", "thermo.csv"]
    return base, [*base, *opts, "--restart", "--no-progress"]


def _timed_run(cmd, folder: Path) -> float:
    folder.mkdir()
    if cmd[3] == "train":
        (folder / "train.yaml").write_text(TRAIN_YAML + "\n")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=folder, check=True, env=ENV, capture_output=True)
    return time.perf_counter() - t0


def _md_reference(model: str, folder: Path, steps: int, interval: int, timed: bool = True):
    """The uninterrupted run's trajectory and thermo table, and (``timed``) the time of a run with compiled
    programs cached (the reference run's own time includes compiling them): the range of the random kills."""
    _timed_run(_md_cmd(model, steps, interval)[1], folder)
    job_s = _timed_run(_md_cmd(model, steps, interval)[1], folder.parent / f"{folder.name}-timed") if timed else 0.0
    return read_h5md(folder / "md.h5"), np.genfromtxt(folder / "thermo.csv", delimiter=",", names=True), job_s


def _last_committed_step(path: Path, traces: list[list[str]]) -> int:
    """The last committed trajectory step after a kill (-1: none). Clears a killed writer's flags first, as the
    relaunch does. An unreadable file fails unless no launch so far had committed a frame to it."""
    if not path.exists():
        return -1
    try:
        clear_stale_write_flags(path)
        steps = read_h5md(path)["step"]
    except DataError as err:
        if any("h5md-frame:committed" in points for points in traces):
            raise AssertionError(f"{path} unreadable after a kill, with frames committed before: {err}") from err
        return -1
    return int(steps[-1]) if len(steps) else -1


def _check_md_job(run_dir: Path, base: list[str], ref: dict, ref_thermo: np.ndarray, steps: int, interval: int):
    subprocess.run([*base[:4], "--repair", "md.h5"], cwd=run_dir, check=True, env=ENV, capture_output=True)
    d = read_h5md(run_dir / "md.h5")
    assert list(d["step"]) == list(range(0, steps + 1, interval))
    np.testing.assert_allclose(d["positions"], ref["positions"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(d["velocities"], ref["velocities"], rtol=0, atol=1e-9)
    table = np.genfromtxt(run_dir / "thermo.csv", delimiter=",", names=True)
    assert table.dtype.names == ref_thermo.dtype.names
    assert list(table["step"].astype(int)) == list(range(0, steps + 1, interval))
    for name in table.dtype.names:  # every thermo value, not only the step column (eV, K, ps)
        np.testing.assert_allclose(table[name], ref_thermo[name], rtol=0, atol=1e-9, err_msg=name)
    with h5py.File(run_dir / "md.h5", "r") as f:
        assert f["particles/all/position/value"].shape[0] == len(d["step"])
    mda = pytest.importorskip("MDAnalysis.coordinates.H5MD")
    reader = mda.H5MDReader(str(run_dir / "md.h5"))
    assert reader.n_frames == len(d["step"])
    reader.close()


def _md_recomputed(committed: list[int], outputs: list[str], interval: int) -> list[int]:
    """Steps recomputed by each relaunch: last committed step before it minus the step it restarted from; a
    relaunch restarts at the last committed frame, or one chunk earlier (killed between a frame and its restart
    state), so at most one chunk per kill. A relaunch killed before it said where it starts did no work."""
    recomputed = []
    for last, out in zip(committed, outputs[1:], strict=True):
        m = re.search(r"restarting from .* at step (\d+)", out)
        if m is None and "starting a new run" not in out:
            continue  # killed while starting up
        start = int(m.group(1)) if m else 0
        assert last - start <= interval, f"relaunch restarted at step {start}, {last} was committed"
        recomputed.append(max(0, last - start))
    return recomputed


def test_md_survives_random_kills(trained_aspirin_model, tmp_path):
    steps, interval = 6000, 100
    base, cmd = _md_cmd(trained_aspirin_model, steps, interval)
    ref, ref_thermo, job_s = _md_reference(trained_aspirin_model, tmp_path / "ref", steps, interval)
    rng = np.random.default_rng(SEED)
    tally, jobs, recomputed, failures = {"kills": 0, "inside": 0}, 0, [], []
    t_suite = time.perf_counter()
    while tally["kills"] < KILLS:
        run_dir = tmp_path / f"job{jobs}"
        run_dir.mkdir()
        jobs += 1
        committed: list[int] = []
        try:
            outputs, _ = _run_until_done(
                cmd,
                run_dir,
                rng,
                (2.0, job_s),
                KILLS - tally["kills"],
                tally,
                lambda traces, d=run_dir, c=committed: c.append(_last_committed_step(d / "md.h5", traces)),
            )
            recomputed += _md_recomputed(committed, outputs, interval)
            _check_md_job(run_dir, base, ref, ref_thermo, steps, interval)
        except LOST as err:  # a lost run: counted, reported, and the test fails below
            failures.append(f"{run_dir.name}: {type(err).__name__}: {err}")
            tally["kills"] += 0 if committed else 1  # a job that failed before its first kill still ends
    summary = {
        "kills": tally["kills"],
        "kills_inside_a_write": tally["inside"],
        "jobs": jobs,
        "lost_runs": len(failures),
        "chunks_recomputed": int(sum(r > 0 for r in recomputed)),
        "steps_recomputed": int(sum(recomputed)),
        "suite_s": round(time.perf_counter() - t_suite, 1),
        "job_s": round(job_s, 1),
    }
    _report("md_kills", summary)
    assert not failures, "\n".join(failures)


# Each launch of the chain is killed at the named point (counted from 1 in that launch); the relaunch after
# it resumes and is killed at the next. 600 steps, a frame every 100: frames 0, 100, ..., 600.
MD_INJECTED = [
    "restart-state:slot-written:1",  # frame 0 committed, its (first) restart state not yet active: start over
    "h5md-structure:changed:1",  # the first restart state's slot created outside SWMR mode, not flushed
    "h5md-frame:appended:2",
    "h5md-frame:flushed:1",
    "h5md-frame:committed:2",
    "restart-state:slot-written:2",
    "restart-state:slot-flushed:1",
    "restart-state:activated:2",
    "h5md-frame:committed:1",  # a frame committed after the last restart state: the relaunch truncates it...
    "h5md-structure:changed:1",  # ...outside SWMR mode, and is killed before that is flushed
]


def _injected_job(name: str, run) -> None:
    """Run one chained injected-kill job (``run()`` returns (kills that landed, a dict of figures)); report it
    with ``lost_runs`` measured (1 when any check failed), then fail if it was lost."""
    t0 = time.perf_counter()
    landed: list[str] = []
    try:
        figures = run(landed)
        lost, error = 0, None
    except LOST as err:
        figures, lost, error = {}, 1, err
    summary = {"kills": len(landed), "points": landed, "lost_runs": lost, **figures}
    _report(name, {**summary, "suite_s": round(time.perf_counter() - t0, 1)})
    if error is not None:
        raise error


def _run_injected(cmd, run_dir: Path, chain: list[str], landed: list[str], evidence=None) -> list[str]:
    """Launch ``cmd`` once per fault of ``chain`` (each must die there), then once without a fault (must finish).

    Appends each fault to ``landed`` once its kill is shown to have landed there. Returns the outputs."""
    outputs = []
    for n, fault in enumerate([*chain, None]):
        rc, out, points = _launch(cmd, run_dir, n, fault=fault)
        outputs.append(out)
        if fault is None:
            assert rc == 0, f"the recovery launch failed (rc {rc}):\n{out[-3000:]}"
            break
        write, part, _ = fault.split(":")
        assert rc == -signal.SIGKILL, f"launch {n} ({fault}) was not killed (rc {rc}):\n{out[-3000:]}"
        assert f"{faults.ENV}: killed at {write}:{part}" in out, out[-3000:]
        assert points and points[-1] == f"{write}:{part}"
        if evidence is not None:
            evidence(write, part)
        landed.append(fault)
    return outputs


def test_md_recovers_from_kills_inside_each_write(trained_aspirin_model, tmp_path):
    steps, interval = 600, 100
    base, cmd = _md_cmd(trained_aspirin_model, steps, interval)
    ref, ref_thermo, _ = _md_reference(trained_aspirin_model, tmp_path / "ref", steps, interval, timed=False)
    run_dir = tmp_path / "job"
    run_dir.mkdir()

    def run(landed):
        _run_injected(cmd, run_dir, MD_INJECTED, landed)
        _check_md_job(run_dir, base, ref, ref_thermo, steps, interval)
        return {}

    _injected_job("md_injected_kills", run)


# ----------------------------------------------------------------------------------------- training


def _train_reference(folder: Path, timed: bool = True) -> tuple[list[dict], float]:
    """The uninterrupted run's metrics, and (``timed``) the time of a run with compiled programs cached."""
    _timed_run(TRAIN_CMD, folder)
    job_s = _timed_run(TRAIN_CMD, folder.parent / f"{folder.name}-timed") if timed else 0.0
    return [json.loads(x) for x in (folder / "out/metrics.jsonl").read_text().splitlines()], job_s


def _epochs_logged(path: Path) -> int:
    """Complete metrics lines (a line torn by a kill is not an epoch)."""
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the part after the last newline is torn (or empty)
    return sum(1 for line in lines if json.loads(line).get("epoch"))


def _compare_models(got: Path, want: Path) -> float:
    """Parameter by parameter: the same names and shapes, values within PARAM_RTOL. Returns the largest
    relative difference."""
    pa, pb = (flatten_dict(to_state_dict(load_model(p)[1])) for p in (got, want))
    assert sorted(pa) == sorted(pb), "different parameter names"
    worst = 0.0
    for key in pb:
        a, b = np.asarray(pa[key]), np.asarray(pb[key])
        assert a.shape == b.shape and a.dtype == b.dtype, (key, a.shape, b.shape, a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=0, err_msg="/".join(map(str, key)))
        scale = np.maximum(np.abs(b), np.finfo(b.dtype).tiny)
        worst = max(worst, float(np.max(np.abs(a - b) / scale, initial=0.0)))
    return worst


def _check_training_job(run_dir: Path, ref_dir: Path, ref: list[dict]) -> float:
    got = [json.loads(x) for x in (run_dir / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in got] == list(range(1, TRAIN_EPOCHS + 1))
    for key in ("train_loss", "valid_loss", "valid_forces_mae_meV_per_A"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-6, err_msg=key)
    return _compare_models(run_dir / "out/model.eqf", ref_dir / "out/model.eqf")


def _training_recomputed(done: list[int], outputs: list[str]) -> list[int]:
    recomputed = []
    for finished, out in zip(done, outputs[1:], strict=True):
        m = re.search(r"resumed from .*: epoch (\d+)", out)
        if m is None and "starting from scratch" not in out:
            continue  # killed while starting up: no work done
        start = int(m.group(1)) if m else 0
        assert finished - start <= 1, f"resumed at epoch {start}, {finished} were logged"  # one epoch at most
        recomputed.append(finished - start)
    return recomputed


def test_training_survives_random_kills(tmp_path):
    ref, job_s = _train_reference(tmp_path / "ref")
    rng = np.random.default_rng(SEED)
    tally, jobs, recomputed, failures, worst = {"kills": 0, "inside": 0}, 0, [], [], 0.0
    t_suite = time.perf_counter()
    while tally["kills"] < KILLS:
        run_dir = tmp_path / f"job{jobs}"
        run_dir.mkdir()
        (run_dir / "train.yaml").write_text(TRAIN_YAML + "\n")
        jobs += 1
        done: list[int] = []
        try:
            outputs, _ = _run_until_done(
                TRAIN_CMD,
                run_dir,
                rng,
                (2.0, job_s),
                KILLS - tally["kills"],
                tally,
                lambda traces, d=run_dir, c=done: c.append(_epochs_logged(d / "out/metrics.jsonl")),
            )
            recomputed += _training_recomputed(done, outputs)
            worst = max(worst, _check_training_job(run_dir, tmp_path / "ref", ref))
        except LOST as err:
            failures.append(f"{run_dir.name}: {type(err).__name__}: {err}")
            tally["kills"] += 0 if done else 1
    summary = {
        "kills": tally["kills"],
        "kills_inside_a_write": tally["inside"],
        "jobs": jobs,
        "lost_runs": len(failures),
        "epochs_recomputed": int(sum(recomputed)),
        "max_param_rel_diff": worst,
        "suite_s": round(time.perf_counter() - t_suite, 1),
        "job_s": round(job_s, 1),
    }
    _report("train_kills", summary)
    assert not failures, "\n".join(failures)


# 6 epochs; every epoch improves on this data, so each writes best.eqf, then its metrics line, then the
# checkpoint; the final model.eqf follows the last checkpoint.
TRAIN_INJECTED = [
    "metrics-line:half-written:1",  # epoch 1's line torn, no checkpoint yet: start over
    "checkpoint:tmp-created:1",
    "checkpoint:tmp-written:1",
    "checkpoint:tmp-synced:1",
    "checkpoint:replaced:1",  # epoch 1 committed
    "model:tmp-created:1",  # best.eqf of epoch 2
    "model:tmp-written:1",
    "model:tmp-synced:1",
    "model:replaced:1",
    "metrics-line:written:1",  # epoch 2's line written, its checkpoint not: one line too many
    "checkpoint:replaced:5",  # the last epoch's checkpoint committed, the final model not yet written
    "model:tmp-created:1",  # the final model.eqf (resumed after the last epoch: the first model write)
    "model:tmp-written:1",
    "model:tmp-synced:1",
    "model:replaced:1",
]


def test_training_recovers_from_kills_inside_each_write(tmp_path):
    ref, _ = _train_reference(tmp_path / "ref", timed=False)
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / "train.yaml").write_text(TRAIN_YAML + "\n")
    out = run_dir / "out"

    def evidence(write: str, part: str) -> None:  # what the file system shows at the kill
        tmp = list(out.rglob(".*.tmp"))
        if part.startswith("tmp-"):
            assert tmp, f"{write}:{part}: no temporary file beside the target"
        if part == "half-written":
            assert not (out / "metrics.jsonl").read_text().endswith("\n"), "the metrics line is not torn"

    def run(landed):
        outputs = _run_injected(TRAIN_CMD, run_dir, TRAIN_INJECTED, landed, evidence)
        assert "resumed from" in outputs[-1]
        worst = _check_training_job(run_dir, tmp_path / "ref", ref)
        assert not list(out.rglob(".*.tmp")), "temporary files left behind"
        return {"max_param_rel_diff": worst}

    _injected_job("train_injected_kills", run)


# ---------------------------------------------------------------------------------------- preprocess

# 100 structures in parts of 25 (4 parts), one worker process (the parts are written in this process)
PREPROCESS_INJECTED = [
    "preprocess-part:appended:2",  # part 1 in its temporary file, not closed
    "preprocess-part:closed:1",  # part 1 closed, not renamed into place
    "preprocess-part:tmp-synced:1",  # part 1 on disk in its temporary file, not renamed
    "preprocess-part:replaced:2",  # parts 1 and 2 in place
    "hdf5:appended:2",  # all parts there, the joined file half written
    "hdf5:closed:1",  # the joined file complete in its temporary file, not renamed
    "hdf5:tmp-synced:1",  # ... and on disk, not renamed
]


def test_preprocess_recovers_from_kills_inside_each_write(tmp_path):
    from equiforce.data.sample import __file__ as sample_init

    data = Path(sample_init).parent / "rmd17_salicylic_train_01_first100.npz"
    cmd = [sys.executable, "-m", "equiforce", "preprocess", str(data), "out.h5", "--r-max", "4"]
    cmd += ["--chunk-size", "25", "--workers", "1"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "job"
    ref_dir.mkdir()
    run_dir.mkdir()
    subprocess.run(cmd, cwd=ref_dir, check=True, env=ENV, capture_output=True)

    def evidence(write: str, part: str) -> None:
        if part in ("appended", "closed", "tmp-synced"):
            assert list(run_dir.rglob(".*.tmp")), f"{write}:{part}: no temporary file"
        assert not (run_dir / "out.h5").exists(), "the output appeared before it was complete"

    def run(landed):
        outputs = _run_injected(cmd, run_dir, PREPROCESS_INJECTED, landed, evidence)
        assert "already done" in outputs[-1]
        assert (run_dir / "out.h5").read_bytes() == (ref_dir / "out.h5").read_bytes()  # the module's promise
        assert not (run_dir / "out.h5.parts").exists()
        assert not list(run_dir.glob(".*.tmp"))
        return {}

    _injected_job("preprocess_injected_kills", run)
