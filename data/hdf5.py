"""Native HDF5 dataset format for :class:`~equiforce.data.structures.StructureSet`, with a lazy reader.

Schema, ``format_version = 1``
------------------------------

Root attributes (the two strings are fixed-length UTF-8, read back by h5py as ``bytes``):

=====================  =====================================================================
``format``             ``"equiforce-structures"`` (a file without it is rejected as foreign)
``format_version``     ``1`` (int). Readers reject a newer version with :class:`DataError`.
``units``              JSON string: ``{"length": "Å", "energy": "eV", "forces": "eV/Å",
                       "stress": "eV/Å^3", "stress_convention": ...}``; always ASE units.
``n_structures``       committed number of structures (int)
``n_total_atoms``      committed number of atoms, ``sum(n_atoms[:n_structures])`` (int)
=====================  =====================================================================

Datasets (all chunked, resizable along the first axis; ``n = n_structures``, ``N = n_total_atoms``;
structure ``k`` owns atom rows ``cumsum(n_atoms)[k-1] : cumsum(n_atoms)[k]``):

==================  ===========  =========  ==========================================================
``atomic_numbers``  ``[N]``      int32      atomic numbers Z
``positions``       ``[N, 3]``   float64    Cartesian positions, Å
``n_atoms``         ``[n]``      int64      atoms per structure (> 0)
``cell``            ``[n, 3, 3]`` float64   lattice vectors as rows, Å (zeros where not periodic)
``pbc``             ``[n, 3]``   bool       periodicity per lattice vector
``energy``          ``[n]``      float64    total energy, eV (optional)
``forces``          ``[N, 3]``   float64    forces, eV/Å (optional)
``stress``          ``[n, 6]``   float64    stress, eV/Å³, ASE sign, Voigt xx yy zz yz xz xy;
                                            NaN rows = no stress label (optional)
==================  ===========  =========  ==========================================================

An optional dataset is either present for every structure or absent; :func:`append_hdf5` refuses
to append a set whose label presence differs from the file's. Datasets may be longer than the
committed counts (after an interrupted in-place append); readers use the committed counts only.

Optional neighbour graphs (written by ``equiforce preprocess`` / :class:`HDF5Writer`; ``E =
n_total_edges``; structure ``k`` owns edge rows ``cumsum(n_edges)[k-1] : cumsum(n_edges)[k]``, atom indices
counted within the structure, the convention of :class:`~equiforce.data.neighbours.NeighbourGraph`):

==================  ===========  =========  ==========================================================
``n_edges``         ``[n]``      int64      edges of each structure within the cutoff (root attribute
                                            ``r_max``, Å; root attribute ``n_total_edges`` = ``E``)
``edge_senders``    ``[E]``      int32      sender (neighbour j) of each edge
``edge_receivers``  ``[E]``      int32      receiver (centre i) of each edge
``edge_shifts``     ``[E, 3]``   int32      integer lattice offsets of the sender's image
==================  ===========  =========  ==========================================================

``n_edges`` may be present without the three edge datasets (sizes only): the trainer's padding budget is
then known without reading any frame, and the graphs are built on the fly.

Writes are atomic (:mod:`equiforce.atomic`): :func:`write_hdf5`, :func:`append_hdf5` with ``atomic=True``
and :class:`HDF5Writer` write a temporary file in the same directory, fsync it and ``os.replace`` it over the
target; a new file gets the usual permissions (``0o666`` less the umask), a replaced or appended one keeps its
mode. Values round-trip bit-exactly.

Corruption is detected, not read: files are written with HDF5 1.8+ metadata (superblock v2 and object
headers with checksums; ``libver=("v108", "v110")``), the string attributes are fixed-length (stored in
the checksummed object header, not in the unchecked global heap, where a single flipped bit can make
the HDF5 library loop forever) and every dataset carries the Fletcher-32 checksum filter, so a flipped
bit in data or metadata is a :class:`DataError`, never a silently different value. Files written by
earlier versions (without these checksums) are still read. A file cut short (a writer killed mid-write, an
incomplete copy) is a :class:`DataError` that says how many bytes are missing and, where the file's metadata
survived, the first frame whose data are lost. No dataset records its modification time, so the same content
written the same way gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from equiforce import faults
from equiforce.atomic import AtomicFile, atomic_path
from equiforce.data.checks import check_float_array
from equiforce.data.errors import DataError
from equiforce.data.neighbours import NeighbourGraph
from equiforce.data.structures import StructureSet

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HDF5Dataset",
    "HDF5Writer",
    "append_hdf5",
    "read_hdf5",
    "write_hdf5",
]

FORMAT_NAME = "equiforce-structures"
FORMAT_VERSION = 1
UNITS: dict[str, str] = {
    "length": "Å",
    "energy": "eV",
    "forces": "eV/Å",
    "stress": "eV/Å^3",
    "stress_convention": "ASE sign (positive = tensile), Voigt order xx yy zz yz xz xy",
}

PathLike = str | os.PathLike

# name -> (per-atom?, trailing shape, dtype)
_SPEC: dict[str, tuple[bool, tuple[int, ...], Any]] = {
    "atomic_numbers": (True, (), np.int32),
    "positions": (True, (3,), np.float64),
    "n_atoms": (False, (), np.int64),
    "cell": (False, (3, 3), np.float64),
    "pbc": (False, (3,), np.bool_),
    "energy": (False, (), np.float64),
    "forces": (True, (3,), np.float64),
    "stress": (False, (6,), np.float64),
}
# dtype kinds a dataset may have on disk, by the kind of its schema dtype: integers for the int
# datasets, real numbers for the float ones (no strings, complex, compound or opaque types)
_DTYPE_KINDS = {"i": "iu", "f": "fiu", "b": "biu"}
_REQUIRED = ("atomic_numbers", "positions", "n_atoms", "cell", "pbc")
_LABELS = ("energy", "forces", "stress")
# the optional neighbour graphs: name -> (trailing shape, dtype); n_edges is per structure, the rest per edge
_EDGES: dict[str, tuple[tuple[int, ...], Any]] = {
    "edge_senders": ((), np.int32),
    "edge_receivers": ((), np.int32),
    "edge_shifts": ((3,), np.int32),
}


_H5_ERRORS = (OSError, KeyError, IndexError, AttributeError, ValueError, TypeError, RuntimeError, MemoryError)


@contextmanager
def _h5_errors(path: PathLike, what: str) -> Iterator[None]:
    """Turn h5py/OS errors into a DataError naming the file (and, for a truncated file, the first lost frame)."""
    try:
        yield
    except DataError:
        raise
    except _H5_ERRORS as err:
        truncated = _truncation_report(path, err)
        if truncated is not None:
            raise DataError(truncated) from err
        raise DataError(f"{path}: cannot {what} HDF5 file ({type(err).__name__}: {err})") from err


class _ZeroPadded(io.RawIOBase):
    """A read-only file that reads as ``size`` bytes: the file's own, then zeros. HDF5 refuses to open a
    file shorter than the end-of-file address its superblock records; through this it opens, so the chunks
    that lie beyond the real end (the lost frames) can be found."""

    def __init__(self, path: PathLike, size: int):
        self._fd = os.open(path, os.O_RDONLY)
        self._real = os.fstat(self._fd).st_size
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        data = os.pread(self._fd, n, self._pos) if self._pos < self._real else b""
        view[: len(data)] = data
        view[len(data) : n] = bytes(n - len(data))
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _kind(name: str) -> str:
    """What a dataset's rows are: ``"atom"``, ``"edge"`` or ``"structure"``."""
    if name in _EDGES:
        return "edge"
    return "atom" if name in _SPEC and _SPEC[name][0] else "structure"


