"""Label a batch of frames in worker processes; append each label to the generation's file as soon as it is done.

Files of one batch (all in one folder):

* ``labelled.extxyz``: the labelled frames, one complete extxyz frame appended per label (written in one
  ``write`` call, then flushed and fsynced). A kill can leave a torn last frame; :func:`read_frames` detects
  it (a frame with fewer lines than its atom count says, or a last line without its newline) and drops it, and
  :func:`label_batch` cuts the file back to its complete frames before appending. Each frame carries
  ``info["al_id"]`` (the candidate's id), the labels (energy eV, forces eV/Å, stress eV/Å³ for periodic
  cells) and whatever per-atom arrays the candidate had (the loop sets ``sigma_forces``, the model's σ_F per
  atom in eV/Å, which ASE's GUI and OVITO colour by).
* ``failures.jsonl``: one JSON line per frame the labeller failed on (``al_id``, ``reason``), appended the same
  way; a torn last line is dropped.
* ``pending/<al_id>.extxyz``: a worker writes its finished label here (atomically) before handing it back; the
  parent appends it to ``labelled.extxyz`` and deletes it. A label that was computed but not yet appended when
  the process was killed is therefore appended on resume, not computed again.

Between receiving a label and appending it the parent passes the fault point ``al-label: computed`` (see
:mod:`equiforce.faults`), and after appending ``al-label: appended``.

Workers: ``workers == 1`` labels in this process (no pool); more start that many processes with the
``spawn`` start method (no inherited JAX state), each building its own calculator once. A worker whose
parent has died stops before taking another frame.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equiforce import faults
from equiforce.atomic import atomic_write_bytes

__all__ = ["FAILURES", "LABELLED", "label_batch", "read_failures", "read_frames"]

LABELLED = "labelled.extxyz"
FAILURES = "failures.jsonl"
PENDING = "pending"


def _frame_text(atoms: Any) -> str:
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def _complete_prefix(text: str) -> int:
    """Length in characters of the complete extxyz frames at the start of ``text``."""
    lines = text.splitlines(keepends=True)
    pos, i, good = 0, 0, 0
    while i < len(lines):
        head = lines[i].strip()
        if not head:  # blank line between frames (not written by ase, tolerated)
            if not lines[i].endswith("\n"):
                break
            pos += len(lines[i])
            i += 1
            good = pos
            continue
        try:
            n = int(head)
        except ValueError:
            break
        block = lines[i : i + n + 2]
        if len(block) < n + 2 or not block[-1].endswith("\n"):
            break
        pos += sum(len(x) for x in block)
        i += n + 2
        good = pos
    return good


def read_frames(path: str | os.PathLike, *, repair: bool = False) -> list[Any]:
    """The complete frames of an appended extxyz file (``[]`` when it does not exist).

    A torn last frame (a kill while appending) is dropped; with ``repair`` the file is cut back to its
    complete frames (atomically).
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    good = _complete_prefix(text)
    if repair and good != len(text):
        atomic_write_bytes(path, text[:good].encode())
    if good == 0:
        return []
    return list(ase.io.read(io.StringIO(text[:good]), index=":", format="extxyz"))


