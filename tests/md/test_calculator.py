"""EquiforceCalculator: ASE protocol, physics against finite differences and the direct Potential call,
compile counts over MD, optimisers, cell filters, constraints and input errors.

One tiny float64 NequIP (random parameters) is shared; the module-wide calculator is built from a saved
model file, so each test reuses its compiled functions. Tests that count compilations build their own.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

from equiforce.data import DataError, StructureSet
from equiforce.data.graph import PaddingBudget, collate
from equiforce.data.neighbours import build_neighbour_graph
from equiforce.md.calculator import EquiforceCalculator, bucket_size
from equiforce.potentials import NequIPConfig, Potential, UnknownSpeciesError, save_model
from tests.potentials.property_suite import crystal

R_MAX = 3.0


@pytest.fixture(scope="module")
def model():
    potential = Potential(
        NequIPConfig(num_interactions=1, num_features=4, l_max=1, radial_mlp_hidden=8),
        species=(1, 6, 8),
        r_max=R_MAX,
        atomic_energies=(-1.5, -3.25, -4.75),
        scale=1.3,
        shift=0.2,
        avg_num_neighbours=4.0,
        dtype="float64",
    )
    return potential, jax.jit(potential.init)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def calc(model, tmp_path_factory) -> EquiforceCalculator:
    """A calculator loaded from a model file (the path constructor)."""
    path = save_model(tmp_path_factory.mktemp("model") / "tiny.eqf", *model, metadata={"note": "test"})
    return EquiforceCalculator(path)


def ethanol(rattle: float = 0.0, seed: int = 0) -> Atoms:
    atoms = molecule("CH3CH2OH")  # 9 atoms: C2 H6 O
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def periodic_cell(seed: int = 0) -> Atoms:
    """5 atoms (H, C, O) in a triclinic cell smaller than 2 r_max; two atoms lie outside the cell."""
    return crystal(seed).to_atoms(0)


DIRECT_BUDGET = PaddingBudget(n_nodes=16, n_edges=256, n_graphs=2)  # fixed: the jitted direct call compiles once


@pytest.fixture(scope="module")
def direct(model):
    """Energy, forces, per-atom energies and stress from the Potential on a hand-collated graph."""
    potential, params = model
    evaluate = jax.jit(lambda p, g: potential(p, g, compute_stress=True))

    def run(atoms: Atoms):
        s = StructureSet(  # not from_atoms: it would read labels from the attached calculator
            atomic_numbers=atoms.numbers,
            positions=atoms.positions,
            n_atoms=[len(atoms)],
            cell=atoms.cell[:][None],
            pbc=atoms.pbc[None],
        )
        nb = build_neighbour_graph(s.positions, s.cell[0], s.pbc[0], potential.r_max)
        out = evaluate(params, collate(s, [nb], [0], DIRECT_BUDGET).graph)
        n = len(atoms)
        return float(out.energy[0]), np.asarray(out.forces)[:n], np.asarray(out.node_energies)[:n], out.stress[0]

    return run


# ---------------------------------------------------------------------------------------- construction
def test_path_and_from_potential_constructors_agree(model, calc):
    from_file = ethanol(0.05)
    from_file.calc = calc
    in_memory = ethanol(0.05)
    in_memory.calc = EquiforceCalculator.from_potential(*model)
    assert calc.header["metadata"] == {"note": "test"}
    assert calc.potential == model[0]
    assert from_file.get_potential_energy() == in_memory.get_potential_energy()
    np.testing.assert_array_equal(from_file.get_forces(), in_memory.get_forces())
    with pytest.raises(TypeError):
        EquiforceCalculator()


# ---------------------------------------------------------------------------------------- physics
def test_results_equal_direct_potential_call(direct, calc):
    atoms = ethanol(0.1)
    atoms.calc = calc
    energy, forces, node_e, _ = direct(atoms)
    got_e = atoms.get_potential_energy()
    assert isinstance(got_e, float)
    assert abs(got_e - energy) < 1e-10
    assert atoms.get_potential_energy(force_consistent=True) == got_e  # free_energy
    f = atoms.get_forces()
    assert f.dtype == np.float64 and f.shape == (9, 3)
    np.testing.assert_allclose(f, forces, rtol=0, atol=1e-10)
    e_atoms = atoms.get_potential_energies()
    np.testing.assert_allclose(e_atoms, node_e, rtol=0, atol=1e-10)
    assert abs(e_atoms.sum() - got_e) < 1e-10

    cryst = periodic_cell()
    cryst.calc = calc
    energy, forces, node_e, stress = direct(cryst)
    assert abs(cryst.get_potential_energy() - energy) < 1e-10
    np.testing.assert_allclose(cryst.get_forces(), forces, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cryst.get_potential_energies(), node_e, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cryst.get_stress(), stress, rtol=0, atol=1e-10)
    assert cryst.get_stress().shape == (6,)


def test_forces_match_finite_differences(calc):
    for atoms in (ethanol(0.1), periodic_cell()):
        atoms.calc = calc
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 0.05  # a non-trivial energy surface
        numerical = calculate_numerical_forces(atoms, eps=1e-4)
        np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-6)


def test_stress_matches_finite_strain(calc):
    atoms = periodic_cell(seed=1)
    atoms.calc = calc
    stress = atoms.get_stress()
    assert np.abs(stress).max() > 1e-3
    numerical = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(stress, numerical, rtol=0, atol=1e-7)


def test_atoms_outside_the_cell_give_the_wrapped_results(calc):
    inside = periodic_cell(seed=2)
    inside.wrap()
    outside = inside.copy()
    outside.positions[0] += 2 * inside.cell[0] - inside.cell[2]
    outside.positions[3] -= 3 * inside.cell[1]
    assert not np.allclose(outside.get_scaled_positions(wrap=False) % 1.0, outside.get_scaled_positions(wrap=False))
    inside.calc = calc
    outside.calc = calc
    assert abs(inside.get_potential_energy() - outside.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(outside.get_forces(), inside.get_forces(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(outside.get_stress(), inside.get_stress(), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(outside.positions[0], inside.positions[0] + 2 * inside.cell[0] - inside.cell[2])


# ---------------------------------------------------------------------------------------- compilation
def test_bucket_ladder():
    ladder = sorted({bucket_size(v, minimum=64, multiple=64) for v in range(1, 5000)})
    assert ladder[:5] == [64, 128, 192, 256, 320]
    assert all(b % 64 == 0 for b in ladder)
    assert all(b2 / b1 <= 1.5 for b1, b2 in itertools.pairwise(ladder[4:]))  # geometric, not linear
    assert len(ladder) < 20
    for v in (1, 63, 64, 65, 1000, 4999):
        b = bucket_size(v, minimum=64, multiple=64)
        assert b >= v and b in ladder
    assert bucket_size(10, minimum=8, multiple=8) == 16
    with pytest.raises(ValueError):
        bucket_size(10, minimum=8, multiple=8, growth=1.0)


def test_md_run_compiles_once(model):
    # the untrained test model lets two H atoms of ethanol come to 0.48 Å within 100 steps: allow it here
    calc = EquiforceCalculator.from_potential(*model, min_distance=0.1)
    atoms = ethanol()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    edges, total = [], []

    def record():
        edges.append(build_neighbour_graph(atoms.positions, atoms.cell, atoms.pbc, R_MAX, min_distance=0.1).n_edges)
        total.append(atoms.get_total_energy())

    dyn.attach(record)
    dyn.run(100)
    assert len(edges) == 101
    assert len(set(edges)) > 3, "the edge count should fluctuate during the run"
    assert calc.trace_count <= 2
    assert calc.trace_count == 1
    assert max(total) - min(total) < 0.05  # VelocityVerlet conserves energy: forces are -dE/dx


def test_budget_grows_once_and_never_shrinks(model):
    calc = EquiforceCalculator.from_potential(*model)
    atoms = ethanol()
    atoms.calc = calc
    atoms.get_potential_energy()
    first = calc.budget
    n_edges = build_neighbour_graph(atoms.positions, atoms.cell, atoms.pbc, R_MAX).n_edges
    assert first.n_edges >= n_edges * 1.1 and first.n_nodes >= len(atoms) + 1
    centre = atoms.positions.mean(0)
    compressed = centre + 0.6 * (atoms.positions - centre)  # more pairs within r_max: exceeds the budget
    assert build_neighbour_graph(compressed, atoms.cell, atoms.pbc, R_MAX).n_edges > first.n_edges
    original = atoms.positions.copy()
    for _ in range(3):  # oscillate between the two sizes
        atoms.positions = compressed
        atoms.get_forces()
        atoms.positions = original
        atoms.get_forces()
    assert calc.budget.n_edges > first.n_edges and calc.budget.n_nodes == first.n_nodes
    assert calc.trace_count == 2  # the first budget and the grown one, then no more

    # a different system chooses its buckets afresh (a smaller shape: one more compilation)
    water = molecule("H2O")
    water.calc = calc
    water.get_potential_energy()
    assert calc.budget.n_nodes < first.n_nodes
    assert calc.trace_count == 3


# ---------------------------------------------------------------------------------------- ASE drivers
def test_bfgs_relaxation_with_fixed_atoms(calc):
    atoms = ethanol(rattle=0.15, seed=1)
    atoms.set_constraint(FixAtoms(indices=[0, 2]))
    fixed = atoms.positions[[0, 2]].copy()
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    f0 = np.linalg.norm(atoms.get_forces(), axis=1).max()
    opt = BFGS(atoms, logfile=None)
    assert opt.run(fmax=0.05, steps=200)
    assert atoms.get_potential_energy() < e0 - 0.1
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05 < f0
    np.testing.assert_array_equal(atoms.positions[[0, 2]], fixed)
    raw = atoms.get_forces(apply_constraint=False)
    assert np.linalg.norm(raw[[0, 2]], axis=1).max() > 0.05  # the calculator returns unconstrained forces


def test_cell_filter_fire_relaxation(calc):
    atoms = periodic_cell(seed=3)
    atoms.set_constraint(FixAtoms(indices=[1]))
    atoms.calc = calc
    cell0 = atoms.cell.copy()
    scaled_fixed = atoms.get_scaled_positions(wrap=False)[1].copy()
    filtered = FrechetCellFilter(atoms)
    energies = []
    opt = FIRE(filtered, logfile=None)
    opt.attach(lambda: energies.append(atoms.get_potential_energy()))
    opt.run(fmax=1e-3, steps=8)
    assert len(energies) >= 5
    assert energies[-1] < energies[0]
    assert not np.allclose(atoms.cell, cell0)  # the cell relaxed
    # FixAtoms inside a cell filter: the fixed atom only follows the homogeneous deformation
    np.testing.assert_allclose(atoms.get_scaled_positions(wrap=False)[1], scaled_fixed, atol=1e-10)


# ---------------------------------------------------------------------------------------- bad input
def test_stress_of_a_molecule_is_not_implemented(calc):
    atoms = ethanol()
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()
    assert np.isfinite(atoms.get_potential_energy())  # the calculator still works afterwards
    slab = periodic_cell()
    slab.pbc = (True, True, False)
    slab.calc = calc
    assert np.isfinite(slab.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        slab.get_stress()
    # a slab without a vector along its non-periodic direction: the cell is completed, same results
    flat = slab.copy()
    flat.cell[2] = 0.0
    flat.calc = calc
    assert abs(flat.get_potential_energy() - slab.get_potential_energy()) < 1e-10
    np.testing.assert_allclose(flat.get_forces(), slab.get_forces(), rtol=0, atol=1e-10)


def test_bad_input_errors(calc):
    empty = Atoms()
    empty.calc = calc
    with pytest.raises(DataError, match="empty"):
        empty.get_potential_energy()

    nan = ethanol()
    nan.positions[4, 1] = np.nan
    nan.calc = calc
    with pytest.raises(DataError, match="NaN"):
        nan.get_forces()

    iron = ethanol()
    iron.numbers[2] = 26
    iron.calc = calc
    with pytest.raises(UnknownSpeciesError, match="Fe"):
        iron.get_potential_energy()

    overlap = ethanol()
    overlap.positions[3] = overlap.positions[5] + 0.01
    overlap.calc = calc
    with pytest.raises(DataError, match="overlap"):
        overlap.get_potential_energy()

    assert issubclass(DataError, ValueError) and issubclass(UnknownSpeciesError, ValueError)


# ------------------------------------------------------------------------------- float64 file, x64 off
FLOAT64_FILE_X64_OFF = """
import json, sys
import jax
import jax.numpy as jnp
assert not jax.config.jax_enable_x64
from ase.build import molecule
from equiforce.md import EquiforceCalculator, run_md

