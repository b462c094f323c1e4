"""The model file: one pickle-free, versioned file with everything needed to use a trained potential.

Layout: a single msgpack document (written with ``flax.serialization.msgpack_serialize``)::

    {
      "header": "<JSON text>",   # format, format_version, equiforce_version, potential (model config,
                                 # species, r_max, E0s, scale, shift, avg_num_neighbours, dtype), units,
                                 # metadata (training metrics, dataset statistics, ...)
      "params": {...},           # the flax parameter tree as nested maps of ndarrays (a committee's leaves
                                 # have a leading member axis; an LLPR model adds {"llpr": {"projection"}})
      "checksum": "sha256:<hex>" # of msgpack_serialize({"header": ..., "params": ...}); optional on read
    }

Loading parses data only (msgpack + JSON: no code is executed), verifies the checksum (files written
before it existed have none and are read without), checks the format and version, checks the types and
finiteness of the potential description, rebuilds the model from its config and restores the weights
against a template of the freshly built model, so a missing, extra, mis-shaped, mis-typed or non-finite
array is an error, never a silent mismatch or a NaN energy. Writes are atomic; a new file gets the
usual permissions (``0o666`` less the umask) and a replaced file keeps its mode.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from equiforce.atomic import atomic_write_bytes
from equiforce.potentials.potential import Potential

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "atomic_write_bytes",
    "enable_x64_for",
    "header_and_parameter_count",
    "load_model",
    "read_header",
    "save_model",
    "to_jsonable",
]

FORMAT = "equiforce-model"
#: 2: ``ensemble_size`` (committee parameters stacked on a leading axis) and ``uncertainty`` (its method and
#: calibration; LLPR files also hold the ``"llpr"`` parameter collection). Version 1 files are read as before.
FORMAT_VERSION = 2
UNITS = {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"}


class ModelFileError(ValueError):
    """A model file is corrupt, of another format, of a newer version, or does not match its config."""


def _package_version() -> str:
    from equiforce import __version__

    return __version__


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
    body = {"header": json.dumps(header), "params": state}
    data = flax.serialization.msgpack_serialize({**body, "checksum": _checksum(body)})
    atomic_write_bytes(path, data, fault="model")
    return Path(path)


def _checksum(body: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the msgpack serialisation of ``{"header": ..., "params": ...}``.

    msgpack restores exactly what it serialised (maps in file order, arrays with their dtype and bytes),
    so serialising the decoded document again reproduces the digest unless a byte changed.
    """
    data = flax.serialization.msgpack_serialize({"header": body["header"], "params": body["params"]})
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file (format, versions, potential config, units, metadata).

    Raises:
      ModelFileError: unreadable, truncated, corrupt (checksum mismatch) or foreign file, or a newer
        format version; the message names the file.
    """
    return _read(path)[0]


def header_and_parameter_count(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header of a model file (as :func:`read_header`) and the number of its network parameters (array
    elements of the parameter tree; a committee's members together, an LLPR model's projections left out).

    Raises:
      ModelFileError: as :func:`read_header`.
    """
    header, state = _read(path)
    leaves = jax.tree.leaves({k: v for k, v in state.items() if k != "llpr"} if isinstance(state, dict) else state)
    return header, int(sum(np.size(leaf) for leaf in leaves))


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err}") from err
    try:
        doc = flax.serialization.msgpack_restore(raw)
    except Exception as err:  # msgpack and flax's ndarray decoding raise many types on damaged bytes
        raise ModelFileError(f"{path} is not a valid equiforce model file (corrupt or truncated): {err}") from err
    if not isinstance(doc, dict) or "header" not in doc or "params" not in doc:
        raise ModelFileError(f"{path} is not an equiforce model file (no header/params)")
    extra = sorted(map(str, set(doc) - {"header", "params", "checksum"}))
    if extra:  # e.g. a damaged "checksum" key, which would otherwise read as a file without one
        raise ModelFileError(f"{path} is corrupt or foreign: unexpected top-level entries {extra}")
    if "checksum" in doc:
        try:
            ok = isinstance(doc["checksum"], str) and doc["checksum"] == _checksum(doc)
        except Exception:  # a damaged document that cannot be serialised again
            ok = False
        if not ok:
            raise ModelFileError(f"{path} is corrupt: its content does not match the checksum stored in it")
    try:
        header = json.loads(doc["header"])
    except (TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: unreadable header: {err}") from err
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{path}: model file format version {version!r} is not supported by this equiforce "
            f"({_package_version()}, reads versions 1..{FORMAT_VERSION}); upgrade equiforce"
        )
    return header, doc["params"]


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` (decoded JSON) does not fit the type hint ``hint``, or None when it does.

    Numbers must be finite; a bool is not a number. Hints other than None, bool, int, float, str,
    ``X | Y``, ``tuple[X, ...]``/``list[X]`` and fixed-length ``tuple[X, Y]`` are not checked here.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        reasons = [_type_error(value, a) for a in typing.get_args(hint)]
        return None if any(r is None for r in reasons) else f"{value!r} is not {hint}"
    if hint is type(None):
        return None if value is None else f"{value!r} is not null"
    if hint is bool:
        return None if isinstance(value, bool) else f"{value!r} is not a bool"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"{value!r} is not an integer"
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"{value!r} is not a number"
        return None if math.isfinite(value) else f"{value!r} is not finite"
    if hint is str:
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return f"{value!r} is not a list"
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, float]
            if len(value) != len(args):
                return f"{value!r} does not have {len(args)} items"
            items = list(args)
        else:
            items = [args[0] if args else Any] * len(value)
        for k, (v, item) in enumerate(zip(value, items, strict=True)):
            reason = _type_error(v, item)
            if reason is not None:
                return f"item {k}: {reason}"
    return None


def _check_potential_description(pot: Any, path: Path) -> None:
    """Types of the header's ``potential`` block against :class:`Potential` and the model's config class."""
    if not isinstance(pot, dict):
        raise ModelFileError(f"{path}: invalid potential description: not an object but {pot!r}")
    model = pot.get("model")
    if not isinstance(model, dict):
        raise ModelFileError(f"{path}: invalid potential description: model is not an object but {model!r}")
    from equiforce.potentials.registry import MODELS

    checks = [("", typing.get_type_hints(Potential), pot)]
    config_cls = MODELS.get(model.get("name")) if isinstance(model.get("name"), str) else None
    if config_cls is not None:  # an unknown name is reported by config_from_dict, with the known ones
        checks.append(("model.", typing.get_type_hints(config_cls), model))
    for prefix, hints, values in checks:
        for key, value in values.items():
            if key in hints and key != "model" and typing.get_origin(hints[key]) is not typing.ClassVar:
                reason = _type_error(value, hints[key])
                if reason is not None:
                    raise ModelFileError(f"{path}: invalid potential description: {prefix}{key}: {reason}")


def enable_x64_for(path: str | os.PathLike) -> None:
    """Switch on JAX's 64-bit types if the model file at ``path`` holds a float64 potential (only its header is
    read), where that is safe (no JAX array made yet); see :func:`equiforce.potentials.precision.enable_x64`.

    Raises:
      ModelFileError: an unreadable model file.
      RuntimeError: a float64 model, 64-bit types off, and JAX arrays made already.
    """
    from equiforce.potentials.precision import enable_x64

    if read_header(path)["potential"].get("dtype") == "float64":
        enable_x64(f"{path} holds a float64 potential")


def load_model(path: str | os.PathLike) -> tuple[Potential, Any, dict[str, Any]]:
    """Load a model file.

    Returns:
      ``(potential, params, header)``; params are NumPy arrays in the potential's dtype.

    Raises:
      ModelFileError: unreadable, truncated, corrupt (checksum mismatch) or foreign file; newer format
        version; unknown model or hyperparameter; a mistyped or non-finite value in the potential
        description (species, r_max, E0s, scale, shift, ...); parameters that do not match the model's
        structure, shapes or dtypes, or that hold NaN or inf. The message names the file.
      RuntimeError: a float64 model while JAX's 64-bit types are off (see :func:`enable_x64_for`).
    """
    path = Path(path)
    header, state = _read(path)
    _check_potential_description(header.get("potential"), path)
    try:
        potential = Potential.from_dict(header["potential"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: invalid potential description: {err}") from err
    potential.check_precision()  # a float64 model with JAX's x64 off: the caller's setup, not the file
    try:
        template = jax.eval_shape(lambda: potential.init(jax.random.PRNGKey(0)))
    except Exception as err:  # a well-typed but unbuildable configuration (e.g. a size the layers refuse)
        raise ModelFileError(f"{path}: cannot build the model it describes ({type(err).__name__}: {err})") from err
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
    leaves_p, _treedef = jax.tree_util.tree_flatten_with_path(params)
    if len(leaves_t) != len(leaves_p):
        raise ModelFileError(f"{path}: parameter count mismatch ({len(leaves_p)} vs {len(leaves_t)})")
    for t, (key_path, p) in zip(leaves_t, leaves_p, strict=False):
        name = jax.tree_util.keystr(key_path)
        if not isinstance(p, np.ndarray) or p.shape != t.shape or p.dtype != t.dtype:
            got = (getattr(p, "shape", None), getattr(p, "dtype", None))
            raise ModelFileError(f"{path}: parameter {name} of shape/dtype {got} where {(t.shape, t.dtype)} expected")
        if not np.all(np.isfinite(p)):
            raise ModelFileError(f"{path}: parameter {name} contains NaN or inf (a diverged or damaged model)")
    return potential, params, header
