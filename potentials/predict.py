"""Batched prediction of a potential over a structure set: energies, forces and stress on the host.

The potential's own inference over many structures (padded static-shape batches, one compiled program per
potential and shape), used by training's validation, by uncertainty calibration, by ``equiforce evaluate``
and by anything else that needs a set's predictions. Error metrics live in
:mod:`equiforce.training.evaluate`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from equiforce.data.graph import Batch, PaddingBudget, batch_iterator, estimate_budget
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graphs
from equiforce.data.statistics import composition_matrix
from equiforce.data.structures import StructureSet
from equiforce.potentials.potential import Potential

__all__ = ["Predictions", "e0_sum", "padded_batches", "predict"]


@dataclass(frozen=True)
class Predictions:
    """Predicted and reference labels of a set, host side, float64 (eV, eV/Å, eV/Å³)."""

    energy: np.ndarray
    energy_ref: np.ndarray | None
    forces: np.ndarray
    forces_ref: np.ndarray | None
    n_atoms: np.ndarray
    stress: np.ndarray | None = None
    stress_ref: np.ndarray | None = None


def e0_sum(potential: Potential, structures: StructureSet) -> np.ndarray:
    """``[n_structures]`` Σ_i E0[Z_i] in float64, computed on the host."""
    return composition_matrix(structures, potential.species) @ np.asarray(potential.atomic_energies)


@functools.lru_cache(maxsize=16)
def _predict_fn(potential: Potential, with_stress: bool):
    """Jitted energies *without* E0s (added on the host in float64 so float32 models stay precise); one per
    potential, so repeated predictions with the same shapes compile once."""

    def fn(params: Any, batch: Batch):
        out = potential(params, batch.graph, compute_forces=True, compute_stress=with_stress, include_e0=False)
        return out.energy, out.forces, out.stress

    return jax.jit(fn)


def padded_batches(
    potential: Potential,
    structures: StructureSet,
    batch_size: int,
    graphs: list[NeighbourGraph] | None = None,
    budget: PaddingBudget | None = None,
):
    """Padded batches of ``structures`` in order, in the potential's dtype (neighbour graphs and budget built
    when not given).

    Raises:
      UnknownSpeciesError: an element the potential does not know.
    """
    potential.check_species(structures.atomic_numbers)
    if graphs is None:
        graphs = build_neighbour_graphs(structures, potential.r_max)
    if budget is None:
        budget = estimate_budget(structures.n_atoms, [g.n_edges for g in graphs], batch_size)
    return batch_iterator(structures, graphs, batch_size, budget, dtype=np.dtype(potential.dtype))


def predict(
    potential: Potential,
    params: Any,
    structures: StructureSet,
    *,
    batch_size: int = 16,
    graphs: list[NeighbourGraph] | None = None,
    budget: PaddingBudget | None = None,
    predict_fn: Any = None,
) -> Predictions:
    """Energies, forces (and stress for periodic sets) of every structure.

    Raises:
      UnknownSpeciesError: an element the potential does not know.
    """
    with_stress = bool(np.any(np.all(structures.pbc, axis=-1)))
    fn = predict_fn or _predict_fn(potential, with_stress)
    energies, forces, stresses = [], [], []
    for batch in padded_batches(potential, structures, batch_size, graphs, budget):
        g = batch.graph
        e, f, s = fn(params, jax.tree.map(jnp.asarray, batch))
        n_real = int(np.sum(g.graph_mask))
        n_nodes = int(np.sum(g.node_mask))
        energies.append(np.asarray(e, np.float64)[:n_real])
        forces.append(np.asarray(f, np.float64)[:n_nodes])
        if s is not None:
            stresses.append(np.asarray(s, np.float64)[:n_real])
    return Predictions(
        energy=np.concatenate(energies) + e0_sum(potential, structures),
        energy_ref=structures.energy,
        forces=np.concatenate(forces),
        forces_ref=structures.forces,
        n_atoms=structures.n_atoms,
        stress=np.concatenate(stresses) if stresses else None,
        stress_ref=structures.stress,
    )
