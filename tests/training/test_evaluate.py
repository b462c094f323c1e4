"""Evaluation: metric arithmetic, float64 E0s on top of float32 models, parity plots."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.data.readers import load_sample
from equiforce.data.statistics import composition_matrix
from equiforce.potentials.potential import UnknownSpeciesError
from equiforce.training.config import load_config
from equiforce.training.evaluate import Predictions, _predict_fn, compute_metrics, e0_sum, evaluate, predict
from equiforce.training.plots import parity_plot
from equiforce.training.trainer import build_potential

TINY = "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hand_made(with_stress: bool = False) -> Predictions:
    # two structures, 2 and 4 atoms
    forces_ref = np.zeros((6, 3))
    forces = forces_ref.copy()
    forces[0, 0] = 0.3  # errors (eV/Å): one 0.3, one -0.6, one 0.9, rest 0 → 18 components
    forces[3, 1] = -0.6
    forces[5, 2] = 0.9
    kw = {}
    if with_stress:
        kw = {
            "stress": np.array([[0.01, 0, 0, 0, 0, 0], [5.0, 5, 5, 5, 5, 5]]),
            "stress_ref": np.array([[0.0, 0, 0, 0, 0, -0.02], [np.nan] * 6]),  # 2nd has no label
        }
    return Predictions(
        energy=np.array([1.0, 2.0]),
        energy_ref=np.array([1.5, 1.0]),
        forces=forces,
        forces_ref=forces_ref,
        n_atoms=np.array([2, 4]),
        **kw,
    )


def test_compute_metrics_known_numbers():
    m = compute_metrics(_hand_made())
    # ΔE = [-0.5, +1.0] eV; per atom [-0.25, +0.25] eV
    assert m["energy_mae_meV"] == pytest.approx(750.0)
    assert m["energy_rmse_meV"] == pytest.approx(1e3 * np.sqrt((0.25 + 1.0) / 2))
    assert m["energy_per_atom_mae_meV"] == pytest.approx(250.0)
    assert m["energy_per_atom_rmse_meV"] == pytest.approx(250.0)
    # forces: |Δ| sum 1.8 over 18 components; squares 0.09 + 0.36 + 0.81 = 1.26
    assert m["forces_mae_meV_per_A"] == pytest.approx(100.0)
    assert m["forces_rmse_meV_per_A"] == pytest.approx(1e3 * np.sqrt(1.26 / 18))
    assert not any(k.startswith("stress") for k in m)


def test_compute_metrics_stress_skips_unlabelled_rows():
    m = compute_metrics(_hand_made(with_stress=True))
    # only the first structure has a stress label: Δ = [0.01, 0, 0, 0, 0, 0.02]
    assert m["stress_mae_meV_per_A3"] == pytest.approx(1e3 * 0.03 / 6)
    assert m["stress_rmse_meV_per_A3"] == pytest.approx(1e3 * np.sqrt((1e-4 + 4e-4) / 6))


def test_compute_metrics_without_labels():
    p = _hand_made()
    m = compute_metrics(Predictions(p.energy, None, p.forces, p.forces_ref, p.n_atoms))
    assert set(m) == {"forces_mae_meV_per_A", "forces_rmse_meV_per_A"}
    assert compute_metrics(Predictions(p.energy, None, p.forces, None, p.n_atoms)) == {}


def test_perfect_predictions_are_zero():
    p = _hand_made()
    m = compute_metrics(Predictions(p.energy_ref, p.energy_ref, p.forces_ref, p.forces_ref, p.n_atoms))
    assert all(v == 0.0 for v in m.values()) and len(m) == 6


# ---------------------------------------------------------------------------------------------- predict
# Every jitted predict function compiles once per padding budget (seconds each on CPU), so the tests
# share one jitted function and a few batch sizes.
@pytest.fixture(scope="module")
def aspirin():
    s = load_sample("test").subset(list(range(7)))
    graphs = build_neighbour_graphs(s, 5.0)
    cfg = load_config(None, [TINY])
    potential, _ = build_potential(cfg, s, graphs)
    assert potential.dtype == "float32"
    params = potential.init(jax.random.PRNGKey(1))
    fn = _predict_fn(potential, False)
    pred = predict(potential, params, s, batch_size=3, graphs=graphs, predict_fn=fn)
    return s, graphs, potential, params, fn, pred


def test_predict_float32_adds_e0s_in_float64(aspirin):
    s, graphs, p32, params32, fn32, pred32 = aspirin
    assert max(abs(e) for e in p32.atomic_energies) > 100  # large E0s: float32 sums would lose meV
    p64 = p32.replace(dtype="float64")
    params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params32)
    pred64 = predict(p64, params64, s, batch_size=3, graphs=graphs)

    assert pred32.energy.dtype == np.float64 and pred32.forces.dtype == np.float64
    assert pred32.energy.shape == (7,) and pred32.forces.shape == (7 * 21, 3)
    np.testing.assert_array_equal(pred32.energy_ref, s.energy)
    np.testing.assert_array_equal(pred32.forces_ref, s.forces)
    np.testing.assert_array_equal(pred32.n_atoms, s.n_atoms)
    # |E| ≈ 17 600 eV: a float32 total has an ulp of ~2 meV; the host-side float64 E0s keep << 1 meV
    assert np.max(np.abs(pred32.energy - pred64.energy)) < 1e-4
    np.testing.assert_allclose(pred32.forces, pred64.forces, atol=1e-4)

    # the E0 part is exactly Σ E0 computed in float64 on the host, on top of the network's energy
    e0 = e0_sum(p32, s)
    np.testing.assert_allclose(e0, composition_matrix(s, p32.species) @ np.asarray(p32.atomic_energies), rtol=0)
    zero_e0 = p32.replace(atomic_energies=(0.0,) * len(p32.species))
    net = predict(zero_e0, params32, s, batch_size=3, graphs=graphs, predict_fn=fn32).energy
    assert np.max(np.abs(net)) < 100
    np.testing.assert_allclose(pred32.energy, net + e0, rtol=0, atol=1e-9)


def test_predict_is_independent_of_batching(aspirin):
    s, graphs, potential, params, fn, pred3 = aspirin
    pred16 = predict(potential, params, s, batch_size=16, predict_fn=fn)  # graphs and budget built inside
    np.testing.assert_allclose(pred16.energy, pred3.energy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pred16.forces, pred3.forces, rtol=0, atol=1e-5)
    m = evaluate(potential, params, s, batch_size=3, graphs=graphs, predict_fn=fn)
    assert m == compute_metrics(pred3)


def test_predict_unknown_species(aspirin):
    s, _, potential, params, *_ = aspirin
    only_ch = potential.replace(species=(1, 6), atomic_energies=(0.0, 0.0))
    with pytest.raises(UnknownSpeciesError):
        predict(only_ch, params, s)


# ---------------------------------------------------------------------------------------------- plots
def test_parity_plot_writes_png(tmp_path, aspirin):
    pred = aspirin[-1]
    path = parity_plot(pred, tmp_path / "plots" / "parity.png", title="tiny")
    assert path == tmp_path / "plots" / "parity.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["parity.png"]  # no temporary file left


def test_parity_plot_needs_labels(tmp_path):
    p = _hand_made()
    with pytest.raises(ValueError, match="reference"):
        parity_plot(Predictions(p.energy, None, p.forces, p.forces_ref, p.n_atoms), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
