"""Many MD replicas in one jit-compiled program, sharded over the devices.

    from equiforce.md import run_replicas
    result = run_replicas("model.eqf", [atoms_a, atoms_b, atoms_c], ensemble="nvt_langevin",
                          temperature_K=[300, 350, 400], seed=[0, 1, 2], steps=10_000,
                          trajectory="out/traj_{replica}.h5", thermo="out/thermo_{replica}.csv")

:func:`equiforce.md.run_md` given a list of structures calls :func:`run_replicas`.

Layout: replicas padded to one static atom budget, one disjoint graph per device for the network
------------------------------------------------------------------------------------------------
Every replica is padded to ``N = max n_k`` atoms and the replica axis to a multiple of the device count, so
the state is a batch ``[K, N, ...]`` of single-run states and the chunk compiles once. The replica axis is
sharded over a ``jax.sharding.Mesh`` of the devices and the chunk runs under ``jax.shard_map``: each device
steps its own replicas, with no communication. On a device,

* each replica keeps its own jax-md neighbour list (``vmap``-ed; a rebuild costs ``N²`` pair checks per
  replica, not ``(K·N)²``), its own rebuild decision and its own overflow flag, so an overflow is attributed
  to the replica that had it; the lists are updated only when some replica moved half the skin;
* the integrator is jax-md's pieces ``vmap``-ed over the replicas, each with its own kT, friction and key;
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

Padding atoms get species 0, mass 1 amu and zero momentum, sit on a line 10⁴ Å outside every
replica, are masked out of edges and node energies (zero force) and never move.

Per chunk (``report_interval`` steps inside jit; nothing leaves the device until the chunk ends):

* every step, every live replica is checked (finite energy, kinetic energy and positions; temperature at
  most ``max_temperature_K``). The first failing step stops that replica: its state goes back to the start
  of the chunk (its last written frame), it takes no further steps, and its :class:`ReplicaResult` says at
  which step and why. The other replicas go on unchanged.
* each replica's neighbour-list overflow flag is read; if any replica overflowed, all lists get one larger
  common capacity (a static shape) and the chunk is re-run for all replicas from their saved start states,
  so no replica loses a step and the re-run is exact.

Supported: non-periodic structures; ensembles ``nve`` and ``nvt_langevin`` (per-replica temperature,
friction and seed); precisions ``float32``, ``float64``, ``mixed``. Not supported (a ``ValueError`` says so):
periodic cells, Nosé–Hoover and NPT, restart, uncertainty monitoring.

Units are those of :mod:`equiforce.md.engine`: Å, eV, amu, fs / ps, K.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax_md import partition, simulate, space
from tqdm.auto import tqdm

from equiforce.data.errors import DataError
from equiforce.md import integrators
from equiforce.md.engine import ThermoFrame
from equiforce.md.outputs import RunOutputs
from equiforce.md.system import _check_precision, check_structure, with_precision
from equiforce.potentials.potential import Potential, UnknownSpeciesError

__all__ = ["REPLICA_ENSEMBLES", "ReplicaEngine", "ReplicaResult", "ReplicasResult", "run_replicas"]

REPLICA_ENSEMBLES = ("nve", "nvt_langevin")
_AXIS = "replicas"
_PAD_DISTANCE = 1.0e4  # Å between the replicas' atoms and the first padding atom


@dataclasses.dataclass(frozen=True)
class ReplicaResult:
    """One replica of a :func:`run_replicas` run.

    Attributes:
      index: the replica's position in the list of structures.
      n_atoms: its number of atoms.
      frames: its thermo frames (step 0, then one per chunk it completed); energies eV, T in K.
      steps: steps it completed (those of its last frame).
      final_atoms: its last good state as ``ase.Atoms`` (velocities set); for a stopped replica the state of
        its last frame.
      stopped_because: None if it ran all its steps, else why it stopped (step, energy, temperature).
      drift_meV_per_atom_per_ps, fluctuation_meV_per_atom: of its conserved quantity (see
        :func:`equiforce.md.run.energy_drift`).
    """

    index: int
    n_atoms: int
    frames: list[ThermoFrame]
    steps: int
    final_atoms: Any
    stopped_because: str | None
    drift_meV_per_atom_per_ps: float
    fluctuation_meV_per_atom: float


@dataclasses.dataclass(frozen=True)
class ReplicasResult:
    """Summary of a :func:`run_replicas` run.

    Attributes:
      replicas: one :class:`ReplicaResult` per structure, in input order.
      steps: steps requested per replica (rounded up to whole chunks).
      wall_s: wall time of the stepping after the first chunk, s.
      first_chunk_s: wall time of the first chunk, compilation included, s.
      atom_steps_per_s: atoms × steps of the live replicas per second after the first chunk.
      steps_per_s: steps per second of the program (each step advances every live replica).
      reallocations: neighbour-list reallocations (each re-ran one chunk of all replicas).
      n_devices: devices the replica axis was sharded over.
      padded_atoms: the static atom budget ``N`` every replica was padded to.
    """

    replicas: list[ReplicaResult]
    steps: int
    wall_s: float
    first_chunk_s: float
    atom_steps_per_s: float
    steps_per_s: float
    reallocations: int
    n_devices: int
    padded_atoms: int


class _Consts(NamedTuple):
    """Per-replica constants (leading axis: replica)."""

    species: jnp.ndarray  # [N] int32 species index, 0 for padding
    atom_mask: jnp.ndarray  # [N] bool, False for padding
    n_atoms: jnp.ndarray  # () real atoms
    dof: jnp.ndarray  # () kinetic degrees of freedom
    kT: jnp.ndarray  # () eV
    gamma: jnp.ndarray  # () 1/(ASE time)
    max_ekin: jnp.ndarray  # () eV, kinetic energy at max_temperature_K


def _per_replica(value: Any, k: int, name: str, cast: Callable[[Any], Any]) -> list[Any]:
    """``value`` for each of ``k`` replicas: a scalar repeated, or a sequence of length ``k``."""
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


def check_replicas(structures: Sequence[Any], potential: Potential) -> None:
    """Validate every structure before anything runs.

    Raises:
      UnknownSpeciesError: a replica holds an element the potential does not know (the message names the
        replica index and the element).
      DataError: an empty list, or a bad structure (see :func:`~equiforce.md.system.check_structure`),
        naming the replica index.
      ValueError: a periodic structure (not supported for replicas).
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
        if np.any(atoms.get_pbc()):
            raise ValueError(
                f"replica {k} is periodic: replicas support non-periodic structures only; run periodic "
                "structures one by one with run_md"
            )


