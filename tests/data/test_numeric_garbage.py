"""Readers refuse numbers a file has already lost: integer or float16 positions and labels, arrays of the wrong
shape; and the readers of formats without a checksum (extended XYZ, ASE db, DeePMD sets) refuse what a damaged
file can still be caught by: overlapping atoms, forces of the wrong shape, non-finite values.

Each refused file is the valid one below with one array changed, so each test fails if its check is removed
(the unchanged file reads; see ``test_the_valid_files_read``).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import primitive_neighbor_list

from equiforce.data.errors import DataError
from equiforce.data.hdf5 import write_hdf5
from equiforce.data.neighbours import check_no_overlap
from equiforce.data.readers import read_structures
from equiforce.data.structures import StructureSet

N_FRAMES, N_ATOMS = 3, 4
E_TOTAL = -47000.0  # a typical total energy (eV) of a 4-atom molecule's DFT frame: float16 keeps it to ±16 eV


def _frames(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 1.2, 0.0], [0.0, 0.0, 1.3]])
    return {
        "z": np.array([6, 1, 1, 8]),
        "pos": pos + rng.normal(0, 0.02, (N_FRAMES, N_ATOMS, 3)),
        "energy": E_TOTAL + rng.normal(0, 0.1, N_FRAMES),
        "forces": rng.normal(0, 1, (N_FRAMES, N_ATOMS, 3)),
    }


# ---------------------------------------------------------------------------------------------------- npz
#: the three npz layouts: (positions key, energies key, forces key, atomic-numbers key)
LAYOUTS = {
    "rmd17": ("coords", "energies", "forces", "nuclear_charges"),
    "md17": ("R", "E", "F", "z"),
    "nequip": ("pos", "energy", "forces", "atomic_numbers"),
}


def _npz(path: Path, layout: str, **change: np.ndarray) -> Path:
    """The valid frames in ``layout`` (eV units for nequip, kcal/mol for the others: only dtypes matter here),
    with the arrays named in ``change`` (by role: pos, energy, forces) replaced."""
    d = _frames()
    d.update(change)
    pos_key, e_key, f_key, z_key = LAYOUTS[layout]
    np.savez(path, **{z_key: d["z"], pos_key: d["pos"], e_key: d["energy"], f_key: d["forces"]})
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("role", "make", "dtype"),
    [
        ("energy", lambda a: a.astype(np.uint8), "uint8"),  # -47,000 wraps to some value in 0..255
        ("energy", lambda a: a.astype(np.float16), "float16"),  # -47,000 kept to the nearest 32
        ("energy", lambda a: np.rint(a).astype(np.int64), "int64"),
        ("pos", lambda a: np.rint(a).astype(np.int32), "int32"),
        ("pos", lambda a: a.astype(np.float16), "float16"),
        ("forces", lambda a: a.astype(np.float16), "float16"),
        ("forces", lambda a: np.rint(a).astype(np.int16), "int16"),
    ],
)
def test_npz_integer_or_half_precision_arrays_are_refused(tmp_path, layout, role, make, dtype):
    key = LAYOUTS[layout][("pos", "energy", "forces").index(role)]
    path = _npz(tmp_path / "f.npz", layout, **{role: make(_frames()[role])})
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    assert str(path) in message and f"{key!r}" in message and f"dtype {dtype}" in message, message
    assert "expected float32 or float64" in message, message


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("role", "shape", "expected"),
    [
        ("energy", (N_FRAMES, 2), f"({N_FRAMES},) or ({N_FRAMES}, 1)"),
        ("energy", (1, N_FRAMES), f"({N_FRAMES},) or ({N_FRAMES}, 1)"),
        ("forces", (N_FRAMES, 3, N_ATOMS), f"({N_FRAMES}, {N_ATOMS}, 3)"),  # same size, transposed
        ("forces", (N_FRAMES, N_ATOMS * 3), f"({N_FRAMES}, {N_ATOMS}, 3)"),
        ("pos", (N_FRAMES, 3, N_ATOMS), f"(n_frames, {N_ATOMS}, 3)"),
    ],
)
def test_npz_arrays_of_the_wrong_shape_are_refused(tmp_path, layout, role, shape, expected):
    key = LAYOUTS[layout][("pos", "energy", "forces").index(role)]
    d = _frames()
    value = np.resize(d[role], shape)  # float64, the right dtype: only the shape is wrong
    path = _npz(tmp_path / "f.npz", layout, **{role: value})
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    assert f"{key!r}" in message and f"shape {shape}" in message and f"expected {expected}" in message, message


def test_float32_is_read_and_keeps_its_digits(tmp_path):
    d = _frames()
    path = _npz(tmp_path / "f32.npz", "nequip", energy=d["energy"].astype(np.float32))
    s = read_structures(path)
    np.testing.assert_allclose(s.energy, d["energy"], rtol=1e-7)  # float32: 7 digits, ~5 meV at -47,000 eV


# ---------------------------------------------------------------------------------------------------- HDF5
def _set() -> StructureSet:
    d = _frames()
    return StructureSet.from_frames(d["z"], d["pos"], energy=d["energy"], forces=d["forces"])


def _h5_with(path: Path, name: str, value: np.ndarray) -> Path:
    s = _set()
    base = s if name != "stress" else StructureSet(**{**_fields(s), "stress": np.zeros((len(s), 6))})
    write_hdf5(path, base)
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_dataset(name, data=value)
    return path


def _fields(s: StructureSet) -> dict:
    names = ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces", "stress")
    return {n: getattr(s, n) for n in names}


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("energy", np.uint8),
        ("energy", np.float16),
        ("positions", np.int32),
        ("forces", np.float16),
        ("stress", np.int64),
    ],
)
def test_hdf5_integer_or_half_precision_datasets_are_refused(tmp_path, name, dtype):
    s = _set()
    value = np.zeros((len(s), 6)) if name == "stress" else getattr(s, name)
    path = _h5_with(tmp_path / "f.h5", name, value.astype(dtype))
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    expected = f"dataset {name!r} has dtype {np.dtype(dtype)}, expected float32 or float64"
    assert str(path) in message and expected in message, message


def test_hdf5_float32_dataset_is_read(tmp_path):
    s = _set()
    path = _h5_with(tmp_path / "f.h5", "forces", s.forces.astype(np.float32))
    np.testing.assert_allclose(read_structures(path).forces, s.forces, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- DeePMD
def _deepmd(folder: Path, **change: np.ndarray) -> Path:
    """One periodic DeePMD system of the frames (box 10 Å), with the named ``.npy`` arrays replaced."""
    d = _frames()
    (folder / "set.000").mkdir(parents=True)
    (folder / "type.raw").write_text("0 1 1 2\n")
    (folder / "type_map.raw").write_text("C H O\n")
    arrays = {
        "coord": d["pos"].reshape(N_FRAMES, -1),
        "box": np.tile(10.0 * np.eye(3).reshape(1, 9), (N_FRAMES, 1)),
        "energy": d["energy"],
        "force": d["forces"].reshape(N_FRAMES, -1),
        "virial": np.zeros((N_FRAMES, 9)),
    }
    arrays.update(change)
    for name, value in arrays.items():
        np.save(folder / "set.000" / f"{name}.npy", value)
    return folder


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("energy", np.uint8), ("energy", np.float16), ("coord", np.int32), ("force", np.float16), ("virial", np.int64)],
)
def test_deepmd_integer_or_half_precision_arrays_are_refused(tmp_path, name, dtype):
    good = _deepmd(tmp_path / "good")
    value = np.load(good / "set.000" / f"{name}.npy").astype(dtype)
    folder = _deepmd(tmp_path / "bad", **{name: value})
    with pytest.raises(DataError) as info:
        read_structures(folder)
    message = str(info.value)
    assert f"{name}.npy has dtype {np.dtype(dtype)}, expected float32 or float64" in message, message


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("coord", (N_FRAMES, 3, N_ATOMS), f"(nframes, {3 * N_ATOMS}) or (nframes, {N_ATOMS}, 3)"),
        ("force", (N_FRAMES, 3, N_ATOMS), f"({N_FRAMES}, {3 * N_ATOMS}) or ({N_FRAMES}, {N_ATOMS}, 3)"),
        ("energy", (N_FRAMES, 1, 1), f"({N_FRAMES},) or ({N_FRAMES}, 1)"),
        ("virial", (N_FRAMES, 9, 1), f"({N_FRAMES}, 9) or ({N_FRAMES}, 3, 3)"),
        ("box", (N_FRAMES, 1, 9), f"({N_FRAMES}, 9) or ({N_FRAMES}, 3, 3)"),
    ],
)
def test_deepmd_reshaped_arrays_are_refused(tmp_path, name, shape, expected):
    """Arrays of the right size but another layout (e.g. forces stored component-major) were reshaped
    silently before."""
    good = _deepmd(tmp_path / "good")
    value = np.load(good / "set.000" / f"{name}.npy")
    folder = _deepmd(tmp_path / "bad", **{name: value.reshape(shape)})
    with pytest.raises(DataError) as info:
        read_structures(folder)
    message = str(info.value)
    assert f"{name}.npy has shape {shape}, expected {expected}" in message, message


def test_deepmd_documented_alternative_layouts_read(tmp_path):
    d = _frames()
    folder = _deepmd(
        tmp_path / "sys", coord=d["pos"], force=d["forces"], virial=np.zeros((N_FRAMES, 3, 3))
    )  # [n, N, 3] and [n, 3, 3]
    s = read_structures(folder)
    np.testing.assert_array_equal(s.positions, d["pos"].reshape(-1, 3))
    np.testing.assert_array_equal(s.forces, d["forces"].reshape(-1, 3))


def test_deepmd_overlapping_atoms_are_refused(tmp_path):
    """DeePMD sets carry no checksum either: an atom moved onto another (here across the periodic boundary of the
    10 Å box, atom 3 at 9.98 Å from atom 0 at the origin) is refused, naming the system, frame and atoms."""
    pos = _frames()["pos"].copy()
    pos[1, 3] = pos[1, 0] + [9.98, 0.0, 0.0]
    folder = _deepmd(tmp_path / "sys", coord=pos.reshape(N_FRAMES, -1))
    with pytest.raises(DataError) as info:
        read_structures(folder)
    message = str(info.value)
    assert str(folder) in message and "structure 1: atoms " in message and "(distance 0.02 Å" in message, message
    assert "atoms 0 and 3 overlap" in message or "atoms 3 and 0 overlap" in message, message


# ---------------------------------------------------------------------------------------------------- extxyz, ASE db
def _molecule(k: int = 0) -> Atoms:
    d = _frames()
    atoms = Atoms(numbers=d["z"], positions=d["pos"][k])
    atoms.calc = SinglePointCalculator(atoms, energy=float(d["energy"][k]), forces=d["forces"][k])
    return atoms


@pytest.mark.parametrize("suffix", [".extxyz", ".db"])
def test_overlapping_atoms_are_refused(tmp_path, suffix):
    import ase.io

    frames = [_molecule(k) for k in range(N_FRAMES)]
    frames[2].positions[3] = frames[2].positions[1] + [0.05, 0.0, 0.0]  # atom 3 onto atom 1 (a damaged digit)
    frames[2].calc = SinglePointCalculator(frames[2], energy=-1.0, forces=np.zeros((N_ATOMS, 3)))
    path = tmp_path / f"f{suffix}"
    ase.io.write(path, frames)
    with pytest.raises(DataError) as info:
        read_structures(path)
    message = str(info.value)
    assert str(path) in message and "structure 2" in message, message
    assert "atoms 1 and 3 overlap (distance 0.05 Å" in message or "atoms 3 and 1 overlap (distance 0.05 Å" in message


def test_an_atom_on_its_own_periodic_image_is_refused(tmp_path):
    import ase.io

    atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    atoms.positions[1] = atoms.positions[0] + atoms.cell[0] + [0.0, 0.0, 0.03]  # atom 1 onto an image of atom 0
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, atoms)
    with pytest.raises(DataError, match=r"structure 0: atoms [01] and [01] overlap \(distance 0\.03 Å"):
        read_structures(path)


def test_extxyz_forces_of_the_wrong_shape_are_refused(tmp_path):
    """A forces column of two components (a damaged Properties header) is not padded or reshaped."""
    lines = [str(N_ATOMS), 'Properties=species:S:1:pos:R:3:forces:R:2 energy=-1.0 pbc="F F F"']
    for symbol, (x, y, z) in zip("CHHO", _frames()["pos"][0], strict=True):
        lines.append(f"{symbol} {x} {y} {z} 0.1 0.2")
    path = tmp_path / "f.extxyz"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=rf"forces of structure 0 have shape \({N_ATOMS}, 2\), expected \({N_ATOMS}, 3\)"
    ):
        read_structures(path)


def test_the_valid_files_read(tmp_path):
    """The unchanged files of every test above read, with their values."""
    import ase.io

    d = _frames()
    for layout in LAYOUTS:
        s = read_structures(_npz(tmp_path / f"{layout}.npz", layout))
        assert len(s) == N_FRAMES
    s = read_structures(_h5_with(tmp_path / "ok.h5", "energy", _set().energy))
    np.testing.assert_array_equal(s.energy, d["energy"])
    s = read_structures(_deepmd(tmp_path / "dp"))
    np.testing.assert_array_equal(s.energy, d["energy"])
    for suffix in (".extxyz", ".db"):
        ase.io.write(tmp_path / f"ok{suffix}", [_molecule(k) for k in range(N_FRAMES)])
        np.testing.assert_allclose(read_structures(tmp_path / f"ok{suffix}").energy, d["energy"], rtol=1e-15)
    crystal = bulk("Cu", "fcc", a=3.6) * (2, 1, 1)
    crystal.calc = SinglePointCalculator(crystal, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(tmp_path / "cu.extxyz", crystal)
    assert len(read_structures(tmp_path / "cu.extxyz")) == 1


def _random_frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pbc, cell, positions) of a random structure: skewed cells, thin ones (a height under 1 Å), partly
    periodic ones, slabs with a zero lattice vector along a free direction; now and then a 1,100-atom one."""
    big = rng.random() < 0.05
    n = 1100 if big else int(rng.integers(1, 10))
    pbc = rng.random(3) < 0.6
    cell = np.diag(rng.uniform(0.8, 4, 3)) + rng.uniform(-0.3, 0.3, (3, 3))
    if big:
        cell *= 12.0
    elif rng.random() < 0.15 and not pbc.all():
        cell[np.flatnonzero(~pbc)[0]] = 0.0
    return pbc, cell, rng.uniform(0, 1, (n, 3)) @ cell + rng.normal(0, 0.3, (n, 3))


