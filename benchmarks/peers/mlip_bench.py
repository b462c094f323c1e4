"""MD and training-step speed of InstaDeep's ``mlip`` (JAX) MACE, untrained, on CPU.

Run with the python of the ``mlip`` peer venv (see ``setup.sh``); never imports equiforce.

Model (protocol size): ``mlip.models.Mace`` with ``MaceConfig(num_layers=2, num_channels=64, l_max=3,
node_symmetry=1, correlation=3, num_rbf=8)`` (other fields at their defaults: polynomial envelope, radial MLP
[64, 64, 64], readout 16x0e), ``DatasetInfo`` with r_max 5 Å, species H C N O with atomic energies 0,
avg_num_neighbors = mean neighbour count of the structure; ``ForceField.from_mlip_network(..., seed=0)``.
float64: ``jax_enable_x64`` is switched on and every floating parameter is cast to float64 (mlip has no dtype
option of its own; flax initialises parameters in float32).

MD paths:

* ``jax-md`` (default): mlip's ``JaxMDSimulationEngine`` with ``MDIntegrator.NVE_VELOCITY_VERLET``,
  ``num_steps = chunk * (chunks + 1)`` split into ``chunks + 1`` episodes of ``chunk`` steps. Each episode is
  one ``jax.lax.fori_loop`` of the jitted step (mlip's design); the engine hands control back and calls its
  loggers after every episode, so a chunk's wall time is the time between two logger calls (it includes the
  engine's own per-episode host work: copying the trajectory log, checking the neighbour buffer). The first
  chunk ``first_call_s`` is timed from the engine's construction (neighbour-list allocation, initial forces,
  compilation) to the first logger call; ``init_s`` is the construction alone. The MB velocities set on the
  ``ase.Atoms`` are picked up by the engine (it restores non-zero velocities). mlip's jax-md neighbour list
  has no skin (``dr_threshold`` 0, rebuilt every step, no cell list); ``--skin`` is ignored.
* ``ase``: mlip's ``MLIPForceFieldASECalculator`` (jitted ``force_field.calculate``, graph padded to a fixed
  size) driven by ``ase.md.verlet.VelocityVerlet``; a chunk is one ``dyn.run(N)``.

Training: ``optax.adam(1e-3)`` step, jitted, on one padded batch of ``--train-batch`` frames (mlip's own
``dynamically_batch`` padding), loss = MSE(E) + 10·MSE(F) over the real graphs/atoms, forces by autograd
inside mlip's ``ConservativePredictor``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from importlib.metadata import version
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np
import optax
from mlip.data import DatasetInfo
from mlip.data.chemical_system import ChemicalSystem
from mlip.data.helpers.dynamically_batch import dynamically_batch
from mlip.graph import Graph
from mlip.models import ForceField, Mace
from mlip.simulation.ase.mlip_ase_calculator import MLIPForceFieldASECalculator
from mlip.simulation.enums import MDIntegrator, SimulationType
from mlip.simulation.jax_md import JaxMDSimulationEngine
from peer_common import (
    ATOMIC_NUMBERS,
    SEED,
    base_result,
    build_parser,
    count_pairs,
    init_velocities,
    phase,
    read_structure,
    read_training_frames,
    record_chunks,
    record_training,
    run_ase_md,
    summary_line,
    timed,
    training_targets,
    write_json,
)

EDGE_CAPACITY_MULTIPLIER = 1.25  # mlip's default padding of the edge arrays


def build_force_field(r_max: float, avg_num_neighbors: float, dtype: str) -> ForceField:
    """The protocol-size mlip MACE with random parameters from seed 0, parameters cast to ``dtype``."""
    info = DatasetInfo(
        atomic_energies_map={z: 0.0 for z in ATOMIC_NUMBERS},
        graph_cutoff_angstrom=r_max,
        avg_num_neighbors=avg_num_neighbors,
    )
    config = Mace.Config(num_layers=2, num_channels=64, l_max=3, node_symmetry=1, correlation=3, num_rbf=8)
    ff = ForceField.from_mlip_network(Mace(config=config, dataset_info=info), seed=SEED)
    if dtype == "float64":
        params = jax.tree.map(
            lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, ff.params
        )
        ff = dataclasses.replace(ff, params=params)
    return ff


def count_params(ff: ForceField) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(ff.params)))


def run_jax_md(args: Any, atoms: ase.Atoms, ff: ForceField, result: dict[str, Any]) -> ase.Atoms:
    """mlip's jax-md engine, ``chunks + 1`` episodes of ``chunk`` steps; returns the final structure."""
    init_velocities(atoms, args.temperature_K)
    config = JaxMDSimulationEngine.Config(
        simulation_type=SimulationType.MD,
        md_integrator=MDIntegrator.NVE_VELOCITY_VERLET,
        num_steps=args.chunk * (args.chunks + 1),
        num_episodes=args.chunks + 1,
        timestep_fs=args.timestep_fs,
        temperature_kelvin=args.temperature_K,
        edge_capacity_multiplier=EDGE_CAPACITY_MULTIPLIER,
        random_seed=SEED,
    )
    stamps: list[float] = []
    t0 = time.perf_counter()
    engine = JaxMDSimulationEngine(atoms, ff, config)
    result["init_s"] = time.perf_counter() - t0
    engine.attach_logger(lambda _state: stamps.append(time.perf_counter()))
    engine.run()
    if not stamps:
        raise RuntimeError("the engine ran no episode")
    result["first_call_s"] = stamps[0] - t0
    record_chunks(result, list(np.diff(stamps)), len(atoms))
    if len(stamps) < args.chunks + 1:
        result["notes"].append(f"engine stopped after {len(stamps)} episodes (simulation exploded)")
    state = engine.state
    energies = np.asarray(state.potential_energy)
    result["energy_start"] = float(energies[min(args.chunk, len(energies) - 1)])  # logged before each step
    result["energy_end"] = float(energies[-1])
    final = atoms.copy()
    final.positions = np.asarray(state.positions[-1])
    if not (np.all(np.isfinite(energies)) and np.all(np.isfinite(np.asarray(state.forces)))):
        raise FloatingPointError("non-finite energy or forces in the MD")
    return final


