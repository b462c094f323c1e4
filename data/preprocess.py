"""``equiforce preprocess``: structure files → one native HDF5 file with neighbour graphs, in parallel and
resumably.

The inputs (anything :func:`~equiforce.data.readers.read_structures` reads: extxyz, npz, ASE db, HDF5, ...)
are read one file at a time and cut into parts of ``chunk_size`` structures. Worker processes
(``concurrent.futures``, one per core by default) build each part's neighbour graphs within ``r_max`` and
write the part to its own small file, ``OUT.parts/NNNN_MMMMMM.h5``, atomically (temporary file, then
rename). When every part is there, they are joined in order into a temporary file beside ``OUT`` that is
renamed to ``OUT`` last; then the parts folder is removed.

Resuming: the parts folder records the job (inputs with size and modification time, cutoff, options). Run
the same command again after an interruption and the parts already written are kept; a part that is
missing, half-written (only its temporary file exists) or unreadable is done again, and the temporary file of
an interrupted join is removed. The result is the same file, byte for byte, as an uninterrupted run's.
Different settings for the same ``OUT`` are an error (remove the parts folder to start over).

Memory: one input file at a time (the readers load a whole file), plus the parts in flight.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.atomic import atomic_write_bytes
from equiforce.data.errors import DataError
from equiforce.data.hdf5 import HDF5Dataset, HDF5Writer
from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.data.readers import read_structures
from equiforce.data.structures import StructureSet

__all__ = ["parts_folder", "preprocess"]

PathLike = str | os.PathLike
JOB_FILE = "job.json"


def parts_folder(out: PathLike) -> Path:
    """The folder of the parts of an unfinished ``preprocess`` into ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.parts"


def _write_part(path: str, s: StructureSet, r_max: float, edges: bool, compression: str | None, first: int) -> str:
    """Worker: build the graphs of one part and write it (atomically) to ``path``."""
    with HDF5Writer(
        path, r_max=r_max, edges=edges, compression=compression, overwrite=True, fault="preprocess-part"
    ) as w:
        w.append(s, build_neighbour_graphs(s, r_max, first_index=first))
    return path


def _part_ok(path: Path, n: int) -> bool:
    """Whether a part file is complete: readable, with ``n`` structures and their edge counts."""
    if not path.is_file():
        return False
    try:
        with HDF5Dataset(path) as ds:
            return len(ds) == n and ds.n_edges is not None
    except DataError:
        return False


def _job(inputs: Sequence[Path], r_max: float, options: dict[str, Any]) -> dict[str, Any]:
    files = []
    for p in inputs:
        st = p.stat()
        files.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"inputs": files, "r_max": r_max, **options}