def _first_lost_frame(f: h5py.File, eof: int) -> int | None:
    """The first structure with data at or beyond byte ``eof`` (None: none lost), from the chunk addresses."""
    n = int(f.attrs["n_structures"])
    ds = f["n_atoms"]
    step = ds.chunks[0] if ds.chunks else max(n, 1)
    parts = []
    for a in range(0, n, step):  # the sizes as far as they can be read
        try:
            parts.append(np.asarray(ds[a : min(a + step, n)], dtype=np.int64))
        except _H5_ERRORS:
            break
    n_atoms = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    known = n_atoms.size
    atom_offsets = np.concatenate([[0], np.cumsum(n_atoms)])
    edge_offsets = None
    if "n_edges" in f:
        try:
            edge_offsets = np.concatenate([[0], np.cumsum(np.asarray(f["n_edges"][:known], np.int64))])
        except _H5_ERRORS:
            edge_offsets = None

    def structure_of(kind: str, row: int) -> int:
        if kind == "structure":
            return row
        offsets = atom_offsets if kind == "atom" else edge_offsets
        if offsets is None or row >= offsets[-1]:
            return known
        return int(np.searchsorted(offsets, row, side="right") - 1)

    first = n if known == n else known
    for name in f:
        dset = f[name]
        if not isinstance(dset, h5py.Dataset) or dset.chunks is None:
            continue
        kind = _kind(name)
        try:
            count = dset.id.get_num_chunks()
        except _H5_ERRORS:
            return min(first, 0)
        for i in range(count):
            try:
                info = dset.id.get_chunk_info(i)
                row, lost = int(info.chunk_offset[0]), info.byte_offset + info.size > eof
            except _H5_ERRORS:  # the chunk index itself lies beyond the end
                row, lost = i * dset.chunks[0], True
            if lost:
                first = min(first, structure_of(kind, row))
                break
    return first if first < n else None


