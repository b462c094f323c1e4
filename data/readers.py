"""Readers: files on disk → :class:`~equiforce.data.structures.StructureSet` in ASE units.

This is the only place where units are converted. Every reader returns positions and cells in Å,
energies in eV, forces in eV/Å and stress in eV/Å³ (ASE sign, Voigt order xx yy zz yz xz xy).
Where a file format does not fix its units, the unit is an explicit argument (``energy_unit``,
``length_unit``); an unknown unit raises :class:`~equiforce.data.errors.DataError`.
Conversion factors come from :mod:`ase.units` (e.g. kcal/mol → eV is ``ase.units.kcal / ase.units.mol``).

Supported inputs:

* rMD17 npz (keys ``nuclear_charges, coords, energies, forces``; kcal/mol and kcal/mol/Å):
  A. S. Christensen & O. A. von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018 (2020), arXiv:2007.09593.
* original MD17 / sGDML npz (keys ``R, z, E, F``; sGDML stores kcal/mol and kcal/mol/Å):
  S. Chmiela et al., Sci. Adv. 3, e1603015 (2017).
* nequip-style npz (keys ``pos, atomic_numbers, energy, forces``, optional ``cell, pbc``; eV by default).
* anything :func:`ase.io.read` reads (extended XYZ, ASE db, ...).
* the native HDF5 format of :mod:`equiforce.data.hdf5`.
* DeePMD-kit data folders (``type.raw``, ``type_map.raw``, ``set.*/{box,coord,energy,force,virial}.npy``;
  eV, Å, virial W = −σ·V): :func:`equiforce.data.deepmd.read_deepmd`.

All npz files are opened with ``allow_pickle=False``. Positions, energies, forces and stress stored as integers
or float16, or in a shape the format does not document, are refused (:mod:`equiforce.data.checks`); the files of
formats without a checksum (extended XYZ, ASE db, DeePMD sets) are also checked for overlapping atoms.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.data.checks import check_float_array
from equiforce.data.errors import DataError
from equiforce.data.neighbours import check_no_overlap
from equiforce.data.structures import StructureSet, _numeric
from equiforce.data.units import ENERGY_UNITS, LENGTH_UNITS, energy_factor, length_factor

__all__ = [
    "ENERGY_UNITS",
    "LENGTH_UNITS",
    "energy_factor",
    "length_factor",
    "load_sample",
    "read_ase",
    "read_md17_npz",
    "read_nequip_npz",
    "read_rmd17_npz",
    "read_structures",
    "sample_path",
]

PathLike = str | os.PathLike

SAMPLE_PACKAGE = "equiforce.data.sample"


@contextmanager
def _about(path: PathLike) -> Iterator[None]:
    """Re-raise a :class:`DataError` with the file name in front, unless it already names it."""
    try:
        yield
    except DataError as err:
        msg = str(err)
        if str(path) in msg:
            raise
        raise DataError(f"{path}: {msg}") from err


# What a damaged zip archive or .npy member can raise inside zipfile/zlib/numpy.
_NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    IndexError,
    TypeError,
    NotImplementedError,
    RuntimeError,
    MemoryError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
)


@contextmanager
def _open_npz(fh: Any, path: PathLike) -> Iterator[Any]:
    """``np.load`` on an open file handle (closed by the caller, also on error), pickle disabled."""
    npz = np.load(fh, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an npz archive (a single .npy array)")
    with npz:
        yield npz


def _check_member_size(npz: Any, key: str, path: PathLike) -> None:
    """The byte count the ``.npy`` header of ``key`` declares must equal what the archive member holds.

    A corrupted header (a flipped digit of the shape or of the item size) is reported here, before NumPy
    allocates the declared array or stops reading short of the member's CRC check.
    """
    name = f"{key}.npy"
    if name not in npz.zip.namelist():
        raise DataError(f"{path}: npz key {key!r} is not a .npy array")
    info = npz.zip.getinfo(name)
    with npz.zip.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            return  # NumPy's own reader validates other versions
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        available = info.file_size - member.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: npz array {key!r} holds Python objects (dtype {dtype}); pickles are not read")
    if declared != available:
        raise DataError(
            f"{path}: npz array {key!r} declares shape {shape} of {dtype} ({declared} bytes) but the archive "
            f"holds {available} bytes (corrupt file)"
        )


def _load_npz(path: PathLike, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load the listed arrays of an npz file (no pickle), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh, _open_npz(fh, path) as npz:
            keys = set(npz.files)
            missing = [k for k in required if k not in keys]
            if missing:
                raise DataError(f"{path}: missing npz key(s) {missing}; the file has {sorted(keys)}")
            out = {}
            for k in (*required, *optional):
                if k in keys:
                    _check_member_size(npz, k, path)
                    out[k] = npz[k]
            return out
    except DataError:
        raise
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: cannot read npz file ({type(err).__name__}: {err})") from err


def _npz_keys(path: PathLike) -> set[str]:
    try:
        with open(path, "rb") as fh, _open_npz(fh, path) as npz:
            return set(npz.files)
    except DataError:
        raise
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: cannot read npz file ({type(err).__name__}: {err})") from err


def _frames(
    path: PathLike,
    z: np.ndarray,
    pos: np.ndarray,
    energy: np.ndarray | None,
    forces: np.ndarray | None,
    e_fac: float,
    l_fac: float,
    keys: tuple[str, str, str],
) -> StructureSet:
    """One-molecule trajectory arrays (+ unit factors) → StructureSet, errors naming ``path``.

    ``keys``: the file's names of positions, energies and forces, for the messages. Positions, energies and
    forces must be stored as float32 or wider in their documented shapes (:func:`check_float_array`). Values
    are checked by :class:`StructureSet` (finite, atomic numbers in 1..118), so a NaN names its frame
    (``structure k``) and atom; a value that overflows in the unit conversion becomes inf and is reported the
    same way.
    """
    pos_key, energy_key, forces_key = (
        f"npz key {k!r} ({what})" for k, what in zip(keys, ("positions", "energies", "forces"), strict=True)
    )
    with _about(path):
        z = _numeric("atomic numbers", z)
        if z.ndim == 2:  # per-frame atomic numbers; must be the same molecule in every frame
            if z.shape[0] == 0:
                raise DataError("per-frame atomic numbers have no rows (the file holds no frames)")
            same = z == z[:1]
            if z.dtype.kind == "f":  # a NaN column is the same in every frame (and refused as a value below)
                same |= np.isnan(z) & np.isnan(z[:1])
            differ = np.flatnonzero(~np.all(same, axis=1))
            if differ.size:
                raise DataError(f"per-frame atomic numbers differ between frames 0 and {int(differ[0])}")
            z = z[0]
        elif z.ndim > 2:
            raise DataError(f"atomic numbers have shape {z.shape}, expected (n_atoms,) or (n_frames, n_atoms)")
        z = z.reshape(-1)
        check_float_array(pos_key, pos, [("n_frames", z.size, 3)])
        pos = pos.astype(np.float64)
        n = pos.shape[0]
        if n == 0:
            raise DataError("the file holds no frames")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, reported below
            if energy is not None:
                check_float_array(energy_key, energy, [(n,), (n, 1)])
                energy = energy.astype(np.float64).reshape(-1) * e_fac
            if forces is not None:
                check_float_array(forces_key, forces, [(n, z.size, 3)])
                forces = forces.astype(np.float64) * (e_fac / l_fac)
            pos = pos * l_fac
        return StructureSet.from_frames(z, pos, energy=energy, forces=forces)


def read_rmd17_npz(path: PathLike) -> StructureSet:
    """Read an rMD17 npz file (the full ``rmd17_<mol>.npz`` or a per-split file of ``andersx/rmd17-npz``).

    Keys used: ``nuclear_charges`` ``[N]`` (uint8), ``coords`` ``[n, N, 3]`` (Å), ``energies`` ``[n]``
    (kcal/mol, total energy), ``forces`` ``[n, N, 3]`` (kcal/mol/Å). Other keys (``old_indices``,
    ``old_energies``, ``old_forces``) are ignored. Energies and forces are converted to eV and eV/Å with
    ``ase.units.kcal / ase.units.mol``.

    Source: A. S. Christensen & O. A. von Lilienfeld, "On the role of gradients for machine learning of
    molecular energies and forces", Mach. Learn.: Sci. Technol. 1, 045018 (2020), arXiv:2007.09593.

    Returns:
      A non-periodic :class:`StructureSet` of ``n`` frames (float64, eV, eV/Å, Å).

    Raises:
      DataError: missing file or key, corrupt archive, positions, energies or forces stored as
        integers or float16, inconsistent shapes, NaN positions.
    """
    d = _load_npz(path, ("nuclear_charges", "coords", "energies", "forces"))
    f = energy_factor("kcal/mol")
    keys = ("coords", "energies", "forces")
    return _frames(path, d["nuclear_charges"], d["coords"], d["energies"], d["forces"], f, 1.0, keys)


def read_md17_npz(path: PathLike, energy_unit: str = "kcal/mol", length_unit: str = "Å") -> StructureSet:
    """Read an original MD17 / sGDML npz file (``md17_<mol>.npz``, ``<mol>_dft.npz``).

    Keys used: ``z`` ``[N]`` atomic numbers, ``R`` ``[n, N, 3]`` positions, ``E`` ``[n]`` or ``[n, 1]``
    energies, ``F`` ``[n, N, 3]`` forces. The sGDML release stores kcal/mol, kcal/mol/Å and Å, which is the
    default; the unit is an argument because the format itself does not record it. Forces are converted
    with ``energy_factor / length_factor``.

    Source: S. Chmiela et al., "Machine learning of accurate energy-conserving molecular force fields",
    Sci. Adv. 3, e1603015 (2017).

    Args:
      path: the npz file.
      energy_unit: unit of ``E`` (and of ``F`` per length unit): one of :data:`ENERGY_UNITS`.
      length_unit: unit of ``R``: one of :data:`LENGTH_UNITS`.

    Returns:
      A non-periodic :class:`StructureSet` in Å, eV, eV/Å (float64).

    Raises:
      DataError: unknown unit, missing file or key, corrupt archive, positions, energies or forces stored as
        integers or float16, inconsistent shapes, NaN positions.
    """
    e_fac, l_fac = energy_factor(energy_unit), length_factor(length_unit)
    d = _load_npz(path, ("z", "R", "E", "F"))
    return _frames(path, d["z"], d["R"], d["E"], d["F"], e_fac, l_fac, ("R", "E", "F"))


def read_nequip_npz(
    path: PathLike,
    energy_unit: str = "eV",
    length_unit: str = "Å",
    keys: Mapping[str, str] | None = None,
) -> StructureSet:
    """Read a nequip-style npz file of one molecule's trajectory (e.g. ``md17_mdbenchgnn/*/nequip_npz.npz``).

    Keys used (renamable with ``keys``, a mapping from the names below to the file's names):
    ``atomic_numbers`` ``[N]`` or ``[n, N]``, ``pos`` ``[n, N, 3]``, ``energy`` ``[n]`` or ``[n, 1]``
    (optional), ``forces`` ``[n, N, 3]`` (optional), ``pbc`` ``[3]`` and ``cell`` ``[3, 3]`` (optional).
    The cell is kept only when ``pbc`` has a True entry (a dummy box with pbc all False is dropped).

    Note: the MDBENCHGNN copy of MD17 (Chmiela et al., Sci. Adv. 3, e1603015 (2017)) was converted with
    a truncated factor of 0.04336 eV per kcal/mol; it is read as stored (eV).

    Returns:
      A :class:`StructureSet` in Å, eV, eV/Å (float64).

    Raises:
      DataError: unknown unit, missing file or key, corrupt archive, positions, energies or forces stored as
        integers or float16, inconsistent shapes, NaN positions.
    """
    e_fac, l_fac = energy_factor(energy_unit), length_factor(length_unit)
    names = {k: k for k in ("atomic_numbers", "pos", "energy", "forces", "pbc", "cell")}
    if keys:
        unknown = set(keys) - set(names)
        if unknown:
            raise DataError(f"unknown key mapping entries {sorted(unknown)}; known: {sorted(names)}")
        names.update(keys)
    d = _load_npz(
        path,
        (names["atomic_numbers"], names["pos"]),
        (names["energy"], names["forces"], names["pbc"], names["cell"]),
    )
    s = _frames(
        path,
        d[names["atomic_numbers"]],
        d[names["pos"]],
        d.get(names["energy"]),
        d.get(names["forces"]),
        e_fac,
        l_fac,
        (names["pos"], names["energy"], names["forces"]),
    )
    pbc = d.get(names["pbc"])
    if pbc is None:
        return s
    with _about(path):
        pbc = _numeric("pbc", pbc, "biu")
        if pbc.shape not in ((3,), (len(s), 3)):
            raise DataError(f"pbc has shape {pbc.shape}, expected (3,) or ({len(s)}, 3)")
    if not np.any(pbc):
        return s
    with _about(path):
        cell = d.get(names["cell"])
        if cell is None:
            raise DataError("pbc is set but there is no cell")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf: refused by StructureSet
            cell = _numeric("cell", cell).astype(np.float64) * l_fac
        n = len(s)
        if cell.shape == (3, 3):
            cell = np.broadcast_to(cell, (n, 3, 3))
        if pbc.shape == (3,):
            pbc = np.broadcast_to(pbc, (n, 3))
        return StructureSet(
            atomic_numbers=s.atomic_numbers,
            positions=s.positions,
            n_atoms=s.n_atoms,
            cell=cell,
            pbc=pbc,
            energy=s.energy,
            forces=s.forces,
        )


def read_ase(
    path: PathLike,
    index: str | int | slice = ":",
    energy_unit: str = "eV",
    length_unit: str = "Å",
    format: str | None = None,
    require_labels: bool = False,
) -> StructureSet:
    """Read anything :func:`ase.io.read` reads (extended XYZ, ASE db, VASP OUTCAR, ...).

    Labels are taken from each frame's calculator results (``energy`` or ``free_energy``, ``forces``,
    ``stress``); for extended XYZ, ase puts ``energy=``/``stress=`` from the comment line and a
    ``forces`` column there. See :meth:`StructureSet.from_atoms` for which labels are kept.

    ase labels everything as eV/Å, but some files are not (the SchNetPack MD17 extxyz files are in
    kcal/mol): give the true units with ``energy_unit`` and ``length_unit``. Positions and cell are
    scaled by the length factor, energies by the energy factor, forces by energy/length and stress by
    energy/length³.

    Args:
      path: the file.
      index: ase's frame selection (``":"`` all, an int, a slice or a string like ``"10:20"``).
      energy_unit: one of :data:`ENERGY_UNITS`.
      length_unit: one of :data:`LENGTH_UNITS`.
      format: ase format name, or None to let ase guess from the file.
      require_labels: raise when a frame has no energy or forces.

    Returns:
      A :class:`StructureSet` (float64; Å, eV, eV/Å, eV/Å³).

    These formats carry no checksum, so not every damage can be detected (a changed digit of a coordinate
    reads as a valid number); what is checked: every value is finite, forces have one row of three per
    atom, and no two atoms are closer than :data:`~equiforce.data.neighbours.MIN_PAIR_DISTANCE` (0.5 Å,
    periodic images included).

    Raises:
      DataError: unknown unit, missing or unparsable file, no frames, empty structures, NaN or inf values,
        forces of the wrong shape, overlapping atoms (naming the structure and both atoms).
    """
    import ase.io

    e_fac, l_fac = energy_factor(energy_unit), length_factor(length_unit)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        frames = ase.io.read(path, index=index, format=format)
    except DataError:
        raise
    except Exception as err:  # ase raises many types for bad files
        raise DataError(f"{path}: ase.io.read failed ({type(err).__name__}: {err})") from err
    if not isinstance(frames, list):
        frames = [frames]
    with _about(path):
        if not frames:
            raise DataError("no structures in file")
        s = StructureSet.from_atoms(frames, require_labels=require_labels)
        if e_fac != 1.0 or l_fac != 1.0:
            s = _converted(s, e_fac, l_fac)
        # text and ASE db files carry no checksum: check what a damaged one can still be caught by (finite values
        # and the forces' shape are checked by StructureSet)
        check_no_overlap(s)
        return s


def _converted(s: StructureSet, e_fac: float, l_fac: float) -> StructureSet:
    """``s`` with energies multiplied by ``e_fac`` and lengths by ``l_fac`` (forces by their ratio, stress by
    e/l³)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf: refused by StructureSet
        return StructureSet(
            atomic_numbers=s.atomic_numbers,
            positions=s.positions * l_fac,
            n_atoms=s.n_atoms,
            cell=s.cell * l_fac,
            pbc=s.pbc,
            energy=None if s.energy is None else s.energy * e_fac,
            forces=None if s.forces is None else s.forces * (e_fac / l_fac),
            stress=None if s.stress is None else s.stress * (e_fac / l_fac**3),
        )


