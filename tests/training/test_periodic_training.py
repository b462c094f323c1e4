"""Training on periodic structures with stress, the post-training steps that must not lose the model, given
E0s, and the NVE gate.

* A generated case that runs anywhere: 4-atom fcc copper cells (strained ±3 %, rattled) labelled by ase's EMT
  (energy, forces, stress). The cell (3.6 Å) is shorter than 2 r_max, so the NVE check needs a supercell: the
  run that used to crash at the very end. One training run (module fixture) serves most tests: SchNet, one
  interaction, float64, 6 epochs, given E0s (EMT's isolated-atom energy), the NVE gate with an unreachable
  threshold and ``on_failure: fail``, and a parity plot that raises.
* LiPS20 Li3P (64-atom AIMD cells with virials, from ../shared/data; skipped where absent; marked slow).
"""

from __future__ import annotations

import json

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from equiforce.cli import main
from equiforce.data.errors import DataError
from equiforce.data.neighbours import build_neighbour_graphs
from equiforce.md.engine import MDBlowUpError
from equiforce.md.system import cell_heights
from equiforce.potentials.model_io import load_model, read_header, save_model
from equiforce.training import finish, nve_check, trainer
from equiforce.training.config import ConfigError, load_config
from equiforce.training.evaluate import evaluate
from equiforce.training.finish import MDCheckFailedError
from equiforce.training.nve_check import energy_conservation_check, supercell_for_cutoff
from equiforce.training.trainer import build_potential, load_datasets, train

SCHNET = "model.hyperparameters={num_interactions: 1, num_features: 16, num_filters: 16, num_rbf: 8}"


