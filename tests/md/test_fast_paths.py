"""The engine's fast paths change cost, not physics: compacted edges, cell lists and mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from equiforce.data import load_sample
from equiforce.md.engine import MDConfig, MDEngine
from equiforce.md.run import energy_drift
from equiforce.md.system import make_system
from equiforce.potentials import config_from_dict
from equiforce.potentials.potential import Potential


@pytest.fixture(scope="module")
def aspirin():
    atoms = load_sample("test").to_atoms(0)
    atoms.calc = None
    return atoms


def _run(system, config, atoms, n_chunks, log=None):
    engine = MDEngine(system, config, log=log or (lambda _: None))
    state = engine.init(atoms.get_positions())
    frames, positions = [], []
    for _ in range(n_chunks):
        state, frame = engine.run_chunk(state)
        frames.append(frame)
        positions.append(engine.positions(state))
    return engine, state, frames, np.array(positions)


def test_compacted_edges_give_the_same_trajectory(aspirin_potential, aspirin):
    """Only pairs within r_max reach the network, in fewer slots than the neighbour list holds, and the
    trajectory is the one of the full list (float64, to 1e-9 Å)."""
    potential, params = aspirin_potential
    system = make_system(potential, params, aspirin)
    cfg = MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=25)
    compact, _, _, pos_compact = _run(system, cfg, aspirin, 4)
    full, _, _, pos_full = _run(
        system, MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=25, compact_edges=False), aspirin, 4
    )
    assert full.edge_capacity is None
    assert compact.edge_capacity < int(compact.neighbor.idx.shape[-1])
    np.testing.assert_allclose(pos_compact, pos_full, rtol=0, atol=1e-9)


def test_edge_overflow_enlarges_capacity_and_reruns_the_chunk(aspirin_potential, aspirin):
    """Too few edge slots for the pairs within r_max: the chunk is re-run with more, no pair is dropped."""
    potential, params = aspirin_potential
    system = make_system(potential, params, aspirin)
    cfg = MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=25)
    messages = []
    engine = MDEngine(system, cfg, log=messages.append)
    state = engine.init(aspirin.get_positions())
    pairs = int(system.edge_count(state.position, engine.neighbor))
    engine._bind(pairs // 2)  # as if allocated on a sparser structure
    positions = []
    for _ in range(3):
        state, _ = engine.run_chunk(state)
        positions.append(engine.positions(state))
    assert engine.reallocations >= 1 and engine.edge_capacity >= pairs
    assert any("edge overflow" in m for m in messages)
    _, _, _, reference = _run(system, cfg, aspirin, 3)
    np.testing.assert_allclose(np.array(positions), reference, rtol=0, atol=1e-9)


def _water_box(n_side: int, spacing: float = 3.1) -> Atoms:
    h2o = molecule("H2O")
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) * spacing + 1.0
    rng = np.random.default_rng(0)
    positions = (grid[:, None, :] + h2o.positions[None] + rng.normal(0, 0.05, (len(grid), 3, 3))).reshape(-1, 3)
    atoms = Atoms("OH2" * len(grid), positions=positions, cell=[n_side * spacing] * 3, pbc=True)
    atoms.wrap()
    return atoms


def _water_potential(name: str = "nequip", **hp):
    potential = Potential(
        model=config_from_dict({"name": name, "num_interactions": 1, "num_features": 4, **hp}),
        species=(1, 8),
        r_max=3.0,
        atomic_energies=(0.0, 0.0),
        avg_num_neighbours=10.0,
        dtype="float64",
    )
    return potential, potential.init(jax.random.PRNGKey(0))


def test_cell_list_gives_the_same_trajectory_as_all_pairs():
    """A periodic water box with a cell list (O(N) rebuilds) follows the all-pairs list's trajectory."""
    potential, params = _water_potential(l_max=1, parity=False)
    atoms = _water_box(4)  # 12.4 Å > 3 (r_max + skin) = 10.5 Å
    cfg = MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=10, skin=0.5)
    with_cells = make_system(potential, params, atoms, skin=0.5)
    assert with_cells.cell_list
    without = make_system(potential, params, atoms, skin=0.5, cell_list=False)
    assert not without.cell_list
    _, _, frames_cells, pos_cells = _run(with_cells, cfg, atoms, 3)
    _, _, frames_all, pos_all = _run(without, cfg, atoms, 3)
    np.testing.assert_allclose(pos_cells, pos_all, rtol=0, atol=1e-9)
    np.testing.assert_allclose([f.potential_energy for f in frames_cells], [f.potential_energy for f in frames_all])
    with pytest.raises(ValueError, match="cell list"):
        make_system(potential, params, _water_box(3), skin=0.5, cell_list=True)  # 9.3 Å: too small


