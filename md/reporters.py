"""The thermo CSV of an MD run (:class:`ThermoLog`), and the H5MD trajectory names under their old import path.

The H5MD 1.1 trajectory (:class:`H5MDWriter`, :func:`read_h5md`, :func:`read_restart_state`,
:func:`repair_h5md`, :func:`clear_stale_write_flags`, ...) is a file format and lives in
:mod:`equiforce.data.h5md`; its public names are re-exported here so that ``from equiforce.md.reporters import
H5MDWriter`` keeps working.

The thermo log is called from the host once per chunk of MD steps with NumPy arrays of ``F`` frames; it takes
exactly the frames it is given (**striding is the engine's job**). Units are ASE's, except time (ps) and
pressure (GPa in the CSV, handed in as eV/Å³).

:class:`ThermoLog`
    One CSV row per frame; each :meth:`ThermoLog.write` is one ``write`` + ``flush`` + ``os.fsync``,
    so everything handed in before a kill is on disk and the file can be read (``pandas``,
    ``numpy.loadtxt``) while the run goes on. A kill in the middle of a write can leave a partial
    last line; ``append=True`` drops it.

Errors: bad or inconsistent input raises :class:`~equiforce.data.errors.DataError` (a ``ValueError``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ase import units

from equiforce.data import h5md as _h5md
from equiforce.data.errors import DataError
from equiforce.data.h5md import *  # noqa: F403  (the H5MD names under their old import path)

__all__ = [*_h5md.__all__, "ThermoLog"]

PathLike = str | os.PathLike


# ============================================================================ CSV thermo log


# column name -> (keyword of ThermoLog.write, divisor applied to the value)
_THERMO_BASE: tuple[tuple[str, str, float], ...] = (
    ("potential_energy_eV", "potential_energy", 1.0),
    ("kinetic_energy_eV", "kinetic_energy", 1.0),
    ("total_energy_eV", "total_energy", 1.0),
    ("temperature_K", "temperature", 1.0),
)
_THERMO_PERIODIC: tuple[tuple[str, str, float], ...] = (
    ("pressure_GPa", "pressure", units.GPa),  # eV/Å³ -> GPa
    ("volume_A3", "volume", 1.0),
)


def _fmt(x: float) -> str:
    return repr(float(x))


class ThermoLog:
    """CSV log of thermodynamic quantities, one row per frame, fsync'd after every write.

    Header: ``step,time_ps,potential_energy_eV,kinetic_energy_eV,total_energy_eV,temperature_K``,
    then ``,pressure_GPa,volume_A3`` when ``periodic``, then the ``extra_columns``. Floats are written
    with Python's shortest round-trip ``repr`` (reading them back gives the same float64).

    Args:
      path: CSV file; its folder must exist.
      periodic: add the pressure and volume columns.
      append: continue an existing file (its header must equal this log's header; a partial last
        line left by a kill is dropped). A missing or empty file is created. With False an existing
        file is overwritten.
      extra_columns: further column names, e.g. ``("conserved_eV",)`` for the conserved quantity of
        a thermostat/barostat; written verbatim (no unit conversion).

    Raises:
      DataError: bad column names, a missing folder, or (append) a header mismatch.
    """

    def __init__(
        self, path: PathLike, *, periodic: bool, append: bool = False, extra_columns: tuple[str, ...] = ()
    ) -> None:
        self.path = Path(path)
        self.periodic = bool(periodic)
        spec = list(_THERMO_BASE) + (list(_THERMO_PERIODIC) if self.periodic else [])
        for name in extra_columns:
            if not isinstance(name, str) or not name or any(c in name for c in ",\n\r\"' "):
                raise DataError(f"invalid extra column name {name!r}")
        spec += [(name, name, 1.0) for name in extra_columns]
        self._spec = spec
        self.columns: tuple[str, ...] = ("step", "time_ps", *(c for c, _, _ in spec))
        if len(set(self.columns)) != len(self.columns):
            raise DataError(f"duplicate column names in {self.columns}")
        self.header = ",".join(self.columns)
        if not self.path.parent.is_dir():
            raise DataError(f"{self.path}: directory {self.path.parent} does not exist")
        if append and self.path.is_file() and self.path.stat().st_size > 0:
            self._fh = open(self.path, "r+b")
            try:
                self._prepare_append()
            except BaseException:
                self._fh.close()
                raise
        else:
            self._fh = open(self.path, "wb")
            self._write_bytes((self.header + "\n").encode())

    def _prepare_append(self) -> None:
        fh = self._fh
        first = fh.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        if first != self.header:
            raise DataError(
                f"{self.path}: cannot append, the header differs.\n  file:     {first}\n  expected: {self.header}"
            )
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size - 1)
        if fh.read(1) != b"\n":  # partial last line from a kill: drop it
            fh.seek(0)
            data = fh.read()
            keep = data.rfind(b"\n") + 1
            fh.truncate(keep)
            os.fsync(fh.fileno())
        fh.seek(0, os.SEEK_END)

    def truncate_after_step(self, step: int) -> int:
        """Drop rows with a step above ``step`` (rows a killed run wrote after its last restart state).

        Returns:
          The number of data rows kept.
        """
        fh = self._fh
        fh.seek(0)
        data = fh.read()
        lines = data.split(b"\n")
        offset = len(lines[0]) + 1
        kept = 0
        for line in lines[1:]:
            if not line:
                break
            try:
                row_step = int(line.split(b",", 1)[0])
            except ValueError as err:
                raise DataError(f"{self.path}: corrupt row {kept + 2}: {line[:80]!r}") from err
            if row_step > step:
                break
            offset += len(line) + 1
            kept += 1
        if offset < len(data):
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        fh.seek(0, os.SEEK_END)
        return kept

    def _write_bytes(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, step: np.ndarray, time_ps: np.ndarray, **columns: np.ndarray) -> None:
        """Append one row per frame.

        Args:
          step: int ``[F]`` MD step numbers (a scalar is one frame).
          time_ps: float ``[F]`` simulation time, ps.
          **columns: ``[F]`` arrays by keyword: ``potential_energy``, ``kinetic_energy``,
            ``total_energy`` (eV), ``temperature`` (K), and when periodic ``pressure`` (eV/Å³,
            written as GPa) and ``volume`` (Å³), plus each extra column by its column name.

        Raises:
          DataError: a missing or unexpected column, a length mismatch, non-integer steps, or a
            closed log.
        """
        if self._fh.closed:
            raise DataError(f"{self.path}: ThermoLog is closed")
        steps = np.atleast_1d(np.asarray(step))
        if steps.ndim != 1 or (steps.size and not np.issubdtype(steps.dtype, np.integer)):
            raise DataError(f"step must be a 1-D integer array, got dtype {steps.dtype} shape {steps.shape}")
        n = steps.shape[0]
        wanted = {kw for _, kw, _ in self._spec}
        missing = sorted(wanted - set(columns))
        extra = sorted(set(columns) - wanted)
        if missing or extra:
            raise DataError(f"{self.path}: missing columns {missing}, unexpected columns {extra}")
        arrays = [("time_ps", np.atleast_1d(np.asarray(time_ps, dtype=np.float64)), 1.0)]
        arrays += [(kw, np.atleast_1d(np.asarray(columns[kw], dtype=np.float64)), f) for _, kw, f in self._spec]
        for name, arr, _ in arrays:
            if arr.shape != (n,):
                raise DataError(f"{self.path}: column {name!r} has shape {arr.shape}, expected ({n},)")
        scaled = [arr / f if f != 1.0 else arr for _, arr, f in arrays]
        lines = [",".join([str(int(steps[i])), *(_fmt(a[i]) for a in scaled)]) for i in range(n)]
        if lines:
            self._write_bytes(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> ThermoLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
