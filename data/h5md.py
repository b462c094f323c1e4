"""The H5MD 1.1 trajectory format of equiforce: :class:`H5MDWriter`, :func:`read_h5md`, the restart state stored
in the same file, and the repair of a file left by a killed writer.

Written by MD (:mod:`equiforce.md`, once per chunk of steps, with NumPy arrays of ``F`` frames; the writer takes
exactly the frames it is given: striding is the engine's job), read by MD's restart, by
:mod:`equiforce.uncertainty.select` and by the command line (``equiforce md --repair``). Units are ASE's, except
time (ps) and velocities (Å/ps, :data:`ASE_VELOCITY_TO_A_PER_PS`):

=================  ==========================  ====================================================
quantity           unit                        notes
=================  ==========================  ====================================================
positions, box     Å                           box: lattice vectors as rows, ``[3, 3]``
velocities         Å/ps                        ASE velocity × ``1000 * ase.units.fs``
forces             eV/Å
energies           eV                          potential, kinetic, total, conserved
temperature        K
pressure           eV/Å³                       ``unit="eV Angstrom-3"``
volume             Å³
time               ps
masses             amu (H5MD unit ``"u"``)
=================  ==========================  ====================================================

Layout (https://www.nongnu.org/h5md/h5md.html)::

    /h5md                      attrs version=[1, 1]
    /h5md/author               attrs name
    /h5md/creator              attrs name="equiforce", version
    /h5md/modules/units        attrs version=[1, 0]
    /particles/all/species     int32 [N]      atomic numbers (time-independent)
    /particles/all/mass        float64 [N]    amu, attr unit="u"
    /particles/all/box         attrs dimension=3, boundary=[b"periodic" | b"none"] * 3
    /particles/all/box/edges   time-dependent [F, 3, 3], Å  (only when any(pbc))
    /particles/all/position    time-dependent [F, N, 3], Å
    /particles/all/velocity    time-dependent [F, N, 3], Å/ps
    /particles/all/force       time-dependent [F, N, 3], eV/Å  (only with forces=True)
    /observables/<name>        time-dependent [F]  (potential_energy, kinetic_energy, total_energy,
                               temperature, [pressure, volume], [conserved_energy], ...)
    /equiforce                 attrs format="equiforce-h5md", format_version=1
    /equiforce/committed_frames  int64 scalar: number of committed frames
    /equiforce/restart/active    int64 scalar: slot holding the latest restart state (-1: none)
    /equiforce/restart/slot0|1   one dataset per state array + ``meta_json`` (uint8, JSON padded
                                 with spaces)

A time-dependent element is a group holding ``step`` (int64 ``[F]``), ``time`` (float64 ``[F]``,
attr ``unit="ps"``) and ``value`` (float64, attr ``unit``), all chunked and resizable along the frame
axis. Box ``edges`` follow H5MD's triclinic convention: the *rows* of the ``[3, 3]`` matrix are the
edge (lattice) vectors, exactly ASE's ``atoms.cell[:]``. H5MD ``boundary`` is per Cartesian
dimension; we write ASE's per-lattice-vector ``pbc`` there (the same thing for orthorhombic cells).

Crash safety (what is guaranteed)
---------------------------------
* The file is written with ``libver="latest"`` in SWMR mode (``swmr=True``, the default) once all
  datasets exist. HDF5 then orders its metadata writes so that the file on disk is always a valid
  HDF5 file, also after the writer is killed, and other processes can read it while it is written
  (``read_h5md`` does this).
* :meth:`H5MDWriter.write` appends the frames, flushes, then sets ``committed_frames`` and flushes
  again. Readers use only the first ``committed_frames`` frames; datasets may be longer after a kill
  mid-write. A kill therefore loses at most the chunk being written.
* :meth:`H5MDWriter.write_restart_state` writes the state into the inactive one of two slots,
  flushes, then flips ``restart/active`` and flushes: a kill mid-write keeps the previous state.
  The first call (or a call whose arrays change shape/dtype/keys) briefly leaves SWMR mode to create
  datasets (SWMR forbids creating objects); a kill in that window leaves a file HDF5 refuses to
  open until its consistency flags are cleared (``h5clear -s``, or :func:`clear_stale_write_flags`,
  which ``equiforce md --restart`` calls).
* A file killed while open (consistency flags set) can be read by :func:`read_h5md` (it falls back
  to an SWMR read) but plain ``h5py.File(path)`` refuses it; ``H5MDWriter(..., mode="a")`` recovers
  it by copying it to a fresh file (cost: one copy of the file) and continues.
  :func:`repair_h5md` (``equiforce md --repair FILE``) does the same without continuing: afterwards
  plain h5py, MDAnalysis and any HDF5 reader open the file, and it holds exactly the committed frames.
  **What a kill leaves behind:** the committed frames (all but at most the chunk being written), the
  restart state of the last or second-to-last committed frame, possibly an uncommitted tail of
  frames (ignored by :func:`read_h5md`, dropped by ``mode="a"`` and by :func:`repair_h5md`) and, in
  SWMR mode, the consistency flags.
* With ``swmr=False`` the file uses h5py's default (oldest compatible) format, which has no
  consistency flags: it opens anywhere after a kill, but a kill during a flush can corrupt it.
* Never open a file with ``mode="a"`` (or ``"w"``) while another process is writing it.

Errors: bad or inconsistent input and corrupt, foreign or mismatched files raise
:class:`~equiforce.data.errors.DataError` (a ``ValueError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from ase import units

from equiforce import __version__, faults
from equiforce.atomic import atomic_path
from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet

__all__ = [
    "ASE_VELOCITY_TO_A_PER_PS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OBSERVABLE_UNITS",
    "H5MDWriter",
    "NoRestartStateError",
    "clear_stale_write_flags",
    "is_h5md",
    "read_h5md",
    "read_h5md_structures",
    "read_restart_state",
    "repair_h5md",
]

PathLike = str | os.PathLike

FORMAT_NAME = "equiforce-h5md"
FORMAT_VERSION = 1
H5MD_VERSION = (1, 1)

#: Multiply an ASE velocity (Å per ASE time unit, ``ase.units.fs`` ASE time units per fs) by this to
#: get Å/ps (about 98.23); divide an Å/ps velocity by it to get ASE's.
ASE_VELOCITY_TO_A_PER_PS = 1000.0 * units.fs

#: H5MD unit strings of the known observables (values are stored as handed in, in these units).
OBSERVABLE_UNITS: dict[str, str] = {
    "potential_energy": "eV",
    "kinetic_energy": "eV",
    "total_energy": "eV",
    "temperature": "K",
    "pressure": "eV Angstrom-3",
    "volume": "Angstrom3",
    "conserved_energy": "eV",
    "dt": "ps",  # time between frames: MDAnalysis takes its Timestep.dt from an observable of this name
    "energy_uncertainty": "eV",  # calibrated σ_E (potentials with an uncertainty)
    "max_forces_uncertainty": "eV Angstrom-1",  # largest calibrated σ_F over the atoms
}
_BASE_OBSERVABLES = ("potential_energy", "kinetic_energy", "total_energy", "temperature")
_PERIODIC_OBSERVABLES = ("pressure", "volume")
_RESERVED_META_KEY = "committed_frames"
_EQ_UNITS = {
    "length": "Å",
    "time": "ps",
    "velocity": "Å/ps",
    "force": "eV/Å",
    "energy": "eV",
    "mass": "amu",
    "temperature": "K",
    "pressure": "eV/Å^3",
    "box": "lattice vectors as rows",
}


class NoRestartStateError(DataError):
    """An equiforce H5MD file that holds no restart state yet (e.g. killed while writing the first one)."""


# ============================================================================ H5MD helpers


@contextmanager
def _h5_errors(path: PathLike, what: str) -> Iterator[None]:
    """Turn h5py/OS errors into a DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        raise DataError(f"{path}: cannot {what} H5MD file ({type(err).__name__}: {err})") from err