@pytest.mark.slow  # 47 s; CI's tutorial step runs mixed-precision NVE too (examples/precision.py)
def test_mixed_precision_conserves_energy_like_float64(aspirin_potential, aspirin):
    """Mixed precision (float32 network, float64 integrator and energy sums) keeps the conserved energy's
    drift within 2x of full float64 (plus a 0.05 meV/atom/ps floor for the noise of a short run), and its
    energies and forces agree with the float64 network's to float32 accuracy."""
    potential, params = aspirin_potential
    cfg = MDConfig(ensemble="nve", timestep_fs=0.25, temperature_K=300.0, report_interval=50)
    results = {}
    for precision in ("float64", "mixed"):
        system = make_system(potential, params, aspirin, precision=precision)
        assert system.dtype == jnp.float64 and system.precision == precision
        engine, state, frames, _ = _run(system, cfg, aspirin, 10)
        assert state.position.dtype == jnp.float64 and state.momentum.dtype == jnp.float64
        results[precision] = (frames, engine.forces(state), state)
    drift64, fluct64 = energy_drift(results["float64"][0], len(aspirin))
    drift_mixed, fluct_mixed = energy_drift(results["mixed"][0], len(aspirin))
    assert abs(drift_mixed) <= 2.0 * abs(drift64) + 0.05, (drift_mixed, drift64)
    assert fluct_mixed <= 2.0 * fluct64 + 0.05, (fluct_mixed, fluct64)

    # the same state evaluated by both: float32 network accuracy
    system64 = make_system(potential, params, aspirin, precision="float64")
    system_mixed = make_system(potential, params, aspirin, precision="mixed")
    engine = MDEngine(system64, cfg, log=lambda _: None)
    state = engine.init(aspirin.get_positions())
    e64 = float(system64.energy_fn(state.position, engine.neighbor))
    e_mixed = system_mixed.energy_fn(state.position, engine.neighbor)
    assert e_mixed.dtype == jnp.float64
    assert abs(float(e_mixed) - e64) < 1e-4 * max(1.0, abs(e64))
    f64 = -jax.grad(system64.energy_fn)(state.position, engine.neighbor)
    f_mixed = -jax.grad(system_mixed.energy_fn)(state.position, engine.neighbor)
    assert f_mixed.dtype == jnp.float64
    np.testing.assert_allclose(
        np.asarray(f_mixed), np.asarray(f64), rtol=0, atol=1e-4 * float(jnp.abs(f64).max()) + 1e-5
    )


def test_precision_errors(aspirin_potential, aspirin):
    potential, params = aspirin_potential
    with pytest.raises(ValueError, match="precision"):
        make_system(potential, params, aspirin, precision="bfloat16")
    with pytest.raises(ValueError, match="cell list"):
        make_system(potential, params, aspirin, cell_list=True)  # free space
    system = make_system(potential, params, aspirin, precision="float32")
    assert system.dtype == jnp.float32


def test_half_list_gives_the_full_lists_trajectory(aspirin_potential, aspirin):
    """Each pair once (OrderedSparse, the default): half the neighbour-list pairs and edge slots, the full
    list's trajectory and energies (float64, 1e-9 Å) for a molecule."""
    potential, params = aspirin_potential
    half = make_system(potential, params, aspirin)
    full = make_system(potential, params, aspirin, half_list=False)
    assert half.half_list and not full.half_list
    cfg = MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=25)
    engine_half, _, frames_half, pos_half = _run(half, cfg, aspirin, 3)
    engine_full, _, frames_full, pos_full = _run(full, cfg, aspirin, 3)
    n = len(aspirin)
    assert 2 * int(np.sum(engine_half.neighbor.idx[0] < n)) == int(np.sum(engine_full.neighbor.idx[0] < n))
    assert engine_half.edge_capacity < engine_full.edge_capacity
    np.testing.assert_allclose(pos_half, pos_full, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        [f.potential_energy for f in frames_half], [f.potential_energy for f in frames_full], rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("name", [pytest.param("mace", marks=pytest.mark.slow), "schnet"])
def test_half_list_gives_the_full_lists_trajectory_in_a_periodic_box(name):
    """The same for a periodic water box with a cell list, for a model that evaluates each pair once (MACE)
    and one that expands the half list (SchNet)."""
    hp = {"l_max": 1, "correlation": 2, "hidden_l_max": 1} if name == "mace" else {"num_filters": 4, "num_rbf": 4}
    potential, params = _water_potential(name, **hp)
    atoms = _water_box(4)
    cfg = MDConfig(ensemble="nve", timestep_fs=0.5, report_interval=10, skin=0.5)
    half = make_system(potential, params, atoms, skin=0.5)
    full = make_system(potential, params, atoms, skin=0.5, half_list=False)
    assert half.cell_list and half.half_list
    _, _, frames_half, pos_half = _run(half, cfg, atoms, 2)
    _, _, frames_full, pos_full = _run(full, cfg, atoms, 2)
    np.testing.assert_allclose(pos_half, pos_full, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        [f.potential_energy for f in frames_half], [f.potential_energy for f in frames_full], rtol=0, atol=1e-9
    )
