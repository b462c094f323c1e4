"""Deterministic fault injection for the kill-recovery tests: kill this process between the parts of a write.

Each writer whose crash safety matters calls :func:`point` between the parts of its write (for example
after the temporary file is written and before it is renamed into place). Normally the call does nothing
but read one environment variable. With

    EQUIFORCE_FAULT=<write>:<part>[:<occurrence>]

set, the process sends itself ``SIGKILL`` (``os._exit(137)`` where there is no ``SIGKILL``) the
``occurrence``-th time (1-based, default 1, counted in this process) it reaches that point, after printing
``EQUIFORCE_FAULT: killed at <write>:<part> (occurrence <n>)`` to stderr, so a test can tell that the kill
landed there. With ``EQUIFORCE_FAULT_TRACE=<file>`` every point reached is appended to that file as a line
``<write>:<part>`` (used to list the points a run passes).

The points (write: parts, in order). Every atomic file write (:mod:`equiforce.atomic`) passes
``tmp-created``, ``tmp-synced`` and ``replaced``; a writer adds its own parts between the first two.

==================  ==========================================================  ===========================
write               parts                                                       where
==================  ==========================================================  ===========================
``checkpoint``      ``tmp-created``, ``tmp-written``, ``tmp-synced``,           training checkpoint
                    ``replaced``
``model``           the same four                                               ``best.eqf``, ``model.eqf``
``file``            the same four (``atomic_path``: no ``tmp-written``)         other atomic files (JSON,
                                                                                plots, repaired H5MD,
                                                                                downloads, ...)
``h5md-frame``      ``appended``, ``flushed``, ``committed``                    MD trajectory frame
``restart-state``   ``slot-written``, ``slot-flushed``, ``activated``           MD restart state
``h5md-structure``  ``changed`` (objects created outside SWMR, not flushed)      first restart state, truncation
``metrics-line``    ``half-written``, ``written``                               training ``metrics.jsonl``
``preprocess-part`` ``tmp-created``, ``appended``, ``closed``, ``tmp-synced``,  ``OUT.parts/*.h5``
                    ``replaced``
``hdf5``            the same five (``write_hdf5``, ``append_hdf5``: no           other native HDF5 files
                    ``appended``, ``closed``)
``al-label``        ``computed``, ``appended``                                  an active-learning label
==================  ==========================================================  ===========================

This is a test hook, not a feature: nothing else reads these variables.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV", "TRACE_ENV", "point"]

ENV = "EQUIFORCE_FAULT"
TRACE_ENV = "EQUIFORCE_FAULT_TRACE"

_counts: dict[tuple[str, str], int] = {}


def _parse(spec: str) -> tuple[str, str, int]:
    fields = spec.split(":")
    if len(fields) not in (2, 3) or not all(fields[:2]):
        raise ValueError(f"{ENV}={spec!r}: expected <write>:<part>[:<occurrence>]")
    try:
        occurrence = int(fields[2]) if len(fields) == 3 else 1
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: the occurrence must be an integer") from None
    if occurrence < 1:
        raise ValueError(f"{ENV}={spec!r}: the occurrence counts from 1")
    return fields[0], fields[1], occurrence


def point(write: str, part: str) -> None:
    """Mark the point after ``part`` of ``write``; kill the process here when ``EQUIFORCE_FAULT`` names it.

    Args:
      write: the kind of write (see the module docstring), e.g. ``"checkpoint"``.
      part: the part just finished, e.g. ``"tmp-written"``.

    Raises:
      ValueError: ``EQUIFORCE_FAULT`` is set but malformed.
    """
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{write}:{part}\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_write, want_part, occurrence = _parse(spec)
    if (write, part) != (want_write, want_part):
        return
    n = _counts[write, part] = _counts.get((write, part), 0) + 1
    if n != occurrence:
        return
    sys.stderr.write(f"{ENV}: killed at {write}:{part} (occurrence {n})\n")
    sys.stderr.flush()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)
