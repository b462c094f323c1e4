"""The post-training energy-conservation gate: a short NVE run from a validation structure.

A low-MAE model can still be unstable in MD, so after training a short NVE run reports the drift
(meV/atom/ps, slope of a linear fit of the total energy per atom over time) and fluctuation (meV/atom,
standard deviation around that fit) next to the test errors, and compares the drift with
``md_check.max_drift_meV_per_atom_per_ps``. A periodic structure smaller than twice the cutoff is
repeated along its lattice vectors until every cell height exceeds ``2 r_max`` (the MD engine's
minimum-image neighbour list needs that; see :func:`equiforce.md.system.check_structure`).

The check is kept proportionate to the run (``md_check.max_minutes``, by default a quarter of the training's
time budget): it logs its expected time after a first timed chunk, then its progress, and stops at the time
limit; the verdict records how many steps and picoseconds it rests on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from equiforce.data.structures import StructureSet
from equiforce.potentials.potential import Potential
from equiforce.training.config import MDCheckConfig

__all__ = ["check_time_limit_s", "energy_conservation_check", "supercell_for_cutoff"]

#: seconds between the check's progress lines
PROGRESS_LOG_S = 30.0

#: the share of the training's time budget the check may take when ``md_check.max_minutes`` is not set
BUDGET_SHARE = 0.25


def check_time_limit_s(md_check: MDCheckConfig, training_budget_minutes: float | None) -> float | None:
    """The NVE check's wall-clock limit, s: ``md_check.max_minutes``; else :data:`BUDGET_SHARE` of the training's
    time budget (at least a minute); None without either."""
    if md_check.max_minutes is not None:
        return 60.0 * md_check.max_minutes
    if training_budget_minutes is not None:
        return 60.0 * max(1.0, BUDGET_SHARE * training_budget_minutes)
    return None


def supercell_for_cutoff(
    atoms: Any, r_max: float, minimum: tuple[int, ...] | None = None
) -> tuple[Any, tuple[int, int, int]]:
    """Repeat a fully periodic ``ase.Atoms`` until every cell height is longer than ``2 r_max``.

    Repeating ``n`` times along lattice vector ``a_i`` multiplies the height across the faces spanned by
    the other two vectors by ``n`` (heights from :func:`equiforce.md.system.cell_heights`, Å), so
    ``n_i = floor(2 r_max / h_i) + 1``. Non-periodic and partially periodic structures are returned as they
    are (MD rejects partial periodicity with a clear error).

    Args:
      atoms: an ``ase.Atoms``.
      r_max: the potential's cutoff, Å.
      minimum: repeat at least this often along each lattice vector (e.g. ``(2, 2, 2)`` for an NVE check on
        a supercell); ``None``: only what the cutoff needs.

    Returns:
      ``(atoms or its supercell, (n1, n2, n3))``; the input is not modified.
    """
    from equiforce.md.system import cell_heights

    pbc = np.asarray(atoms.get_pbc(), bool)
    if not np.all(pbc):
        return atoms, (1, 1, 1)
    cell = np.asarray(atoms.get_cell()[:], np.float64)
    if abs(np.linalg.det(cell)) < 1e-9:
        return atoms, (1, 1, 1)  # singular: MD reports it
    heights = cell_heights(cell)
    # a relative margin of 1e-9 so that a height of exactly 2 r_max (up to rounding) counts as too short
    reps = tuple(math.floor(2.0 * r_max * (1.0 + 1e-9) / h) + 1 for h in heights)
    if minimum is not None:
        reps = tuple(max(int(r), int(m)) for r, m in zip(reps, minimum, strict=True))
    if reps == (1, 1, 1):
        return atoms, reps
    return atoms.repeat(reps), reps


def energy_conservation_check(
    potential: Potential,
    params: Any,
    structures: StructureSet,
    md_check: MDCheckConfig | Any,
    log: Callable[[str], None],
    *,
    training_budget_minutes: float | None = None,
) -> dict[str, Any]:
    """NVE from the first structure of ``structures`` (a supercell of it where the cutoff needs one).

    Args:
      potential, params: the trained potential.
      structures: where the start structure comes from (the validation set).
      md_check: steps, time step (fs), initial temperature (K), sampling interval, drift threshold
        (meV/atom/ps) and the action on failure (a whole :class:`TrainConfig` is accepted too).
      log: receives progress (the expected time, then a line about every 30 s) and the result.
      training_budget_minutes: the training's time budget, minutes (the default time limit, see
        :func:`check_time_limit_s`); a whole :class:`TrainConfig` as ``md_check`` gives it itself.

    Returns:
      A JSON-serialisable dict: ``status`` (``"passed"``, ``"failed"``: |drift| above the threshold or not
      measurable, ``"blew_up"``: the run became unphysical, ``"error"``: the check could not run), ``passed``,
      ``blew_up``, ``threshold_meV_per_atom_per_ps``, ``on_failure``, ``steps``, ``timestep_fs``,
      ``temperature_K``, ``supercell`` (repetitions), ``n_atoms``, ``steps_requested``, ``time_limit_s`` (None:
      none), and after a run ``steps`` (run), ``time_ps`` (simulated), ``stopped_by_time_limit``,
      ``drift_meV_per_atom_per_ps``, ``fluctuation_meV_per_atom``, ``mean_temperature_K``, ``steps_per_s``,
      ``wall_s`` (compilation included); ``message`` where it did not pass.
      Nothing is raised for a blow-up or an error: the caller decides (``md_check.on_failure``).
    """
    from equiforce.md.engine import MDBlowUpError
    from equiforce.md.run import run_md

    c: MDCheckConfig = getattr(md_check, "md_check", md_check)
    if training_budget_minutes is None and hasattr(md_check, "optim"):
        training_budget_minutes = md_check.optim.time_budget_minutes
    time_limit_s = check_time_limit_s(c, training_budget_minutes)
    result: dict[str, Any] = {
        "status": "error",
        "passed": False,
        "blew_up": False,
        "threshold_meV_per_atom_per_ps": c.max_drift_meV_per_atom_per_ps,
        "on_failure": c.on_failure,
        "steps": c.steps,
        "steps_requested": c.steps,
        "timestep_fs": c.timestep_fs,
        "temperature_K": c.temperature_K,
        "time_limit_s": time_limit_s,
    }
    try:
        atoms = structures.to_atoms(0)
        atoms.calc = None
        atoms, reps = supercell_for_cutoff(atoms, potential.r_max, c.supercell)
        result.update(supercell=list(reps), n_atoms=len(atoms))
        if reps != (1, 1, 1):
            asked = tuple(c.supercell) if c.supercell is not None else (1, 1, 1)
            why = []
            if any(r > 1 for r in asked):
                why.append(f"md_check.supercell asks for at least {'x'.join(map(str, asked))}")
            if any(r > a for r, a in zip(reps, asked, strict=True)):
                why.append(f"the cell must be wider than 2 r_max = {2 * potential.r_max:.2f} Å")
            log(f"NVE check: running a {reps[0]}x{reps[1]}x{reps[2]} supercell ({len(atoms)} atoms): {'; '.join(why)}")
        limit = "no time limit" if time_limit_s is None else f"at most {time_limit_s / 60:.1f} min"
        log(f"NVE check: {c.steps} steps of {c.timestep_fs} fs on {len(atoms)} atoms ({limit}); timing a first chunk")
        started = time.perf_counter()
        r = run_md(
            (potential, params),
            atoms,
            ensemble="nve",
            temperature_K=c.temperature_K,
            timestep_fs=c.timestep_fs,
            steps=c.steps,
            report_interval=c.report_interval,
            progress=False,
            time_limit_s=time_limit_s,
            progress_log_s=PROGRESS_LOG_S,
            log=lambda line: log(f"NVE check: {line.removeprefix('MD: ')}"),
        )
        wall = time.perf_counter() - started
    except MDBlowUpError as err:
        log(f"NVE check: {err}")
        result.update(status="blew_up", blew_up=True, message=str(err))
        return result
    except Exception as err:  # the check is optional: report, never lose the trained model over it
        msg = f"{type(err).__name__}: {err}"
        log(f"NVE check could not run: {msg}")
        result.update(message=msg)
        return result
    drift, fluct = r.drift_meV_per_atom_per_ps, r.fluctuation_meV_per_atom
    passed = bool(np.isfinite(drift) and abs(drift) <= c.max_drift_meV_per_atom_per_ps)
    result.update(
        status="passed" if passed else "failed",
        passed=passed,
        steps=r.steps,
        time_ps=r.steps * c.timestep_fs / 1000.0,
        stopped_by_time_limit=r.stopped_because is not None,
        wall_s=wall,
        drift_meV_per_atom_per_ps=drift,
        fluctuation_meV_per_atom=fluct,
        mean_temperature_K=float(np.mean([f.temperature for f in r.frames])),
        steps_per_s=r.steps_per_s,
    )
    if not passed:
        result["message"] = (
            f"|drift| {abs(drift):.3f} meV/atom/ps exceeds md_check.max_drift_meV_per_atom_per_ps = "
            f"{c.max_drift_meV_per_atom_per_ps}"
            if np.isfinite(drift)
            else "the drift could not be measured (non-finite energies or fewer than two samples)"
        )
    ran = f"{r.steps} steps of {c.timestep_fs} fs = {result['time_ps']:.3g} ps, {potential.dtype}, {len(atoms)} atoms"
    if r.stopped_because is not None:
        ran += f"; {c.steps} asked, stopped by the time limit of {time_limit_s / 60:.1f} min"
    log(
        f"NVE check ({ran}): energy drift {drift:.3f} meV/atom/ps, fluctuation {fluct:.3f} meV/atom, "
        f"{r.steps_per_s:.1f} steps/s, {wall:.0f} s"
    )
    return result
