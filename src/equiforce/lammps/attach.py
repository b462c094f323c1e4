"""An equiforce potential as the interatomic potential of a running LAMMPS, on any number of MPI ranks.

LAMMPS' ``fix external`` (mode ``pf/callback``) calls a Python function at every step on every rank, with the
rank's *local* atoms; the fix adds the forces the function returns to those local atoms only, so no force on a
ghost atom can be sent back to its owner. The method that is exact under that constraint (and the one used):

**A ghost shell deep enough to compute every needed per-atom energy on the rank itself.** A model with ``L``
message-passing layers and cutoff ``r_max`` gives atom ``i`` an energy ``e_i`` that depends on the atoms
within ``L·r_max`` of ``i`` (Allegro: ``L = 1``, it is strictly local). With every atom within
``R = 2·L·r_max`` of a local atom present as a ghost (``comm_modify cutoff R + skin``), each rank builds the
graph of its local and ghost atoms (explicit periodic images: no cell shifts) and evaluates

* ``E_all = Σ e_a`` over all its atoms; the energies of the atoms within ``L·r_max`` of a local atom are exact
  (their whole receptive field is inside the shell), and the energy of any atom farther away does not depend
  on the local atoms in the rank's graph either, so ``F_j = −∂E_all/∂x_j`` is exactly the whole system's force
  on every local atom ``j``;
* the rank's energy ``E_rank = Σ_{i local} e_i`` (exact; summed over ranks by LAMMPS it is the total energy);
* the rank's virial ``W_rank = −Σ_e v_e ⊗ ∂E_rank/∂v_e`` over the edges of its graph (local and ghost atoms,
  unwrapped coordinates, so every edge vector ``v_e`` follows a strain): the strain derivative of its local
  atoms' energies (equal to ``−Σ_a r_a ⊗ ∂E_rank/∂r_a``, which cancels large terms), whose sum over ranks is
  the total virial ``W = −∂E/∂ε`` (LAMMPS' sign: ``P = (N k T + tr W / 3) / V``; ASE's stress is ``σ = −W / V``).
  It costs a second backward pass, taken only on steps where LAMMPS asks for the virial (``vflag_global``).

On a single rank every ghost is a periodic image of one of the rank's own atoms, so no shell is needed: the
graph is the periodic structure's own (nodes are the local atoms; an edge to a ghost goes to the ghost's owner,
found by its atom ID, with the image offset as its shift, as the ASE calculator's graph), ghosts within ``r_max``
suffice, and the virial is ``W = −Σ_e v_e ⊗ ∂E/∂v_e`` over the edge vectors (image shifts included). Its cost
is the calculator's, whatever the box size.

Alternatives and why not: a per-layer halo exchange needs a communication inside the network's forward and
backward pass (not possible from a fix callback); reverse communication of ghost forces would halve the shell
depth (``L·r_max``) but ``fix external`` has no hook for it. The price of the shell, the number of ghost atoms,
is measured in ``BENCHMARKS.md`` ("LAMMPS").

Exactness guard: the shell holds every atom within ``R`` of a local atom only while atoms have moved less than
``skin / 2`` since the last neighbour-list rebuild (LAMMPS' own criterion with ``neigh_modify check yes``).
Every step the largest displacement since the rebuild is reduced over all ranks; if ``R + 2·max displacement``
exceeds the communication cutoff the run stops with :class:`LammpsInputError`.

Uncertainty (models with one: a committee, or LLPR from ``equiforce calibrate``): per-atom σ_F in the per-atom
property ``d_<fix-id>_sigma`` (a ``fix property/atom``, for ``dump custom``), the maximum over all atoms in
``f_<fix-id>[1]`` (thermo_style, variables, ``fix halt``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from equiforce.lammps._library import check_mpi_launch, import_lammps
from equiforce.md.calculator import bucket_size
from equiforce.potentials.potential import Potential, UnknownSpeciesError
from equiforce.potentials.uncertainty import predict_with_uncertainty

__all__ = ["EquiforceFix", "LammpsInputError", "attach", "message_passing_layers"]

# LAMMPS metal units: energy eV, distance Å, force eV/Å, pressure bar (the virial is in energy units).
METAL = "metal"


class LammpsInputError(ValueError):
    """The LAMMPS system or input does not fit the potential (units, elements, box, skin); the message says why."""


def message_passing_layers(potential: Potential) -> int:
    """How many hops of ``r_max`` an atom's energy reaches: 1 for Allegro, the number of interaction layers of
    MACE, NequIP, PaiNN and SchNet.

    Raises:
      LammpsInputError: a model whose receptive field is not known here.
    """
    config = potential.model
    if config.name == "allegro":
        return 1
    layers = getattr(config, "num_interactions", None)
    if isinstance(layers, int) and layers >= 1:
        return layers
    raise LammpsInputError(f"the receptive field of model {config.name!r} is not known to equiforce.lammps")


def _elements_to_numbers(elements: list[str] | tuple[str, ...]) -> np.ndarray:
    from ase.data import atomic_numbers

    numbers = []
    for e in elements:
        if e not in atomic_numbers or atomic_numbers[e] == 0:
            raise LammpsInputError(f"{e!r} is not a chemical element symbol (elements are given one per atom type)")
        numbers.append(atomic_numbers[e])
    return np.asarray(numbers, np.int32)


class EquiforceFix:
    """The object :func:`attach` returns: the callback of the ``fix external``, its state and its counters.

    Attributes:
      fix_id: the fix's ID (its energy, virial and global vector are ``f_<fix_id>``, ``f_<fix_id>[1]``).
      ghost_cutoff: ``2·L·r_max`` (Å), the shell of atoms each rank uses (``r_max`` on a single rank).
      comm_cutoff: the communication cutoff set in LAMMPS (``ghost_cutoff + skin``), Å.
      trace_count: how many times the network was traced (= compiled) on this rank.
      calls: callback calls on this rank; ``atoms_in_graph`` / ``local_atoms``: their running sums (the ghost
        fraction is ``1 − local_atoms / atoms_in_graph``).
      sigma_property: per-atom σ_F name for dumps (``d_<fix_id>_sigma``), or None without uncertainty.
      error: the exception that stopped the run (see :meth:`raise_if_failed`), or None.
    """

    NODE_MULTIPLE = 64
    EDGE_MULTIPLE = 512
    GROWTH = 1.25

    def __init__(
        self,
        lmp: Any,
        potential: Potential,
        params: Any,
        elements: list[str] | tuple[str, ...],
        *,
        fix_id: str = "equiforce",
        skin: float = 2.0,
        uncertainty: bool | None = None,
        edge_headroom: float = 1.1,
    ) -> None:
        _, MPI = import_lammps()
        check_mpi_launch(MPI)
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if getattr(lmp, "comm", None) is None else lmp.comm
        self.lmp = lmp
        self.fix_id = fix_id
        units = lmp.extract_global("units")
        if units != METAL:
            raise LammpsInputError(
                f"LAMMPS units are {units!r}: equiforce potentials need `units metal` (eV, Å, ps; the model's "
                "energies are eV and lengths Å), set it at the top of the input"
            )
        if not lmp.extract_setting("box_exist"):
            raise LammpsInputError("no simulation box yet: attach the potential after read_data / create_box")
        potential.check_precision()
        self.potential = potential
        self.params = jax.tree.map(lambda x: jnp.asarray(x, potential.jnp_dtype), params)
        numbers = _elements_to_numbers(elements)
        ntypes = int(lmp.extract_global("ntypes"))
        if len(numbers) != ntypes:
            raise LammpsInputError(
                f"{len(numbers)} elements given ({' '.join(elements)}) for {ntypes} LAMMPS atom types: give one "
                "element per type, in type order"
            )
        try:
            potential.check_species(numbers)
        except UnknownSpeciesError as err:
            raise UnknownSpeciesError(f"LAMMPS atom types {' '.join(elements)}: {err}") from None
        # type (1-based) -> species index; index 0 unused
        self.type_species = np.concatenate([[0], potential.species_index(numbers)]).astype(np.int32)
        self.layers = message_passing_layers(potential)
        self.r_max = float(potential.r_max)
        self.single_rank = self.comm.Get_size() == 1
        self.half_list = True
        # one rank: ghosts are images of its own atoms, folded onto them (edges need ghosts within r_max);
        # several ranks: the 2·L·r_max shell (module docstring)
        self.ghost_cutoff = self.r_max if self.single_rank else 2.0 * self.layers * self.r_max
        if not skin >= 0:
            raise LammpsInputError(f"skin must be >= 0, got {skin}")
        self.skin = float(skin)
        self.comm_cutoff = self.ghost_cutoff + self.skin
        config = potential.uncertainty_config
        if uncertainty and config is None:
            raise LammpsInputError(
                "uncertainty requested but the model has none (train a committee or run `equiforce calibrate`)"
            )
        self.uncertain = config is not None if uncertainty is None else bool(uncertainty)
        self.sigma_property = f"d_{fix_id}_sigma" if self.uncertain else None
        self.edge_headroom = float(edge_headroom)
        self.n_nodes = 0
        self.n_edges = 0
        self.trace_count = 0
        self.calls = 0
        self.atoms_in_graph = 0
        self.local_atoms = 0
        self.error: BaseException | None = None
        self.max_sigma = 0.0
        self._x_rebuild: np.ndarray | None = None
        self._functions: dict[tuple[bool, bool], Any] = {}

        commands = [
            f"comm_modify cutoff {self.comm_cutoff:.10g}",
            f"fix {fix_id} all external pf/callback 1 1",
            f"fix_modify {fix_id} energy yes virial yes",
        ]
        if self.uncertain:
            commands.append(f"fix {fix_id}_sigma all property/atom d_{fix_id}_sigma")
        for c in commands:
            lmp.command(c)
        lmp.fix_external_set_vector_length(fix_id, 1)
        lmp.set_fix_external_callback(fix_id, self._callback, self)

    # ------------------------------------------------------------------ evaluation
    def _function(self, virial: bool):
        """The jitted ``(params, positions, shifts, species, senders, receivers, edge_mask, node_mask, local_mask)
        -> (E_rank, forces, W [3, 3], σ_F)``; edge vectors are ``x[s] − x[r] + shift`` (Å)."""
        key = (virial, self.half_list)
        if key not in self._functions:
            potential = self.potential
            uncertain = self.uncertain
            half_list = self.half_list

            def evaluate(params, pos, shifts, species, senders, receivers, edge_mask, node_mask, local_mask):
                self.trace_count += 1  # runs once per trace

                def node_e(p, x, sh, model=potential):
                    vectors = x[senders] - x[receivers] + sh
                    return model.node_energies_from_edges(
                        p, vectors, species, senders, receivers, edge_mask, node_mask, half_list=half_list
                    )

                def local_energy(x, sh):
                    return jnp.sum(jnp.where(local_mask, node_e(params, x, sh), 0.0))

                if uncertain:
                    single = potential.single()
                    pred = predict_with_uncertainty(
                        potential.uncertainty_config,
                        potential.model.last_layer,
                        params,
                        lambda p, x: node_e(p, x, shifts, single),
                        pos,
                        jnp.zeros(pos.shape[0], jnp.int32),
                        1,
                    )
                    e, forces, sigma = pred.node_energies, pred.forces, pred.forces_uncertainty
                    energy = jnp.sum(jnp.where(local_mask, e, 0.0))
                    if virial:
                        g_x, g_sh = jax.grad(local_energy, argnums=(0, 1))(pos, shifts)
                else:
                    sigma = jnp.zeros(pos.shape[0], pos.dtype)
                    if virial:
                        # one forward pass; backward passes for the forces (all atoms' energies) and the virial
                        # (the rank's own atoms' energies), one after the other (vmapped over the two cotangents,
                        # the virial of a float32 model on several ranks came out wrong)
                        e, vjp = jax.vjp(lambda x, sh: node_e(params, x, sh), pos, shifts)
                        forces = -vjp(node_mask.astype(e.dtype))[0]
                        g_x, g_sh = vjp(local_mask.astype(e.dtype))
                    else:
                        e, vjp = jax.vjp(lambda x: node_e(params, x, shifts), pos)
                        forces = -vjp(node_mask.astype(e.dtype))[0]
                    energy = jnp.sum(jnp.where(local_mask, e, 0.0))
                if virial:
                    # W = −∂E_rank/∂ε = −Σ_e v_e ⊗ ∂E_rank/∂v_e: the energy depends on positions only through the
                    # edge vectors v_e = x_s − x_r + shift_e, which all follow the strain, and ∂E/∂v_e = ∂E/∂shift_e.
                    # (The equal −Σ_a x_a ⊗ ∂E/∂x_a over a rank's atoms cancels terms of |x| ~ the shell's size and
                    # lost the virial entirely in float32 on several ranks.)
                    del g_x
                    vectors = pos[senders] - pos[receivers] + shifts
                    w = -jnp.einsum("ei,ej->ij", jnp.where(edge_mask[:, None], vectors, 0.0), g_sh)
                else:
                    w = jnp.zeros((3, 3), pos.dtype)
                return energy, forces, 0.5 * (w + w.T), sigma

            self._functions[key] = jax.jit(evaluate)
        return self._functions[key]

    def _pad(self, pos, shifts, species, senders, receivers, nlocal):
        n, n_edges = len(pos), len(senders)
        if n + 1 > self.n_nodes:
            self.n_nodes = max(
                self.n_nodes, bucket_size(n + 1, minimum=64, multiple=self.NODE_MULTIPLE, growth=self.GROWTH)
            )
        if n_edges > self.n_edges:
            want = max(math.ceil(n_edges * self.edge_headroom), n_edges + 1)
            self.n_edges = max(
                self.n_edges, bucket_size(want, minimum=512, multiple=self.EDGE_MULTIPLE, growth=self.GROWTH)
            )
        N, E = self.n_nodes, self.n_edges
        dtype = np.float64 if self.potential.dtype == "float64" else np.float32
        positions = np.zeros((N, 3), dtype)
        positions[:n] = pos
        edge_shifts = np.zeros((E, 3), dtype)
        edge_shifts[:n_edges] = shifts
        species_p = np.zeros(N, np.int32)
        species_p[:n] = species
        senders_p = np.full(E, n, np.int32)
        receivers_p = np.full(E, n, np.int32)
        senders_p[:n_edges] = senders
        receivers_p[:n_edges] = receivers
        edge_mask = np.zeros(E, bool)
        edge_mask[:n_edges] = True
        node_mask = np.zeros(N, bool)
        node_mask[:n] = True
        local_mask = np.zeros(N, bool)
        local_mask[:nlocal] = True
        return positions, edge_shifts, species_p, senders_p, receivers_p, edge_mask, node_mask, local_mask

    @staticmethod
    def _check_overlap(pos: np.ndarray, pairs: np.ndarray, centre: np.ndarray) -> None:
        if len(pairs):
            dist = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
            k = int(np.argmin(dist))
            if dist[k] < 0.5:
                raise LammpsInputError(
                    f"atoms closer than 0.5 Å (distance {dist[k]:.3g} Å near {pos[pairs[k, 0]] + centre} Å): "
                    "overlapping atoms (or an atom and its own periodic image in a box that small), or a blown-up "
                    "run"
                )

    def _graph(self, x_all: np.ndarray, types: np.ndarray, nlocal: int):
        """Several ranks: padded arrays of the rank's local atoms and the ghosts within ``ghost_cutoff`` of one
        of them (explicit images, half edge list, no shifts)."""
        local = x_all[:nlocal]
        ghosts = x_all[nlocal:]
        if len(ghosts):
            d, _ = cKDTree(local).query(ghosts, distance_upper_bound=self.ghost_cutoff)
            keep = np.nonzero(np.isfinite(d))[0] + nlocal
            idx = np.concatenate([np.arange(nlocal), keep])
        else:
            idx = np.arange(nlocal)
        centre = local.mean(axis=0)
        pos = x_all[idx] - centre  # virial and float32 precision: coordinates about the rank's centre
        pairs = cKDTree(pos).query_pairs(self.r_max, output_type="ndarray").reshape(-1, 2)
        self._check_overlap(pos, pairs, centre)
        arrays = self._pad(
            pos, np.zeros((len(pairs), 3)), self.type_species[types[idx]], pairs[:, 1], pairs[:, 0], nlocal
        )
        return arrays, len(idx)

    def _graph_single(self, x_all: np.ndarray, types: np.ndarray, tags: np.ndarray, nlocal: int):
        """One rank: every ghost is a periodic image of a local atom, so the graph is the periodic structure's own
        (nodes: the local atoms; an edge to a ghost goes to its owner, with the image's offset as the shift), as
        the ASE calculator builds it; ghosts within ``r_max`` suffice. Half list: each periodic pair ``(i, j,
        shift) ≡ (j, i, −shift)`` once (kept where the owner's index is larger, or for an atom and its own image
        where the shift is lexicographically positive)."""
        owner_of_tag = np.full(int(tags.max()) + 1, -1, np.int64)
        owner_of_tag[tags[:nlocal]] = np.arange(nlocal)
        owner = owner_of_tag[tags]
        centre = x_all[:nlocal].mean(axis=0)
        pos = x_all - centre
        pairs = cKDTree(pos).query_pairs(self.r_max, output_type="ndarray").reshape(-1, 2)
        self._check_overlap(pos, pairs, centre)
        a, b = pairs[:, 0], pairs[:, 1]
        a_local, b_local = a < nlocal, b < nlocal
        both = a_local & b_local
        # a local receiver with a ghost sender (either order in the pair)
        recv = np.concatenate([a[a_local & ~b_local], b[b_local & ~a_local]])
        img = np.concatenate([b[a_local & ~b_local], a[b_local & ~a_local]])
        own = owner[img]
        shift = pos[img] - pos[own]  # the image's offset from its owner (a lattice vector)
        eps = 1e-6
        positive = (shift[:, 0] > eps) | (
            (np.abs(shift[:, 0]) <= eps) & ((shift[:, 1] > eps) | ((np.abs(shift[:, 1]) <= eps) & (shift[:, 2] > eps)))
        )
        keep = (own > recv) | ((own == recv) & positive)
        receivers = np.concatenate([a[both], recv[keep]])
        senders = np.concatenate([b[both], own[keep]])
        shifts = np.concatenate([np.zeros((int(both.sum()), 3)), shift[keep]])
        arrays = self._pad(pos[:nlocal], shifts, self.type_species[types[:nlocal]], senders, receivers, nlocal)
        return arrays, nlocal  # the graph holds the local atoms only

    def _compute(self, ntimestep: int, nlocal: int, f: np.ndarray) -> tuple[float, float, np.ndarray]:
        """This rank's forces (written into ``f``); returns (largest displacement since the last rebuild, the
        rank's energy, its virial ``[6]`` in LAMMPS' order xx yy zz xy xz yz, zero unless asked for)."""
        lmp = self.lmp
        nall = nlocal + int(lmp.extract_setting("nghost"))
        x_all = np.array(lmp.numpy.extract_atom("x", nelem=nall, dim=3), dtype=np.float64).reshape(nall, 3)
        types = np.array(lmp.numpy.extract_atom("type", nelem=nall), dtype=np.int64).reshape(-1)
        # displacement since the last neighbour-list rebuild (exactness guard, reduced over ranks by the caller)
        if int(lmp.extract_setting("neigh_ago")) == 0 or self._x_rebuild is None or len(self._x_rebuild) != nlocal:
            self._x_rebuild = x_all[:nlocal].copy()
        if nlocal == 0:
            f[:] = 0.0
            return 0.0, 0.0, np.zeros(6)
        moved = float(np.max(np.linalg.norm(x_all[:nlocal] - self._x_rebuild, axis=1)))
        if self.single_rank:
            tags = np.array(lmp.numpy.extract_atom("id", nelem=nall), dtype=np.int64).reshape(-1)
            arrays, n = self._graph_single(x_all, types, tags, nlocal)
        else:
            arrays, n = self._graph(x_all, types, nlocal)
        want_virial = int(lmp.extract_global("vflag_global")) == int(ntimestep)
        energy, forces, w, sigma = self._function(want_virial)(self.params, *arrays)
        f[:] = np.asarray(forces, np.float64)[:nlocal]
        w = np.asarray(w, np.float64)
        if self.uncertain:
            s = np.asarray(sigma, np.float64)[:nlocal]
            store = lmp.numpy.extract_atom(self.sigma_property, nelem=nlocal)
            store[:nlocal] = s
            self._local_sigma = float(s.max())
        self.calls += 1
        self.atoms_in_graph += n
        self.local_atoms += nlocal
        return moved, float(energy), np.array([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])

    def _callback(self, caller: Any, ntimestep: int, nlocal: int, tag: Any, x: Any, f: np.ndarray) -> None:
        failed, moved, energy, virial = 0.0, 0.0, 0.0, np.zeros(6)
        self._local_sigma = 0.0
        if self.error is None:
            try:
                moved, energy, virial = self._compute(int(ntimestep), int(nlocal), f)
            except Exception as err:  # a ctypes callback cannot raise into LAMMPS: record, stop the run
                self.error = err
                failed = 1.0
                f[:] = 0.0
        else:
            failed = 1.0
            f[:] = 0.0
        # fix external takes the *total* energy and virial on every rank: sum them; the failure flag, the
        # largest displacement and the largest σ_F are maxima
        sums = np.concatenate([[energy], virial])
        total = np.empty_like(sums)
        self.comm.Allreduce(sums, total, op=self.MPI.SUM)
        local = np.array([failed, moved, self._local_sigma])
        maxima = np.empty_like(local)
        self.comm.Allreduce(local, maxima, op=self.MPI.MAX)
        failed_any, moved_max, self.max_sigma = maxima
        self.lmp.fix_external_set_energy_global(self.fix_id, float(total[0]))
        self.lmp.fix_external_set_virial_global(self.fix_id, [float(v) for v in total[1:]])
        self.lmp.fix_external_set_vector(self.fix_id, 1, float(self.max_sigma))
        if not failed_any and self.ghost_cutoff + 2.0 * moved_max > self.comm_cutoff * (1 + 1e-12):
            self.error = LammpsInputError(
                f"atoms moved {moved_max:.3g} Å since the last neighbour-list rebuild, more than half the skin "
                f"({self.skin:g} Å) equiforce's ghost shell allows (comm cutoff {self.comm_cutoff:g} Å = "
                f"{'r_max' if self.single_rank else f'2·{self.layers}·r_max'} + skin): forces would not be exact; "
                "use `neigh_modify every 1 delay 0 "
                "check yes` and a `neighbor` skin <= the skin given to equiforce"
            )
            failed_any = 1.0
        if failed_any:
            if self.error is None:
                self.error = RuntimeError("the equiforce potential failed on another MPI rank (see its message)")
            if not getattr(self, "_reported", False):
                print(f"equiforce (rank {self.comm.Get_rank()}): {self.error}", file=sys.stderr, flush=True)
                self._reported = True
            self.lmp.force_timeout()

    def raise_if_failed(self) -> None:
        """Re-raise the error that stopped the run (LAMMPS cannot take a Python exception from a callback)."""
        if self.error is not None:
            raise self.error

    @property
    def ghost_fraction(self) -> float:
        """Ghost atoms in the rank's graphs as a fraction of all atoms there, over the calls so far."""
        return 1.0 - self.local_atoms / self.atoms_in_graph if self.atoms_in_graph else float("nan")


