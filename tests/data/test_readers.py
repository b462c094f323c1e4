"""Readers: rMD17/MD17/nequip npz, ASE formats, dispatch, units, and bad input."""

import ase.io
import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect

from equiforce.data import DataError, StructureSet
from equiforce.data.readers import (
    load_sample,
    read_ase,
    read_md17_npz,
    read_nequip_npz,
    read_rmd17_npz,
    read_structures,
    sample_path,
)

KCAL = units.kcal / units.mol


def test_sample_rmd17_units_and_shape():
    raw = np.load(sample_path("rmd17_aspirin_train_01.npz"), allow_pickle=False)
    s = load_sample("train")
    assert len(s) == 1000
    assert np.all(s.n_atoms == 21)
    assert s.species == (1, 6, 8)
    assert abs(KCAL - 0.0433641) < 1e-6
    # about -406274 kcal/mol -> about -17617 eV
    assert -17625 < s.energy.mean() < -17610
    np.testing.assert_allclose(s.energy, raw["energies"] * KCAL, rtol=0, atol=0)
    np.testing.assert_allclose(s.forces, raw["forces"].reshape(-1, 3) * KCAL, rtol=0, atol=0)
    np.testing.assert_array_equal(s.positions, raw["coords"].reshape(-1, 3))
    assert not s.pbc.any()
    # force RMS of rMD17 is about 0.9-1.4 eV/Å (README), i.e. converted, not kcal/mol
    assert 0.5 < np.sqrt(np.mean(s.forces**2)) < 2.0
    test = load_sample("test")
    assert len(test) == 1000
    with pytest.raises(DataError, match="split"):
        load_sample("val")
    with pytest.raises(DataError, match="available"):
        sample_path("nope.npz")


def test_rmd17_shared_data(shared_data):
    path = shared_data / "rmd17" / "rmd17_ethanol_train_01.npz"
    s = read_structures(path)
    assert len(s) == 1000 and np.all(s.n_atoms == 9)
    # |sum F| < 1e-5 kcal/mol/Å per frame (README check)
    net = s.forces.reshape(1000, 9, 3).sum(axis=1)
    assert np.abs(net).max() < 1e-5 * KCAL
    assert 0.9 < np.sqrt(np.mean(s.forces**2)) < 1.4


def test_nequip_shared_data(shared_data):
    path = shared_data / "md17_mdbenchgnn" / "aspirin" / "val" / "nequip_npz.npz"
    s = read_structures(path)
    assert len(s) == 50 and np.all(s.n_atoms == 21)
    assert not s.pbc.any() and not s.cell.any()  # dummy box dropped
    raw = np.load(path, allow_pickle=False)
    np.testing.assert_array_equal(s.energy, raw["energy"].reshape(-1))  # already eV
    assert -17700 < s.energy.mean() < -17500


def _write_md17(path, n=4, unit_scale=1.0, **extra):
    rng = np.random.default_rng(1)
    z = np.array([8, 1, 1])
    arrays = {
        "z": z,
        "R": rng.normal(size=(n, 3, 3)),
        "E": rng.normal(size=(n, 1)) * unit_scale,
        "F": rng.normal(size=(n, 3, 3)) * unit_scale,
        "name": np.array("water"),
        "theory": np.array("made up"),
    }
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def test_md17_npz_units(tmp_path):
    path = tmp_path / "md17_water.npz"
    raw = _write_md17(path)
    s = read_md17_npz(path)  # default kcal/mol
    np.testing.assert_allclose(s.energy, raw["E"].reshape(-1) * KCAL, rtol=1e-15)
    np.testing.assert_allclose(s.forces, raw["F"].reshape(-1, 3) * KCAL, rtol=1e-15)
    h = read_md17_npz(path, energy_unit="Hartree", length_unit="Bohr")
    np.testing.assert_allclose(h.positions, raw["R"].reshape(-1, 3) * units.Bohr, rtol=1e-15)
    np.testing.assert_allclose(h.forces, raw["F"].reshape(-1, 3) * units.Hartree / units.Bohr, rtol=1e-15)
    kj = read_structures(path, energy_unit="kJ/mol")
    np.testing.assert_allclose(kj.energy, raw["E"].reshape(-1) * units.kJ / units.mol, rtol=1e-15)
    # the mdbenchgnn re-pack of MD17 matches when read with energy_unit="eV"
    ev = read_structures(path, energy_unit="eV")
    np.testing.assert_array_equal(ev.energy, raw["E"].reshape(-1))