def _truncation_report(path: PathLike, err: BaseException) -> str | None:
    """The message for a file shorter than its superblock says (None: ``err`` is about something else)."""
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(err))
    if m is None:
        return None
    eof, stored = int(m.group(1)), int(m.group(2))
    msg = (
        f"{path}: the file is truncated ({eof} of {stored} bytes: its writer was killed mid-write, or the copy "
        "is incomplete)"
    )
    try:
        with _ZeroPadded(path, stored) as raw, h5py.File(raw, "r") as f:
            n = int(f.attrs["n_structures"])
            first = _first_lost_frame(f, eof)
    except (*_H5_ERRORS, KeyError):
        return msg + "; its metadata are lost too, so the lost frames cannot be named"
    if first is None:
        return msg + f"; the data of all {n} frames are present, but HDF5 cannot open it"
    return (
        msg + f": frames {first} to {n - 1} of {n} are lost (frame {first} is the first whose data lie beyond the "
        f"end); write the file again (equiforce preprocess resumes an interrupted conversion)"
    )


def _labels_of(s: StructureSet) -> tuple[str, ...]:
    return tuple(name for name in _LABELS if getattr(s, name) is not None)


def _chunk_rows(per_atom: bool, rows: int) -> int:
    lo, hi = (1024, 32768) if per_atom else (256, 4096)
    return int(min(max(rows, lo), hi))


# HDF5 1.8 file-format features (checksummed superblock v2 and object headers), readable by HDF5 >= 1.8
_LIBVER = ("v108", "v110")


def _fixed_string(text: str) -> np.bytes_:
    """A fixed-length UTF-8 string attribute (kept in the checksummed object header, unlike a vlen str)."""
    return np.bytes_(text.encode("utf-8"))


def _write_header(f: h5py.File) -> None:
    f.attrs["format"] = _fixed_string(FORMAT_NAME)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["units"] = _fixed_string(json.dumps(UNITS, ensure_ascii=False))


def _create_datasets(f: h5py.File, s: StructureSet, compression: str | None) -> None:
    _write_header(f)
    for name in (*_REQUIRED, *_labels_of(s)):
        per_atom, tail, dtype = _SPEC[name]
        data = np.asarray(getattr(s, name), dtype=dtype)
        f.create_dataset(
            name,
            data=data,
            maxshape=(None, *tail),
            chunks=(_chunk_rows(per_atom, data.shape[0]), *tail),
            compression=compression,
            fletcher32=True,
            track_times=False,
        )
    f.attrs["n_structures"] = len(s)
    f.attrs["n_total_atoms"] = s.n_total_atoms


