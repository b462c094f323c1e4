"""MD stability benchmark after Fu et al., "Forces are not enough: benchmark and critical evaluation for
machine learning force fields with molecular simulations", TMLR 2023, arXiv:2210.07237.

Protocol (their MD17 setting, Sec. 4.1 and App. C): NVT (Nosé–Hoover) at 500 K with a 0.5 fs step from a
reference structure, several seeds. A run is *unstable* from the first frame where any bond length deviates
from its equilibrium value by more than 0.5 Å; bonds are the pairs closer than the sum of their covalent
radii (ASE's ``natural_cutoffs``) times 1.2 in the starting structure, and equilibrium lengths are their means
over the reference DFT frames (the starting structure when none are given). The distribution of interatomic
distances ``h(r)`` (all pairs, histogram of width ``dr`` up to ``r_hist``, normalised to integrate to 1)
averaged over the stable part of the run is compared with the reference frames' as
``MAE = ∫ |h(r) − h_ref(r)| dr``. With an uncertainty threshold (σ_F, eV/Å; models with an uncertainty) the
table also says when σ_F first crossed it and how long before the instability that was.

Frames are checked every ``check_interval`` steps (one jitted chunk), so times are resolved to
``check_interval × timestep``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["StabilityRun", "bonds_of", "distance_histogram", "run_stability", "stability_table"]


@dataclasses.dataclass(frozen=True)
class StabilityRun:
    """One seed's result (times in ps; NaN where an event did not happen)."""

    seed: int
    simulated_ps: float
    unstable_ps: float
    max_bond_deviation: float
    first_uncertain_ps: float
    warning_lead_ps: float
    hr_mae: float
    ns_per_day: float
    reason: str


