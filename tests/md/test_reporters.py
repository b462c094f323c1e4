"""Tests of equiforce.md.reporters: the CSV thermo log and the H5MD trajectory writer/reader."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import units

from equiforce.data.errors import DataError
from equiforce.md.reporters import (
    H5MDWriter,
    ThermoLog,
    read_h5md,
    read_restart_state,
)

N = 5
Z = np.array([8, 1, 1, 6, 1])
MASSES = np.array([15.999, 1.008, 1.008, 12.011, 1.008])


def thermo_cols(rng, n, periodic=False):
    cols = {
        "potential_energy": rng.normal(size=n),
        "kinetic_energy": rng.random(n),
        "total_energy": rng.normal(size=n),
        "temperature": 300 * rng.random(n),
    }
    if periodic:
        cols["pressure"] = rng.normal(size=n) * 1e-3
        cols["volume"] = 1000 + rng.random(n)
    return cols


def frames(rng, steps, periodic=True, forces=False):
    nf = len(steps)
    d = {
        "step": np.asarray(steps, dtype=np.int64),
        "time_ps": np.asarray(steps) * 0.5e-3,
        "positions": rng.normal(size=(nf, N, 3)),
        "velocities": rng.normal(size=(nf, N, 3)),
        "potential_energy": rng.normal(size=nf),
        "kinetic_energy": rng.random(nf),
        "total_energy": rng.normal(size=nf),
        "temperature": 300 * rng.random(nf),
    }
    if periodic:
        d["box"] = np.eye(3)[None] * 10 + rng.normal(size=(nf, 3, 3)) * 0.1
        d["pressure"] = rng.normal(size=nf) * 1e-3
        d["volume"] = 1000 + rng.random(nf)
    if forces:
        d["forces"] = rng.normal(size=(nf, N, 3))
    return d


def concat(chunks):
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# ============================================================================ ThermoLog


def test_thermo_header_rows_units(tmp_path, rng):
    path = tmp_path / "thermo.csv"
    cols = thermo_cols(rng, 3, periodic=True)
    with ThermoLog(path, periodic=True, extra_columns=("conserved_eV",)) as log:
        log.write(np.array([0, 10, 20]), np.array([0.0, 0.005, 0.01]), **cols, conserved_eV=np.array([1.0, 2, 3]))
    lines = path.read_text().splitlines()
    assert lines[0] == (
        "step,time_ps,potential_energy_eV,kinetic_energy_eV,total_energy_eV,temperature_K,"
        "pressure_GPa,volume_A3,conserved_eV"
    )
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    # floats round-trip exactly; pressure converted eV/Å³ -> GPa
    np.testing.assert_array_equal([float(r["potential_energy_eV"]) for r in rows], cols["potential_energy"])
    np.testing.assert_array_equal([float(r["temperature_K"]) for r in rows], cols["temperature"])
    np.testing.assert_array_equal([float(r["pressure_GPa"]) for r in rows], cols["pressure"] / units.GPa)
    np.testing.assert_array_equal([float(r["conserved_eV"]) for r in rows], [1.0, 2.0, 3.0])
    assert abs(1.0 / units.GPa - 160.21766) < 1e-4  # 1 eV/Å³ = 160.2 GPa


def test_thermo_non_periodic_columns_and_validation(tmp_path, rng):
    path = tmp_path / "t.csv"
    with ThermoLog(path, periodic=False) as log:
        assert log.header == "step,time_ps,potential_energy_eV,kinetic_energy_eV,total_energy_eV,temperature_K"
        with pytest.raises(DataError, match="missing columns"):
            log.write(np.array([0]), np.array([0.0]), potential_energy=np.zeros(1))
        with pytest.raises(DataError, match="unexpected columns"):
            log.write(np.array([0]), np.array([0.0]), **thermo_cols(rng, 1), pressure=np.zeros(1))
        with pytest.raises(DataError, match="shape"):
            log.write(np.array([0, 1]), np.array([0.0, 1.0]), **thermo_cols(rng, 3))
        with pytest.raises(DataError, match="integer"):
            log.write(np.array([0.5]), np.array([0.0]), **thermo_cols(rng, 1))
    assert len(path.read_text().splitlines()) == 1


def test_thermo_readable_mid_run_and_append(tmp_path, rng):
    path = tmp_path / "t.csv"
    log = ThermoLog(path, periodic=False)
    log.write(np.arange(2), np.arange(2) * 1e-3, **thermo_cols(rng, 2))
    # readable by another reader before close (write + fsync per call)
    data = np.loadtxt(path, delimiter=",", skiprows=1)
    assert data.shape == (2, 6)
    log.close()
    # a kill mid-write leaves a partial line; append drops it and continues
    with path.open("a") as fh:
        fh.write("2,0.002,1.5")
    with ThermoLog(path, periodic=False, append=True) as log:
        log.write(np.array([2, 3]), np.array([0.002, 0.003]), **thermo_cols(rng, 2))
    data = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(data[:, 0], [0, 1, 2, 3])
    with pytest.raises(DataError, match="header differs"):
        ThermoLog(path, periodic=True, append=True)
    with pytest.raises(DataError, match="header differs"):
        ThermoLog(path, periodic=False, append=True, extra_columns=("conserved_eV",))
    # the failed appends did not touch the file
    assert np.loadtxt(path, delimiter=",", skiprows=1).shape == (4, 6)


# ============================================================================ H5MD layout


def test_h5md_layout(tmp_path, rng):
    path = tmp_path / "traj.h5"
    d = frames(rng, [0, 10], forces=True)
    obs = ("potential_energy", "kinetic_energy", "total_energy", "temperature", "pressure", "volume")
    obs += ("conserved_energy",)
    with H5MDWriter(path, Z, MASSES, [True, True, False], forces=True, observables=obs, author="tester") as w:
        w.write(**d, conserved_energy=np.array([1.0, 2.0]))
    with h5py.File(path, "r") as f:  # a cleanly closed file opens with plain h5py
        assert f["h5md"].attrs["version"].tolist() == [1, 1]
        assert f["h5md/author"].attrs["name"] == "tester"
        assert f["h5md/creator"].attrs["name"] == "equiforce"
        assert "version" in f["h5md/creator"].attrs
        allp = f["particles/all"]
        assert allp["species"].dtype == np.int32
        np.testing.assert_array_equal(allp["species"][()], Z)
        np.testing.assert_array_equal(allp["mass"][()], MASSES)
        assert allp["mass"].attrs["unit"] == "u"
        assert allp["box"].attrs["dimension"] == 3
        assert allp["box"].attrs["boundary"].tolist() == [b"periodic", b"periodic", b"none"]
        for name, shape, unit in [
            ("position", (2, N, 3), "Angstrom"),
            ("velocity", (2, N, 3), "Angstrom ps-1"),
            ("force", (2, N, 3), "eV Angstrom-1"),
            ("box/edges", (2, 3, 3), "Angstrom"),
        ]:
            g = allp[name]
            assert g["step"].dtype == np.int64 and g["step"].shape == (2,)
            assert g["time"].dtype == np.float64 and g["time"].attrs["unit"] == "ps"
            assert g["value"].shape == shape and g["value"].dtype == np.float64
            assert g["value"].attrs["unit"] == unit
            for ds in ("step", "time", "value"):
                assert g[ds].chunks is not None and g[ds].maxshape[0] is None
        assert sorted(f["observables"]) == sorted(obs)
        assert f["observables/temperature/value"].attrs["unit"] == "K"
        assert f["observables/pressure/value"].attrs["unit"] == "eV Angstrom-3"
        assert f["observables/conserved_energy/value"].shape == (2,)
        assert int(f["equiforce/committed_frames"][()]) == 2


def test_h5md_non_periodic_has_no_edges_or_pressure(tmp_path, rng):
    path = tmp_path / "mol.h5"
    d = frames(rng, [0, 1], periodic=False)
    with H5MDWriter(path, Z, MASSES, False) as w:
        with pytest.raises(DataError, match="box not expected"):
            w.write(**d, box=np.zeros((2, 3, 3)))
        w.write(**d)
    with h5py.File(path, "r") as f:
        assert "edges" not in f["particles/all/box"]
        assert f["particles/all/box"].attrs["boundary"].tolist() == [b"none"] * 3
        assert "pressure" not in f["observables"] and "velocity" in f["particles/all"]
    out = read_h5md(path)
    assert "box" not in out and "forces" not in out
    assert not out["pbc"].any()


# ============================================================================ round trip / append


def test_h5md_round_trip_bit_exact(tmp_path, rng):
    path = tmp_path / "traj.h5"
    chunks = [frames(rng, [0, 5, 10], forces=True), frames(rng, [15, 20], forces=True)]
    with H5MDWriter(path, Z, MASSES, True, forces=True) as w:
        for c in chunks:
            w.write(**c)
        # a single frame ([N, 3] and scalars) is accepted too
        one = frames(rng, [25], forces=True)
        w.write(**{k: v[0] for k, v in one.items()})
    ref = concat([*chunks, one])
    out = read_h5md(path)
    np.testing.assert_array_equal(out["step"], ref["step"])
    assert out["step"].dtype == np.int64
    np.testing.assert_array_equal(out["time"], ref["time_ps"])
    for key in ("positions", "velocities", "forces", "box"):
        assert out[key].dtype == np.float64
        np.testing.assert_array_equal(out[key], ref[key])
    for name in ("potential_energy", "kinetic_energy", "total_energy", "temperature", "pressure", "volume"):
        np.testing.assert_array_equal(out["observables"][name], ref[name])
    np.testing.assert_array_equal(out["species"], Z)
    np.testing.assert_array_equal(out["masses"], MASSES)
    assert out["pbc"].all()


def test_h5md_write_validation(tmp_path, rng):
    with H5MDWriter(tmp_path / "t.h5", Z, MASSES, True) as w:
        d = frames(rng, [0, 1])
        with pytest.raises(DataError, match="box required"):
            w.write(**{k: v for k, v in d.items() if k != "box"})
        with pytest.raises(DataError, match="missing observables"):
            w.write(**{k: v for k, v in d.items() if k != "volume"})
        with pytest.raises(DataError, match="positions has shape"):
            w.write(**{**d, "positions": d["positions"][:, :3]})
        with pytest.raises(DataError, match="forces not expected"):
            w.write(**d, forces=d["velocities"])
        w.write(**d)
        with pytest.raises(DataError, match="not after the last committed step"):
            w.write(**frames(rng, [1, 2]))
        with pytest.raises(DataError, match="strictly increasing"):
            w.write(**frames(rng, [5, 4]))
    assert read_h5md(tmp_path / "t.h5")["step"].tolist() == [0, 1]


def test_h5md_append_continues(tmp_path, rng):
    path = tmp_path / "traj.h5"
    a, b = frames(rng, [0, 10]), frames(rng, [20, 30, 40])
    with H5MDWriter(path, Z, MASSES, True) as w:
        w.write(**a)
    with H5MDWriter(path, Z, MASSES, True, mode="a") as w:
        assert w.n_frames == 2
        w.write(**b)
    out = read_h5md(path)
    ref = concat([a, b])
    np.testing.assert_array_equal(out["step"], [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(out["positions"], ref["positions"])
    np.testing.assert_array_equal(out["box"], ref["box"])
    # mode="a" on a missing file creates it
    with H5MDWriter(tmp_path / "new.h5", Z, MASSES, True, mode="a") as w:
        w.write(**a)
    assert read_h5md(tmp_path / "new.h5")["step"].tolist() == [0, 10]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"atomic_numbers": Z[::-1].copy()}, "species differ"),
        ({"masses": MASSES * 2}, "masses differ"),
        ({"pbc": [True, True, False]}, "pbc differ"),
        ({"forces": True}, "force presence"),
        ({"observables": ("potential_energy", "kinetic_energy", "total_energy", "temperature")}, "observables"),
    ],
)
def test_h5md_append_mismatch(tmp_path, rng, kwargs, match):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True) as w:
        w.write(**frames(rng, [0]))
    args = {"atomic_numbers": Z, "masses": MASSES, "pbc": True, **kwargs}
    pbc = args.pop("pbc")
    with pytest.raises(DataError, match=match):
        H5MDWriter(path, args.pop("atomic_numbers"), args.pop("masses"), pbc, mode="a", **args)
    assert read_h5md(path)["step"].tolist() == [0]  # untouched


def test_h5md_uncommitted_tail_ignored_and_truncated(tmp_path, rng):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True) as w:
        w.write(**frames(rng, [0, 1]))
    # simulate a kill mid-write: datasets grown and filled, counter not bumped
    with h5py.File(path, "r+") as f:
        for g in (f["particles/all/position"], f["observables/temperature"]):
            for ds in ("step", "time", "value"):
                g[ds].resize(4, axis=0)
            g["step"][2:] = [2, 3]
            g["value"][2:] = 99.0
    out = read_h5md(path)
    assert out["step"].tolist() == [0, 1] and out["positions"].shape == (2, N, 3)
    assert len(out["observables"]["temperature"]) == 2
    with H5MDWriter(path, Z, MASSES, True, mode="a") as w:
        c = frames(rng, [2])
        w.write(**c)
    out = read_h5md(path)
    assert out["step"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(out["positions"][2], c["positions"][0])
    with h5py.File(path, "r") as f:
        assert f["particles/all/position/value"].shape[0] == 3  # the junk tail was cut


def test_h5md_truncate_after_step(tmp_path, rng):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True) as w:
        w.write(**frames(rng, [0, 10, 20, 30]))
    with H5MDWriter(path, Z, MASSES, True, mode="a") as w:
        assert w.truncate_after_step(15) == 2
        w.write(**frames(rng, [20]))
    assert read_h5md(path)["step"].tolist() == [0, 10, 20]


# ============================================================================ restart state


def test_restart_state_round_trip(tmp_path, rng):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True) as w:
        with pytest.raises(DataError, match="no restart state"):
            read_restart_state(path)
        for i, steps in enumerate(([0, 10], [20, 30], [40])):
            w.write(**frames(rng, steps))
            state = {
                "positions": rng.normal(size=(N, 3)),
                "momenta": rng.normal(size=(N, 3)).astype(np.float32),
                "chain_xi": rng.normal(size=(3,)),
                "rng_key": np.array([0, 12345 + i], dtype=np.uint32),
                "step": np.int64(steps[-1]),
                "fixed": np.array([True, False]),
            }
            w.write_restart_state(state, {"integrator": "nvt_nose_hoover", "dt_fs": 0.5, "i": np.int64(i)})
            # readable while the writer is still open
            arrays, meta = read_restart_state(path)
            assert meta["i"] == i
    arrays, meta = read_restart_state(path)
    assert set(arrays) == set(state)
    for k, v in state.items():
        assert arrays[k].dtype == v.dtype and arrays[k].shape == np.shape(v)
        np.testing.assert_array_equal(arrays[k], v)
    assert meta == {"integrator": "nvt_nose_hoover", "dt_fs": 0.5, "i": 2, "committed_frames": 5}


def test_restart_state_changing_structure_and_validation(tmp_path, rng):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, False) as w:
        w.write(**frames(rng, [0], periodic=False))
        w.write_restart_state({"a": np.zeros(3)}, {"long": "x" * 200})
        w.write_restart_state({"a": np.ones(3)}, {})
        w.write_restart_state({"b": np.arange(4)}, {"short": 1})  # new keys: slot recreated
        w.write_restart_state({"b": np.arange(4) + 1}, {"k": "v"})
        with pytest.raises(DataError, match="invalid restart state key"):
            w.write_restart_state({"x/y": np.zeros(1)}, {})
        with pytest.raises(DataError, match="non-numeric"):
            w.write_restart_state({"s": np.array(["a"])}, {})
        with pytest.raises(DataError, match="JSON"):
            w.write_restart_state({"a": np.zeros(1)}, {"obj": object()})
        with pytest.raises(DataError, match="reserved"):
            w.write_restart_state({"a": np.zeros(1)}, {"committed_frames": 3})
    arrays, meta = read_restart_state(path)
    np.testing.assert_array_equal(arrays["b"], np.arange(4) + 1)
    assert meta == {"k": "v", "committed_frames": 1}


# ============================================================================ kill, foreign files


_KILLER = """
import os, sys
import numpy as np
from equiforce.md.reporters import H5MDWriter
Z = np.array([8, 1, 1]); path = sys.argv[1]
w = H5MDWriter(path, Z, np.array([16.0, 1.0, 1.0]), True)
obs = dict(potential_energy=np.zeros(2), kinetic_energy=np.zeros(2), total_energy=np.zeros(2),
           temperature=np.zeros(2), pressure=np.zeros(2), volume=np.ones(2))