def _flags_set(err: OSError) -> bool:
    msg = str(err)
    return "already open for" in msg or "consistency flags" in msg


def _open_read(path: Path) -> tuple[h5py.File, bool]:
    """Open for reading; fall back to an SWMR read for a file being written or left by a killed writer.

    Returns:
      ``(file, clean)``: clean is False when the file carries a writer's consistency flags.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r"), True
    except OSError as err:
        if not _flags_set(err):
            raise DataError(f"{path}: not a readable HDF5 file ({err})") from err
        try:
            return h5py.File(path, "r", libver="latest", swmr=True), False
        except OSError as err2:
            raise DataError(
                f"{path}: the file is open for writing (or was left so by a killed process outside SWMR "
                f"mode) and cannot be read; if no process is writing it, run `h5clear -s {path}` ({err2})"
            ) from err2


def _decode(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _check_format(f: h5py.File, path: PathLike) -> int:
    """Validate an equiforce H5MD file; return the committed frame count."""
    if "h5md" not in f or "particles" not in f:
        raise DataError(f"{path}: not an H5MD file (no /h5md or /particles group)")
    version = np.asarray(f["h5md"].attrs.get("version", [])).tolist()
    if len(version) != 2 or version[0] != H5MD_VERSION[0]:
        raise DataError(f"{path}: unsupported H5MD version {version}, expected {list(H5MD_VERSION)}")
    eq = f.get("equiforce")
    fmt = _decode(eq.attrs.get("format")) if isinstance(eq, h5py.Group) else None
    if fmt != FORMAT_NAME:
        raise DataError(f"{path}: H5MD file not written by equiforce (no /equiforce group with format={FORMAT_NAME!r})")
    fv = int(eq.attrs.get("format_version", -1))
    if fv > FORMAT_VERSION or fv < 1:
        raise DataError(f"{path}: equiforce H5MD format_version {fv} not supported (this equiforce: {FORMAT_VERSION})")
    if "committed_frames" not in eq or "all" not in f["particles"]:
        raise DataError(f"{path}: corrupt equiforce H5MD file (missing committed_frames or particles/all)")
    n = int(eq["committed_frames"][()])
    if n < 0:
        raise DataError(f"{path}: corrupt committed_frames {n}")
    return n


def _read_particles(f: h5py.File, path: PathLike) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the file; return its committed frame count, species (int32 ``[N]``), masses (float64 ``[N]``,
    amu) and pbc (bool, one per ``boundary`` entry)."""
    n = _check_format(f, path)
    allp = f["particles/all"]
    if not all(isinstance(allp.get(k), h5py.Dataset) for k in ("species", "mass")) or not isinstance(
        allp.get("box"), h5py.Group
    ):
        raise DataError(f"{path}: corrupt file (missing particles/all/species, mass or box)")
    boundary = [_decode(b) for b in np.asarray(allp["box"].attrs.get("boundary", [])).tolist()]
    species = np.asarray(allp["species"][()], dtype=np.int32)
    masses = np.asarray(allp["mass"][()], dtype=np.float64)
    return n, species, masses, np.array([b == "periodic" for b in boundary], dtype=bool)