def _check_schema(f: h5py.File, path: PathLike) -> tuple[int, int, tuple[str, ...]]:
    """Validate the header; return committed (n_structures, n_total_atoms, labels)."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT_NAME:
        raise DataError(f"{path}: not an equiforce structure file (attribute format={fmt!r})")
    version = f.attrs.get("format_version")
    if not isinstance(version, int | np.integer) or isinstance(version, bool | np.bool_):
        raise DataError(f"{path}: missing or invalid format_version {version!r}")
    version = int(version)
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version} is newer than this equiforce supports ({FORMAT_VERSION}); "
            "upgrade equiforce"
        )
    if version < 1:
        raise DataError(f"{path}: invalid format_version {version}")
    units_attr = f.attrs.get("units")
    try:
        units = json.loads(units_attr)
    except (TypeError, ValueError):
        raise DataError(f"{path}: missing or unreadable units attribute") from None
    if not isinstance(units, dict):
        raise DataError(f"{path}: the units attribute is not a JSON object: {units!r}")
    for key in ("length", "energy", "forces", "stress"):
        if units.get(key) != UNITS[key]:
            raise DataError(f"{path}: unsupported {key} unit {units.get(key)!r}, expected {UNITS[key]!r}")
    missing = [name for name in _REQUIRED if name not in f]
    if missing:
        raise DataError(f"{path}: missing dataset(s) {missing}")
    counts = []
    for key in ("n_structures", "n_total_atoms"):
        value = f.attrs.get(key)
        if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_) or value < 0:
            raise DataError(f"{path}: attribute {key} must be a non-negative integer, got {value!r}")
        counts.append(int(value))
    n, n_total = counts
    labels = tuple(name for name in _LABELS if name in f)
    for name in (*_REQUIRED, *labels):
        per_atom, tail, dtype = _SPEC[name]
        ds = f[name]
        if (
            not isinstance(ds, h5py.Dataset)
            or ds.shape is None
            or len(ds.shape) != 1 + len(tail)
            or ds.shape[1:] != tail
        ):
            shape = getattr(ds, "shape", None)
            raise DataError(f"{path}: dataset {name!r} has shape {shape}, expected (rows, *{tail})")
        kinds = _DTYPE_KINDS[np.dtype(dtype).kind]
        if ds.dtype.kind not in kinds:
            raise DataError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected {np.dtype(dtype)}")
        if name in ("positions", "energy", "forces", "stress"):  # no integers or float16 (wrapped or rounded)
            try:
                check_float_array(f"dataset {name!r}", ds)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
        need = n_total if per_atom else n
        if ds.shape[0] < need:
            raise DataError(f"{path}: dataset {name!r} has {ds.shape[0]} rows, fewer than committed {need}")
    return n, n_total, labels


def write_hdf5(
    path: PathLike, structures: StructureSet, overwrite: bool = False, compression: str | None = None
) -> Path:
    """Write ``structures`` to a new native HDF5 file (schema: module docstring), atomically.

    Args:
      path: target file (conventionally ``*.h5``).
      structures: the set to store; its labels (energy/forces/stress) decide which datasets exist.
      overwrite: replace an existing file; otherwise an existing file is an error.
      compression: optional h5py compression filter (e.g. ``"gzip"``); lossless, so bit-exact.

    Returns:
      The path written.

    Raises:
      DataError: the file exists and ``overwrite`` is False, or the write failed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path}: file exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise DataError(f"{path}: directory {path.parent} does not exist")
    with _h5_errors(path, "write"), atomic_path(path, fault="hdf5") as tmp, h5py.File(tmp, "w", libver=_LIBVER) as f:
        _create_datasets(f, structures, compression)
    return path


def _append_into(f: h5py.File, path: PathLike, s: StructureSet) -> None:
    n, n_total, labels = _check_schema(f, path)
    if labels != _labels_of(s):
        raise DataError(
            f"{path}: label mismatch: the file has {list(labels)}, the appended set has {list(_labels_of(s))}"
        )
    add_n, add_atoms = len(s), s.n_total_atoms
    for name in (*_REQUIRED, *labels):
        per_atom, _, dtype = _SPEC[name]
        start = n_total if per_atom else n
        stop = start + (add_atoms if per_atom else add_n)
        ds = f[name]
        ds.resize(stop, axis=0)
        ds[start:stop] = np.asarray(getattr(s, name), dtype=dtype)
    # commit last: a crash before these two lines leaves the file at its old committed size
    f.attrs["n_total_atoms"] = n_total + add_atoms
    f.attrs["n_structures"] = n + add_n
    f.flush()


