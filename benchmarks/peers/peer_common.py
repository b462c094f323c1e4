"""Shared helpers for the peer runners (command line, MD start, timing, JSON output).

Imported by ``mace_torch_bench.py``, ``mlip_bench.py`` and ``nequip_bench.py``, which are each run by the
python of their own peer virtual environment. Depends only on numpy and ase (present in every peer venv);
never imports equiforce.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ase
import ase.io
import numpy as np
from ase import units
from ase.calculators.calculator import Calculator
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.neighborlist import neighbor_list

#: protocol species: H C N O
ATOMIC_NUMBERS: list[int] = [1, 6, 7, 8]
SEED = 0


def build_parser(description: str, md_paths: list[str], models: list[str] | None = None) -> argparse.ArgumentParser:
    """The common command line of all peer runners (``md_paths[0]`` is the default MD path)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--structure", required=True, help="extxyz file (first frame is used)")
    p.add_argument("--system-name", required=True)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--timestep-fs", type=float, default=0.01)
    p.add_argument("--temperature-K", type=float, default=300.0)
    p.add_argument("--chunk", type=int, default=20, help="MD steps per timed chunk")
    p.add_argument("--chunks", type=int, default=3, help="number of timed chunks after the first one")
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--skin", type=float, default=1.0, help="neighbour-list skin (jax-md path only)")
    p.add_argument("--md-path", choices=md_paths, default=md_paths[0])
    if models:
        p.add_argument("--model", choices=models, default=models[0])
    p.add_argument("--train-data", default=None, help="extxyz with energy (eV) and forces (eV/Å)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps after the first")
    p.add_argument("--json", required=True, help="output JSON file")
    return p


def read_structure(path: str) -> ase.Atoms:
    """First frame of ``path``; checks that only H C N O occur."""
    atoms = ase.io.read(path, index=0)
    unknown = set(atoms.numbers.tolist()) - set(ATOMIC_NUMBERS)
    if unknown:
        raise ValueError(f"species {sorted(unknown)} not in the protocol's H C N O")
    return atoms


def read_training_frames(path: str, n: int) -> list[ase.Atoms]:
    """The first ``n`` frames of ``path`` (each must carry energy and forces)."""
    frames = ase.io.read(path, index=f":{n}")
    if len(frames) < n:
        raise ValueError(f"{path} has {len(frames)} frames, need {n}")
    return frames


def training_targets(frames: list[ase.Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """Energies (n_frames,) in eV and forces concatenated over frames (sum n_atoms, 3) in eV/Å."""
    energies = np.array([f.get_potential_energy() for f in frames])
    forces = np.concatenate([f.get_forces() for f in frames], axis=0)
    return energies, forces


def count_pairs(atoms: ase.Atoms, r_max: float) -> int:
    """Directed pairs within ``r_max`` (periodic images included)."""
    return int(neighbor_list("i", atoms, r_max).size)


def init_velocities(atoms: ase.Atoms, temperature_K: float, seed: int = SEED) -> None:
    """Seeded Maxwell–Boltzmann velocities at ``temperature_K`` with zero total momentum."""
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` in seconds."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_result(args: argparse.Namespace, code: str, version: str, md_path: str) -> dict[str, Any]:
    """The result record with every key present (values filled in as the phases run)."""
    return {
        "code": code,
        "version": version,
        "model": getattr(args, "model", None),
        "md_path": md_path,
        "dtype": args.dtype,
        "system": args.system_name,
        "structure": os.path.abspath(args.structure),
        "n_atoms": None,
        "n_params": None,
        "r_max": args.r_max,
        "timestep_fs": args.timestep_fs,
        "temperature_K": args.temperature_K,
        "chunk": args.chunk,
        "chunks": args.chunks,
        "first_call_s": None,
        "chunk_s": [],
        "steps_per_s": None,
        "atom_steps_per_s": None,
        "pairs_start": None,
        "pairs_end": None,
        "energy_start": None,
        "energy_end": None,
        "train_batch": args.train_batch if args.train_data else None,
        "train_first_s": None,
        "train_step_s": None,
        "train_steps_s": [],
        "train_loss": None,
        "peak_rss_mb": None,
        "host": platform.node(),
        "versions": {},
        "notes": [],
        "error": None,
    }


@contextmanager
def phase(result: dict[str, Any], name: str) -> Iterator[None]:
    """Run a phase; on an exception record ``"<phase>: <type>: <msg>"`` in ``result["error"]`` and go on."""
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        msg = f"{name}: {type(exc).__name__}: {exc}"
        result["error"] = msg if result["error"] is None else f"{result['error']}; {msg}"


def record_chunks(result: dict[str, Any], chunk_s: list[float], n_atoms: int) -> None:
    """Store the chunk times and the median throughputs."""
    result["chunk_s"] = chunk_s
    if chunk_s:
        steps_per_s = result["chunk"] / statistics.median(chunk_s)
        result["steps_per_s"] = steps_per_s
        result["atom_steps_per_s"] = steps_per_s * n_atoms


def record_training(result: dict[str, Any], first_s: float, step_s: list[float], loss: float) -> None:
    """Store the training timings (first step incl. compile/warm-up, median of the rest)."""
    result["train_first_s"] = first_s
    result["train_steps_s"] = step_s
    result["train_step_s"] = statistics.median(step_s) if step_s else None
    result["train_loss"] = float(loss)


def run_ase_md(args: argparse.Namespace, atoms: ase.Atoms, calc: Calculator, result: dict[str, Any]) -> None:
    """NVE ``ase.md.verlet.VelocityVerlet`` with ``calc``: one warm-up chunk, then ``args.chunks`` timed ones.

    A chunk is one ``dyn.run(args.chunk)`` call; ``first_call_s`` is the first chunk (it includes the first
    force evaluation, i.e. any compilation or warm-up). Positions are updated in place in ``atoms``.
    """
    atoms.calc = calc
    init_velocities(atoms, args.temperature_K)
    dyn = VelocityVerlet(atoms, timestep=args.timestep_fs * units.fs)
    result["first_call_s"] = timed(lambda: dyn.run(args.chunk))
    result["energy_start"] = float(atoms.get_potential_energy())
    chunk_s = [timed(lambda: dyn.run(args.chunk)) for _ in range(args.chunks)]
    record_chunks(result, chunk_s, len(atoms))
    result["energy_end"] = float(atoms.get_potential_energy())
    if not (np.isfinite(result["energy_end"]) and np.all(np.isfinite(atoms.get_forces()))):
        raise FloatingPointError("non-finite energy or forces at the end of the MD")


def write_json(path: str, result: dict[str, Any]) -> None:
    """Atomically write ``result`` (temp file in the same folder, then os.replace)."""
    result["peak_rss_mb"] = peak_rss_mb()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def summary_line(r: dict[str, Any]) -> str:
    """One human-readable line."""

    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    model = f"/{r['model']}" if r.get("model") else ""
    return (
        f"{r['code']}{model} {r['version']} {r['md_path']} {r['system']} {r['dtype']} n_atoms={r['n_atoms']}"
        f" params={r['n_params']} first={fmt(r['first_call_s'], '.2f')}s steps/s={fmt(r['steps_per_s'], '.2f')}"
        f" pairs={r['pairs_start']}->{r['pairs_end']} train_first={fmt(r['train_first_s'], '.2f')}s"
        f" train_step={fmt(r['train_step_s'], '.3f')}s rss={fmt(r['peak_rss_mb'], '.0f')}MB error={r['error']}"
    )
