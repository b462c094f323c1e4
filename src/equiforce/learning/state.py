"""The state file of an active-learning run (``OUTPUT_DIR/state.json``), written atomically after every step.

It holds what a resumed run needs: the config it was started with, the current model, the labels used, each
replica's next start structure, and one record per generation whose ``step`` says how far it got
(``md`` → ``selected`` → ``labelled`` → ``trained`` → ``reported``). A generation whose step is ``reported`` is
never redone; a label in ``labelled.extxyz`` or ``failures.jsonl`` is never computed again
(:mod:`equiforce.learning.labelling`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from equiforce.atomic import atomic_write_bytes

__all__ = ["STATE", "STEPS", "file_sha256", "load_state", "save_state"]

STATE = "state.json"
#: the steps of a generation, in order
STEPS = ("started", "md", "selected", "labelled", "trained", "reported")


def load_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The state of the run in ``folder``, or None for a new run.

    Raises:
      ValueError: a state file that is not JSON (it is written atomically, so only a foreign file is).
    """
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not an active-learning state file ({err})") from None


def save_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state atomically."""
    atomic_write_bytes(Path(folder) / STATE, (json.dumps(state, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