def append_hdf5(path: PathLike, structures: StructureSet, atomic: bool = True) -> Path:
    """Append ``structures`` to an existing native HDF5 file.

    The file's schema and version are checked and the label presence (energy/forces/stress) must
    match the file's.

    Args:
      path: an existing file written by :func:`write_hdf5`.
      structures: the set to append.
      atomic: copy the file to a temporary file in the same directory, append there and
        ``os.replace`` it (costs a copy of the file). With False, append in place; the committed
        counts are updated last, so an interrupted append leaves the old content readable
        unless the HDF5 metadata itself was damaged (use for files too large to copy).

    Returns:
      The path.

    Raises:
      DataError: missing, corrupt, foreign or newer-version file, or a label mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (use write_hdf5 to create it)")
    if not atomic:
        with _h5_errors(path, "append to"), h5py.File(path, "r+") as f:
            _append_into(f, path, structures)
        return path
    with _h5_errors(path, "append to"), atomic_path(path, fault="hdf5") as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            _append_into(f, path, structures)
    return path


_CHUNK_ROWS = {"structure": 1024, "atom": 4096, "edge": 16384}  # small chunks: a random frame reads little


class HDF5Writer:
    """Write a native HDF5 file part by part, in bounded memory, atomically: the parts go to a temporary
    file beside ``path`` that replaces ``path`` only when :meth:`close` commits it.

    Chunks are small (1024 structures, 4096 atoms, 16384 edges), so reading one random frame, as a shuffled
    streamed epoch does (:mod:`equiforce.data.streaming`), decodes little more than that frame.

    Args:
      path: the target file (conventionally ``*.h5``).
      r_max: cutoff (Å) of the neighbour graphs given with every part (``None``: no graphs are stored).
      edges: with ``r_max``, store the edges themselves; ``False``: only each structure's edge count
        ``n_edges`` (enough for the padding budget; the graphs are then built when read).
      compression: an h5py compression filter (``"lzf"``, ``"gzip"``) or ``None``; lossless.
      overwrite: replace an existing file when committing.
      fault: the name of this write for the kill-recovery tests' fault injection (:mod:`equiforce.faults`).

    Use as a context manager: leaving the block normally commits, an exception discards the temporary file.

    Raises:
      DataError: the file exists (without ``overwrite``), its folder does not, the parts differ in which labels
        they carry, a part's graphs are missing or do not match it, or a write failed.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        r_max: float | None = None,
        edges: bool = True,
        compression: str | None = None,
        overwrite: bool = False,
        fault: str = "hdf5",
    ) -> None:
        self.path = Path(path)
        self._fault = fault  # this write's name for the kill-recovery tests' fault injection (equiforce.faults)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: file exists (pass overwrite=True to replace it)")
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path}: directory {self.path.parent} does not exist")
        if r_max is not None and not (np.isfinite(r_max) and r_max > 0):
            raise DataError(f"r_max must be a positive number of Å, got {r_max}")
        self.r_max = r_max
        self.edges = bool(edges) and r_max is not None
        self.compression = compression
        self._target = AtomicFile(self.path, fault=fault)
        self._tmp = self._target.tmp
        self._labels: tuple[str, ...] | None = None
        self._counts = {"structure": 0, "atom": 0, "edge": 0}
        try:
            with _h5_errors(self.path, "write"):
                # metadata gathered in 1 MiB blocks from the start of the file, not appended at its end on closing:
                # a file cut short then still names its lost frames
                self._file = h5py.File(self._tmp, "w", libver=_LIBVER, meta_block_size=1 << 20)
                _write_header(self._file)
                self._commit_counts()
        except BaseException:
            if getattr(self, "_file", None) is not None and self._file.id.valid:
                self._file.close()
            self._target.discard()
            raise

    def __enter__(self) -> HDF5Writer:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def n_structures(self) -> int:
        """Structures appended so far."""
        return self._counts["structure"]

    def _commit_counts(self) -> None:
        f = self._file
        f.attrs["n_structures"] = self._counts["structure"]
        f.attrs["n_total_atoms"] = self._counts["atom"]
        if self.r_max is not None:
            f.attrs["r_max"] = float(self.r_max)
            f.attrs["n_total_edges"] = self._counts["edge"]

    def _create(self, labels: tuple[str, ...]) -> None:
        specs = [(name, "atom" if per_atom else "structure", tail, dt) for name, (per_atom, tail, dt) in _SPEC.items()]
        specs = [s for s in specs if s[0] in _REQUIRED or s[0] in labels]
        if self.r_max is not None:
            specs.append(("n_edges", "structure", (), np.int64))
        if self.edges:
            specs += [(name, "edge", tail, dt) for name, (tail, dt) in _EDGES.items()]
        for name, kind, tail, dtype in specs:
            self._file.create_dataset(
                name,
                shape=(0, *tail),
                dtype=dtype,
                maxshape=(None, *tail),
                chunks=(_CHUNK_ROWS[kind], *tail),
                compression=self.compression,
                fletcher32=True,
                track_times=False,
            )
        self._labels = labels

    def append(
        self,
        structures: StructureSet,
        graphs: Sequence[NeighbourGraph] | None = None,
        n_edges: np.ndarray | None = None,
    ) -> None:
        """Append a part (and, when the writer has ``r_max``, its neighbour graphs, ``graphs[k]`` of
        ``structures[k]``, built with that cutoff; a writer with ``edges=False`` may take their edge counts
        ``n_edges`` instead).

        Raises:
          DataError: label presence differs from the first part's, graphs missing or not matching, a write failure.
        """
        s = structures
        labels = _labels_of(s)
        if self._labels is None:
            with _h5_errors(self.path, "write"):
                self._create(labels)
        elif labels != self._labels:
            raise DataError(
                f"{self.path}: label mismatch: the file has {list(self._labels)}, a part has {list(labels)}"
            )
        if self.r_max is not None:
            if graphs is not None and len(graphs) == len(s):
                n_edges = np.array([g.n_edges for g in graphs], dtype=np.int64)
            elif self.edges or n_edges is None or np.shape(n_edges) != (len(s),):
                raise DataError(f"{self.path}: the writer stores graphs (r_max={self.r_max}); give one per structure")
            n_edges = np.asarray(n_edges, dtype=np.int64)
        rows = {"structure": len(s), "atom": s.n_total_atoms, "edge": int(n_edges.sum()) if self.r_max else 0}
        values: dict[str, np.ndarray] = {name: getattr(s, name) for name in (*_REQUIRED, *labels)}
        if self.r_max is not None:
            values["n_edges"] = n_edges
        if self.edges:
            cat = (lambda xs, shape: np.concatenate(xs)) if rows["edge"] else (lambda xs, shape: np.zeros(shape))
            values["edge_senders"] = cat([g.senders for g in graphs], (0,))
            values["edge_receivers"] = cat([g.receivers for g in graphs], (0,))
            values["edge_shifts"] = cat([g.shifts for g in graphs], (0, 3))
        with _h5_errors(self.path, "write"):
            for name, value in values.items():
                kind = _kind(name)
                ds = self._file[name]
                start = self._counts[kind]
                ds.resize(start + rows[kind], axis=0)
                ds[start:] = np.asarray(value, dtype=ds.dtype)
            for kind, count in rows.items():
                self._counts[kind] += count
            self._commit_counts()
        faults.point(self._fault, "appended")

    def close(self) -> Path:
        """Commit: close the temporary file and move it over ``path``. Returns the path."""
        if self._file.id.valid:
            with _h5_errors(self.path, "write"):
                if self._labels is None:
                    self._create(())
                self._file.close()
        faults.point(self._fault, "closed")
        try:
            return self._target.commit()
        except OSError as err:
            raise DataError(f"{self.path}: cannot move the finished file into place ({err})") from err

    def abort(self) -> None:
        """Discard the temporary file; ``path`` stays as it was."""
        if self._file.id.valid:
            self._file.close()
        self._target.discard()