def preprocess(
    inputs: Sequence[PathLike],
    out: PathLike,
    r_max: float,
    *,
    format: str | None = None,
    energy_unit: str = "eV",
    chunk_size: int = 1000,
    workers: int | None = None,
    edges: bool = True,
    compression: str | None = "lzf",
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    on_part: Callable[[int], None] | None = None,
) -> Path:
    """Convert structure files into one native HDF5 file with neighbour graphs (see the module docstring).

    Args:
      inputs: the files, joined in this order (each read by :func:`~equiforce.data.readers.read_structures`).
      out: the HDF5 file to write.
      r_max: cutoff of the neighbour graphs, Å (the training config's ``model.r_max``).
      format: reader format for every input (``None``: from the file name and content).
      energy_unit: energy unit of the inputs where the format does not fix it; stored in eV.
      chunk_size: structures per part (the unit of work and of resuming).
      workers: worker processes (``None``: one per core; 1: no worker processes).
      edges: store the edges; ``False``: only each structure's edge count (smaller file; the trainer then
        builds the graphs as it reads).
      compression: h5py filter of the output (``"lzf"``, ``"gzip"`` or ``None``); lossless.
      overwrite: replace an existing ``out``.
      log: receives progress lines.
      on_part: called with the number of parts written so far in this run, after each (tests use it to
        interrupt a run).

    Returns:
      The path of the file written.

    Raises:
      DataError: no inputs, an unreadable input, bad data (naming the input file and structure), ``out``
        exists (without ``overwrite``), or a parts folder left by a run with other settings.
    """
    log = log or (lambda _msg: None)
    paths = [Path(p) for p in inputs]
    out = Path(out)
    if not paths:
        raise DataError("preprocess needs at least one input file")
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: file exists (pass --overwrite to replace it)")
    if not (r_max > 0 and np.isfinite(r_max)):
        raise DataError(f"r_max must be a positive number of Å, got {r_max}")
    if chunk_size < 1:
        raise DataError(f"chunk_size must be >= 1, got {chunk_size}")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    options = {
        "format": format,
        "energy_unit": energy_unit,
        "chunk_size": chunk_size,
        "edges": edges,
        "compression": compression,
    }
    job = _job(paths, float(r_max), options)
    parts = parts_folder(out)
    job_file = parts / JOB_FILE
    if job_file.is_file():
        try:
            previous = json.loads(job_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != job:
            raise DataError(
                f"{parts} holds the parts of an interrupted preprocess with other inputs or settings; run that "
                "command again to finish it, or remove the folder to start over"
            )
        log(f"resuming from {parts}")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(job_file, json.dumps(job, indent=1).encode())
    for stale in parts.glob(".*.tmp"):  # temporary files of parts a kill interrupted
        stale.unlink(missing_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # the joined file's, when a kill interrupted the join
        stale.unlink(missing_ok=True)

    kwargs = {} if energy_unit == "eV" else {"energy_unit": energy_unit}
    all_parts: list[Path] = []
    written = kept = 0
    pool = None
    if workers > 1:
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for i, path in enumerate(paths):
            s = read_structures(path, format=format, **kwargs)
            n = len(s)
            names = [parts / f"{i:04d}_{j:06d}.h5" for j in range(-(-n // chunk_size))]
            all_parts += names
            todo = []
            for j, name in enumerate(names):
                a, b = j * chunk_size, min((j + 1) * chunk_size, n)
                if _part_ok(name, b - a):
                    kept += 1
                else:
                    todo.append((name, a, b))
            pending: set[cf.Future] = set()

            def submit(name: Path, a: int, b: int, s: StructureSet = s, path: Path = path) -> Any:
                sub = s.subset(np.arange(a, b))
                if pool is None:
                    try:
                        return _write_part(str(name), sub, r_max, edges, compression, a)
                    except DataError as err:
                        raise DataError(f"{path}: {err}") from None
                return pool.submit(_write_part, str(name), sub, r_max, edges, compression, a)

            for name, a, b in todo:
                if pool is None:
                    submit(name, a, b)
                    written += 1
                    if on_part is not None:
                        on_part(written)
                    continue
                pending.add(submit(name, a, b))
                if len(pending) >= 2 * workers:  # bounded memory: a few parts in flight
                    written += _collect(pending, path, on_part, written, cf.FIRST_COMPLETED)
            written += _collect(pending, path, on_part, written, cf.ALL_COMPLETED)
            log(f"{path}: {n} structures in {len(names)} parts ({len(names) - len(todo)} already done)")
            del s
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    n_total = 0
    with HDF5Writer(out, r_max=r_max, edges=edges, compression=compression, overwrite=overwrite) as w:
        for name in all_parts:
            with HDF5Dataset(name) as ds:
                s = ds.read()
                if edges:
                    w.append(s, ds.read_graphs())
                else:
                    w.append(s, n_edges=ds.n_edges)
                n_total += len(s)
    shutil.rmtree(parts, ignore_errors=True)
    log(f"wrote {out}: {n_total} structures, r_max = {r_max} Å ({written} parts written, {kept} kept)")
    return out


def _collect(pending: set[cf.Future], path: Path, on_part: Callable[[int], None] | None, before: int, when: str) -> int:
    """Wait for parts (the first finished, or all); the number that finished."""
    done, _ = cf.wait(pending, return_when=when)
    count = 0
    for fut in done:
        pending.discard(fut)
        try:
            fut.result()
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        count += 1
        if on_part is not None:
            on_part(before + count)
    return count