class ReplicaEngine:
    """Runs K non-periodic replicas with one potential in jitted, sharded chunks (see the module docstring).

    Typical use::

        engine = ReplicaEngine(potential, params, [atoms_a, atoms_b], ensemble="nvt_langevin", seed=[1, 2])
        state = engine.init()                        # batched jax-md state, leading axis = replica
        state, frames, stopped = engine.run_chunk(state)

    Args:
      potential, params: the model.
      structures: K ``ase.Atoms`` (non-periodic; sizes may differ).
      ensemble: ``nve`` or ``nvt_langevin``.
      timestep_fs: shared time step, fs.
      temperature_K: initial temperature and Langevin target, K; one value or one per replica.
      friction_per_ps: Langevin friction, 1/ps; one value or one per replica.
      seed: initial velocities and Langevin noise; an int ``s`` gives replica ``k`` the seed ``s + k``, or
        one int per replica. Replica ``k`` with seed ``s_k`` draws what ``run_md(..., seed=s_k)`` draws.
      report_interval: steps per chunk.
      skin: neighbour-list skin, Å.
      capacity_multiplier: neighbour-list head-room over the largest replica's pair count.
      max_temperature_K: a replica above this temperature is stopped, K.
      precision: ``float32``, ``float64`` or ``mixed`` (see :func:`~equiforce.md.system.make_system`);
        default the potential's dtype.
      devices: see :func:`resolve_replica_devices`.
      log: receives messages (reallocations).

    Raises:
      UnknownSpeciesError / DataError / ValueError: see :func:`check_replicas`; also an unsupported ensemble,
        per-replica settings of the wrong length, bad devices.
      RuntimeError: ``float64``/``mixed`` precision with JAX's 64-bit types off.

    Attributes:
      step: steps completed by the live replicas. alive: ``[K]`` bool, host. heat: ``[K]`` eV the Langevin
      bath put in since step 0. reallocations: neighbour-list reallocations. capacity: the common
      neighbour-list capacity (pairs per replica). stop_reasons: ``[K]`` None or why the replica stopped.
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
        seed: int | Sequence[int] = 0,
        report_interval: int = 100,
        skin: float = 1.0,
        capacity_multiplier: float = 1.25,
        max_temperature_K: float = 1.0e5,
        precision: str | None = None,
        devices: int | Sequence[Any] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if ensemble not in REPLICA_ENSEMBLES:
            raise ValueError(
                f"replicas support the ensembles {REPLICA_ENSEMBLES}, got {ensemble!r} (Nosé–Hoover and NPT: run "
                "each structure with run_md)"
            )
        if not timestep_fs > 0 or report_interval < 1 or skin < 0:
            raise ValueError("timestep_fs > 0, report_interval >= 1 and skin >= 0 required")
        structures = list(structures)
        check_replicas(structures, potential)
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
        self.temperatures_K = _per_replica(temperature_K, k, "temperature_K", float)
        self.frictions_per_ps = _per_replica(friction_per_ps, k, "friction_per_ps", float)
        if isinstance(seed, (int, np.integer)):
            self.seeds = [int(seed) + i for i in range(k)]
        else:
            self.seeds = _per_replica(seed, k, "seed", int)
        if any(t < 0 for t in self.temperatures_K) or any(f < 0 for f in self.frictions_per_ps):
            raise ValueError("temperature_K and friction_per_ps must be >= 0")

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

        self.dofs = [integrators.degrees_of_freedom(ensemble, m) for m in self.n_atoms]
        species = np.zeros((self.K, n), np.int32)
        mask = np.zeros((self.K, n), bool)
        masses = np.ones((self.K, n), np.float64)
        self.e0 = []
        atomic_energies = np.asarray(potential.atomic_energies, np.float64)
        for i in range(self.K):
            atoms = structures[i if i < k else 0]  # the padding replicas copy replica 0 and never run
            z = potential.species_index(atoms.get_atomic_numbers())
            species[i, : len(atoms)] = z
            mask[i, : len(atoms)] = True
            masses[i, : len(atoms)] = atoms.get_masses()
            if i < k:
                self.e0.append(float(np.sum(atomic_energies[np.asarray(z)])))
        src = [i if i < k else 0 for i in range(self.K)]
        kT = np.array([self.temperatures_K[i] * units.kB for i in src])
        gamma = np.array([self.frictions_per_ps[i] / (1000.0 * units.fs) for i in src])
        dof = np.array([self.dofs[i] for i in src], np.float64)
        consts = _Consts(
            species=species,
            atom_mask=mask,
            n_atoms=np.array([self.n_atoms[i] for i in src], np.float64),
            dof=dof,
            kT=kT,
            gamma=gamma,
            max_ekin=0.5 * dof * units.kB * self.max_temperature_K,
        )
        as_dtype = {"species": jnp.int32, "atom_mask": bool}
        self.consts = self._put(
            _Consts(
                *(jnp.asarray(v, as_dtype.get(f, self.dtype)) for f, v in zip(_Consts._fields, consts, strict=True))
            )
        )
        self.masses = self._put(jnp.asarray(masses, self.dtype))

        self.displacement_fn, self.shift_fn = space.free()
        self.neighbor_fn = partition.neighbor_list(
            self.displacement_fn,
            jnp.asarray(1.0, self.dtype),
            self.r_max,
            dr_threshold=self.skin,
            capacity_multiplier=self.capacity_multiplier,
            format=partition.NeighborListFormat.OrderedSparse,
            disable_cell_list=True,
        )
        self._template = None
        self.neighbor = None
        self.capacity = 0
        self.step = 0
        self.heat = np.zeros(k)
        self.alive = np.zeros(k, bool)
        self.stop_reasons: list[str | None] = [None] * k
        self.reallocations = 0
        self._chunk = jax.jit(self._chunk_impl, static_argnums=(3,))
        self._observe = jax.jit(jax.vmap(self._observe_one))
        self._init = jax.jit(jax.vmap(self._init_one))
        self._counts = jax.jit(jax.vmap(self._pair_count))
        self._build = jax.jit(self._build_impl, static_argnums=(1,))

    # ------------------------------------------------------------------ pieces of one replica (traced)
    def _put(self, tree: Any) -> Any:
        return jax.device_put(tree, self.sharding)

    def _energies(self, positions: jnp.ndarray, idx: jnp.ndarray, c: _Consts) -> jnp.ndarray:
        """``[k]`` energies without E0 (eV) of ``k`` padded replicas (``positions [k, N, 3]``, neighbour indices
        ``[k, 2, C]``, constants with leading axis ``k``), evaluated as one disjoint graph of ``k·N`` atoms:
        one network call with flat segment sums (a ``vmap`` of the network would batch every scatter, about
        1.7x slower on CPU). Padding atoms and their pairs are masked out."""
        k, n = positions.shape[0], self.N
        receivers, senders = idx[:, 0], idx[:, 1]
        valid = receivers < n
        receivers = jnp.where(valid, receivers, 0)
        senders = jnp.where(valid, senders, 0)
        mask = c.atom_mask
        valid = valid & jnp.take_along_axis(mask, receivers, 1) & jnp.take_along_axis(mask, senders, 1)
        offset = (jnp.arange(k, dtype=jnp.int32) * n)[:, None]
        receivers, senders, valid = (receivers + offset).ravel(), (senders + offset).ravel(), valid.ravel()
        flat = positions.reshape(k * n, 3)
        vectors = jax.vmap(self.displacement_fn)(flat[senders], flat[receivers])
        vectors = jnp.where(valid[:, None], vectors, 0.0)
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

    def _energy(self, position: jnp.ndarray, neighbor: Any, c: _Consts) -> jnp.ndarray:
        """Energy of one padded replica without E0, eV."""
        return self._energies(position[None], neighbor.idx[None], jax.tree.map(lambda x: x[None], c))[0]

    def _value_and_force(self, c: _Consts) -> Callable[..., tuple[jnp.ndarray, jnp.ndarray, tuple]]:
        value_and_grad = jax.value_and_grad(self._energy)

        def value_and_force(position: jnp.ndarray, **kwargs: Any) -> tuple[jnp.ndarray, jnp.ndarray, tuple]:
            energy, grad = value_and_grad(position, kwargs["neighbor"], c)
            return energy, -grad, ()

        return value_and_force

    def _init_one(self, key, position, mass, velocity, has_velocity, neighbor, c: _Consts):
        value_and_force = self._value_and_force(c)

        def force_fn(r: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
            return value_and_force(r, **kwargs)[1]

        if self.ensemble == "nvt_langevin":
            init_fn, _ = simulate.nvt_langevin(force_fn, self.shift_fn, self.dt, c.kT, gamma=c.gamma)
        else:
            init_fn, _ = simulate.nve(force_fn, self.shift_fn, self.dt)
        state = init_fn(key, position, kT=c.kT, mass=mass, neighbor=neighbor)
        # as MDEngine.init: zero total momentum (over the real atoms), exactly the target temperature
        real = c.atom_mask[:, None]
        p = jnp.where(real, state.momentum, 0.0)
        p = jnp.where(real, p - jnp.sum(p, axis=0) / c.n_atoms, 0.0)
        ke = integrators.kinetic_energy(p, mass)
        target = 0.5 * c.dof * c.kT
        p = jnp.where(ke > 0, p * jnp.sqrt(target / jnp.maximum(ke, 1e-30)), p)
        p = jnp.where(has_velocity, velocity * mass[:, None], p)
        return dataclasses.replace(state, momentum=p.astype(self.dtype))

    def _observe_one(self, state: Any, neighbor: Any, c: _Consts) -> tuple[jnp.ndarray, jnp.ndarray]:
        return self._energy(state.position, neighbor, c), integrators.kinetic_energy(state.momentum, state.mass)

    def _pair_count(self, position: jnp.ndarray, c: _Consts) -> jnp.ndarray:
        """Pairs (each once) within ``r_max + skin``: what the neighbour list must hold."""
        d2 = jnp.sum((position[:, None, :] - position[None, :, :]) ** 2, axis=-1)
        upper = jnp.triu(jnp.ones((self.N, self.N), bool), k=1)
        within = (d2 < (self.r_max + self.skin) ** 2) & upper & c.atom_mask[:, None] & c.atom_mask[None, :]
        return jnp.sum(within, dtype=jnp.int32)

    def _build_impl(self, positions: jnp.ndarray, capacity: int) -> Any:
        """Neighbour lists of ``capacity`` pairs for all replicas (a forced rebuild of a template)."""
        template = dataclasses.replace(
            self._template,
            idx=jnp.full((2, capacity), self.N, jnp.int32),
            reference_position=jnp.full((self.N, 3), jnp.inf, self.dtype),
            error=partition.PartitionError(jnp.zeros((), jnp.uint8)),
            max_occupancy=capacity,
        )
        return jax.vmap(lambda r: template.update(r))(positions)

    def _batched_step(self, state: Any, neighbor: Any, c: _Consts) -> tuple[Any, jnp.ndarray, jnp.ndarray]:
        """One step of all local replicas: ``(state, E_pot [k] at the new positions, bath heat [k])``.

        The steps of :func:`~equiforce.md.integrators.nve_step_fn` and
        :func:`~equiforce.md.integrators.langevin_step_fn` (jax-md's pieces, ``vmap``-ed over the replicas,
        each with its own kT, friction and random key; padding atoms get no noise), with one force call for
        all replicas (:meth:`_energies`)."""
        dt = self.dt
        momentum_step = jax.vmap(simulate.momentum_step, in_axes=(0, None))
        kinetic = jax.vmap(integrators.kinetic_energy)

        def position_step(s: Any, step: float) -> Any:
            return jax.vmap(lambda x: simulate.position_step(x, self.shift_fn, step))(s)

        def total(positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
            energies = self._energies(positions, neighbor.idx, c)
            return jnp.sum(energies), energies

        def force_step(s: Any) -> tuple[Any, jnp.ndarray]:
            (_, energies), grad = jax.value_and_grad(total, has_aux=True)(s.position)
            return momentum_step(s.set(force=-grad), dt / 2), energies

        state = momentum_step(state, dt / 2)
        if self.ensemble == "nve":
            state = position_step(state, dt)
            state, energies = force_step(state)
            return state, energies, jnp.zeros_like(energies)
        state = position_step(state, dt / 2)
        before = kinetic(state.momentum, state.mass)
        state = jax.vmap(simulate.stochastic_step, in_axes=(0, None, 0, 0))(state, dt, c.kT, c.gamma)
        state = state.set(momentum=jnp.where(c.atom_mask[..., None], state.momentum, 0.0))
        heat = kinetic(state.momentum, state.mass) - before
        state = position_step(state, dt / 2)
        state, energies = force_step(state)
        return state, energies, heat.astype(energies.dtype)

    def _update_neighbors(self, positions: jnp.ndarray, neighbor: Any) -> Any:
        """jax-md's update of every replica's list, skipped (a real ``cond``) when no atom of any replica moved
        more than half the skin since its list was built; each replica rebuilds exactly when a single run
        would."""
        moved = jnp.sum((positions - neighbor.reference_position) ** 2, axis=-1) > (self.skin / 2) ** 2
        return jax.lax.cond(
            jnp.any(moved), lambda nb: jax.vmap(lambda p, x: x.update(p))(positions, nb), lambda nb: nb, neighbor
        )

    def _chunk_local(self, state: Any, neighbor: Any, alive: jnp.ndarray, c: _Consts, n_steps: int):
        """``n_steps`` steps of the replicas of one device (leading axis: local replica)."""
        zero = jnp.zeros(alive.shape, self.dtype)

        def where(flag: jnp.ndarray, a: Any, b: Any) -> Any:
            return jax.tree.map(lambda x, y: jnp.where(flag.reshape(flag.shape + (1,) * (x.ndim - 1)), x, y), a, b)

        def body(i, carry):
            state, neighbor, alive, epot, heat, bad = carry
            new, energies, step_heat = self._batched_step(state, neighbor, c)
            ekin = jax.vmap(integrators.kinetic_energy)(new.momentum, new.mass)
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
            neighbor = self._update_neighbors(state.position, neighbor)
            return state, neighbor, keep, epot, heat, bad

        start_state, start_neighbor, start_alive = state, neighbor, alive
        bad = (jnp.full(alive.shape, -1, jnp.int32), zero, zero)
        carry = (state, neighbor, alive, zero, zero, bad)
        state, neighbor, alive, epot, heat, bad = jax.lax.fori_loop(0, n_steps, body, carry)
        overflow = (neighbor.did_buffer_overflow != 0) & start_alive  # a stopped replica's too: it may be why
        died = start_alive & ~alive  # back to the chunk start, its last written frame
        state = where(died, start_state, state)
        neighbor = where(died, start_neighbor, neighbor)
        ekin = jax.vmap(integrators.kinetic_energy)(state.momentum, state.mass)
        return state, neighbor, alive, epot, ekin, heat, bad, overflow

    def _chunk_impl(self, state: Any, neighbor: Any, alive: jnp.ndarray, n_steps: int):
        """The chunk of all replicas: each device runs its own replicas (``shard_map``; no communication)."""
        spec = PartitionSpec(_AXIS)
        local = jax.shard_map(
            partial(self._chunk_local, n_steps=n_steps), mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False
        )
        return local(state, neighbor, alive, self.consts)

    # ------------------------------------------------------------------ host side
    def _padded_positions(self) -> np.ndarray:
        spacing = 2.0 * (self.r_max + self.skin) + 1.0
        far = max(float(np.max(np.abs(a.get_positions()))) for a in self.structures) + _PAD_DISTANCE
        pos = np.zeros((self.K, self.N, 3))
        pos[:, :, 0] = far + spacing * np.arange(self.N)
        for i in range(self.K):
            atoms = self.structures[i if i < self.n_replicas else 0]
            pos[i, : len(atoms)] = atoms.get_positions()
        return pos

    def _capacity_for(self, positions: jnp.ndarray, old: int = 0) -> int:
        """Pair slots per replica for ``positions``: the live replicas' largest pair count times
        ``capacity_multiplier``; after an overflow of capacity ``old`` also ``0.5 old`` more and at least
        ``1.5 old`` (geometric growth, as :class:`~equiforce.md.engine.MDEngine`); at most every pair."""
        counts = np.asarray(self._counts(positions, self.consts))[: self.n_replicas]
        capacity = int(int(counts[self.alive].max(initial=0)) * self.capacity_multiplier)
        if old:
            capacity = max(capacity + int(np.ceil(0.5 * old / self.N)) * self.N, int(np.ceil(1.5 * old)))
        return min(max(capacity, 1), max(1, self.N * (self.N - 1) // 2))

    def build_neighbors(self, positions: jnp.ndarray, capacity: int) -> Any:
        """Neighbour lists of all replicas with ``capacity`` pair slots each (batched, sharded)."""
        if self._template is None:
            self._template = self.neighbor_fn.allocate(jnp.asarray(np.asarray(positions)[0], self.dtype))
        return self._build(positions, int(capacity))

    def init(self, velocities: Sequence[np.ndarray | None] | None = None) -> Any:
        """Initial batched state (leading axis: replica, padded): Maxwell–Boltzmann velocities per replica
        (its seed; zero total momentum, exactly its temperature) unless ``velocities[k]`` (``[n_k, 3]``, Å per
        ASE time unit) is given. Resets :attr:`step`, :attr:`heat` and :attr:`alive`."""
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
        self.step = 0
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

    def _alive_padded(self) -> jnp.ndarray:
        return self._put(jnp.asarray(np.concatenate([self.alive, np.zeros(self.K - self.n_replicas, bool)])))

    def _frame(self, i: int, step: int, epot: float, ekin: float) -> ThermoFrame:
        epot = float(epot) + self.e0[i]
        ekin = float(ekin)
        total = epot + ekin
        return ThermoFrame(
            step=step,
            time_ps=step * self.timestep_fs / 1000.0,
            potential_energy=epot,
            kinetic_energy=ekin,
            temperature=2.0 * ekin / (self.dofs[i] * units.kB),
            conserved=total - self.heat[i] if self.ensemble == "nvt_langevin" else total,
        )

    def observe(self, state: Any) -> list[ThermoFrame | None]:
        """Thermo frames of the live replicas at :attr:`step` (None for a stopped one). A replica whose starting
        energy is not finite is stopped here."""
        epot, ekin = jax.device_get(self._observe(state, self.neighbor, self.consts))
        frames: list[ThermoFrame | None] = []
        for i in range(self.n_replicas):
            if self.alive[i] and not (np.isfinite(epot[i]) and np.isfinite(ekin[i])):
                self.alive[i] = False
                self.stop_reasons[i] = f"replica {i}: non-finite energy at step {self.step}: E_pot={epot[i]:.6g} eV"
            frames.append(self._frame(i, self.step, epot[i], ekin[i]) if self.alive[i] else None)
        return frames

    def run_chunk(self, state: Any) -> tuple[Any, list[ThermoFrame | None], list[str | None]]:
        """Advance every live replica ``report_interval`` steps; re-run the chunk on a neighbour-list overflow.

        Returns:
          ``(state, frames, stopped)``: the new batched state; per replica its thermo frame at the chunk end
          (None if it is not running); per replica the reason it stopped in this chunk (None if it did not).
        """
        n = self.report_interval
        start_neighbor = self.neighbor
        alive = self._alive_padded()
        while True:
            out = self._chunk(state, start_neighbor, alive, n)
            overflow = np.asarray(jax.device_get(out[7]))[: self.n_replicas]
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
        new_state, self.neighbor, alive_out, epot, ekin, heat, bad, _ = out
        alive_out, epot, ekin, heat, (bad_i, bad_epot, bad_ekin) = jax.device_get((alive_out, epot, ekin, heat, bad))
        frames: list[ThermoFrame | None] = []
        stopped: list[str | None] = []
        end = self.step + n
        for i in range(self.n_replicas):
            reason = None
            if self.alive[i] and not alive_out[i]:
                e = float(bad_epot[i]) + self.e0[i]
                t = 2.0 * float(bad_ekin[i]) / (self.dofs[i] * units.kB)
                reason = (
                    f"replica {i} blew up at step {self.step + int(bad_i[i]) + 1}: E_pot={e:.6g} eV, T={t:.6g} K "
                    f"(limit {self.max_temperature_K:g} K); stopped with the state of step {self.step}"
                )
                self.alive[i] = False
                self.stop_reasons[i] = reason
            elif self.alive[i]:
                self.heat[i] += float(heat[i])
            stopped.append(reason)
            frames.append(self._frame(i, end, epot[i], ekin[i]) if self.alive[i] else None)
        self.step = end
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
            value = np.asarray(value)[i]
            fields[f.name] = value[:n] if f.name in ("position", "momentum", "force", "mass") else value
        return dataclasses.replace(host_state, **fields)

    def atoms(self, host_state: Any, i: int) -> Any:
        """Replica ``i`` as ``ase.Atoms`` (positions, velocities) from a ``jax.device_get`` of the state."""
        s = self.replica_state(host_state, i)
        atoms = self.structures[i].copy()
        atoms.calc = None
        atoms.set_positions(np.asarray(s.position, np.float64))
        atoms.set_velocities(np.asarray(s.momentum / s.mass.reshape(-1, 1), np.float64))
        return atoms


class _ReplicaView:
    """What :class:`~equiforce.md.outputs.RunOutputs` asks of an engine, for one replica's cut state."""

    def __init__(self, heat: float) -> None:
        self.heat = heat

    def positions(self, state: Any) -> np.ndarray:
        return np.asarray(state.position, np.float64)

    def velocities(self, state: Any) -> np.ndarray:
        return np.asarray(state.momentum / state.mass.reshape(-1, 1), np.float64)

    def cell(self, state: Any) -> None:
        return None

    def forces(self, state: Any) -> np.ndarray:
        return np.asarray(state.force, np.float64)  # the force of the state's last step, at its positions


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


