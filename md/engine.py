"""The jit-compiled MD loop: jax-md integrators in chunks, overflow re-runs and blow-up detection.

Each chunk of ``report_interval`` steps runs inside one jitted ``lax.fori_loop`` with the neighbour list
updated (and rebuilt when atoms moved more than half the skin) inside the loop; nothing leaves the
device until the chunk ends. Then the host checks

* the neighbour-list overflow flag: on overflow the list is reallocated with more capacity (at least
  1.5x, geometric) and the *same* chunk is re-run from its saved start state, so no pair is ever dropped
  and no step is lost; every reallocation is logged and counted;
* blow-up: NaN/inf positions or energies, or a temperature above ``max_temperature_K``, stop the run with
  :class:`MDBlowUpError`; the last good frame is kept (and written out by :func:`run_md`).

Units are ASE's: Å, eV, amu, time in ASE units internally (``timestep_fs * ase.units.fs``), reported in
ps; temperatures in K (kT in eV inside).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import units
from jax_md import quantity, simulate

from equiforce.md.system import MDSystem, cell_heights

__all__ = ["ENSEMBLES", "MDBlowUpError", "MDConfig", "MDEngine", "ThermoFrame"]

logger = logging.getLogger(__name__)

ENSEMBLES = ("nve", "nvt_langevin", "nvt_nose_hoover", "npt_nose_hoover")


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

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if not self.timestep_fs > 0 or self.report_interval < 1 or self.temperature_K < 0 or self.skin < 0:
            raise ValueError("timestep_fs > 0, report_interval >= 1, temperature_K >= 0 and skin >= 0 required")
        if not self.edge_capacity_multiplier >= 1.0:
            raise ValueError(f"edge_capacity_multiplier must be >= 1, got {self.edge_capacity_multiplier}")


@dataclasses.dataclass(frozen=True)
class ThermoFrame:
    """Observables at the end of a chunk (host side, float64): energies eV, temperature K,
    pressure eV/Å³ (instantaneous, kinetic part included; NaN when not periodic), volume Å³."""

    step: int
    time_ps: float
    potential_energy: float
    kinetic_energy: float
    temperature: float
    conserved: float
    pressure: float = float("nan")
    volume: float = float("nan")


def _kinetic_energy(momentum: jnp.ndarray, mass: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * jnp.sum(momentum**2 / mass[:, None])


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
        self.npt = config.ensemble == "npt_nose_hoover"
        self.pressure = config.pressure_GPa * units.GPa
        self.reallocations = 0
        self.step = 0
        self.neighbor = None
        self.edge_capacity: int | None = None  # set by init() when config.compact_edges
        self._bind(None)

    def _bind(self, edge_capacity: int | None) -> None:
        """(Re)build the jax-md integrator and the jitted chunk for an edge capacity (a static shape)."""
        config, system = self.config, self.system
        self.edge_capacity = edge_capacity
        self.energy_fn = partial(system.energy_fn, edge_capacity=edge_capacity)
        # Outside NPT the integrators get a force function that also records the potential energy of its
        # (single) call per step, so the chunk reports the energy at its last step without a separate energy
        # evaluation (and its compilation). NPT differentiates the energy with respect to the box as well.
        self._recorded: dict[str, jnp.ndarray] = {}
        energy_fn = self.energy_fn if self.npt else self._recording_force_fn(self.energy_fn)
        if config.ensemble == "nve":
            self._init_fn, self._apply_fn = simulate.nve(energy_fn, system.shift_fn, self.dt)
        elif config.ensemble == "nvt_langevin":
            gamma = config.friction_per_ps / (1000.0 * units.fs)
            self._init_fn, self._apply_fn = simulate.nvt_langevin(
                energy_fn, system.shift_fn, self.dt, self.kT, gamma=gamma
            )
        elif config.ensemble == "nvt_nose_hoover":
            tau = (config.thermostat_tau_fs or 100.0 * config.timestep_fs) * units.fs
            self._init_fn, self._apply_fn = simulate.nvt_nose_hoover(
                energy_fn, system.shift_fn, self.dt, self.kT, tau=tau
            )
        else:
            if not system.fractional:
                raise ValueError("NPT needs a periodic system built with make_system(..., fractional=True)")
            tau_t = (config.thermostat_tau_fs or 100.0 * config.timestep_fs) * units.fs
            tau_b = (config.barostat_tau_fs or 1000.0 * config.timestep_fs) * units.fs
            self._init_fn, self._apply_fn = simulate.npt_nose_hoover(
                energy_fn,
                system.shift_fn,
                self.dt,
                self.pressure,
                self.kT,
                barostat_kwargs={"tau": tau_b},
                thermostat_kwargs={"tau": tau_t},
            )
        # the integrator step traced inline (jax-md jits its step functions), so the recorded energy belongs to
        # the chunk's own trace
        self._step_fn = getattr(self._apply_fn, "__wrapped__", None)
        self._chunk = jax.jit(self._chunk_impl, static_argnums=(2,))

    def _recording_force_fn(self, energy_fn: Callable[..., jnp.ndarray]) -> Callable[..., jnp.ndarray]:
        # jitted, so the model is traced once per shape: jax-md's energy-or-force check (eval_shape), the
        # initial force and the chunk's loop body reuse that trace (tracing NequIP takes seconds)
        value_and_grad = jax.jit(jax.value_and_grad(energy_fn))

        def force_fn(position: jnp.ndarray, **kwargs: Any) -> jnp.ndarray:
            energy, grad = value_and_grad(position, **kwargs)
            self._recorded["energy"] = energy
            return -grad

        return force_fn

    # ------------------------------------------------------------------ state
    def init(self, positions: np.ndarray, velocities: np.ndarray | None = None) -> Any:
        """Initial integrator state at ``positions`` (Å).

        Velocities (Å per ASE time unit) are drawn from Maxwell–Boltzmann at ``temperature_K`` with the
        seed, with zero total momentum, unless given.
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
        if self.npt:
            state = self._init_fn(key, pos, box, mass=self.system.masses, kT=self.kT, neighbor=self.neighbor)
        else:
            state = self._init_fn(key, pos, kT=self.kT, mass=self.system.masses, neighbor=self.neighbor)
        if velocities is not None:
            momentum = jnp.asarray(velocities, self.system.dtype) * self.system.masses[:, None]
        else:
            # jax-md draws MB momenta; remove the centre-of-mass motion and rescale to the exact temperature
            momentum = state.momentum - jnp.mean(state.momentum, axis=0)
            dof = max(3 * self.n_atoms - 3, 1)
            ke = _kinetic_energy(momentum, self.system.masses)
            target = 0.5 * dof * self.kT
            momentum = jnp.where(ke > 0, momentum * jnp.sqrt(target / jnp.maximum(ke, 1e-30)), momentum)
        return dataclasses.replace(state, momentum=momentum.astype(self.system.dtype))

    # ------------------------------------------------------------------ chunks
    def box(self, state: Any) -> jnp.ndarray | None:
        """The current jax-md box (lattice vectors as columns), None for free space."""
        return simulate.npt_box(state) if self.npt else self.system.box

    def _space_kwargs(self, state: Any) -> dict[str, Any]:
        return {"box": simulate.npt_box(state)} if self.npt else {}

    def _edge_capacity_for(self, count: int) -> int:
        return max(int(np.ceil(count * self.config.edge_capacity_multiplier)), count + 8)

    def _chunk_impl(self, state: Any, neighbor: Any, n_steps: int):
        recorded = not self.npt and self._step_fn is not None

        def body(_, carry):
            state, neighbor, max_edges, epot = carry
            if recorded:
                state = self._step_fn(state, neighbor=neighbor)
                epot = self._recorded.pop("energy")  # at the new positions, from this step's force call
            else:
                state = self._apply_fn(state, neighbor=neighbor)
            space = self._space_kwargs(state)
            # the pairs the force call of this step saw (within r_max, so the same in the old and new list)
            max_edges = jnp.maximum(max_edges, self.system.edge_count(state.position, neighbor, **space))
            neighbor = neighbor.update(state.position, **space)
            return state, neighbor, max_edges, epot

        # the energy has the dtype of the positions (float64 in mixed precision too)
        carry = (state, neighbor, jnp.zeros((), jnp.int32), jnp.zeros((), state.position.dtype))
        state, neighbor, max_edges, epot = jax.lax.fori_loop(0, n_steps, body, carry)
        kw = self._space_kwargs(state)
        if not recorded:
            epot = self.energy_fn(state.position, neighbor, **kw)
        ekin = _kinetic_energy(state.momentum, state.mass.reshape(-1))
        if self.system.periodic:
            box = self.box(state)
            energy_at_box = partial(self.energy_fn, **kw)  # NPT: the current box goes to the energy
            pressure = quantity.pressure(energy_at_box, state.position, box, ekin, neighbor=neighbor)
            volume = jnp.abs(jnp.linalg.det(box))
        else:
            pressure = volume = jnp.zeros((), epot.dtype)  # set to NaN on the host (no NaN inside jit)
        return state, neighbor, epot, ekin, pressure, volume, max_edges

    def _temperature(self, ekin: float) -> float:
        dof = max(3 * self.n_atoms - 3, 1)
        return 2.0 * ekin / (dof * units.kB)

    def conserved_quantity(self, state: Any, epot: float, ekin: float) -> float:
        """Total energy (NVE) or the thermostat's conserved quantity (Nosé–Hoover), eV; NaN for Langevin."""
        if self.config.ensemble == "nve":
            return epot + ekin
        if self.config.ensemble == "nvt_nose_hoover":
            invariant = simulate.nvt_nose_hoover_invariant(self.energy_fn, state, self.kT, neighbor=self.neighbor)
            return float(invariant) + self.system.e0_total
        if self.npt:
            invariant = simulate.npt_nose_hoover_invariant(
                self.energy_fn, state, self.pressure, self.kT, neighbor=self.neighbor
            )
            return float(invariant) + self.system.e0_total
        return float("nan")

    def run_chunk(self, state: Any, n_steps: int | None = None) -> tuple[Any, ThermoFrame]:
        """Advance ``n_steps`` (default ``report_interval``) steps; re-run on neighbour-list overflow.

        Raises:
          MDBlowUpError: NaN/inf or temperature above the limit at the end of the chunk; the returned
            state is never a blown-up one (the caller keeps the previous state).
        """
        n = n_steps or self.config.report_interval
        start_state, start_neighbor = state, self.neighbor
        while True:
            new_state, neighbor, epot, ekin, pressure, volume, max_edges = self._chunk(start_state, start_neighbor, n)
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
        epot, ekin = float(epot) + self.system.e0_total, float(ekin)
        temperature = self._temperature(ekin)
        finite = np.isfinite(epot) and np.isfinite(ekin) and bool(jnp.all(jnp.isfinite(new_state.position)))
        if not finite or temperature > self.config.max_temperature_K:
            raise MDBlowUpError(
                f"simulation blew up between steps {self.step} and {self.step + n}: E_pot={epot:.6g} eV, "
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
        self.step += n
        frame = ThermoFrame(
            step=self.step,
            time_ps=self.step * self.config.timestep_fs / 1000.0,
            potential_energy=epot,
            kinetic_energy=ekin,
            temperature=temperature,
            conserved=self.conserved_quantity(new_state, epot, ekin),
            pressure=float(pressure) if self.system.periodic else float("nan"),
            volume=float(volume) if self.system.periodic else float("nan"),
        )
        return new_state, frame

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