def training_graph(frames: list[ase.Atoms], r_max: float) -> Graph:
    """All ``frames`` in one graph batch padded by mlip (one padding graph, as its data loaders do)."""
    graphs = [
        Graph.from_chemical_system(ChemicalSystem.from_ase_atoms(f, get_property_fields=False), r_max) for f in frames
    ]
    n_node = sum(int(np.sum(g.n_node)) for g in graphs)
    n_edge = sum(int(np.sum(g.n_edge)) for g in graphs)
    return next(dynamically_batch(graphs, n_node=n_node + 1, n_edge=n_edge + 1, n_graph=len(graphs) + 1))


def run_training(args: Any, avg_num_neighbors: float, result: dict[str, Any]) -> None:
    """Jitted optax Adam steps on one batch: the first (compilation) and ``args.train_steps`` timed ones."""
    frames = read_training_frames(args.train_data, args.train_batch)
    e_ref, f_ref = training_targets(frames)
    graph = training_graph(frames, args.r_max)
    n_graphs, n_atoms = len(frames), len(f_ref)  # padding nodes and the padding graph come last
    ff = build_force_field(args.r_max, avg_num_neighbors, args.dtype)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    e_ref, f_ref = jnp.asarray(e_ref, dtype), jnp.asarray(f_ref, dtype)
    opt = optax.adam(1e-3)

    def loss_fn(params: Any, graph: Graph) -> jax.Array:
        pred = ff.predictor.apply(params, graph).to_prediction()
        mse_e = jnp.mean((pred.energy[:n_graphs] - e_ref) ** 2)
        mse_f = jnp.mean((pred.forces[:n_atoms] - f_ref) ** 2)
        return mse_e + 10.0 * mse_f

    @jax.jit
    def step(params: Any, opt_state: Any, graph: Graph) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, graph)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    carry = [ff.params, opt.init(ff.params), None]

    def one_step() -> None:
        carry[:] = step(carry[0], carry[1], graph)
        jax.block_until_ready(carry)

    first = timed(one_step)
    steps = [timed(one_step) for _ in range(args.train_steps)]
    loss = float(carry[2])
    if not np.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss}")
    record_training(result, first, steps, loss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser(__doc__.splitlines()[0], ["jax-md", "ase"]).parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    result = base_result(args, "mlip", version("mlip"), args.md_path)
    result["init_s"] = None
    result["versions"] = {
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "jax-md": version("jax-md"),
        "flax": version("flax"),
        "e3nn-jax": version("e3nn-jax"),
        "optax": version("optax"),
        "ase": version("ase"),
    }
    result["notes"].append(f"jax devices {[str(d) for d in jax.devices()]}")
    avg_nn = 0.0
    ff = None
    with phase(result, "setup"):
        atoms = read_structure(args.structure)
        result["n_atoms"] = len(atoms)
        result["pairs_start"] = count_pairs(atoms, args.r_max)
        avg_nn = result["pairs_start"] / len(atoms)
        ff = build_force_field(args.r_max, avg_nn, args.dtype)
        result["n_params"] = count_params(ff)
    if ff is not None:
        final = None
        with phase(result, "md"):
            if args.md_path == "jax-md":
                final = run_jax_md(args, atoms, ff, result)
            else:
                calc = MLIPForceFieldASECalculator(atoms, EDGE_CAPACITY_MULTIPLIER, ff)
                run_ase_md(args, atoms, calc, result)
                final = atoms
        if final is not None:
            with phase(result, "pairs_end"):
                result["pairs_end"] = count_pairs(final, args.r_max)
    if args.train_data:
        with phase(result, "train"):
            run_training(args, avg_nn, result)
    write_json(args.json, result)
    print(summary_line(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["error"] is None else 1)