def run_replicas(
    model: str | Path | tuple[Potential, Any],
    structures: Sequence[Any],
    *,
    ensemble: str = "nvt_langevin",
    temperature_K: float | Sequence[float] = 300.0,
    timestep_fs: float = 0.5,
    steps: int = 1000,
    report_interval: int = 100,
    friction_per_ps: float | Sequence[float] = 1.0,
    skin: float = 1.0,
    seed: int | Sequence[int] = 0,
    trajectory: str | Path | Sequence[str | Path] | None = None,
    thermo: str | Path | Sequence[str | Path] | None = None,
    write_forces: bool = False,
    progress: bool = True,
    max_temperature_K: float = 1.0e5,
    precision: str | None = None,
    devices: int | Sequence[Any] | None = None,
    capacity_multiplier: float = 1.25,
    log: Callable[[str], None] | None = None,
) -> ReplicasResult:
    """Run MD of K structures together in one jit-compiled program, sharded over the devices.

    Each replica is what ``run_md(model, structures[k], seed=seed_k, temperature_K=T_k, ...)`` would
    compute (to rounding), but all advance in the same program (see :mod:`equiforce.md.replicas` for the
    layout). A replica that blows up stops alone; a neighbour-list overflow re-runs the chunk of all
    replicas, losing nothing.

    Args:
      model: a model file path, or ``(potential, params)``.
      structures: K ``ase.Atoms`` or specs for :func:`~equiforce.md.run.load_structure`; non-periodic,
        sizes may differ. Velocities already set on a structure are used (else Maxwell–Boltzmann).
      ensemble: ``nve`` or ``nvt_langevin``.
      temperature_K: initial temperature and Langevin target, K: one value or one per replica.
      timestep_fs: time step, fs (shared).
      steps: steps per replica, rounded up to whole chunks of ``report_interval``.
      report_interval: steps per chunk = interval of trajectory frames and thermo rows.
      friction_per_ps: Langevin friction, 1/ps: one value or one per replica.
      skin: neighbour-list skin, Å.
      seed: an int ``s`` (replica ``k`` gets ``s + k``) or one int per replica.
      trajectory: H5MD output per replica (see :func:`replica_paths`; frames as :func:`run_md` writes them,
        with each replica's restart state); None: none.
      thermo: thermo CSV per replica (see :func:`replica_paths`); None: none.
      write_forces: also store forces (eV/Å) in the trajectories.
      progress: show a progress bar.
      max_temperature_K: a replica above this temperature is stopped, K.
      precision: ``float32``, ``float64`` or ``mixed`` (default the potential's dtype); ``float64`` and
        ``mixed`` switch on JAX's 64-bit types.
      devices: None (all devices, at most one per replica), a count, or a list of devices.
      capacity_multiplier: neighbour-list head-room.
      log: receives messages (default ``tqdm.write``).

    Returns:
      A :class:`ReplicasResult`; ``result.replicas[k].stopped_because`` says why replica ``k`` stopped early
      (its trajectory keeps its good frames and, with an output file, its last good frame is written to
      ``<trajectory or thermo stem>_last_good.extxyz``).

    Raises:
      UnknownSpeciesError: a replica holds an element the model does not know (names the replica and the
        element); raised before anything runs or any file is written.
      DataError: a bad structure (names the replica) or an unreadable structure file.
      ValueError: an unsupported ensemble, a periodic structure, per-replica settings or output paths of the
        wrong length, more devices than exist.
    """
    from equiforce.md.run import energy_drift, load_potential, load_structure

    log = log or tqdm.write
    potential, params = load_potential(model)
    if precision in ("float64", "mixed"):
        jax.config.update("jax_enable_x64", True)
    structures = [(a if hasattr(a, "get_positions") else load_structure(a)).copy() for a in structures]
    engine = ReplicaEngine(
        potential,
        params,
        structures,
        ensemble=ensemble,
        timestep_fs=timestep_fs,
        temperature_K=temperature_K,
        friction_per_ps=friction_per_ps,
        seed=seed,
        report_interval=report_interval,
        skin=skin,
        capacity_multiplier=capacity_multiplier,
        max_temperature_K=max_temperature_K,
        precision=precision,
        devices=devices,
        log=log,
    )
    k = len(structures)
    traj_paths, thermo_paths = replica_paths(trajectory, k), replica_paths(thermo, k)
    velocities = [a.get_velocities() if np.any(a.get_velocities()) else None for a in structures]
    state = engine.init(velocities)
    log(
        f"{k} replicas ({min(engine.n_atoms)}-{engine.N} atoms, padded to {engine.N}) on {engine.n_devices} "
        f"device(s), neighbour capacity {engine.capacity} pairs per replica"
    )
    n_chunks = max(1, int(np.ceil(steps / report_interval)))
    frames: list[list[ThermoFrame]] = [[] for _ in range(k)]
    last_good: list[Any] = [None] * k
    outputs: list[RunOutputs | None] = [None] * k
    bar = tqdm(total=n_chunks * report_interval, disable=not progress, unit="step", dynamic_ncols=True)
    first_chunk_s, atom_steps, chunks_done = float("nan"), 0, 0
    t_start = time.perf_counter()
    try:
        for i in range(k):
            if traj_paths[i] is not None or thermo_paths[i] is not None:
                outputs[i] = RunOutputs(
                    trajectory=traj_paths[i],
                    thermo=thermo_paths[i],
                    atoms=structures[i],
                    periodic=False,
                    write_forces=write_forces,
                    frame_interval_ps=report_interval * timestep_fs / 1000.0,
                    ensemble=ensemble,
                )
        host = jax.device_get(state)
        for i, frame in enumerate(engine.observe(state)):
            last_good[i] = engine.atoms(host, i)
            if frame is not None:
                frames[i].append(frame)
                if outputs[i] is not None:
                    outputs[i].write(_ReplicaView(0.0), engine.replica_state(host, i), frame)
        t_first = t_start = time.perf_counter()
        for c in range(n_chunks):
            if not engine.alive.any():
                break
            live_atoms = int(np.sum(np.asarray(engine.n_atoms)[engine.alive]))
            state, chunk_frames, stopped = engine.run_chunk(state)
            host = jax.device_get(state)
            if c == 0:
                first_chunk_s = time.perf_counter() - t_first
                t_start = time.perf_counter()
            else:
                atom_steps += live_atoms * report_interval
                chunks_done += 1
            for i in range(k):
                if chunk_frames[i] is not None:
                    frames[i].append(chunk_frames[i])
                    last_good[i] = engine.atoms(host, i)
                    if outputs[i] is not None:
                        view = _ReplicaView(float(engine.heat[i]))
                        outputs[i].write(view, engine.replica_state(host, i), chunk_frames[i])
                if stopped[i] is not None:
                    log(stopped[i])
                    stem = traj_paths[i] or thermo_paths[i]
                    if stem is not None:
                        _write_last_good(last_good[i], stem, log)
            bar.update(report_interval)
    finally:
        bar.close()
        for out in outputs:
            if out is not None:
                out.close()
    wall = time.perf_counter() - t_start
    results = []
    for i in range(k):
        drift, fluct = energy_drift(frames[i], engine.n_atoms[i])
        results.append(
            ReplicaResult(
                index=i,
                n_atoms=engine.n_atoms[i],
                frames=frames[i],
                steps=frames[i][-1].step if frames[i] else 0,
                final_atoms=last_good[i],
                stopped_because=engine.stop_reasons[i],
                drift_meV_per_atom_per_ps=drift,
                fluctuation_meV_per_atom=fluct,
            )
        )
    timed = chunks_done * report_interval
    return ReplicasResult(
        replicas=results,
        steps=n_chunks * report_interval,
        wall_s=wall,
        first_chunk_s=first_chunk_s,
        atom_steps_per_s=atom_steps / wall if timed and wall > 0 else float("nan"),
        steps_per_s=timed / wall if timed and wall > 0 else float("nan"),
        reallocations=engine.reallocations,
        n_devices=engine.n_devices,
        padded_atoms=engine.N,
    )


def _write_last_good(atoms: Any, stem: str | Path, log: Callable[[str], None]) -> Path:
    import ase.io

    path = Path(stem).with_name(Path(stem).stem + "_last_good.extxyz")
    ase.io.write(path, atoms)
    log(f"last good frame written to {path}")
    return path