def _closest_pair(pbc: np.ndarray, cell: np.ndarray, pos: np.ndarray) -> float | None:
    """The shortest distance (Å) between two atoms or an atom and a periodic image, if under 0.5 Å: by brute
    force over every image shift up to 4 cells along each periodic direction for small structures, by
    ``ase.neighborlist`` for the large ones."""
    if len(pos) > 100:
        box = cell if pbc.any() else np.diag(np.ptp(pos, axis=0) + 2.0)
        d = primitive_neighbor_list("d", pbc, box, pos, 0.5, self_interaction=False)
    else:
        ranges = [range(-4, 5) if p else range(1) for p in pbc]
        shifts = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T @ cell  # [images, 3]
        vectors = pos[None, :, None, :] - pos[:, None, None, :] + shifts[None, None, :, :]  # [i, j, image, 3]
        d = np.linalg.norm(vectors, axis=-1)
        d[np.arange(len(pos)), np.arange(len(pos)), np.flatnonzero(np.all(shifts == 0, axis=1))[0]] = np.inf
        d = d[d < 0.5]
    return float(d.min()) if d.size else None


def test_overlap_check_agrees_with_brute_force():
    """The vectorised minimum-image check finds the same first overlapping structure, and its closest pair's
    distance, as a brute-force search over periodic images (``ase.neighborlist`` for 1,100-atom cells)."""
    rng = np.random.default_rng(7)
    outcomes = set()
    for _ in range(40):
        frames = [_random_frame(rng) for _ in range(int(rng.integers(1, 10)))]
        closest = [
            None if pbc.all() and abs(np.linalg.det(c)) < 1e-9 else _closest_pair(pbc, c, p) for pbc, c, p in frames
        ]
        s = StructureSet(
            atomic_numbers=np.ones(sum(len(p) for *_, p in frames), int),
            positions=np.concatenate([p for *_, p in frames]),
            n_atoms=[len(p) for *_, p in frames],
            cell=np.stack([c for _, c, _ in frames]),
            pbc=np.stack([b for b, *_ in frames]),
        )
        first = next((k for k, d in enumerate(closest) if d is not None), None)
        outcomes.add(first is None)
        if first is None:
            check_no_overlap(s)
            continue
        with pytest.raises(DataError, match=rf"^structure {first}: atoms \d+ and \d+ overlap \(distance ") as info:
            check_no_overlap(s)
        reported = float(str(info.value).split("distance ")[1].split(" ")[0])
        assert reported == pytest.approx(closest[first], rel=5e-3, abs=1e-3)
    assert outcomes == {True, False}  # both kinds of set were drawn