class HDF5Dataset:
    """Lazy, chunked reader of a native HDF5 structure file: only requested structures are loaded.

    Only ``n_atoms`` (8 bytes per structure) is held in memory; :meth:`read` and :meth:`iter_chunks`
    read contiguous row ranges from disk, so a file larger than RAM can be trained on. Use as a
    context manager or call :meth:`close`.

    Raises:
      DataError: missing, corrupt, foreign or newer-version file (on construction), or a read failure.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such file")
        with _h5_errors(self.path, "open"):
            self._file = h5py.File(self.path, "r")
        self._datasets: dict[str, h5py.Dataset] = {}
        try:
            with _h5_errors(self.path, "read"):
                n, n_total, labels = _check_schema(self._file, self.path)
                n_atoms = np.asarray(self._file["n_atoms"][:n], dtype=np.int64)
        except BaseException:
            self._file.close()
            raise
        offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
        if offsets[-1] != n_total or (n and n_atoms.min() <= 0):
            self._file.close()
            bad = f" (structure {int(np.argmin(n_atoms))} has {int(n_atoms.min())})" if n and n_atoms.min() <= 0 else ""
            raise DataError(f"{self.path}: n_atoms does not add up to n_total_atoms={n_total} or has zeros{bad}")
        self.n_atoms = n_atoms
        self.offsets = offsets
        self.labels: tuple[str, ...] = labels
        #: cutoff (Å) of the stored edge counts and graphs, or None
        self.r_max: float | None = None
        #: ``[n]`` int64 edges of each structure within ``r_max`` (None without)
        self.n_edges: np.ndarray | None = None
        self.edge_offsets: np.ndarray | None = None
        #: whether the edges themselves are stored (:meth:`read_graphs`)
        self.has_graphs = False
        try:
            with _h5_errors(self.path, "read"):
                self._check_graphs(n)
        except BaseException:
            self._file.close()
            raise

    def _check_graphs(self, n: int) -> None:
        f = self._file
        if "n_edges" not in f:
            return
        r_max, n_total_edges = f.attrs.get("r_max"), f.attrs.get("n_total_edges")
        if not isinstance(r_max, float | np.floating) or not np.isfinite(r_max) or r_max <= 0:
            raise DataError(f"{self.path}: the file has n_edges but no valid r_max attribute ({r_max!r})")
        if not isinstance(n_total_edges, int | np.integer) or n_total_edges < 0:
            raise DataError(
                f"{self.path}: attribute n_total_edges must be a non-negative integer, got {n_total_edges!r}"
            )
        ds = f["n_edges"]
        if ds.ndim != 1 or ds.dtype.kind not in "iu" or ds.shape[0] < n:
            raise DataError(
                f"{self.path}: dataset 'n_edges' has shape {ds.shape} / dtype {ds.dtype}, expected ({n},) ints"
            )
        n_edges = np.asarray(ds[:n], dtype=np.int64)
        edge_offsets = np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64)
        if edge_offsets[-1] != n_total_edges or (n and n_edges.min() < 0):
            raise DataError(f"{self.path}: n_edges does not add up to n_total_edges={int(n_total_edges)}")
        present = [name for name in _EDGES if name in f]
        if present:
            if len(present) != len(_EDGES):
                raise DataError(f"{self.path}: incomplete neighbour graphs: only {present} of {list(_EDGES)}")
            for name, (tail, _) in _EDGES.items():
                d = f[name]
                if d.shape[1:] != tail or d.dtype.kind not in "iu" or d.shape[0] < n_total_edges:
                    raise DataError(
                        f"{self.path}: dataset {name!r} has shape {d.shape}, expected ({n_total_edges}, *{tail})"
                    )
        self.r_max = float(r_max)
        self.n_edges = n_edges
        self.edge_offsets = edge_offsets
        self.has_graphs = bool(present)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.n_atoms.size)

    @property
    def n_total_atoms(self) -> int:
        return int(self.offsets[-1])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HDF5Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HDF5Dataset({str(self.path)!r}, n_structures={len(self)}, labels={list(self.labels)})"

    # ------------------------------------------------------------------ reading
    def _dataset(self, name: str) -> h5py.Dataset:
        """The open dataset ``name`` (looked up once: h5py's lookup costs as much as a small read)."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self._file[name]
        return ds

    def _read_runs(self, runs: Sequence[tuple[int, int]]) -> StructureSet:
        """Structures ``a..b-1`` of each ``(a, b)`` run, concatenated in order (one HDF5 read per dataset)."""
        out: dict[str, np.ndarray | None] = {}
        atom_ranges = [(int(self.offsets[a]), int(self.offsets[b])) for a, b in runs]
        with _h5_errors(self.path, f"read {_describe_runs(runs)} of"):
            for name in (*_REQUIRED, *_LABELS):
                if name not in self.labels and name not in _REQUIRED:
                    out[name] = None
                    continue
                per_atom = _SPEC[name][0]
                if name == "n_atoms":
                    parts = [self.n_atoms[a:b] for a, b in runs]
                    out[name] = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
                else:
                    # no cast here: StructureSet checks values in the file's dtype (an int64 atomic number of
                    # 2**32 + 6 must be refused, not wrapped to carbon) and converts
                    out[name] = _read_ranges(self._dataset(name), atom_ranges if per_atom else runs)
        try:
            return StructureSet(**out)
        except DataError as err:
            raise DataError(f"{self.path}: bad data in file: {err}") from err

    def _read_graph_runs(self, runs: Sequence[tuple[int, int]]) -> list[NeighbourGraph]:
        """The stored neighbour graphs of the structures of each ``(a, b)`` run, in order."""
        if not self.has_graphs:
            raise DataError(f"{self.path}: the file holds no neighbour graphs (write it with equiforce preprocess)")
        eo = self.edge_offsets
        graphs = []
        with _h5_errors(self.path, f"read the graphs of {_describe_runs(runs)} of"):
            ranges = [(int(eo[a]), int(eo[b])) for a, b in runs]
            arrays = [np.asarray(_read_ranges(self._dataset(name), ranges), dtype=np.int32) for name in _EDGES]
            start = 0
            for k in (k for a, b in runs for k in range(a, b)):
                stop = start + int(self.n_edges[k])
                graph = NeighbourGraph(*(x[start:stop] for x in arrays))
                start = stop
                n = int(self.n_atoms[k])
                if graph.n_edges and (
                    min(graph.senders.min(), graph.receivers.min()) < 0
                    or max(graph.senders.max(), graph.receivers.max()) >= n
                ):
                    raise DataError(f"{self.path}: the graph of structure {k} names an atom outside its {n} atoms")
                graphs.append(graph)
        return graphs

    def _runs(
        self, indices: Sequence[int] | np.ndarray | slice | None
    ) -> tuple[list[tuple[int, int]], np.ndarray | None]:
        """Sorted runs of distinct structures and how to reorder them into ``indices`` (None: in order)."""
        n = len(self)
        if indices is None:
            return [(0, n)], None
        if isinstance(indices, slice):
            indices = np.arange(n)[indices]
        idx = np.asarray(indices).reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {self.path} with {n} structures")
        idx = np.where(idx < 0, idx + n, idx)
        uniq, inverse = np.unique(idx, return_inverse=True)
        breaks = np.nonzero(np.diff(uniq) != 1)[0] + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, breaks) if r.size]
        same = uniq.size == idx.size and np.array_equal(uniq, idx)
        return runs, None if same else inverse.reshape(-1)

    def read_graphs(self, indices: Sequence[int] | np.ndarray | slice | None = None) -> list[NeighbourGraph]:
        """The stored neighbour graphs (cutoff :attr:`r_max`) of the structures at ``indices``, in that order.

        Returns:
          One :class:`~equiforce.data.neighbours.NeighbourGraph` per index (int32 senders, receivers, shifts).

        Raises:
          IndexError: an index is out of range.
          DataError: the file holds no graphs, cannot be read, or a graph names an atom outside its structure.
        """
        runs, order = self._runs(indices)
        graphs = self._read_graph_runs(runs)
        return graphs if order is None else [graphs[i] for i in order]

    def read(self, indices: Sequence[int] | np.ndarray | slice | None = None) -> StructureSet:
        """Load the structures at ``indices`` (in that order; duplicates allowed), or all with None.

        Args:
          indices: int array-like (negative counts from the end), a slice, or None.

        Returns:
          A :class:`StructureSet` (float64 labels, ASE units).

        Raises:
          IndexError: an index is out of range.
          DataError: the file cannot be read or holds invalid data.
        """
        runs, order = self._runs(indices)
        s = self._read_runs(runs)
        return s if order is None else s.subset(order)

    def iter_chunks(self, chunk_size: int, start: int = 0, stop: int | None = None) -> Iterator[StructureSet]:
        """Yield consecutive chunks of ``chunk_size`` structures (the last may be shorter).

        Raises:
          DataError: ``chunk_size`` < 1 or a read failure.
        """
        if chunk_size < 1:
            raise DataError(f"chunk_size must be >= 1, got {chunk_size}")
        stop = len(self) if stop is None else min(stop, len(self))
        for a in range(start, stop, chunk_size):
            yield self._read_runs([(a, min(a + chunk_size, stop))])


