"""Training checkpoints: the full training state in one pickle-free msgpack file, written atomically.

A checkpoint holds the parameters, optimiser state, EMA parameters, step counter and a JSON block of
host-side state (epoch, plateau scheduler, early stopping, history, elapsed time), so ``--resume``
continues exactly where the run stopped. Restoring needs a template of the same structure (built from
the config), so a checkpoint of another model or config is an error, never a silent mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np

from equiforce.potentials.model_io import atomic_write_bytes
from equiforce.training.config import ConfigError

__all__ = ["CheckpointError", "CheckpointMismatchError", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "equiforce-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the current configuration."""


class CheckpointMismatchError(CheckpointError, ConfigError):
    """A readable checkpoint written for another model or configuration (also a :class:`ConfigError`)."""


def save_checkpoint(path: str | Path, state: Any, host_state: dict[str, Any]) -> None:
    """Write ``state`` (a pytree of arrays) and ``host_state`` (JSON-serialisable) to ``path`` atomically."""
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "host": json.dumps(host_state),
        "state": flax.serialization.to_state_dict(jax.tree.map(np.asarray, state)),
    }
    atomic_write_bytes(path, flax.serialization.msgpack_serialize(doc), fault="checkpoint")


def load_checkpoint(path: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` into the structure of ``template``.

    Raises:
      CheckpointError: unreadable/corrupt file, other format or version, structure/shape mismatch.
    """
    path = Path(path)
    try:
        doc = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an equiforce checkpoint")
    if doc.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {doc.get('version')} is not supported")
    try:
        saved = doc["state"]
        host = json.loads(doc["host"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} is a corrupt checkpoint: {err}") from err
    try:
        state = flax.serialization.from_state_dict(template, saved)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointMismatchError(f"{path} does not match this configuration: {err}") from err
    for t, s in zip(jax.tree.leaves(template), jax.tree.leaves(state), strict=False):
        if np.shape(t) != np.shape(s):
            raise CheckpointMismatchError(
                f"{path} does not match this configuration (shape {np.shape(s)} vs {np.shape(t)})"
            )
    return state, host
