"""Native HDF5 format: bit-exact round trips, append, lazy chunked reading, and bad files."""

import os
import stat

import h5py
import numpy as np
import pytest

from equiforce.data import DataError, StructureSet
from equiforce.data.hdf5 import FORMAT_VERSION, HDF5Dataset, append_hdf5, read_hdf5, write_hdf5
from equiforce.data.readers import read_structures

FIELDS = ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces", "stress")


def make_set(rng, n=7, stress=True, forces=True) -> StructureSet:
    sizes = rng.integers(1, 6, n)
    total = int(sizes.sum())
    st = rng.normal(size=(n, 6)) if stress else None
    if stress:
        st[1] = np.nan  # a structure without a stress label
    return StructureSet(
        atomic_numbers=rng.integers(1, 119, total),
        positions=rng.normal(size=(total, 3)),
        n_atoms=sizes,
        cell=rng.normal(size=(n, 3, 3)),
        pbc=rng.random((n, 3)) < 0.5,
        energy=rng.normal(size=n) * 1e4,
        forces=rng.normal(size=(total, 3)) if forces else None,
        stress=st,
    )


def assert_same(a: StructureSet, b: StructureSet) -> None:
    assert len(a) == len(b)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype, name
        # bit-exact, NaN rows included
        assert x.tobytes() == y.tobytes(), name


def test_round_trip_bit_exact(tmp_path, rng):
    s = make_set(rng)
    path = write_hdf5(tmp_path / "a.h5", s)
    assert_same(read_hdf5(path), s)
    assert_same(read_structures(path), s)
    assert_same(read_hdf5(path, indices=[4, 0, 4, -1]), s.subset([4, 0, 4, 6]))
    with h5py.File(path) as f:
        assert f.attrs["format"] == b"equiforce-structures"  # fixed-length: in the checksummed object header
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f["positions"].maxshape == (None, 3)
        assert f["positions"].chunks is not None
        assert all(f[name].fletcher32 for name in f)  # every dataset's chunks carry a checksum
        assert f.id.get_create_plist().get_version()[0] >= 2  # superblock v2+: checksummed metadata
    with pytest.raises(DataError, match="exists"):
        write_hdf5(path, s)
    write_hdf5(path, s.subset([0]), overwrite=True)
    assert len(read_hdf5(path)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_optional_labels_absent(tmp_path, rng):
    s = make_set(rng, stress=False, forces=False)
    path = write_hdf5(tmp_path / "b.h5", s)
    back = read_hdf5(path)
    assert back.stress is None and back.forces is None
    assert_same(back, s)


@pytest.mark.parametrize("atomic", [True, False])
def test_append(tmp_path, rng, atomic):
    a, b = make_set(rng, n=5), make_set(rng, n=4)
    path = write_hdf5(tmp_path / "c.h5", a)
    append_hdf5(path, b, atomic=atomic)
    assert_same(read_hdf5(path), StructureSet.concatenate([a, b]))
    with pytest.raises(DataError, match="label mismatch"):
        append_hdf5(path, make_set(rng, stress=False), atomic=atomic)
    assert len(read_hdf5(path)) == 9  # failed append changed nothing


def test_lazy_chunks(tmp_path, rng):
    s = make_set(rng, n=23)
    path = write_hdf5(tmp_path / "d.h5", s)
    with HDF5Dataset(path) as ds:
        assert len(ds) == 23
        assert ds.n_total_atoms == s.n_total_atoms
        chunks = list(ds.iter_chunks(5))
        assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
        assert_same(StructureSet.concatenate(chunks), s)
        idx = np.array([22, 3, 4, 5, 10, 0])
        assert_same(ds.read(idx), s.subset(idx))
        assert_same(ds.read(slice(2, 9, 3)), s.subset([2, 5, 8]))
        with pytest.raises(IndexError):
            ds.read([23])
        with pytest.raises(DataError):
            next(ds.iter_chunks(0))


def test_uncommitted_rows_ignored(tmp_path, rng):
    s = make_set(rng, n=4)
    path = write_hdf5(tmp_path / "e.h5", s)
    with h5py.File(path, "r+") as f:  # simulate an interrupted in-place append
        f["n_atoms"].resize(6, axis=0)
        f["positions"].resize(f["positions"].shape[0] + 10, axis=0)
    assert_same(read_hdf5(path), s)
    append_hdf5(path, s.subset([0]), atomic=False)
    assert_same(read_hdf5(path), s.subset([0, 1, 2, 3, 0]))


def test_corrupt_foreign_and_newer(tmp_path, rng):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(DataError, match=r"bad\.h5"):
        read_hdf5(bad)
    with pytest.raises(DataError, match="no such file"):
        read_hdf5(tmp_path / "missing.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["positions"] = np.zeros((2, 3))
    with pytest.raises(DataError, match="not an equiforce"):
        read_hdf5(foreign)
    newer = write_hdf5(tmp_path / "newer.h5", make_set(rng))
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(DataError, match="newer"):
        read_hdf5(newer)
    with pytest.raises(DataError, match="newer"):
        append_hdf5(newer, make_set(rng))
    truncated = write_hdf5(tmp_path / "trunc.h5", make_set(rng, n=50))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.h5"):
        read_hdf5(truncated)


def test_nan_positions_in_file(tmp_path, rng):
    path = write_hdf5(tmp_path / "nan.h5", make_set(rng))
    with h5py.File(path, "r+") as f:
        f["positions"][0, 0] = np.nan
    with pytest.raises(DataError, match=r"nan\.h5.*NaN"):
        read_hdf5(path)


def test_written_and_appended_files_get_the_usual_permissions(tmp_path, rng):
    """0o666 less the umask for a new file (not mkstemp's 0600); an overwritten or appended file keeps its
    mode."""
    previous = os.umask(0o022)
    try:
        path = write_hdf5(tmp_path / "p.h5", make_set(rng))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o640)
        append_hdf5(path, make_set(rng, n=2))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        write_hdf5(path, make_set(rng), overwrite=True)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        os.umask(0o077)
        assert stat.S_IMODE(write_hdf5(tmp_path / "q.h5", make_set(rng)).stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_flipped_data_bit_is_detected(tmp_path, rng):
    """Every dataset carries a Fletcher-32 checksum: a flipped bit in a stored value is an error, not a
    silently different number."""
    s = make_set(rng)
    path = write_hdf5(tmp_path / "flip.h5", s)
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(s.positions.tobytes())
    assert at > 0
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"flip\.h5"):
        read_hdf5(path)


def test_bad_values_name_structure_and_atom(tmp_path, rng):
    s = make_set(rng)
    path = write_hdf5(tmp_path / "loc.h5", s)
    with h5py.File(path, "r+") as f:
        f["forces"][int(s.offsets[3]) + 1, 2] = np.inf
    with pytest.raises(DataError, match=r"loc\.h5.*forces.*structure 3, atom 1\b"):
        read_hdf5(path)
    path = write_hdf5(tmp_path / "z.h5", s)
    with h5py.File(path, "r+") as f:
        z = f["atomic_numbers"][:].astype(np.int64)
        z[int(s.offsets[2])] = 2**32 + 6  # would wrap to carbon in int32
        del f["atomic_numbers"]
        f["atomic_numbers"] = z
    with pytest.raises(DataError, match=r"z\.h5.*atomic numbers.*structure 2, atom 0\b"):
        read_hdf5(path)
