"""The Potential: a registered network plus species map, E0s, scale/shift and r_max.

It turns the network's per-atom outputs into physics:

* per-atom energy ``e_i = scale * (out_i - out_iso[Z_i]) + shift + E0[Z_i]`` (eV), where ``out_i`` is the
  network's output for atom i and ``out_iso[Z]`` its output for an isolated atom of element Z (no
  neighbours), so that an isolated atom has exactly ``E0[Z] + shift`` (models that reproduce another code
  exactly, ``ModelConfig.isolated_atom_reference = False``, use ``out_i`` itself, as that code does),
* total energy ``E = Σ_i e_i`` per structure,
* forces ``F = -∂E/∂positions`` (eV/Å) through ``jax.grad``,
* stress ``σ = (1/V) ∂E/∂ε`` (eV/Å³, ASE sign and Voigt order xx yy zz yz xz xy) from a homogeneous
  strain ε applied to positions and cell, for periodic structures (zero elsewhere).

Every function here is pure in ``params`` and a :class:`~equiforce.data.graph.Graph`, so callers jit it
once per padding budget.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from equiforce.data.graph import Graph
from equiforce.potentials.registry import ModelConfig, config_from_dict
from equiforce.potentials.uncertainty import (
    UncertainPrediction,
    UncertaintyConfig,
    network_params,
    predict_with_uncertainty,
    split_last_layer,
)

__all__ = ["Potential", "PotentialOutput", "UnknownSpeciesError"]

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


class UnknownSpeciesError(ValueError):
    """A structure contains an element the potential was not trained on."""


class PotentialOutput(NamedTuple):
    """Results for a padded graph batch (padding entries are zero).

    Attributes:
      energy: ``[n_graphs]`` eV.
      forces: ``[n_nodes, 3]`` eV/Å, or None when not requested.
      stress: ``[n_graphs, 6]`` eV/Å³ (ASE sign, Voigt), or None when not requested.
      node_energies: ``[n_nodes]`` per-atom energies, eV.
    """

    energy: jnp.ndarray
    forces: jnp.ndarray | None
    stress: jnp.ndarray | None
    node_energies: jnp.ndarray


def _voigt(s: jnp.ndarray) -> jnp.ndarray:
    return jnp.stack([s[:, 0, 0], s[:, 1, 1], s[:, 2, 2], s[:, 1, 2], s[:, 0, 2], s[:, 0, 1]], axis=-1)


@dataclasses.dataclass(frozen=True)
class Potential:
    """A machine-learning interatomic potential (configuration only; parameters are passed in).

    Attributes:
      model: the network's frozen config (e.g. :class:`~equiforce.potentials.nequip.NequIPConfig`).
      species: sorted atomic numbers the potential knows.
      r_max: cutoff radius in Å.
      atomic_energies: E0 per species (same order as ``species``), eV.
      scale: multiplies the network output, eV (typically the force RMS of the training set).
      shift: added per atom, eV.
      avg_num_neighbours: normalises the neighbour sums of the network.
      dtype: ``"float32"`` or ``"float64"``, the precision of parameters and computation.
      ensemble_size: K >= 1. With K > 1 the potential is a committee: every parameter has a leading axis of
        size K (one independently initialised member each), the members are ``jax.vmap``-ped, and energies
        and forces are the members' mean (see :mod:`equiforce.potentials.uncertainty`).
      uncertainty: how :meth:`predict_uncertainty` computes σ_E and σ_F, and its calibration; None: a
        committee's uncalibrated spread (K > 1) or no uncertainty (K = 1).

    Raises:
      ValueError: on inconsistent species / E0s, a non-positive r_max, an unknown dtype, an ensemble size
        below 1, or an uncertainty method that does not fit the ensemble size.
    """

    model: ModelConfig
    species: tuple[int, ...]
    r_max: float
    atomic_energies: tuple[float, ...]
    scale: float = 1.0
    shift: float = 0.0
    avg_num_neighbours: float = 1.0
    dtype: str = "float32"
    ensemble_size: int = 1
    uncertainty: UncertaintyConfig | None = None

    def __post_init__(self) -> None:
        species = tuple(int(z) for z in self.species)
        if not species or list(species) != sorted(set(species)) or species[0] < 1 or species[-1] > 118:
            raise ValueError(f"species must be sorted distinct atomic numbers in 1..118, got {self.species}")
        object.__setattr__(self, "species", species)
        e0 = tuple(float(e) for e in self.atomic_energies)
        if len(e0) != len(species) or not np.all(np.isfinite(e0)):
            raise ValueError(f"need one finite E0 per species ({len(species)}), got {self.atomic_energies}")
        object.__setattr__(self, "atomic_energies", e0)
        if not self.r_max > 0:
            raise ValueError(f"r_max must be positive, got {self.r_max}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not (np.isfinite(self.scale) and np.isfinite(self.shift) and self.avg_num_neighbours > 0):
            raise ValueError("scale and shift must be finite and avg_num_neighbours positive")
        if isinstance(self.ensemble_size, bool) or not isinstance(self.ensemble_size, int) or self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be an integer >= 1, got {self.ensemble_size!r}")
        if isinstance(self.uncertainty, dict):
            object.__setattr__(self, "uncertainty", UncertaintyConfig(**self.uncertainty))
        u = self.uncertainty
        if u is not None and (u.method == "committee") != (self.ensemble_size > 1):
            raise ValueError(
                f"uncertainty method {u.method!r} does not fit ensemble_size={self.ensemble_size} "
                "(a committee needs K > 1 members; LLPR is for a single network)"
            )

    # ------------------------------------------------------------------ construction
    @cached_property
    def module(self) -> nn.Module:
        extra = {"atomic_numbers": self.species} if self.model.uses_atomic_numbers else {}
        return self.model.build(
            num_species=len(self.species), r_max=float(self.r_max), avg_num_neighbours=self.avg_num_neighbours, **extra
        )

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @cached_property
    def _species_table(self) -> np.ndarray:
        table = np.full(119, -1, np.int32)
        table[list(self.species)] = np.arange(len(self.species), dtype=np.int32)
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (inverse: :meth:`from_dict`)."""
        return {
            "model": self.model.to_dict(),
            "species": list(self.species),
            "r_max": float(self.r_max),
            "atomic_energies": list(self.atomic_energies),
            "scale": float(self.scale),
            "shift": float(self.shift),
            "avg_num_neighbours": float(self.avg_num_neighbours),
            "dtype": self.dtype,
            "ensemble_size": self.ensemble_size,
            "uncertainty": None if self.uncertainty is None else self.uncertainty.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Potential:
        data = dict(data)
        data["model"] = config_from_dict(data["model"])
        data["species"] = tuple(data["species"])
        data["atomic_energies"] = tuple(data["atomic_energies"])
        return cls(**data)

    def replace(self, **changes: Any) -> Potential:
        return dataclasses.replace(self, **changes)

    def single(self) -> Potential:
        """The same potential as one network without uncertainty (what each committee member is)."""
        if self.ensemble_size == 1 and self.uncertainty is None:
            return self
        return dataclasses.replace(self, ensemble_size=1, uncertainty=None)

    @property
    def uncertainty_config(self) -> UncertaintyConfig | None:
        """The uncertainty this potential computes: its :attr:`uncertainty`, or an uncalibrated committee
        for K > 1, or None (no uncertainty)."""
        if self.uncertainty is not None:
            return self.uncertainty
        return UncertaintyConfig("committee") if self.ensemble_size > 1 else None

    def member_params(self, params: Any, k: int) -> Any:
        """Member ``k``'s parameters of a committee (the network's variables of one member)."""
        if self.ensemble_size == 1:
            raise ValueError("not a committee (ensemble_size == 1)")
        return jax.tree.map(lambda x: x[k], network_params(params))

    def check_species(self, atomic_numbers: np.ndarray) -> None:
        """Raise :class:`UnknownSpeciesError` if any atomic number is not in :attr:`species`."""
        z = np.unique(np.asarray(atomic_numbers))
        unknown = [int(v) for v in z if v < 1 or v > 118 or self._species_table[v] < 0]
        if unknown:
            from ase.data import chemical_symbols

            names = [chemical_symbols[v] if 0 < v < 119 else str(v) for v in unknown]
            raise UnknownSpeciesError(
                f"species {names} (Z={unknown}) unknown to this potential, which knows "
                f"{[chemical_symbols[v] for v in self.species]}"
            )

    def check_precision(self) -> None:
        """Raise RuntimeError if this is a float64 potential while JAX's 64-bit types are off."""
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise RuntimeError(
                "this potential computes in float64 but JAX runs with 64-bit types disabled (every array "
                "would silently become float32); call jax.config.update('jax_enable_x64', True) at start-up"
            )

    def init(self, key: jax.Array, graph: Graph | None = None) -> Any:
        """Random parameters in :attr:`dtype` (``graph`` only fixes the trace; a dimer is used if None)."""
        self.check_precision()
        if graph is None:
            graph = _dimer_graph(self.species[0], self.r_max)
        g = self._prepare(graph, None)
        init = jax.jit(self.module.init)  # one compilation, not op-by-op dispatch
        if self.ensemble_size == 1:
            params = init(key, *g)
        else:
            # member 0 gets `key` itself (it equals a single model initialised with the same key)
            keys = jnp.stack([key] + [jax.random.fold_in(key, k) for k in range(1, self.ensemble_size)])
            params = jax.vmap(lambda k: init(k, *g))(keys)
        params = jax.tree.map(lambda x: x.astype(self.jnp_dtype), params)
        if self.uncertainty is not None and self.uncertainty.method == "llpr":
            w, _ = split_last_layer(self.model.last_layer, params)
            zeros = jnp.zeros((w.shape[0], w.shape[0]), self.jnp_dtype)
            params = {**params, "llpr": {"projection": zeros, "force_projection": zeros}}
        return params

    # ------------------------------------------------------------------ physics
    def _prepare(self, graph: Graph, strain: jnp.ndarray | None, positions: jnp.ndarray | None = None):
        dtype = self.jnp_dtype
        pos = jnp.asarray(graph.positions if positions is None else positions, dtype)
        cell = jnp.asarray(graph.cell, dtype)
        node_graph = jnp.asarray(graph.node_graph)
        if strain is not None:
            deform = jnp.eye(3, dtype=dtype) + strain
            pos = jnp.einsum("ni,nji->nj", pos, deform[node_graph])
            cell = jnp.einsum("gij,gkj->gik", cell, deform)
        senders = jnp.asarray(graph.senders)
        receivers = jnp.asarray(graph.receivers)
        edge_cell = cell[node_graph[receivers]]
        vectors = pos[senders] - pos[receivers] + jnp.einsum("ei,eij->ej", jnp.asarray(graph.shifts, dtype), edge_cell)
        species = jnp.asarray(self._species_table)[jnp.asarray(graph.atomic_numbers)]
        species = jnp.where(jnp.asarray(graph.node_mask), species, 0)
        return vectors, species, senders, receivers, jnp.asarray(graph.edge_mask)

    def node_energies(
        self,
        params: Any,
        graph: Graph,
        *,
        include_e0: bool = True,
        positions: jnp.ndarray | None = None,
        strain: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """``[n_nodes]`` per-atom energies in eV (zero on padding; NaN on an unknown species)."""
        vectors, species, senders, receivers, edge_mask = self._prepare(graph, strain, positions)
        node_mask = jnp.asarray(graph.node_mask)
        known = jnp.asarray(self._species_table)[jnp.asarray(graph.atomic_numbers)] >= 0
        e = self.node_energies_from_edges(
            params, vectors, species, senders, receivers, edge_mask, node_mask, include_e0=include_e0
        )
        return jnp.where(node_mask & ~known, jnp.nan, e)

    def species_index(self, atomic_numbers: np.ndarray) -> np.ndarray:
        """``[n_atoms]`` int32 index of each atom's element in :attr:`species` (host side).

        Raises:
          UnknownSpeciesError: an element the potential does not know.
        """
        self.check_species(atomic_numbers)
        return self._species_table[np.asarray(atomic_numbers)]

    def node_energies_from_edges(
        self,
        params: Any,
        vectors: jnp.ndarray,
        species: jnp.ndarray,
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
        edge_mask: jnp.ndarray,
        node_mask: jnp.ndarray,
        *,
        include_e0: bool = True,
        half_list: bool = False,
    ) -> jnp.ndarray:
        """Per-atom energies from precomputed edge vectors (the entry point of the MD engine).

        Args:
          vectors: ``[n_edges, 3]`` Å, ``positions[senders] - positions[receivers]`` (+ image shift).
            Edges longer than :attr:`r_max` contribute nothing (smooth cutoff), so a neighbour list
            with a skin can be passed as is.
          species: ``[n_nodes]`` int32 species indices (see :meth:`species_index`).
          senders: ``[n_edges]`` int32, the edges' source atoms.
          receivers: ``[n_edges]`` int32, the edges' target atoms.
          edge_mask: ``[n_edges]`` bool, True for real (not padding) edges.
          node_mask: ``[n_nodes]`` bool, True for real atoms.
          half_list: the edges are a half neighbour list (each unordered pair once, in either direction;
            static). Every model gives the energies of the full list; NequIP and MACE evaluate their
            per-edge radial and angular work once per pair, the other models expand the list
            (:func:`~equiforce.potentials.layers.full_edges`).

        Returns:
          ``[n_nodes]`` energies in eV, zero where ``node_mask`` is False.
        """
        self.check_precision()
        params = jax.tree.map(jnp.asarray, network_params(params))  # NumPy weights (from a file) may be closed over
        if self.ensemble_size > 1:  # the committee's mean; parameter-free edge work is shared by the members
            single = self.single()
            members = jax.vmap(
                lambda p: single.node_energies_from_edges(
                    p,
                    vectors,
                    species,
                    senders,
                    receivers,
                    edge_mask,
                    node_mask,
                    include_e0=include_e0,
                    half_list=half_list,
                )
            )(params)
            return jnp.mean(members, axis=0)
        out = self.module.apply(params, vectors, species, senders, receivers, edge_mask, half_list=half_list)
        if self.model.isolated_atom_reference:
            out = out - self._isolated_outputs(params)[species]
        dtype = self.jnp_dtype
        e = jnp.asarray(self.scale, dtype) * out + jnp.asarray(self.shift, dtype)
        if include_e0:
            e = e + jnp.asarray(self.atomic_energies, dtype)[species]
        return jnp.where(node_mask, e, jnp.zeros_like(e))

    def _isolated_outputs(self, params: Any) -> jnp.ndarray:
        """``[n_species]`` network output of each species' atom without neighbours.

        It is subtracted from every atom's output, so an isolated atom has exactly ``E0 + shift``
        (self-connections and gates of message-passing models are otherwise non-zero there). This is a
        per-species constant: it changes no force and only re-defines what the network's E0 means.
        """
        n = len(self.species)
        dtype = self.jnp_dtype
        one_edge = jnp.zeros((1,), jnp.int32)
        return self.module.apply(
            params,
            jnp.zeros((1, 3), dtype),
            jnp.arange(n, dtype=jnp.int32),
            one_edge,
            one_edge,
            jnp.zeros((1,), bool),
        )

    def energy(self, params: Any, graph: Graph, *, include_e0: bool = True) -> jnp.ndarray:
        """``[n_graphs]`` total energies in eV."""
        e = self.node_energies(params, graph, include_e0=include_e0)
        return jax.ops.segment_sum(e, jnp.asarray(graph.node_graph), num_segments=graph.n_graphs)

    def __call__(
        self,
        params: Any,
        graph: Graph,
        *,
        compute_forces: bool = True,
        compute_stress: bool = False,
        include_e0: bool = True,
    ) -> PotentialOutput:
        """Energy, forces and (optionally) stress of every structure of a padded graph.

        With ``include_e0=False`` the reference energies are left out (training compares against
        labels minus Σ E0, computed on the host in float64, which keeps float32 training precise).
        """
        n_graphs = graph.n_graphs
        dtype = self.jnp_dtype
        node_graph = jnp.asarray(graph.node_graph)

        def total(positions, strain):
            e = self.node_energies(params, graph, include_e0=include_e0, positions=positions, strain=strain)
            per_graph = jax.ops.segment_sum(e, node_graph, num_segments=n_graphs)
            return jnp.sum(per_graph), (per_graph, e)

        positions = jnp.asarray(graph.positions, dtype)
        if not compute_forces and not compute_stress:
            _, (energy, node_e) = total(positions, None)
            return PotentialOutput(energy, None, None, node_e)
        strain = jnp.zeros((n_graphs, 3, 3), dtype) if compute_stress else None
        argnums = (0, 1) if compute_stress else 0
        grads, (energy, node_e) = jax.grad(total, argnums=argnums, has_aux=True)(positions, strain)
        if compute_stress:
            d_pos, d_strain = grads
            cell = jnp.asarray(graph.cell, dtype)
            volume = jnp.abs(jnp.linalg.det(cell))
            periodic = jnp.all(jnp.asarray(graph.pbc), axis=-1) & (volume > 0)
            safe_volume = jnp.where(periodic, volume, 1.0)
            sym = 0.5 * (d_strain + jnp.swapaxes(d_strain, 1, 2))
            stress = jnp.where(periodic[:, None], _voigt(sym) / safe_volume[:, None], 0.0)
        else:
            d_pos, stress = grads, None
        forces = jnp.where(jnp.asarray(graph.node_mask)[:, None], -d_pos, 0.0)
        return PotentialOutput(energy, forces if compute_forces else None, stress, node_e)

    def hessian(self, params: Any, graph: Graph, *, block_size: int | None = None) -> jnp.ndarray:
        """The exact Hessian ∂²E/∂x_i∂x_j of the total energy with respect to the positions.

        Forward-over-reverse: each row is a Jacobian-vector product of the forces' gradient function with a
        unit displacement (``jax.jvp`` of ``jax.grad``), so the result is exact to floating point, symmetric
        up to rounding, and needs no step size. For a periodic structure the cell is held fixed (the
        force constants of that cell, e.g. a phonon supercell).

        Args:
          params: the parameters.
          graph: a padded graph (typically one structure; with several, the cross blocks are zero).
          block_size: rows computed at once. ``None``: all ``3 n_nodes`` rows in one vectorised pass (fastest;
            memory about ``3 n_nodes`` times that of one force evaluation). An integer bounds the memory to
            about ``block_size`` force evaluations' worth (rows are computed in ``jax.lax.map`` blocks).

        Returns:
          ``[n_nodes, 3, n_nodes, 3]`` in eV/Å², in the potential's dtype; rows and columns of padding nodes
          are zero. ``H.reshape(3 n, 3 n)`` is the usual ``[3N, 3N]`` matrix (atom-major, x y z).

        Raises:
          ValueError: ``block_size`` < 1.
        """
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        dtype = self.jnp_dtype
        positions = jnp.asarray(graph.positions, dtype)
        mask = jnp.asarray(graph.node_mask)
        n = positions.shape[0]

        def gradient(pos: jnp.ndarray) -> jnp.ndarray:
            g = jax.grad(lambda p: jnp.sum(self.node_energies(params, graph, positions=p)))(pos)
            return jnp.where(mask[:, None], g, 0.0)

        def row(direction: jnp.ndarray) -> jnp.ndarray:
            return jax.jvp(gradient, (positions,), (direction,))[1]

        directions = jnp.eye(3 * n, dtype=dtype).reshape(3 * n, n, 3)
        if block_size is None or block_size >= 3 * n:
            rows = jax.vmap(row)(directions)
        else:
            rows = jax.lax.map(row, directions, batch_size=block_size)
        hess = rows.reshape(n, 3, n, 3)
        real = mask[:, None, None, None] & mask[None, None, :, None]
        return jnp.where(real, hess, 0.0)

    def predict_uncertainty(self, params: Any, graph: Graph, *, include_e0: bool = True) -> UncertainPrediction:
        """Mean energies and forces with calibrated uncertainties for every structure of a padded graph.

        Returns:
          :class:`~equiforce.potentials.uncertainty.UncertainPrediction`: per-atom energies (eV), forces
          (eV/Å), σ_E ``[n_graphs]`` (eV), σ_F ``[n_nodes]`` (eV/Å per Cartesian component; zero on padding),
          and the committee members' energies ``[K, n_graphs]`` (None for LLPR).

        Raises:
          ValueError: the potential has no uncertainty (a single network without ``equiforce calibrate``).
        """
        config = self.uncertainty_config
        if config is None:
            raise ValueError(
                "this potential has no uncertainty: train a committee (model.ensemble_size > 1) or add the "
                "single-model LLPR uncertainty with `equiforce calibrate MODEL DATA`"
            )
        single = self.single()

        def member_node_energies(p: Any, positions: jnp.ndarray) -> jnp.ndarray:
            return single.node_energies(p, graph, include_e0=include_e0, positions=positions)

        positions = jnp.asarray(graph.positions, self.jnp_dtype)
        pred = predict_with_uncertainty(
            config,
            self.model.last_layer,
            params,
            member_node_energies,
            positions,
            jnp.asarray(graph.node_graph),
            graph.n_graphs,
        )
        mask = jnp.asarray(graph.node_mask)
        return pred._replace(
            forces=jnp.where(mask[:, None], pred.forces, 0.0),
            forces_uncertainty=jnp.where(mask, pred.forces_uncertainty, 0.0),
        )


def _dimer_graph(z: int, r_max: float) -> Graph:
    """A two-atom graph used to trace the network at init time."""
    d = 0.5 * r_max
    return Graph(
        positions=np.array([[0.0, 0.0, 0.0], [d, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        atomic_numbers=np.array([z, z, 0], np.int32),
        senders=np.array([1, 0, 2], np.int32),
        receivers=np.array([0, 1, 2], np.int32),
        shifts=np.zeros((3, 3)),
        cell=np.zeros((2, 3, 3)),
        pbc=np.zeros((2, 3), bool),
        node_graph=np.array([0, 0, 1], np.int32),
        n_node=np.array([2, 1], np.int32),
        node_mask=np.array([True, True, False]),
        edge_mask=np.array([True, True, False]),
        graph_mask=np.array([True, False]),
    )
