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

Writes are atomic: :func:`write_hdf5` (and :func:`append_hdf5` with ``atomic=True``) write a
temporary file in the same directory and ``os.replace`` it over the target; a new file gets the usual
permissions (``0o666`` less the umask), a replaced or appended one keeps its mode. Values round-trip
bit-exactly.

Corruption is detected, not read: files are written with HDF5 1.8+ metadata (superblock v2 and object
headers with checksums; ``libver=("v108", "v110")``), the string attributes are fixed-length (stored in
the checksummed object header, not in the unchecked global heap, where a single flipped bit can make
the HDF5 library loop forever) and every dataset carries the Fletcher-32 checksum filter, so a flipped
bit in data or metadata is a :class:`DataError`, never a silently different value. Files written by
earlier versions (without these checksums) are still read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HDF5Dataset", "append_hdf5", "read_hdf5", "write_hdf5"]

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


@contextmanager
def _h5_errors(path: PathLike, what: str) -> Iterator[None]:
    """Turn h5py/OS errors into a DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except (OSError, KeyError, IndexError, AttributeError, ValueError, TypeError, RuntimeError, MemoryError) as err:
        raise DataError(f"{path}: cannot {what} HDF5 file ({type(err).__name__}: {err})") from err


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


def _create_datasets(f: h5py.File, s: StructureSet, compression: str | None) -> None:
    f.attrs["format"] = _fixed_string(FORMAT_NAME)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["units"] = _fixed_string(json.dumps(UNITS, ensure_ascii=False))
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
        need = n_total if per_atom else n
        if ds.shape[0] < need:
            raise DataError(f"{path}: dataset {name!r} has {ds.shape[0]} rows, fewer than committed {need}")
    return n, n_total, labels


def _tmp_path(path: Path) -> Path:
    """A new empty file beside ``path`` with the permissions ``open(path, "w")`` would give: those of
    ``path`` if it exists, else ``0o666`` less the umask (``tempfile.mkstemp`` would give 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        if path.exists():
            shutil.copymode(path, tmp)
        return tmp
    raise DataError(f"{path}: cannot create a temporary file in {path.parent}")


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
    tmp = _tmp_path(path)
    try:
        with _h5_errors(path, "write"), h5py.File(tmp, "w", libver=_LIBVER) as f:
            _create_datasets(f, structures, compression)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
    tmp = _tmp_path(path)
    try:
        shutil.copyfile(path, tmp)
        with _h5_errors(path, "append to"), h5py.File(tmp, "r+") as f:
            _append_into(f, path, structures)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
            raise DataError(f"{self.path}: n_atoms does not add up to n_total_atoms={n_total} or has zeros")
        self.n_atoms = n_atoms
        self.offsets = offsets
        self.labels: tuple[str, ...] = labels

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
    def _read_runs(self, runs: Sequence[tuple[int, int]]) -> StructureSet:
        """Structures ``a..b-1`` of each ``(a, b)`` run, concatenated in order."""
        f = self._file
        out: dict[str, np.ndarray | None] = {}
        with _h5_errors(self.path, "read"):
            for name in (*_REQUIRED, *_LABELS):
                if name not in self.labels and name not in _REQUIRED:
                    out[name] = None
                    continue
                per_atom, tail, dtype = _SPEC[name]
                if name == "n_atoms":
                    parts = [self.n_atoms[a:b] for a, b in runs]
                else:
                    ds = f[name]
                    if per_atom:
                        parts = [ds[self.offsets[a] : self.offsets[b]] for a, b in runs]
                    else:
                        parts = [ds[a:b] for a, b in runs]
                # no cast here: StructureSet checks values in the file's dtype (an int64 atomic number of
                # 2**32 + 6 must be refused, not wrapped to carbon) and converts
                out[name] = np.concatenate(parts) if parts else np.zeros((0, *tail), dtype)
        try:
            return StructureSet(**out)
        except DataError as err:
            raise DataError(f"{self.path}: bad data in file: {err}") from err

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
        n = len(self)
        if indices is None:
            return self._read_runs([(0, n)])
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
        s = self._read_runs(runs)
        if uniq.size == idx.size and np.array_equal(uniq, idx):
            return s
        return s.subset(inverse.reshape(-1))

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
