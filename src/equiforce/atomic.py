"""Atomic file writes: a reader never sees a half-written file, and a kill leaves the old file or the new one.

The one writer of whole files in equiforce (model files, checkpoints, JSON, plots, native HDF5 files, the
repaired H5MD trajectory, downloads, ...); it sits at the bottom of the layers of docs/architecture.md so that
every part can use it.

* :func:`atomic_write_bytes` writes bytes held in memory.
* :func:`atomic_path` (a context manager) hands out a temporary path for a library that writes by file name
  (``h5py.File``, ``ase.io.write``, a download, ...) and puts it in place when the block ends normally.
* :class:`AtomicFile` is the same for a writer whose end is not a ``with`` block (``commit`` / ``discard``).

The temporary file is ``.<name>.<random hex>.tmp`` beside the target (same file system, so the rename is
atomic). It gets the permissions a plain ``open(path, "w")`` would give: those of the file it replaces, or
``0o666`` less the process umask for a new file (``tempfile.mkstemp`` would make it 0600, unreadable to the
group). Before the rename its data are ``fsync``'ed, after it the folder, so a power cut leaves the old file
or the complete new one.

Each write passes the fault-injection points (:mod:`equiforce.faults`) ``<fault>:tmp-created`` (the
temporary file exists), ``<fault>:tmp-synced`` (its data are on disk) and ``<fault>:replaced`` (it is in
place); :func:`atomic_write_bytes` adds ``<fault>:tmp-written`` between the first two.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from equiforce import faults

__all__ = ["AtomicFile", "atomic_path", "atomic_write_bytes"]


def _create_tmp(path: Path) -> Path:
    """A new empty file ``.<name>.<hex>.tmp`` beside ``path``, mode ``0o666`` less the umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            # O_EXCL: never follows or reuses someone else's file; mode 0o666 is reduced by the umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) data to disk; a folder that cannot be opened (Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:
        if path.is_file():
            raise  # a folder's fsync is not supported everywhere; a file's must work
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside ``path`` that replaces ``path`` on :meth:`commit` (or is removed by :meth:`discard`).

    Use it as a context manager (``with AtomicFile(path) as tmp: ...``; leaving the block normally commits, an
    exception discards) or call :meth:`commit` / :meth:`discard` yourself. Write to :attr:`tmp` by name and close
    it before committing.

    Args:
      path: the target file; parent folders are created.
      fault: this write's name for the kill-recovery tests' fault injection (:mod:`equiforce.faults`).

    Attributes:
      path: the target (:class:`pathlib.Path`).
      tmp: the temporary file, created empty with the target's future permissions (module docstring).

    Raises:
      OSError: the folder cannot be created or written.
    """

    def __init__(self, path: str | os.PathLike, *, fault: str = "file") -> None:
        self.path = Path(path)
        self.fault = fault
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _create_tmp(self.path)
        self._done = False
        faults.point(fault, "tmp-created")

    def commit(self) -> Path:
        """fsync the temporary file, ``os.replace`` it over the target, fsync the folder. Returns the target.

        Raises:
          OSError: the rename or the fsync failed (the temporary file is then removed, the target unchanged).
        """
        if self._done:
            raise RuntimeError(f"{self.path}: this atomic write was already committed or discarded")
        try:
            if self.path.exists():  # at the end, so that a writer may reopen the file even if the target is read-only
                shutil.copymode(self.path, self.tmp)
            _fsync_path(self.tmp)
            faults.point(self.fault, "tmp-synced")
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._done = True
        _fsync_path(self.path.parent)
        faults.point(self.fault, "replaced")
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (idempotent); the target stays as it was."""
        self._done = True
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_path(path: str | os.PathLike, *, fault: str = "file") -> AtomicFile:
    """Context manager yielding a temporary path beside ``path`` that replaces ``path`` when the block ends.

    ``with atomic_path(out) as tmp: h5py.File(tmp, "w") ...`` (close the file inside the block): on a normal
    exit the temporary file is fsync'ed and renamed over ``out``; on an exception it is removed and ``out`` is
    untouched. Permissions and fault points: module docstring.

    Raises:
      OSError: the folder cannot be created or written, the rename failed.
    """
    return AtomicFile(path, fault=fault)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fault: str = "file") -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    ``fault`` names this write for the kill-recovery tests' fault injection (:mod:`equiforce.faults`); its
    points are ``tmp-created``, ``tmp-written``, ``tmp-synced``, ``replaced``.

    The file gets the permissions a plain ``open(path, "wb")`` would give: those of the file it replaces,
    or ``0o666`` less the process umask for a new file. Parent folders are created.

    Raises:
      OSError: the folder is not writable, the disk is full, ...
    """
    with atomic_path(path, fault=fault) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
        faults.point(fault, "tmp-written")
