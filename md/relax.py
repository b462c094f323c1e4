"""Geometry optimisation: FIRE (jax-md) over many structures at once, optionally with the cell.

:func:`relax` minimises the energy of a list of structures with :func:`jax_md.minimize.fire_descent`:

* **Batched.** The structures are padded to one static shape (atoms, edges) and the FIRE step is
  ``jax.vmap``-ped over the batch; the steps run on the device in a ``lax.while_loop`` of up to
  :data:`CHUNK_STEPS` steps per call, so one compilation per padded shape serves the whole relaxation. A
  structure stops at ``max force <= fmax`` (its state is then frozen) or after ``max_steps`` steps.
* **Neighbour lists.** Each structure's edges are built on the host (:func:`~equiforce.data.neighbours.
  build_neighbour_graph`, periodic images included) with a skin. A step that would take an atom further than the
  skin allows (with the cell: ``σ_min(F)·(r_max + skin) − 2·max|u| ≤ r_max``, ``F`` the cell deformation since
  the build and ``u`` the non-affine displacement, a bound that no missing pair can come within ``r_max``) is not
  taken: that structure waits, its list is rebuilt on the host and the same step is done again, so the energy is
  always that of the complete neighbour list.
* **Cell** (``cell=True``, fully periodic structures): FIRE over ASE's :class:`~ase.filters.FrechetCellFilter`
  coordinates — the positions with the cell deformation undone, ``r0 = r F^{-T}``, and ``X = N log F`` (``N``
  atoms, ``F`` the deformation gradient from the input cell, ``cell = cell0 F^T``); the generalised forces are
  ``−∂E/∂(r0, X)`` by automatic differentiation through :func:`jax.scipy.linalg.expm`, which is the same
  ``F_i F`` and ``(virial-derived) / N`` as ASE's filter. Convergence is ASE's: the largest row norm of those
  forces (atoms and the three cell rows) ``<= fmax``, i.e. ``|virial| / N`` small as well as the forces.
* **Fixed atoms** (:func:`~equiforce.md.constraints.fixed_mask`: ``ase.constraints.FixAtoms`` on the input
  and/or ``fixed``): their generalised force is zero, so their momentum stays zero and they do not move
  (with ``cell=True`` they keep their position relative to the deforming cell, as in ASE).

FIRE's parameters are ASE's defaults (``N_min=5``, ``f_inc=1.1``, ``f_dec=0.5``, ``α=0.1``, ``f_α=0.99``; mass 1)
with a smaller largest time step (:data:`FIRE_PARAMETERS`), and each step's displacement is capped at
:data:`MAX_STEP` Å per row, like ASE's ``maxstep``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from jax import lax
from jax_md import minimize

from equiforce.data.errors import DataError
from equiforce.data.graph import Graph, PaddingBudget, collate
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graph
from equiforce.data.structures import StructureSet
from equiforce.md.calculator import bucket_size
from equiforce.md.constraints import fixed_mask
from equiforce.potentials.potential import Potential

__all__ = [
    "CHUNK_STEPS",
    "FIRE_PARAMETERS",
    "MAX_STEP",
    "RelaxResult",
    "read_structures_for_relax",
    "relax",
    "write_relaxed",
]

#: FIRE's parameters, in jax-md's names: ASE's ``ase.optimize.FIRE`` defaults except the time steps. ASE's
#: ``dt_max = 1.0`` (jax-md's default 0.4) makes jax-md's velocity-Verlet FIRE oscillate on stiff bonds (C–H of a
#: trained aspirin model: 3000 steps without reaching fmax 1e-4, where ``dt_max = 0.15`` needs about 250-330);
#: mass 1 and time in Å·sqrt(1/eV) units, as in ASE's FIRE.
FIRE_PARAMETERS = {
    "dt_start": 0.1,
    "dt_max": 0.15,
    "n_min": 5,
    "f_inc": 1.1,
    "f_dec": 0.5,
    "alpha_start": 0.1,
    "f_alpha": 0.99,
}
#: the largest displacement of one row (atom or cell row) in one step, Å (ASE's FIRE ``maxstep``)
MAX_STEP = 0.2
#: FIRE steps per device call at most (the host then rebuilds lists and checks progress)
CHUNK_STEPS = 200
#: neighbour-list skin, Å
SKIN = 1.0
_PRECISIONS = ("float32", "float64", "mixed")


@dataclasses.dataclass
class RelaxResult:
    """What :func:`relax` returns, one entry per input structure (input order).

    Attributes:
      atoms: the relaxed structures (copies; constraints and ``info`` kept), each with a
        ``SinglePointCalculator`` holding ``energy`` (eV), ``free_energy``, ``forces`` (``[n, 3]`` eV/Å, the raw
        model forces: ``atoms.get_forces()`` zeroes fixed atoms as ASE does) and, for a periodic structure,
        ``stress`` (``[6]`` eV/Å³, ASE sign and Voigt order); ``info`` gets ``relax_converged``,
        ``relax_steps`` and ``relax_fmax``.
      converged: ``[n_structures]`` bool, the largest (generalised) force reached ``fmax``.
      steps: ``[n_structures]`` int, FIRE steps taken.
      fmax: ``[n_structures]`` float, eV/Å, the final largest row norm of the generalised forces (ASE's
        criterion; with ``cell=True`` including the cell rows).
      energy: ``[n_structures]`` float, eV, final energies.
      wall_s: seconds the call took (compilation included).
    """

    atoms: list[Atoms]
    converged: np.ndarray
    steps: np.ndarray
    fmax: np.ndarray
    energy: np.ndarray
    wall_s: float = 0.0

    def __len__(self) -> int:
        return len(self.atoms)

    def summary(self) -> str:
        """A one-paragraph human summary (converged count, steps, energies)."""
        n = len(self)
        e = self.energy
        lines = [
            f"{int(self.converged.sum())}/{n} structures converged; steps min/median/max "
            f"{int(self.steps.min())}/{int(np.median(self.steps))}/{int(self.steps.max())}; "
            f"final fmax max {float(self.fmax.max()):.3g} eV/Å; {self.wall_s:.1f} s"
        ]
        show = range(n) if n <= 10 else [*range(5), None, *range(n - 3, n)]
        for k in show:
            if k is None:
                lines.append("  ...")
                continue
            flag = "converged" if self.converged[k] else "NOT converged"
            lines.append(
                f"  {k}: {self.atoms[k].get_chemical_formula()} E = {e[k]:.6f} eV "
                f"({e[k] / len(self.atoms[k]):.6f} eV/atom), {int(self.steps[k])} steps, "
                f"fmax {float(self.fmax[k]):.3g} eV/Å, {flag}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- input


def read_structures_for_relax(path: str | os.PathLike, index: str = ":") -> list[Atoms]:
    """All structures of a file ASE can read (extxyz, cif, POSCAR, ...), constraints kept.

    Raises:
      FileNotFoundError: no such file.
      DataError: ASE cannot read it, or it holds no structure.
    """
    import ase.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as err:  # ase raises many kinds for a bad file
        raise DataError(f"{path}: cannot read structures ({type(err).__name__}: {err})") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{path}: no structures in the file")
    return frames


def _load(model: Any) -> tuple[Potential, Any]:
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], Potential):
        return model
    if isinstance(model, str | os.PathLike):
        from equiforce.potentials.model_io import enable_x64_for, load_model

        if not os.path.isfile(model):
            raise FileNotFoundError(f"model file not found: {os.fspath(model)}")
        enable_x64_for(model)
        potential, params, _ = load_model(model)
        return potential, params
    raise TypeError(f"model must be a model file path or a (Potential, params) pair, got {type(model).__name__}")


def _per_structure_fixed(fixed: Any, n: int) -> list[Any]:
    """``fixed`` for each of ``n`` structures: None, one index list / mask for all, or one per structure."""
    if fixed is None:
        return [None] * n
    if isinstance(fixed, np.ndarray) and fixed.ndim == 1:
        return [fixed] * n
    items = list(fixed)
    per = any(x is None or isinstance(x, list | tuple | np.ndarray | range) for x in items)
    if not per:
        return [items] * n
    if len(items) != n:
        raise ValueError(f"fixed: {len(items)} per-structure lists for {n} structures")
    return items


@dataclasses.dataclass
class _Prepared:
    atoms: Atoms
    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    fixed: np.ndarray


def _prepare(k: int, atoms: Any, potential: Potential, fixed: Any, with_cell: bool) -> _Prepared:
    where = f"structure {k}"
    if not isinstance(atoms, Atoms):
        raise TypeError(f"{where}: expected an ase.Atoms, got {type(atoms).__name__}")
    n = len(atoms)
    if n == 0:
        raise DataError(f"{where}: empty structure (0 atoms)")
    numbers = np.asarray(atoms.get_atomic_numbers())
    try:
        potential.check_species(numbers)
        mask = fixed_mask(atoms, fixed)
    except ValueError as err:
        raise type(err)(f"{where}: {err}") from None
    positions = np.asarray(atoms.get_positions(), dtype=np.float64)
    cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
    pbc = np.asarray(atoms.get_pbc(), dtype=bool)
    if not np.all(np.isfinite(positions)):
        bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
        raise DataError(f"{where}: positions contain NaN or inf (atoms {bad[:10].tolist()})")
    if not np.all(np.isfinite(cell)):
        raise DataError(f"{where}: cell contains NaN or inf")
    if with_cell and not (np.all(pbc) and abs(np.linalg.det(cell)) > 1e-9):
        raise DataError(
            f"{where}: cell relaxation needs a fully periodic structure with a non-singular cell "
            f"(pbc={pbc.tolist()}, volume {abs(np.linalg.det(cell)):.3g} Å³); relax it without cell=True / --cell"
        )
    if np.any(pbc):
        if np.any(pbc & (np.linalg.norm(cell, axis=1) == 0.0)):
            raise DataError(f"{where}: a periodic direction has a zero lattice vector (pbc={pbc.tolist()})")
        if not np.all(pbc):
            cell = np.asarray(atoms.cell.complete()[:], dtype=np.float64)
    return _Prepared(atoms, numbers.astype(np.int32), positions, cell, pbc, mask)


def _graph(p: _Prepared, positions: np.ndarray, cell: np.ndarray, cutoff: float, where: str) -> NeighbourGraph:
    try:
        return build_neighbour_graph(positions, cell, p.pbc, cutoff)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _collate(p: _Prepared, ng: NeighbourGraph, positions, cell, n_nodes: int, n_edges: int, dtype) -> Graph:
    s = StructureSet(
        atomic_numbers=p.numbers,
        positions=positions,
        n_atoms=np.array([len(p.numbers)]),
        cell=cell[None],
        pbc=p.pbc[None],
    )
    return collate(s, [ng], [0], PaddingBudget(n_nodes=n_nodes, n_edges=n_edges, n_graphs=2), dtype=dtype).graph


# ---------------------------------------------------------------------------------------------------- device


def _expm(a: jnp.ndarray) -> jnp.ndarray:
    """``exp(a)`` of a 3x3 matrix: Taylor series of order 12 after 6 squarings (error below 1e-20 for
    ``|a| < 3``, far beyond any cell deformation a relaxation meets), cheap to differentiate and to compile."""
    small = a / 64.0
    term = jnp.eye(3, dtype=a.dtype)
    out = term
    for k in range(1, 13):
        term = term @ small / k
        out = out + term
    for _ in range(6):
        out = out @ out
    return out


@functools.lru_cache(maxsize=16)
def _program(
    potential: Potential, with_cell: bool, n_nodes: int, r_max: float, reach: float, fire: tuple, max_step: float
):
    """The jitted chunk of FIRE steps for one padded shape (cached: a second call with the same shape is free).

    ``chunk(params, state, graphs, cell0, n_real, frozen, steps, done, max_steps, fmax)`` recomputes the forces at
    the state's positions, runs up to :data:`CHUNK_STEPS` vmapped FIRE steps and returns ``(state, steps, done,
    waiting, fmax, positions, cells, energy, forces, stress)``.
    """

    def physical(ext, cell0, n_real):
        """Extended coordinates -> ``([n_nodes, 3]`` positions, ``[3, 3]`` cell``)``."""
        if not with_cell:
            return ext[:n_nodes], cell0
        deform = _expm(ext[n_nodes:] / n_real)
        return ext[:n_nodes] @ deform.T, cell0 @ deform.T

    def energy(params, ext, graph, cell0, n_real):
        pos, cell = physical(ext, cell0, n_real)
        g = graph._replace(positions=pos, cell=graph.cell.at[0].set(cell))
        return jnp.sum(potential.node_energies(params, g))

    def make_fire(params):
        def force(ext, graph, cell0, n_real, frozen, **_):
            f = -jax.grad(energy, argnums=1)(params, ext, graph, cell0, n_real)
            return jnp.where(frozen[:, None], jnp.zeros_like(f), f)

        def shift(r, dr, **_):
            longest = jnp.max(jnp.sqrt(jnp.sum(dr * dr, axis=-1)))
            scale = jnp.where(longest > max_step, max_step / jnp.where(longest > 0, longest, 1.0), 1.0)
            return r + dr * scale

        return force, minimize.fire_descent(force, shift, **dict(fire))[1]

    def fmax_of(force):
        return jnp.sqrt(jnp.max(jnp.sum(force * force, axis=-1), axis=-1))

    def list_valid(ext, graph, cell0, n_real):
        pos, cell = physical(ext, cell0, n_real)
        ref_pos, ref_cell = graph.positions, graph.cell[0]
        if with_cell:
            deform = jnp.linalg.solve(ref_cell, cell)  # cell = ref_cell @ deform
            smallest = jnp.linalg.svd(deform, compute_uv=False)[-1]
            u = pos - ref_pos @ deform
        else:
            smallest, u = 1.0, pos - ref_pos
        moved = jnp.where(graph.node_mask, jnp.sum(u * u, axis=-1), 0.0)
        return smallest * reach - 2.0 * jnp.sqrt(jnp.max(moved)) > r_max

    def final(params, graph, ext, cell0, n_real):
        pos, cell = physical(ext, cell0, n_real)
        g = graph._replace(positions=pos, cell=graph.cell.at[0].set(cell))
        out = potential(params, g, compute_forces=True, compute_stress=True)
        return pos, cell, out.energy[0], out.forces, out.stress[0]

    @jax.jit
    def chunk(params, state, graphs, cell0, n_real, frozen, steps, done, max_steps, fmax):
        force_fn, apply_fn = make_fire(params)
        step = jax.vmap(lambda s, g, c, n, fr: apply_fn(s, graph=g, cell0=c, n_real=n, frozen=fr))
        valid_fn = jax.vmap(list_valid)
        # the forces of the current positions (with the current lists): the first chunk's initial forces
        forces = jax.vmap(lambda x, g, c, n, fr: force_fn(x, g, c, n, fr))(
            state.position, graphs, cell0, n_real, frozen
        )
        state = state.set(force=forces)
        done = done | (fmax_of(forces) <= fmax)
        waiting = jnp.zeros_like(done)

        def active(steps, done, waiting):
            return ~done & ~waiting & (steps < max_steps)

        def cond(carry):
            i, _, steps, done, waiting = carry
            return (i < CHUNK_STEPS) & jnp.any(active(steps, done, waiting))

        def body(carry):
            i, state, steps, done, waiting = carry
            go = active(steps, done, waiting)
            new = step(state, graphs, cell0, n_real, frozen)
            valid = valid_fn(new.position, graphs, cell0, n_real)
            accept = go & valid

            def pick(a, b):
                return jnp.where(accept.reshape(accept.shape + (1,) * (jnp.ndim(a) - 1)), a, b)

            state = jax.tree.map(pick, new, state)
            steps = steps + accept.astype(steps.dtype)
            done = done | (accept & (fmax_of(state.force) <= fmax))
            waiting = waiting | (go & ~valid)
            return i + 1, state, steps, done, waiting

        _, state, steps, done, waiting = lax.while_loop(cond, body, (jnp.int32(0), state, steps, done, waiting))
        outputs = jax.vmap(partial(final, params))(graphs, state.position, cell0, n_real)
        return (state, steps, done, waiting, fmax_of(state.force), *outputs)

    return chunk


def _mesh(devices: Any):
    if devices is None:
        return None
    if devices == "all":
        devs = jax.devices()
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1 or devices > len(jax.devices()):
            raise ValueError(f"devices={devices}: this process has {len(jax.devices())} device(s)")
        devs = jax.devices()[:devices]
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("devices: an empty list")
    return jax.sharding.Mesh(np.array(devs), ("batch",))


# ---------------------------------------------------------------------------------------------------- relax


def relax(
    model: str | os.PathLike | tuple[Potential, Any],
    structures: Atoms | Sequence[Atoms] | str | os.PathLike,
    *,
    fmax: float = 0.05,
    max_steps: int = 1000,
    cell: bool = False,
    fixed: Sequence[int] | np.ndarray | Sequence[Sequence[int] | None] | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    devices: Any = None,
    skin: float = SKIN,
    log: Callable[[str], None] | None = None,
) -> RelaxResult:
    """Relax many structures at once with FIRE (jax-md), optionally with the cell (see the module docstring).

    Args:
      model: a model file path, or a ``(Potential, params)`` pair.
      structures: one ``ase.Atoms``, a list of them, or a file ASE can read (every frame).
      fmax: convergence threshold, eV/Å (> 0): the largest row norm of the generalised forces (with
        ``cell=True`` the cell rows ``−∂E/∂X`` too, as in ASE's ``FrechetCellFilter``).
      max_steps: FIRE steps per structure at most (>= 0).
      cell: also relax the cell (stress-driven; every structure must be fully periodic).
      fixed: atoms held fixed besides each structure's ``FixAtoms``: indices (or a boolean mask) applied to every
        structure, or one list / mask / None per structure.
      batch_size: structures relaxed together (one padded, vmapped batch; sorted by size first); None: all.
      precision: ``float32``, ``float64`` or ``mixed`` (float32 network, float64 positions and FIRE); default:
        the potential's dtype. ``float64``/``mixed`` need JAX's 64-bit types on.
      devices: shard each batch over devices (``"all"``, a count, or a list of ``jax.Device``); None: the
        default device.
      skin: neighbour-list skin, Å (> 0): larger means fewer rebuilds and more edges.
      log: receives progress lines (None: silent).

    Returns:
      :class:`RelaxResult` (input order).

    Raises:
      FileNotFoundError: a missing model or structure file.
      ValueError: ``fmax <= 0`` or not finite, ``max_steps < 0``, a bad ``batch_size``, ``precision`` or ``skin``;
        :class:`~equiforce.data.errors.DataError` / ``UnknownSpeciesError`` /
        :class:`~equiforce.md.constraints.ConstraintError` (all ``ValueError``) naming the structure: empty,
        NaN/inf positions or cell, overlapping atoms, an element the model does not know, an unsupported
        constraint or out-of-range fixed index, ``cell=True`` on a structure that is not fully periodic.
      RuntimeError: float64 precision with JAX's 64-bit types off and arrays already made.
    """
    t0 = time.perf_counter()
    say = log or (lambda _: None)
    if not (isinstance(fmax, int | float) and math.isfinite(fmax) and fmax > 0):
        raise ValueError(f"fmax must be a positive number of eV/Å, got {fmax!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if not (isinstance(skin, int | float) and math.isfinite(skin) and skin > 0):
        raise ValueError(f"skin must be a positive number of Å, got {skin!r}")
    if precision is not None and precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    potential, params = _load(model)
    precision = precision or potential.dtype
    if precision in ("float64", "mixed"):
        from equiforce.potentials.precision import enable_x64

        enable_x64(f"relax with precision={precision!r}")
    net_dtype = "float64" if precision == "float64" else "float32"
    if potential.dtype != net_dtype:
        potential = potential.replace(dtype=net_dtype)
    potential.check_precision()
    params = jax.tree.map(lambda x: jnp.asarray(x, potential.jnp_dtype), params)
    dtype = np.float32 if precision == "float32" else np.float64

    if isinstance(structures, str | os.PathLike):
        structures = read_structures_for_relax(structures)
    elif isinstance(structures, Atoms):
        structures = [structures]
    structures = list(structures)
    if not structures:
        raise ValueError("no structures to relax")
    fixed_each = _per_structure_fixed(fixed, len(structures))
    prepared = [_prepare(k, a, potential, f, cell) for k, (a, f) in enumerate(zip(structures, fixed_each, strict=True))]

    mesh = _mesh(devices)
    order = np.argsort([len(p.numbers) for p in prepared], kind="stable")
    size = batch_size or len(prepared)
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    out_atoms: list[Any] = [None] * len(prepared)
    converged = np.zeros(len(prepared), bool)
    steps_out = np.zeros(len(prepared), np.int64)
    fmax_out = np.zeros(len(prepared))
    energy_out = np.zeros(len(prepared))
    for b, group in enumerate(groups):
        res = _relax_batch(
            potential, params, [prepared[k] for k in group], [int(k) for k in group], fmax, int(max_steps),
            cell, skin, dtype, mesh,
        )  # fmt: skip
        for j, k in enumerate(group):
            out_atoms[k], converged[k], steps_out[k], fmax_out[k], energy_out[k] = res[j]
        say(
            f"relax batch {b + 1}/{len(groups)}: {len(group)} structures, "
            f"{int(converged[group].sum())} converged, up to {int(steps_out[group].max())} steps"
        )
    return RelaxResult(out_atoms, converged, steps_out, fmax_out, energy_out, time.perf_counter() - t0)


def _relax_batch(potential, params, prepared, indices, fmax, max_steps, with_cell, skin, dtype, mesh):
    reach = float(potential.r_max) + float(skin)
    n_real_batch = len(prepared)
    n_dev = 1 if mesh is None else mesh.devices.size
    pad = (-n_real_batch) % n_dev
    members = prepared + [prepared[-1]] * pad  # padding structures: copies, marked done from the start
    positions = [p.positions.copy() for p in members]
    cells = [p.cell.copy() for p in members]
    graphs = [_graph(p, p.positions, p.cell, reach, f"structure {indices[min(j, n_real_batch - 1)]}")
              for j, p in enumerate(members)]  # fmt: skip
    n_nodes = bucket_size(max(len(p.numbers) for p in members) + 1, minimum=2, multiple=2)

    def edges_for(n):
        return bucket_size(max(math.ceil(n * 1.1), n + 1), minimum=32, multiple=32)

    n_edges = edges_for(max(g.n_edges for g in graphs))

    def stacked():
        gs = [
            _collate(p, g, pos, c, n_nodes, n_edges, dtype)
            for p, g, pos, c in zip(members, graphs, positions, cells, strict=True)
        ]
        return jax.tree.map(lambda *xs: np.stack(xs), *gs)

    def put(x, replicated=False):
        if mesh is None:
            return jnp.asarray(x)
        spec = jax.sharding.PartitionSpec() if replicated else jax.sharding.PartitionSpec("batch")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    n_rows = n_nodes + 3
    frozen = np.ones((len(members), n_rows), bool)
    for j, p in enumerate(members):
        n = len(p.numbers)
        frozen[j, :n] = p.fixed
        if with_cell:
            frozen[j, n_nodes:] = False
    ext = np.zeros((len(members), n_rows, 3), dtype)
    for j, p in enumerate(members):
        ext[j, : len(p.numbers)] = p.positions
    cell0 = np.stack([p.cell for p in members]).astype(dtype)
    n_real = np.array([len(p.numbers) for p in members], dtype)

    params = jax.tree.map(lambda x: put(x, True), params) if mesh is not None else params
    g_dev = jax.tree.map(put, stacked())
    cell0_d, n_real_d, frozen_d = put(cell0), put(n_real), put(frozen)
    chunk = _program(
        potential, with_cell, n_nodes, float(potential.r_max), reach, tuple(FIRE_PARAMETERS.items()), MAX_STEP
    )
    b_size = len(members)
    ext_d = put(ext)
    zeros = jnp.zeros_like(ext_d)
    state = minimize.FireDescentState(
        position=ext_d,
        momentum=zeros,
        force=zeros,
        mass=put(np.ones(b_size, dtype)),
        dt=put(np.full(b_size, FIRE_PARAMETERS["dt_start"], dtype)),
        alpha=put(np.full(b_size, FIRE_PARAMETERS["alpha_start"], dtype)),
        n_pos=put(np.zeros(b_size, np.int32)),
    )
    done = np.zeros(b_size, bool)
    done[n_real_batch:] = True
    steps = np.zeros(b_size, np.int32)
    while True:
        state, steps_d, done_d, waiting_d, fm_d, pos_d, cell_d, energy, forces, stress = chunk(
            params, state, g_dev, cell0_d, n_real_d, frozen_d, put(steps), put(done), max_steps, fmax
        )
        steps, done, waiting, fm = (np.asarray(x).copy() for x in (steps_d, done_d, waiting_d, fm_d))
        pos_h, cell_h = np.asarray(pos_d, np.float64), np.asarray(cell_d, np.float64)
        if waiting.any():
            for j in np.flatnonzero(waiting):
                n = len(members[j].numbers)
                positions[j], cells[j] = pos_h[j, :n], cell_h[j]
                where = f"structure {indices[min(j, n_real_batch - 1)]}"
                graphs[j] = _graph(members[j], positions[j], cells[j], reach, where)
            if max(g.n_edges for g in graphs) > n_edges:
                n_edges = edges_for(max(g.n_edges for g in graphs))
                chunk = _program(
                    potential,
                    with_cell,
                    n_nodes,
                    float(potential.r_max),
                    reach,
                    tuple(FIRE_PARAMETERS.items()),
                    MAX_STEP,
                )
            g_dev = jax.tree.map(put, stacked())
            continue
        if np.all(done | (steps >= max_steps)):
            break
    energy, forces, stress = (np.asarray(x, np.float64) for x in (energy, forces, stress))
    results = []
    for j in range(n_real_batch):
        p = members[j]
        n = len(p.numbers)
        atoms = p.atoms.copy()
        atoms.set_constraint()
        atoms.set_positions(pos_h[j, :n])
        if with_cell:
            atoms.set_cell(cell_h[j], scale_atoms=False)
        atoms.set_constraint([c.copy() for c in p.atoms.constraints])
        calc_results = {"energy": float(energy[j]), "free_energy": float(energy[j]), "forces": forces[j, :n].copy()}
        if np.all(p.pbc):
            calc_results["stress"] = stress[j].copy()
        atoms.calc = SinglePointCalculator(atoms, **calc_results)
        ok = bool(done[j])
        atoms.info.update(relax_converged=ok, relax_steps=int(steps[j]), relax_fmax=float(fm[j]))
        results.append((atoms, ok, int(steps[j]), float(fm[j]), float(energy[j])))
    return results


def write_relaxed(path: str | os.PathLike, atoms: Sequence[Atoms]) -> None:
    """Write relaxed structures to an extended-XYZ file atomically (energy, forces, stress and ``info``)."""
    import ase.io

    from equiforce.atomic import atomic_write_bytes

    buf = io.StringIO()
    ase.io.write(buf, list(atoms), format="extxyz")
    atomic_write_bytes(path, buf.getvalue().encode(), fault="relax")