for k in range(2):
    w.write(np.array([2 * k, 2 * k + 1]), np.array([2 * k, 2 * k + 1]) * 1e-3, np.full((2, 3, 3), k),
            np.zeros((2, 3, 3)), box=np.tile(np.eye(3) * 9, (2, 1, 1)), **obs)
    w.write_restart_state({"x": np.full(3, float(k))}, {"k": k})
g = w._f["particles/all/position"]  # half-written third chunk: grown, not committed
for ds in ("step", "time", "value"):
    g[ds].resize(6, axis=0)
g["step"][4:] = [4, 5]
w._f.flush()
os.kill(os.getpid(), 9)
"""


def test_h5md_survives_kill(tmp_path):
    path = tmp_path / "killed.h5"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLER), str(path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with pytest.raises(OSError):  # consistency flags left set: plain h5py refuses it ...
        h5py.File(path, "r").close()
    out = read_h5md(path)  # ... but the reader falls back to an SWMR read
    assert out["step"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(out["positions"][2:], np.ones((2, 3, 3)))
    arrays, meta = read_restart_state(path)
    assert meta == {"k": 1, "committed_frames": 4}
    np.testing.assert_array_equal(arrays["x"], np.ones(3))
    # append recovers the file (fresh copy), drops the uncommitted tail and continues
    z, m = np.array([8, 1, 1]), np.array([16.0, 1.0, 1.0])
    with H5MDWriter(path, z, m, True, mode="a") as w:
        assert w.n_frames == 4
        w.write(
            np.array([4]),
            np.array([4e-3]),
            np.full((1, 3, 3), 7.0),
            np.zeros((1, 3, 3)),
            box=np.eye(3)[None] * 9,
            **{k: np.zeros(1) for k in ("potential_energy", "kinetic_energy", "total_energy", "temperature")},
            pressure=np.zeros(1),
            volume=np.ones(1),
        )
    with h5py.File(path, "r") as f:  # clean again
        assert f["particles/all/position/value"].shape[0] == 5
    assert read_h5md(path)["step"].tolist() == [0, 1, 2, 3, 4]
    assert read_restart_state(path)[1]["k"] == 1  # restart state kept through the recovery copy


def test_repair_makes_a_killed_file_readable_by_any_reader(tmp_path):
    """``repair_h5md`` (``equiforce md --repair``): plain h5py and MDAnalysis open the file afterwards, it
    holds exactly the committed frames (the uncommitted tail dropped) and the restart state; a second call
    finds nothing to do."""
    from equiforce.cli import main
    from equiforce.md.reporters import repair_h5md

    path = tmp_path / "killed.h5"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLER), str(path)], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with pytest.raises(OSError):
        h5py.File(path, "r").close()
    assert main(["md", "--repair", str(path)]) == 0
    with h5py.File(path, "r") as f:
        assert f["particles/all/position/step"][()].tolist() == [0, 1, 2, 3]
        assert f["particles/all/velocity/value"].shape[0] == 4
    assert read_restart_state(path)[1]["k"] == 1
    assert repair_h5md(path) == (4, 0, False)
    mda = pytest.importorskip("MDAnalysis.coordinates.H5MD")
    reader = mda.H5MDReader(str(path))
    assert reader.n_frames == 4
    reader.close()


def test_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_h5md(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(DataError, match="not a readable HDF5"):
        read_h5md(junk)
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not an H5MD file"):
        read_h5md(plain)
    with pytest.raises(DataError, match="not an H5MD file"):
        H5MDWriter(plain, Z, MASSES, True, mode="a")
    other = tmp_path / "other.h5md"
    with h5py.File(other, "w") as f:
        f.create_group("h5md").attrs["version"] = [1, 1]
        f.create_group("particles/all")
    with pytest.raises(DataError, match="not written by equiforce"):
        read_h5md(other)
    with pytest.raises(DataError, match="not written by equiforce"):
        read_restart_state(other)
    assert issubclass(DataError, ValueError)


def test_committed_counter_is_truth(tmp_path, rng):
    """A counter lower than the datasets' length wins (and a too-high one is flagged as corrupt)."""
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True) as w:
        w.write(**frames(rng, [0, 1, 2]))
    with h5py.File(path, "r+") as f:
        f["equiforce/committed_frames"][()] = 1
    assert read_h5md(path)["step"].tolist() == [0]
    with h5py.File(path, "r+") as f:
        f["equiforce/committed_frames"][()] = 7
    with pytest.raises(DataError, match="fewer than committed"):
        read_h5md(path)


def test_units_metadata_json(tmp_path, rng):
    path = tmp_path / "traj.h5"
    with H5MDWriter(path, Z, MASSES, True, swmr=False) as w:
        w.write(**frames(rng, [0]))
    with h5py.File(path, "r") as f:
        u = json.loads(f["equiforce"].attrs["units"])
        assert u["velocity"] == "Å/ps" and u["box"] == "lattice vectors as rows"
    assert read_h5md(path)["step"].tolist() == [0]


def test_closed_writers_raise(tmp_path, rng):
    w = H5MDWriter(tmp_path / "t.h5", Z, MASSES, True)
    w.close()
    w.close()
    with pytest.raises(DataError, match="closed"):
        w.write(**frames(rng, [0]))
    log = ThermoLog(tmp_path / "t.csv", periodic=False)
    log.close()
    with pytest.raises(DataError, match="closed"):
        log.write(np.array([0]), np.array([0.0]), **thermo_cols(rng, 1))


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        H5MDWriter(tmp_path / "no" / "t.h5", Z, MASSES, True)
    with pytest.raises(DataError, match="does not exist"):
        ThermoLog(Path(tmp_path / "no" / "t.csv"), periodic=True)
