"""One call to run MD with a trained potential: set up, run in chunks, report, restart.

    from equiforce.md import run_md
    result = run_md("model.eqf", atoms, ensemble="nvt_langevin", temperature_K=300, timestep_fs=0.5,
                    steps=10_000, trajectory="traj.h5", thermo="thermo.csv")

Trajectory frames (H5MD, positions Å, velocities Å/ps) and thermo rows are written once per chunk of
``report_interval`` steps; the integrator's full state is stored with each frame so ``restart=True``
continues the run exactly from the last committed frame.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from equiforce.md.engine import MDBlowUpError, MDConfig, MDEngine, ThermoFrame
from equiforce.md.ensembles import get_ensemble
from equiforce.md.inputs import load_potential, load_structure
from equiforce.md.outputs import RunOutputs, energy_drift, read_restart_point, write_last_good
from equiforce.md.replicas import ReplicasResult, run_replicas
from equiforce.md.sharded import make_sharded_system
from equiforce.md.uncertainty_monitor import UncertaintyMonitor, uncertain_frames_path
from equiforce.potentials.potential import Potential
from equiforce.potentials.precision import enable_x64

__all__ = ["MDResult", "energy_drift", "load_potential", "load_structure", "run_md"]


@dataclasses.dataclass(frozen=True)
class MDResult:
    """Summary of a run.

    Attributes:
      frames: thermo frames of the starting structure (step 0; new runs only, not restarts) and at the end
        of every chunk.
      steps: steps run in this call (0 when a restart found the run already finished).
      wall_s: wall time of the stepping (compilation excluded: the first chunk is timed separately).
      first_chunk_s: wall time of the first chunk, compilation included.
      steps_per_s, ns_per_day: throughput after the first chunk.
      drift_meV_per_atom_per_ps: slope of the conserved quantity (NaN for Langevin).
      fluctuation_meV_per_atom: standard deviation of the conserved quantity around its linear fit.
      reallocations: neighbour-list reallocations.
      final_atoms: the last state as ``ase.Atoms`` (velocities set).
      uncertainty_events: the uncertainty crossings (step, time_ps, atom, max_forces_uncertainty eV/Å,
        energy_uncertainty eV), see :mod:`equiforce.md.uncertainty_monitor`.
      stopped_because: None for a run that ran its steps, else why it stopped early (the uncertainty
        threshold with ``uncertainty_action="stop"``, or ``time_limit_s``).
    """

    frames: list[ThermoFrame]
    steps: int
    wall_s: float
    first_chunk_s: float
    steps_per_s: float
    ns_per_day: float
    drift_meV_per_atom_per_ps: float
    fluctuation_meV_per_atom: float
    reallocations: int
    final_atoms: Any
    uncertainty_events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped_because: str | None = None


def run_md(
    model: str | Path | tuple[Potential, Any],
    atoms: Any,
    *,
    ensemble: str = "nvt_langevin",
    temperature_K: float | Sequence[float] = 300.0,
    timestep_fs: float = 0.5,
    steps: int = 1000,
    report_interval: int = 100,
    friction_per_ps: float | Sequence[float] = 1.0,
    thermostat_tau_fs: float | Sequence[float] | None = None,
    pressure_GPa: float = 0.0,
    barostat_tau_fs: float | None = None,
    skin: float = 1.0,
    seed: int | Sequence[int] = 0,
    trajectory: str | Path | None = None,
    thermo: str | Path | None = None,
    write_forces: bool = False,
    restart: bool = False,
    more_steps: int | None = None,
    progress: bool = True,
    max_temperature_K: float = 1.0e5,
    precision: str | None = None,
    uncertainty_threshold: float | None = None,
    uncertainty_action: str = "record",
    uncertainty_min_spacing: int = 100,
    uncertain_frames: str | Path | None = None,
    devices: int | str | None = None,
    time_limit_s: float | None = None,
    progress_log_s: float | None = None,
    fixed: Any = None,
    log: Callable[[str], None] | None = None,
) -> MDResult | ReplicasResult:
    """Run MD of ``atoms`` with a trained potential.

    Given a list of structures, runs them as replicas in one jit-compiled program sharded over the devices and
    returns a :class:`~equiforce.md.replicas.ReplicasResult` (see :func:`~equiforce.md.replicas.run_replicas`:
    ``temperature_K``, ``friction_per_ps``, ``thermostat_tau_fs`` and ``seed`` may then be given per replica,
    ``trajectory`` and ``thermo`` name one file per replica, ``devices`` is the number of devices the replicas
    are sharded over (``"all"`` or None: every device, at most one per replica), ``restart`` continues every
    replica; NPT and the uncertainty options are not supported).

    A new run writes the starting structure as frame 0 (step 0), then one frame per chunk of
    ``report_interval`` steps, to the trajectory and thermo files.

    Args:
      model: a model file path, or ``(potential, params)``.
      atoms: an ``ase.Atoms`` (or a spec for :func:`load_structure`); atoms outside the cell are wrapped.
        Velocities already set on ``atoms`` are used (zero total momentum is not enforced); otherwise
        Maxwell–Boltzmann at ``temperature_K``.
      ensemble: ``nve``, ``nvt_langevin``, ``nvt_nose_hoover`` or ``npt_nose_hoover`` (periodic only).
      temperature_K: initial temperature and thermostat target, K (see :class:`MDConfig`).
      timestep_fs: time step, fs.
      friction_per_ps: Langevin friction, 1/ps.
      thermostat_tau_fs: Nosé–Hoover time constant, fs (None: 100 time steps).
      pressure_GPa: NPT target pressure, GPa.
      barostat_tau_fs: NPT barostat time constant, fs (None: 1000 time steps).
      skin: neighbour-list skin, Å.
      seed: initial velocities and Langevin noise.
      steps: the run's total length in steps, counted from step 0 and rounded up to whole chunks of
        ``report_interval``. With ``restart=True`` the run continues *up to* this total (like GROMACS
        ``-cpi`` or LAMMPS ``run N upto``): re-issuing the command of a killed run finishes it, and
        re-issuing a finished run's command does nothing (it logs so and returns an empty result).
      report_interval: steps per jitted chunk = the interval of trajectory frames and thermo rows.
      trajectory: H5MD output (``.h5``); None: no trajectory.
      thermo: thermo CSV output; None: none.
      write_forces: also store the forces (eV/Å) in the trajectory.
      restart: continue from the restart state in ``trajectory`` exactly (from its last committed frame;
        frames and thermo rows written after it by a killed run are dropped, and HDF5's consistency flags
        left by the kill are cleared). Without a trajectory to continue (no file yet, or one a kill left
        before its first frame) the run starts from step 0, so a job script can always re-issue the same
        command.
      more_steps: with ``restart=True``, run this many steps beyond the stored step instead of up to
        ``steps`` (rounded up to whole chunks).
      progress: show a progress bar with ns/day and ETA.
      time_limit_s: a wall-clock limit, s, from the call (set-up and compilation included; one structure only):
        the run stops after the chunk past which the next one would end beyond it (at least two chunks run, so
        that a drift can be fitted), and ``MDResult.steps`` / ``stopped_because`` say how far it got; None: no
        limit.
      progress_log_s: also report progress through ``log``: after the first timed chunk, the expected wall time of
        the whole run (extrapolated from that chunk; with ``time_limit_s``, where the limit will stop it), then a
        line (step, steps/s, time left) at most every ``progress_log_s`` seconds; None: no such lines.
      precision: ``float32``, ``float64`` or ``mixed`` (float32 network; float64 positions, per-atom energy
        sums and integrator); default: the potential's dtype. ``float64`` and ``mixed`` (and a float64 model
        file) switch on JAX's 64-bit types (``jax_enable_x64``) if they are off and no JAX array exists yet;
        with arrays made already, a RuntimeError says to switch them on at start-up.
      uncertainty_threshold: σ_F in eV/Å (for a potential with an uncertainty; its σ_E and largest σ_F are
        computed at every step and written to the thermo log and trajectory). A step whose largest σ_F
        exceeds it is acted on as ``uncertainty_action`` says: ``record`` writes the configuration to
        ``uncertain_frames`` (default ``<trajectory or thermo stem>_uncertain.extxyz``; none without output
        files) at most once per ``uncertainty_min_spacing`` steps and per chunk; ``stop`` also ends the run
        after the chunk, keeping its trajectory frame (``MDResult.stopped_because`` names the step, atom and
        σ_F). See :mod:`equiforce.md.uncertainty_monitor`.
      uncertainty_action: ``record`` or ``stop`` (see ``uncertainty_threshold``).
      uncertainty_min_spacing: steps between two recorded configurations at least.
      uncertain_frames: extxyz file for the recorded configurations (default: see ``uncertainty_threshold``).
      max_temperature_K: above this temperature the run counts as blown up, K.
      devices: run this one structure over several devices: ``"all"`` or a count N; the network's edges and
        per-atom work are sharded over them and the neighbour sums reduced, so the per-device memory falls
        with N (see :mod:`equiforce.md.sharded`). None (default): one device. With a list of structures: the devices the
        replicas are sharded over.
      fixed: atoms held fixed in every ensemble (zero force and velocity: they never move; NPT: they keep their
        fractional coordinates and move with the box): atom indices or an ``[n_atoms]`` bool mask, united with
        an ``ase.constraints.FixAtoms`` on ``atoms`` (:func:`equiforce.md.constraints.fixed_mask`). The
        temperature and the thermostat target then count ``3 (N - n_fixed)`` degrees of freedom. With a list of
        structures: one entry per replica (see :func:`~equiforce.md.replicas.run_replicas`).
      log: receives progress messages (default: ``tqdm.write``, which keeps the progress bar intact).

    Returns:
      An :class:`MDResult`.

    Raises:
      MDBlowUpError: the run became unphysical; the trajectory up to the last good chunk is kept, the
        last good frame is attached as ``err.last_good_atoms`` and, when an output file was given, written
        to ``<trajectory or thermo stem>_last_good.extxyz``.
      DataError / UnknownSpeciesError: bad structure (see :func:`equiforce.md.system.check_structure`) or
        unreadable structure file.
      FileNotFoundError: a missing structure file.
      ConstraintError (a ValueError): a constraint other than ``FixAtoms`` on ``atoms``, bad ``fixed`` indices,
        or every atom fixed.
      ValueError: more ``devices`` than exist, ``more_steps`` without
        ``restart``, ``restart`` without ``trajectory``, a restart file
        written by another ensemble, an ``uncertainty_threshold`` that is not a finite number > 0 or is given
        for a potential without an uncertainty, an unknown ``uncertainty_action``.
    """
    log = log or tqdm.write
    t_call = time.perf_counter()  # time_limit_s counts from here: set-up and compilation included
    if isinstance(atoms, (list, tuple)):  # many replicas in one program
        given = {
            "pressure_GPa": pressure_GPa != 0.0,
            "barostat_tau_fs": barostat_tau_fs is not None,
            "uncertainty_threshold": uncertainty_threshold is not None,
            "uncertain_frames": uncertain_frames is not None,
            "time_limit_s": time_limit_s is not None,
            "progress_log_s": progress_log_s is not None,
        }
        if any(given.values()):
            raise ValueError(f"{[k for k, v in given.items() if v]} not supported with a list of structures (replicas)")
        return run_replicas(
            model,
            atoms,
            ensemble=ensemble,
            temperature_K=temperature_K,
            timestep_fs=timestep_fs,
            steps=steps,
            report_interval=report_interval,
            friction_per_ps=friction_per_ps,
            thermostat_tau_fs=thermostat_tau_fs,
            skin=skin,
            seed=seed,
            trajectory=trajectory,
            thermo=thermo,
            write_forces=write_forces,
            restart=restart,
            more_steps=more_steps,
            progress=progress,
            max_temperature_K=max_temperature_K,
            precision=precision,
            devices=None if devices == "all" else devices,
            fixed=fixed,
            log=log,
        )
    if more_steps is not None and not restart:
        raise ValueError("more_steps needs restart=True (a new run takes its length from steps)")
    potential, params = load_potential(model)
    if precision in ("float64", "mixed"):
        enable_x64(f"precision={precision!r}")
    if not hasattr(atoms, "get_positions"):
        atoms = load_structure(atoms)
    atoms = atoms.copy()
    if np.all(atoms.get_pbc()):
        atoms.wrap()
    config = MDConfig(
        ensemble=ensemble,
        timestep_fs=timestep_fs,
        temperature_K=temperature_K,
        friction_per_ps=friction_per_ps,
        thermostat_tau_fs=thermostat_tau_fs,
        pressure_GPa=pressure_GPa,
        barostat_tau_fs=barostat_tau_fs,
        report_interval=report_interval,
        skin=skin,
        max_temperature_K=max_temperature_K,
        seed=seed,
        uncertainty_threshold=uncertainty_threshold,
    )
    system = make_sharded_system(
        potential,
        params,
        atoms,
        devices=devices,
        skin=skin,
        fractional=not get_ensemble(ensemble).fixed_box,  # NPT: the box changes
        precision=precision,
        fixed=fixed,
    )
    if system.mesh is not None:
        log(f"sharding the network's edges and atoms ({len(atoms)} atoms) over {system.mesh.devices.size} devices")
    engine = MDEngine(system, config, log=log)
    monitor = None
    if uncertainty_threshold is not None:
        stem = trajectory or thermo
        path = uncertain_frames or (uncertain_frames_path(stem) if stem is not None else None)
        monitor = UncertaintyMonitor(
            atoms, uncertainty_action, uncertainty_min_spacing, None if path is None else Path(path), timestep_fs
        )
    velocities = atoms.get_velocities() if np.any(atoms.get_velocities()) else None
    state = engine.init(atoms.get_positions(), velocities)
    stored = read_restart_point(trajectory, log) if restart else None
    if stored is None:
        restart, more_steps = False, None  # a new run: its length is ``steps``
    else:
        state = engine.restore(state, *stored, source=trajectory)
        log(f"restarting from {trajectory} at step {engine.step}")
        if monitor is not None:
            monitor.resume(engine.step)
    target = int(np.ceil(steps / report_interval)) * report_interval
    if more_steps is not None:
        target = engine.step + int(np.ceil(more_steps / report_interval)) * report_interval
    n_chunks = max(0, int(np.ceil((target - engine.step) / report_interval)))
    if restart and n_chunks == 0:
        log(f"{trajectory} already holds step {engine.step} (requested {target}): nothing to do")
        return _result(engine, state, atoms, [], 0, float("nan"), float("nan"), timestep_fs)
    if not restart:
        n_chunks = max(n_chunks, 1)

    outputs = RunOutputs(
        trajectory=trajectory,
        thermo=thermo,
        atoms=atoms,
        periodic=system.periodic,
        write_forces=write_forces,
        frame_interval_ps=report_interval * timestep_fs / 1000.0,
        ensemble=ensemble,
        restart_step=engine.step if restart else None,
        uncertainty=engine.uncertain,
    )
    frames: list[ThermoFrame] = []
    bar = tqdm(total=n_chunks * report_interval, disable=not progress, unit="step", dynamic_ncols=True)
    t_first = t_start = time.perf_counter()
    first_chunk_s = float("nan")
    stopped = None
    pace = _Pace(n_chunks, report_interval, time_limit_s, progress_log_s, log)
    try:
        if not restart:
            frames.append(engine.observe(state))
            outputs.write(engine, state, frames[-1])
            t_first = t_start = time.perf_counter()
        for k in range(n_chunks):
            try:
                new_state, frame = engine.run_chunk(state)
            except MDBlowUpError as err:
                err.last_good_atoms = _last_good(engine, state, atoms)
                if trajectory is not None or thermo is not None:
                    path = write_last_good(err.last_good_atoms, trajectory or thermo)
                    engine.log(f"last good frame (step {engine.step}) written to {path}")
                raise
            state = new_state
            if k == 0:
                first_chunk_s = time.perf_counter() - t_first
                t_start = time.perf_counter()
            frames.append(frame)
            outputs.write(engine, state, frame)
            bar.update(report_interval)
            if k > 0:
                rate = k * report_interval / (time.perf_counter() - t_start)
                bar.set_postfix(T=f"{frame.temperature:.0f}K", ns_day=f"{rate * timestep_fs * 86400 / 1e6:.3g}")
            stopped = None if monitor is None else monitor.after_chunk(engine)
            if stopped is None and k > 0:
                stopped = pace.after_chunk(k, time.perf_counter() - t_call, time.perf_counter() - t_start)
            if stopped is not None:
                log(stopped)
                n_chunks = k + 1
                break
    finally:
        bar.close()
        outputs.close()

    wall = time.perf_counter() - t_start
    timed_steps = (n_chunks - 1) * report_interval
    steps_per_s = timed_steps / wall if timed_steps and wall > 0 else float("nan")
    result = _result(
        engine, state, atoms, frames, n_chunks * report_interval, wall, first_chunk_s, timestep_fs, steps_per_s
    )
    events = [] if monitor is None else monitor.events
    return dataclasses.replace(result, uncertainty_events=events, stopped_because=stopped)


class _Pace:
    """Progress lines and the wall-clock limit of :func:`run_md` (``progress_log_s``, ``time_limit_s``)."""

    def __init__(
        self,
        n_chunks: int,
        report_interval: int,
        time_limit_s: float | None,
        progress_log_s: float | None,
        log: Callable[[str], None],
    ) -> None:
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 (or None), got {time_limit_s}")
        if progress_log_s is not None and not progress_log_s > 0:
            raise ValueError(f"progress_log_s must be > 0 (or None), got {progress_log_s}")
        self.n_chunks, self.interval = n_chunks, report_interval
        self.limit, self.every, self.log = time_limit_s, progress_log_s, log
        self.last_line = 0.0

    def after_chunk(self, k: int, elapsed: float, timed: float) -> str | None:
        """After chunk ``k >= 1`` (``elapsed``: wall time since run_md was called, set-up and compilation included;
        ``timed``: since the end of the first chunk): log progress, and return why the run stops here (or None)."""
        per_chunk = timed / k
        done, total = (k + 1) * self.interval, self.n_chunks * self.interval
        left = (self.n_chunks - k - 1) * per_chunk
        rate = self.interval / per_chunk if per_chunk > 0 else float("inf")
        if self.every is not None and k == 1:
            line = f"MD: {total} steps expected to take {_duration(elapsed + left)} ({rate:.3g} steps/s after "
            line += f"{_duration(elapsed - per_chunk)} of set-up, compilation and a first chunk)"
            if self.limit is not None and elapsed + left > self.limit:
                fit = k + 1 + max(0, int((self.limit - elapsed) // per_chunk)) if per_chunk > 0 else self.n_chunks
                line += f"; the time limit of {_duration(self.limit)} stops it at about step {fit * self.interval}"
            self.log(line)
            self.last_line = elapsed
        elif self.every is not None and elapsed - self.last_line >= self.every and k + 1 < self.n_chunks:
            pct = 100 * done / total
            self.log(f"MD: step {done}/{total} ({pct:.0f} %), {rate:.3g} steps/s, {_duration(left)} left")
            self.last_line = elapsed
        if self.limit is not None and k + 1 < self.n_chunks and elapsed + per_chunk > self.limit:
            return (
                f"time limit of {_duration(self.limit)} reached: {done} of {total} steps run "
                f"({_duration(elapsed)}, {rate:.3g} steps/s)"
            )
        return None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _result(
    engine: MDEngine,
    state: Any,
    atoms: Any,
    frames: list[ThermoFrame],
    steps: int,
    wall: float,
    first_chunk_s: float,
    timestep_fs: float,
    steps_per_s: float = float("nan"),
) -> MDResult:
    drift, fluct = energy_drift(frames, len(atoms))
    return MDResult(
        frames=frames,
        steps=steps,
        wall_s=wall,
        first_chunk_s=first_chunk_s,
        steps_per_s=steps_per_s,
        ns_per_day=steps_per_s * timestep_fs * 86400.0 / 1e6,
        drift_meV_per_atom_per_ps=drift,
        fluctuation_meV_per_atom=fluct,
        reallocations=engine.reallocations,
        final_atoms=_last_good(engine, state, atoms),
    )


def _last_good(engine: MDEngine, state: Any, atoms: Any) -> Any:
    good = atoms.copy()
    if engine.cell(state) is not None:
        good.set_cell(engine.cell(state))
    good.set_positions(engine.positions(state))
    good.set_velocities(engine.velocities(state))
    return good
