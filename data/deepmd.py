"""Reader for DeePMD-kit training data (``deepmd/npy`` and ``deepmd/raw``) → :class:`StructureSet`.

Format (DeePMD-kit documentation, "Data → System", ``doc/data/system.md`` of github.com/deepmodeling/deepmd-kit;
the same layout is written by ``dpdata``'s ``deepmd/npy`` and ``deepmd/raw`` formats). A *system* is a folder
holding frames of one composition and atom order::

    type.raw          Natoms integers (whitespace separated), indices into the type map, starting at 0
    type_map.raw      Ntypes names (whitespace separated); here they must be element symbols ("Li P S")
    nopbc             optional; if present the system is not periodic
    set.000/          frames in NumPy .npy files (deepmd/npy); more sets: set.001, ...
      coord.npy       [nframes, Natoms*3]  Cartesian positions, Å
      box.npy         [nframes, 9]         lattice vectors as rows, order XX XY XZ YX YY YZ ZX ZY ZZ, Å
                                           (required unless ``nopbc``)
      energy.npy      [nframes]            total energy, eV                     (optional)
      force.npy       [nframes, Natoms*3]  forces, eV/Å                         (optional)
      virial.npy      [nframes, 9]         virial, eV, order XX XY ... ZZ       (optional)

Without ``set.*`` folders the same arrays are read from text files in the system folder
(``coord.raw``, ``box.raw``, ``energy.raw``, ``force.raw``, ``virial.raw``; deepmd/raw: one frame per line).

Units: DeePMD-kit's convention is Å, eV, eV/Å and eV for the virial. **Virial sign:** DeePMD's virial is
``W = −∂E/∂ε`` (ε a homogeneous strain of cell and positions), so ``W = −σ·V`` with σ the stress in ASE's
sign (positive = tensile, ``σ = (1/V) ∂E/∂ε``) and V the cell volume, and the (virial part of the) pressure
is ``tr(W)/(3V)``: positive for a compressed cell. This reader stores ``σ = −W/V`` in ASE's Voigt order
(xx, yy, zz, yz, xz, xy) from the symmetric part of W. (The same convention: nequip's
``VirialToStressTransform``, τ = −σ·Ω; dpdata's conversion of VASP stress; the LiPS20 copy in
``../shared/data/lips20`` has ``tr(W)/(3V)`` = +0.1 … +4.2 GPa for fixed-volume AIMD at 3000 K.)

Frames with a virial but ``nopbc`` have no volume: the virial is then an error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from equiforce.data.checks import check_float_array, check_shape
from equiforce.data.errors import DataError
from equiforce.data.neighbours import check_no_overlap
from equiforce.data.structures import StructureSet, full_3x3_to_voigt
from equiforce.data.units import energy_factor, length_factor

__all__ = ["find_deepmd_systems", "is_deepmd_folder", "read_deepmd", "read_deepmd_system"]

PathLike = str | os.PathLike

_LABELS = ("energy", "force", "virial")


def is_deepmd_folder(path: PathLike) -> bool:
    """True when ``path`` is a folder holding a DeePMD system (``type.raw``) or systems below it."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / "type.raw").is_file() or any(path.rglob("type.raw"))