def _emt_copper(n: int, seed: int) -> list[Atoms]:
    """``n`` 4-atom fcc Cu cells (a = 3.61 Å), symmetric strains of up to ±3 %, rattled by 0.08 Å, EMT-labelled."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        strain = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.08, seed=int(rng.integers(2**31)))
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        frames.append(atoms)
    return frames


def _isolated_atom_energy() -> float:
    atom = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    atom.calc = EMT()
    return float(atom.get_potential_energy())


@pytest.fixture(scope="module")
def emt_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emt")
    ase.io.write(folder / "train.extxyz", _emt_copper(40, 0))
    ase.io.write(folder / "test.extxyz", _emt_copper(6, 1))
    e0 = _isolated_atom_energy()
    cfg = load_config(
        None,
        [
            f"output_dir={folder / 'run'}",
            "progress_bar=false",
            f"data.train={folder / 'train.extxyz'}",
            f"data.test={folder / 'test.extxyz'}",
            "data.valid_fraction=0.2",  # 32 train / 8 valid
            "model.name=schnet",
            "model.r_max=3.5",  # 2 r_max = 7 Å > the 3.6 Å cell: the NVE check needs a 2x2x2 supercell
            "model.dtype=float64",
            SCHNET,
            f"model.atomic_energies={{29: {e0}}}",
            "loss.stress_weight=1e4",  # see the README: a 0.1 GPa stress error then weighs like a 20 meV/Å force error
            "optim.batch_size=4",
            "optim.max_epochs=6",
            "optim.learning_rate=0.01",
            "md_check.steps=100",
            "md_check.report_interval=50",
            "md_check.max_drift_meV_per_atom_per_ps=1e-9",  # unreachable: the gate fails
            "md_check.on_failure=fail",
        ],
    )
    seen = {}
    real_check = nve_check.energy_conservation_check

    def spy_check(*args, **kwargs):  # what is on disk when the optional NVE check starts
        seen["header"] = read_header(cfg.resolve_path(cfg.output_dir) / "model.eqf")
        seen["final_metrics"] = json.loads((cfg.resolve_path(cfg.output_dir) / "final_metrics.json").read_text())
        return real_check(*args, **kwargs)

    def broken_parity(*args, **kwargs):
        raise RuntimeError("matplotlib backend exploded")

    lines: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(nve_check, "energy_conservation_check", spy_check)
    mp.setattr(finish, "_write_parity", broken_parity)
    try:
        with pytest.raises(MDCheckFailedError) as excinfo:
            train(cfg, log=lines.append)
    finally:
        mp.undo()
    data = load_datasets(cfg)
    initial, _ = build_potential(cfg, data.train, build_neighbour_graphs(data.train, cfg.model.r_max))
    untrained = evaluate(initial, initial.init(jax.random.PRNGKey(cfg.seed)), data.valid)
    return cfg, excinfo.value, data, untrained, lines, seen, e0


def test_stress_training_lowers_the_stress_error(emt_run):
    _, err, data, untrained, _, _, _ = emt_run
    result = err.result
    assert data.train.has_stress.all() and data.train.pbc.all()
    s0, s1 = untrained["stress_mae_meV_per_A3"], result.valid_metrics["stress_mae_meV_per_A3"]
    f0, f1 = untrained["forces_mae_meV_per_A"], result.valid_metrics["forces_mae_meV_per_A"]
    # same E0s on both sides (given E0s, kept); stress does not depend on E0s anyway.
    # measured (2 CPU cores, x64): stress MAE 23.5 → 9.4 meV/Å³ (ratio 0.40), forces 736 → 193 meV/Å (0.26)
    assert s1 < 0.6 * s0, (s0, s1)
    assert f1 < 0.5 * f0, (f0, f1)
    history = result.history
    assert "valid_stress_mae_meV_per_A3" in history[0]
    assert history[-1]["valid_stress_mae_meV_per_A3"] < history[0]["valid_stress_mae_meV_per_A3"]


def test_model_is_saved_before_the_optional_steps(emt_run):
    cfg, err, _, _, _, seen, _ = emt_run
    out = cfg.resolve_path(cfg.output_dir)
    # when the NVE check started, model.eqf and final_metrics.json were already on disk
    early = seen["header"]["metadata"]["post_training"]
    assert early["complete"] is False and early["pending"] == ["uncertainty", "test_metrics", "nve_check"]
    assert seen["final_metrics"]["valid_metrics"]["forces_mae_meV_per_A"] > 0
    # ... and were written again with the results, although the gate failed and train() raised
    assert err.result.model_path == out / "model.eqf"
    potential, params, header = load_model(out / "model.eqf")
    meta = header["metadata"]
    assert meta["post_training"]["complete"] is True
    assert json.loads((out / "final_metrics.json").read_text())["nve_check"] == meta["nve_check"]
    assert meta["test_metrics"]["stress_mae_meV_per_A3"] > 0  # the test set was evaluated
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(err.result.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert potential == err.result.potential
    # the single network got its calibrated LLPR uncertainty (periodic cells with stress)
    assert potential.uncertainty.method == "llpr" and meta["uncertainty"]["method"] == "llpr"
    assert 0 < meta["uncertainty"]["valid_report"]["forces"]["coverage_95"] <= 1


def test_failed_optional_step_is_recorded_not_fatal(emt_run):
    cfg, err, _, _, lines, _, _ = emt_run
    errors = err.result.metadata["post_training"]["errors"]
    assert errors == {"parity_plot": "RuntimeError: matplotlib backend exploded"}
    assert any("post-training step 'parity_plot' failed" in line for line in lines)
    assert not (cfg.resolve_path(cfg.output_dir) / "parity_test.png").exists()


def test_nve_check_runs_on_a_supercell_and_the_gate_fails(emt_run):
    _, err, _, _, lines, _, _ = emt_run
    nve = read_header(err.result.model_path)["metadata"]["nve_check"]
    assert nve["supercell"] == [2, 2, 2] and nve["n_atoms"] == 32
    assert nve["steps"] == 100 and np.isfinite(nve["drift_meV_per_atom_per_ps"]) and not nve["blew_up"]
    assert nve["status"] == "failed" and nve["passed"] is False  # 1e-9 meV/atom/ps cannot be met
    assert nve["threshold_meV_per_atom_per_ps"] == 1e-9 and nve["on_failure"] == "fail"
    assert err.result.nve_check == nve
    assert str(err.result.model_path) in str(err) and "max_drift" in str(err)
    assert isinstance(err, RuntimeError)  # the CLI turns it into exit status 2
    assert any(line.startswith("NVE:   FAILED") for line in lines)
    assert any("2x2x2 supercell" in line for line in lines)


def test_summary_lines_report_stress(emt_run):
    *_, lines, _, _ = emt_run
    valid = next(line for line in lines if line.startswith("valid:"))
    test = next(line for line in lines if line.startswith("test:"))
    assert "stress MAE" in valid and "GPa" in valid and "stress MAE" in test
    assert any(line.startswith("epoch") and "S MAE" in line for line in lines)


def test_given_e0s_are_kept_and_recorded(emt_run):
    _, err, data, _, lines, _, e0 = emt_run
    result = err.result
    assert result.potential.atomic_energies == (e0,)  # not re-fitted by default
    record = result.metadata["atomic_energies"]
    assert record["refit_setting"] is None
    el = record["elements"]["29"]
    assert el["symbol"] == "Cu" and el["source"] == "given" and el["refitted"] is False
    assert el["initial_eV"] == el["final_eV"] == e0
    assert np.isfinite(record["train_energy_offset_meV_per_atom"])
    # the shift: the training set's mean per-atom energy after the given E0 (numpy, from the labels)
    assert err.result.metadata["n_train"] == len(data.train)
    shift = float(np.mean((data.train.energy - e0 * data.train.n_atoms) / data.train.n_atoms))
    assert result.potential.shift == pytest.approx(shift, rel=1e-12)
    assert record["shift_eV_per_atom"] == result.potential.shift
    assert record["shift_from"] == finish.SHIFT_FROM_GIVEN_E0S
    header = read_header(result.model_path)
    assert header["potential"]["shift"] == result.potential.shift
    assert header["potential"]["atomic_energies"] == [e0]
    assert any("E0s given in the config kept" in line for line in lines)


def test_given_e0s_set_the_shift_to_the_mean_per_atom_energy_after_them(tmp_path):
    """Given E0s (EMT's isolated Cu and Au atoms) on Cu/Au cells of varying composition: the potential keeps
    the E0s as given and starts from shift = mean over structures of (E − Σ E0) / N (mace-torch's
    ScaleShiftMACE), computed here from the labels with numpy; the model file records both. Fitted E0s keep
    shift 0. A shift left at 0, taken per structure instead of per atom, or from the fitted E0s fails this."""
    rng = np.random.default_rng(3)
    frames = []
    for k in range(12):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat((1, 1, 1 + k % 3))  # 4, 8 or 12 atoms
        atoms.numbers[rng.random(len(atoms)) < 0.4] = 79
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces()
        frames.append(atoms)
    ase.io.write(tmp_path / "train.extxyz", frames[:10])
    ase.io.write(tmp_path / "valid.extxyz", frames[10:])
    e0 = {}
    for z in (29, 79):
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.calc = EMT()
        e0[z] = float(atom.get_potential_energy())
    train_frames = frames[:10]
    energies = np.array([a.get_potential_energy() for a in train_frames])
    e0_sums = np.array([sum(e0[int(z)] for z in a.numbers) for a in train_frames])
    expected = float(np.mean((energies - e0_sums) / [len(a) for a in train_frames]))
    assert abs(expected) > 1.0  # EMT's cohesive energy (eV/atom): what the network would otherwise learn
    assert abs(expected - (energies - e0_sums).sum() / sum(len(a) for a in train_frames)) > 1e-4  # per structure

    def built(e0s: str):
        cfg = load_config(
            None,
            [
                f"data.train={tmp_path / 'train.extxyz'}",
                f"data.valid={tmp_path / 'valid.extxyz'}",
                "model.name=schnet",
                SCHNET,
                "model.r_max=3.5",
                f"model.atomic_energies={e0s}",
            ],
        )
        train_set = load_datasets(cfg).train
        return build_potential(cfg, train_set, build_neighbour_graphs(train_set, 3.5))[0]

    potential = built(f"{{29: {e0[29]!r}, 79: {e0[79]!r}}}")
    assert potential.atomic_energies == (e0[29], e0[79])  # kept as given
    assert potential.shift == pytest.approx(expected, rel=1e-12)
    header = read_header(save_model(tmp_path / "m.eqf", potential, potential.init(jax.random.PRNGKey(0))))
    assert header["potential"]["shift"] == potential.shift
    assert header["potential"]["atomic_energies"] == [e0[29], e0[79]]
    assert built("fit").shift == 0.0


@pytest.mark.slow
def test_given_e0s_reach_the_energy_error_of_fitted_ones(tmp_path):
    """``benchmarks/given_e0s.py`` on pure Cu: a small MACE trained on the same EMT cells once with fitted E0s
    and once with EMT's isolated-atom energy as the given E0 (shift from the mean per-atom energy after it); the
    given run's test energy RMSE is within 10 % of the fitted one's (1.73 against 1.62 meV/atom when written,
    1.07x). It fails without the shift (1.98 meV/atom, 1.22x). On a Cu/Au alloy the target is not reached
    robustly (BENCHMARKS.md). About 3-8 minutes on 2 cores."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "given_e0s.py"
    out = tmp_path / "rows.json"
    args = [sys.executable, str(script), "--out", str(tmp_path), "--runs", "fitted", "given"]
    subprocess.run([*args, "--json", str(out)], check=True, capture_output=True, timeout=2400)
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    fitted, given = rows["fitted"], rows["given"]
    assert given["shift_eV_per_atom"] < -1.0 and fitted["shift_eV_per_atom"] == 0.0
    assert given["test_energy_per_atom_rmse_meV"] <= 1.10 * fitted["test_energy_per_atom_rmse_meV"]


# ---------------------------------------------------------------------------------------------- the gate
def test_supercell_for_cutoff():
    cu = bulk("Cu", "fcc", a=3.61, cubic=True)
    big, reps = supercell_for_cutoff(cu, 3.5)
    assert reps == (2, 2, 2) and len(big) == 32 and np.all(cell_heights(big.cell[:]) > 7.0)
    assert supercell_for_cutoff(cu, 1.8)[1] == (1, 1, 1)  # 3.61 > 3.6 already
    assert supercell_for_cutoff(cu, 1.805)[1] == (2, 2, 2)  # exactly 2 r_max is not enough
    # the LiPS20 Li3P cell: hexagonal, heights 7.34, 7.34, 15.14 Å
    li3p = Atoms("Li", cell=[[8.472, 0, 0], [-4.236, 7.337, 0], [0, 0, 15.141]], pbc=True)
    cell, reps = supercell_for_cutoff(li3p, 5.0)
    assert reps == (2, 2, 1) and np.all(cell_heights(cell.cell[:]) > 10.0)
    # a skewed triclinic cell: repetitions follow the heights, not the lattice-vector lengths
    tri = Atoms("Cu", cell=[[4.0, 0, 0], [3.5, 2.0, 0], [0, 0, 9.0]], pbc=True)
    cell, reps = supercell_for_cutoff(tri, 4.0)
    assert reps == (5, 5, 1) and np.all(cell_heights(cell.cell[:]) > 8.0)
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    assert supercell_for_cutoff(molecule, 5.0) == (molecule, (1, 1, 1))
    # a requested minimum: at least (2, 2, 2), more where the cutoff needs it; molecules stay as they are
    assert supercell_for_cutoff(li3p, 5.0, (2, 2, 2))[1] == (2, 2, 2)
    assert supercell_for_cutoff(li3p, 5.0, (1, 1, 1))[1] == (2, 2, 1)
    assert supercell_for_cutoff(cu, 1.0, (3, 1, 2))[1] == (3, 1, 2)
    assert supercell_for_cutoff(molecule, 5.0, (2, 2, 2))[1] == (1, 1, 1)


class _FakeRunMD:
    def __init__(self, exc):
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status"),
    [(MDBlowUpError("temperature 2e5 K above the limit"), "blew_up"), (DataError("atoms 0 and 1 overlap"), "error")],
)
def test_gate_counts_blow_ups_and_errors_as_failures(monkeypatch, emt_run, exc, status):
    cfg, err, data, _, _, _, _ = emt_run
    import equiforce.md.run

    monkeypatch.setattr(equiforce.md.run, "run_md", _FakeRunMD(exc))
    lines: list[str] = []
    result = energy_conservation_check(err.result.potential, err.result.params, data.valid, cfg.md_check, lines.append)
    assert result["status"] == status and result["passed"] is False
    assert result["blew_up"] is (status == "blew_up")
    assert str(exc) in result["message"] and any(str(exc) in line for line in lines)