def _td_layout(
    n_atoms: int, periodic: bool, forces: bool, observables: Iterable[str]
) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """The time-dependent elements of a file: path -> (frame shape, H5MD unit). The one description of the
    layout, used to create a file, to check it (reading, appending) and to cut its frames."""
    out: dict[str, tuple[tuple[int, ...], str | None]] = {
        "particles/all/position": ((n_atoms, 3), "Angstrom"),
        "particles/all/velocity": ((n_atoms, 3), "Angstrom ps-1"),
    }
    if forces:
        out["particles/all/force"] = ((n_atoms, 3), "eV Angstrom-1")
    if periodic:
        out["particles/all/box/edges"] = ((3, 3), "Angstrom")
    for name in observables:
        out[f"observables/{name}"] = ((), OBSERVABLE_UNITS.get(name))
    return out


def _file_layout(f: h5py.File) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """:func:`_td_layout` of the elements an existing file declares (its species, box, force, observables)."""
    allp = f["particles/all"]
    if "observables" not in f:
        raise DataError(f"{f.filename}: corrupt file (missing observables group)")
    return _td_layout(allp["species"].shape[0], "edges" in allp["box"], "force" in allp, f["observables"].keys())


def _resize_frames(groups: Iterable[h5py.Group], n: int) -> None:
    """Cut (or grow) the ``step``/``time``/``value`` datasets of time-dependent elements to ``n`` frames."""
    for g in groups:
        for ds in ("step", "time", "value"):
            if g[ds].shape[0] != n:
                g[ds].resize(n, axis=0)


def _check_td(f: h5py.File, element: str, path: PathLike, n: int, tail: tuple[int, ...]) -> None:
    """The element is a group of ``step``, ``time``, ``value`` with at least ``n`` frames of shape ``tail``."""
    g = f.get(element)
    if not isinstance(g, h5py.Group):
        raise DataError(f"{path}: corrupt file (missing {element})")
    for ds in ("step", "time", "value"):
        if not isinstance(g.get(ds), h5py.Dataset):
            raise DataError(f"{path}: time-dependent element {g.name} lacks dataset {ds!r}")
        if g[ds].shape[0] < n:
            raise DataError(f"{path}: {g.name}/{ds} has {g[ds].shape[0]} frames, fewer than committed {n}")
    if tuple(g["value"].shape[1:]) != tail:
        raise DataError(f"{path}: {g.name}/value has shape {g['value'].shape}, expected (frames, *{tail})")


