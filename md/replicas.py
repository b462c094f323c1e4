"""Many MD replicas in one jit-compiled program, sharded over the devices: the run, its files and restart.

    from equiforce.md import run_replicas
    result = run_replicas("model.eqf", [atoms_a, atoms_b, atoms_c], ensemble="nvt_langevin",
                          temperature_K=[300, 350, 400], seed=[0, 1, 2], steps=10_000,
                          trajectory="out/traj_{replica}.h5", thermo="out/thermo_{replica}.csv")
    # killed? the same call with restart=True continues every replica from its last written frame
    result = run_replicas(..., restart=True)

:func:`equiforce.md.run_md` given a list of structures calls :func:`run_replicas`; ``equiforce md MODEL A B C``
does too. The pieces: :mod:`equiforce.md.replica_inputs` (checks, per-replica settings, output paths),
:mod:`equiforce.md.replica_engine` (the engine: layout, padding, sharding, chunks; read its docstring), and
this module (the run loop, the files of each replica, restart, the result).

Each replica is what ``run_md(model, structures[k], seed=seed_k, temperature_K=T_k, ...)`` computes, to
rounding; a replica that blows up stops alone (its trajectory keeps its good frames, its last good frame goes
to ``<stem>_last_good.extxyz`` and its restart state records why it stopped); a neighbour-list overflow
re-runs the chunk of all replicas, losing nothing.

Restart: every replica's trajectory stores its integrator state with each frame, as :func:`run_md`'s does. A
restart reads each replica's last committed frame, drops rows and frames a kill left after it, continues
every replica from there (replicas stored at different steps, as a kill between two replicas' writes leaves
them, catch up first) and runs up to ``steps`` in total (or ``more_steps`` more). A replica that had stopped
stays stopped. The continued trajectories equal the uninterrupted ones to rounding.

Supported: non-periodic structures, or periodic ones, each with its own fixed cell (all replicas of a run
alike); ensembles ``nve``, ``nvt_langevin`` (per-replica temperature, friction and seed) and
``nvt_nose_hoover`` (per-replica temperature and chain time constant); precisions ``float32``, ``float64``,
``mixed``; restart. Not supported (a ``ValueError`` says so): NPT (each replica's box would change:
run those with :func:`run_md`), uncertainty monitoring.

Units are those of :mod:`equiforce.md.engine`: Å, eV, amu, fs / ps, K.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from equiforce.md.engine import ThermoFrame
from equiforce.md.inputs import load_potential
from equiforce.md.outputs import RunOutputs, energy_drift, read_restart_point, restore_state, write_last_good
from equiforce.md.replica_engine import ReplicaEngine
from equiforce.md.replica_inputs import (
    REPLICA_ENSEMBLES,
    check_replicas,
    load_replica_structures,
    replica_paths,
    resolve_replica_devices,
)
from equiforce.potentials.potential import Potential
from equiforce.potentials.precision import enable_x64

__all__ = [
    "REPLICA_ENSEMBLES",
    "ReplicaEngine",
    "ReplicaResult",
    "ReplicasResult",
    "check_replicas",
    "replica_paths",
    "resolve_replica_devices",
    "run_replicas",
]


@dataclasses.dataclass(frozen=True)
class ReplicaResult:
    """One replica of a :func:`run_replicas` run.

    Attributes:
      index: the replica's position in the list of structures.
      n_atoms: its number of atoms.
      frames: its thermo frames of this call (step 0 for a new run, then one per chunk it completed);
        energies eV, T in K, pressure eV/Å³ and volume Å³ for periodic replicas.
      steps: the step of its last good state (for a stopped replica, that of its last frame).
      final_atoms: its last good state as ``ase.Atoms`` (velocities set).
      stopped_because: None if it is still running (or ran all its steps), else why it stopped (step,
        energy, temperature); kept across restarts.
      drift_meV_per_atom_per_ps, fluctuation_meV_per_atom: of its conserved quantity over ``frames`` (see
        :func:`equiforce.md.outputs.energy_drift`).
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
      steps: the step every replica was to reach (``steps`` rounded up to whole chunks, or the restart's
        step plus ``more_steps``).
      wall_s: wall time of the stepping after the first chunk, s.
      first_chunk_s: wall time of the first chunk, compilation included, s.
      atom_steps_per_s: atoms × steps of the moving replicas per second after the first chunk.
      steps_per_s: chunks' steps per second after the first chunk (each advances every moving replica).
      reallocations: neighbour-list reallocations (each re-ran one chunk of all replicas).
      n_devices: devices the replica axis was sharded over.
      padded_atoms: the static atom budget ``N`` every replica was padded to.
      restarted_from: None for a new run, else each replica's step when the restart read it.
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
    restarted_from: list[int] | None = None


