"""Every whole-file writer goes through equiforce.atomic: the file it creates follows the umask, and a failure
inside the write leaves the old file as it was and no temporary file behind (cheap, default run).

The mode is compared with ``0o666 & ~umask``, computed here, for two umasks: a temporary file made by
``tempfile.mkstemp`` (what the H5MD repair and the download used) would be 0600 under both.
"""

from __future__ import annotations

import io
import os
import stat
import urllib.request

import h5py
import numpy as np
import pytest

from equiforce import faults
from equiforce.atomic import atomic_path, atomic_write_bytes
from equiforce.data import download as dl
from equiforce.data.errors import DataError
from equiforce.data.h5md import H5MDWriter, read_h5md, repair_h5md
from equiforce.data.hdf5 import HDF5Writer, append_hdf5, read_hdf5, write_hdf5
from equiforce.data.structures import StructureSet

UMASKS = [0o022, 0o002]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under a known umask (restored afterwards); yields the mode a new file must get."""
    previous = os.umask(request.param)
    try:
        yield 0o666 & ~request.param
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _left(folder) -> list[str]:
    """Hidden files (temporary files are ``.<name>.<hex>.tmp``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _structures(n: int = 3, seed: int = 0, energy: bool = True) -> StructureSet:
    rng = np.random.default_rng(seed)
    return StructureSet(
        atomic_numbers=np.tile([8, 1, 1], n).astype(np.int32),
        positions=rng.normal(size=(3 * n, 3)) * 2.0,
        n_atoms=np.full(n, 3),
        cell=np.zeros((n, 3, 3)),
        pbc=np.zeros((n, 3), bool),
        energy=rng.normal(size=n) if energy else None,
    )


# ------------------------------------------------------------------------------------------- the helper


def test_atomic_path_mode_and_replace(tmp_path, umask):
    target = tmp_path / "a.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name before the block ends
    assert target.read_bytes() == b"new" and _mode(target) == umask
    assert _left(tmp_path) == []


def test_atomic_path_failure_keeps_the_old_file(tmp_path, umask):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="inside"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("inside the write")
    assert target.read_bytes() == b"old" and _left(tmp_path) == []


def test_replaced_file_keeps_its_mode_even_read_only(tmp_path, umask):
    """The mode of the replaced file is applied at the end, so a writer can reopen the temporary file by name
    even when the target is read-only (0o444)."""
    target = tmp_path / "ro.bin"
    target.write_bytes(b"old")
    target.chmod(0o444)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o444


def test_atomic_write_bytes_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert target.read_bytes() == b"old" and _left(tmp_path) == []


def test_fault_points_keep_their_names(tmp_path, monkeypatch):
    """The kill tests (tests/md/test_kill_recovery.py) name these points: atomic_write_bytes passes the four of
    the equiforce.faults table in order, an HDF5Writer its own between the helper's."""
    trace = tmp_path / "trace.txt"
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    atomic_write_bytes(tmp_path / "m.eqf", b"x", fault="model")
    with HDF5Writer(tmp_path / "o.h5", fault="hdf5") as w:
        w.append(_structures())
    assert trace.read_text().split() == [
        "model:tmp-created",
        "model:tmp-written",
        "model:tmp-synced",
        "model:replaced",
        "hdf5:tmp-created",
        "hdf5:appended",
        "hdf5:closed",
        "hdf5:tmp-synced",
        "hdf5:replaced",
    ]


# ------------------------------------------------------------------------------------------- the writers


def test_write_hdf5(tmp_path, umask):
    path = write_hdf5(tmp_path / "s.h5", _structures(seed=0))
    assert _mode(path) == umask
    old = path.read_bytes()
    with pytest.raises(DataError, match="no-such-filter"):  # fails inside the write: a filter h5py lacks
        write_hdf5(path, _structures(seed=1), overwrite=True, compression="no-such-filter")
    assert path.read_bytes() == old and _left(tmp_path) == []


def test_append_hdf5(tmp_path, umask):
    path = write_hdf5(tmp_path / "s.h5", _structures(seed=0))
    path.chmod(0o640)
    append_hdf5(path, _structures(seed=1))
    assert _mode(path) == 0o640 and len(read_hdf5(path)) == 6  # an appended file keeps its mode
    old = path.read_bytes()
    with pytest.raises(DataError, match="label mismatch"):  # fails inside the write (in the copy)
        append_hdf5(path, _structures(seed=2, energy=False))
    assert path.read_bytes() == old and _left(tmp_path) == []


def test_hdf5_writer(tmp_path, umask):
    path = tmp_path / "w.h5"
    with HDF5Writer(path) as w:
        w.append(_structures(seed=0))
    assert _mode(path) == umask
    old = path.read_bytes()
    with pytest.raises(RuntimeError, match="inside"), HDF5Writer(path, overwrite=True) as w:
        w.append(_structures(seed=1))
        raise RuntimeError("inside the write")
    assert path.read_bytes() == old and _left(tmp_path) == []


Z, MASSES = np.array([8, 1, 1]), np.array([16.0, 1.0, 1.0])


def _trajectory(path, n_frames: int = 3) -> None:
    obs = ("potential_energy", "kinetic_energy", "total_energy", "temperature")
    with H5MDWriter(path, Z, MASSES, False) as w:
        steps = np.arange(n_frames)
        x = np.arange(n_frames * 9, dtype=float).reshape(n_frames, 3, 3)
        w.write(steps, steps * 1e-3, x, np.zeros_like(x), **{k: np.zeros(n_frames) for k in obs})


def test_h5md_writer_mode(tmp_path, umask):
    _trajectory(tmp_path / "t.h5")
    assert _mode(tmp_path / "t.h5") == umask


def test_repair_h5md_keeps_the_mode(tmp_path, umask):
    """The repaired trajectory replaces the file with the same mode (the old repair left mkstemp's 0600,
    unreadable to the group); a failure inside the repair leaves the file as it was."""
    path = tmp_path / "t.h5"
    _trajectory(path)
    with h5py.File(path, "r+") as f:  # an uncommitted third frame, as a kill mid-write leaves it
        f["equiforce/committed_frames"][()] = 2
    old = path.read_bytes()
    import equiforce.data.h5md as h5md

    def broken(*args, **kwargs):
        raise RuntimeError("inside the repair")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h5md, "_resize_frames", broken)
        with pytest.raises(DataError, match="inside the repair"):
            repair_h5md(path)
    assert path.read_bytes() == old and _left(tmp_path) == []
    assert repair_h5md(path) == (2, 1, True)
    assert _mode(path) == umask and _left(tmp_path) == []
    with h5py.File(path, "r") as f:
        assert f["particles/all/position/value"].shape[0] == 2
    np.testing.assert_array_equal(read_h5md(path)["positions"], np.arange(18.0).reshape(2, 3, 3))


