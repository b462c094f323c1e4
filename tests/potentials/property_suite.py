"""A reusable physics property suite that every registered model must pass.

Every model of :data:`equiforce.potentials.MODELS` is run through :class:`PotentialPropertySuite`
(collected by ``tests/potentials/test_potential.py``) with a tiny float64 configuration. To add a model,
register it and add one line to :data:`MODEL_TEST_CASES`::

    MODEL_TEST_CASES["mace"] = ModelTestCase(MACEConfig(num_interactions=2, num_features=4, l_max=2))

A registered model without an entry fails :meth:`PotentialPropertySuite.test_model_has_test_case`.

Checks (each on a non-trivial energy surface, asserted to have non-zero forces): O(3) invariance of the
energy and equivariance of forces (rotations with and without inversion), translations, permutations;
periodic images (moving an atom by a lattice vector) and rotation of cell and positions together (forces
and stress rotate); forces and stress against central finite differences; smoothness at ``r_max``;
isolated atoms and locality; padding and batching; float32/float64 dtypes.

Every jitted function is compiled once per model and padding budget (see :class:`Harness`), so the
whole suite stays fast on a small CPU.

References:
  The layout follows mir-group/nequip ``nequip/utils/unittests/model_tests_basic.py`` and e3nn-jax
  ``assert_equivariant``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.data import StructureSet, voigt_to_full_3x3
from equiforce.data.graph import PaddingBudget, collate
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graphs
from equiforce.potentials import (
    MODELS,
    MACECompatConfig,
    ModelConfig,
    NequIPConfig,
    Potential,
    UnknownSpeciesError,
)
from equiforce.potentials.allegro import AllegroConfig
from equiforce.potentials.mace import MACEConfig
from equiforce.potentials.painn import PaiNNConfig
from equiforce.potentials.schnet import SchNetConfig

__all__ = [
    "BATCH_BUDGET",
    "BUDGET",
    "E0",
    "MODEL_TEST_CASES",
    "R_MAX",
    "SPECIES",
    "Harness",
    "ModelTestCase",
    "PotentialPropertySuite",
    "assert_o3_equivariant",
    "bent_triatomic",
    "crystal",
    "get_harness",
    "isolated_atom",
    "molecule",
    "random_rotation",
    "structure",
]


@dataclass(frozen=True)
class ModelTestCase:
    """A small configuration of one model for the property suite.

    Attributes:
      config: the model's (tiny) hyperparameters.
      param_scale: multiplies the random initial parameters if the network's output at init is too small
        for the checks to be meaningful (1.0 = unchanged).
    """

    config: ModelConfig
    param_scale: float = 1.0


MODEL_TEST_CASES: dict[str, ModelTestCase] = {
    "allegro": ModelTestCase(
        AllegroConfig(
            num_layers=2,
            l_max=2,
            num_tensor_features=4,
            latent_dim=16,
            two_body_mlp_hidden=(16,),
            latent_mlp_hidden=(16,),
            edge_energy_mlp_hidden=(16,),
        )
    ),
    "mace": ModelTestCase(
        MACEConfig(num_interactions=2, num_features=4, l_max=2, hidden_l_max=1, correlation=3, radial_mlp_hidden=8)
    ),
    # every optional part of mace-torch's form at once: ZBL, Agnesi, density normalisation, per-layer correlation
    "mace_compat": ModelTestCase(
        MACECompatConfig(
            num_interactions=2,
            num_features=4,
            l_max=2,
            hidden_l_max=1,
            correlation=(3, 2),
            radial_mlp=(8,),
            readout_mlp_hidden=8,
            density_normalization=True,
            distance_transform="agnesi",
            pair_repulsion=True,
            covalent_radii=((6, 0.8),),  # one radius given (as an import does), the others ASE's
        )
    ),
    "nequip": ModelTestCase(NequIPConfig(num_interactions=2, num_features=4, l_max=2, radial_mlp_hidden=16)),
    "painn": ModelTestCase(PaiNNConfig(num_interactions=2, num_features=8, num_rbf=8)),
    "schnet": ModelTestCase(SchNetConfig(num_interactions=2, num_features=8, num_filters=8, num_rbf=8)),
}

SPECIES = (1, 6, 8)
E0 = (-1.5, -3.25, -4.75)  # eV; small so that float64 finite differences stay precise
R_MAX = 3.0
SCALE = 1.3
SHIFT = 0.2
AVG_NUM_NEIGHBOURS = 4.0

BUDGET = PaddingBudget(n_nodes=16, n_edges=256, n_graphs=2)  # one structure, generous padding
BATCH_BUDGET = PaddingBudget(n_nodes=40, n_edges=512, n_graphs=6)  # several structures


# ---------------------------------------------------------------------------------------- structures
def structure(
    atomic_numbers: Sequence[int], positions: np.ndarray, cell: np.ndarray | None = None, pbc: bool = False
) -> StructureSet:
    """A one-structure set (non-periodic unless ``pbc``)."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return StructureSet(
        atomic_numbers=np.asarray(atomic_numbers, dtype=np.int32),
        positions=positions,
        n_atoms=[positions.shape[0]],
        cell=np.zeros((1, 3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)[None],
        pbc=np.full((1, 3), pbc),
    )