def attach(
    lmp: Any,
    model: str | os.PathLike | tuple[Potential, Any],
    elements: list[str] | tuple[str, ...],
    *,
    fix_id: str = "equiforce",
    skin: float = 2.0,
    uncertainty: bool | None = None,
) -> EquiforceFix:
    """Make an equiforce model the interatomic potential of a LAMMPS instance (every rank calls this).

    Adds ``comm_modify cutoff 2·L·r_max + skin``, ``fix <fix_id> all external pf/callback 1 1`` with
    ``fix_modify <fix_id> energy yes virial yes`` (the energy is in ``pe``, the virial in the pressure) and, for
    a model with an uncertainty, ``fix <fix_id>_sigma all property/atom d_<fix_id>_sigma``. The method and its
    exactness are described in :mod:`equiforce.lammps.attach`. Call it after the box exists and before ``run``.
    Any pair style still adds its own forces (use ``pair_style zero`` for none).

    Args:
      lmp: a ``lammps.lammps`` instance (units ``metal``: eV, Å, ps, bar).
      model: a model file path, or ``(potential, params)``.
      elements: one chemical symbol per LAMMPS atom type, in type order (like ``pair_coeff * * C H O``).
      fix_id: the fix's ID; the max σ_F is ``f_<fix_id>[1]``, per-atom σ_F ``d_<fix_id>_sigma`` (eV/Å).
      skin: the neighbour skin (Å) the input uses at most (LAMMPS' metal default is 2.0); a larger one stops the
        run with :class:`LammpsInputError` when atoms move further than the shell allows.
      uncertainty: compute σ_F (None: when the model has an uncertainty).

    Returns:
      The :class:`EquiforceFix`; after a run, call its :meth:`~EquiforceFix.raise_if_failed` (an error in the
      callback stops the run early through LAMMPS' timeout instead of raising inside LAMMPS).

    Raises:
      LammpsSetupError: lammps, mpich or mpi4py missing, or an mpirun of another MPI.
      LammpsInputError: units other than metal, no box, an element count that differs from the atom types.
      UnknownSpeciesError: an element the model does not know.
      ModelFileError: a model file that does not load.
    """
    if isinstance(model, tuple):
        potential, params = model
    else:
        from equiforce.potentials.model_io import enable_x64_for, load_model

        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        enable_x64_for(path)
        potential, params, _ = load_model(path)
    return EquiforceFix(lmp, potential, params, elements, fix_id=fix_id, skin=skin, uncertainty=uncertainty)