def find_deepmd_systems(path: PathLike) -> list[Path]:
    """The DeePMD system folders at or below ``path`` (folders holding ``type.raw``), sorted.

    Raises:
      DataError: ``path`` is not a folder, or no ``type.raw`` lies in it or below it.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (a DeePMD system is a folder holding type.raw)")
    if (path / "type.raw").is_file():
        return [path]
    systems = sorted(p.parent for p in path.rglob("type.raw") if p.is_file())
    if not systems:
        raise DataError(f"{path}: no type.raw in this folder or below it; not DeePMD data")
    return systems


def _read_text_tokens(file: Path) -> list[str]:
    try:
        return file.read_text().split()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read ({type(err).__name__}: {err})") from err


def _atomic_numbers(system: Path, type_map: Sequence[str] | None) -> np.ndarray:
    """``[Natoms]`` atomic numbers from type.raw and type_map.raw (or the ``type_map`` argument)."""
    from ase.data import atomic_numbers as symbol_to_z

    type_file = system / "type.raw"
    tokens = _read_text_tokens(type_file)
    if not tokens:
        raise DataError(f"{type_file}: empty (no atoms)")
    try:
        types = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        raise DataError(f"{type_file}: entries must be integer type indices, got {tokens[:5]}...") from None
    if types.min() < 0:
        raise DataError(f"{type_file}: negative type index {int(types.min())}")
    map_file = system / "type_map.raw"
    if type_map is None:
        if not map_file.is_file():
            raise DataError(
                f"{map_file}: missing; the element of each type index is unknown (pass type_map=['O', 'H', ...])"
            )
        names = _read_text_tokens(map_file)
        source = str(map_file)
    else:
        names = [str(n) for n in type_map]
        source = "type_map argument"
    if types.max() >= len(names):
        raise DataError(
            f"{type_file}: type index {int(types.max())} but {source} lists only {len(names)} types {names}"
        )
    z_of_type = []
    for name in names:
        if name not in symbol_to_z or symbol_to_z[name] == 0:
            raise DataError(f"{source}: {name!r} is not an element symbol (needed for the atomic numbers)")
        z_of_type.append(symbol_to_z[name])
    return np.asarray(z_of_type, dtype=np.int64)[types]


def _load_array(file: Path) -> np.ndarray:
    """The array of a ``.npy`` file as stored, or of a ``.raw`` text file as float64 (one frame per row)."""
    try:
        if file.suffix == ".npy":
            arr = np.load(file, allow_pickle=False)
        else:
            arr = np.loadtxt(file, ndmin=2, dtype=np.float64)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{file}: cannot read ({type(err).__name__}: {err})") from err
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{file}: not a numeric array (dtype {arr.dtype})")
    return arr


def _frames_of(file: Path, arr: np.ndarray, n_frames: int | None, shape: tuple[int, ...], label: bool) -> np.ndarray:
    """The rows of ``arr`` as float64 ``[n_frames, prod(shape)]``: ``arr`` must be ``[n_frames, prod(shape)]``
    (DeePMD's layout) or ``[n_frames, *shape]``; ``n_frames`` None: any. ``label``: positions or a label, which
    must be stored as float32 or wider (:func:`~equiforce.data.checks.check_float_array`)."""
    if arr.ndim == 0 or arr.size == 0:
        raise DataError(f"{file}: empty array")
    n = "nframes" if n_frames is None else n_frames
    per_frame = int(np.prod(shape))
    shapes = [(n, per_frame), (n, *shape)] if len(shape) > 1 or per_frame > 1 else [(n,), (n, 1)]
    if label:
        check_float_array(str(file), arr, shapes)
    else:
        check_shape(str(file), arr.shape, shapes)
    return np.asarray(arr, dtype=np.float64).reshape(arr.shape[0], per_frame)


def _read_block(
    folder: Path, ext: str, n_atoms: int, periodic: bool, e_fac: float, l_fac: float
) -> dict[str, np.ndarray | None]:
    """One ``set.*`` folder (``ext=".npy"``) or the system folder's raw files (``ext=".raw"``)."""
    coord_file = folder / f"coord{ext}"
    if not coord_file.is_file():
        raise DataError(f"{coord_file}: missing (every set needs coordinates)")
    pos = _frames_of(coord_file, _load_array(coord_file), None, (n_atoms, 3), True).reshape(-1, n_atoms, 3) * l_fac
    n = pos.shape[0]
    box_file = folder / f"box{ext}"
    cell = np.zeros((n, 3, 3))
    if periodic:
        if not box_file.is_file():
            raise DataError(f"{box_file}: missing (a periodic system needs its cell; add a 'nopbc' file if it is not)")
        cell = _frames_of(box_file, _load_array(box_file), n, (3, 3), False).reshape(n, 3, 3) * l_fac
        if not np.all(np.isfinite(cell)):
            raise DataError(f"{box_file}: NaN or inf in the cell")
        volume = np.abs(np.linalg.det(cell))
        if np.any(volume < 1e-9):
            raise DataError(f"{box_file}: singular cell in frame {int(np.argmin(volume))}")
    out: dict[str, np.ndarray | None] = {"positions": pos, "cell": cell}
    per_frame = {"energy": (1,), "force": (n_atoms, 3), "virial": (3, 3)}
    factor = {"energy": e_fac, "force": e_fac / l_fac, "virial": e_fac}
    for label in _LABELS:
        file = folder / f"{label}{ext}"
        if not file.is_file():
            out[label] = None
            continue
        arr = _frames_of(file, _load_array(file), n, per_frame[label], True) * factor[label]
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{file}: NaN or inf")
        out[label] = arr
    if out["virial"] is not None:
        file = folder / f"virial{ext}"
        if not periodic:
            raise DataError(f"{file}: a virial in a non-periodic (nopbc) system has no volume to make a stress of")
        w = out["virial"].reshape(n, 3, 3)
        w = 0.5 * (w + np.swapaxes(w, 1, 2))
        volume = np.abs(np.linalg.det(cell))
        out["stress"] = full_3x3_to_voigt(-w / volume[:, None, None])  # σ = −W/V (ASE sign)
    else:
        out["stress"] = None
    return out


def read_deepmd_system(
    path: PathLike,
    *,
    type_map: Sequence[str] | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Å",
) -> StructureSet:
    """Read one DeePMD system folder (holding ``type.raw``); see the module docstring for the format.

    Args:
      path: the system folder.
      type_map: element symbols of the type indices, overriding ``type_map.raw``.
      energy_unit, length_unit: units of the files if they do not follow DeePMD's eV and Å
        (see :data:`equiforce.data.units.ENERGY_UNITS` / ``LENGTH_UNITS``); forces are converted by
        energy/length and the virial by energy, so stress comes out in eV/Å³.

    Returns:
      A :class:`StructureSet` (float64): positions Å, cell Å (rows), pbc all True (all False with
      ``nopbc``), energy eV ``[n]``, forces eV/Å, stress ``[n, 6]`` eV/Å³ (ASE sign and Voigt order,
      ``σ = −W/V``) where ``virial`` files exist (NaN rows for sets without one), else None.

    Raises:
      DataError: a missing ``type.raw``/``type_map.raw``/``coord``/``box`` file, a type name that is not an
        element, coordinates, energies, forces or virials stored as integers or float16 (``.npy``), an array
        whose shape is neither ``[nframes, Natoms*3]`` nor ``[nframes, Natoms, 3]`` (coordinates, forces),
        ``[nframes]`` / ``[nframes, 1]`` (energy) or ``[nframes, 9]`` / ``[nframes, 3, 3]`` (box, virial), a singular
        cell, NaN/inf values, two atoms closer than 0.5 Å (periodic images included), a label present in some
        sets but not others (energy, forces), or no frames.
    """
    e_fac, l_fac = energy_factor(energy_unit), length_factor(length_unit)
    system = Path(path)
    if not (system / "type.raw").is_file():
        raise DataError(f"{system / 'type.raw'}: missing; not a DeePMD system folder")
    z = _atomic_numbers(system, type_map)
    periodic = not (system / "nopbc").exists()
    sets = sorted(p for p in system.glob("set.*") if p.is_dir())
    if sets:
        blocks = [(s, _read_block(s, ".npy", z.size, periodic, e_fac, l_fac)) for s in sets]
    elif (system / "coord.raw").is_file():
        blocks = [(system, _read_block(system, ".raw", z.size, periodic, e_fac, l_fac))]
    else:
        raise DataError(f"{system}: no set.* folder (deepmd/npy) and no coord.raw (deepmd/raw): no frames")
    for label, name in (("energy", "energy"), ("force", "forces")):
        have = [b[label] is not None for _, b in blocks]
        if any(have) and not all(have):
            lacking = [str(s) for (s, _), h in zip(blocks, have, strict=True) if not h]
            raise DataError(f"{name} ({label}.npy/.raw) missing in {lacking} but present in other sets of {system}")
    pos = np.concatenate([b["positions"] for _, b in blocks])
    n = pos.shape[0]
    has_e = blocks[0][1]["energy"] is not None
    has_f = blocks[0][1]["force"] is not None
    has_s = any(b["stress"] is not None for _, b in blocks)
    stress = None
    if has_s:
        stress = np.concatenate(
            [b["stress"] if b["stress"] is not None else np.full((len(b["positions"]), 6), np.nan) for _, b in blocks]
        )
    try:
        s = StructureSet(
            atomic_numbers=np.tile(z, n),
            positions=pos.reshape(-1, 3),
            n_atoms=np.full(n, z.size, dtype=np.int64),
            cell=np.concatenate([b["cell"] for _, b in blocks]),
            pbc=np.full((n, 3), periodic),
            energy=np.concatenate([b["energy"].reshape(-1) for _, b in blocks]) if has_e else None,
            forces=np.concatenate([b["force"].reshape(-1, 3) for _, b in blocks]) if has_f else None,
            stress=stress,
        )
        check_no_overlap(s)  # .npy and .raw sets carry no checksum: a damaged coordinate often overlaps atoms
    except DataError as err:
        raise DataError(f"{system}: {err}") from err
    return s


def read_deepmd(
    path: PathLike,
    *,
    type_map: Sequence[str] | None = None,
    energy_unit: str = "eV",
    length_unit: str = "Å",
) -> StructureSet:
    """Read DeePMD-kit data: one system folder (holding ``type.raw``) or every system below a folder.

    Several systems (e.g. ``lips20/`` with one system per composition) are concatenated in sorted path
    order; energy and forces must be present in all of them, stress is NaN (masked in training) for
    systems without a virial. Format, units and the virial sign: see the module docstring.

    Args:
      path: a system folder or a folder with systems below it.
      type_map: see :func:`read_deepmd_system`.
      energy_unit: see :func:`read_deepmd_system`.
      length_unit: see :func:`read_deepmd_system`.

    Returns:
      A :class:`StructureSet` in Å, eV, eV/Å, eV/Å³ (float64).

    Raises:
      DataError: see :func:`read_deepmd_system`; also no system found, or energy/forces labels in some
        systems but not in others.
    """
    systems = find_deepmd_systems(path)
    parts = [
        read_deepmd_system(s, type_map=type_map, energy_unit=energy_unit, length_unit=length_unit) for s in systems
    ]
    if len(parts) == 1:
        return parts[0]
    for label in ("energy", "forces"):
        have = [getattr(p, label) is not None for p in parts]
        if any(have) and not all(have):
            lacking = [str(s) for s, h in zip(systems, have, strict=True) if not h]
            raise DataError(f"{path}: {label} labels missing in systems {lacking} but present in others")
    if any(p.stress is not None for p in parts):
        parts = [p if p.stress is not None else _with_nan_stress(p) for p in parts]
    return StructureSet.concatenate(parts)


def _with_nan_stress(s: StructureSet) -> StructureSet:
    return dataclasses.replace(s, stress=np.full((len(s), 6), np.nan))
