"""The model file: one pickle-free, versioned file with everything needed to use a trained potential.

Layout: a single msgpack document (written with ``flax.serialization.msgpack_serialize``)::

    {
      "header": "<JSON text>",   # format, format_version, equiforce_version, potential (model config,
                                 # species, r_max, E0s, scale, shift, avg_num_neighbours, dtype), units,
                                 # metadata (training metrics, dataset statistics, ...)
      "params": {...},           # the flax parameter tree as nested maps of ndarrays
    }

Loading parses data only (msgpack + JSON: no code is executed), checks the format and version, rebuilds
the model from its config and restores the weights against a freshly initialised template, so a
missing, extra or mis-shaped array is an error, never a silent mismatch. Writes are atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from equiforce.potentials.potential import Potential

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "atomic_write_bytes",
    "enable_x64_for",
    "load_model",
    "read_header",
    "save_model",
    "to_jsonable",
]

FORMAT = "equiforce-model"
FORMAT_VERSION = 1
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"}


class ModelFileError(ValueError):
    """A model file is corrupt, of another format, of a newer version, or does not match its config."""


def _package_version() -> str:
    from equiforce import __version__

    return __version__


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_jsonable(value: Any) -> Any:
    """Nested dicts/lists/tuples with NumPy scalars and arrays → plain JSON-serialisable Python values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def save_model(
    path: str | os.PathLike, potential: Potential, params: Any, metadata: dict[str, Any] | None = None
) -> Path:
    """Save a potential and its parameters to one file (atomically).

    Args:
      path: destination (conventionally ``*.eqf``); parent folders are created.
      potential: the :class:`Potential` configuration.
      params: its parameter tree (as returned by :meth:`Potential.init` or training).
      metadata: extra JSON-serialisable information (training metrics, data statistics, ...).

    Returns:
      The path written.
    """
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "equiforce_version": _package_version(),
        "potential": potential.to_dict(),
        "units": UNITS,
        "metadata": to_jsonable(metadata or {}),
    }
    state = flax.serialization.to_state_dict(jax.tree.map(np.asarray, params))
    data = flax.serialization.msgpack_serialize({"header": json.dumps(header), "params": state})
    atomic_write_bytes(path, data)
    return Path(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file (format, versions, potential config, units, metadata)."""
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err}") from err
    try:
        doc = flax.serialization.msgpack_restore(raw)
    except Exception as err:
        raise ModelFileError(f"{path} is not a valid equiforce model file (corrupt or truncated): {err}") from err
    if not isinstance(doc, dict) or "header" not in doc or "params" not in doc:
        raise ModelFileError(f"{path} is not an equiforce model file (no header/params)")
    try:
        header = json.loads(doc["header"])
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: unreadable header: {err}") from err
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{path}: model file format version {version} is not supported by this equiforce "
            f"({_package_version()}, reads versions 1..{FORMAT_VERSION}); upgrade equiforce"
        )
    return header, doc["params"]


def enable_x64_for(path: str | os.PathLike) -> None:
    """Switch on JAX's 64-bit types if the model file holds a float64 potential (an application-level
    choice: call it at start-up, before any array is created)."""
    if read_header(path)["potential"].get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)


def load_model(path: str | os.PathLike) -> tuple[Potential, Any, dict[str, Any]]:
    """Load a model file.

    Returns:
      ``(potential, params, header)``; params are NumPy arrays in the potential's dtype.

    Raises:
      ModelFileError: unreadable, corrupt or foreign file; newer format version; unknown model or
        hyperparameter; parameters that do not match the model's structure, shapes or dtypes.
    """
    header, state = _read(path)
    try:
        potential = Potential.from_dict(header["potential"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: invalid potential description: {err}") from err
    template = jax.eval_shape(lambda: potential.init(jax.random.PRNGKey(0)))
    expected = set(flatten_dict(flax.serialization.to_state_dict(template)))
    got = set(flatten_dict(state)) if isinstance(state, dict) else set()
    if expected != got:
        missing = sorted("/".join(k) for k in expected - got)[:5]
        extra = sorted("/".join(k) for k in got - expected)[:5]
        raise ModelFileError(f"{path}: parameters do not match the model (missing {missing}, unexpected {extra})")
    try:
        params = flax.serialization.from_state_dict(template, state)
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: parameters do not match the model: {err}") from err
    leaves_t, _ = jax.tree.flatten(template)
    leaves_p, _treedef = jax.tree.flatten(params)
    if len(leaves_t) != len(leaves_p):
        raise ModelFileError(f"{path}: parameter count mismatch ({len(leaves_p)} vs {len(leaves_t)})")
    for t, p in zip(leaves_t, leaves_p, strict=False):
        if not isinstance(p, np.ndarray) or p.shape != t.shape or p.dtype != t.dtype:
            got = (getattr(p, "shape", None), getattr(p, "dtype", None))
            raise ModelFileError(f"{path}: parameter of shape/dtype {got} where {(t.shape, t.dtype)} expected")
    return potential, params, header
