"""The fault-injection hook (equiforce.faults) and the clearing of a killed writer's HDF5 flags (cheap, default run).

The kill-recovery suite (tests/md/test_kill_recovery.py, marker ``kills``) relies on both: the hook must kill
exactly at the named point, and ``equiforce md --restart`` must be able to open a file whose writer was killed
outside SWMR mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from equiforce import faults
from equiforce.data.errors import DataError
from equiforce.data.h5md import _lookup3, clear_stale_write_flags

_SCRIPT = """
from equiforce import faults
for i in range(3):
    faults.point("w", "a")
    print("after", i, flush=True)
    faults.point("w", "b")
print("done", flush=True)
"""


def _run(env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.TRACE_ENV)}
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT], env={**env, **env_extra}, capture_output=True, text=True, cwd=tmp_path
    )


def test_fault_kills_at_the_named_occurrence_only(tmp_path):
    trace = tmp_path / "trace.txt"
    clean = _run({faults.TRACE_ENV: str(trace)}, tmp_path)
    assert clean.returncode == 0 and clean.stdout.split("\n")[-2] == "done"
    assert trace.read_text().split() == ["w:a", "w:b"] * 3  # every point passed, in order
    hit = _run({faults.ENV: "w:a:2"}, tmp_path)
    assert hit.returncode == -signal.SIGKILL
    assert hit.stdout.split() == ["after", "0"]  # killed at the 2nd "w:a", before anything after it
    assert "EQUIFORCE_FAULT: killed at w:a (occurrence 2)" in hit.stderr
    assert _run({faults.ENV: "w:c"}, tmp_path).returncode == 0  # a point never reached: no kill
    bad = _run({faults.ENV: "w:a:0"}, tmp_path)
    assert bad.returncode == 1 and "counts from 1" in bad.stderr


def test_lookup3_matches_published_vectors_and_hdf5():
    # Bob Jenkins' lookup3.c driver: hashlittle("Four score and seven years ago", 30, 0) = 0x17770551
    assert _lookup3(b"Four score and seven years ago") == 0x17770551
    assert _lookup3(b"") == 0xDEADBEEF


def test_clear_stale_write_flags(tmp_path):
    path = tmp_path / "killed.h5"
    # a writer outside SWMR mode killed while the file is open: HDF5 refuses the file afterwards
    code = (
        "import os, signal, h5py, numpy as np\n"
        f"f = h5py.File({str(path)!r}, 'w', libver='latest')\n"
        "f['x'] = np.arange(5.0)\nf.flush()\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    with pytest.raises(OSError, match="already open"):
        h5py.File(path, "r")
    head = path.read_bytes()[:48]
    assert int.from_bytes(head[44:48], "little") == _lookup3(head[:44])  # libhdf5's own checksum agrees
    assert clear_stale_write_flags(path) is True
    with h5py.File(path, "r") as f:  # opens, with what was flushed
        np.testing.assert_array_equal(f["x"][()], np.arange(5.0))
    assert clear_stale_write_flags(path) is False  # nothing left to clear
    with h5py.File(path, "a", libver="latest") as live:  # a live writer holds HDF5's lock: refused
        live["y"] = 1
        with pytest.raises(DataError, match="holds the file open"):
            clear_stale_write_flags(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not an HDF5 file"):
        clear_stale_write_flags(tmp_path / "text.h5")