class _ReplicaView:
    """What :class:`~equiforce.md.outputs.RunOutputs` asks of an engine, for one replica's cut state."""

    def __init__(self, heat: float, cell: np.ndarray | None) -> None:
        self.heat = heat
        self._cell = cell

    def positions(self, state: Any) -> np.ndarray:
        return np.asarray(state.position, np.float64)

    def velocities(self, state: Any) -> np.ndarray:
        return np.asarray(state.momentum / state.mass.reshape(-1, 1), np.float64)

    def cell(self, state: Any) -> np.ndarray | None:
        return self._cell

    def forces(self, state: Any) -> np.ndarray:
        return np.asarray(state.force, np.float64)  # the force of the state's last step, at its positions


def _view(engine: ReplicaEngine, i: int) -> _ReplicaView:
    return _ReplicaView(float(engine.heat[i]), engine.cells[i] if engine.periodic else None)


def _read_restart_points(
    paths: list[Path | None], log: Callable[[str], None]
) -> list[tuple[dict[str, np.ndarray], dict[str, Any]] | None] | None:
    """Each replica's stored restart state (None for one without a committed frame), or None when no replica
    has one (a new run)."""

    if any(p is None for p in paths):
        raise ValueError("restart=True needs the trajectory files of the run to continue (trajectory=...)")
    stored = [read_restart_point(p, log) for p in paths]
    return None if all(s is None for s in stored) else stored


