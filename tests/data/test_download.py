"""Download/cache/loader logic for the full rMD17 and MD17 sets, on local files only (no network)."""

import hashlib
import io
import logging
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
from ase import units

from equiforce.data import DataError
from equiforce.data import download as dl
from equiforce.data.readers import sample_path


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fake_rmd17_tarball(path, n=30, overlap=False):
    """A tiny rmd17.tar.bz2 in the official layout (30 frames of 'ethanol', splits 01)."""
    rng = np.random.default_rng(5)
    full = {
        "nuclear_charges": np.array([6, 6, 8, 1, 1, 1, 1, 1, 1], dtype=np.uint8),
        "coords": rng.normal(size=(n, 9, 3)),
        "energies": -97000.0 + rng.normal(size=n),
        "forces": rng.normal(size=(n, 9, 3)),
        "old_indices": np.arange(n) * 7,
    }
    train = "\n".join(str(i) for i in (3, 0, 17, 29)) + "\n"
    test = "\n".join(str(i) for i in ((1, 2, 17) if overlap else (1, 2, 28))) + "\n"
    members = {
        "rmd17/npz_data/rmd17_ethanol.npz": _npz_bytes(**full),
        "rmd17/splits/index_train_01.csv": train.encode(),
        "rmd17/splits/index_test_01.csv": test.encode(),
    }
    with tarfile.open(path, "w:bz2") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return full


def test_full_split_from_archive_and_dir(tmp_path):
    archive = tmp_path / "rmd17.tar.bz2"
    full = _fake_rmd17_tarball(archive)
    train, test = dl.load_rmd17_full_split(archive, "ethanol", split=1)
    kcal = units.kcal / units.mol
    np.testing.assert_array_equal(train.energy, full["energies"][[3, 0, 17, 29]] * kcal)
    np.testing.assert_array_equal(test.positions, full["coords"][[1, 2, 28]].reshape(-1, 3))
    assert (tmp_path / "rmd17" / "npz_data" / "rmd17_ethanol.npz").is_file()
    # from the extracted directory (either the folder or its parent)
    t2, _ = dl.load_rmd17_full_split(tmp_path / "rmd17", "ethanol", 1)
    np.testing.assert_array_equal(t2.energy, train.energy)
    t3, _ = dl.load_rmd17_full_split(tmp_path, "ethanol", 1)
    assert len(t3) == 4
    with pytest.raises(DataError, match="unknown molecule"):
        dl.load_rmd17_full_split(tmp_path, "caffeine", 1)
    with pytest.raises(DataError, match="split"):
        dl.load_rmd17_full_split(tmp_path, "ethanol", 6)
    with pytest.raises(DataError, match="index_train_02"):
        dl.load_rmd17_full_split(tmp_path, "ethanol", 2)


def test_full_split_overlap_and_corrupt(tmp_path):
    archive = tmp_path / "a" / "rmd17.tar.bz2"
    archive.parent.mkdir()
    _fake_rmd17_tarball(archive, overlap=True)
    with pytest.raises(DataError, match="overlap"):
        dl.load_rmd17_full_split(archive, "ethanol", 1)
    bad = tmp_path / "b" / "rmd17.tar.bz2"
    bad.parent.mkdir()
    bad.write_bytes(b"BZh9 not really bzip2")
    with pytest.raises(DataError, match=r"rmd17\.tar\.bz2"):
        dl.load_rmd17_full_split(bad, "ethanol", 1)
    assert not (bad.parent / "rmd17").exists()


def test_load_rmd17_split_sample_layout(tmp_path):
    import shutil

    for part in ("train", "test"):
        shutil.copy(sample_path(f"rmd17_aspirin_{part}_01.npz"), tmp_path)
    train, test = dl.load_rmd17_split(tmp_path, "aspirin", 1)
    assert len(train) == 1000 and len(test) == 1000
    with pytest.raises(DataError, match="no such file"):
        dl.load_rmd17_split(tmp_path, "aspirin", 2)


def test_load_rmd17_split_shared(shared_data):
    train, test = dl.load_rmd17_split(shared_data / "rmd17", "salicylic_acid", split=3)
    assert len(train) == len(test) == 1000 and np.all(train.n_atoms == 16)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network (simulated)")


def test_offline_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    monkeypatch.setenv("EQUIFORCE_CACHE", str(tmp_path / "cache"))
    msg = r"figshare\.com/ndownloader/files/23950376.*place it at .*rmd17\.tar\.bz2"
    with pytest.raises(DataError, match=msg):
        dl.load_rmd17("aspirin", 1)
    with pytest.raises(DataError, match=r"md17_benzene2017\.npz"):
        dl.fetch_md17("benzene")
    # nothing half-written left behind
    assert not list((tmp_path / "cache").iterdir())


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUIFORCE_CACHE", str(tmp_path / "c1"))
    assert dl.cache_dir() == tmp_path / "c1"
    monkeypatch.delenv("EQUIFORCE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_dir() == tmp_path / "home" / ".cache" / "equiforce"


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_hash_recording_and_verification(tmp_path, monkeypatch, caplog):
    payload = b"fake archive bytes" * 100
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with caplog.at_level(logging.WARNING, logger="equiforce.data.download"):
        path = dl.fetch("http://example.invalid/x.bin", "x.bin", cache=tmp_path)
    assert path.read_bytes() == payload and calls == ["http://example.invalid/x.bin"]
    digest = hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "x.bin.sha256").read_text().split()[0] == digest
    assert any("recorded" in r.getMessage() for r in caplog.records)
    # cached: no second download, and the record is checked
    dl.fetch("http://example.invalid/x.bin", "x.bin", cache=tmp_path)
    assert len(calls) == 1
    path.write_bytes(b"tampered")
    with pytest.raises(DataError, match="differs"):
        dl.fetch("http://example.invalid/x.bin", "x.bin", cache=tmp_path)
    # known hash that does not match a download: nothing is kept
    with pytest.raises(DataError, match="SHA-256"):
        dl.fetch("http://example.invalid/y.bin", "y.bin", cache=tmp_path, sha256="0" * 64)
    assert not (tmp_path / "y.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    ok = dl.fetch("http://example.invalid/z.bin", "z.bin", cache=tmp_path, sha256=digest)
    assert ok.read_bytes() == payload and not (tmp_path / "z.bin.sha256").exists()


def test_load_md17_from_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "md17_ethanol.npz",
        z=np.array([6, 6, 8, 1, 1, 1, 1, 1, 1]),
        R=rng.normal(size=(3, 9, 3)),
        E=np.full((3, 1), -97200.0),
        F=rng.normal(size=(3, 9, 3)),
    )
    s = dl.load_md17("ethanol", cache=tmp_path)  # placed manually, no network needed
    np.testing.assert_allclose(s.energy, -97200.0 * 0.0433641, rtol=1e-6)
