"""From a Potential and an ``ase.Atoms`` to jax-md pieces: space, neighbour list and energy function.

Units are ASE's: positions Å, energies eV, masses amu, time in ASE units (Å·sqrt(amu/eV) ≈ 10.18 fs;
convert with ``ase.units.fs``), temperatures as kT in eV.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, space

from equiforce.data.errors import DataError
from equiforce.potentials.potential import Potential

__all__ = ["MDSystem", "cell_heights", "check_structure", "make_system"]


def cell_heights(cell: np.ndarray) -> np.ndarray:
    """``[3]`` distances between opposite faces of a cell given by lattice vectors as rows, Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    return volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=-1)


def check_structure(atoms: Any, potential: Potential, *, min_distance: float = 0.5) -> None:
    """Validate an ``ase.Atoms`` for MD with ``potential``.

    Raises:
      DataError: empty structure, NaN/inf positions, overlapping atoms (closer than ``min_distance`` Å),
        partial periodicity, or a cutoff longer than half the shortest cell height (minimum image).
      UnknownSpeciesError: an element the potential does not know.
    """
    if len(atoms) == 0:
        raise DataError("empty structure (0 atoms)")
    pos = atoms.get_positions()
    if not np.all(np.isfinite(pos)):
        raise DataError("positions contain NaN or inf")
    potential.check_species(atoms.get_atomic_numbers())
    pbc = atoms.get_pbc()
    if np.any(pbc) and not np.all(pbc):
        raise DataError(f"MD needs a fully periodic or a non-periodic structure, got pbc={pbc.tolist()}")
    if np.all(pbc):
        cell = np.asarray(atoms.get_cell()[:])
        volume = abs(np.linalg.det(cell))
        if volume < 1e-9:
            raise DataError("periodic structure with a singular cell")
        heights = cell_heights(cell)
        if 2.0 * potential.r_max >= heights.min():
            raise DataError(
                f"r_max = {potential.r_max} Å is longer than half the shortest cell height "
                f"({heights.min():.3f} Å): the minimum-image neighbour list would miss images; use a supercell "
                "(atoms.repeat)"
            )
    if len(atoms) > 1:
        from ase.neighborlist import neighbor_list

        i, j, d = neighbor_list("ijd", atoms, min_distance)
        if d.size:
            k = int(np.argmin(d))
            raise DataError(f"atoms {int(i[k])} and {int(j[k])} overlap (closest pair {d[k]:.3f} Å < {min_distance} Å)")


@dataclass(frozen=True)
class MDSystem:
    """Everything the integrators need, built once per structure.

    Attributes:
      displacement_fn, shift_fn: the jax-md space (free, or ``periodic_general`` in real coordinates).
      neighbor_fn: jax-md neighbour-list functions (Sparse format, cutoff ``r_max + skin``).
      energy_fn: ``energy_fn(positions, neighbor) -> scalar`` total energy in eV *without* the constant
        Σ E0 (kept out so that float32 runs resolve energy changes; add :attr:`e0_total` for the total).
      node_energy_fn: ``(positions, neighbor) -> [n_atoms]`` per-atom energies in eV, E0 excluded.
      e0_total: Σ_i E0[Z_i] in eV (float64, host).
      masses: ``[n_atoms]`` amu.
      box: ``[3, 3]`` jax-md box (lattice vectors as *columns*), or None for free space.
      periodic: whether the system is periodic.
    """

    displacement_fn: Any
    shift_fn: Any
    neighbor_fn: Any
    energy_fn: Any
    node_energy_fn: Any
    masses: jnp.ndarray
    box: jnp.ndarray | None
    periodic: bool
    species: jnp.ndarray
    skin: float
    dtype: Any
    e0_total: float
    r_max: float = 0.0
    fractional: bool = False


def make_system(
    potential: Potential,
    params: Any,
    atoms: Any,
    *,
    skin: float = 1.0,
    capacity_multiplier: float = 1.25,
    fractional: bool = False,
) -> MDSystem:
    """Build the jax-md space, Sparse neighbour list and energy function for ``atoms``.

    The neighbour list holds all pairs within ``r_max + skin`` and is rebuilt (inside jit) whenever an
    atom moved more than ``skin / 2``. Edges between ``r_max`` and ``r_max + skin`` contribute nothing
    (smooth cutoff envelope), so the energy is exactly the Potential's.

    With ``fractional`` (periodic only; needed for NPT) positions live in the unit cube and the energy
    takes the current ``box`` as a keyword (jax-md's convention: ``x = box @ u``).

    Raises:
      DataError / UnknownSpeciesError: see :func:`check_structure`.
    """
    check_structure(atoms, potential)
    dtype = potential.jnp_dtype
    periodic = bool(np.all(atoms.get_pbc()))
    n = len(atoms)
    species = jnp.asarray(potential.species_index(atoms.get_atomic_numbers()), jnp.int32)
    masses = jnp.asarray(atoms.get_masses(), dtype)
    cutoff = float(potential.r_max)
    if periodic:
        box = jnp.asarray(np.asarray(atoms.get_cell()[:]).T, dtype)  # jax-md: lattice vectors as columns
        displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=fractional)
        neighbor_fn = partition.neighbor_list(
            displacement_fn,
            box,
            cutoff,
            dr_threshold=skin,
            capacity_multiplier=capacity_multiplier,
            format=partition.NeighborListFormat.Sparse,
            disable_cell_list=True,
            fractional_coordinates=fractional,
        )
    else:
        if fractional:
            raise DataError("fractional coordinates (NPT) need a periodic structure")
        box = None
        displacement_fn, shift_fn = space.free()
        neighbor_fn = partition.neighbor_list(
            displacement_fn,
            jnp.asarray(1.0, dtype),
            cutoff,
            dr_threshold=skin,
            capacity_multiplier=capacity_multiplier,
            format=partition.NeighborListFormat.Sparse,
            disable_cell_list=True,
        )
    node_mask = jnp.ones((n,), bool)

    def node_energy_fn(positions: jnp.ndarray, neighbor: Any, **kwargs: Any) -> jnp.ndarray:
        # kwargs reach the displacement: `box` (NPT), `perturbation` (jax-md's pressure/stress)
        space_kwargs = {k: v for k, v in kwargs.items() if k in ("box", "perturbation", "new_box")}
        receivers, senders = neighbor.idx[0], neighbor.idx[1]
        edge_mask = receivers < n
        receivers = jnp.where(edge_mask, receivers, 0)
        senders = jnp.where(edge_mask, senders, 0)
        vectors = jax.vmap(partial(displacement_fn, **space_kwargs))(positions[senders], positions[receivers])
        vectors = jnp.where(edge_mask[:, None], vectors, 0.0)
        return potential.node_energies_from_edges(
            params, vectors.astype(dtype), species, senders, receivers, edge_mask, node_mask, include_e0=False
        )

    def energy_fn(positions: jnp.ndarray, neighbor: Any, **kwargs: Any) -> jnp.ndarray:
        return jnp.sum(node_energy_fn(positions, neighbor, **kwargs))

    return MDSystem(
        displacement_fn=displacement_fn,
        shift_fn=shift_fn,
        neighbor_fn=neighbor_fn,
        energy_fn=energy_fn,
        node_energy_fn=node_energy_fn,
        masses=masses,
        box=box,
        periodic=periodic,
        species=species,
        skin=skin,
        dtype=dtype,
        e0_total=float(np.sum(np.asarray(potential.atomic_energies)[np.asarray(species)])),
        r_max=cutoff,
        fractional=fractional,
    )
