"""Input checks and per-replica settings of a replica run (:mod:`equiforce.md.replicas`).

Everything here runs on the host before anything is compiled or written: the structures (species, geometry,
periodicity), per-replica settings (one value or one per replica), the devices, and the output paths.
Errors name the replica index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from equiforce.data.errors import DataError
from equiforce.md.ensembles import ENSEMBLES
from equiforce.md.system import check_structure
from equiforce.potentials.potential import Potential, UnknownSpeciesError

__all__ = [
    "REPLICA_ENSEMBLES",
    "check_replicas",
    "load_replica_structures",
    "per_replica",
    "replica_paths",
    "resolve_replica_devices",
]

#: ensembles a replica run supports (NPT: each replica's box would change; run it with run_md)
REPLICA_ENSEMBLES = tuple(name for name, ensemble in ENSEMBLES.items() if ensemble.fixed_box)


def per_replica(value: Any, k: int, name: str, cast: Callable[[Any], Any]) -> list[Any]:
    """``value`` for each of ``k`` replicas: a scalar repeated, or a sequence of length ``k``.

    Raises:
      ValueError: a sequence whose length is not ``k``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        return [cast(value)] * k
    values = list(value)
    if len(values) != k:
        raise ValueError(f"{name} has {len(values)} entries for {k} replicas")
    return [cast(v) for v in values]


def resolve_replica_devices(devices: int | Sequence[Any] | None, n_replicas: int) -> list[Any]:
    """The devices to shard ``n_replicas`` replicas over.

    Args:
      devices: None (every device, at most one per replica), a count (the first ``devices`` of
        ``jax.devices()``), or a sequence of devices.

    Raises:
      ValueError: more devices requested than exist, or a count below 1.
    """
    available = jax.devices()
    if devices is None:
        return available[: max(1, min(len(available), n_replicas))]
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if devices > len(available):
            raise ValueError(
                f"{devices} devices requested but only {len(available)} exist ({available[0].platform}); on CPU, "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} simulates more (set before JAX starts)"
            )
        return available[:devices]
    return list(devices)


def check_replicas(structures: Sequence[Any], potential: Potential) -> bool:
    """Validate every structure before anything runs; return whether the replicas are periodic.

    Replicas are all periodic (each with its own fixed cell; fully periodic, every cell height more than
    twice ``r_max``) or all non-periodic.

    Raises:
      UnknownSpeciesError: a replica holds an element the potential does not know (the message names the
        replica index and the element).
      DataError: an empty list, or a bad structure (see :func:`~equiforce.md.system.check_structure`: NaN
        positions, overlapping atoms, partial periodicity, a cell too small for the cutoff), naming the
        replica index.
      ValueError: periodic and non-periodic replicas mixed (naming the first replica that differs from
        replica 0).
    """
    if len(structures) == 0:
        raise DataError("run_replicas needs at least one structure")
    for k, atoms in enumerate(structures):
        try:
            check_structure(atoms, potential)
        except UnknownSpeciesError as err:
            raise UnknownSpeciesError(f"replica {k}: {err}") from err
        except DataError as err:
            raise DataError(f"replica {k}: {err}") from err
    periodic = [bool(np.all(a.get_pbc())) for a in structures]
    for k, p in enumerate(periodic):
        if p != periodic[0]:
            raise ValueError(
                f"replica {k} is {'' if p else 'non-'}periodic but replica 0 is {'' if periodic[0] else 'not'}: "
                "replicas must be all periodic or all non-periodic (run the two kinds in separate calls)"
            )
    return periodic[0]


def replica_paths(spec: str | Path | Sequence[str | Path] | None, n: int) -> list[Path | None]:
    """One output path per replica: a sequence of ``n`` paths; a path containing ``{replica}`` (formatted
    with ``replica=k``, e.g. ``traj_{replica:03d}.h5``); or a plain path ``dir/name.ext``, giving
    ``dir/name_<k>.ext`` (``k`` zero-padded to the digits of ``n - 1``). None: no files.

    Raises:
      ValueError: a sequence of the wrong length, or paths that repeat.
    """
    if spec is None:
        return [None] * n
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if "{replica" in text:
            paths = [Path(text.format(replica=k)) for k in range(n)]
        else:
            p, width = Path(text), len(str(max(n - 1, 0)))
            paths = [p.with_name(f"{p.stem}_{k:0{width}d}{p.suffix}") for k in range(n)]
    else:
        paths = [Path(s) for s in spec]
        if len(paths) != n:
            raise ValueError(f"{len(paths)} output paths for {n} replicas")
    if len(set(paths)) != n:
        raise ValueError(f"the replicas' output paths repeat: {[str(p) for p in paths]}")
    return paths


def load_replica_structures(specs: Sequence[Any]) -> list[Any]:
    """Copies of the replicas' ``ase.Atoms``: each entry an ``ase.Atoms``, a spec for
    :func:`~equiforce.md.inputs.load_structure` (``path``, ``path@K``, ``sample:...``), or a file with a frame
    selection that picks several frames (``path@:``, ``path@0:8``), which gives one replica per frame.
    Periodic structures are wrapped into their cells (as :func:`~equiforce.md.run.run_md` does).

    Raises:
      FileNotFoundError: a missing file. DataError: an unreadable file or one without atoms.
    """
    from equiforce.md.inputs import load_structure

    structures: list[Any] = []
    for spec in specs:
        if hasattr(spec, "get_positions"):
            structures.append(spec.copy())
            continue
        text = str(spec)
        path, _, index = text.partition("@")
        if ":" in index and not text.startswith("sample:"):
            import ase.io

            if not Path(path).is_file():
                raise FileNotFoundError(f"no such structure file: {path}")
            try:
                frames = ase.io.read(path, index=index)
            except Exception as err:  # ase raises many types for bad files
                raise DataError(f"{path}: cannot read frames {index} ({type(err).__name__}: {err})") from err
            frames = frames if isinstance(frames, list) else [frames]
            if not frames or any(len(a) == 0 for a in frames):
                raise DataError(f"{text}: selects no frames, or a frame without atoms")
            structures.extend(frames)
        else:
            structures.append(load_structure(text))
    for atoms in structures:
        if np.all(atoms.get_pbc()) and abs(np.linalg.det(atoms.get_cell()[:])) > 1e-9:
            atoms.wrap()  # a singular cell is reported by check_replicas
    return structures