def test_md_check_config_validation():
    c = load_config(None, []).md_check
    assert (c.max_drift_meV_per_atom_per_ps, c.on_failure) == (1.0, "warn")
    assert load_config(None, []).model.refit_atomic_energies is None
    with pytest.raises(ConfigError, match="on_failure"):
        load_config(None, ["md_check.on_failure=abort"])
    with pytest.raises(ConfigError, match="max_drift"):
        load_config(None, ["md_check.max_drift_meV_per_atom_per_ps=0"])
    with pytest.raises(ConfigError, match="at least two"):
        load_config(None, ["md_check.steps=50", "md_check.report_interval=50"])
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(None, ["model.refit_atomic_energies=sometimes"])
    assert load_config(None, ["md_check.steps=0"]).md_check.steps == 0
    assert load_config(None, ["md_check.supercell=[2, 2, 1]"]).md_check.supercell == (2, 2, 1)
    for bad in ("[2, 2]", "[0, 1, 1]"):
        with pytest.raises(ConfigError, match="supercell"):
            load_config(None, [f"md_check.supercell={bad}"])


def test_cli_exits_nonzero_when_the_gate_fails(monkeypatch, tmp_path, capsys, emt_run):
    _, err, *_ = emt_run

    def failing_train(cfg, resume=False):
        raise err

    monkeypatch.setattr(trainer, "train", failing_train)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("progress_bar: false\n")
    assert main(["train", str(cfg)]) == 2
    assert "NVE energy-conservation gate failed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- LiPS20
