"""DeePMD-kit reader: layout, units, the virial sign (checked independently of the reader), bad input, LiPS20.

The virial sign is verified from its definition, not from the reader's formula: for EMT copper/gold cells the
virial is computed as DeePMD defines it, W = −∂E/∂ε (central finite differences of the EMT energy under a
homogeneous strain ε of cell and positions), written to ``virial.npy``, read back, and compared with ase's
analytic EMT stress (ASE sign: negative under compression).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from equiforce.data.deepmd import is_deepmd_folder, read_deepmd
from equiforce.data.errors import DataError
from equiforce.data.readers import read_structures

GPA = 160.21766208  # eV/Å³ → GPa


def _strained_alloy(scale: float, seed: int):
    """A 4-atom fcc Cu3Au cell, isotropically scaled by ``scale``, sheared a little and rattled."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[0] = 79
    rng = np.random.default_rng(seed)
    shear = np.eye(3) * scale + 0.01 * (lambda m: m + m.T)(rng.uniform(-1, 1, (3, 3)))
    atoms.set_cell(atoms.cell[:] @ shear, scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    return atoms


def _virial_by_finite_differences(atoms, h: float = 1e-5) -> np.ndarray:
    """DeePMD's virial W = −∂E/∂ε (eV), ε a homogeneous strain x → x(1 + ε) of cell rows and positions."""
    cell, pos = atoms.get_cell()[:], atoms.get_positions()
    w = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = []
            for sign in (1.0, -1.0):
                eps = np.zeros((3, 3))
                eps[a, b] = sign * h
                strained = atoms.copy()
                strained.calc = EMT()
                strained.set_cell(cell @ (np.eye(3) + eps), scale_atoms=False)
                strained.set_positions(pos @ (np.eye(3) + eps))
                e.append(strained.get_potential_energy())
            w[a, b] = -(e[0] - e[1]) / (2 * h)
    return w


def _write_system(folder: Path, frames, *, type_map=("Au", "Cu"), sets=((0, None),), virial=True, raw=False):
    """Write ``frames`` as a DeePMD system: ``sets`` = ((start, stop), ...) slices of frames, one per set."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(type_map)
    symbols = frames[0].get_chemical_symbols()
    (folder / "type.raw").write_text("\n".join(str(names.index(s)) for s in symbols) + "\n")
    (folder / "type_map.raw").write_text("\n".join(names) + "\n")
    for k, (start, stop) in enumerate(sets):
        chunk = frames[start:stop]
        arrays = {
            "coord": np.stack([a.get_positions().reshape(-1) for a in chunk]),
            "box": np.stack([a.get_cell()[:].reshape(-1) for a in chunk]),
            "energy": np.array([a.get_potential_energy() for a in chunk]),
            "force": np.stack([a.get_forces().reshape(-1) for a in chunk]),
        }
        if virial:
            arrays["virial"] = np.stack([_virial_by_finite_differences(a).reshape(-1) for a in chunk])
        if raw:
            for name, arr in arrays.items():
                np.savetxt(folder / f"{name}.raw", arr.reshape(len(chunk), -1))
        else:
            d = folder / f"set.{k:03d}"
            d.mkdir()
            for name, arr in arrays.items():
                np.save(d / f"{name}.npy", arr)
    return folder


@pytest.fixture(scope="module")
def frames():
    # compressed (scale 0.97), near equilibrium and stretched (1.03) cells
    return [_strained_alloy(s, seed) for seed, s in enumerate((0.97, 0.97, 1.0, 1.03, 1.03))]


def test_round_trip_and_virial_sign(tmp_path, frames):
    s = read_deepmd(_write_system(tmp_path / "sys", frames))
    assert len(s) == 5 and s.species == (29, 79)
    assert list(s.atomic_numbers[:4]) == list(frames[0].get_atomic_numbers())  # type_map "Au Cu" order respected
    np.testing.assert_allclose(s.positions[:4], frames[0].get_positions(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.cell[3], frames[3].get_cell()[:], rtol=0, atol=1e-12)
    assert s.pbc.all()
    np.testing.assert_allclose(s.energy, [a.get_potential_energy() for a in frames], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.forces[4:8], frames[1].get_forces(), rtol=0, atol=1e-12)
    # stress = −W/V with W = −∂E/∂ε equals ase's analytic EMT stress (ASE sign and Voigt order)
    ase_stress = np.stack([a.get_stress() for a in frames])
    np.testing.assert_allclose(s.stress, ase_stress, rtol=0, atol=2e-6)
    # and the sign is physical: compressed cells push outwards (ASE stress < 0, DeePMD pressure tr(W)/3V > 0)
    pressure_gpa = -s.stress[:, :3].mean(axis=1) * GPA
    assert np.all(pressure_gpa[:2] > 1.0) and np.all(pressure_gpa[3:] < -1.0), pressure_gpa


def test_read_structures_detects_the_folder_and_format(tmp_path, frames):
    root = tmp_path / "data"
    _write_system(root / "a", frames[:2], virial=False)
    _write_system(root / "b", frames[2:], sets=((0, 1), (1, None)))
    assert is_deepmd_folder(root) and is_deepmd_folder(root / "a") and not is_deepmd_folder(tmp_path / "nope")
    one = read_structures(root / "b")
    assert len(one) == 3 and np.isfinite(one.stress).all()  # two sets concatenated
    both = read_structures(root, format="deepmd")  # every system below the folder, sorted
    assert len(both) == 5
    np.testing.assert_allclose(both.energy, [a.get_potential_energy() for a in frames], rtol=0, atol=1e-12)
    # system "a" has no virial: its rows are NaN, i.e. no stress label (masked in training)
    assert list(both.has_stress) == [False, False, True, True, True]


def test_raw_text_layout_and_units(tmp_path, frames):
    folder = _write_system(tmp_path / "raw", frames[:2], raw=True)
    s = read_deepmd(folder)
    np.testing.assert_allclose(s.energy, [a.get_potential_energy() for a in frames[:2]], rtol=0, atol=1e-9)
    # a file in meV and nm: energies ×1e-3, lengths ×10, forces ×1e-4, stress ×1e-6
    t = read_deepmd(folder, energy_unit="meV", length_unit="nm")
    np.testing.assert_allclose(t.energy, 1e-3 * s.energy, rtol=1e-12)
    np.testing.assert_allclose(t.positions, 10 * s.positions, rtol=1e-12)
    np.testing.assert_allclose(t.forces, 1e-4 * s.forces, rtol=1e-12)
    np.testing.assert_allclose(t.stress, 1e-6 * s.stress, rtol=1e-9)


def test_nopbc_system(tmp_path, frames):
    folder = _write_system(tmp_path / "mol", frames[:1], virial=False)
    (folder / "nopbc").write_text("")
    (folder / "set.000" / "box.npy").unlink()
    s = read_deepmd(folder)
    assert not s.pbc.any() and s.stress is None
    np.save(folder / "set.000" / "virial.npy", np.zeros((1, 9)))
    with pytest.raises(DataError, match=r"virial\.npy.*non-periodic"):
        read_deepmd(folder)


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        (lambda f: (f / "type_map.raw").unlink(), "type_map.raw: missing"),
        (lambda f: (f / "type_map.raw").write_text("Au X1\n"), "'X1' is not an element"),
        (lambda f: (f / "type.raw").write_text("0\n1\n2\n1\n"), "type index 2"),
        (lambda f: (f / "type.raw").write_text("0 a 1 1"), "type.raw: entries must be integer"),
        (lambda f: np.save(f / "set.000" / "coord.npy", np.zeros((2, 11))), r"coord.npy has shape \(2, 11\)"),
        (lambda f: np.save(f / "set.000" / "force.npy", np.zeros((3, 12))), r"force.npy has shape \(3, 12\)"),
        (lambda f: np.save(f / "set.000" / "energy.npy", np.zeros(5)), r"energy.npy has shape \(5,\)"),
        (lambda f: (f / "set.000" / "box.npy").unlink(), "box.npy: missing"),
        (lambda f: np.save(f / "set.000" / "box.npy", np.zeros((2, 9))), "box.npy: singular cell"),
        (lambda f: (f / "set.001" / "energy.npy").unlink(), r"energy.*missing in .*set\.001"),
        (lambda f: np.save(f / "set.001" / "virial.npy", np.full((1, 9), np.nan)), "virial.npy: NaN"),
        (lambda f: (f / "set.000" / "coord.npy").write_text("not numpy"), "coord.npy: cannot read"),
    ],
)
def test_bad_input_names_the_file(tmp_path, frames, breakage, match):
    folder = _write_system(tmp_path / "sys", frames[:3], sets=((0, 2), (2, None)))
    breakage(folder)
    with pytest.raises(DataError, match=match):
        read_deepmd(folder)


def test_not_deepmd(tmp_path):
    with pytest.raises(DataError, match=r"no type\.raw"):
        read_deepmd(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        read_deepmd(tmp_path / "missing")
    (tmp_path / "type.raw").write_text("0\n")
    (tmp_path / "type_map.raw").write_text("H\n")
    with pytest.raises(DataError, match=r"no set\.\* folder"):
        read_deepmd(tmp_path)


# ---------------------------------------------------------------------------------------------- LiPS20
def test_lips20_systems(shared_data):
    """Every LiPS20 system: frames, species, and the README's figures (pressure tr(W)/3V = −tr(σ)/3 of +0.1 to
    +4.2 GPa for fixed-volume AIMD at 3000 K; Li3P's energy ≈ −197.7 eV/atom)."""
    root = shared_data / "lips20"
    li3p = read_structures(root / "Li3P" / "3000K" / "deepmd" / "Li48P16S0")
    assert len(li3p) == 1000 and set(li3p.n_atoms) == {64} and li3p.species == (3, 15)
    assert np.mean(li3p.energy / li3p.n_atoms) == pytest.approx(-197.7, abs=0.1)
    assert li3p.has_stress.all()
    means = {}
    for system in sorted(root.glob("*/3000K/deepmd/*")):
        s = read_deepmd(system)
        pressure = -s.stress[:, :3].mean(axis=1) * GPA
        means[system.parent.parent.parent.name] = float(pressure.mean())
    assert len(means) == 7
    assert all(0.1 <= p <= 4.3 for p in means.values()), means
    assert means["Li3P"] == pytest.approx(4.2, abs=0.05) and means["S"] == pytest.approx(0.13, abs=0.05)


def test_water_deepmd(shared_data):
    s = read_structures(shared_data / "water_deepmd")  # 4 systems, float32 arrays, no virial
    assert len(s) == 400 and s.species == (1, 8) and s.stress is None
    assert s.positions.dtype == np.float64 and np.all(s.n_atoms == 192)
    assert np.sum(s.atomic_numbers[:192] == 8) == 64
    assert abs(np.linalg.det(s.cell[0])) == pytest.approx(1927.3, abs=0.1)
