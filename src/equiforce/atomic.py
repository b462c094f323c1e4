"""Atomic file writes: a reader never sees a half-written file, and a kill leaves the old file or the new one.

The one low-level writer of whole files in equiforce (model files, checkpoints, JSON, plots, ...); it sits at
the bottom of the layers of docs/architecture.md so that every part can use it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from equiforce import faults

__all__ = ["atomic_write_bytes"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fault: str = "file") -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    ``fault`` names this write for the kill-recovery tests' fault injection (:mod:`equiforce.faults`).

    The file gets the permissions a plain ``open(path, "wb")`` would give: those of the file it replaces,
    or ``0o666`` less the process umask for a new file (``tempfile.mkstemp`` would make it 0600).
    Parent folders are created.

    Raises:
      OSError: the folder is not writable, the disk is full, ...
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            # O_EXCL: never follows or reuses someone else's file; mode 0o666 is reduced by the umask
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"cannot create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "wb") as fh:
            if path.exists():
                shutil.copymode(path, tmp)
            faults.point(fault, "tmp-created")
            fh.write(data)
            fh.flush()
            faults.point(fault, "tmp-written")
            os.fsync(fh.fileno())
            faults.point(fault, "tmp-synced")
        os.replace(tmp, path)
        faults.point(fault, "replaced")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