def test_unknown_unit(tmp_path):
    path = tmp_path / "md17_water.npz"
    _write_md17(path)
    with pytest.raises(DataError, match="unknown energy unit"):
        read_md17_npz(path, energy_unit="kcal")
    with pytest.raises(DataError, match="unknown length unit"):
        read_md17_npz(path, length_unit="furlong")


def test_missing_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, z=np.array([1]), R=np.zeros((2, 1, 3)), E=np.zeros(2))
    with pytest.raises(DataError, match=r"bad\.npz.*missing npz key.*'F'"):
        read_md17_npz(path)
    with pytest.raises(DataError, match="missing npz key"):
        read_rmd17_npz(path)
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3))
    with pytest.raises(DataError, match="unknown npz layout"):
        read_structures(other)


def test_mismatched_shapes_and_nan(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, z=np.array([1, 1]), R=np.zeros((2, 2, 3)), E=np.zeros(3), F=np.zeros((2, 2, 3)))
    with pytest.raises(DataError, match=r"bad\.npz.*energies"):
        read_md17_npz(path)
    np.savez(path, z=np.array([1, 1]), R=np.zeros((2, 2, 3)), E=np.zeros(2), F=np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match="forces"):
        read_md17_npz(path)
    r = np.zeros((2, 2, 3))
    r[1, 0, 0] = np.nan
    np.savez(path, z=np.array([1, 1]), R=r, E=np.zeros(2), F=np.zeros((2, 2, 3)))
    with pytest.raises(DataError, match=r"bad\.npz.*NaN"):
        read_md17_npz(path)


def test_bad_values_name_file_frame_and_atom(tmp_path):
    path = tmp_path / "loc.npz"
    r = np.zeros((3, 2, 3))
    r[:, 1] = 1.0
    r[2, 1, 0] = np.inf
    np.savez(path, z=np.array([1, 1]), R=r, E=np.zeros(3), F=np.zeros((3, 2, 3)))
    with pytest.raises(DataError, match=r"loc\.npz.*positions.*structure 2, atom 1\b"):
        read_md17_npz(path)
    e = np.zeros(3)
    e[1] = np.nan
    np.savez(path, z=np.array([1, 1]), R=np.where(np.isinf(r), 0.0, r), E=e, F=np.zeros((3, 2, 3)))
    with pytest.raises(DataError, match=r"loc\.npz.*energy.*structure 1\b"):
        read_md17_npz(path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("z", np.array([8, 2**32 + 1, 1]), r"atomic numbers.*structure 0, atom 1\b"),  # not wrapped to H
        ("z", np.array([8.0, 1.5, 1.0]), r"atomic numbers must be integers"),
        ("z", np.array([8, 1, 1]) + 0j, r"dtype complex"),
        ("R", np.zeros((2, 3, 3)).astype(str), r"'R' \(positions\) has dtype <U"),  # not parsed from text
        ("R", np.zeros((2, 3, 3)) + 1j, r"'R' \(positions\) has dtype complex"),  # imaginary part not dropped
        ("R", np.zeros((2, 3, 3), bool), r"'R' \(positions\) has dtype bool"),
        ("F", np.zeros((2, 3, 3), dtype=[("x", "f8")]), r"'F' \(forces\) has dtype"),
    ],
)
def test_wrong_dtypes_are_refused(tmp_path, key, value, match):
    arrays = {
        "z": np.array([8, 1, 1]),
        "R": np.arange(18.0).reshape(2, 3, 3),
        "E": np.zeros(2),
        "F": np.zeros((2, 3, 3)),
    }
    arrays[key] = value
    path = tmp_path / "dtype.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"dtype\.npz.*" + match):
        read_structures(path)


def test_corrupt_npz_header_is_refused_before_reading(tmp_path):
    """A damaged .npy header declaring another shape is reported before NumPy allocates it or stops reading
    short of the CRC check (a small member is CRC-checked anyway: zipfile reads 4 KiB at once)."""
    path = tmp_path / "hdr.npz"
    np.savez(path, z=np.array([1, 1]), R=np.zeros((300, 2, 3)), E=np.zeros(300), F=np.zeros((300, 2, 3)))
    raw = path.read_bytes()
    assert raw.count(b"'shape': (300, 2, 3)") == 2
    path.write_bytes(raw.replace(b"'shape': (300, 2, 3)", b"'shape': (900, 2, 3)", 1))
    with pytest.raises(DataError, match=r"hdr\.npz.*declares shape \(900, 2, 3\)"):
        read_structures(path)
    path.write_bytes(raw.replace(b"'shape': (300, 2, 3)", b"'shape': (100, 2, 3)", 1))  # a short read
    with pytest.raises(DataError, match=r"hdr\.npz.*declares shape \(100, 2, 3\)"):
        read_structures(path)


