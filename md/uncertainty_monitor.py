"""What an MD run does when the potential's uncertainty crosses a threshold: record the frame for
labelling, or stop the run.

The engine finds, inside each jitted chunk, the first step whose largest per-atom σ_F exceeds
``uncertainty_threshold`` (eV/Å) at least ``min_spacing`` steps after the last recorded one
(:attr:`~equiforce.md.engine.MDEngine.last_crossing`); this module acts on it on the host:

* ``record``: the configuration of that step goes to an extxyz file (``info``: ``step``, ``time_ps``,
  ``max_forces_uncertainty`` eV/Å, ``uncertain_atom``, ``energy_uncertainty`` eV), at most one frame per
  ``min_spacing`` steps and per chunk; the run goes on. The file is rewritten atomically with each frame.
* ``stop``: the same frame is written, the chunk's trajectory frame is kept, and the run ends with a message
  naming the step, the atom and σ_F.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.md.engine import MDEngine, UncertaintyCrossing
from equiforce.potentials.model_io import atomic_write_bytes

__all__ = ["ACTIONS", "UncertaintyMonitor", "uncertain_frames_path"]

ACTIONS = ("record", "stop")


def uncertain_frames_path(stem: str | Path) -> Path:
    """``<stem>_uncertain.extxyz`` beside ``stem`` (a trajectory or thermo path)."""
    return Path(stem).with_name(Path(stem).stem + "_uncertain.extxyz")


@dataclasses.dataclass
class UncertaintyMonitor:
    """Host-side handling of the engine's uncertainty crossings (see the module doc).

    Raises (constructing):
      ValueError: an unknown action or a ``min_spacing`` below 1.
    """

    atoms: Any
    action: str = "record"
    min_spacing: int = 100
    path: Path | None = None
    timestep_fs: float = 0.5
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _frames: list[Any] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"uncertainty_action must be one of {ACTIONS}, got {self.action!r}")
        if int(self.min_spacing) < 1:
            raise ValueError(f"uncertainty_min_spacing must be >= 1 step, got {self.min_spacing}")

    def resume(self, step: int) -> None:
        """Continue a restarted run: keep the frames of ``path`` up to ``step`` (a killed run may have
        recorded later ones)."""
        if self.path is None or not Path(self.path).is_file():
            return
        import ase.io

        frames = [a for a in ase.io.read(self.path, ":") if int(a.info.get("step", 0)) <= step]
        self._frames = frames
        self._write()

    def after_chunk(self, engine: MDEngine) -> str | None:
        """Act on the chunk's crossing; returns the stop message for ``stop``, else None."""
        crossing = engine.last_crossing
        if crossing is None:
            return None
        event = {
            "step": crossing.step,
            "time_ps": crossing.step * self.timestep_fs / 1000.0,
            "atom": crossing.atom,
            "max_forces_uncertainty": crossing.sigma,
            "energy_uncertainty": crossing.energy_uncertainty,
        }
        self.events.append(event)
        engine.crossing_from_step = crossing.step + int(self.min_spacing)
        self._record(crossing, event)
        symbol = self.atoms.get_chemical_symbols()[crossing.atom]
        where = f"step {crossing.step}: atom {crossing.atom} ({symbol}) has σ_F = {crossing.sigma:.4g} eV/Å"
        engine.log(
            f"uncertainty above the threshold at {where}" + (f"; frame written to {self.path}" if self.path else "")
        )
        if self.action == "stop":
            return f"stopped: uncertainty above the threshold at {where}"
        return None

    def _record(self, crossing: UncertaintyCrossing, event: dict[str, Any]) -> None:
        if self.path is None:
            return
        frame = self.atoms.copy()
        frame.set_velocities(np.zeros((len(frame), 3)))
        if crossing.cell is not None:
            frame.set_cell(crossing.cell)
        frame.set_positions(crossing.positions)
        frame.info.clear()
        frame.info.update({"uncertain_atom" if k == "atom" else k: v for k, v in event.items()})
        self._frames.append(frame)
        self._write()

    def _write(self) -> None:
        import ase.io

        buf = io.StringIO()
        ase.io.write(buf, self._frames, format="extxyz")
        atomic_write_bytes(self.path, buf.getvalue().encode())
