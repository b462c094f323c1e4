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
from equiforce.data.neighbours import MIN_PAIR_DISTANCE, check_finite_positions, check_pair_distances
from equiforce.md.all_pairs import all_pairs_neighbor_list
from equiforce.md.constraints import ConstraintError, fixed_mask
from equiforce.potentials import layers
from equiforce.potentials.potential import Potential
from equiforce.potentials.uncertainty import predict_with_uncertainty

__all__ = ["PRECISIONS", "MDSystem", "cell_heights", "check_structure", "make_system", "with_precision"]


def cell_heights(cell: np.ndarray) -> np.ndarray:
    """``[3]`` distances between opposite faces of a cell given by lattice vectors as rows, Å."""
    cell = np.asarray(cell, np.float64)
    volume = abs(np.linalg.det(cell))
    return volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=-1)


def check_structure(atoms: Any, potential: Potential, *, min_distance: float = MIN_PAIR_DISTANCE) -> None:
    """Validate an ``ase.Atoms`` for MD with ``potential``.

    Raises:
      DataError: empty structure, NaN/inf positions (naming the atoms), overlapping atoms (closer than
        ``min_distance`` Å, default :data:`equiforce.data.neighbours.MIN_PAIR_DISTANCE`),
        partial periodicity, or a cutoff longer than half the shortest cell height (minimum image).
      UnknownSpeciesError: an element the potential does not know.
    """
    if len(atoms) == 0:
        raise DataError("empty structure (0 atoms)")
    check_finite_positions(atoms.get_positions())
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
        check_pair_distances(i, j, d, min_distance)


PRECISIONS = ("float32", "float64", "mixed")


@dataclass(frozen=True)
class MDSystem:
    """Everything the integrators need, built once per structure.

    Attributes:
      displacement_fn, shift_fn: the jax-md space (free, or ``periodic_general`` in real coordinates).
      neighbor_fn: jax-md neighbour-list functions (cutoff ``r_max + skin``; OrderedSparse format, each pair
        once, with :attr:`half_list`, else Sparse; a cell list for orthorhombic boxes at least three cells of
        ``r_max + skin`` wide, all pairs otherwise).
      energy_fn: ``energy_fn(positions, neighbor, *, edge_capacity=None, **space_kwargs) -> scalar`` total
        energy in eV *without* the constant Σ E0 (kept out so that float32 runs resolve energy changes; add
        :attr:`e0_total` for the total). With ``edge_capacity`` (a Python int) the pairs within ``r_max``
        are first compacted into that many edge slots (see :meth:`edge_count`); the network then sees only
        them instead of every slot of the neighbour list. Pairs beyond the capacity would be dropped, so the
        caller must check :meth:`edge_count` (the MD engine does, every step) and enlarge it. With
        :attr:`half_list` an edge slot holds a pair (both directions).
      node_energy_fn: ``(positions, neighbor, *, edge_capacity=None, ...) -> [n_atoms]`` per-atom energies
        in eV, E0 excluded, in the dtype of the positions.
      uncertainty_fn: for a potential with an uncertainty (see :mod:`equiforce.potentials.uncertainty`),
        ``(positions, neighbor, *, edge_capacity=None, ...) -> (energy, forces, σ_E, σ_F [n_atoms])``: the
        (mean) energy without E0 (eV), forces (eV/Å) and calibrated uncertainties (eV, eV/Å) from one pass;
        None otherwise.
      e0_total: Σ_i E0[Z_i] in eV (float64, host).
      masses: ``[n_atoms]`` amu.
      box: ``[3, 3]`` jax-md box (lattice vectors as *columns*), or None for free space.
      periodic: whether the system is periodic.
      dtype: dtype of positions, momenta and the integrator.
      precision: ``float32``, ``float64`` or ``mixed`` (float32 network, float64 everything else).
      cell_list: whether neighbour-list rebuilds use a cell list.
      half_list: whether the neighbour list holds each pair once (the network evaluates both directions).
      mesh: the ``jax.sharding.Mesh`` the network's edges are sharded over (:mod:`equiforce.md.sharded`);
        None: one device.
      fixed: ``[n_atoms]`` bool NumPy mask of the atoms held fixed (:func:`equiforce.md.constraints.fixed_mask`:
        ``FixAtoms`` on the structure and the ``fixed`` argument of :func:`make_system`); None: none is.
    """

    displacement_fn: Any
    shift_fn: Any
    neighbor_fn: Any
    energy_fn: Any
    node_energy_fn: Any
    edge_count_fn: Any
    masses: jnp.ndarray
    box: jnp.ndarray | None
    periodic: bool
    species: jnp.ndarray
    skin: float
    dtype: Any
    e0_total: float
    r_max: float = 0.0
    fractional: bool = False
    precision: str = "float32"
    cell_list: bool = False
    half_list: bool = False
    uncertainty_fn: Any = None
    mesh: Any = None
    fixed: np.ndarray | None = None

    def edge_count(self, positions: jnp.ndarray, neighbor: Any, **space_kwargs: Any) -> jnp.ndarray:
        """Number of edges within ``r_max`` (int32 scalar; traceable): pairs with :attr:`half_list`, directed
        pairs (twice as many) without."""
        return self.edge_count_fn(positions, neighbor, **space_kwargs)