class _Response(io.BytesIO):
    def __init__(self, payload: bytes, fail_after: int | None = None):
        super().__init__(payload)
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise OSError("connection reset")
        return super().read(min(n, 7) if n and n > 0 else 7)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download(tmp_path, umask, monkeypatch):
    payload = b"archive bytes " * 50
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(payload))
    path = dl.fetch("http://example.invalid/x.bin", "x.bin", cache=tmp_path)
    assert path.read_bytes() == payload
    assert _mode(path) == umask  # the old download was mkstemp's 0600
    assert _mode(tmp_path / "x.bin.sha256") == umask
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(payload, fail_after=100))
    with pytest.raises(DataError, match="could not download"):  # fails inside the write, after 100 bytes
        dl.fetch("http://example.invalid/y.bin", "y.bin", cache=tmp_path)
    assert not (tmp_path / "y.bin").exists() and _left(tmp_path) == []


def test_preprocess_job_file(tmp_path, umask, monkeypatch):
    from equiforce.data import preprocess as pp

    src = tmp_path / "in.h5"
    write_hdf5(src, _structures())

    def stop(*args, **kwargs):
        raise RuntimeError("stop after the job file")

    monkeypatch.setattr(pp, "read_structures", stop)
    with pytest.raises(RuntimeError, match="stop"):
        pp.preprocess([src], tmp_path / "out.h5", r_max=3.0, workers=1)
    job = pp.parts_folder(tmp_path / "out.h5") / pp.JOB_FILE
    assert _mode(job) == umask and _left(job.parent) == []


def test_last_good_frame(tmp_path, umask):
    """The last good frame of a blown-up run (extxyz beside the trajectory)."""
    import ase
    import ase.io

    from equiforce.md.outputs import write_last_good

    atoms = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    path = write_last_good(atoms, tmp_path / "traj.h5")
    assert path == tmp_path / "traj_last_good.extxyz" and _mode(path) == umask
    np.testing.assert_allclose(ase.io.read(path).get_positions(), atoms.get_positions())
    old = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  # ase cannot write this: fails inside the write
        write_last_good(object(), tmp_path / "traj.h5")
    assert path.read_bytes() == old and _left(tmp_path) == []