def read_failures(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a failures file (``[]`` when absent); a torn last line is dropped (and cut off with
    ``repair``)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    keep = text[: text.rfind("\n") + 1]
    records = []
    for line in keep.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if repair and keep != text:
        atomic_write_bytes(path, keep.encode())
    return records


def _append(path: Path, text: str) -> None:
    """Append ``text`` in one write, then flush and fsync."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _labelled_atoms(atoms: Any, outcome: Any, al_id: str) -> Any:
    from ase.calculators.singlepoint import SinglePointCalculator

    a = atoms.copy()
    a.info["al_id"] = al_id
    a.info["label_seconds"] = float(outcome.seconds)
    results = {"energy": outcome.energy, "forces": outcome.forces}
    if outcome.stress is not None:
        results["stress"] = outcome.stress
    a.calc = SinglePointCalculator(a, **results)
    return a


# -- the worker side ---------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(spec: dict[str, Any], folder: str, parent: int) -> None:
    from equiforce.learning.labellers import build_calculator

    _WORKER.update(calc=build_calculator(spec), folder=folder, parent=parent)


def _label_one(al_id: str, frame_text: str) -> tuple[str, bool, str]:
    """Label one frame in a worker: ``(al_id, ok, reason_or_empty)``; a good label is left in
    ``pending/<al_id>.extxyz``."""
    import ase.io

    from equiforce.learning.labellers import label_frame

    if _WORKER.get("parent") is not None and os.getppid() != _WORKER["parent"]:
        os._exit(0)  # the loop that asked is gone: compute nothing more
    atoms = ase.io.read(io.StringIO(frame_text), format="extxyz")
    outcome = label_frame(_WORKER["calc"], atoms)
    if not outcome.ok:
        return al_id, False, str(outcome.reason)
    text = _frame_text(_labelled_atoms(atoms, outcome, al_id))
    atomic_write_bytes(Path(_WORKER["folder"]) / PENDING / f"{al_id}.extxyz", text.encode())
    return al_id, True, ""


# -- the parent side ---------------------------------------------------------------------------------------------


def _commit_pending(folder: Path, done: set[str], on_label: Callable[[str], None] | None) -> None:
    """Append the labels a worker finished but the parent had not appended (a kill in between)."""
    pending = folder / PENDING
    if not pending.is_dir():
        return
    for f in sorted(pending.glob("*.extxyz")):
        al_id = f.stem
        if al_id not in done:
            frames = read_frames(f)
            if frames:  # a complete pending label (atomic write: complete or absent)
                _append(folder / LABELLED, f.read_text())
                done.add(al_id)
                if on_label:
                    on_label(al_id)
        f.unlink(missing_ok=True)


def label_batch(
    spec: dict[str, Any],
    frames: Sequence[Any],
    folder: str | os.PathLike,
    *,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Label every frame of ``frames`` not labelled or failed yet in ``folder``; resumable.

    Args:
      spec: the labeller spec (see :mod:`equiforce.learning.labellers`).
      frames: ``ase.Atoms``, each with a unique ``info["al_id"]``; per-atom arrays (e.g. ``sigma_forces``) and
        ``info`` are kept in the labelled file.
      folder: the batch's folder (``labelled.extxyz``, ``failures.jsonl``, ``pending/``).
      workers: labelling processes (1: in this process).
      log: receives one line per failure.

    Returns:
      ``(labelled, failures)``: every labelled frame of the folder (``ase.Atoms`` with a
      ``SinglePointCalculator``), and the failure records (``al_id``, ``reason``).

    Raises:
      LabellerError: the labeller cannot be built (before any frame is labelled).
      ValueError: frames without a unique ``info["al_id"]``.
    """
    from equiforce.learning.labellers import build_calculator

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PENDING).mkdir(exist_ok=True)
    log = log or (lambda _m: None)
    ids = [str(a.info.get("al_id", "")) for a in frames]
    if any(not i for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("every frame to label needs a unique info['al_id']")
    done = {str(a.info["al_id"]) for a in read_frames(folder / LABELLED, repair=True)}
    failed = {str(r["al_id"]) for r in read_failures(folder / FAILURES, repair=True)}
    _commit_pending(folder, done, None)
    todo = [(i, a) for i, a in zip(ids, frames, strict=True) if i not in done and i not in failed]

    def record_failure(al_id: str, reason: str) -> None:
        _append(folder / FAILURES, json.dumps({"al_id": al_id, "reason": reason}) + "\n")
        log(f"labelling {al_id} failed: {reason}")

    def commit(al_id: str) -> None:
        f = folder / PENDING / f"{al_id}.extxyz"
        faults.point("al-label", "computed")
        _append(folder / LABELLED, f.read_text())
        faults.point("al-label", "appended")
        f.unlink(missing_ok=True)

    if todo and workers <= 1:
        _init_worker(spec, str(folder), None)
        for al_id, atoms in todo:
            _, ok, reason = _label_one(al_id, _frame_text(atoms))
            commit(al_id) if ok else record_failure(al_id, reason)
    elif todo:
        build_calculator(spec)  # a labeller that cannot be built fails here, not in every worker
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(spec, str(folder), os.getpid()),
        ) as pool:
            futures = {pool.submit(_label_one, al_id, _frame_text(a)): al_id for al_id, a in todo}
            for fut in concurrent.futures.as_completed(futures):
                al_id = futures[fut]
                try:
                    _, ok, reason = fut.result()
                except Exception as err:  # a worker that died (segfault, out of memory) fails its frame
                    ok, reason = False, f"the labelling worker died ({type(err).__name__}: {err})"
                commit(al_id) if ok else record_failure(al_id, reason)
    labelled = read_frames(folder / LABELLED)
    return labelled, read_failures(folder / FAILURES)


def sigma_array(atoms: Any) -> np.ndarray | None:
    """The per-atom σ_F (eV/Å) stored with a frame, or None."""
    return atoms.arrays.get("sigma_forces")
