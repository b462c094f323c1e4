"""The replica engine: K structures stepped together in one jit-compiled program, sharded over the devices.

:class:`ReplicaEngine` is the engine of :func:`equiforce.md.replicas.run_replicas` (which adds the outputs,
restart and the result); :mod:`equiforce.md.replica_inputs` checks its inputs.

Layout: replicas padded to one static atom budget, one disjoint graph per device for the network
------------------------------------------------------------------------------------------------
Every replica is padded to ``N = max n_k`` atoms and the replica axis to a multiple of the device count, so
the state is a batch ``[K, N, ...]`` of single-run states and the chunk compiles once. The replica axis is
sharded over a ``jax.sharding.Mesh`` of the devices and the chunk runs under ``jax.shard_map``: each device
steps its own replicas, with no communication. On a device,

* each replica keeps its own jax-md neighbour list (``vmap``-ed; a rebuild costs ``N²`` pair checks per
  replica, not ``(K·N)²``), its own rebuild decision and its own overflow flag, so an overflow is attributed
  to the replica that had it; the lists are updated only when some replica moved half the skin;
* periodic replicas each have their own fixed cell: the space is jax-md's ``periodic_general`` in real
  coordinates (as :func:`~equiforce.md.system.make_system` builds it for one system), built inside the
  ``vmap`` from the replica's box (a per-replica ``[3, 3]`` array), for the neighbour list, the edge
  vectors, the position updates and the pressure;
* the integrator is jax-md's pieces ``vmap``-ed over the replicas, each with its own kT, friction, key and
  (Nosé–Hoover) chain;
* the network sees the device's replicas as one disjoint graph (indices offset by ``k·N``) in one call,
  with flat segment sums: a ``vmap`` of the network batches every scatter and ran 1.7x slower on CPU.

Why not one disjoint graph for everything, neighbour lists included: its all-pairs rebuild grows as
``(K·N)²``, an overflow could not be pinned on a replica, and free-space molecules would need offsets in
space. Why not ``vmap`` everything: the scatter cost above. Each replica's arithmetic stays that of a single
:func:`~equiforce.md.run.run_md` run: the same pairs in the same order and the same random numbers (with
JAX's default partitionable threefry the first ``3n`` normals of a ``[N, 3]`` draw are those of a ``[n, 3]``
draw), so its trajectory equals the single run's to rounding; stopping a replica is a ``jnp.where`` on its
slice. The cost is the padding: a replica of ``n_k < N`` atoms still pays for ``N`` atoms and the common
neighbour-list capacity, so give replicas of very different sizes to separate calls.

Padding atoms get species 0, mass 1 amu and zero momentum; they are masked out of every neighbour list
(jax-md's ``custom_mask_function``), of the edges and of the node energies (zero force), so they never
create a pair, even in a periodic cell where no place is far from the real atoms. They sit on a line
10⁴ Å outside free-space replicas and at the origin of periodic ones, and never move.

Per chunk (``report_interval`` steps inside jit; nothing leaves the device until the chunk ends):

* every step, every live replica is checked (finite energy, kinetic energy and positions; temperature at
  most ``max_temperature_K``). The first failing step stops that replica: its state goes back to the start
  of the chunk (its last written frame), it takes no further steps, and the engine says at which step and
  why. The other replicas go on unchanged.
* each replica's neighbour-list overflow flag is read; if any replica overflowed, all lists get one larger
  common capacity (a static shape) and the chunk is re-run for all replicas from their saved start states,
  so no replica loses a step and the re-run is exact.
* only the live replicas at the lowest step move (:attr:`ReplicaEngine.steps`); in a run they all share one
  step, and after a restart whose replicas were stored at different steps the ones behind catch up first.

Units are those of :mod:`equiforce.md.engine`: Å, eV, amu, fs / ps, K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax_md import partition, quantity, simulate, space

from equiforce.md.all_pairs import all_pairs_neighbor_list
from equiforce.md.constraints import ConstraintError, fixed_mask
from equiforce.md.engine import ThermoFrame
from equiforce.md.ensembles import CHAIN, Thermostat, chain_op, get_ensemble, kinetic_energy, pin, thermal_momenta
from equiforce.md.replica_inputs import check_replicas, per_replica, resolve_replica_devices
from equiforce.md.system import _check_precision, with_precision
from equiforce.potentials.potential import Potential

__all__ = ["ReplicaEngine"]

_AXIS = "replicas"
_PAD_DISTANCE = 1.0e4  # Å between free-space replicas' atoms and the first padding atom
#: degrees_of_freedom of the chains in the batched state: jax-md keeps it a static (Python int) field, which
#: cannot differ between replicas; each replica's own enters through the branches of ensembles.chain_op
_CHAIN_DOF_PLACEHOLDER = 0


class _Consts(NamedTuple):
    """Per-replica constants (leading axis: replica)."""

    species: jnp.ndarray  # [N] int32 species index, 0 for padding
    atom_mask: jnp.ndarray  # [N] bool, False for padding
    free: jnp.ndarray  # [N] bool, False for padding and fixed atoms (they never move)
    n_atoms: jnp.ndarray  # () real atoms
    dof: jnp.ndarray  # () kinetic degrees of freedom
    dof_index: jnp.ndarray  # () int32, position of dof in ReplicaEngine.dof_values (Nosé–Hoover chains)
    kT: jnp.ndarray  # () eV
    gamma: jnp.ndarray  # () Langevin friction, 1/(ASE time)
    tau: jnp.ndarray  # () Nosé–Hoover chain time constant, ASE time
    max_ekin: jnp.ndarray  # () eV, kinetic energy at max_temperature_K
    box: jnp.ndarray  # [3, 3] jax-md box (lattice vectors as columns), Å; the identity for free space


_ATOM_FIELDS = ("position", "momentum", "force", "mass")


class ReplicaEngine:
    """Runs K replicas with one potential in jitted, sharded chunks (see the module docstring).

    Typical use::

        engine = ReplicaEngine(potential, params, [atoms_a, atoms_b], ensemble="nvt_langevin", seed=[1, 2])
        state = engine.init()                        # batched jax-md state, leading axis = replica
        state, frames, stopped = engine.run_chunk(state)

    Args:
      potential, params: the model.
      structures: K ``ase.Atoms``, all non-periodic or all fully periodic (each its own fixed cell, every
        cell height more than ``2 r_max``); sizes may differ. Periodic positions are wrapped into the cell.
      ensemble: ``nve``, ``nvt_langevin`` or ``nvt_nose_hoover``.
      timestep_fs: shared time step, fs.
      temperature_K: initial temperature and thermostat target, K; one value or one per replica.
      friction_per_ps: Langevin friction, 1/ps; one value or one per replica.
      thermostat_tau_fs: Nosé–Hoover chain time constant, fs (None: 100 time steps); one value or one per
        replica.
      seed: initial velocities and Langevin noise; an int ``s`` gives replica ``k`` the seed ``s + k``, or
        one int per replica. Replica ``k`` with seed ``s_k`` draws what ``run_md(..., seed=s_k)`` draws.
      report_interval: steps per chunk.
      skin: neighbour-list skin, Å.
      capacity_multiplier: neighbour-list head-room over the largest replica's pair count.
      max_temperature_K: a replica above this temperature is stopped, K.
      precision: ``float32``, ``float64`` or ``mixed`` (see :func:`~equiforce.md.system.make_system`);
        default the potential's dtype.
      devices: see :func:`~equiforce.md.replica_inputs.resolve_replica_devices`.
      fixed: atoms held fixed (zero force and velocity), united with each structure's ``FixAtoms``
        (:func:`~equiforce.md.constraints.fixed_mask`): None, or one entry per replica (None, indices or an
        ``[n_k]`` bool mask).
      log: receives messages (reallocations).

    Raises:
      UnknownSpeciesError / DataError / ValueError: see :func:`~equiforce.md.replica_inputs.check_replicas`;
        also an unsupported ensemble (NPT), per-replica settings of the wrong length, bad devices.
      RuntimeError: ``float64``/``mixed`` precision with JAX's 64-bit types off.

    Attributes:
      steps: ``[K]`` steps each replica completed (host). step: the lowest step of the live replicas.
      alive: ``[K]`` bool, host. heat: ``[K]`` eV the Langevin bath put in since step 0. reallocations:
      neighbour-list reallocations. capacity: the common neighbour-list capacity (pairs per replica).
      stop_reasons: ``[K]`` None or why the replica stopped. periodic: whether the replicas are periodic.
      cells: ``[K]`` ASE cells (rows, Å) of periodic replicas, None otherwise.
    """

    def __init__(
        self,
        potential: Potential,
        params: Any,
        structures: Sequence[Any],
        *,
        ensemble: str = "nvt_langevin",
        timestep_fs: float = 0.5,
        temperature_K: float | Sequence[float] = 300.0,
        friction_per_ps: float | Sequence[float] = 1.0,
        thermostat_tau_fs: float | Sequence[float] | None = None,
        seed: int | Sequence[int] = 0,
        report_interval: int = 100,
        skin: float = 1.0,
        capacity_multiplier: float = 1.25,
        max_temperature_K: float = 1.0e5,
        precision: str | None = None,
        devices: int | Sequence[Any] | None = None,
        fixed: Any = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.ens = get_ensemble(ensemble, fixed_box=True)
        if not timestep_fs > 0 or report_interval < 1 or skin < 0:
            raise ValueError("timestep_fs > 0, report_interval >= 1 and skin >= 0 required")
        structures = list(structures)
        self.periodic = check_replicas(structures, potential)
        self.structures = structures
        self.log = log or (lambda _: None)
        self.ensemble = ensemble
        self.report_interval = int(report_interval)
        self.timestep_fs = float(timestep_fs)
        self.dt = timestep_fs * units.fs
        self.skin = float(skin)
        self.capacity_multiplier = float(capacity_multiplier)
        self.max_temperature_K = float(max_temperature_K)
        k = len(structures)
        self.n_replicas = k
        self.temperatures_K = per_replica(temperature_K, k, "temperature_K", float)
        self.frictions_per_ps = per_replica(friction_per_ps, k, "friction_per_ps", float)
        taus = per_replica(thermostat_tau_fs, k, "thermostat_tau_fs", lambda t: t)
        self.thermostat_taus_fs = [float(t) if t is not None else 100.0 * self.timestep_fs for t in taus]
        if isinstance(seed, (int, np.integer)):
            self.seeds = [int(seed) + i for i in range(k)]
        else:
            self.seeds = per_replica(seed, k, "seed", int)
        if any(t < 0 for t in self.temperatures_K) or any(f < 0 for f in self.frictions_per_ps):
            raise ValueError("temperature_K and friction_per_ps must be >= 0")
        if any(not t > 0 for t in self.thermostat_taus_fs):
            raise ValueError(f"thermostat_tau_fs must be > 0, got {self.thermostat_taus_fs}")

        precision = precision or potential.dtype
        _check_precision(precision)
        self.precision = precision
        potential, params = with_precision(potential, params, "float64" if precision == "float64" else "float32")
        self.potential, self.params = potential, params
        self.net_dtype = potential.jnp_dtype
        self.dtype = jnp.float32 if precision == "float32" else jnp.float64
        self.r_max = float(potential.r_max)

        self.n_atoms = [len(a) for a in structures]
        self.N = n = max(self.n_atoms)
        self.devices = resolve_replica_devices(devices, k)
        self.n_devices = len(self.devices)
        self.K = -(-k // self.n_devices) * self.n_devices  # padded to whole devices
        self.mesh = Mesh(np.array(self.devices), (_AXIS,))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(_AXIS))
        self.cells = [np.asarray(a.get_cell()[:], np.float64) for a in structures] if self.periodic else None

        if fixed is None:
            fixed = [None] * k
        elif len(fixed) != k:
            raise ValueError(f"fixed has {len(fixed)} entries for {k} replicas (one index list or mask per replica)")
        self.fixed = []
        for i, (atoms, f) in enumerate(zip(structures, fixed, strict=True)):
            try:
                self.fixed.append(fixed_mask(atoms, f))
            except ConstraintError as err:
                raise ConstraintError(f"replica {i}: {err}") from err
            if self.fixed[-1].all():
                raise ConstraintError(f"replica {i}: all {len(atoms)} atoms are fixed: nothing would move")
        self.dofs = [
            self.ens.degrees_of_freedom(m, int(f.sum())) for m, f in zip(self.n_atoms, self.fixed, strict=True)
        ]
        species = np.zeros((self.K, n), np.int32)
        free = np.zeros((self.K, n), bool)
        mask = np.zeros((self.K, n), bool)
        masses = np.ones((self.K, n), np.float64)
        boxes = np.tile(np.eye(3), (self.K, 1, 1))
        self.e0 = []
        atomic_energies = np.asarray(potential.atomic_energies, np.float64)
        src = [i if i < k else 0 for i in range(self.K)]  # the padding replicas copy replica 0 and never run
        for i, j in enumerate(src):
            atoms = structures[j]
            z = potential.species_index(atoms.get_atomic_numbers())
            species[i, : len(atoms)] = z
            mask[i, : len(atoms)] = True
            free[i, : len(atoms)] = ~self.fixed[j]
            masses[i, : len(atoms)] = atoms.get_masses()
            if self.periodic:
                boxes[i] = self.cells[j].T  # jax-md: lattice vectors as columns
            if i < k:
                self.e0.append(float(np.sum(atomic_energies[np.asarray(z)])))
        dof = np.array([self.dofs[i] for i in src], np.float64)
        self.dof_values = sorted(set(self.dofs))
        self.dof_tuple = tuple(self.dof_values)
        consts = _Consts(
            species=species,
            atom_mask=mask,
            free=free,
            n_atoms=np.array([self.n_atoms[i] for i in src], np.float64),
            dof=dof,
            dof_index=np.array([self.dof_values.index(self.dofs[i]) for i in src], np.int32),
            kT=np.array([self.temperatures_K[i] * units.kB for i in src]),
            gamma=np.array([self.frictions_per_ps[i] / (1000.0 * units.fs) for i in src]),
            tau=np.array([self.thermostat_taus_fs[i] * units.fs for i in src]),
            max_ekin=0.5 * dof * units.kB * self.max_temperature_K,
            box=boxes,
        )
        as_dtype = {"species": jnp.int32, "atom_mask": bool, "free": bool, "dof_index": jnp.int32}
        self.consts = self._put(
            _Consts(
                *(jnp.asarray(v, as_dtype.get(f, self.dtype)) for f, v in zip(_Consts._fields, consts, strict=True))
            )
        )
        self.masses = self._put(jnp.asarray(masses, self.dtype))
        self._template = None
        self.neighbor = None
        self.capacity = 0
        self.steps = np.zeros(k, np.int64)
        self.heat = np.zeros(k)
        self.alive = np.zeros(k, bool)
        self.stop_reasons: list[str | None] = [None] * k
        self.reallocations = 0
        self._chunk = jax.jit(self._chunk_impl, static_argnums=(3,))
        self._observe = jax.jit(jax.vmap(self._observe_one))
        self._init = jax.jit(jax.vmap(self._init_one))
        self._counts = jax.jit(jax.vmap(self._pair_count))
        self._build = jax.jit(self._build_impl, static_argnums=(2,))

    @property
    def step(self) -> int:
        """The lowest step of the live replicas (of all replicas when none is live)."""
        steps = self.steps[self.alive] if self.alive.any() else self.steps
        return int(steps.min())

    # ------------------------------------------------------------------ pieces of one replica (traced)
    def _put(self, tree: Any) -> Any:
        return jax.device_put(tree, self.sharding)

    def _space(self, box: jnp.ndarray) -> tuple[Callable, Callable]:
        """jax-md's ``(displacement_fn, shift_fn)`` of one replica: ``periodic_general`` in real coordinates
        for its ``box`` (as :func:`~equiforce.md.system.make_system`), or free space."""
        if self.periodic:
            return space.periodic_general(box, fractional_coordinates=False)
        return space.free()

    def _neighbor_fns(self, box: jnp.ndarray, atom_mask: jnp.ndarray, *, forced: bool = False) -> Any:
        """jax-md neighbour-list functions of one replica (pairs within ``r_max + skin``, each once) whose
        candidates exclude the padding atoms (``custom_mask_function``). ``forced``: the same list rebuilt on
        every update (``dr_threshold = 0`` with the cutoff ``r_max + skin``), to fill a list of a new
        capacity."""
        displacement, _ = self._space(box)
        n = self.N

        def without_padding(idx: jnp.ndarray) -> jnp.ndarray:  # [N, candidates] neighbour indices
            real = (idx < n) & atom_mask[:, None] & atom_mask[jnp.minimum(idx, n - 1)]
            return jnp.where(real, idx, n)

        return all_pairs_neighbor_list(  # no cell list: the box lives in the displacement
            displacement,
            self.r_max + self.skin if forced else self.r_max,
            dr_threshold=0.0 if forced else self.skin,
            capacity_multiplier=self.capacity_multiplier,
            format=partition.NeighborListFormat.OrderedSparse,
            custom_mask_function=without_padding,
        )

    def _energies(self, positions: jnp.ndarray, idx: jnp.ndarray, c: _Consts, perturbation: Any = None) -> jnp.ndarray:
        """``[k]`` energies without E0 (eV) of ``k`` padded replicas (``positions [k, N, 3]``, neighbour indices
        ``[k, 2, C]``, constants with leading axis ``k``), evaluated as one disjoint graph of ``k·N`` atoms:
        edge vectors per replica in its own space, then one network call with flat segment sums (a ``vmap``
        of the network would batch every scatter, about 1.7x slower on CPU). Padding atoms and their pairs
        are masked out. ``perturbation``: jax-md's strain factor of the displacements (for the pressure)."""
        k, n = positions.shape[0], self.N
        receivers, senders = idx[:, 0], idx[:, 1]
        valid = receivers < n
        receivers = jnp.where(valid, receivers, 0)
        senders = jnp.where(valid, senders, 0)
        mask = c.atom_mask
        valid = valid & jnp.take_along_axis(mask, receivers, 1) & jnp.take_along_axis(mask, senders, 1)
        space_kwargs = {} if perturbation is None else {"perturbation": perturbation}

        def vectors_of(position, s, r, ok, box):
            displacement = partial(self._space(box)[0], **space_kwargs)
            return jnp.where(ok[:, None], jax.vmap(displacement)(position[s], position[r]), 0.0)

        vectors = jax.vmap(vectors_of)(positions, senders, receivers, valid, c.box).reshape(-1, 3)
        offset = (jnp.arange(k, dtype=jnp.int32) * n)[:, None]
        receivers, senders, valid = (receivers + offset).ravel(), (senders + offset).ravel(), valid.ravel()
        e = self.potential.node_energies_from_edges(
            self.params,
            vectors.astype(self.net_dtype),
            c.species.reshape(k * n),
            senders,
            receivers,
            valid,
            mask.reshape(k * n),
            include_e0=False,
            half_list=True,
        )
        return jnp.sum(e.astype(positions.dtype).reshape(k, n), axis=1)

    def _energy(self, position: jnp.ndarray, neighbor: Any, c: _Consts, perturbation: Any = None) -> jnp.ndarray:
        """Energy of one padded replica without E0, eV."""
        one = jax.tree.map(lambda x: x[None], c)
        return self._energies(position[None], neighbor.idx[None], one, perturbation)[0]

    def _init_one(self, key, position, mass, velocity, has_velocity, neighbor, c: _Consts):
        value_and_grad = jax.value_and_grad(self._energy)

        def force_fn(r: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
            return -value_and_grad(r, kwargs["neighbor"], c)[1]

        shift_fn = self._space(c.box)[1]
        ens = self.ens
        # NVE's state for Nosé–Hoover too: its chain is added below
        init_fn, _ = (ens if ens.stochastic else get_ensemble("nve")).simulator(
            force_fn, shift_fn, self.dt, c.kT, gamma=c.gamma, tau=None
        )
        state = init_fn(key, position, kT=c.kT, mass=mass, neighbor=neighbor)
        # as MDEngine.init: zero total momentum (over the free atoms), exactly the target temperature
        p = thermal_momenta(state.momentum, mass, c.kT, c.dof, c.free)
        p = jnp.where(has_velocity, pin(c.free, velocity * mass[:, None]), p).astype(self.dtype)
        state = dataclasses.replace(state, momentum=p, force=pin(c.free, state.force))
        if ens.chain_field is None:
            return state
        # jax-md's chain (nvt_nose_hoover's init: float32 tau) with the masses of the reported degrees of
        # freedom (MDEngine.init); the first step's update_mass sets them again, as in a single run
        chain_fns = simulate.nose_hoover_chain(self.dt, *CHAIN, c.tau.astype(jnp.float32))
        ke = kinetic_energy(p, mass)
        chain = chain_fns.initialize(position.size, ke, c.kT.astype(jnp.float32))
        chain = dataclasses.replace(chain, degrees_of_freedom=_CHAIN_DOF_PLACEHOLDER)
        kT32 = c.kT.astype(jnp.float32)
        chain = chain_op(lambda ch: (chain_fns.update_mass(ch, kT32),), chain, c.dof_index, self.dof_tuple)[0]
        return simulate.NVTNoseHooverState(state.position, state.momentum, state.force, state.mass, chain)

    def _end_observables(self, state: Any, neighbor: Any, c: _Consts) -> tuple[jnp.ndarray, ...]:
        """``(E_kin, pressure, volume, extended energy)`` of one replica (eV, eV/Å³, Å³, eV; pressure and volume
        zero without a cell, the extended energy (:meth:`~equiforce.md.ensembles.Ensemble.extended_energy`)
        zero without a chain)."""
        ekin = kinetic_energy(state.momentum, state.mass)
        zero = jnp.zeros((), ekin.dtype)
        pressure = volume = zero
        if self.periodic:

            def energy_at(r: jnp.ndarray, perturbation: Any = None, **_: Any) -> jnp.ndarray:
                return self._energy(r, neighbor, c, perturbation)

            pressure = quantity.pressure(energy_at, state.position, c.box, ekin)
            volume = jnp.abs(jnp.linalg.det(c.box))
        extended = self.ens.extended_energy(state, c.kT, dof=c.dof).astype(ekin.dtype)
        return ekin, pressure, volume, extended

    def _observe_one(self, state: Any, neighbor: Any, c: _Consts) -> tuple[jnp.ndarray, ...]:
        return (self._energy(state.position, neighbor, c), *self._end_observables(state, neighbor, c))

    def _pair_count(self, position: jnp.ndarray, c: _Consts) -> jnp.ndarray:
        """Pairs of real atoms (each once) within ``r_max + skin`` (minimum image in a cell): what the
        neighbour list must hold."""
        displacement = self._space(c.box)[0]
        dr = jax.vmap(jax.vmap(displacement, (None, 0)), (0, None))(position, position)
        d2 = jnp.sum(dr**2, axis=-1)
        upper = jnp.triu(jnp.ones((self.N, self.N), bool), k=1)
        within = (d2 < (self.r_max + self.skin) ** 2) & upper & c.atom_mask[:, None] & c.atom_mask[None, :]
        return jnp.sum(within, dtype=jnp.int32)

    def _build_impl(self, positions: jnp.ndarray, c: _Consts, capacity: int) -> Any:
        """Neighbour lists of ``capacity`` pairs for all replicas (a forced rebuild of a template)."""
        template = dataclasses.replace(
            self._template,
            idx=jnp.full((2, capacity), self.N, jnp.int32),
            error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
            max_occupancy=capacity,
        )

        def build(r: jnp.ndarray, box: jnp.ndarray, mask: jnp.ndarray) -> Any:
            return self._neighbor_fns(box, mask, forced=True).update(r, template)

        return jax.vmap(build)(positions, c.box, c.atom_mask)

    def _forces(self) -> Callable[..., tuple[jnp.ndarray, jnp.ndarray]]:
        """``(position [N, 3], idx [2, C], c) -> (E_pot without E0, forces [N, 3])`` of one padded replica,
        evaluated, when ``vmap``-ed over the replicas, as one disjoint graph of all of them (:meth:`_energies`,
        one network call; a ``custom_vmap`` rule) instead of a ``vmap`` of the network."""

        def total(positions: jnp.ndarray, idx: jnp.ndarray, c: _Consts) -> tuple[jnp.ndarray, jnp.ndarray]:
            energies = self._energies(positions, idx, c)
            return jnp.sum(energies), energies

        def batched(positions: jnp.ndarray, idx: jnp.ndarray, c: _Consts) -> tuple[jnp.ndarray, jnp.ndarray]:
            (_, energies), grad = jax.value_and_grad(total, has_aux=True)(positions, idx, c)
            return energies, -grad

        @jax.custom_batching.custom_vmap
        def forces(position: jnp.ndarray, idx: jnp.ndarray, c: _Consts) -> tuple[jnp.ndarray, jnp.ndarray]:
            energies, force = batched(position[None], idx[None], jax.tree.map(lambda x: x[None], c))
            return energies[0], force[0]

        @forces.def_vmap
        def rule(axis_size: int, in_batched: Any, position: jnp.ndarray, idx: jnp.ndarray, c: _Consts):
            def spread(x: Any, is_batched: bool) -> Any:
                return x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

            args = jax.tree.map(spread, (position, idx, c), tuple(in_batched))
            return batched(*args), (True, True)

        return forces

    def _batched_step(self, state: Any, neighbor: Any, c: _Consts) -> tuple[Any, Any]:
        """One step of all local replicas: the ensemble's step (:mod:`equiforce.md.ensembles`) ``vmap``-ed over
        the replicas, each with its own space, thermostat and random key or chain, padding and fixed atoms held
        still, with one force call for all replicas (:meth:`_forces`). Returns ``(state, StepAux)`` (leading
        axis: replica)."""
        forces = self._forces()

        def one(state: Any, idx: jnp.ndarray, c: _Consts) -> Any:
            def value_and_force(position: jnp.ndarray, **_: Any) -> tuple[jnp.ndarray, jnp.ndarray, tuple]:
                return (*forces(position, idx, c), ())

            step = self.ens.make_step(value_and_force, self._space(c.box)[1], self.dt, self.dof_tuple)
            thermostat = Thermostat(kT=c.kT, gamma=c.gamma, chain_kT=c.kT.astype(jnp.float32), dof_index=c.dof_index)
            return step(state, thermostat, c.free)

        return jax.vmap(one)(state, neighbor.idx, c)

    def _update_neighbors(self, positions: jnp.ndarray, neighbor: Any, c: _Consts) -> Any:
        """jax-md's update of every replica's list, skipped (a real ``cond``) when no atom of any replica moved
        more than half the skin (in plain coordinates: a wrap across the cell counts as a move, and jax-md's
        update then measures the minimum image) since its list was built; each replica rebuilds exactly when
        a single run would."""
        moved = jnp.sum((positions - neighbor.reference_position) ** 2, axis=-1) > (self.skin / 2) ** 2

        def update(nb: Any) -> Any:
            def one(p: jnp.ndarray, x: Any, box: jnp.ndarray, mask: jnp.ndarray) -> Any:
                return self._neighbor_fns(box, mask).update(p, x)

            return jax.vmap(one)(positions, nb, c.box, c.atom_mask)

        return jax.lax.cond(jnp.any(moved), update, lambda nb: nb, neighbor)

    def _chunk_local(self, state: Any, neighbor: Any, alive: jnp.ndarray, c: _Consts, n_steps: int):
        """``n_steps`` steps of the replicas of one device (leading axis: local replica); ``alive``: those
        that move."""
        zero = jnp.zeros(alive.shape, self.dtype)

        def where(flag: jnp.ndarray, a: Any, b: Any) -> Any:
            return jax.tree.map(lambda x, y: jnp.where(flag.reshape(flag.shape + (1,) * (x.ndim - 1)), x, y), a, b)

        def body(i, carry):
            state, neighbor, alive, epot, heat, bad = carry
            new, aux = self._batched_step(state, neighbor, c)
            energies, step_heat = aux.potential_energy, aux.heat
            ekin = jax.vmap(kinetic_energy)(new.momentum, new.mass)
            ok = (
                jnp.isfinite(energies)
                & jnp.isfinite(ekin)
                & jnp.all(jnp.isfinite(new.position), axis=(1, 2))
                & (ekin <= c.max_ekin)
            )
            keep = alive & ok
            first_bad = alive & ~ok
            state = where(keep, new, state)
            bad = (
                jnp.where(first_bad, i, bad[0]),
                jnp.where(first_bad, energies, bad[1]),
                jnp.where(first_bad, ekin, bad[2]),
            )
            epot = jnp.where(keep, energies, epot)
            heat = heat + jnp.where(keep, step_heat, 0.0)
            neighbor = self._update_neighbors(state.position, neighbor, c)
            return state, neighbor, keep, epot, heat, bad

        start_state, start_neighbor, start_alive = state, neighbor, alive
        bad = (jnp.full(alive.shape, -1, jnp.int32), zero, zero)
        carry = (state, neighbor, alive, zero, zero, bad)
        state, neighbor, alive, epot, heat, bad = jax.lax.fori_loop(0, n_steps, body, carry)
        overflow = (neighbor.did_buffer_overflow != 0) & start_alive  # a stopped replica's too: it may be why
        died = start_alive & ~alive  # back to the chunk start, its last written frame
        state = where(died, start_state, state)
        neighbor = where(died, start_neighbor, neighbor)
        end = jax.vmap(self._end_observables)(state, neighbor, c)
        return state, neighbor, alive, epot, end, heat, bad, overflow

    def _chunk_impl(self, state: Any, neighbor: Any, alive: jnp.ndarray, n_steps: int):
        """The chunk of all replicas: each device runs its own replicas (``shard_map``; no communication)."""
        spec = PartitionSpec(_AXIS)
        local = jax.shard_map(
            partial(self._chunk_local, n_steps=n_steps), mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False
        )
        return local(state, neighbor, alive, self.consts)

    # ------------------------------------------------------------------ host side
    def _padded_positions(self) -> np.ndarray:
        """``[K, N, 3]`` starting positions: periodic ones wrapped into their cells as
        :meth:`~equiforce.md.engine.MDEngine.init` wraps them, padding atoms at the origin of a cell or on a
        line far outside free-space replicas."""
        pos = np.zeros((self.K, self.N, 3))
        if not self.periodic:
            spacing = 2.0 * (self.r_max + self.skin) + 1.0
            far = max(float(np.max(np.abs(a.get_positions()))) for a in self.structures) + _PAD_DISTANCE
            pos[:, :, 0] = far + spacing * np.arange(self.N)
        for i in range(self.K):
            j = i if i < self.n_replicas else 0
            r = self.structures[j].get_positions()
            if self.periodic:
                box = jnp.asarray(self.cells[j].T, self.dtype)
                u = jnp.mod(jnp.linalg.solve(box, jnp.asarray(r, self.dtype).T).T, 1.0)  # x = box @ u
                r = np.asarray(u @ box.T)
            pos[i, : len(r)] = r
        return pos

    def _capacity_for(self, positions: jnp.ndarray, old: int = 0) -> int:
        """Pair slots per replica for ``positions``: the live replicas' largest pair count times
        ``capacity_multiplier``; after an overflow of capacity ``old`` also ``0.5 old`` more and at least
        ``1.5 old`` (geometric growth, as :class:`~equiforce.md.engine.MDEngine`); at most every pair."""
        counts = np.asarray(self._counts(positions, self.consts))[: self.n_replicas]
        live = self.alive if self.alive.any() else np.ones(self.n_replicas, bool)
        capacity = int(int(counts[live].max(initial=0)) * self.capacity_multiplier)
        if old:
            capacity = max(capacity + int(np.ceil(0.5 * old / self.N)) * self.N, int(np.ceil(1.5 * old)))
        return min(max(capacity, 1), max(1, self.N * (self.N - 1) // 2))

    def build_neighbors(self, positions: jnp.ndarray, capacity: int) -> Any:
        """Neighbour lists of all replicas with ``capacity`` pair slots each (batched, sharded)."""
        if self._template is None:
            c0 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[0]), self.consts)
            fns = self._neighbor_fns(c0.box, c0.atom_mask)
            self._template = fns.allocate(jnp.asarray(np.asarray(positions)[0], self.dtype))
        return self._build(positions, self.consts, int(capacity))

    def init(self, velocities: Sequence[np.ndarray | None] | None = None) -> Any:
        """Initial batched state (leading axis: replica, padded): Maxwell–Boltzmann velocities per replica
        (its seed; zero total momentum, exactly its temperature) unless ``velocities[k]`` (``[n_k, 3]``, Å per
        ASE time unit) is given. Resets :attr:`steps`, :attr:`heat` and :attr:`alive`."""
        k, n = self.n_replicas, self.N
        velocities = list(velocities) if velocities is not None else [None] * k
        if len(velocities) != k:
            raise ValueError(f"velocities has {len(velocities)} entries for {k} replicas")
        vel = np.zeros((self.K, n, 3))
        has = np.zeros(self.K, bool)
        for i, v in enumerate(velocities):
            if v is not None:
                vel[i, : self.n_atoms[i]] = np.asarray(v, np.float64).reshape(self.n_atoms[i], 3)
                has[i] = True
        self.steps = np.zeros(k, np.int64)
        self.heat = np.zeros(k)
        self.alive = np.ones(k, bool)
        self.stop_reasons = [None] * k
        positions = self._put(jnp.asarray(self._padded_positions(), self.dtype))
        self.capacity = self._capacity_for(positions)
        self.neighbor = self.build_neighbors(positions, self.capacity)
        keys = jnp.stack([jax.random.PRNGKey(self.seeds[i if i < k else 0]) for i in range(self.K)])
        return self._init(
            self._put(keys),
            positions,
            self.masses,
            self._put(jnp.asarray(vel, self.dtype)),
            self._put(jnp.asarray(has)),
            self.neighbor,
            self.consts,
        )

    def restore(self, state: Any, replicas: dict[int, tuple[Any, int, float, str | None]]) -> Any:
        """The batched ``state`` with the stored states of some replicas put back (a restart).

        Args:
          state: a batched state of this engine (e.g. from :meth:`init`).
          replicas: replica index -> ``(cut_state, step, heat_eV, stopped_because)``: its state as
            :meth:`replica_state` cuts it (NumPy or JAX leaves), the step it belongs to, the bath heat since
            step 0, and why it had stopped (None: it goes on).

        Returns:
          The new batched state (sharded); the neighbour lists are rebuilt, :attr:`steps`, :attr:`heat`,
          :attr:`alive` and :attr:`stop_reasons` set for those replicas.
        """
        host = jax.device_get(state)
        for i, (cut, step, heat, stopped) in replicas.items():
            host = self._set_replica_state(host, i, cut)
            self.steps[i], self.heat[i] = int(step), float(heat)
            self.alive[i], self.stop_reasons[i] = stopped is None, stopped
        state = self._put(jax.tree.map(lambda x: jnp.asarray(x), host))
        self.capacity = self._capacity_for(state.position)
        self.neighbor = self.build_neighbors(state.position, self.capacity)
        return state

    def _padded_alive(self, flags: np.ndarray) -> jnp.ndarray:
        return self._put(jnp.asarray(np.concatenate([flags, np.zeros(self.K - self.n_replicas, bool)])))

    def _frame(self, i: int, step: int, epot: float, end: tuple[Any, ...]) -> ThermoFrame:
        ekin, pressure, volume, extended = (float(x[i]) for x in end)
        epot = float(epot) + self.e0[i]
        conserved = self.ens.conserved(epot + ekin, self.heat[i], extended)
        nan = float("nan")
        return ThermoFrame(
            step=int(step),
            time_ps=int(step) * self.timestep_fs / 1000.0,
            potential_energy=epot,
            kinetic_energy=ekin,
            temperature=2.0 * ekin / (self.dofs[i] * units.kB),
            conserved=conserved,
            pressure=pressure if self.periodic else nan,
            volume=volume if self.periodic else nan,
        )

    def observe(self, state: Any) -> list[ThermoFrame | None]:
        """Thermo frames of the live replicas at their :attr:`steps` (None for a stopped one). A replica whose
        starting energy is not finite is stopped here."""
        epot, *end = jax.device_get(self._observe(state, self.neighbor, self.consts))
        frames: list[ThermoFrame | None] = []
        for i in range(self.n_replicas):
            if self.alive[i] and not (np.isfinite(epot[i]) and np.isfinite(end[0][i])):
                self.alive[i] = False
                self.stop_reasons[i] = f"replica {i}: non-finite energy at step {self.steps[i]}: E_pot={epot[i]:.6g} eV"
            frames.append(self._frame(i, self.steps[i], epot[i], end) if self.alive[i] else None)
        return frames

    def run_chunk(self, state: Any) -> tuple[Any, list[ThermoFrame | None], list[str | None]]:
        """Advance the live replicas at the lowest step ``report_interval`` steps (in a run: every live replica;
        after a restart from replicas stored at different steps, those behind catch up); re-run the chunk on a
        neighbour-list overflow.

        Returns:
          ``(state, frames, stopped)``: the new batched state; per replica its thermo frame at the chunk end
          (None if it did not move); per replica the reason it stopped in this chunk (None if it did not).
        """
        n = self.report_interval
        k = self.n_replicas
        if not self.alive.any():
            return state, [None] * k, [None] * k
        active = self.alive & (self.steps == self.step)
        start_neighbor = self.neighbor
        moving = self._padded_alive(active)
        while True:
            out = self._chunk(state, start_neighbor, moving, n)
            overflow = np.asarray(jax.device_get(out[7]))[:k]
            if not overflow.any():
                break
            old = self.capacity
            self.capacity = self._capacity_for(state.position, old)
            if self.capacity <= old:
                raise RuntimeError(f"neighbour list overflow at capacity {old}, the most pairs it can hold")
            start_neighbor = self.build_neighbors(state.position, self.capacity)
            self.reallocations += 1
            self.log(
                f"neighbour list overflow in replica(s) {np.flatnonzero(overflow).tolist()} at step {self.step}: "
                f"capacity {old} -> {self.capacity} pairs per replica (reallocation {self.reallocations}); "
                "re-running the chunk of all replicas from its start"
            )
        new_state, self.neighbor, alive_out, epot, end, heat, bad, _ = out
        alive_out, epot, end, heat, (bad_i, bad_epot, bad_ekin) = jax.device_get((alive_out, epot, end, heat, bad))
        frames: list[ThermoFrame | None] = []
        stopped: list[str | None] = []
        for i in range(k):
            reason = None
            frame = None
            if active[i] and not alive_out[i]:
                e = float(bad_epot[i]) + self.e0[i]
                t = 2.0 * float(bad_ekin[i]) / (self.dofs[i] * units.kB)
                reason = (
                    f"replica {i} blew up at step {self.steps[i] + int(bad_i[i]) + 1}: E_pot={e:.6g} eV, T={t:.6g} K "
                    f"(limit {self.max_temperature_K:g} K); stopped with the state of step {self.steps[i]}"
                )
                self.alive[i] = False
                self.stop_reasons[i] = reason
            elif active[i]:
                self.heat[i] += float(heat[i])
                self.steps[i] += n
                frame = self._frame(i, self.steps[i], epot[i], end)
            stopped.append(reason)
            frames.append(frame)
        return new_state, frames, stopped

    def replica_state(self, host_state: Any, i: int) -> Any:
        """Replica ``i``'s state cut to its atoms from a ``jax.device_get`` of the batched state (NumPy leaves;
        the layout of a single run's state, so :func:`~equiforce.md.outputs.state_arrays` stores it as
        :func:`~equiforce.md.run.run_md` does)."""
        n = self.n_atoms[i]
        fields = {}
        for f in dataclasses.fields(host_state):
            value = getattr(host_state, f.name)
            if value is None:
                continue
            if f.name in _ATOM_FIELDS:
                fields[f.name] = np.asarray(value)[i][:n]
            else:  # RNG key, Nosé–Hoover chain: one per replica
                fields[f.name] = jax.tree.map(lambda x: np.asarray(x)[i], value)
        return dataclasses.replace(host_state, **fields)

    def _set_replica_state(self, host_state: Any, i: int, cut: Any) -> Any:
        """``host_state`` (NumPy leaves, batched) with replica ``i``'s slice replaced by ``cut`` (the layout of
        :meth:`replica_state`)."""
        n = self.n_atoms[i]

        def put(batched: Any, value: Any, atoms: bool) -> np.ndarray:
            out = np.array(batched, copy=True)
            if atoms:
                out[i, :n] = np.asarray(value)
            else:
                out[i] = np.asarray(value)
            return out

        fields = {}
        for f in dataclasses.fields(host_state):
            value = getattr(host_state, f.name)
            if value is None:
                continue
            atoms = f.name in _ATOM_FIELDS
            fields[f.name] = jax.tree.map(lambda b, v, a=atoms: put(b, v, a), value, getattr(cut, f.name))
        return dataclasses.replace(host_state, **fields)

    def atoms(self, host_state: Any, i: int) -> Any:
        """Replica ``i`` as ``ase.Atoms`` (positions, velocities; its cell) from a ``jax.device_get`` of the
        state."""
        s = self.replica_state(host_state, i)
        atoms = self.structures[i].copy()
        atoms.calc = None
        atoms.set_positions(np.asarray(s.position, np.float64))
        atoms.set_velocities(np.asarray(s.momentum / s.mass.reshape(-1, 1), np.float64))
        return atoms