def molecule(seed: int = 0, n_atoms: int = 7) -> StructureSet:
    """A random non-periodic cluster of H, C, O (all species present), atoms at least 1 Å apart.

    Its extent (~5 Å) exceeds ``R_MAX``, so some pairs lie beyond the cutoff.
    """
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n_atoms:
        p = rng.uniform(-1.6, 1.6, 3)
        if all(np.linalg.norm(p - q) > 1.0 for q in pos):
            pos.append(p)
    z = rng.choice(SPECIES, n_atoms)
    z[: len(SPECIES)] = SPECIES
    return structure(z, np.array(pos))


CRYSTAL_CELL = np.array([[2.9, 0.0, 0.0], [0.7, 3.1, 0.0], [-0.4, 0.6, 3.4]])  # triclinic, |a| < R_MAX


def crystal(seed: int = 0, n_atoms: int = 5) -> StructureSet:
    """A random triclinic periodic structure (pbc all True) whose cell is smaller than ``2 R_MAX``.

    Atoms see several periodic images of each other and of themselves; some positions lie outside the
    unit cell on purpose.
    """
    rng = np.random.default_rng(1000 + seed)
    cell = CRYSTAL_CELL
    images = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]) @ cell
    frac: list[np.ndarray] = []
    while len(frac) < n_atoms:
        f = rng.uniform(0.0, 1.0, 3)
        x = f @ cell
        if all(np.min(np.linalg.norm(x - g @ cell + images, axis=1)) > 1.0 for g in frac):
            frac.append(f)
    pos = np.array(frac) @ cell
    pos[0] += cell[1]
    pos[-1] -= cell[2]
    z = rng.choice(SPECIES, n_atoms)
    z[: len(SPECIES)] = SPECIES
    return structure(z, pos, cell, pbc=True)


