"""The files of one MD run: H5MD trajectory (with its restart state) and thermo CSV, written per frame.

:class:`RunOutputs` owns both writers for :func:`equiforce.md.run.run_md`. Per frame it writes, in this
order, the thermo row, the trajectory frame, then the restart state; a kill between any two leaves
rows/frames after the last restart state, and a restart (a :class:`RunOutputs` made with
``restart_step``) drops exactly those, so the files never hold a duplicated or missing frame.

Units (see :mod:`equiforce.data.h5md`): positions Å, velocities Å/ps (ASE velocities ×
:data:`~equiforce.data.h5md.ASE_VELOCITY_TO_A_PER_PS`), forces eV/Å, energies eV, pressure eV/Å³
in H5MD and GPa in the CSV, time ps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.atomic import atomic_path
from equiforce.data.errors import DataError
from equiforce.data.h5md import (
    ASE_VELOCITY_TO_A_PER_PS,
    H5MDWriter,
    NoRestartStateError,
    clear_stale_write_flags,
    read_h5md,
    read_restart_state,
)
from equiforce.md.engine import MDEngine, ThermoFrame
from equiforce.md.ensembles import restore_state, state_arrays
from equiforce.md.reporters import ThermoLog

__all__ = ["RunOutputs", "energy_drift", "read_restart_point", "restore_state", "state_arrays"]


def write_last_good(atoms: Any, stem: str | Path) -> Path:
    """Write a blown-up run's last good frame (``ase.Atoms``) to ``<stem>_last_good.extxyz`` beside ``stem`` (a
    trajectory or thermo path) and return that path."""
    import ase.io

    path = Path(stem).with_name(Path(stem).stem + "_last_good.extxyz")
    with atomic_path(path) as tmp:
        ase.io.write(tmp, atoms, format="extxyz")
    return path


class RunOutputs:
    """Trajectory (H5MD) and thermo (CSV) of one run; either may be None.

    Args:
      trajectory, thermo: output paths or None.
      atoms: the run's ``ase.Atoms`` (species, masses, pbc).
      periodic: write box, pressure and volume.
      write_forces: store forces in the trajectory.
      frame_interval_ps: time between frames (``report_interval × timestep``), stored as the H5MD
        observable ``dt`` so that MDAnalysis reads the time step.
      ensemble: stored in the restart meta (a restart checks it).
      restart_step: None for a new run (files overwritten); else continue the files, dropping frames
        and rows after this step.
      uncertainty: write σ_E and the largest σ_F of each frame (thermo columns ``energy_uncertainty_eV``,
        ``max_forces_uncertainty_eV_per_A``; H5MD observables ``energy_uncertainty``,
        ``max_forces_uncertainty``).
    """

    def __init__(
        self,
        *,
        trajectory: str | Path | None,
        thermo: str | Path | None,
        atoms: Any,
        periodic: bool,
        write_forces: bool,
        frame_interval_ps: float,
        ensemble: str,
        restart_step: int | None = None,
        uncertainty: bool = False,
    ) -> None:
        self.periodic = periodic
        self.uncertainty = uncertainty
        self.write_forces = write_forces
        self.frame_interval_ps = float(frame_interval_ps)
        self.ensemble = ensemble
        self.writer: H5MDWriter | None = None
        self.thermo_log: ThermoLog | None = None
        restart = restart_step is not None
        try:
            if trajectory is not None:
                obs = ("potential_energy", "kinetic_energy", "total_energy", "temperature", "conserved_energy", "dt")
                if periodic:
                    obs = (*obs, "pressure", "volume")
                if uncertainty:
                    obs = (*obs, "energy_uncertainty", "max_forces_uncertainty")
                self.writer = H5MDWriter(
                    trajectory,
                    atoms.get_atomic_numbers(),
                    atoms.get_masses(),
                    atoms.get_pbc(),
                    forces=write_forces,
                    observables=obs,
                    mode="a" if restart else "w",
                )
                if restart:
                    self.writer.truncate_after_step(restart_step)
            if thermo is not None:
                extra = ("conserved_eV",)
                if uncertainty:
                    extra = (*extra, "energy_uncertainty_eV", "max_forces_uncertainty_eV_per_A")
                self.thermo_log = ThermoLog(thermo, periodic=periodic, append=restart, extra_columns=extra)
                if restart:
                    self.thermo_log.truncate_after_step(restart_step)
        except BaseException:
            self.close()
            raise

    def write(self, engine: MDEngine, state: Any, frame: ThermoFrame) -> None:
        """Write ``frame`` (the state ``state`` at ``engine.step``): thermo row, trajectory frame, restart state."""
        total = frame.potential_energy + frame.kinetic_energy
        if self.thermo_log is not None:
            periodic_columns = (
                {"pressure": np.array([frame.pressure]), "volume": np.array([frame.volume])} if self.periodic else {}
            )
            if self.uncertainty:
                periodic_columns["energy_uncertainty_eV"] = np.array([frame.energy_uncertainty])
                periodic_columns["max_forces_uncertainty_eV_per_A"] = np.array([frame.max_forces_uncertainty])
            self.thermo_log.write(
                np.array([frame.step]),
                np.array([frame.time_ps]),
                potential_energy=np.array([frame.potential_energy]),
                kinetic_energy=np.array([frame.kinetic_energy]),
                total_energy=np.array([total]),
                temperature=np.array([frame.temperature]),
                conserved_eV=np.array([frame.conserved]),
                **periodic_columns,
            )
        if self.writer is None:
            return
        observables = {
            "potential_energy": frame.potential_energy,
            "kinetic_energy": frame.kinetic_energy,
            "total_energy": total,
            "temperature": frame.temperature,
            "conserved_energy": frame.conserved,
            "dt": self.frame_interval_ps,
        }
        if self.periodic:
            observables["pressure"] = frame.pressure
            observables["volume"] = frame.volume
        if self.uncertainty:
            observables["energy_uncertainty"] = frame.energy_uncertainty
            observables["max_forces_uncertainty"] = frame.max_forces_uncertainty
        self.writer.write(
            frame.step,
            frame.time_ps,
            engine.positions(state),
            engine.velocities(state) * ASE_VELOCITY_TO_A_PER_PS,
            box=engine.cell(state) if self.periodic else None,
            forces=engine.forces(state) if self.write_forces else None,
            **observables,
        )
        self.write_restart(engine, state, frame)

    def write_restart(self, engine: MDEngine, state: Any, frame: ThermoFrame, **meta: Any) -> None:
        """(Re)write the restart state of the last written ``frame`` (``state`` at its step), with extra JSON
        ``meta`` (a replica run stores ``stopped_because`` this way when a replica stops). No-op without a
        trajectory."""
        if self.writer is None:
            return
        self.writer.write_restart_state(
            state_arrays(state),
            {"step": frame.step, "ensemble": self.ensemble, "time_ps": frame.time_ps, "heat_eV": engine.heat, **meta},
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.thermo_log is not None:
            self.thermo_log.close()


def energy_drift(frames: list[ThermoFrame], n_atoms: int) -> tuple[float, float]:
    """(drift in meV/atom/ps, fluctuation in meV/atom) of the conserved quantity over ``frames``."""
    t = np.array([f.time_ps for f in frames])
    e = np.array([f.conserved for f in frames]) / n_atoms
    if len(frames) < 2 or not np.all(np.isfinite(e)):
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(t, e, 1)
    residual = e - (slope * t + intercept)
    return 1e3 * float(slope), 1e3 * float(np.std(residual))


def read_restart_point(
    trajectory: str | Path | None, log: Callable[[str], None]
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The restart state ``(arrays, meta)`` stored in ``trajectory``, or None when there is no run to continue:
    a missing file, or one a kill left before its first committed frame (the run then starts from step 0,
    like GROMACS ``-cpi``)."""
    if trajectory is None:
        raise ValueError("restart=True needs the trajectory file of the run to continue")
    path = Path(trajectory)
    if not path.is_file():
        log(f"restart: no trajectory {path} yet; starting a new run")
        return None
    try:
        if clear_stale_write_flags(path):  # killed while it had left SWMR mode (see equiforce.data.h5md)
            log(f"restart: cleared the write flags a killed writer left in {path} (as `h5clear -s` does)")
        return read_restart_state(path)
    except DataError as err:
        try:
            n_frames = len(read_h5md(path)["step"])
        except DataError:
            n_frames = 0 if path.stat().st_size < 4096 else -1
        # a kill while the first frame's restart state was written (its slot is created then, not double
        # buffered) leaves that one frame committed and no state: the run starts over (it is deterministic)
        first_state_lost = n_frames == 1 and isinstance(err, NoRestartStateError)
        if n_frames != 0 and not first_state_lost:
            raise
        log(f"restart: {path} holds no committed frame with a restart state ({err}); starting a new run")
        return None