path = sys.argv[1]
out = {"refused": []}
held = jnp.ones(3)  # the program made a (float32) JAX array first: switching x64 on now is refused
for make in (
    lambda: EquiforceCalculator(path),
    lambda: run_md(path, molecule("H2O"), steps=2, report_interval=1, progress=False, log=lambda _: None),
):
    try:
        make()
        out["refused"].append(None)
    except RuntimeError as err:
        out["refused"].append(str(err))
out["x64_after_refusal"] = bool(jax.config.jax_enable_x64)
del held  # nothing of the program's own left: as a fresh program, where it just works
atoms = molecule("CH3CH2OH")
atoms.calc = EquiforceCalculator(path)
out["energy"] = float(atoms.get_potential_energy())
out["forces"] = atoms.get_forces().tolist()
out["x64"] = bool(jax.config.jax_enable_x64)
print(json.dumps(out))
"""


def test_float64_file_switches_x64_on_where_safe(calc, tmp_path):
    """A float64 model file in an interpreter with JAX's 64-bit types off (JAX's default): while the program
    holds a JAX array of its own, the calculator and run_md refuse with the start-up advice and leave x64 off;
    with none, the calculator switches x64 on and gives this process's float64 results (a float32 evaluation
    differs by ~1e-6 eV)."""
    import json
    import os
    import subprocess
    import sys

    path = tmp_path / "f64.eqf"
    save_model(path, calc.potential, calc.params)
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run(
        [sys.executable, "-c", FLOAT64_FILE_X64_OFF, str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["x64_after_refusal"] is False
    assert len(out["refused"]) == 2 and all(
        m is not None and "float64" in m and "1 JAX array(s) (float32[3])" in m and "at start-up" in m
        for m in out["refused"]
    ), out["refused"]
    assert out["x64"] is True
    assert abs(out["energy"] - energy) < 1e-10
    np.testing.assert_allclose(out["forces"], forces, rtol=0, atol=1e-10)
