"""Pick structures to label: the most uncertain ones, spread out so that they are not near-copies.

Method (uncertainty-filtered farthest-point sampling):

1. σ of every pool structure: the calibrated force uncertainty averaged over its atoms (committee spread
   or LLPR, :mod:`equiforce.potentials.uncertainty`);
2. the ``candidates × N`` most uncertain structures are the candidates;
3. farthest-point sampling among them (T. F. Gonzalez, Theor. Comput. Sci. 38, 293 (1985); used to pick
   diverse training structures by G. Imbalzano et al., J. Chem. Phys. 148, 241730 (2018),
   arXiv:1804.02150), starting from the most uncertain candidate, in the space of the potential's own
   structure descriptor: its per-atom last-layer features (the ``g_i`` of LLPR) averaged over the atoms,
   standardised per component. Each next pick is the candidate farthest from all picked ones, so N MD frames
   a few steps apart count as one region.

The pool may be an extxyz/ASE db/any file :func:`~equiforce.data.readers.read_structures` reads (labels not
needed), or an equiforce H5MD trajectory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.h5md import is_h5md, read_h5md_structures
from equiforce.data.structures import StructureSet
from equiforce.potentials.model_io import atomic_write_bytes
from equiforce.potentials.potential import Potential
from equiforce.potentials.uncertainty import network_params

__all__ = ["farthest_point_sampling", "read_pool", "select_structures", "write_selection"]


def read_pool(path: str | os.PathLike, format: str | None = None) -> StructureSet:
    """Structures of a pool file: an equiforce H5MD trajectory (``.h5`` with ``/h5md``) or anything
    :func:`~equiforce.data.readers.read_structures` reads. Labels are kept where present, not required.

    Raises:
      DataError / FileNotFoundError: unreadable or missing file, or no structures.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such pool file: {path}")
    if path.suffix.lower() in (".h5", ".hdf5", ".h5md") and format is None and is_h5md(path):
        return read_h5md_structures(path)
    from equiforce.data.readers import read_structures

    s = read_structures(path, format=format)
    if len(s) == 0:
        raise DataError(f"{path}: no structures in the pool")
    return s


def farthest_point_sampling(x: np.ndarray, n: int, first: int = 0) -> np.ndarray:
    """Indices of ``n`` rows of ``x`` [M, D] by greedy farthest-point sampling from row ``first``."""
    x = np.asarray(x, np.float64)
    chosen = [int(first)]
    dist = np.linalg.norm(x - x[first], axis=1)
    for _ in range(1, n):
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(x - x[k], axis=1))
    return np.array(chosen)


def select_structures(
    potential: Potential,
    params: Any,
    pool: StructureSet,
    n: int,
    *,
    candidates: float = 5.0,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n`` pool structures to label (see the module doc) and the pool's σ per structure.

    Returns:
      ``(indices [n], sigma [len(pool)])``: picked structures in the order picked; mean σ_F per structure, eV/Å.

    Raises:
      ValueError: ``n`` < 1 or larger than the pool, ``candidates`` < 1.
      UncertaintyError: a model without uncertainty.
      UnknownSpeciesError: the pool holds an element the model does not know.
    """
    from equiforce.uncertainty.calibration import _features, predict_uncertainties
    from equiforce.uncertainty.metrics import per_structure_mean

    if n < 1:
        raise ValueError(f"select at least one structure, got n={n}")
    if n > len(pool):
        raise ValueError(f"cannot select {n} structures from a pool of {len(pool)}")
    if not candidates >= 1:
        raise ValueError(f"candidates must be >= 1 (a multiple of n), got {candidates}")
    potential.check_species(pool.atomic_numbers)
    unlabelled = StructureSet(
        atomic_numbers=pool.atomic_numbers, positions=pool.positions, n_atoms=pool.n_atoms, cell=pool.cell, pbc=pool.pbc
    )
    pred = predict_uncertainties(potential, params, unlabelled, batch_size=batch_size)
    sigma = per_structure_mean(pred.forces_uncertainty, pool.n_atoms)
    order = np.argsort(-sigma, kind="stable")
    cand = order[: min(len(pool), max(n, int(np.ceil(candidates * n))))]
    net = network_params(params)
    if potential.ensemble_size > 1:
        net = potential.member_params(params, 0)
    feature_sums, _ = _features(potential.single(), net, unlabelled.subset(cand), batch_size)
    desc = feature_sums / pool.n_atoms[cand][:, None]
    scale = desc.std(axis=0)
    desc = (desc - desc.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    picked = farthest_point_sampling(desc, n, first=0)  # cand[0] is the most uncertain
    return cand[picked], sigma


def write_selection(path: str | os.PathLike, pool: StructureSet, indices: np.ndarray, sigma: np.ndarray) -> Path:
    """Write the picked structures to extxyz (atomically), without labels, with ``info``: ``pool_index`` and
    ``forces_uncertainty_mean`` (eV/Å)."""
    import ase.io

    frames = []
    for k in indices:
        a = pool.to_atoms(int(k))
        a.calc = None
        a.info.update(pool_index=int(k), forces_uncertainty_mean=float(sigma[k]))
        frames.append(a)
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    atomic_write_bytes(path, buf.getvalue().encode())
    return Path(path)