def bent_triatomic(angle_deg: float) -> StructureSet:
    """O at the origin with two H at 1.8 Å; the H–H distance (> R_MAX) changes only through the angle.

    A model that sees only distances within ``R_MAX`` gives the same energy at every angle.
    """
    t = np.deg2rad(angle_deg)
    pos = np.array([[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [1.8 * np.cos(t), 1.8 * np.sin(t), 0.0]])
    assert np.linalg.norm(pos[1] - pos[2]) > R_MAX
    return structure([8, 1, 1], pos)


def isolated_atom(z: int = 6) -> StructureSet:
    return structure([z], np.zeros((1, 3)))


def random_rotation(rng: np.random.Generator, improper: bool = False) -> np.ndarray:
    """A random proper rotation (det +1), or a rotation times inversion (det -1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return -q if improper else q


def transformed(s: StructureSet, positions: np.ndarray, cell: np.ndarray | None = None) -> StructureSet:
    """``s`` (one structure) with new positions (and cell)."""
    return StructureSet(
        atomic_numbers=s.atomic_numbers,
        positions=positions,
        n_atoms=s.n_atoms,
        cell=s.cell if cell is None else np.asarray(cell)[None],
        pbc=s.pbc,
    )


# ---------------------------------------------------------------------------------------- harness
@dataclass
class Result:
    """NumPy results of one evaluation, cut to the real structures and atoms."""

    energy: np.ndarray  # [n_structures]
    forces: np.ndarray  # [n_atoms, 3]
    stress: np.ndarray  # [n_structures, 6]
    node_energies: np.ndarray  # [n_atoms]
    raw: object  # the full padded PotentialOutput


class Harness:
    """A float64 potential of one model, its parameters and its jitted evaluation (compiled once per budget)."""

    def __init__(self, case: ModelTestCase, *, dtype: str = "float64") -> None:
        self.case = case
        self.potential = Potential(
            case.config,
            species=SPECIES,
            r_max=R_MAX,
            atomic_energies=E0,
            scale=SCALE,
            shift=SHIFT,
            avg_num_neighbours=AVG_NUM_NEIGHBOURS,
            dtype=dtype,
        )
        params = jax.jit(self.potential.init)(jax.random.PRNGKey(0))
        if case.param_scale != 1.0:
            params = jax.tree.map(lambda x: x * case.param_scale, params)
        self.params = params
        self._evaluate = jax.jit(lambda p, g: self.potential(p, g, compute_stress=True))

    def evaluate(
        self,
        structures: StructureSet,
        graphs: Sequence[NeighbourGraph] | None = None,
        budget: PaddingBudget = BUDGET,
        params=None,
    ) -> Result:
        """Energy, forces and stress of every structure of ``structures`` in one padded batch.

        ``graphs`` defaults to freshly built neighbour graphs; pass fixed ones to keep the edge set
        (finite differences).
        """
        if graphs is None:
            graphs = build_neighbour_graphs(structures, self.potential.r_max)
        batch = collate(structures, graphs, np.arange(len(structures)), budget)
        out = self._evaluate(self.params if params is None else params, batch.graph)
        n, n_at = len(structures), structures.n_total_atoms
        return Result(
            energy=np.asarray(out.energy)[:n],
            forces=np.asarray(out.forces)[:n_at],
            stress=np.asarray(out.stress)[:n],
            node_energies=np.asarray(out.node_energies)[:n_at],
            raw=out,
        )


@functools.cache
def get_harness(name: str) -> Harness:
    """The (cached, session-wide) float64 harness of a registered model."""
    if name not in MODEL_TEST_CASES:
        pytest.fail(
            f"model {name!r} is registered but has no small test configuration in "
            "tests/potentials/property_suite.py:MODEL_TEST_CASES"
        )
    return Harness(MODEL_TEST_CASES[name])


def assert_meaningful_forces(forces: np.ndarray) -> None:
    """The energy surface must not be flat, or the symmetry checks could not fail."""
    assert np.all(np.isfinite(forces))
    assert np.max(np.abs(forces)) > 1e-3, "network output too small at init: raise param_scale"


def assert_o3_equivariant(
    harness: Harness, s: StructureSet, rot: np.ndarray, shift: np.ndarray | float = 0.0, params=None
) -> Result:
    """Under ``x → rot·x + shift`` energy and per-atom energies stay, forces rotate (to 1e-10).

    Returns:
      The result at the untransformed positions.
    """
    ref = harness.evaluate(s, params=params)
    out = harness.evaluate(transformed(s, s.positions @ rot.T + shift), params=params)
    np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.forces, ref.forces @ rot.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.node_energies, ref.node_energies, rtol=0, atol=1e-10)
    return ref


# ---------------------------------------------------------------------------------------- the suite
class PotentialPropertySuite:
    """Physics properties every model must have. Subclass it in a ``test_*.py`` module to collect it."""

    @pytest.fixture(params=sorted(MODELS), scope="class")
    def harness(self, request) -> Harness:
        return get_harness(request.param)

    def test_model_has_test_case(self):
        missing = sorted(set(MODELS) - set(MODEL_TEST_CASES))
        assert not missing, f"registered models without a test configuration in MODEL_TEST_CASES: {missing}"

    # ---------------------------------------------------------------- symmetries (molecule)
    @pytest.mark.parametrize("improper", [False, True], ids=["rotation", "rotoinversion"])
    def test_molecule_o3_invariance(self, harness, improper):
        rng = np.random.default_rng(1)
        rot = random_rotation(rng, improper)
        assert np.isclose(np.linalg.det(rot), -1.0 if improper else 1.0)
        ref = assert_o3_equivariant(harness, molecule(0), rot, rng.normal(size=3) * 3.0)
        assert_meaningful_forces(ref.forces)

    def test_reflection_through_a_plane(self, harness):
        s = molecule(2)
        ref = harness.evaluate(s)
        mirror = np.diag([1.0, -1.0, 1.0])
        out = harness.evaluate(transformed(s, s.positions @ mirror))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces @ mirror, rtol=0, atol=1e-10)

    def test_translation_invariance(self, harness):
        s = molecule(1)
        ref = harness.evaluate(s)
        out = harness.evaluate(transformed(s, s.positions + np.array([10.0, -7.5, 3.25])))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces, rtol=0, atol=1e-10)

    def test_permutation_equivariance(self, harness):
        s = molecule(3)
        ref = harness.evaluate(s)
        perm = np.random.default_rng(2).permutation(s.n_total_atoms)
        assert not np.array_equal(perm, np.arange(perm.size))
        permuted = structure(s.atomic_numbers[perm], s.positions[perm])
        out = harness.evaluate(permuted)
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces[perm], rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.node_energies, ref.node_energies[perm], rtol=0, atol=1e-10)

    def test_species_matter(self, harness):
        """Swapping the elements of two atoms changes the energy (the species table is used)."""
        s = molecule(0)
        z = s.atomic_numbers.copy()
        i, j = np.nonzero(z == 1)[0][0], np.nonzero(z == 8)[0][0]
        z[[i, j]] = z[[j, i]]
        e_ref = harness.evaluate(s).energy
        e_swap = harness.evaluate(structure(z, s.positions)).energy
        assert abs(e_swap[0] - e_ref[0]) > 1e-6

    # ---------------------------------------------------------------- periodic structures
    def test_periodic_lattice_vector_move(self, harness):
        s = crystal(0)
        ref = harness.evaluate(s)
        assert_meaningful_forces(ref.forces)
        assert np.max(np.abs(ref.stress)) > 1e-4
        cell = s.cell[0]
        pos = s.positions.copy()
        pos[1] += cell[0] - 2.0 * cell[2]
        pos[3] -= cell[1]
        out = harness.evaluate(transformed(s, pos))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.stress, ref.stress, rtol=0, atol=1e-10)

    def test_periodic_translation_invariance(self, harness):
        s = crystal(1)
        ref = harness.evaluate(s)
        out = harness.evaluate(transformed(s, s.positions + np.array([0.37, -1.2, 2.9])))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.stress, ref.stress, rtol=0, atol=1e-10)

    @pytest.mark.parametrize("improper", [False, True], ids=["rotation", "rotoinversion"])
    def test_periodic_rotation_rotates_forces_and_stress(self, harness, improper):
        s = crystal(0)
        ref = harness.evaluate(s)
        rot = random_rotation(np.random.default_rng(3), improper)
        out = harness.evaluate(transformed(s, s.positions @ rot.T, s.cell[0] @ rot.T))
        np.testing.assert_allclose(out.energy, ref.energy, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, ref.forces @ rot.T, rtol=0, atol=1e-10)
        sigma_ref = voigt_to_full_3x3(ref.stress[0])
        np.testing.assert_allclose(voigt_to_full_3x3(out.stress[0]), rot @ sigma_ref @ rot.T, rtol=0, atol=1e-10)

    # ---------------------------------------------------------------- derivatives
    @pytest.mark.parametrize("kind", ["molecule", "crystal"])
    def test_forces_are_minus_energy_gradient(self, harness, kind):
        s = molecule(4) if kind == "molecule" else crystal(2)
        graphs = build_neighbour_graphs(s, R_MAX)  # fixed edge set: E is smooth in the positions
        ref = harness.evaluate(s, graphs)
        assert_meaningful_forces(ref.forces)
        h = 1e-5
        fd = np.zeros_like(ref.forces)
        for i in range(s.n_total_atoms):
            for a in range(3):
                plus, minus = s.positions.copy(), s.positions.copy()
                plus[i, a] += h
                minus[i, a] -= h
                e_p = harness.evaluate(transformed(s, plus), graphs).energy[0]
                e_m = harness.evaluate(transformed(s, minus), graphs).energy[0]
                fd[i, a] = -(e_p - e_m) / (2 * h)
        scale = np.max(np.abs(ref.forces))
        np.testing.assert_allclose(ref.forces, fd, rtol=1e-6, atol=1e-6 * scale)

    def test_stress_is_strain_derivative(self, harness):
        """σ_ab = (1/V) ∂E/∂ε_ab for a symmetric strain of positions and cell (ASE sign: tensile > 0)."""
        s = crystal(3)
        graphs = build_neighbour_graphs(s, R_MAX)
        ref = harness.evaluate(s, graphs)
        sigma = voigt_to_full_3x3(ref.stress[0])
        assert np.max(np.abs(sigma)) > 1e-4
        volume = abs(np.linalg.det(s.cell[0]))
        h = 1e-5
        fd = np.zeros((3, 3))
        for a in range(3):
            for b in range(a, 3):
                eps = np.zeros((3, 3))
                eps[a, b] += 0.5
                eps[b, a] += 0.5
                energies = []
                for sign in (1.0, -1.0):
                    deform = np.eye(3) + sign * h * eps
                    strained = transformed(s, s.positions @ deform.T, s.cell[0] @ deform.T)
                    energies.append(harness.evaluate(strained, graphs).energy[0])
                fd[a, b] = fd[b, a] = (energies[0] - energies[1]) / (2 * h) / volume
        np.testing.assert_allclose(sigma, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(sigma)))

    def test_non_periodic_stress_is_zero(self, harness):
        out = harness.evaluate(molecule(0))
        assert np.all(out.stress == 0.0)

    # ---------------------------------------------------------------- cutoff, isolated atoms, locality
    def test_energy_smooth_at_cutoff(self, harness):
        direction = np.array([1.0, 2.0, -2.0]) / 3.0

        def dimer(r):
            return structure([6, 8], np.array([np.zeros(3), r * direction]))

        far = harness.evaluate(dimer(R_MAX + 1e-6))
        assert np.all(far.forces == 0.0)
        for delta in (1e-4, 1e-3, 0.5):
            outside = harness.evaluate(dimer(R_MAX + delta))
            np.testing.assert_array_equal(outside.energy, far.energy)
        # the dimer interacts inside the cutoff (so that the limit below is not trivially met) ...
        inside = harness.evaluate(dimer(R_MAX - 0.5))
        assert abs(inside.energy[0] - far.energy[0]) > 1e-6
        assert np.max(np.abs(inside.forces)) > 1e-6
        # ... and the energy and force go to their no-interaction values at r_max
        previous = np.inf
        for delta in (1e-2, 1e-3):
            near = harness.evaluate(dimer(R_MAX - delta))
            gap = abs(near.energy[0] - far.energy[0])
            assert gap <= previous
            previous = gap
        assert gap < 1e-8
        assert np.max(np.abs(near.forces)) < 1e-6
        np.testing.assert_allclose(near.forces[0], -near.forces[1], rtol=0, atol=1e-12)

    def test_isolated_atom(self, harness):
        energies = {}
        for z in SPECIES:
            out = harness.evaluate(isolated_atom(z))
            assert np.all(out.forces == 0.0)
            assert np.isfinite(out.energy[0])
            energies[z] = out.energy[0]
            e0 = E0[SPECIES.index(z)]
            # the Potential subtracts each species' isolated-atom output: exactly E0 + shift (except in models
            # that reproduce another code, which has no such reference)
            if harness.potential.model.isolated_atom_reference:
                assert out.energy[0] == pytest.approx(e0 + SHIFT, abs=1e-12)
        # the isolated energy depends on the species only (position-independent) ...
        moved = harness.evaluate(structure([6], np.array([[3.0, -4.0, 12.0]])))
        np.testing.assert_allclose(moved.energy[0], energies[6], rtol=0, atol=1e-12)
        # ... and E0 enters additively with unit weight
        other = Potential.from_dict({**harness.potential.to_dict(), "atomic_energies": [0.0, 0.0, 0.0]})
        assert other.model == harness.potential.model
        g = collate(isolated_atom(8), build_neighbour_graphs(isolated_atom(8), R_MAX), [0], BUDGET).graph
        e_without = np.asarray(jax.jit(other.energy)(harness.params, g))[0]
        assert energies[8] - e_without == pytest.approx(E0[2], abs=1e-12)

    def test_locality_far_apart_fragments_add_up(self, harness):
        a, b = molecule(5, n_atoms=4), molecule(6, n_atoms=5)
        e_a, e_b = harness.evaluate(a), harness.evaluate(b)
        shifted = b.positions + np.array([R_MAX + 8.0, 0.0, 0.0])
        both = structure(np.concatenate([a.atomic_numbers, b.atomic_numbers]), np.concatenate([a.positions, shifted]))
        out = harness.evaluate(both)
        np.testing.assert_allclose(out.energy[0], e_a.energy[0] + e_b.energy[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.forces, np.concatenate([e_a.forces, e_b.forces]), rtol=0, atol=1e-10)

    # ---------------------------------------------------------------- padding and batching
    def test_padding_does_not_change_results(self, harness):
        s = crystal(0)
        graphs = build_neighbour_graphs(s, R_MAX)
        tight = PaddingBudget(n_nodes=s.n_total_atoms + 1, n_edges=graphs[0].n_edges, n_graphs=2)
        a = harness.evaluate(s, graphs, tight)
        b = harness.evaluate(s, graphs, BUDGET)
        assert BUDGET.n_nodes > tight.n_nodes and BUDGET.n_edges > tight.n_edges
        np.testing.assert_allclose(b.energy, a.energy, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.forces, a.forces, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.stress, a.stress, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.node_energies, a.node_energies, rtol=1e-12, atol=1e-12)
        for res in (a, b):
            raw = res.raw
            n = s.n_total_atoms
            assert np.all(np.asarray(raw.forces)[n:] == 0.0)  # padded atoms: exactly zero force
            assert np.all(np.asarray(raw.node_energies)[n:] == 0.0)
            assert np.asarray(raw.energy)[-1] == 0.0  # the padding graph
            assert np.all(np.asarray(raw.stress)[-1] == 0.0)
            assert np.all(np.isfinite(np.asarray(raw.forces)))

    def test_batch_equals_single_structures(self, harness):
        parts = [molecule(0), crystal(0), isolated_atom(1), molecule(7, n_atoms=4), crystal(4, n_atoms=3)]
        batch = StructureSet.concatenate(parts)
        out = harness.evaluate(batch, budget=BATCH_BUDGET)
        assert np.asarray(out.raw.energy).shape == (BATCH_BUDGET.n_graphs,)
        assert np.asarray(out.raw.energy)[-1] == 0.0
        for k, part in enumerate(parts):
            single = harness.evaluate(part)
            sl = batch.atom_slice(k)
            np.testing.assert_allclose(out.energy[k], single.energy[0], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(out.forces[sl], single.forces, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(out.stress[k], single.stress[0], rtol=1e-12, atol=1e-12)

    # ---------------------------------------------------------------- dtypes and species
    def test_float32_potential_gives_float32(self, harness):
        p32 = harness.potential.replace(dtype="float32")
        assert p32.model == harness.potential.model
        template = jax.eval_shape(lambda: p32.init(jax.random.PRNGKey(0)))
        assert {x.dtype for x in jax.tree.leaves(template)} == {jnp.dtype(jnp.float32)}
        params32 = jax.tree.map(lambda x: x.astype(jnp.float32), harness.params)
        s = crystal(0)
        batch = collate(s, build_neighbour_graphs(s, R_MAX), [0], BUDGET)
        out32 = jax.jit(lambda p, g: p32(p, g, compute_stress=True))(params32, batch.graph)
        for name in ("energy", "forces", "stress", "node_energies"):
            assert getattr(out32, name).dtype == jnp.float32, name
        ref = harness.evaluate(s)
        for name in ("energy", "forces", "stress", "node_energies"):
            assert getattr(ref.raw, name).dtype == jnp.float64, name
        n = s.n_total_atoms
        np.testing.assert_allclose(np.asarray(out32.energy)[:1], ref.energy, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out32.forces)[:n], ref.forces, rtol=0, atol=2e-3)

    def test_unknown_species(self, harness):
        pot = harness.potential
        pot.check_species(np.array([1, 6, 8, 8]))  # known: no error
        with pytest.raises(UnknownSpeciesError, match="Fe") as info:
            pot.check_species(np.array([1, 26, 6]))
        assert "26" in str(info.value)
        with pytest.raises(UnknownSpeciesError, match="He"):
            pot.check_species([2])

    # ---------------------------------------------------------------- half neighbour lists
    @pytest.mark.parametrize("kind", ["molecule", "crystal"])
    def test_half_neighbour_list_gives_the_full_lists_energies_and_forces(self, harness, kind):
        """Each pair once (``half_list=True``) gives the per-atom energies and forces of the full list.

        The crystal has self-image pairs (an atom and its own periodic image) and several images per pair; for
        models with edge blocks the molecule is also evaluated in blocks of 3 pairs (uneven last block).
        """
        s = crystal(0) if kind == "crystal" else molecule(3)
        (g,) = build_neighbour_graphs(s, R_MAX)
        cell = s.cell[0]
        # canonical direction of each pair: receiver < sender, or a self-image pair with a positive shift
        signs = np.sign(g.shifts)
        first = signs[np.arange(len(signs)), np.argmax(signs != 0, axis=1)]
        half = (g.receivers < g.senders) | ((g.receivers == g.senders) & (first > 0))
        assert 2 * int(half.sum()) == len(g.senders)
        assert kind == "molecule" or np.any(g.receivers[half] == g.senders[half])  # self-image pairs present

        potential = harness.potential
        species = jnp.asarray(potential.species_index(s.atomic_numbers))
        n = len(species)

        def evaluate(pot, keep, half_list):
            senders, receivers = jnp.asarray(g.senders[keep]), jnp.asarray(g.receivers[keep])
            offsets = jnp.asarray(g.shifts[keep] @ cell)

            def total(pos):
                vectors = pos[senders] - pos[receivers] + offsets
                mask = jnp.ones(senders.shape, bool)
                e = pot.node_energies_from_edges(
                    harness.params, vectors, species, senders, receivers, mask, jnp.ones(n, bool), half_list=half_list
                )
                return jnp.sum(e), e

            (_, e), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(s.positions))
            return np.asarray(e), -np.asarray(grad)

        ref_e, ref_f = evaluate(potential, np.ones(len(half), bool), False)
        assert_meaningful_forces(ref_f)
        variants = [potential]
        if kind == "molecule" and hasattr(potential.model, "edge_chunk_size"):
            variants.append(potential.replace(model=dataclasses.replace(potential.model, edge_chunk_size=6)))
        for pot in variants:
            e, f = evaluate(pot, half, True)
            np.testing.assert_allclose(e, ref_e, rtol=0, atol=1e-10)
            np.testing.assert_allclose(f, ref_f, rtol=0, atol=1e-10)