def _read_ranges(ds: h5py.Dataset, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Rows ``lo..hi-1`` of each ``(lo, hi)`` range of ``ds`` (sorted, not overlapping), concatenated, in the
    dataset's own dtype: one HDF5 read of the union of the ranges (a hyperslab selection), not one per range."""
    ranges = [(lo, hi) for lo, hi in ranges if hi > lo]
    tail = ds.shape[1:]
    if len(ranges) <= 1:
        return ds[ranges[0][0] : ranges[0][1]] if ranges else np.zeros((0, *tail), ds.dtype)
    file_space = ds.id.get_space()
    file_space.select_none()
    for lo, hi in ranges:
        file_space.select_hyperslab((lo, *(0,) * len(tail)), (hi - lo, *tail), op=h5py.h5s.SELECT_OR)
    out = np.empty((sum(hi - lo for lo, hi in ranges), *tail), ds.dtype)
    ds.id.read(h5py.h5s.create_simple(out.shape), file_space, out)
    return out


def _describe_runs(runs: Sequence[tuple[int, int]]) -> str:
    """``"structures 4-9, 12"`` for error messages (the first few runs)."""
    parts = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in runs[:4]]
    return "structures " + ", ".join(parts) + (", ..." if len(runs) > 4 else "")


def read_hdf5(path: PathLike, indices: Sequence[int] | np.ndarray | slice | None = None) -> StructureSet:
    """Read a native HDF5 structure file (all structures, or those at ``indices``) into memory.

    Returns:
      A :class:`StructureSet` in ASE units (Å, eV, eV/Å, eV/Å³), bit-identical to what was written.

    Raises:
      DataError: missing, corrupt, foreign or newer-version file, or invalid data.
      IndexError: an index is out of range.
    """
    with HDF5Dataset(path) as ds:
        return ds.read(indices)