_NPZ_LAYOUTS: dict[str, tuple[str, ...]] = {
    "rmd17": ("nuclear_charges", "coords"),
    "md17": ("z", "R"),
    "nequip": ("atomic_numbers", "pos"),
}


def read_structures(path: PathLike, format: str | None = None, **kwargs: Any) -> StructureSet:
    """Read a structure file of any supported kind; this is what a training config calls.

    Dispatch (``format`` overrides it):

    * ``.h5``/``.hdf5`` → :func:`equiforce.data.hdf5.read_hdf5` (``format="hdf5"``; kwargs: ``indices``).
    * ``.npz`` → by keys: ``nuclear_charges, coords`` → :func:`read_rmd17_npz` (``"rmd17"``);
      ``z, R`` → :func:`read_md17_npz` (``"md17"``); ``atomic_numbers, pos`` → :func:`read_nequip_npz`
      (``"nequip"``).
    * a folder holding ``type.raw`` (or DeePMD systems below it) → :func:`equiforce.data.deepmd.read_deepmd`
      (``format="deepmd"``; kwargs: ``type_map``, ``energy_unit``, ``length_unit``).
    * anything else → :func:`read_ase` (``format="ase"`` lets ase guess; any other ``format`` is an
      ase format name passed to :func:`ase.io.read`).

    Keyword arguments go to the chosen reader (e.g. ``energy_unit="kcal/mol"``).

    Returns:
      A :class:`StructureSet` in ASE units.

    Raises:
      DataError: unknown npz layout, missing or corrupt file, no structures, unknown unit, bad data (the
        message names the file and, for a bad value, the structure (frame) and atom, 0-based).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = format.lower() if format else None
    if fmt in ("hdf5", "h5") or (fmt is None and suffix in (".h5", ".hdf5")):
        from equiforce.data.hdf5 import read_hdf5

        s = read_hdf5(path, **kwargs)
        if len(s) == 0 and kwargs.get("indices") is None:
            raise DataError(f"{path}: the file holds no structures")
        return s
    if fmt == "deepmd" or (fmt is None and path.is_dir()):
        from equiforce.data.deepmd import read_deepmd

        return read_deepmd(path, **kwargs)
    if fmt is None and suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        keys = _npz_keys(path)
        fmt = next((name for name, req in _NPZ_LAYOUTS.items() if set(req) <= keys), None)
        if fmt is None:
            raise DataError(
                f"{path}: unknown npz layout with keys {sorted(keys)}; expected rMD17 (nuclear_charges, "
                "coords, energies, forces), MD17/sGDML (z, R, E, F) or nequip (atomic_numbers, pos, ...)"
            )
    if fmt == "rmd17":
        if kwargs:
            raise DataError(f"read_rmd17_npz takes no options, got {sorted(kwargs)} (its units are fixed)")
        return read_rmd17_npz(path)
    if fmt == "md17":
        return read_md17_npz(path, **kwargs)
    if fmt == "nequip":
        return read_nequip_npz(path, **kwargs)
    return read_ase(path, format=None if fmt == "ase" else format, **kwargs)


def sample_path(name: str) -> Path:
    """Path of a file shipped in ``equiforce.data.sample`` (e.g. ``"rmd17_aspirin_train_01.npz"``).

    Raises:
      DataError: no such sample file (the message lists the available ones).
    """
    root = resources.files(SAMPLE_PACKAGE)
    item = root.joinpath(name)
    if not item.is_file():
        available = sorted(p.name for p in root.iterdir() if p.name.endswith(".npz"))
        raise DataError(f"no shipped sample named {name!r}; available: {available}")
    return Path(str(item))


def load_sample(split: str = "train") -> StructureSet:
    """The shipped real-DFT samples of rMD17 (official split 01).

    Args:
      split: ``"train"`` / ``"test"``: aspirin (1000 frames each, 21 atoms); ``"salicylic:train"`` /
        ``"salicylic:test"``: salicylic acid, the first 100 / 200 frames of its split-01 files (16 atoms;
        the same elements as aspirin: for fine-tuning and distribution-shift tests).

    Returns:
      A :class:`StructureSet` in eV, eV/Å, Å (see :func:`read_rmd17_npz`). Source: andersx/rmd17-npz
      (CC0 1.0); Christensen & von Lilienfeld, arXiv:2007.09593.

    Raises:
      DataError: an unknown ``split``.
    """
    files = {
        "train": "rmd17_aspirin_train_01.npz",
        "test": "rmd17_aspirin_test_01.npz",
        "aspirin:train": "rmd17_aspirin_train_01.npz",
        "aspirin:test": "rmd17_aspirin_test_01.npz",
        "salicylic:train": "rmd17_salicylic_train_01_first100.npz",
        "salicylic:test": "rmd17_salicylic_test_01_first200.npz",
    }
    if split not in files:
        raise DataError(f"split must be one of {sorted(files)}, got {split!r}")
    return read_rmd17_npz(sample_path(files[split]))
