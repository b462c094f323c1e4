"""An ASE calculator for a trained equiforce potential.

:class:`EquiforceCalculator` plugs a :class:`~equiforce.potentials.Potential` into ASE (optimisers,
molecular dynamics, constraints, cell filters)::

    from equiforce.md import EquiforceCalculator

    atoms.calc = EquiforceCalculator("model.eqf")
    atoms.get_potential_energy()  # eV
    atoms.get_forces()  # eV/Å, [n_atoms, 3]
    atoms.get_stress()  # eV/Å³, Voigt (xx yy zz yz xz xy), ASE sign; fully periodic cells only

Each call runs on the host: validate the atoms, wrap positions into the cell along periodic directions,
build the neighbour list (:func:`~equiforce.data.neighbours.build_neighbour_graph`) and pad the one
structure into a :class:`~equiforce.data.graph.Graph` of a *bucketed* size. The potential itself runs
in one jitted function per stress mode; JAX compiles it once per padded shape.

Padding policy (why an MD run compiles once): the node and edge budgets are rounded up to a fixed
geometric ladder of sizes (growth ~1.25, multiples of 8 nodes / 64 edges), and the edge budget gets a
safety margin (``edge_headroom``, 10% by default) on top of the current edge count. The budget is kept
between calls and only *grows* when a structure does not fit, so the fluctuating edge count of an MD
run or a relaxation stays in one bucket. The budget is chosen afresh only when the atoms themselves
change (``numbers`` in ASE's ``system_changes``: a different system), and any shape met before is a
cache hit for jit.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.geometry import wrap_positions

from equiforce.data.errors import DataError
from equiforce.data.graph import Graph, PaddingBudget, collate
from equiforce.data.neighbours import MIN_PAIR_DISTANCE, build_neighbour_graph, check_finite_positions
from equiforce.data.structures import StructureSet
from equiforce.potentials.potential import Potential

__all__ = ["EquiforceCalculator", "bucket_size"]


def bucket_size(value: int, *, minimum: int, multiple: int, growth: float = 1.25) -> int:
    """The smallest size of a fixed geometric ladder that is ``>= value``.

    The ladder starts at ``minimum`` and each rung is the previous one times ``growth``, rounded up to
    a multiple of ``multiple`` (and at least one ``multiple`` larger). It does not depend on the value
    asked for, so structures of similar size share rungs (and compiled shapes). Padding overhead is
    bounded by about ``growth`` for large sizes.

    Raises:
      ValueError: on a non-positive ``minimum`` / ``multiple`` or a ``growth`` <= 1.
    """
    if minimum < 1 or multiple < 1 or not growth > 1.0:
        raise ValueError(f"need minimum >= 1, multiple >= 1 and growth > 1, got {minimum}, {multiple}, {growth}")
    size = int(math.ceil(minimum / multiple) * multiple)
    while size < value:
        size = max(size + multiple, int(math.ceil(size * growth / multiple) * multiple))
    return size


class EquiforceCalculator(Calculator):
    """ASE calculator evaluating an equiforce :class:`~equiforce.potentials.Potential`.

    Construct it from a model file (``EquiforceCalculator("model.eqf")``, see
    :func:`~equiforce.potentials.load_model`) or from a potential and its parameters
    (:meth:`from_potential`).

    Results (``self.results``, NumPy float64, ASE units):

    * ``energy``, ``free_energy``: total energy, eV (float; the two are equal).
    * ``forces``: ``[n_atoms, 3]``, eV/Å (raw; ASE applies constraints such as ``FixAtoms`` itself).
    * ``energies``: ``[n_atoms]`` per-atom energies, eV (they sum to ``energy``).
    * ``stress``: ``[6]``, eV/Å³, Voigt order xx yy zz yz xz xy, ASE sign (positive = tensile, i.e.
      ``σ = (1/V) ∂E/∂ε``). Only for fully periodic structures (``pbc`` all True, non-singular cell),
      where it is always computed along with the forces. Asking for it otherwise raises ASE's
      :class:`~ase.calculators.calculator.PropertyNotImplementedError` (as ASE's EMT does).
    * ``energy_uncertainty``: calibrated σ_E of the energy, eV (float), and ``forces_uncertainty``:
      ``[n_atoms]`` calibrated σ_F per atom (standard deviation of one Cartesian component), eV/Å; only for
      a potential with an uncertainty (a committee, or a model given LLPR by ``equiforce calibrate``;
      see :mod:`equiforce.potentials.uncertainty`), computed with every evaluation. With a committee,
      energy and forces are the members' mean and ``member_energies`` (``[K]``, eV) holds each member's
      energy. Asking for them from a potential without uncertainty raises
      :class:`~ase.calculators.calculator.PropertyNotImplementedError`.

    Args:
      model_path: a model file written by :func:`~equiforce.potentials.save_model`.
      edge_headroom: the edge budget holds at least ``edge_headroom`` times the current edge count
        (then rounded up to a bucket), so neighbour-count fluctuations do not force a recompilation.
      min_distance: atoms closer than this (Å) are rejected as overlapping (default
        :data:`equiforce.data.neighbours.MIN_PAIR_DISTANCE`, the same threshold as training data and MD).
      **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (e.g. ``label``, ``directory``).

    Raises (when evaluating):
      DataError (a ``ValueError``): empty atoms, NaN/inf positions or cell, overlapping atoms, a singular
        periodic cell.
      UnknownSpeciesError (a ``ValueError``): an element the potential was not trained on (named).
      PropertyNotImplementedError: stress of a structure that is not fully periodic.

    Raises (when constructing):
      ModelFileError: an unreadable model file.
      ValueError: an ``edge_headroom`` below 1.
      RuntimeError: a float64 potential while ``jax_enable_x64`` is off and JAX arrays exist already (it
        would silently run in float32). Where no JAX array exists yet (a fresh program), a float64 potential
        switches JAX's 64-bit types on instead (:func:`equiforce.potentials.precision.enable_x64`).
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        "energies",
        "energy_uncertainty",
        "forces_uncertainty",
        "member_energies",
    ]
    default_parameters: ClassVar[dict[str, Any]] = {}

    NODE_MULTIPLE: ClassVar[int] = 8
    EDGE_MULTIPLE: ClassVar[int] = 64
    GROWTH: ClassVar[float] = 1.25

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        edge_headroom: float = 1.1,
        min_distance: float = MIN_PAIR_DISTANCE,
        _potential: Potential | None = None,
        _params: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (model_path is None) == (_potential is None):
            raise TypeError("give a model file path, or use EquiforceCalculator.from_potential(potential, params)")
        if model_path is not None:
            from equiforce.potentials.model_io import enable_x64_for, load_model

            enable_x64_for(model_path)  # a float64 file in a fresh program: JAX's 64-bit types on (if safe)
            potential, params, header = load_model(model_path)
            self.header: dict[str, Any] = header
        else:
            potential, params = _potential, _params
            self.header = {}
        if not edge_headroom >= 1.0:
            raise ValueError(f"edge_headroom must be >= 1, got {edge_headroom}")
        if potential.dtype == "float64":
            from equiforce.potentials.precision import enable_x64

            enable_x64("the potential computes in float64")
        self.potential: Potential = potential
        self.params = jax.tree.map(lambda x: jnp.asarray(x, potential.jnp_dtype), params)
        self.edge_headroom = float(edge_headroom)
        self.min_distance = float(min_distance)
        self.budget: PaddingBudget | None = None
        self.trace_count = 0  # how many times the potential has been traced (= compiled) by this calculator
        self._functions: dict[Any, Any] = {}

    @classmethod
    def from_potential(cls, potential: Potential, params: Any, **kwargs: Any) -> EquiforceCalculator:
        """A calculator for an in-memory potential and its parameter tree (see :class:`EquiforceCalculator`)."""
        if not isinstance(potential, Potential):
            raise TypeError(f"expected a Potential, got {type(potential).__name__}")
        return cls(_potential=potential, _params=params, **kwargs)

    # ------------------------------------------------------------------ jitted evaluation
    def _function(self, compute_stress: bool):
        """The jitted ``(params, graph) -> (energy, forces, stress | None, node_energies, uncertainty | None)``
        for a stress mode; ``uncertainty`` is ``(σ_E, σ_F, member energies | None)`` when the potential has one."""
        if compute_stress not in self._functions:
            potential = self.potential
            uncertain = potential.uncertainty_config is not None

            def evaluate(params, graph: Graph):
                self.trace_count += 1  # Python side effect: runs once per trace, i.e. per compilation
                if uncertain:
                    u = potential.predict_uncertainty(params, graph)
                    if compute_stress:
                        out = potential(params, graph, compute_forces=True, compute_stress=True)
                        stress = out.stress
                    else:
                        stress = None
                    energy = jax.ops.segment_sum(u.node_energies, graph.node_graph, num_segments=graph.n_graphs)
                    unc = (u.energy_uncertainty, u.forces_uncertainty, u.member_energies)
                    return energy, u.forces, stress, u.node_energies, unc
                out = potential(params, graph, compute_forces=True, compute_stress=compute_stress)
                return out.energy, out.forces, out.stress, out.node_energies, None

            self._functions[compute_stress] = jax.jit(evaluate)
        return self._functions[compute_stress]

    def _choose_budget(self, n_atoms: int, n_edges: int) -> PaddingBudget:
        """Keep the current budget if the structure fits; otherwise grow it (never shrink) to bucket sizes."""
        if self.budget is not None and self.budget.fits(n_atoms, n_edges, 1):
            return self.budget
        want_nodes = bucket_size(
            n_atoms + 1, minimum=self.NODE_MULTIPLE, multiple=self.NODE_MULTIPLE, growth=self.GROWTH
        )
        want_edges = bucket_size(
            max(math.ceil(n_edges * self.edge_headroom), n_edges + 1),
            minimum=self.EDGE_MULTIPLE,
            multiple=self.EDGE_MULTIPLE,
            growth=self.GROWTH,
        )
        if self.budget is not None:
            want_nodes = max(want_nodes, self.budget.n_nodes)
            want_edges = max(want_edges, self.budget.n_edges)
        self.budget = PaddingBudget(n_nodes=want_nodes, n_edges=want_edges, n_graphs=2)
        return self.budget

    # ------------------------------------------------------------------ host side
    def _prepare(self, atoms) -> tuple[Graph, bool]:
        """Validate ``atoms`` and pad it into a one-structure graph; also say whether stress is defined."""
        n_atoms = len(atoms)
        if n_atoms == 0:
            raise DataError("empty Atoms object (0 atoms): nothing to evaluate")
        numbers = np.asarray(atoms.get_atomic_numbers())
        self.potential.check_species(numbers)
        positions = np.asarray(atoms.get_positions(), dtype=np.float64)
        check_finite_positions(positions)
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
        if not np.all(np.isfinite(cell)):
            raise DataError("cell contains NaN or inf")
        if np.any(pbc):
            if np.any(pbc & (np.linalg.norm(cell, axis=1) == 0.0)):
                raise DataError(f"a periodic direction has a zero lattice vector (pbc={pbc.tolist()})")
            if not np.all(pbc):
                # e.g. a slab without a vacuum vector: fill zero vectors of non-periodic directions (edges
                # never shift along them, and no stress is computed, so their length does not matter).
                cell = np.asarray(atoms.cell.complete()[:], dtype=np.float64)
            if abs(np.linalg.det(cell)) < 1e-9:
                raise DataError("periodic structure with a singular cell (zero volume)")
            positions = wrap_positions(positions, cell, pbc=pbc, eps=0.0)
        neighbours = build_neighbour_graph(positions, cell, pbc, self.potential.r_max, min_distance=self.min_distance)
        structures = StructureSet(
            atomic_numbers=numbers.astype(np.int32),
            positions=positions,
            n_atoms=np.array([n_atoms]),
            cell=cell[None],
            pbc=pbc[None],
        )
        budget = self._choose_budget(n_atoms, neighbours.n_edges)
        dtype = np.float64 if self.potential.dtype == "float64" else np.float32
        graph = collate(structures, [neighbours], [0], budget, dtype=dtype).graph
        periodic = bool(np.all(pbc)) and abs(np.linalg.det(cell)) > 1e-9
        return graph, periodic

    def get_hessian(self, atoms: Any = None, *, block_size: int | None = None) -> np.ndarray:
        """The exact Hessian of the energy with respect to the positions (see :meth:`Potential.hessian`).

        Args:
          atoms: the structure (default: the calculator's atoms); a periodic cell is held fixed.
          block_size: rows computed at once (None: all; an integer bounds the memory to about that many
            force evaluations).

        Returns:
          ``[3N, 3N]`` float64, eV/Å², atom-major (x, y, z per atom), as
          :meth:`ase.vibrations.VibrationsData.from_2d` expects.

        Raises:
          ValueError: the evaluation errors of the class (empty atoms, NaN, overlapping atoms, unknown
            species: ``UnknownSpeciesError``), or no atoms given or attached.
        """
        atoms = self.atoms if atoms is None else atoms
        if atoms is None:
            raise ValueError("get_hessian needs atoms (none given, none attached)")
        graph, _ = self._prepare(atoms)
        key = ("hessian", block_size)
        if key not in self._functions:
            potential = self.potential
            self._functions[key] = jax.jit(lambda p, g: potential.hessian(p, g, block_size=block_size))
        hess = np.asarray(self._functions[key](self.params, graph), dtype=np.float64)
        n = len(atoms)
        return hess[:n, :, :n, :].reshape(3 * n, 3 * n)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        """Fill ``self.results`` for ``atoms`` (ASE's calculator protocol; see the class docstring)."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if "numbers" in system_changes:
            self.budget = None  # a different system: choose its buckets afresh (seen shapes stay compiled)
        graph, periodic = self._prepare(atoms)
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                "stress is only defined for fully periodic structures (pbc all True, non-singular cell); "
                f"got pbc={atoms.get_pbc().tolist()}"
            )
        wants_uncertainty = {"energy_uncertainty", "forces_uncertainty", "member_energies"} & set(properties)
        if wants_uncertainty and self.potential.uncertainty_config is None:
            raise PropertyNotImplementedError(
                f"{sorted(wants_uncertainty)}: this potential has no uncertainty (train a committee with "
                "model.ensemble_size > 1, or add LLPR with `equiforce calibrate MODEL DATA`)"
            )
        if "member_energies" in properties and self.potential.ensemble_size == 1:
            raise PropertyNotImplementedError("member_energies: this potential is not a committee")
        energy, forces, stress, node_energies, unc = self._function(periodic)(self.params, graph)
        n = len(atoms)
        e = float(np.asarray(energy, dtype=np.float64)[0])
        self.results = {
            "energy": e,
            "free_energy": e,
            "forces": np.array(forces[:n], dtype=np.float64),
            "energies": np.array(node_energies[:n], dtype=np.float64),
        }
        if periodic:
            self.results["stress"] = np.array(stress[0], dtype=np.float64)
        if unc is not None:
            sigma_e, sigma_f, members = unc
            self.results["energy_uncertainty"] = float(np.asarray(sigma_e, np.float64)[0])
            self.results["forces_uncertainty"] = np.array(sigma_f[:n], dtype=np.float64)
            if members is not None:
                self.results["member_energies"] = np.array(members[:, 0], dtype=np.float64)