def test_corrupt_and_pickled_npz(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(DataError, match=r"corrupt\.npz"):
        read_structures(path)
    with pytest.raises(DataError, match="no such file"):
        read_rmd17_npz(tmp_path / "missing.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, z=np.array([1]), R=np.array([None], dtype=object), E=np.zeros(1), F=np.zeros((1, 1, 3)))
    with pytest.raises(DataError, match=r"pickled\.npz"):
        read_md17_npz(pickled)


def test_nequip_with_pbc_and_keys(tmp_path):
    path = tmp_path / "neq.npz"
    rng = np.random.default_rng(2)
    cell = np.eye(3) * 5.0
    np.savez(
        path,
        Z=np.array([14, 14]),
        pos=rng.uniform(0, 5, (3, 2, 3)),
        energy=rng.normal(size=(3, 1)),
        forces=rng.normal(size=(3, 2, 3)),
        pbc=np.array([True, True, True]),
        cell=cell,
    )
    s = read_nequip_npz(path, keys={"atomic_numbers": "Z"})
    assert s.pbc.all()
    np.testing.assert_array_equal(s.cell, np.broadcast_to(cell, (3, 3, 3)))
    with pytest.raises(DataError, match="missing npz key"):
        read_nequip_npz(path)


def _labelled_frames(rng):
    frames = []
    for k in range(3):
        formula = "Si2O" if k % 2 else "SiO2"
        a = Atoms(formula, positions=rng.uniform(0, 3, (3, 3)), cell=np.eye(3) * 4.5, pbc=True)
        stress = np.array([1.0, 2.0, 3.0, 0.4, 0.5, 0.6]) * 1e-2
        a.calc = SinglePointCalculator(a, energy=-10.0 - k, forces=rng.normal(size=(3, 3)), stress=stress)
        frames.append(a)
    return frames


def test_extxyz_energy_forces_stress(tmp_path, rng):
    frames = _labelled_frames(rng)
    path = tmp_path / "set.extxyz"
    ase.io.write(path, frames, format="extxyz")
    s = read_structures(path)
    ref = StructureSet.from_atoms(frames)
    assert len(s) == 3
    np.testing.assert_allclose(s.positions, ref.positions, rtol=0, atol=1e-7)  # extxyz: 8 decimals
    np.testing.assert_allclose(s.energy, [-10.0, -11.0, -12.0], rtol=1e-14)
    np.testing.assert_allclose(s.forces, ref.forces, rtol=0, atol=1e-7)
    # Voigt order and ASE sign preserved (xx yy zz yz xz xy)
    np.testing.assert_allclose(s.stress, np.tile([0.01, 0.02, 0.03, 0.004, 0.005, 0.006], (3, 1)), rtol=1e-12)
    assert s.pbc.all()
    # units argument scales energies, forces (E/L) and stress (E/L^3)
    k = read_ase(path, energy_unit="kcal/mol")
    np.testing.assert_allclose(k.energy, s.energy * KCAL, rtol=1e-14)
    np.testing.assert_allclose(k.stress, s.stress * KCAL, rtol=1e-14)
    one = read_ase(path, index=1)
    assert len(one) == 1 and one.energy[0] == -11.0


def test_ase_db(tmp_path, rng):
    frames = _labelled_frames(rng)
    path = tmp_path / "set.db"
    with connect(path) as db:
        for a in frames:
            db.write(a)
    s = read_structures(path)
    assert len(s) == 3
    np.testing.assert_allclose(s.energy, [-10.0, -11.0, -12.0])
    np.testing.assert_allclose(s.forces, StructureSet.from_atoms(frames).forces)
    np.testing.assert_allclose(s.stress[0], [0.01, 0.02, 0.03, 0.004, 0.005, 0.006])


def test_ase_bad_file(tmp_path):
    path = tmp_path / "junk.xyz"
    path.write_text("this is\nnot an xyz file\n")
    with pytest.raises(DataError, match=r"junk\.xyz"):
        read_structures(path)
    with pytest.raises(DataError, match="no such file"):
        read_ase(tmp_path / "missing.xyz")


def test_schnetpack_extxyz_kcal(shared_data):
    path = shared_data / "md17_schnetpack_ethanol" / "ethanol_sampledata.xyz"
    s = read_ase(path, index=":50", energy_unit="kcal/mol")
    assert len(s) == 50
    # -97205.6 .. -97178.1 kcal/mol
    assert np.all((s.energy > -97206 * KCAL) & (s.energy < -97178 * KCAL))
