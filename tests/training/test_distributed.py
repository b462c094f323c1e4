"""Training over several processes (``jax.distributed``): two processes on this machine reproduce the
single-process loss curve, only process 0 writes, a failure in one process ends both, and a coordinator that
cannot be reached is a clear error within the timeout, never a hang.

Each run is a fresh subprocess (``jax.distributed`` must start before JAX does anything); the two processes
talk over localhost through JAX's gloo CPU collectives, one CPU device each, in float64 so that agreement
to 1e-6 means the same mathematics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from equiforce.data import build_neighbour_graphs, load_sample
from equiforce.data.hdf5 import HDF5Writer
from equiforce.training import load_config
from equiforce.training.config import ConfigError, ParallelConfig
from equiforce.training.data_source import _train_rows
from equiforce.training.distributed import (
    CoordinatorUnreachableError,
    cluster_tasks,
    resolve_launch,
    wait_for_coordinator,
)

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import equiforce.training.trainer as trainer
    from equiforce.data.streaming import HDF5Stream
    from equiforce.training import load_config, train
    from equiforce.training.parallel import DataParallel

    out, n, pid, port, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else []
    writes = []
    reads = []  # per streamed epoch: the file rows of the training structures this process read

    def batches(self, *args, **kwargs):
        reads.append([])
        return stream_batches(self, *args, **kwargs)

    def read(self, positions):
        if reads:  # (not the counting pass before training)
            reads[-1].extend(int(r) for r in self.rows[np.asarray(positions, dtype=np.int64)])
        return stream_read(self, positions)

    stream_batches, stream_read = HDF5Stream.batches, HDF5Stream.read
    HDF5Stream.batches, HDF5Stream.read = batches, read

    def record(name, fn):
        def wrapped(*args, **kwargs):
            writes.append(name)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("save_checkpoint", "save_model", "finish_training", "atomic_write_bytes"):
        setattr(trainer, name, record(name, getattr(trainer, name)))
    if mode == "disagree" and pid == 1:  # process 1 reads other data than process 0
        overrides_extra = ["data.train_size=13"]
    else:
        overrides_extra = []
    if mode == "fail" and pid == 1:  # a failure in the middle of the first epoch, in process 1 only
        calls, batch = [], DataParallel.batch

        def failing_batch(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return batch(self, *args, **kwargs)

        DataParallel.batch = failing_batch

    overrides = [
        f"output_dir={out}", "model.name=nequip", "model.dtype=float64",
        "model.hyperparameters={num_interactions: 1, l_max: 1, num_features: 4, num_bessel: 4}",
        "data.train_size=14", "data.test=null", "optim.batch_size=5", "optim.max_epochs=2",
        "model.uncertainty=false", "md_check.steps=0", "progress_bar=false", "parallel.devices=1",
    ]
    if n > 1:
        overrides += [
            f"parallel.coordinator_address=localhost:{port}", f"parallel.num_processes={n}",
            f"parallel.process_id={pid}", "parallel.initialization_timeout=120", "parallel.heartbeat_timeout=10",
            "parallel.shutdown_timeout=60",
        ]
    t0 = time.perf_counter()
    result = train(
        load_config(None, overrides + overrides_extra + extra),
        resume=mode == "resume",
        log=lambda line: print("LOG " + line, flush=True),
    )
    print("RESULT" + json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "train_loss": [r["train_loss"] for r in result.history],
        "valid_loss": [r["valid_loss"] for r in result.history],
        "step": [r["step"] for r in result.history],
        "model_path": str(result.model_path), "valid_metrics": result.valid_metrics, "writes": sorted(set(writes)),
        "stopped_because": result.stopped_because, "reads": reads, "seconds": time.perf_counter() - t0,
    }))
    """
)

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
ENV.pop("XLA_FLAGS", None)  # one CPU device per process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, n: int, pid: int, port: int, mode: str = "train", extra: list[str] = ()) -> subprocess.Popen:
    """One process of an ``n``-process run (``mode``: train, resume, fail, disagree) with ``extra``
    config overrides."""
    args = [sys.executable, "-c", SCRIPT, str(out), str(n), str(pid), str(port), mode, json.dumps(list(extra))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a process hung") from None
        done.append((p.returncode, stdout, stderr))
    return done


def _result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """One process on one device, and two processes on one device each, all started at once."""
    root = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    single = _start(root / "one", 1, 0, port)
    pair = [_start(root / "two", 2, pid, port) for pid in (0, 1)]
    (rc1, out1, err1), (rc_a, out_a, err_a), (rc_b, out_b, err_b) = _finish([single, *pair], timeout=600)
    assert rc1 == 0, err1[-4000:]
    assert rc_a == 0 and rc_b == 0, f"process 0:\n{err_a[-3000:]}\nprocess 1:\n{err_b[-3000:]}"
    metrics = [json.loads(line) for line in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    return {
        "one": _result(out1),
        "p0": _result(out_a),
        "p1": _result(out_b),
        "log0": out_a,
        "log1": out_b,
        "metrics": metrics,
    }


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_two_processes_reproduce_the_single_process_loss_curve(two_processes):
    one, p0, p1 = two_processes["one"], two_processes["p0"], two_processes["p1"]
    assert (one["process_count"], p0["process_count"], p1["process_count"]) == (1, 2, 2)
    assert (p0["process_index"], p1["process_index"]) == (0, 1)
    assert len(one["train_loss"]) == 2 and one["train_loss"][1] < one["train_loss"][0]
    # the curve process 0 wrote, and the one each process returned
    written = two_processes["metrics"]
    rel = max(
        _max_rel([r["train_loss"] for r in written], one["train_loss"]),
        _max_rel([r["valid_loss"] for r in written], one["valid_loss"]),
    )
    print(f"1 vs 2 processes: largest relative difference of the train/valid loss curves {rel:.2e}")
    assert rel <= 1e-6
    for p in (p0, p1):
        assert _max_rel(p["train_loss"], one["train_loss"]) <= 1e-6
        assert _max_rel(p["valid_loss"], one["valid_loss"]) <= 1e-6
    assert "data parallel over 2 cpu devices (cpu) in 2 processes" in two_processes["log0"]
    # in memory every process reads everything, and the log says so and what to do instead
    assert "LOG each of the 2 processes reads the whole training data (sample:train)" in two_processes["log0"]
    assert "data.streaming: true" in two_processes["log0"]


def test_only_process_zero_writes_and_logs(two_processes):
    p0, p1 = two_processes["p0"], two_processes["p1"]
    assert {"save_checkpoint", "save_model", "finish_training"} <= set(p0["writes"])
    assert p1["writes"] == []
    assert "LOG epoch" in two_processes["log0"] and "LOG " not in two_processes["log1"]
    # process 1 waited for process 0's model file and returned the same result
    assert p1["model_path"] == p0["model_path"] and p1["valid_metrics"] == p0["valid_metrics"]


def _assert_ok(done: list[tuple[int, str, str]]) -> None:
    for pid, (rc, _, err) in enumerate(done):
        assert rc == 0, f"process {pid}:\n{err[-3000:]}"


@pytest.fixture(scope="module")
def streamed(two_processes, tmp_path_factory) -> dict:
    """The run of ``two_processes`` streamed by two processes from a native HDF5 copy of its data: stopped by
    a time budget after its first step (mid-epoch), then resumed to the end (both streamed)."""
    root = tmp_path_factory.mktemp("streamed")
    r_max = load_config(None, []).model.r_max
    s = load_sample("train")
    with HDF5Writer(root / "train.h5", r_max=r_max) as w:
        w.append(s, build_neighbour_graphs(s, r_max))
    extra = [f"data.train={root / 'train.h5'}", "data.streaming=true", "data.prefetch_batches=2"]
    port = _free_port()
    budget = [*extra, "optim.time_budget_minutes=1e-6"]
    stopped = _finish([_start(root / "run", 2, pid, port, extra=budget) for pid in (0, 1)], timeout=600)
    _assert_ok(stopped)
    port = _free_port()
    resumed = _finish([_start(root / "run", 2, pid, port, "resume", extra) for pid in (0, 1)], timeout=600)
    _assert_ok(resumed)
    train_rows = _train_rows(load_config(None, ["data.train_size=14"]), len(s))[0]
    return {
        "stopped": [_result(out) for _, out, _ in stopped],
        "stopped_log0": stopped[0][1],
        "resumed": [_result(out) for _, out, _ in resumed],
        "resumed_log0": resumed[0][1],
        "train_rows": sorted(int(r) for r in train_rows),
    }


def test_time_budget_ends_both_processes_and_the_streamed_run_resumes(streamed):
    for p in streamed["stopped"]:  # both returned (rc 0) after the first step, mid-epoch 1
        assert p["stopped_because"] == "time_budget" and p["train_loss"] == []
    assert "LOG time budget of 1e-06 min reached during epoch 1" in streamed["stopped_log0"]
    for log in (streamed["stopped_log0"], streamed["resumed_log0"]):
        assert "LOG streaming 14 training structures" in log
    for p in streamed["resumed"]:
        assert p["stopped_because"] == "max_epochs" and p["step"] == [3, 6]
    p0, p1 = streamed["resumed"]
    assert p1["model_path"] == p0["model_path"] and p1["valid_metrics"] == p0["valid_metrics"]


def test_streamed_two_processes_reproduce_the_single_process_loss_curve(streamed, two_processes):
    """Stopped, resumed and streamed by two processes: the loss curve of one process in memory."""
    one = two_processes["one"]
    for p in streamed["resumed"]:
        rel = max(_max_rel(p["train_loss"], one["train_loss"]), _max_rel(p["valid_loss"], one["valid_loss"]))
        print(f"streamed over 2 processes (stopped, resumed) vs 1 process in memory: relative difference {rel:.2e}")
        assert rel <= 1e-12
        # the same batches as the two processes in memory, split the same way: the same sums in the same order
        assert p["train_loss"] == two_processes["p0"]["train_loss"]
        assert p["valid_loss"] == two_processes["p0"]["valid_loss"]


def test_each_streaming_process_reads_only_its_parts_of_each_batch(streamed):
    """14 structures in batches of 5, 5, 4, each split 3 + 2 or 2 + 2 over the two processes' devices: the
    rows each process reads are disjoint, and together they are the epoch's structures, each read once."""
    expected = set(streamed["train_rows"])
    (stopped0,), (stopped1,) = (p["reads"] for p in streamed["stopped"])  # epoch 1 until the stop
    (first0, second0), (first1, second1) = (p["reads"] for p in streamed["resumed"])
    # epoch 2, read whole by the resumed run
    assert (len(second0), len(second1)) == (8, 6)
    assert len(set(second0)) == 8 and len(set(second1)) == 6 and not set(second0) & set(second1)
    assert set(second0) | set(second1) == expected
    # epoch 1: its first batch (and what the reading thread got ahead) before the stop, the rest after it
    assert (len(first0), len(first1)) == (5, 4)
    assert not set(stopped0) & set(stopped1) and not set(first0) & set(first1)
    assert not set(stopped0[:3] + first0) & set(stopped1[:2] + first1)
    assert sorted(stopped0[:3] + first0 + stopped1[:2] + first1) == sorted(expected)
    assert set(first0) != set(second0)  # a new shuffle each epoch, still split between the processes


def test_a_failure_in_one_process_ends_both(tmp_path):
    port = _free_port()
    t0 = time.perf_counter()
    (rc0, _, err0), (rc1, _, err1) = _finish([_start(tmp_path, 2, pid, port, "fail") for pid in (0, 1)], timeout=240)
    seconds = time.perf_counter() - t0
    assert rc1 == 1 and "equiforce: process 1 of 2 failed (RuntimeError: injected failure)" in err1, err1[-3000:]
    assert rc0 != 0, err0[-3000:]  # ended by the failed collective or by JAX's coordination service
    assert "process 0 of 2 failed" in err0 or "distributed service detected fatal errors" in err0, err0[-3000:]
    assert seconds < 200


def test_processes_that_disagree_stop_before_training(tmp_path):
    port = _free_port()
    (rc0, _, err0), (rc1, _, err1) = _finish(
        [_start(tmp_path, 2, pid, port, "disagree") for pid in (0, 1)], timeout=240
    )
    for rc, err in ((rc0, err0), (rc1, err1)):
        assert rc == 1, err[-3000:]
        assert "the 2 processes do not agree: config differs on process(es) [1]" in err, err[-3000:]
        assert "training data differs on process(es) [1]" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    port = _free_port()  # nothing listens there
    config = tmp_path / "config.yaml"
    config.write_text("progress_bar: false\n")
    t0 = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "equiforce",
            "train",
            str(config),
            f"output_dir={tmp_path / 'run'}",
            f"parallel.coordinator_address=127.0.0.1:{port}",
            "parallel.num_processes=2",
            "parallel.process_id=1",
            "parallel.initialization_timeout=2",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"process 1 cannot reach the coordinator at 127.0.0.1:{port}" in done.stderr
    assert "within 2 s" in done.stderr and seconds < 60
    assert not (tmp_path / "run").exists()  # nothing was written


def test_process_zero_alone_is_ended_after_the_timeout(tmp_path):
    """The coordinator whose peers never come: JAX ends it after ``initialization_timeout`` (no hang)."""
    code = (
        "from equiforce.training.config import ParallelConfig\n"
        "from equiforce.training.distributed import initialize\n"
        f"initialize(ParallelConfig(coordinator_address='127.0.0.1:{_free_port()}', num_processes=2, process_id=0,"
        " initialization_timeout=2))\n"
        "print('NOT REACHED')\n"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode != 0 and "NOT REACHED" not in done.stdout
    assert "waiting up to 2 s for every process to join" in done.stdout
    assert "DEADLINE_EXCEEDED" in done.stderr and time.perf_counter() - t0 < 60


def test_wait_for_coordinator():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_coordinator(f"127.0.0.1:{server.getsockname()[1]}", 2.0)  # something listens: returns
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(CoordinatorUnreachableError, match=rf"cannot reach the coordinator at 127\.0\.0\.1:{port}"):
        wait_for_coordinator(f"127.0.0.1:{port}", 0.5)
    assert time.perf_counter() - t0 < 5


def test_launch_settings_from_config_environment_and_cluster():
    none = ParallelConfig()
    assert resolve_launch(none, {}) is None  # a plain single-process run
    explicit = ParallelConfig(coordinator_address="node1:1234", num_processes=4, process_id=3)
    s = resolve_launch(explicit, {})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.cluster) == ("node1:1234", 4, 3, None)
    env = {"EQUIFORCE_COORDINATOR_ADDRESS": "10.0.0.1:999", "EQUIFORCE_NUM_PROCESSES": "2", "EQUIFORCE_PROCESS_ID": "1"}
    s = resolve_launch(none, env)
    assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:999", 2, 1)
    assert resolve_launch(ParallelConfig(process_id=0), env).process_id == 0  # the config wins
    one = {k: v for k, v in env.items() if k != "EQUIFORCE_PROCESS_ID"}
    assert resolve_launch(ParallelConfig(num_processes=1), one) is None  # one process: never distributed
    slurm = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "gpu[01-04]",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
    }
    assert cluster_tasks(slurm) == ("slurm", 16)
    s = resolve_launch(none, slurm)
    assert s.cluster == "slurm" and s.coordinator_address is None  # JAX's SLURM detection fills it in
    assert resolve_launch(none, {**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one task: single process
    assert resolve_launch(ParallelConfig(cluster_detection="off"), slurm) is None
    assert cluster_tasks({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "8"}) == ("ompi", 8)


def test_bad_distributed_settings():
    with pytest.raises(ConfigError, match=r"parallel\.process_id not given"):
        resolve_launch(ParallelConfig(coordinator_address="node1:1234", num_processes=2), {})
    with pytest.raises(ConfigError, match="EQUIFORCE_PROCESS_ID='x' is not an integer"):
        resolve_launch(ParallelConfig(), {"EQUIFORCE_PROCESS_ID": "x"})
    with pytest.raises(ConfigError, match="out of range"):
        resolve_launch(ParallelConfig(num_processes=2), {"EQUIFORCE_PROCESS_ID": "2"})
    with pytest.raises(ConfigError, match="not started by srun"):
        resolve_launch(ParallelConfig(cluster_detection="slurm"), {})
    with pytest.raises(ConfigError, match="EQUIFORCE_COORDINATOR_ADDRESS must look like host:port"):
        resolve_launch(ParallelConfig(), {"EQUIFORCE_COORDINATOR_ADDRESS": "node1"})
    for override, message in (
        ("parallel.num_processes=0", "num_processes must be >= 1"),
        ("parallel.process_id=-1", "process_id must be >= 0"),
        ("parallel.coordinator_address=node1:99999", "host:port"),
        ("parallel.cluster_detection=pbs", "cluster_detection must be one of"),
        ("parallel.initialization_timeout=0", "initialization_timeout must be >= 1, got 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"process_id = 2 is out of range for parallel.num_processes = 2"):
        load_config(None, ["parallel.num_processes=2", "parallel.process_id=2"])
