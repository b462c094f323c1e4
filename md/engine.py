"""The jit-compiled MD loop: integrator steps in chunks, overflow re-runs and blow-up detection.

The engine runs one :class:`~equiforce.md.ensembles.Ensemble`'s step: each returns what its force call
computed (the potential energy) and, for Langevin, the heat exchanged with the bath, carried through the
chunk's loop as explicit outputs. NPT runs jax-md's own step.

Each chunk of ``report_interval`` steps runs inside one jitted ``lax.fori_loop`` with the neighbour list
updated (and rebuilt when atoms moved more than half the skin) inside the loop; nothing leaves the
device until the chunk ends. Then the host checks

* the neighbour-list overflow flag: on overflow the list is reallocated with more capacity (at least
  1.5x, geometric) and the *same* chunk is re-run from its saved start state, so no pair is ever dropped
  and no step is lost; every reallocation is logged and counted;
* blow-up: NaN/inf positions or energies, or a temperature above ``max_temperature_K``, stop the run with
  :class:`MDBlowUpError`; the last good frame is kept (and written out by :func:`run_md`).

Units are ASE's: Å, eV, amu, time in ASE units internally (``timestep_fs * ase.units.fs``), reported in
ps; temperatures in K (kT in eV inside), over the degrees of freedom of
:meth:`equiforce.md.ensembles.Ensemble.degrees_of_freedom` (``3N - 3``; ``3N`` for Langevin; ``3 (N - n_fixed)``
with fixed atoms).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax_md import quantity, simulate

from equiforce.md.ensembles import ENSEMBLES as _ENSEMBLES
from equiforce.md.ensembles import (
    Thermostat,
    get_ensemble,
    kinetic_energy,
    pin,
    restore_state,
    thermal_momenta,
    with_chain_dof,
)
from equiforce.md.system import MDSystem, cell_heights

__all__ = ["ENSEMBLES", "MDBlowUpError", "MDConfig", "MDEngine", "ThermoFrame", "UncertaintyCrossing"]

logger = logging.getLogger(__name__)

#: the ensemble names (the ensembles themselves: :data:`equiforce.md.ensembles.ENSEMBLES`)
ENSEMBLES = tuple(_ENSEMBLES)


class MDBlowUpError(RuntimeError):
    """The simulation became unphysical (NaN/inf, or a temperature above the limit)."""


@dataclasses.dataclass(frozen=True)
class MDConfig:
    """Settings of one MD run (units in the names).

    Attributes:
      ensemble: ``nve`` (velocity Verlet), ``nvt_langevin``, ``nvt_nose_hoover`` or ``npt_nose_hoover``
        (jax-md; NPT needs a periodic system built with ``fractional=True``).
      timestep_fs: integration time step, fs.
      temperature_K: initial Maxwell–Boltzmann temperature and thermostat target, K.
      friction_per_ps: Langevin friction γ, 1/ps.
      thermostat_tau_fs: Nosé–Hoover chain time constant, fs (default 100 time steps).
      pressure_GPa: NPT target pressure, GPa.
      barostat_tau_fs: NPT barostat time constant, fs (default 1000 time steps).
      report_interval: steps per jitted chunk = interval of thermo/trajectory frames.
      skin: neighbour-list skin, Å.
      capacity_multiplier: initial neighbour-list head-room.
      compact_edges: evaluate the network only on the pairs within r_max, compacted every step into a
        fixed number of edge slots (``edge_capacity_multiplier`` x the pairs at the start; enlarged and the
        chunk re-run when exceeded, like the neighbour list), instead of on every slot of the neighbour list
        (pairs out to r_max + skin plus head-room: about twice as many in liquids with a 1 Å skin).
      edge_capacity_multiplier: head-room of the compacted edge slots.
      max_temperature_K: above this the run is declared blown up.
      seed: initial velocities and Langevin noise.
      compute_uncertainty: for a potential with an uncertainty (committee or LLPR), compute σ_E and σ_F at
        every step inside the jitted chunk, from the step's own force call (no extra force call, no host
        transfer per step); frames then carry σ_E and the largest σ_F. NPT evaluates them at the end of each
        chunk only (its step is jax-md's).
      uncertainty_threshold: σ_F (eV/Å) above which a step counts as uncertain: the engine reports the first
        such step of each chunk (:attr:`MDEngine.last_crossing`: step, atom, σ_F and the configuration).
        None: no threshold. Needs a potential with an uncertainty.
    """

    ensemble: str = "nve"
    timestep_fs: float = 0.5
    temperature_K: float = 300.0
    friction_per_ps: float = 1.0
    thermostat_tau_fs: float | None = None
    pressure_GPa: float = 0.0
    barostat_tau_fs: float | None = None
    report_interval: int = 100
    skin: float = 1.0
    capacity_multiplier: float = 1.25
    compact_edges: bool = True
    edge_capacity_multiplier: float = 1.15
    max_temperature_K: float = 1.0e5
    seed: int = 0
    compute_uncertainty: bool = True
    uncertainty_threshold: float | None = None

    def __post_init__(self) -> None:
        get_ensemble(self.ensemble)  # raises ValueError naming the ensembles
        if not self.timestep_fs > 0 or self.report_interval < 1 or self.temperature_K < 0 or self.skin < 0:
            raise ValueError("timestep_fs > 0, report_interval >= 1, temperature_K >= 0 and skin >= 0 required")
        if not self.edge_capacity_multiplier >= 1.0:
            raise ValueError(f"edge_capacity_multiplier must be >= 1, got {self.edge_capacity_multiplier}")
        t = self.uncertainty_threshold
        if t is not None and not (np.isfinite(t) and t > 0):
            raise ValueError(f"uncertainty_threshold must be a finite force uncertainty > 0 eV/Å, got {t}")


@dataclasses.dataclass(frozen=True)
class ThermoFrame:
    """Observables at the end of a chunk (host side, float64): energies eV (E0s included), temperature K,
    pressure eV/Å³ (instantaneous, kinetic part included; NaN when not periodic), volume Å³; ``conserved``:
    see :meth:`MDEngine.conserved_quantity`."""

    step: int
    time_ps: float
    potential_energy: float
    kinetic_energy: float
    temperature: float
    conserved: float
    pressure: float = float("nan")
    volume: float = float("nan")
    energy_uncertainty: float = float("nan")
    max_forces_uncertainty: float = float("nan")


@dataclasses.dataclass(frozen=True)
class UncertaintyCrossing:
    """The first step of a chunk whose largest σ_F exceeded ``MDConfig.uncertainty_threshold``.

    Attributes:
      step: the MD step; atom: index of the atom with the largest σ_F; sigma: that σ_F, eV/Å;
      energy_uncertainty: σ_E at that step, eV; positions: ``[n_atoms, 3]`` Å (Cartesian); cell: ASE cell
      (rows) or None.
    """

    step: int
    atom: int
    sigma: float
    energy_uncertainty: float
    positions: np.ndarray
    cell: np.ndarray | None


_kinetic_energy = kinetic_energy


@contextlib.contextmanager
def _quiet_jax_md_sums():
    """jax-md's ``high_precision_sum`` (NPT kinetic energy and pressure) asks for float64 even when JAX's
    64-bit types are off; JAX then warns at trace time and sums in float32, the precision the float32 user
    chose. Silence that one warning, which says nothing actionable to them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64 requested in ")
        yield


class MDEngine:
    """Runs an :class:`MDSystem` with a jax-md integrator in jitted chunks.

    Typical use::

        engine = MDEngine(system, config)
        state = engine.init(positions)            # Maxwell–Boltzmann velocities, zero total momentum
        state, frame = engine.run_chunk(state)     # report_interval steps
    """

    def __init__(self, system: MDSystem, config: MDConfig, log: Callable[[str], None] | None = None) -> None:
        self.system = system
        self.config = config
        self.log = log or logger.info
        self.dt = config.timestep_fs * units.fs
        self.kT = config.temperature_K * units.kB
        self.n_atoms = int(system.masses.shape[0])
        self.ensemble = get_ensemble(config.ensemble)
        self.npt = not self.ensemble.fixed_box
        self.pressure = config.pressure_GPa * units.GPa
        #: ``[n_atoms]`` bool, False for fixed atoms; None: every atom moves
        self.free = None if system.fixed is None else jnp.asarray(~np.asarray(system.fixed))
        n_fixed = 0 if system.fixed is None else int(np.sum(system.fixed))
        self.dof = self.ensemble.degrees_of_freedom(self.n_atoms, n_fixed)
        gamma = config.friction_per_ps / (1000.0 * units.fs)
        self.thermostat = Thermostat(kT=self.kT, gamma=gamma, chain_kT=self.kT, dof_index=0)
        self.reallocations = 0
        self.step = 0
        self.heat = 0.0  # eV the Langevin bath put into the system since step 0 (see conserved_quantity)
        self.neighbor = None
        self.edge_capacity: int | None = None  # set by init() when config.compact_edges
        self.uncertain = system.uncertainty_fn is not None and config.compute_uncertainty
        if config.uncertainty_threshold is not None and not self.uncertain:
            raise ValueError(
                "uncertainty_threshold needs a potential with an uncertainty (a committee, model.ensemble_size > 1, "
                "or a model given LLPR by `equiforce calibrate MODEL DATA`)"
                + ("" if system.uncertainty_fn is None else " and compute_uncertainty=True")
            )
        #: the first uncertain step of the last chunk (None: none, or no threshold)
        self.last_crossing: UncertaintyCrossing | None = None
        #: steps before this one do not count as uncertain (the run uses it for a minimum spacing)
        self.crossing_from_step = 0
        self._bind(None)

    def _bind(self, edge_capacity: int | None) -> None:
        """(Re)build the integrator and the jitted chunk for an edge capacity (a static shape)."""
        config, system = self.config, self.system
        self.edge_capacity = edge_capacity
        self.energy_fn = partial(system.energy_fn, edge_capacity=edge_capacity)
        # jitted, so the model is traced once per shape: jax-md's energy-or-force check (eval_shape), the
        # initial force, the step-0 observables and the chunk's loop body reuse that trace
        if self.uncertain:
            # energy, forces and (σ_E, σ_F) from one pass: the explicit per-step output path (StepAux.extra)
            self.uncertainty_fn = jax.jit(partial(system.uncertainty_fn, edge_capacity=edge_capacity))

            def value_and_force(position: jnp.ndarray, **kwargs: Any) -> tuple[jnp.ndarray, jnp.ndarray, tuple]:
                energy, force, sigma_e, sigma_f = self.uncertainty_fn(position, **kwargs)
                return energy, force, (sigma_e, sigma_f)

        else:
            value_and_grad = jax.jit(jax.value_and_grad(self.energy_fn))

            def value_and_force(position: jnp.ndarray, **kwargs: Any) -> tuple[jnp.ndarray, jnp.ndarray, tuple]:
                energy, grad = value_and_grad(position, **kwargs)
                return energy, -grad, ()

        def force_fn(position: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
            return value_and_force(position, **kwargs)[1]

        self._value_and_force = value_and_force
        shift_fn, dt, kT, ens = system.shift_fn, self.dt, self.kT, self.ensemble
        tau = (config.thermostat_tau_fs or 100.0 * config.timestep_fs) * units.fs
        self._step = None
        if ens.make_step is not None:
            self._init_fn, _ = ens.simulator(force_fn, shift_fn, dt, kT, gamma=self.thermostat.gamma, tau=tau)
            self._step = ens.make_step(value_and_force, shift_fn, dt, (self.dof,))
        else:  # NPT: jax-md's step, given the energy (the barostat differentiates it with respect to the box)
            if not system.fractional:
                raise ValueError("NPT needs a periodic system built with make_system(..., fractional=True)")
            tau_b = (config.barostat_tau_fs or 1000.0 * config.timestep_fs) * units.fs
            energy_fn = self.energy_fn
            if self.free is not None:  # zero force on fixed atoms; the box derivative (stress) keeps them
                free = self.free[:, None]

                def energy_fn(position: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
                    pinned = jnp.where(free, position, jax.lax.stop_gradient(position))
                    return self.energy_fn(pinned, **kwargs)

            self._init_fn, self._apply_fn = ens.simulator(
                energy_fn, shift_fn, dt, kT, gamma=0.0, tau=tau, pressure=self.pressure, barostat_tau=tau_b
            )
        self._chunk = jax.jit(self._chunk_impl, static_argnums=(2,))
        self._observe = jax.jit(self._observe_impl)

    # ------------------------------------------------------------------ state
    def init(self, positions: np.ndarray, velocities: np.ndarray | None = None) -> Any:
        """Initial integrator state at ``positions`` (Å).

        Velocities (Å per ASE time unit) are drawn from Maxwell–Boltzmann at ``temperature_K`` with the
        seed, with zero total momentum and rescaled to exactly ``temperature_K`` over :attr:`dof` degrees of
        freedom, unless given. Resets :attr:`step` to 0 and the bath heat :attr:`heat` to 0 eV.
        """
        pos = jnp.asarray(positions, self.system.dtype)
        key = jax.random.PRNGKey(self.config.seed)
        box = self.system.box
        space = {"box": box} if self.system.fractional else {}
        if self.system.periodic:
            pos = jnp.mod(jnp.linalg.solve(box, pos.T).T, 1.0)  # x = box @ u  ->  u in [0, 1)
            if not self.system.fractional:
                pos = pos @ box.T  # back to real coordinates, inside the box (the cell list bins [0, L))
        self.neighbor = self.system.neighbor_fn.allocate(pos, **space)
        count = self.system.edge_count(pos, self.neighbor, **space)
        if self.config.compact_edges:
            self._bind(self._edge_capacity_for(int(count)))
        with _quiet_jax_md_sums():
            if self.npt:
                state = self._init_fn(key, pos, box, mass=self.system.masses, kT=self.kT, neighbor=self.neighbor)
            else:
                state = self._init_fn(key, pos, kT=self.kT, mass=self.system.masses, neighbor=self.neighbor)
        if velocities is not None:
            momentum = jnp.asarray(velocities, self.system.dtype) * self.system.masses[:, None]
            momentum = pin(self.free, momentum)
        else:
            # jax-md draws MB momenta; remove the centre-of-mass motion and rescale to the exact temperature
            momentum = thermal_momenta(state.momentum, self.system.masses, self.kT, self.dof, self.free)
        state = dataclasses.replace(
            state, momentum=momentum.astype(self.system.dtype), force=pin(self.free, state.force)
        )
        ke = _kinetic_energy(state.momentum, self.system.masses)
        field = self.ensemble.chain_field
        if field is not None:  # the chain aims at the reported degrees of freedom
            chain = with_chain_dof(getattr(state, field), self.dof).set(kinetic_energy=ke)
            state = state.set(**{field: chain})
        self.step = 0
        self.heat = 0.0
        return state

    def restore(self, state: Any, arrays: dict[str, np.ndarray], meta: dict[str, Any], source: Any = "") -> Any:
        """Continue from a restart point: the state stored in ``arrays`` (shaped like ``state``, e.g. from
        :meth:`init`), with :attr:`step`, the bath :attr:`heat` and the neighbour list restored from it.

        Args:
          arrays, meta: a restart point (:func:`~equiforce.md.outputs.read_restart_point`): the state's arrays,
            and ``ensemble``, ``step`` and ``heat_eV``.
          source: the file it came from (for messages).

        Raises:
          ValueError: written by another ensemble, or arrays that do not fit this system.
        """
        if meta.get("ensemble") != self.ensemble.name:
            raise ValueError(f"{source} was written by a {meta.get('ensemble')} run, not {self.ensemble.name}")
        state = restore_state(state, arrays)
        self.step = int(meta["step"])
        self.heat = float(meta.get("heat_eV", 0.0))
        self.neighbor = self.system.neighbor_fn.allocate(state.position, **self._space_kwargs(state))
        return state

    # ------------------------------------------------------------------ chunks
    def box(self, state: Any) -> jnp.ndarray | None:
        """The current jax-md box (lattice vectors as columns), None for free space."""
        return simulate.npt_box(state) if self.npt else self.system.box

    def _space_kwargs(self, state: Any) -> dict[str, Any]:
        return {"box": simulate.npt_box(state)} if self.npt else {}

    def _edge_capacity_for(self, count: int) -> int:
        return max(int(np.ceil(count * self.config.edge_capacity_multiplier)), count + 8)

    def _kinetic_pressure_volume(self, state: Any, neighbor: Any) -> tuple[jnp.ndarray, ...]:
        """Kinetic energy, instantaneous pressure (kinetic part included) and volume of ``state`` (traceable)."""
        ekin = _kinetic_energy(state.momentum, state.mass.reshape(-1))
        if not self.system.periodic:
            zero = jnp.zeros((), ekin.dtype)  # set to NaN on the host (no NaN inside jit)
            return ekin, zero, zero
        box = self.box(state)
        energy_at_box = partial(self.energy_fn, **self._space_kwargs(state))  # NPT: the current box goes in
        pressure = quantity.pressure(energy_at_box, state.position, box, ekin, neighbor=neighbor)
        return ekin, pressure, jnp.abs(jnp.linalg.det(box))

    def _energy_and_sigma(self, state: Any, neighbor: Any) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """``(E_pot without E0, σ_E, σ_F [n_atoms])`` at ``state`` from one call (traceable; σ zero without an
        uncertainty)."""
        space = self._space_kwargs(state)
        if not self.uncertain:
            zero = jnp.zeros((), state.position.dtype)
            epot = self.energy_fn(state.position, neighbor, **space)
            return epot, zero, jnp.zeros((self.n_atoms,), state.position.dtype)
        epot, _, sigma_e, sigma_f = self.uncertainty_fn(state.position, neighbor, **space)
        return epot, sigma_e, sigma_f

    def _observe_impl(self, state: Any, neighbor: Any) -> tuple[jnp.ndarray, ...]:
        epot, sigma_e, sigma_f = self._energy_and_sigma(state, neighbor)
        return (epot, *self._kinetic_pressure_volume(state, neighbor), sigma_e, jnp.max(sigma_f))

    def _chunk_impl(self, state: Any, neighbor: Any, n_steps: int, min_offset: jnp.ndarray):
        """``n_steps`` steps. Uncertainty bookkeeping in the carry: σ_E and σ_F of the latest step and the
        first step ``i >= min_offset - 1`` (0-based) whose largest σ_F exceeds the threshold, with its atom,
        σ's and positions."""
        step_fn = self._step
        threshold = self.config.uncertainty_threshold
        dtype = state.position.dtype
        per_step_sigma = self.uncertain and step_fn is not None

        def body(i, carry):
            state, neighbor, max_edges, epot, heat, unc = carry
            if step_fn is not None:
                state, aux = step_fn(state, self.thermostat, self.free, neighbor=neighbor)
                epot, heat = aux.potential_energy, heat + aux.heat  # epot at the new positions
            else:
                state = self._apply_fn(state, neighbor=neighbor)
                if self.free is not None:  # jax-md's NPT moves atoms without momentum too: fixed ones stay put
                    state = state.set(position=jnp.where(self.free[:, None], state.position, anchor))
            if per_step_sigma:
                sigma_e, sigma_f = aux.extra
                sigma_max = jnp.max(sigma_f)
                cross_i, cross_atom, cross_sigma, cross_sigma_e, cross_pos = unc[2:]
                if threshold is not None:
                    new = (sigma_max > threshold) & (cross_i < 0) & (i + 1 >= min_offset)
                    cross_i = jnp.where(new, i, cross_i)
                    cross_atom = jnp.where(new, jnp.argmax(sigma_f).astype(jnp.int32), cross_atom)
                    cross_sigma = jnp.where(new, sigma_max, cross_sigma)
                    cross_sigma_e = jnp.where(new, sigma_e, cross_sigma_e)
                    cross_pos = jnp.where(new, state.position, cross_pos)
                unc = (sigma_e, sigma_max, cross_i, cross_atom, cross_sigma, cross_sigma_e, cross_pos)
            space = self._space_kwargs(state)
            # the pairs the force call of this step saw (within r_max, so the same in the old and new list)
            max_edges = jnp.maximum(max_edges, self.system.edge_count(state.position, neighbor, **space))
            neighbor = neighbor.update(state.position, **space)
            return state, neighbor, max_edges, epot, heat, unc

        anchor = state.position  # NPT: fixed atoms keep these (fractional) coordinates
        # energies have the dtype of the positions (float64 in mixed precision too)
        zero = jnp.zeros((), dtype)
        minus_one = jnp.full((), -1, jnp.int32)
        unc = (zero, zero, minus_one, minus_one, zero, zero, jnp.zeros_like(state.position))
        carry = (state, neighbor, jnp.zeros((), jnp.int32), zero, zero, unc)
        state, neighbor, max_edges, epot, heat, unc = jax.lax.fori_loop(0, n_steps, body, carry)
        if step_fn is None:  # NPT: energy (and σ) at the end of the chunk
            epot, sigma_e, sigma_f = self._energy_and_sigma(state, neighbor)
        if self.uncertain and not per_step_sigma:
            sigma_max = jnp.max(sigma_f)
            cross = (threshold is not None) & (sigma_max > (threshold or 0.0)) & (n_steps >= min_offset)
            unc = (
                sigma_e,
                sigma_max,
                jnp.where(cross, n_steps - 1, -1).astype(jnp.int32),
                jnp.argmax(sigma_f).astype(jnp.int32),
                sigma_max,
                sigma_e,
                state.position,
            )
        ekin, pressure, volume = self._kinetic_pressure_volume(state, neighbor)
        return state, neighbor, epot, ekin, pressure, volume, max_edges, heat, unc

    def _temperature(self, ekin: float) -> float:
        return 2.0 * ekin / (self.dof * units.kB)

    def conserved_quantity(self, state: Any, epot: float, ekin: float) -> float:
        """The run's conserved quantity, eV (``epot`` with E0s, ``ekin`` at ``state``).

        NVE: the total energy. Langevin: the total energy minus the heat the bath put in since step 0
        (:attr:`heat`). Nosé–Hoover: the extended Hamiltonian (system + chain); NPT also the barostat
        chain, ``P V`` and the box kinetic energy (jax-md's ``npt_nose_hoover_invariant`` with the chain's
        degrees of freedom).
        """
        extended = float(self.ensemble.extended_energy(state, self.kT, self.pressure))
        return self.ensemble.conserved(epot + ekin, self.heat, extended)

    def _frame(
        self, state: Any, epot: Any, ekin: Any, pressure: Any, volume: Any, sigma_e: Any = None, sigma_f: Any = None
    ) -> ThermoFrame:
        epot, ekin = float(epot) + self.system.e0_total, float(ekin)
        nan = float("nan")
        return ThermoFrame(
            step=self.step,
            time_ps=self.step * self.config.timestep_fs / 1000.0,
            potential_energy=epot,
            kinetic_energy=ekin,
            temperature=self._temperature(ekin),
            conserved=self.conserved_quantity(state, epot, ekin),
            pressure=float(pressure) if self.system.periodic else float("nan"),
            volume=float(volume) if self.system.periodic else float("nan"),
            energy_uncertainty=float(sigma_e) if self.uncertain else nan,
            max_forces_uncertainty=float(sigma_f) if self.uncertain else nan,
        )

    def observe(self, state: Any) -> ThermoFrame:
        """The thermo frame of ``state`` at the current :attr:`step` without stepping (e.g. step 0).

        Raises:
          MDBlowUpError: a non-finite energy or position.
        """
        with _quiet_jax_md_sums():
            frame = self._frame(state, *self._observe(state, self.neighbor))
        if not (np.isfinite(frame.potential_energy) and np.isfinite(frame.kinetic_energy)):
            raise MDBlowUpError(f"non-finite energy at step {self.step}: E_pot={frame.potential_energy:.6g} eV")
        return frame

    def run_chunk(self, state: Any, n_steps: int | None = None) -> tuple[Any, ThermoFrame]:
        """Advance ``n_steps`` (default ``report_interval``) steps; re-run on neighbour-list overflow.

        Raises:
          MDBlowUpError: NaN/inf or temperature above the limit at the end of the chunk; the returned
            state is never a blown-up one (the caller keeps the previous state).
        """
        n = n_steps or self.config.report_interval
        start_state, start_neighbor = state, self.neighbor
        while True:
            with _quiet_jax_md_sums():
                min_offset = jnp.asarray(max(self.crossing_from_step - self.step, 0), jnp.int32)
                new_state, neighbor, epot, ekin, pressure, volume, max_edges, heat, unc = self._chunk(
                    start_state, start_neighbor, n, min_offset
                )
            if not bool(neighbor.did_buffer_overflow):
                if self.edge_capacity is None or int(max_edges) <= self.edge_capacity:
                    break
                old = self.edge_capacity
                self._bind(self._edge_capacity_for(int(max_edges)))
                self.reallocations += 1
                self.log(
                    f"edge overflow at step {self.step}: {int(max_edges)} pairs within r_max, edge capacity {old} -> "
                    f"{self.edge_capacity} (reallocation {self.reallocations}); re-running the chunk"
                )
                continue
            old = int(start_neighbor.idx.shape[-1])
            extra = max(1, int(np.ceil(0.5 * old / self.n_atoms)))
            start_neighbor = self.system.neighbor_fn.allocate(
                start_state.position, extra_capacity=extra, **self._space_kwargs(start_state)
            )
            self.reallocations += 1
            self.log(
                f"neighbour list overflow at step {self.step}: capacity {old} -> {int(start_neighbor.idx.shape[-1])}"
                f" (reallocation {self.reallocations}); re-running the chunk"
            )
        e_total, ke = float(epot) + self.system.e0_total, float(ekin)
        temperature = self._temperature(ke)
        finite = (
            np.isfinite(e_total)
            and np.isfinite(ke)
            and np.isfinite(float(heat))
            and bool(jnp.all(jnp.isfinite(new_state.position)))
        )
        if not finite or temperature > self.config.max_temperature_K:
            raise MDBlowUpError(
                f"simulation blew up between steps {self.step} and {self.step + n}: E_pot={e_total:.6g} eV, "
                f"T={temperature:.6g} K (limit {self.config.max_temperature_K:g} K)"
            )
        if self.npt:
            heights = cell_heights(self.cell(new_state))
            if 2.0 * self.system.r_max >= heights.min():
                raise MDBlowUpError(
                    f"the NPT box shrank below twice the cutoff between steps {self.step} and {self.step + n} "
                    f"(shortest cell height {heights.min():.3f} Å, r_max {self.system.r_max} Å): the minimum-image "
                    "neighbour list would miss images; start from a larger supercell"
                )
        self.neighbor = neighbor
        self.last_crossing = None
        sigma_e, sigma_max, cross_i = unc[0], unc[1], int(unc[2])
        if cross_i >= 0:
            _, _, _, atom, sigma, cross_sigma_e, pos = unc
            box = self.box(new_state)
            pos = np.asarray(pos @ box.T if self.system.fractional else pos, np.float64)
            self.last_crossing = UncertaintyCrossing(
                step=self.step + cross_i + 1,
                atom=int(atom),
                sigma=float(sigma),
                energy_uncertainty=float(cross_sigma_e),
                positions=pos,
                cell=self.cell(new_state),
            )
        self.step += n
        self.heat += float(heat)
        return new_state, self._frame(new_state, epot, ekin, pressure, volume, sigma_e, sigma_max)

    def positions(self, state: Any) -> np.ndarray:
        """Cartesian positions, Å (converted from fractional coordinates for NPT)."""
        if self.system.fractional:
            return np.asarray(state.position @ self.box(state).T, np.float64)
        return np.asarray(state.position, np.float64)

    def cell(self, state: Any) -> np.ndarray | None:
        """ASE cell (lattice vectors as rows), Å; None for free space."""
        box = self.box(state)
        return None if box is None else np.asarray(box, np.float64).T

    def velocities(self, state: Any) -> np.ndarray:
        """Å per ASE time unit."""
        return np.asarray(state.momentum / state.mass.reshape(-1, 1), np.float64)

    def forces(self, state: Any) -> np.ndarray:
        force = quantity.force(self.energy_fn)(state.position, self.neighbor, **self._space_kwargs(state))
        return np.asarray(force, np.float64)


def run_timed(engine: MDEngine, state: Any, n_chunks: int) -> tuple[Any, list[ThermoFrame], float]:
    """Run ``n_chunks`` chunks and return the final state, frames and wall time (s)."""
    frames = []
    t0 = time.perf_counter()
    for _ in range(n_chunks):
        state, frame = engine.run_chunk(state)
        frames.append(frame)
    return state, frames, time.perf_counter() - t0