@pytest.mark.slow  # 33-45 s on 2 shared CPU cores
def test_lips20_li3p_stress_training(shared_data, tmp_path):
    """Real periodic AIMD data with virials: Li3P (64 atoms, hexagonal cell with heights 7.3 and 15.1 Å)."""
    system = shared_data / "lips20" / "Li3P" / "3000K" / "deepmd" / "Li48P16S0"
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "progress_bar=false",
            f"data.train={system}",
            "data.train_size=40",
            "data.valid_fraction=0.01",  # 10 of 1000 frames
            f"data.test={system}",
            "data.test_size=10",
            "model.name=schnet",
            "model.r_max=4.0",  # 2 r_max = 8 Å > 7.34 Å: the NVE check runs a 2x2x1 supercell (256 atoms)
            SCHNET,
            "loss.stress_weight=1e4",
            "optim.batch_size=4",
            "optim.max_epochs=4",
            "optim.learning_rate=0.01",
            "md_check.steps=100",
            "md_check.report_interval=50",
            "md_check.timestep_fs=1.0",
        ],
    )
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    data = load_datasets(cfg)
    initial, _ = build_potential(cfg, data.train, build_neighbour_graphs(data.train, cfg.model.r_max))
    untrained = evaluate(initial, initial.init(jax.random.PRNGKey(cfg.seed)), data.valid)
    s0, s1 = untrained["stress_mae_meV_per_A3"], result.valid_metrics["stress_mae_meV_per_A3"]
    # measured (2 CPU cores): stress MAE 35.3 → 5.1 meV/Å³ (ratio 0.15), forces 663 → 245 meV/Å
    assert s1 < 0.4 * s0, (s0, s1)
    meta = read_header(result.model_path)["metadata"]
    assert meta["post_training"] == {**meta["post_training"], "complete": True, "errors": {}}
    nve = meta["nve_check"]
    assert nve["supercell"] == [2, 2, 1] and nve["n_atoms"] == 256 and nve["status"] in ("passed", "failed")
    assert meta["test_metrics"]["stress_mae_meV_per_A3"] > 0