def bonds_of(atoms: Any, factor: float = 1.2) -> np.ndarray:
    """``[n_bonds, 2]`` atom pairs closer than ``factor`` x the sum of their covalent radii."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=factor))
    keep = i < j
    return np.stack([i[keep], j[keep]], axis=1)


def _bond_lengths(positions: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    return np.linalg.norm(positions[..., bonds[:, 0], :] - positions[..., bonds[:, 1], :], axis=-1)


def distance_histogram(positions: np.ndarray, r_hist: float = 10.0, dr: float = 0.1) -> np.ndarray:
    """``h(r)`` of all interatomic distances of frames ``[F, N, 3]`` (non-periodic), normalised to ∫h dr = 1."""
    pos = np.asarray(positions, np.float64).reshape(-1, *np.shape(positions)[-2:])
    iu = np.triu_indices(pos.shape[1], 1)
    d = np.linalg.norm(pos[:, iu[0]] - pos[:, iu[1]], axis=-1).ravel()
    hist, _ = np.histogram(d, bins=np.arange(0.0, r_hist + dr / 2, dr), density=True)
    return hist


def run_stability(
    model: str | Path | tuple[Any, Any],
    atoms: Any,
    *,
    reference: Any = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    temperature_K: float = 500.0,
    time_ps: float = 10.0,
    timestep_fs: float = 0.5,
    check_interval: int = 100,
    ensemble: str = "nvt_nose_hoover",
    max_deviation: float = 0.5,
    uncertainty_threshold: float | None = None,
    r_hist: float = 10.0,
    dr: float = 0.1,
    log: Callable[[str], None] | None = None,
) -> list[StabilityRun]:
    """Run the protocol of the module doc for each seed.

    Args:
      model: model file or ``(potential, params)``.
      atoms: the starting structure (``ase.Atoms``, non-periodic molecule).
      reference: reference DFT frames (:class:`~equiforce.data.structures.StructureSet` of the same molecule)
        for the equilibrium bond lengths and ``h_ref(r)``; None: the starting structure.
      uncertainty_threshold: σ_F in eV/Å; needs a model with an uncertainty.

    Raises:
      ValueError: a periodic structure, non-positive times, a threshold for a model without uncertainty.
    """
    from equiforce.md.engine import MDBlowUpError, MDConfig, MDEngine
    from equiforce.md.inputs import load_potential
    from equiforce.md.system import make_system

    log = log or print
    if np.any(atoms.get_pbc()):
        raise ValueError("the stability benchmark is for molecules (non-periodic structures)")
    if not (time_ps > 0 and timestep_fs > 0 and check_interval >= 1):
        raise ValueError("time_ps > 0, timestep_fs > 0 and check_interval >= 1 required")
    potential, params = load_potential(model)
    bonds = bonds_of(atoms)
    if reference is not None:
        ref_pos = reference.positions.reshape(len(reference), -1, 3)
        if ref_pos.shape[1] != len(atoms):
            raise ValueError(f"reference frames have {ref_pos.shape[1]} atoms, the structure {len(atoms)}")
    else:
        ref_pos = atoms.get_positions()[None]
    equilibrium = _bond_lengths(ref_pos, bonds).mean(axis=0)
    h_ref = distance_histogram(ref_pos, r_hist, dr)
    n_chunks = int(np.ceil(time_ps * 1000.0 / timestep_fs / check_interval))
    runs = []
    for seed in seeds:
        config = MDConfig(
            ensemble=ensemble,
            timestep_fs=timestep_fs,
            temperature_K=temperature_K,
            report_interval=check_interval,
            seed=int(seed),
            uncertainty_threshold=uncertainty_threshold,
        )
        engine = MDEngine(make_system(potential, params, atoms), config, log=lambda s: None)
        state = engine.init(atoms.get_positions())
        frames, unstable, first_uncertain, reason, max_dev = [], float("nan"), float("nan"), "stable", 0.0
        t0 = time.perf_counter()
        for _ in range(n_chunks):
            try:
                state, _ = engine.run_chunk(state)
            except MDBlowUpError as err:
                unstable, reason = (engine.step + check_interval) * timestep_fs / 1000.0, f"blew up: {err}"
                break
            if engine.last_crossing is not None and np.isnan(first_uncertain):
                first_uncertain = engine.last_crossing.step * timestep_fs / 1000.0
            pos = engine.positions(state)
            dev = float(np.max(np.abs(_bond_lengths(pos, bonds) - equilibrium))) if len(bonds) else 0.0
            max_dev = max(max_dev, dev)
            if dev > max_deviation:
                unstable, reason = engine.step * timestep_fs / 1000.0, f"bond deviation {dev:.2f} Å"
                break
            frames.append(pos)
        wall = time.perf_counter() - t0
        simulated = engine.step * timestep_fs / 1000.0
        hr_mae = (
            float(np.sum(np.abs(distance_histogram(np.array(frames), r_hist, dr) - h_ref)) * dr)
            if frames
            else float("nan")
        )
        lead = unstable - first_uncertain if np.isfinite(unstable) and np.isfinite(first_uncertain) else float("nan")
        runs.append(
            StabilityRun(
                seed=int(seed),
                simulated_ps=simulated,
                unstable_ps=unstable,
                max_bond_deviation=max_dev,
                first_uncertain_ps=first_uncertain,
                warning_lead_ps=lead,
                hr_mae=hr_mae,
                ns_per_day=simulated * 1e-3 / (wall / 86400.0) if wall > 0 else float("nan"),
                reason=reason,
            )
        )
        log(f"seed {seed}: {reason} after {simulated:.2f} ps (h(r) MAE {hr_mae:.4f})")
    return runs


def stability_table(runs: list[StabilityRun], *, title: str = "", time_ps: float | None = None) -> str:
    """A Markdown table of the runs, one row per seed, then the median time to instability."""

    def ps(x: float) -> str:
        return "–" if not np.isfinite(x) else f"{x:.2f}"

    lines = [f"### {title}", ""] if title else []
    lines += [
        "| seed | stable for (ps) | outcome | max bond deviation (Å) | σ_F first above threshold (ps) | "
        "warning before instability (ps) | h(r) MAE | ns/day |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        stable = r.unstable_ps if np.isfinite(r.unstable_ps) else r.simulated_ps
        shown = ps(stable) if np.isfinite(r.unstable_ps) else f"≥ {stable:.2f}"
        lines.append(
            f"| {r.seed} | {shown} | {r.reason} | {r.max_bond_deviation:.3f} | {ps(r.first_uncertain_ps)} | "
            f"{ps(r.warning_lead_ps)} | {r.hr_mae:.4f} | {r.ns_per_day:.2f} |"
        )
    n_unstable = sum(np.isfinite(r.unstable_ps) for r in runs)
    lines += ["", f"{n_unstable} of {len(runs)} runs became unstable" + (f" within {time_ps:g} ps" if time_ps else "")]
    return "\n".join(lines)


def write_results(out: Path, runs: list[StabilityRun], table: str) -> None:
    """``results.md`` and ``results.json`` in ``out`` (atomically)."""
    from equiforce.potentials.model_io import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.md", (table + "\n").encode())
    rows = [dataclasses.asdict(r) for r in runs]
    atomic_write_bytes(out / "results.json", json.dumps(rows, indent=1, default=float).encode())
