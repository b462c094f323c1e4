"""Dataset statistics used to initialise and normalise a model: E0s, force RMS, residual energies.

All energies in eV, forces in eV/Å (ASE units, as in :class:`~equiforce.data.structures.StructureSet`).

Atomic reference energies (E0s) are fitted by least squares on the composition count matrix
``C[k, s]`` = number of atoms of species ``s`` in structure ``k``: ``E_k ≈ Σ_s C[k, s] E0[s]``.
When ``C`` is rank-deficient (e.g. every rMD17 file holds one molecule, so all rows are equal) the
E0s are not individually determined; :func:`fit_atomic_energies` then returns the solution closest
to "every species has the same per-atom reference energy" (see there) and logs a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet

__all__ = [
    "DatasetStatistics",
    "check_atomic_energies",
    "composition_matrix",
    "compute_statistics",
    "energy_per_atom_residual_stats",
    "fit_atomic_energies",
    "force_rms",
]

logger = logging.getLogger(__name__)


def _species_of(structures: StructureSet, species: Sequence[int] | None) -> np.ndarray:
    present = np.asarray(structures.species, dtype=np.int64)
    if species is None:
        return present
    sp = np.unique(np.asarray(list(species), dtype=np.int64))
    missing = np.setdiff1d(present, sp)
    if missing.size:
        raise DataError(f"species {missing.tolist()} occur in the data but are not in species={sp.tolist()}")
    return sp


def composition_matrix(structures: StructureSet, species: Sequence[int] | None = None) -> np.ndarray:
    """``[n_structures, n_species]`` float64 counts of each species (sorted atomic numbers) per structure.

    Raises:
      DataError: ``species`` misses a species present in ``structures``.
    """
    sp = _species_of(structures, species)
    n = len(structures)
    counts = np.zeros((n, sp.size), dtype=np.float64)
    if n == 0:
        return counts
    struct_of_atom = np.repeat(np.arange(n), structures.n_atoms)
    col = np.searchsorted(sp, structures.atomic_numbers)
    np.add.at(counts, (struct_of_atom, col), 1.0)
    return counts


def _need_energy(structures: StructureSet) -> np.ndarray:
    if len(structures) == 0:
        raise DataError("no structures")
    if structures.energy is None:
        raise DataError("the structures carry no energy labels")
    return structures.energy


def fit_atomic_energies(
    structures: StructureSet, species: Sequence[int] | None = None, *, warn: bool = True
) -> dict[int, float]:
    """Fit per-species atomic reference energies E0 (eV per atom) by least squares on composition.

    Solves ``E_k ≈ Σ_s C[k, s] E0[s]`` with ``C`` the composition count matrix. If ``C`` has full
    column rank (``np.linalg.matrix_rank(C) == n_species``) this is the ordinary least-squares solution.

    If ``C`` is rank-deficient (for example every structure has the same composition, as in each rMD17
    or MD17 file), the E0s are not individually determined. The function then writes
    ``E0 = ē·1 + δ`` with ``ē = ΣE / ΣN`` the mean energy per atom, and takes the minimum-norm ``δ``
    solving the shifted problem ``C δ ≈ E − ē N`` (``np.linalg.lstsq``). Among all least-squares
    solutions this is the one closest to "every species has the same reference energy". For a single
    composition ``c`` it gives ``δ = 0`` and ``c·E0 = mean(E)`` exactly, so a model starting from these
    E0s has zero constant energy offset. A warning is logged (``logging``) in this case.

    Species listed in ``species`` but absent from the data get ``ē`` (their column is zero).

    Args:
      structures: a labelled set (energy required).
      species: atomic numbers to fit (default: those present); must include every present species.

    Returns:
      ``{Z: E0 in eV}`` for every species, as Python floats.

    Raises:
      DataError: no structures, no energy labels, or ``species`` missing a present species.
    """
    energy = _need_energy(structures)
    sp = _species_of(structures, species)
    c = composition_matrix(structures, sp)
    rank = int(np.linalg.matrix_rank(c))
    if rank == sp.size:
        e0, *_ = np.linalg.lstsq(c, energy, rcond=None)
    else:
        n_atoms = structures.n_atoms.astype(np.float64)
        e_bar = float(energy.sum() / n_atoms.sum())
        delta, *_ = np.linalg.lstsq(c, energy - e_bar * n_atoms, rcond=None)
        e0 = e_bar + delta
        if warn:
            logger.warning(
                "composition matrix has rank %d < %d species %s: the atomic reference energies (E0s) are "
                "not individually determined by these data; using the minimum-norm deviation from a common "
                "per-atom energy of %.6f eV (composition-weighted sums still reproduce the data's energies)",
                rank,
                sp.size,
                sp.tolist(),
                e_bar,
            )
    if not np.all(np.isfinite(e0)):
        raise DataError("E0 fit produced non-finite values")
    return {int(z): float(v) for z, v in zip(sp, e0, strict=True)}


def check_atomic_energies(e0s: Mapping[int, float], species: Sequence[int]) -> dict[int, float]:
    """Validate user-given E0s (eV per atom) against the species that must be covered.

    Returns:
      ``{int Z: float E0}`` with every given entry (extra species are kept).

    Raises:
      DataError: a species without an E0, a non-integer / out-of-range key, or a non-finite value.
    """
    out: dict[int, float] = {}
    for z, v in e0s.items():
        try:
            zi = int(z)
        except (TypeError, ValueError):
            raise DataError(f"E0 key {z!r} is not an atomic number") from None
        if not 1 <= zi <= 118:
            raise DataError(f"E0 key {zi} is not an atomic number in 1..118")
        try:
            fv = float(v)
        except (TypeError, ValueError):
            raise DataError(f"E0 for Z={zi} is not a number: {v!r}") from None
        if not math.isfinite(fv):
            raise DataError(f"E0 for Z={zi} is not finite: {v!r}")
        out[zi] = fv
    missing = sorted(set(int(z) for z in species) - set(out))
    if missing:
        raise DataError(f"no atomic energy (E0) given for species {missing}")
    return out


def force_rms(structures: StructureSet) -> float:
    """Root mean square of all force components, ``sqrt(mean(F**2))`` in eV/Å.

    Raises:
      DataError: no structures or no force labels.
    """
    if structures.forces is None or structures.forces.size == 0:
        raise DataError("the structures carry no force labels")
    return float(np.sqrt(np.mean(structures.forces**2)))


def energy_per_atom_residual_stats(structures: StructureSet, e0s: Mapping[int, float]) -> tuple[float, float]:
    """Mean and standard deviation of ``(E_k − Σ_i E0[Z_i]) / N_k`` over structures, in eV per atom.

    Raises:
      DataError: no structures, no energies, or ``e0s`` missing a present species.
    """
    energy = _need_energy(structures)
    e0 = check_atomic_energies(e0s, structures.species)
    sp = np.asarray(structures.species, dtype=np.int64)
    c = composition_matrix(structures, sp)
    ref = c @ np.array([e0[int(z)] for z in sp], dtype=np.float64)
    r = (energy - ref) / structures.n_atoms
    return float(np.mean(r)), float(np.std(r))


@dataclass(frozen=True)
class DatasetStatistics:
    """Statistics of a training set (ASE units).

    Attributes:
      atomic_energies: E0 per species, eV per atom.
      force_rms: RMS force component in eV/Å (None without force labels).
      energy_per_atom_residual_mean: mean of ``(E − Σ E0) / N``, eV/atom.
      energy_per_atom_residual_std: standard deviation of the same, eV/atom.
      n_structures: number of structures.
      species: sorted atomic numbers.
      avg_num_neighbours: average number of neighbours within the cutoff (filled in elsewhere).
    """

    atomic_energies: dict[int, float]
    force_rms: float | None
    energy_per_atom_residual_mean: float
    energy_per_atom_residual_std: float
    n_structures: int
    species: tuple[int, ...]
    avg_num_neighbours: float | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (E0 keys as strings)."""
        d = asdict(self)
        d["atomic_energies"] = {str(k): v for k, v in self.atomic_energies.items()}
        d["species"] = list(self.species)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetStatistics:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["atomic_energies"] = {int(k): float(v) for k, v in d["atomic_energies"].items()}
        d["species"] = tuple(int(z) for z in d["species"])
        return cls(**d)


def compute_statistics(
    structures: StructureSet,
    e0s: Mapping[int, float] | str = "fit",
    species: Sequence[int] | None = None,
) -> DatasetStatistics:
    """Bundle E0s, force RMS and per-atom residual energy statistics of a labelled set.

    Args:
      structures: a set with energy labels (forces optional).
      e0s: ``"fit"`` to use :func:`fit_atomic_energies`, or a dict ``{Z: E0 in eV}``.
      species: species the model will know (default: those present).

    Raises:
      DataError: no energies, E0s missing a species, or an unknown ``e0s`` string.
    """
    sp = tuple(int(z) for z in _species_of(structures, species))
    if isinstance(e0s, str):
        if e0s != "fit":
            raise DataError(f"e0s must be 'fit' or a dict of atomic energies, got {e0s!r}")
        atomic = fit_atomic_energies(structures, sp)
    else:
        atomic = check_atomic_energies(e0s, sp)
    mean, std = energy_per_atom_residual_stats(structures, atomic)
    return DatasetStatistics(
        atomic_energies=atomic,
        force_rms=None if structures.forces is None else force_rms(structures),
        energy_per_atom_residual_mean=mean,
        energy_per_atom_residual_std=std,
        n_structures=len(structures),
        species=sp,
    )