def _resume(
    engine: ReplicaEngine,
    state: Any,
    stored: list[tuple[dict[str, np.ndarray], dict[str, Any]] | None],
    paths: list[Path | None],
    ensemble: str,
    log: Callable[[str], None],
) -> Any:
    """Put every stored replica's state, step, bath heat and stop reason back into ``engine``/``state``."""
    host = jax.device_get(state)
    replicas = {}
    for i, point in enumerate(stored):
        if point is None:
            log(f"restart: replica {i} has no committed frame in {paths[i]}; it starts from step 0")
            continue
        arrays, meta = point
        if meta.get("ensemble") != ensemble:
            raise ValueError(f"replica {i}: {paths[i]} was written by a {meta.get('ensemble')} run, not {ensemble}")
        try:
            cut = restore_state(engine.replica_state(host, i), arrays)
        except ValueError as err:
            raise ValueError(f"replica {i}: {paths[i]} does not fit this structure ({err})") from err
        replicas[i] = (cut, int(meta["step"]), float(meta.get("heat_eV", 0.0)), meta.get("stopped_because"))
    state = engine.restore(state, replicas)
    steps = {int(engine.steps[i]) for i in replicas if engine.alive[i]}
    stopped = [i for i in replicas if not engine.alive[i]]
    log(
        f"restarting {len(replicas)} replicas at step(s) {sorted(steps)}"
        + (f"; replica(s) {stopped} had stopped and stay stopped" if stopped else "")
    )
    return state


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
    thermostat_tau_fs: float | Sequence[float] | None = None,
    skin: float = 1.0,
    seed: int | Sequence[int] = 0,
    trajectory: str | Path | Sequence[str | Path] | None = None,
    thermo: str | Path | Sequence[str | Path] | None = None,
    write_forces: bool = False,
    restart: bool = False,
    more_steps: int | None = None,
    progress: bool = True,
    max_temperature_K: float = 1.0e5,
    precision: str | None = None,
    devices: int | Sequence[Any] | None = None,
    capacity_multiplier: float = 1.25,
    fixed: Sequence[Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> ReplicasResult:
    """Run MD of K structures together in one jit-compiled program, sharded over the devices.

    Each replica is what ``run_md(model, structures[k], seed=seed_k, temperature_K=T_k, ...)`` would
    compute (to rounding), but all advance in the same program (see :mod:`equiforce.md.replica_engine` for
    the layout). A replica that blows up stops alone; a neighbour-list overflow re-runs the chunk of all
    replicas, losing nothing.

    Args:
      model: a model file path, or ``(potential, params)``.
      structures: K ``ase.Atoms`` or specs (see :func:`~equiforce.md.replica_inputs.load_replica_structures`:
        ``path``, ``path@K``, ``sample:...``, or ``path@:`` for one replica per frame); all non-periodic or
        all fully periodic (each its own fixed cell; atoms outside it are wrapped); sizes may differ.
        Velocities already set on a structure are used (else Maxwell–Boltzmann).
      ensemble: ``nve``, ``nvt_langevin`` or ``nvt_nose_hoover``.
      temperature_K: initial temperature and thermostat target, K: one value or one per replica.
      timestep_fs: time step, fs (shared).
      steps: the run's total length per replica in steps from step 0, rounded up to whole chunks of
        ``report_interval``; with ``restart`` the run continues up to it (re-issuing a finished run's call
        does nothing).
      report_interval: steps per chunk = interval of trajectory frames and thermo rows.
      friction_per_ps: Langevin friction, 1/ps: one value or one per replica.
      thermostat_tau_fs: Nosé–Hoover chain time constant, fs (None: 100 time steps): one value or one per
        replica.
      skin: neighbour-list skin, Å.
      seed: an int ``s`` (replica ``k`` gets ``s + k``) or one int per replica.
      trajectory: H5MD output per replica (see :func:`~equiforce.md.replica_inputs.replica_paths`; frames as
        :func:`run_md` writes them, box and pressure for periodic replicas, with each replica's restart
        state); None: none.
      thermo: thermo CSV per replica (see :func:`~equiforce.md.replica_inputs.replica_paths`); None: none.
      write_forces: also store forces (eV/Å) in the trajectories.
      restart: continue the run stored in ``trajectory`` (see the module docstring); without any committed
        frame to continue, a new run starts (so a job script can always re-issue the same call).
      more_steps: with ``restart``, run this many steps beyond the restart's step instead of up to
        ``steps``.
      progress: show a progress bar.
      max_temperature_K: a replica above this temperature is stopped, K.
      precision: ``float32``, ``float64`` or ``mixed`` (default the potential's dtype); ``float64`` and
        ``mixed`` switch on JAX's 64-bit types.
      devices: None (all devices, at most one per replica), a count, or a list of devices.
      capacity_multiplier: neighbour-list head-room.
      fixed: atoms held fixed (zero force and velocity; they never move), united with each structure's
        ``ase.constraints.FixAtoms``: None, or one entry per replica (None, atom indices or an ``[n_k]`` bool
        mask). The temperature is then counted over ``3 (n_k - n_fixed)`` degrees of freedom.
      log: receives messages (default ``tqdm.write``).

    Returns:
      A :class:`ReplicasResult`; ``result.replicas[k].stopped_because`` says why replica ``k`` stopped early
      (its trajectory keeps its good frames and, with an output file, its last good frame is written to
      ``<trajectory or thermo stem>_last_good.extxyz``).

    Raises:
      UnknownSpeciesError: a replica holds an element the model does not know (names the replica and the
        element); raised before anything runs or any file is written.
      DataError: a bad structure (names the replica; a cell too small for the cutoff, partial periodicity,
        overlapping atoms, ...) or an unreadable structure file.
      FileNotFoundError: a missing structure file.
      ValueError: an unsupported ensemble (NPT), periodic and non-periodic replicas mixed, per-replica
        settings or output paths of the wrong length, more devices than exist, ``restart`` without
        ``trajectory``, ``more_steps`` without ``restart``, a restart file of another ensemble or structure
        (naming the replica); a ``fixed`` of the wrong length. ConstraintError (a ValueError): a constraint
        other than ``FixAtoms``, bad fixed indices, or every atom of a replica fixed (naming the replica).
    """

    log = log or tqdm.write
    if more_steps is not None and not restart:
        raise ValueError("more_steps needs restart=True (a new run takes its length from steps)")
    potential, params = load_potential(model)
    if precision in ("float64", "mixed"):
        enable_x64(f"precision={precision!r}")
    structures = load_replica_structures(structures)
    engine = ReplicaEngine(
        potential,
        params,
        structures,
        ensemble=ensemble,
        timestep_fs=timestep_fs,
        temperature_K=temperature_K,
        friction_per_ps=friction_per_ps,
        thermostat_tau_fs=thermostat_tau_fs,
        seed=seed,
        report_interval=report_interval,
        skin=skin,
        capacity_multiplier=capacity_multiplier,
        max_temperature_K=max_temperature_K,
        precision=precision,
        devices=devices,
        fixed=fixed,
        log=log,
    )
    k = len(structures)
    traj_paths, thermo_paths = replica_paths(trajectory, k), replica_paths(thermo, k)
    stored = _read_restart_points(traj_paths, log) if restart else None
    velocities = [a.get_velocities() if np.any(a.get_velocities()) else None for a in structures]
    state = engine.init(velocities)
    fresh = [True] * k  # replicas that start at step 0 (write frame 0, new files)
    if stored is not None:
        state = _resume(engine, state, stored, traj_paths, ensemble, log)
        fresh = [s is None for s in stored]
    restarted_from = None if stored is None else [int(s) for s in engine.steps]
    target = int(np.ceil(steps / report_interval)) * report_interval
    if more_steps is not None and stored is not None:
        target = engine.step + int(np.ceil(more_steps / report_interval)) * report_interval
    if stored is None:
        target = max(target, report_interval)
    log(
        f"{k} {'periodic ' if engine.periodic else ''}replicas ({min(engine.n_atoms)}-{engine.N} atoms, padded to "
        f"{engine.N}) on {engine.n_devices} device(s), neighbour capacity {engine.capacity} pairs per replica"
    )
    if stored is not None and not (engine.alive & (engine.steps < target)).any():
        log(f"every running replica already holds step {target} or later: nothing to do")
    frames: list[list[ThermoFrame]] = [[] for _ in range(k)]
    last_good: list[Any] = [None] * k
    written: list[tuple[Any, ThermoFrame] | None] = [None] * k  # the last written (cut state, frame)
    outputs: list[RunOutputs | None] = [None] * k
    chunks_left = int(np.sum(np.maximum(target - engine.steps[engine.alive], 0))) // report_interval
    bar = tqdm(total=chunks_left * report_interval, disable=not progress, unit="step", dynamic_ncols=True)
    first_chunk_s, atom_steps, steps_timed, chunks_done = float("nan"), 0, 0, 0
    t_start = time.perf_counter()
    try:
        for i in range(k):
            if traj_paths[i] is not None or thermo_paths[i] is not None:
                outputs[i] = RunOutputs(
                    trajectory=traj_paths[i],
                    thermo=thermo_paths[i],
                    atoms=structures[i],
                    periodic=engine.periodic,
                    write_forces=write_forces,
                    frame_interval_ps=report_interval * timestep_fs / 1000.0,
                    ensemble=ensemble,
                    restart_step=None if fresh[i] else int(engine.steps[i]),
                )
        host = jax.device_get(state)
        for i, frame in enumerate(engine.observe(state)):
            last_good[i] = engine.atoms(host, i)
            if frame is not None and fresh[i]:
                frames[i].append(frame)
                if outputs[i] is not None:
                    cut = engine.replica_state(host, i)
                    outputs[i].write(_view(engine, i), cut, frame)
                    written[i] = (cut, frame)
        t_first = t_start = time.perf_counter()
        while engine.alive.any() and engine.step < target:
            moving = engine.alive & (engine.steps == engine.step)
            moving_atoms = int(np.sum(np.asarray(engine.n_atoms)[moving]))
            state, chunk_frames, stopped = engine.run_chunk(state)
            host = jax.device_get(state)
            if chunks_done == 0:
                first_chunk_s = time.perf_counter() - t_first
                t_start = time.perf_counter()
            else:
                atom_steps += moving_atoms * report_interval
                steps_timed += report_interval
            chunks_done += 1
            for i in range(k):
                if chunk_frames[i] is not None:
                    frames[i].append(chunk_frames[i])
                    last_good[i] = engine.atoms(host, i)
                    if outputs[i] is not None:
                        cut = engine.replica_state(host, i)
                        outputs[i].write(_view(engine, i), cut, chunk_frames[i])
                        written[i] = (cut, chunk_frames[i])
                if stopped[i] is not None:
                    log(stopped[i])
                    if outputs[i] is not None and written[i] is not None:  # a restart keeps it stopped
                        outputs[i].write_restart(_view(engine, i), *written[i], stopped_because=stopped[i])
                    stem = traj_paths[i] or thermo_paths[i]
                    if stem is not None:
                        log(f"last good frame written to {write_last_good(last_good[i], stem)}")
            bar.update(int(np.sum(moving)) * report_interval)
            if not any(f is not None or r is not None for f, r in zip(chunk_frames, stopped, strict=True)):
                raise RuntimeError(f"no replica moved in the chunk at step {engine.step} (a bug)")
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
                steps=int(engine.steps[i]),
                final_atoms=last_good[i],
                stopped_because=engine.stop_reasons[i],
                drift_meV_per_atom_per_ps=drift,
                fluctuation_meV_per_atom=fluct,
            )
        )
    return ReplicasResult(
        replicas=results,
        steps=target,
        wall_s=wall,
        first_chunk_s=first_chunk_s,
        atom_steps_per_s=atom_steps / wall if steps_timed and wall > 0 else float("nan"),
        steps_per_s=steps_timed / wall if steps_timed and wall > 0 else float("nan"),
        reallocations=engine.reallocations,
        n_devices=engine.n_devices,
        padded_atoms=engine.N,
        restarted_from=restarted_from,
    )