def with_precision(potential: Potential, params: Any, dtype: str) -> tuple[Potential, Any]:
    """``potential`` and ``params`` cast to ``dtype`` (``float32`` or ``float64``); unchanged if equal."""
    if potential.dtype == dtype:
        return potential, params
    potential = potential.replace(dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, potential.jnp_dtype), params)
    return potential, params


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("float64", "mixed") and not jax.config.jax_enable_x64:
        raise RuntimeError(
            f"precision={precision!r} needs JAX's 64-bit types; call jax.config.update('jax_enable_x64', True) "
            "at start-up"
        )


def make_system(
    potential: Potential,
    params: Any,
    atoms: Any,
    *,
    skin: float = 1.0,
    capacity_multiplier: float = 1.25,
    fractional: bool = False,
    precision: str | None = None,
    cell_list: bool | None = None,
    half_list: bool = True,
    edge_layout: Any = None,
    node_layout: Any = None,
    edge_shards: int = 1,
    fixed: Any = None,
) -> MDSystem:
    """Build the jax-md space, neighbour list and energy function for ``atoms``.

    The neighbour list holds all pairs within ``r_max + skin`` and is rebuilt (inside jit) whenever an
    atom moved more than ``skin / 2``. Edges between ``r_max`` and ``r_max + skin`` contribute nothing
    (smooth cutoff envelope), so the energy is exactly the Potential's.

    With ``fractional`` (periodic only; needed for NPT) positions live in the unit cube and the energy
    takes the current ``box`` as a keyword (jax-md's convention: ``x = box @ u``).

    Args:
      precision: ``float32`` (network and integrator), ``float64`` (both), or ``mixed``: a float32 network
        fed with edge vectors computed from float64 positions, its per-atom energies summed in float64,
        and a float64 integrator (forces keep the network's float32 resolution, but positions, momenta and
        the energy bookkeeping do not lose digits). Default: the potential's dtype. ``float64`` and
        ``mixed`` need ``jax_enable_x64``. The potential and parameters are cast as needed.
      cell_list: use a jax-md cell list for neighbour-list rebuilds (O(N) instead of O(N²) memory and time).
        Default: on for periodic, orthorhombic boxes (real coordinates) whose sides hold at least three
        cells of ``r_max + skin``; not available otherwise (free space, triclinic, NPT).
      half_list: keep each pair once (jax-md's OrderedSparse format) and let the network evaluate both
        directions from it (see ``Potential.node_energies_from_edges``): the same energies and forces, half
        the neighbour-list memory, and NequIP and MACE evaluate their radial and angular edge terms once per
        pair. False: the full (Sparse) list.
      edge_layout: ``(vectors, senders, receivers, edge_mask) -> (vectors, senders, receivers, edge_mask)``,
        applied to the edges just before the network (traceable). :mod:`equiforce.md.sharded` uses it to shard
        the edges over several devices. None: the edges as they are.
      node_layout: ``array -> array`` applied to the per-atom arrays at the network's boundary (species and
        atom mask going in, per-atom energies coming out; traceable). :mod:`equiforce.md.sharded` uses it to
        shard the network's per-atom work over the devices. None: as they are.
      edge_shards: the number of equal contiguous shards ``edge_layout`` cuts the edges into (one per device):
        the network is traced inside :func:`equiforce.potentials.layers.edge_shards`, so blocked edge sums
        block each shard on its own. 1: one.
      fixed: atoms held fixed (zero force and velocity): indices or an ``[n_atoms]`` bool mask, united with the
        ``ase.constraints.FixAtoms`` on ``atoms`` (:func:`equiforce.md.constraints.fixed_mask`); None: those alone.

    Raises:
      DataError / UnknownSpeciesError: see :func:`check_structure`.
      ValueError: an unknown precision, or ``cell_list=True`` where it is not available.
      ConstraintError (a ValueError): a constraint other than ``FixAtoms`` on ``atoms``, bad ``fixed`` indices,
        or every atom fixed.
      RuntimeError: ``float64``/``mixed`` precision with JAX's 64-bit types off.
    """
    check_structure(atoms, potential)
    fixed_atoms = fixed_mask(atoms, fixed)
    if fixed_atoms.all():
        raise ConstraintError(f"all {len(atoms)} atoms are fixed: nothing would move")
    precision = precision or potential.dtype
    _check_precision(precision)
    potential, params = with_precision(potential, params, "float64" if precision == "float64" else "float32")
    net_dtype = potential.jnp_dtype
    dtype = jnp.float32 if precision == "float32" else jnp.float64
    periodic = bool(np.all(atoms.get_pbc()))
    n = len(atoms)
    species = jnp.asarray(potential.species_index(atoms.get_atomic_numbers()), jnp.int32)
    masses = jnp.asarray(atoms.get_masses(), dtype)
    cutoff = float(potential.r_max)
    list_format = partition.NeighborListFormat.OrderedSparse if half_list else partition.NeighborListFormat.Sparse
    if periodic:
        cell = np.asarray(atoms.get_cell()[:], np.float64)
        box = jnp.asarray(cell.T, dtype)  # jax-md: lattice vectors as columns
        displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=fractional)
        orthorhombic = bool(np.allclose(cell, np.diag(np.diag(cell)), rtol=0, atol=1e-9))
        cells_fit = orthorhombic and bool(np.all(np.diag(cell) > 3.0 * (cutoff + skin)))
        available = cells_fit and not fractional
        if cell_list and not available:
            raise ValueError(
                "a cell list needs an orthorhombic box in real coordinates (no NPT) with sides longer than "
                f"3 (r_max + skin) = {3.0 * (cutoff + skin):.2f} Å"
            )
        use_cells = available if cell_list is None else bool(cell_list)
        # jax-md's cell list takes the box as side lengths; periodicity itself lives in displacement_fn
        if use_cells:
            neighbor_fn = partition.neighbor_list(
                displacement_fn,
                jnp.asarray(np.diag(cell), dtype),
                cutoff,
                dr_threshold=skin,
                capacity_multiplier=capacity_multiplier,
                format=list_format,
                disable_cell_list=False,
                fractional_coordinates=fractional,
            )
        else:  # jax-md's own all-pairs list scatters int64 into int32 under x64 (see equiforce.md.all_pairs)
            neighbor_fn = all_pairs_neighbor_list(
                displacement_fn, cutoff, dr_threshold=skin, capacity_multiplier=capacity_multiplier, format=list_format
            )
    else:
        if fractional:
            raise DataError("fractional coordinates (NPT) need a periodic structure")
        if cell_list:
            raise ValueError("a cell list needs a periodic orthorhombic box")
        use_cells = False
        box = None
        displacement_fn, shift_fn = space.free()
        neighbor_fn = all_pairs_neighbor_list(
            displacement_fn, cutoff, dr_threshold=skin, capacity_multiplier=capacity_multiplier, format=list_format
        )
    node_mask = jnp.ones((n,), bool)
    layout = edge_layout or (lambda *edge_arrays: edge_arrays)
    per_atom = node_layout or (lambda array: array)

    def space_kwargs_of(kwargs: dict[str, Any]) -> dict[str, Any]:
        # what reaches the displacement: `box` (NPT), `perturbation` (jax-md's pressure/stress)
        return {k: v for k, v in kwargs.items() if k in ("box", "perturbation", "new_box")}

    def edge_vectors(positions, senders, receivers, mask, space_kwargs: dict[str, Any]) -> jnp.ndarray:
        vectors = jax.vmap(partial(displacement_fn, **space_kwargs))(positions[senders], positions[receivers])
        return jnp.where(mask[:, None], vectors, 0.0)

    def pairs(positions: jnp.ndarray, neighbor: Any, space_kwargs: dict[str, Any]):
        receivers, senders = neighbor.idx[0], neighbor.idx[1]
        valid = receivers < n
        receivers = jnp.where(valid, receivers, 0)
        senders = jnp.where(valid, senders, 0)
        return edge_vectors(positions, senders, receivers, valid, space_kwargs), senders, receivers, valid

    def within_cutoff(positions: jnp.ndarray, neighbor: Any, space_kwargs: dict[str, Any]):
        vectors, senders, receivers, valid = pairs(jax.lax.stop_gradient(positions), neighbor, space_kwargs)
        return senders, receivers, valid & (jnp.sum(vectors**2, axis=-1) < cutoff**2)

    def edge_count_fn(positions: jnp.ndarray, neighbor: Any, **kwargs: Any) -> jnp.ndarray:
        return jnp.sum(within_cutoff(positions, neighbor, space_kwargs_of(kwargs))[2], dtype=jnp.int32)

    def edges(positions: jnp.ndarray, neighbor: Any, edge_capacity: int | None, space_kwargs: dict[str, Any]):
        if edge_capacity is None:
            vectors, senders, receivers, edge_mask = pairs(positions, neighbor, space_kwargs)
        else:
            # compact the pairs within r_max (in neighbour-list order) into
            # `edge_capacity` slots; the rest of the list (r_max .. r_max + skin, padding) is never evaluated
            all_senders, all_receivers, within = within_cutoff(positions, neighbor, space_kwargs)
            (slot,) = jnp.nonzero(within, size=edge_capacity, fill_value=0)
            edge_mask = jnp.arange(edge_capacity) < jnp.sum(within, dtype=jnp.int32)
            senders = jnp.where(edge_mask, all_senders[slot], 0)
            receivers = jnp.where(edge_mask, all_receivers[slot], 0)
            vectors = edge_vectors(positions, senders, receivers, edge_mask, space_kwargs)
        return vectors, senders, receivers, edge_mask

    def node_energies_with(
        pot: Potential, p: Any, positions: jnp.ndarray, neighbor: Any, edge_capacity: int | None, kwargs: dict
    ) -> jnp.ndarray:
        edge_arrays = edges(positions, neighbor, edge_capacity, space_kwargs_of(kwargs))
        vectors, senders, receivers, edge_mask = layout(*edge_arrays)
        with layers.edge_shards(edge_shards):
            e = pot.node_energies_from_edges(
                p,
                vectors.astype(net_dtype),
                per_atom(species),
                senders,
                receivers,
                edge_mask,
                per_atom(node_mask),
                include_e0=False,
                half_list=half_list,
            )
        return per_atom(e).astype(positions.dtype)

    def node_energy_fn(
        positions: jnp.ndarray, neighbor: Any, *, edge_capacity: int | None = None, **kwargs: Any
    ) -> jnp.ndarray:
        return node_energies_with(potential, params, positions, neighbor, edge_capacity, kwargs)

    uncertainty_fn = None
    uncertainty = potential.uncertainty_config
    if uncertainty is not None:
        single = potential.single()
        node_graph = jnp.zeros((n,), jnp.int32)

        def uncertainty_fn(positions: jnp.ndarray, neighbor: Any, *, edge_capacity: int | None = None, **kwargs: Any):
            def member(p: Any, pos: jnp.ndarray) -> jnp.ndarray:
                return node_energies_with(single, p, pos, neighbor, edge_capacity, kwargs)

            pred = predict_with_uncertainty(
                uncertainty, potential.model.last_layer, params, member, positions, node_graph, 1
            )
            sigma_f = pred.forces_uncertainty.astype(positions.dtype)
            return jnp.sum(pred.node_energies), pred.forces, pred.energy_uncertainty[0].astype(positions.dtype), sigma_f

    def energy_fn(positions: jnp.ndarray, neighbor: Any, **kwargs: Any) -> jnp.ndarray:
        return jnp.sum(node_energy_fn(positions, neighbor, **kwargs))

    return MDSystem(
        displacement_fn=displacement_fn,
        shift_fn=shift_fn,
        neighbor_fn=neighbor_fn,
        energy_fn=energy_fn,
        node_energy_fn=node_energy_fn,
        uncertainty_fn=uncertainty_fn,
        edge_count_fn=edge_count_fn,
        masses=masses,
        box=box,
        periodic=periodic,
        species=species,
        skin=skin,
        dtype=dtype,
        e0_total=float(np.sum(np.asarray(potential.atomic_energies)[np.asarray(species)])),
        r_max=cutoff,
        fractional=fractional,
        precision=precision,
        cell_list=use_cells,
        half_list=half_list,
        fixed=fixed_atoms if fixed_atoms.any() else None,
    )