def _frame_chunk(frame_shape: tuple[int, ...]) -> int:
    """Frames per chunk: about 1 MiB of float64, at least 1, at most 1024."""
    per_frame = 8 * int(np.prod(frame_shape, dtype=np.int64)) if frame_shape else 8
    return int(min(1024, max(1, (1 << 20) // max(per_frame, 1))))


def _create_td(parent: h5py.Group, name: str, frame_shape: tuple[int, ...], unit: str | None) -> None:
    g = parent.create_group(name)
    c = _frame_chunk(frame_shape)
    g.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.int64)
    t = g.create_dataset("time", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=np.float64)
    t.attrs["unit"] = "ps"
    v = g.create_dataset(
        "value", shape=(0, *frame_shape), maxshape=(None, *frame_shape), chunks=(c, *frame_shape), dtype=np.float64
    )
    if unit is not None:
        v.attrs["unit"] = unit


def _jsonable(value: Any) -> Any:
    """NumPy scalars and arrays as plain Python values (``json.dumps``' ``default``)."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or "/" in key or key in (".", "..") or key == "meta_json":
        raise DataError(f"invalid restart state key {key!r} (non-empty str without '/', not 'meta_json')")
    return key


def _rewrite_clean(path: Path) -> None:
    """Rewrite a file as a clean one (no consistency flags, no uncommitted tail of frames), atomically: the
    copy is made beside it and replaces it only when complete (it keeps the file's permissions)."""
    with atomic_path(path) as tmp:
        src, _ = _open_read(path)
        with src, h5py.File(tmp, "w", libver="latest") as dst:
            n = _check_format(src, path)
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)
            _resize_frames((dst[p] for p in _file_layout(dst)), n)


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (initval 0): HDF5's metadata checksum (``H5_checksum_lookup3``)."""
    m = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & m

    n = len(data)
    a = b = c = (0xDEADBEEF + n) & m
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & m
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & m
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & m
        for x, y, z, k in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
            v = [a, b, c]  # mix(): v[x] -= v[y]; v[x] ^= rot(v[y], k); v[y] += v[z]
            v[x] = ((v[x] - v[y]) & m) ^ rot(v[y], k)
            v[y] = (v[y] + v[z]) & m
            a, b, c = v
        i += 12
    tail = data[i:]
    if not tail:
        return c
    tail += bytes(12 - len(tail))
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):
        v = [a, b, c]  # final(): v[x] ^= v[y]; v[x] -= rot(v[y], k)
        v[x] = ((v[x] ^ v[y]) - rot(v[y], k)) & m
        a, b, c = v
    return c


def clear_stale_write_flags(path: PathLike) -> bool:
    """Clear the consistency flags a killed non-SWMR writer left in an HDF5 file (what ``h5clear -s`` does).

    Such a file (an :class:`H5MDWriter` killed while it had left SWMR mode to create datasets) is refused by
    every HDF5 reader. Only the non-SWMR write flag is cleared, and only when no process holds the file's
    HDF5 lock (a live non-SWMR writer holds it; with ``HDF5_USE_FILE_LOCKING=FALSE`` this cannot be told).
    It does not repair anything else: the file then shows what its writer had flushed.

    Returns:
      True when flags were cleared; False for a file without them (or an HDF5 format without flags).

    Raises:
      DataError: not an HDF5 file, a superblock whose checksum does not match, or a file a process holds.
    """
    path = Path(path)
    with _h5_errors(path, "clear the write flags of"), open(path, "r+b") as fh:
        head = fh.read(1 << 16)
        base = next((b for b in (0, 512, 1024, 2048, 4096, 8192) if head[b : b + 8] == b"\x89HDF\r\n\x1a\n"), None)
        if base is None:
            raise DataError(f"{path}: not an HDF5 file (no superblock signature)")
        version, offset_size, flags = head[base + 8], head[base + 9], head[base + 11]
        if version < 2:  # superblocks 0 and 1 have no consistency flags
            return False
        end = base + 12 + 4 * offset_size  # signature, version, sizes, flags, 4 addresses; then the checksum
        if int.from_bytes(head[end : end + 4], "little") != _lookup3(head[base:end]):
            raise DataError(f"{path}: corrupt HDF5 superblock (checksum mismatch)")
        if not flags & 0x01 or flags & 0x04:  # no write flag, or an SWMR writer's (SWMR readers cope with that)
            return False
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # HDF5's own lock: free once its holder died
        except ImportError:  # pragma: no cover - no flock (Windows): nothing to check
            pass
        except BlockingIOError:
            raise DataError(f"{path}: a process holds the file open for writing") from None
        block = bytearray(head[base:end])
        block[11] = 0
        fh.seek(base)
        fh.write(bytes(block) + _lookup3(bytes(block)).to_bytes(4, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def repair_h5md(path: PathLike) -> tuple[int, int, bool]:
    """Make an equiforce H5MD file left by a killed writer readable by any HDF5 reader.

    Clears HDF5's consistency flags (by rewriting the file, atomically: the same result as
    ``h5clear -s``, without needing the HDF5 tools) and drops an uncommitted tail of frames, so
    that plain ``h5py.File(path)``, MDAnalysis' ``H5MDReader`` and other H5MD readers see exactly
    the committed frames. Restart state and all attributes are kept. A clean file is left untouched.

    Returns:
      ``(committed_frames, dropped_frames, rewritten)``.

    Raises:
      DataError: a missing, corrupt or foreign file, or one another process has open for writing
        outside SWMR mode.
    """
    path = Path(path)
    f, clean = _open_read(path)
    with f, _h5_errors(path, "repair"):
        n = _check_format(f, path)
        lengths = {f[p][ds].shape[0] for p in _file_layout(f) for ds in ("step", "time", "value")}
    if clean and lengths <= {n}:
        return n, 0, False
    with _h5_errors(path, "repair"):
        _rewrite_clean(path)
    return n, max(lengths, default=n) - n, True


# ============================================================================ H5MD writer


class H5MDWriter:
    """Write an MD trajectory as an H5MD 1.1 file (layout and crash guarantees: module docstring).

    Args:
      path: the ``.h5``/``.h5md`` file; its folder must exist.
      atomic_numbers: int ``[N]`` atomic numbers (stored as ``particles/all/species``).
      masses: float ``[N]`` masses, amu.
      pbc: bool ``[3]`` periodicity (a bool broadcasts); any True makes the box time-dependent data
        and requires ``box`` in :meth:`write`.
      forces: also store forces (then :meth:`write` requires them).
      observables: names of the scalar observables to store; default the four energies/temperature
        plus ``pressure`` and ``volume`` when periodic. Known names get an H5MD ``unit``
        (:data:`OBSERVABLE_UNITS`); other names are stored without unit.
      mode: ``"w"`` creates (overwriting any file); ``"a"`` continues an existing file after its
        committed frames (dropping any uncommitted tail) or creates a missing one. Appending checks
        that species, masses, pbc, force presence and observable names match the file.
      author: ``h5md/author`` name (default: ``$USER`` or ``"unknown"``).
      swmr: write in SWMR mode with ``libver="latest"`` (see module docstring).

    Raises:
      DataError: bad arguments, a missing folder, a foreign/corrupt file or a mismatch on append.
    """

    def __init__(
        self,
        path: PathLike,
        atomic_numbers: np.ndarray,
        masses: np.ndarray,
        pbc: np.ndarray | bool,
        *,
        forces: bool = False,
        observables: tuple[str, ...] | None = None,
        mode: str = "w",
        author: str | None = None,
        swmr: bool = True,
    ) -> None:
        self.path = Path(path)
        if mode not in ("w", "a"):
            raise DataError(f"mode must be 'w' or 'a', got {mode!r}")
        z = np.asarray(atomic_numbers)
        if z.ndim != 1 or z.size == 0 or not np.issubdtype(z.dtype, np.integer):
            raise DataError(f"atomic_numbers must be a non-empty 1-D integer array, got {z.dtype} {z.shape}")
        m = np.asarray(masses, dtype=np.float64)
        if m.shape != z.shape or not np.all(np.isfinite(m)) or np.any(m <= 0):
            raise DataError(f"masses must be {z.shape} positive finite floats, got shape {m.shape}")
        p = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        self.atomic_numbers = z.astype(np.int32)
        self.masses = m
        self.pbc = p
        self.periodic = bool(p.any())
        self.n_atoms = int(z.size)
        self.forces = bool(forces)
        if observables is None:
            observables = _BASE_OBSERVABLES + (_PERIODIC_OBSERVABLES if self.periodic else ())
        for name in observables:
            if not isinstance(name, str) or not name.isidentifier():
                raise DataError(f"invalid observable name {name!r}")
        if len(set(observables)) != len(observables):
            raise DataError(f"duplicate observable names in {observables}")
        self.observables: tuple[str, ...] = tuple(observables)
        self._layout = _td_layout(self.n_atoms, self.periodic, self.forces, self.observables)
        self.author = author if author is not None else os.environ.get("USER", "unknown")
        self.swmr = bool(swmr)
        self._libver = "latest" if self.swmr else None
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path}: directory {self.path.parent} does not exist")
        self._f: h5py.File | None = None
        if mode == "a" and self.path.exists():
            self._open_append()
        else:
            with _h5_errors(self.path, "create"):
                self._f = h5py.File(self.path, "w", libver=self._libver)
                try:
                    self._create_layout()
                    self._f.flush()
                except BaseException:
                    self._f.close()
                    raise
        self._start_swmr()

    # ------------------------------------------------------------------ layout
    def _create_layout(self) -> None:
        f = self._f
        h5 = f.create_group("h5md")
        h5.attrs["version"] = np.array(H5MD_VERSION, dtype=np.int32)
        h5.create_group("author").attrs["name"] = self.author
        creator = h5.create_group("creator")
        creator.attrs["name"] = "equiforce"
        creator.attrs["version"] = __version__
        h5.create_group("modules/units").attrs["version"] = np.array([1, 0], dtype=np.int32)
        allp = f.create_group("particles/all")
        allp.create_dataset("species", data=self.atomic_numbers, dtype=np.int32)
        allp.create_dataset("mass", data=self.masses, dtype=np.float64).attrs["unit"] = "u"
        box = allp.create_group("box")
        box.attrs["dimension"] = np.int32(3)
        box.attrs["boundary"] = np.array([b"periodic" if x else b"none" for x in self.pbc], dtype="S8")
        f.create_group("observables")
        for p, (shape, unit) in self._layout.items():
            parent, name = p.rsplit("/", 1)
            _create_td(f[parent], name, shape, unit)
        eq = f.create_group("equiforce")
        eq.attrs["format"] = FORMAT_NAME
        eq.attrs["format_version"] = np.int32(FORMAT_VERSION)
        eq.attrs["units"] = json.dumps(_EQ_UNITS, ensure_ascii=False)
        eq.create_dataset("committed_frames", data=np.int64(0), dtype=np.int64)
        rs = eq.create_group("restart")
        rs.create_dataset("active", data=np.int64(-1), dtype=np.int64)
        self.n_frames = 0

    def _open_append(self) -> None:
        path = self.path
        try:
            f = h5py.File(path, "r+", libver=self._libver)
        except OSError as err:
            if not _flags_set(err):
                raise DataError(f"{path}: cannot open for appending ({err})") from err
            with _h5_errors(path, "recover"):
                _rewrite_clean(path)
            with _h5_errors(path, "open"):
                f = h5py.File(path, "r+", libver=self._libver)
        self._f = f
        try:
            with _h5_errors(path, "append to"):
                self._check_append_match()
        except BaseException:
            f.close()
            raise

    def _check_append_match(self) -> None:
        f, path = self._f, self.path
        n, z, m, pbc = _read_particles(f, path)
        allp = f["particles/all"]
        problems = []
        if z.shape != self.atomic_numbers.shape or not np.array_equal(z, self.atomic_numbers):
            problems.append(f"species differ (file {z.shape[0]} atoms, run {self.n_atoms})")
        elif not np.array_equal(m, self.masses):
            problems.append("masses differ")
        if pbc.shape != (3,) or not np.array_equal(pbc, self.pbc):
            problems.append(f"pbc differ (file {pbc.tolist()}, run {self.pbc.tolist()})")
        has_force = "force" in allp
        if has_force != self.forces:
            problems.append(f"force presence differs (file {has_force}, run {self.forces})")
        file_obs = tuple(f["observables"].keys())
        if set(file_obs) != set(self.observables):
            problems.append(f"observables differ (file {sorted(file_obs)}, run {sorted(self.observables)})")
        if problems:
            raise DataError(f"{path}: cannot append: " + "; ".join(problems))
        for p, (shape, _) in self._layout.items():
            _check_td(f, p, path, n, shape)
        _resize_frames((f[p] for p in self._layout), n)  # drop an uncommitted tail left by a kill mid-write
        self.n_frames = n
        f.flush()

    def _start_swmr(self) -> None:
        if self.swmr and self._f is not None and not self._f.swmr_mode:
            self._f.swmr_mode = True

    @contextmanager
    def _structural(self) -> Iterator[h5py.File]:
        """Leave SWMR mode (reopen) for changes SWMR forbids: creating/deleting objects, shrinking."""
        if self.swmr:
            self._f.close()
            self._f = h5py.File(self.path, "r+", libver="latest")
        try:
            yield self._f
            faults.point("h5md-structure", "changed")
        finally:
            self._f.flush()
            self._start_swmr()

    def _require_open(self) -> h5py.File:
        if self._f is None or not self._f.id.valid:
            raise DataError(f"{self.path}: H5MDWriter is closed")
        return self._f

    # ------------------------------------------------------------------ writing
    def write(
        self,
        step: np.ndarray,
        time_ps: np.ndarray,
        positions: np.ndarray,
        velocities: np.ndarray,
        box: np.ndarray | None = None,
        forces: np.ndarray | None = None,
        **observables: np.ndarray,
    ) -> None:
        """Append ``F`` frames and commit them.

        Args:
          step: int ``[F]`` MD step numbers, strictly increasing and larger than the last committed step.
          time_ps: float ``[F]`` time, ps.
          positions: ``[F, N, 3]`` Å (``[N, 3]`` is one frame; likewise below).
          velocities: ``[F, N, 3]`` Å/ps.
          box: ``[F, 3, 3]`` lattice vectors as rows, Å; required iff periodic.
          forces: ``[F, N, 3]`` eV/Å; required iff the writer was made with ``forces=True``.
          **observables: ``[F]`` arrays, exactly the writer's ``observables`` (units in
            :data:`OBSERVABLE_UNITS`).

        Raises:
          DataError: missing/unexpected arrays, wrong shapes, non-increasing steps, a closed writer, or
            a write failure.
        """
        f = self._require_open()
        steps = np.atleast_1d(np.asarray(step))
        if steps.ndim != 1 or (steps.size and not np.issubdtype(steps.dtype, np.integer)):
            raise DataError(f"step must be a 1-D integer array, got dtype {steps.dtype} shape {steps.shape}")
        nf = steps.shape[0]
        single = np.asarray(positions).ndim == 2

        def frames(name: str, arr: Any, shape: tuple[int, ...]) -> np.ndarray:
            a = np.asarray(arr, dtype=np.float64)
            if single and a.ndim == len(shape):
                a = a[None]
            if a.shape != (nf, *shape):
                raise DataError(f"{name} has shape {a.shape}, expected {(nf, *shape)}")
            return a

        n3 = (self.n_atoms, 3)
        data: dict[str, np.ndarray] = {
            "particles/all/position": frames("positions", positions, n3),
            "particles/all/velocity": frames("velocities", velocities, n3),
        }
        if self.forces != (forces is not None):
            raise DataError(f"forces {'required' if self.forces else 'not expected'} (writer forces={self.forces})")
        if forces is not None:
            data["particles/all/force"] = frames("forces", forces, n3)
        if self.periodic != (box is not None):
            raise DataError(f"box {'required' if self.periodic else 'not expected'} (pbc={self.pbc.tolist()})")
        if box is not None:
            data["particles/all/box/edges"] = frames("box", box, (3, 3))
        missing = sorted(set(self.observables) - set(observables))
        extra = sorted(set(observables) - set(self.observables))
        if missing or extra:
            raise DataError(f"{self.path}: missing observables {missing}, unexpected observables {extra}")
        for name in self.observables:
            data[f"observables/{name}"] = frames(name, observables[name], ())
        times = frames("time_ps", time_ps, ())
        if nf == 0:
            return
        steps = steps.astype(np.int64)
        if np.any(np.diff(steps) <= 0):
            raise DataError(f"steps must be strictly increasing, got {steps.tolist()[:10]}...")
        n = self.n_frames
        with _h5_errors(self.path, "write"):
            if n:
                last = int(f["particles/all/position/step"][n - 1])
                if steps[0] <= last:
                    raise DataError(
                        f"{self.path}: step {int(steps[0])} is not after the last committed step {last} "
                        "(use truncate_after_step() when restarting from an earlier state)"
                    )
            for p, value in data.items():
                g = f[p]
                for ds, arr in (("step", steps), ("time", times), ("value", value)):
                    g[ds].resize(n + nf, axis=0)
                    g[ds][n : n + nf] = arr
            faults.point("h5md-frame", "appended")
            f.flush()
            faults.point("h5md-frame", "flushed")
            f["equiforce/committed_frames"][()] = np.int64(n + nf)
            f.flush()
            faults.point("h5md-frame", "committed")
        self.n_frames = n + nf

    def truncate_after_step(self, step: int) -> int:
        """Drop committed frames with step > ``step`` (e.g. when restarting from an earlier restart state).

        Returns:
          The number of frames kept.
        """
        f = self._require_open()
        with _h5_errors(self.path, "truncate"):
            steps = np.asarray(f["particles/all/position/step"][: self.n_frames])
            keep = int(np.searchsorted(steps, int(step), side="right"))
            if keep == self.n_frames:
                return keep
            with self._structural() as f:
                f["equiforce/committed_frames"][()] = np.int64(keep)
                f.flush()
                _resize_frames((f[p] for p in self._layout), keep)
        self.n_frames = keep
        return keep

    def write_restart_state(self, state_arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Store the integrator's full state for an exact restart (double-buffered, see module docstring).

        Call it right after :meth:`write` with the state of the last written frame.

        Args:
          state_arrays: name -> numeric/bool array (any shape, dtype kept; e.g. positions, momenta,
            forces, masses, thermostat chains, box, RNG key, step). Names: non-empty, no ``'/'``.
          meta: JSON-serialisable dict (integrator name, dt, temperature, ...); NumPy scalars/arrays
            are converted to lists. The key ``"committed_frames"`` is reserved.

        Raises:
          DataError: bad names, non-numeric arrays, non-JSON meta, or a write failure.
        """
        f = self._require_open()
        arrays = {_check_key(k): np.asarray(v) for k, v in state_arrays.items()}
        for k, a in arrays.items():
            if a.dtype.kind not in "biufc":
                raise DataError(f"restart state {k!r} has non-numeric dtype {a.dtype}")
        if _RESERVED_META_KEY in meta:
            raise DataError(f"restart meta key {_RESERVED_META_KEY!r} is reserved")
        try:
            text = json.dumps(
                {"meta": dict(meta), _RESERVED_META_KEY: self.n_frames}, allow_nan=True, default=_jsonable
            )
        except (TypeError, ValueError) as err:
            raise DataError(f"restart meta is not JSON-serialisable: {err}") from err
        blob = np.frombuffer(text.encode(), dtype=np.uint8)
        with _h5_errors(self.path, "write restart state to"):
            rs = f["equiforce/restart"]
            active = int(rs["active"][()])
            slot = f"slot{1 - active if active in (0, 1) else 0}"
            g = rs.get(slot)
            fits = (
                isinstance(g, h5py.Group)
                and set(g.keys()) == {*arrays, "meta_json"}
                and all(g[k].shape == a.shape and g[k].dtype == a.dtype for k, a in arrays.items())
            )
            if not fits:
                with self._structural() as f:
                    rs = f["equiforce/restart"]
                    if slot in rs:
                        del rs[slot]
                    g = rs.create_group(slot)
                    for k, a in arrays.items():
                        g.create_dataset(k, data=a, dtype=a.dtype)
                    g.create_dataset("meta_json", data=blob, maxshape=(None,), chunks=(4096,), dtype=np.uint8)
            else:
                for k, a in arrays.items():
                    g[k][()] = a
                mj = g["meta_json"]
                if mj.shape[0] < blob.size:
                    mj.resize(blob.size, axis=0)
                padded = np.full(mj.shape[0], ord(" "), dtype=np.uint8)
                padded[: blob.size] = blob
                mj[:] = padded
            faults.point("restart-state", "slot-written")
            f.flush()
            faults.point("restart-state", "slot-flushed")
            f["equiforce/restart/active"][()] = np.int64(int(slot[-1]))
            f.flush()
            faults.point("restart-state", "activated")

    def close(self) -> None:
        """Flush and close the file (idempotent); a cleanly closed file opens with plain h5py."""
        if self._f is not None and self._f.id.valid:
            with suppress(Exception):
                self._f.flush()
            self._f.close()
        self._f = None

    def __enter__(self) -> H5MDWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ============================================================================ readers


def read_h5md(path: PathLike) -> dict[str, Any]:
    """Read the committed frames of an equiforce H5MD file (also while it is being written, or after a kill).

    Returns:
      dict with ``species`` (int32 ``[N]``), ``masses`` (float64 ``[N]``, amu), ``pbc`` (bool ``[3]``),
      ``step`` (int64 ``[F]``), ``time`` (float64 ``[F]``, ps), ``positions`` (``[F, N, 3]``, Å),
      ``velocities`` (``[F, N, 3]``, Å/ps), ``forces`` (``[F, N, 3]``, eV/Å, only if stored),
      ``box`` (``[F, 3, 3]``, lattice vectors as rows, Å, only if periodic) and ``observables``
      (name -> float64 ``[F]``, units in :data:`OBSERVABLE_UNITS`). Values are bit-identical to
      those written.

    Raises:
      DataError: missing, corrupt or foreign file.
    """
    path = Path(path)
    f, _ = _open_read(path)
    with f, _h5_errors(path, "read"):
        n, species, masses, pbc = _read_particles(f, path)
        allp = f["particles/all"]
        out: dict[str, Any] = {"species": species, "masses": masses, "pbc": pbc}
        for p, (shape, _) in _file_layout(f).items():
            _check_td(f, p, path, n, shape)
        pos = allp["position"]
        out["step"] = np.asarray(pos["step"][:n], dtype=np.int64)
        out["time"] = np.asarray(pos["time"][:n], dtype=np.float64)
        out["positions"] = np.asarray(pos["value"][:n])
        out["velocities"] = np.asarray(allp["velocity/value"][:n])
        if "force" in allp:
            out["forces"] = np.asarray(allp["force/value"][:n])
        if "edges" in allp["box"]:
            out["box"] = np.asarray(allp["box/edges/value"][:n])
        out["observables"] = {name: np.asarray(g["value"][:n]) for name, g in f["observables"].items()}
    return out


def read_restart_state(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the latest restart state stored by :meth:`H5MDWriter.write_restart_state`.

    Returns:
      ``(arrays, meta)``: the state arrays (dtype and shape as written, bit-exact) and the meta dict
      as written (JSON round trip) plus ``meta["committed_frames"]``, the number of trajectory frames
      committed when the state was stored (the state belongs to frame ``committed_frames - 1``).

    Raises:
      NoRestartStateError: a valid file in which no restart state was stored yet (a :class:`DataError`).
      DataError: missing, corrupt or foreign file.
    """
    path = Path(path)
    f, _ = _open_read(path)
    with f, _h5_errors(path, "read restart state from"):
        _check_format(f, path)
        rs = f.get("equiforce/restart")
        if not isinstance(rs, h5py.Group) or "active" not in rs:
            raise DataError(f"{path}: corrupt file (missing equiforce/restart/active)")
        active = int(rs["active"][()])
        if active not in (0, 1):
            raise NoRestartStateError(f"{path}: no restart state stored")
        g = rs.get(f"slot{active}")
        if not isinstance(g, h5py.Group) or "meta_json" not in g:
            raise DataError(f"{path}: corrupt restart slot {active}")
        arrays = {k: np.asarray(ds[()]) for k, ds in g.items() if k != "meta_json"}
        try:
            payload = json.loads(bytes(np.asarray(g["meta_json"][()], dtype=np.uint8)).decode())
            meta = dict(payload["meta"])
            meta[_RESERVED_META_KEY] = int(payload[_RESERVED_META_KEY])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: corrupt restart meta ({err})") from err
    return arrays, meta


def is_h5md(path: PathLike) -> bool:
    """Whether ``path`` is an HDF5 file with an ``/h5md`` group (also one being written or left by a kill)."""
    try:
        f, _ = _open_read(Path(path))
    except DataError:
        return False
    with f:
        return "h5md" in f


def read_h5md_structures(path: PathLike) -> StructureSet:
    """The committed frames of an equiforce H5MD trajectory as a :class:`StructureSet` (no labels).

    Positions Å (float64), cells Å (lattice vectors as rows; zero for a non-periodic run), pbc per frame.

    Raises:
      DataError: missing, corrupt or foreign file, or one without a committed frame.
    """
    traj = read_h5md(path)
    n, n_atoms = traj["positions"].shape[:2]
    if n == 0:
        raise DataError(f"{path}: the trajectory holds no committed frame")
    box = traj.get("box")
    return StructureSet(
        atomic_numbers=np.tile(traj["species"], n).astype(np.int32),
        positions=traj["positions"].reshape(-1, 3).astype(np.float64),
        n_atoms=np.full(n, n_atoms),
        cell=np.zeros((n, 3, 3)) if box is None else np.asarray(box, np.float64),
        pbc=np.tile(traj["pbc"], (n, 1)),
    )
