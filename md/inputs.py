"""The inputs of an MD run: the structure (a file, a frame of one, or a shipped sample) and the potential.

Shared by :func:`~equiforce.md.run.run_md`, the replica runs, the command line and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from equiforce.data.errors import DataError
from equiforce.potentials.model_io import enable_x64_for, load_model
from equiforce.potentials.potential import Potential

__all__ = ["load_potential", "load_structure"]


def load_structure(spec: str | Path) -> Any:
    """An ``ase.Atoms`` from a file ase reads (``path`` or ``path@index``, default the last frame) or from
    the shipped samples (``sample:train:K`` / ``sample:test:K`` for aspirin, ``sample:salicylic:test:K``;
    default frame 0).

    Raises:
      FileNotFoundError: no such file.
      DataError: a file ase cannot read (unknown format, empty, truncated) or holding no atoms.
    """
    spec = str(spec)
    if spec.startswith("sample:"):
        from equiforce.data.readers import load_sample

        parts = spec.split(":")[1:]  # [molecule:]split[:index]
        index = int(parts.pop()) if len(parts) > 1 and parts[-1].lstrip("-").isdigit() else 0
        return load_sample(":".join(parts)).to_atoms(index)
    import ase.io

    path, _, index = spec.partition("@")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such structure file: {path}")
    try:
        atoms = ase.io.read(path, index=index or -1)
    except Exception as err:  # ase raises many types (UnknownFileTypeError, StopIteration, ...) for bad files
        raise DataError(f"{path}: cannot read a structure ({type(err).__name__}: {err})") from err
    if isinstance(atoms, list):
        raise DataError(f"{spec}: selects {len(atoms)} frames; give one index (path@K)")
    if len(atoms) == 0:
        raise DataError(f"{spec}: the structure has no atoms")
    return atoms


def load_potential(model: str | Path | tuple[Potential, Any]) -> tuple[Potential, Any]:
    """``(potential, params)`` of a model file (JAX's 64-bit types switched on for a float64 model where that
    is safe, see :func:`~equiforce.potentials.precision.enable_x64`), or the pair itself.

    Raises:
      ModelFileError: an unreadable model file (see :func:`~equiforce.potentials.load_model`).
      RuntimeError: a float64 model file while JAX's 64-bit types are off and JAX arrays exist already.
    """
    if isinstance(model, tuple):
        return model
    enable_x64_for(model)
    potential, params, _ = load_model(model)
    return potential, params
