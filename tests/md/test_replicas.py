"""Many replicas in one program (equiforce.md.replicas): each replica equals its own single run_md, different
sizes, per-replica thermostats, a blow-up stops only its replica, a neighbour-list overflow in one replica is
re-run without losing steps, unknown species are named with the replica, and 4 simulated devices give the
trajectories of 1; periodic replicas (water boxes, their own cells) with Nosé–Hoover, restart of a killed
replica run, and `equiforce md` with several structures.

The references are single runs with the same seeds, temperatures and frictions (float64): agreement to 1e-9 Å
means the same arithmetic (observed ~1e-16; only the padding and the order of a few sums differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from equiforce.cli import main
from equiforce.data.errors import DataError
from equiforce.md import ReplicaEngine, ReplicasResult, read_h5md, run_md, run_replicas
from equiforce.md import replicas as replicas_module
from equiforce.md.run import load_structure
from equiforce.potentials import UnknownSpeciesError
from equiforce.potentials.potential import Potential
from equiforce.potentials.registry import config_from_dict

STEPS, INTERVAL = 60, 20
# (structure, seed, temperature K, friction 1/ps): aspirin (21 atoms), salicylic acid (16), aspirin
CASES = [
    ("sample:test:0", 11, 300.0, 5.0),
    ("sample:salicylic:test:0", 12, 400.0, 2.0),
    ("sample:test:3", 13, 500.0, 1.0),
]
KW = {"ensemble": "nvt_langevin", "timestep_fs": 0.5, "report_interval": INTERVAL, "progress": False}


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def singles(trained_aspirin_model, tmp_path_factory):
    """One run_md per case: its H5MD frames and thermo rows."""
    out = tmp_path_factory.mktemp("singles")
    refs = []
    for k, (spec, seed, temperature, friction) in enumerate(CASES):
        run_md(
            trained_aspirin_model,
            spec,
            seed=seed,
            temperature_K=temperature,
            friction_per_ps=friction,
            steps=STEPS,
            trajectory=out / f"s{k}.h5",
            thermo=out / f"s{k}.csv",
            log=_quiet,
            **KW,
        )
        refs.append((read_h5md(out / f"s{k}.h5"), np.genfromtxt(out / f"s{k}.csv", delimiter=",", names=True)))
    return refs


def test_replicas_equal_separate_runs(trained_aspirin_model, singles, tmp_path):
    """Three replicas of two sizes (21, 16, 21 atoms), each with its own seed, Langevin temperature and friction,
    through run_md with a list: every replica's trajectory (positions, velocities) and thermo (conserved quantity
    with the bath heat) equal its single run's."""
    result = run_md(
        trained_aspirin_model,
        [spec for spec, *_ in CASES],
        seed=[c[1] for c in CASES],
        temperature_K=[c[2] for c in CASES],
        friction_per_ps=[c[3] for c in CASES],
        steps=STEPS,
        trajectory=tmp_path / "r_{replica}.h5",
        thermo=tmp_path / "r.csv",  # a plain path: r_0.csv, r_1.csv, r_2.csv
        log=_quiet,
        **KW,
    )
    assert isinstance(result, ReplicasResult)
    assert result.padded_atoms == 21 and result.n_devices == 1 and result.reallocations == 0
    for k, (ref, ref_thermo) in enumerate(singles):
        rep = result.replicas[k]
        assert rep.stopped_because is None and rep.steps == STEPS
        assert rep.n_atoms == len(load_structure(CASES[k][0]))
        traj = read_h5md(tmp_path / f"r_{k}.h5")
        assert list(traj["step"]) == list(ref["step"]) == [0, 20, 40, 60]
        np.testing.assert_allclose(traj["positions"], ref["positions"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(traj["velocities"], ref["velocities"], rtol=0, atol=1e-9)
        assert np.ptp(traj["positions"][:, 0, 0]) > 1e-3  # the atoms moved: not a trivial agreement
        thermo = np.genfromtxt(tmp_path / f"r_{k}.csv", delimiter=",", names=True)
        np.testing.assert_allclose(thermo["conserved_eV"], ref_thermo["conserved_eV"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(thermo["temperature_K"], ref_thermo["temperature_K"], rtol=1e-9)
        np.testing.assert_allclose(rep.final_atoms.get_positions(), ref["positions"][-1], rtol=0, atol=1e-9)
    # the per-replica temperatures were applied: each starts exactly at its own
    assert [r.frames[0].temperature for r in result.replicas] == pytest.approx([c[2] for c in CASES], rel=1e-9)


def test_blow_up_stops_only_its_replica(trained_aspirin_model, singles, tmp_path):
    """The middle replica's bath is at 10^5 K (friction 5/ps; it starts at 300 K from given velocities):
    it passes the 2·10^4 K limit within the run and stops with its last good frame; the other two replicas run
    all their steps and equal their single runs."""
    hot = load_structure(CASES[1][0])
    MaxwellBoltzmannDistribution(hot, temperature_K=300.0, rng=np.random.default_rng(0))
    structures = [load_structure(CASES[0][0]), hot, load_structure(CASES[2][0])]
    messages = []
    result = run_replicas(
        trained_aspirin_model,
        structures,
        seed=[c[1] for c in CASES],
        temperature_K=[CASES[0][2], 1.0e5, CASES[2][2]],
        friction_per_ps=[CASES[0][3], 5.0, CASES[2][3]],
        steps=STEPS,
        max_temperature_K=2.0e4,
        trajectory=tmp_path / "b_{replica}.h5",
        log=messages.append,
        **KW,
    )
    stopped = result.replicas[1]
    assert stopped.stopped_because is not None and "replica 1 blew up at step" in stopped.stopped_because
    assert 0 < stopped.steps < STEPS, stopped.stopped_because  # it ran at least one chunk, then stopped mid-run
    assert stopped.frames[-1].temperature < 2.0e4
    traj = read_h5md(tmp_path / "b_1.h5")
    assert traj["step"][-1] == stopped.steps
    np.testing.assert_allclose(stopped.final_atoms.get_positions(), traj["positions"][-1], rtol=0, atol=1e-12)
    last_good = ase.io.read(tmp_path / "b_1_last_good.extxyz")
    np.testing.assert_allclose(last_good.get_positions(), traj["positions"][-1], atol=1e-8)
    assert any("replica 1 blew up" in m for m in messages)
    for k in (0, 2):
        rep = result.replicas[k]
        assert rep.stopped_because is None and rep.steps == STEPS
        np.testing.assert_allclose(
            read_h5md(tmp_path / f"b_{k}.h5")["positions"], singles[k][0]["positions"], atol=1e-9
        )


def test_overflow_in_one_replica_is_rerun(aspirin_potential, singles):
    """Lists too small for replica 1 (aspirin) but not for replica 0 (salicylic acid): the first chunk
    overflows in replica 1 only, every list is enlarged and the chunk re-run from its start; both trajectories
    then equal their single runs (with the too-small list, aspirin would have lost pairs and forces)."""
    potential, params = aspirin_potential
    cases = [CASES[1], CASES[0]]
    messages = []
    engine = ReplicaEngine(
        potential,
        params,
        [load_structure(c[0]) for c in cases],
        seed=[c[1] for c in cases],
        temperature_K=[c[2] for c in cases],
        friction_per_ps=[c[3] for c in cases],
        ensemble="nvt_langevin",
        timestep_fs=0.5,
        report_interval=INTERVAL,
        log=messages.append,
    )
    state = engine.init()
    counts = np.asarray(engine._counts(state.position, engine.consts))
    assert counts[0] + 4 < counts[1], counts
    engine.capacity = int(counts[0]) + 4
    engine.neighbor = engine.build_neighbors(state.position, engine.capacity)
    frames = []
    for _ in range(STEPS // INTERVAL):
        state, chunk_frames, stopped = engine.run_chunk(state)
        assert stopped == [None, None]
        frames.append(chunk_frames)
    assert engine.reallocations >= 1 and engine.capacity >= counts[1]
    assert "overflow in replica(s) [1] at step 0" in messages[0]
    host = jax.device_get(state)
    assert [f[0].step for f in frames] == [20, 40, 60]
    for i, ref in ((0, singles[1][0]), (1, singles[0][0])):
        np.testing.assert_allclose(engine.atoms(host, i).get_positions(), ref["positions"][-1], rtol=0, atol=1e-9)


def test_bad_input_is_named_before_anything_runs(trained_aspirin_model, tmp_path):
    aspirin = load_structure("sample:test:0")
    iron = Atoms("FeH", positions=[[0, 0, 0], [1.6, 0, 0]])
    with pytest.raises(UnknownSpeciesError, match=r"replica 2: species \['Fe'\]"):
        run_replicas(trained_aspirin_model, [aspirin, aspirin, iron], trajectory=tmp_path / "t_{replica}.h5", **KW)
    assert list(tmp_path.iterdir()) == []  # nothing ran, no file was written
    with pytest.raises(ValueError, match="99 devices requested"):
        run_replicas(trained_aspirin_model, [aspirin], devices=99, **KW)
    with pytest.raises(ValueError, match="2 entries for 3 replicas"):
        run_replicas(trained_aspirin_model, [aspirin] * 3, seed=[1, 2], **KW)
    with pytest.raises(ValueError, match="NPT changes each replica's box"):
        run_replicas(trained_aspirin_model, [aspirin], **{**KW, "ensemble": "npt_nose_hoover"})
    box = aspirin.copy()
    box.set_cell([20.0] * 3)
    box.pbc = True
    with pytest.raises(ValueError, match="replica 1 is periodic but replica 0 is not"):
        run_replicas(trained_aspirin_model, [aspirin, box], **KW)
    small = box.copy()
    small.set_cell([6.0] * 3)
    with pytest.raises(DataError, match=r"replica 1: r_max .* longer than half the shortest cell height"):
        run_replicas(trained_aspirin_model, [box, small], **KW)
    with pytest.raises(ValueError, match="restart=True needs the trajectory"):
        run_md(trained_aspirin_model, [aspirin, aspirin], restart=True, **KW)
    with pytest.raises(ValueError, match="pressure_GPa"):
        run_md(trained_aspirin_model, [aspirin, aspirin], pressure_GPa=1.0, **KW)


SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    from equiforce.md import ReplicaEngine
    from equiforce.md.run import load_potential, load_structure

    model, cases, steps, interval = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    potential, params = load_potential(model)
    engine = ReplicaEngine(
        potential, params, [load_structure(c[0]) for c in cases], seed=[c[1] for c in cases],
        temperature_K=[c[2] for c in cases], friction_per_ps=[c[3] for c in cases], ensemble="nvt_langevin",
        timestep_fs=0.5, report_interval=interval, devices=4, log=lambda _: None)
    state = engine.init()
    for _ in range(steps // interval):
        state, _, _ = engine.run_chunk(state)
    host = jax.device_get(state)
    print(json.dumps({
        "n_devices": len(jax.devices()),
        "used": engine.n_devices,
        "positions": [engine.atoms(host, i).get_positions().tolist() for i in range(len(cases))],
        "state_devices": len(state.position.sharding.device_set),
        "shards": [list(s.data.shape) for s in state.position.addressable_shards],
    }))
    """
)


def test_four_devices_equal_one(trained_aspirin_model, singles):
    """JAX fixes its device count at start-up, so this runs in a subprocess with 4 simulated CPU devices: the
    three replicas (padded to four, one per device) end where their single runs on one device end, and the
    state stays sharded, one replica per device, after the chunks."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    args = [trained_aspirin_model, json.dumps(CASES), str(STEPS), str(INTERVAL)]
    done = subprocess.run([sys.executable, "-c", SHARDED, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 4 and out["used"] == 4
    assert out["state_devices"] == 4 and out["shards"] == [[1, 21, 3]] * 4
    for k, (ref, _) in enumerate(singles):
        np.testing.assert_allclose(np.array(out["positions"][k]), ref["positions"][-1], rtol=0, atol=1e-9)


def test_cli_runs_several_structures_as_replicas(trained_aspirin_model, singles, tmp_path, capsys):
    """`equiforce md MODEL A B C` with per-structure temperatures and frictions, a seed (replica k: seed + k),
    `{replica}` in --out and --devices: the three trajectories equal the single runs (the program is the one
    test_replicas_equal_separate_runs compiled)."""
    args = ["md", trained_aspirin_model, *[c[0] for c in CASES], "--ensemble", "nvt_langevin", "--timestep", "0.5"]
    args += ["--temperature", *[str(c[2]) for c in CASES], "--friction", *[str(c[3]) for c in CASES]]
    args += ["--seed", "11", "--steps", str(STEPS), "--report-interval", str(INTERVAL), "--devices", "1"]
    args += ["--out", str(tmp_path / "c_{replica}.h5"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 replicas of nvt_langevin on 1 device(s), padded to 21 atoms" in printed
    assert f"replica 1 (16 atoms): step {STEPS}" in printed
    for k, (ref, _) in enumerate(singles):
        traj = read_h5md(tmp_path / f"c_{k}.h5")
        np.testing.assert_allclose(traj["positions"], ref["positions"], rtol=0, atol=1e-9)
    assert main(["md", trained_aspirin_model, CASES[0][0], "--temperature", "300", "400", "--steps", "1"]) != 0
    assert "--temperature takes one value per structure; got 2 for one" in capsys.readouterr().err


# ---------------------------------------------------------------- periodic replicas: water boxes, Nosé–Hoover
WATER_STEPS, WATER_INTERVAL = 60, 20


def _water_box(reps: tuple[int, int, int], tilt: float = 0.0, seed: int = 0, spacing: float = 3.2) -> Atoms:
    """Waters on a grid ``spacing`` Å apart, rattled, in a periodic cell (``tilt``: b's x component, Å)."""
    h2o = molecule("H2O")
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3) * spacing + 1.0
    rng = np.random.default_rng(seed)
    positions = (grid[:, None, :] + h2o.positions[None] + rng.normal(0, 0.05, (len(grid), 3, 3))).reshape(-1, 3)
    cell = np.diag(np.array(reps, float) * spacing)
    cell[1, 0] = tilt
    atoms = Atoms("OH2" * len(grid), positions=positions, cell=cell, pbc=True)
    atoms.wrap()
    return atoms


@pytest.fixture(scope="module")
def water():
    """A tiny NequIP (r_max 3 Å, random weights: forces enough to move the atoms) and three periodic replicas:
    24 waters' atoms in a 6.4 Å cube (12 padding atoms inside its cell), a hot copy of it, and 36 atoms in a
    triclinic 9.6 x 6.4 x 6.4 Å cell."""
    jax.config.update("jax_enable_x64", True)
    model = config_from_dict({"name": "nequip", "num_interactions": 1, "num_features": 4, "l_max": 1, "parity": False})
    potential = Potential(
        model=model, species=(1, 8), r_max=3.0, atomic_energies=(-1.0, -2.0), avg_num_neighbours=10.0, dtype="float64"
    )
    params = potential.init(jax.random.PRNGKey(0))
    small, big = _water_box((2, 2, 2)), _water_box((3, 2, 2), tilt=0.7, seed=1)
    return (potential, params), [small, small.copy(), big]


# replica 1 starts at 3·10^4 K, above the 2·10^4 K limit: it stops at its first step
WATER_KW = {
    "ensemble": "nvt_nose_hoover",
    "temperature_K": [300.0, 3.0e4, 400.0],
    "thermostat_tau_fs": [20.0, 20.0, 30.0],
    "seed": [3, 5, 4],
    "timestep_fs": 0.5,
    "skin": 0.5,
    "report_interval": WATER_INTERVAL,
    "max_temperature_K": 2.0e4,
    "progress": False,
    "log": _quiet,
}


@pytest.fixture(scope="module")
def water_run(water, tmp_path_factory):
    out = tmp_path_factory.mktemp("water")
    model, boxes = water
    result = run_replicas(
        model, boxes, steps=WATER_STEPS, trajectory=out / "a_{replica}.h5", thermo=out / "a_{replica}.csv", **WATER_KW
    )
    return result, out


def test_periodic_nose_hoover_replicas(water, water_run, tmp_path):
    """Periodic replicas, each its own cell, with Nosé–Hoover chains (per-replica temperature and time
    constant): the padded cubic replica equals its single run_md (positions, velocities, box, pressure and the
    extended-system conserved quantity); the triclinic one keeps its conserved quantity; the hot one stops
    alone; padding atoms (inside the small cell) are in no neighbour list, and each list holds exactly the
    minimum-image pairs (ASE's distances) within r_max + skin."""
    model, boxes = water
    result, out = water_run
    single = dict(WATER_KW, temperature_K=300.0, thermostat_tau_fs=20.0, seed=3)
    run_md(model, boxes[0], steps=WATER_STEPS, trajectory=tmp_path / "s.h5", thermo=tmp_path / "s.csv", **single)
    ref, rep = read_h5md(tmp_path / "s.h5"), read_h5md(out / "a_0.h5")
    assert list(rep["step"]) == list(ref["step"]) == [0, 20, 40, 60]
    # jax-md keeps the chain masses in float32; XLA folds the single run's constant kT into them in another
    # order, which may move them by a float32 ulp: agreement to that rounding, not float64's
    np.testing.assert_allclose(rep["positions"], ref["positions"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(rep["velocities"], ref["velocities"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(rep["box"], ref["box"])
    assert np.ptp(rep["positions"][:, 0, 0]) > 1e-2  # the atoms moved
    thermo, ref_thermo = (np.genfromtxt(p, delimiter=",", names=True) for p in (out / "a_0.csv", tmp_path / "s.csv"))
    for column in ("conserved_eV", "pressure_GPa", "volume_A3", "temperature_K"):
        np.testing.assert_allclose(thermo[column], ref_thermo[column], rtol=1e-6, atol=1e-8)
    big = result.replicas[2]
    assert big.stopped_because is None and big.steps == WATER_STEPS
    conserved = np.array([f.conserved for f in big.frames])
    kinetic = np.array([f.kinetic_energy for f in big.frames])
    assert np.ptp(conserved) < 0.02 * np.ptp(kinetic), (conserved, kinetic)  # the extended energy is kept
    hot = result.replicas[1]
    assert "replica 1 blew up at step 1" in hot.stopped_because and hot.steps == 0

    engine = ReplicaEngine(*model, boxes, skin=0.5, ensemble="nvt_nose_hoover")
    positions = engine._put(jnp.asarray(engine._padded_positions()))
    idx = np.asarray(engine.build_neighbors(positions, engine._capacity_for(positions)).idx)
    for k, atoms in enumerate(boxes):
        pairs = idx[k][:, idx[k][0] < engine.N]
        assert pairs.max(initial=0) < len(atoms)  # no padding atom
        assert pairs.shape[1] == np.sum(np.triu(atoms.get_all_distances(mic=True) < 3.5, k=1))


def test_restart_of_replicas_equals_uninterrupted_run(water, water_run, tmp_path, monkeypatch):
    """A replica run killed while writing step 40 (replica 0 wrote it, replica 2 did not; replica 1 had
    stopped), continued by the same call with restart=True: replica 2 catches up, both reach step 60 with the
    uninterrupted run's frames and thermo rows, and the stopped replica stays stopped."""
    model, boxes = water
    full, full_dir = water_run
    files = {"trajectory": tmp_path / "b_{replica}.h5", "thermo": tmp_path / "b_{replica}.csv"}

    class Killed(Exception):
        pass

    write, writes = replicas_module.RunOutputs.write, []

    def write_then_die(self, *args):
        writes.append(1)
        if len(writes) == 7:  # frame 0 x3, step 20 x2, step 40 of replica 0; killed at replica 2's
            raise Killed
        write(self, *args)

    monkeypatch.setattr(replicas_module.RunOutputs, "write", write_then_die)
    with pytest.raises(Killed):
        run_replicas(model, boxes, steps=WATER_STEPS, **files, **WATER_KW)
    monkeypatch.setattr(replicas_module.RunOutputs, "write", write)
    assert list(read_h5md(tmp_path / "b_2.h5")["step"]) == [0, 20]

    rest = run_replicas(model, boxes, steps=WATER_STEPS, restart=True, **files, **WATER_KW)
    assert rest.restarted_from == [40, 0, 20]
    assert [f.step for f in rest.replicas[0].frames] == [60]
    assert [f.step for f in rest.replicas[2].frames] == [40, 60]
    assert rest.replicas[1].stopped_because == full.replicas[1].stopped_because and not rest.replicas[1].frames
    for k in (0, 2):
        a, b = read_h5md(full_dir / f"a_{k}.h5"), read_h5md(tmp_path / f"b_{k}.h5")
        assert list(b["step"]) == list(a["step"]) == [0, 20, 40, 60]
        np.testing.assert_allclose(b["positions"], a["positions"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(b["velocities"], a["velocities"], rtol=0, atol=1e-7)
        ta = np.genfromtxt(full_dir / f"a_{k}.csv", delimiter=",", names=True)
        tb = np.genfromtxt(tmp_path / f"b_{k}.csv", delimiter=",", names=True)
        assert list(tb["step"]) == [0, 20, 40, 60]
        np.testing.assert_allclose(tb["conserved_eV"], ta["conserved_eV"], rtol=0, atol=1e-8)
    assert list(read_h5md(tmp_path / "b_1.h5")["step"]) == [0]
