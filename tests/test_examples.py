"""The example scripts in examples/ run end to end on tiny settings (a toy model trained in seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import ase.io
import numpy as np
import pytest

from equiforce.data import read_structures
from equiforce.md import read_h5md
from equiforce.potentials import load_model
from equiforce.training import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ("train_from_trajectory", "md_from_script", "ase_relax_and_md")
# the tutorial scripts of the documentation site (run end to end by docs/run_tutorials.py in CI's docs target)
TUTORIAL_SCRIPTS = (
    "npt_crystal",
    "precision",
    "uncertainty_md",
    "finetune",
    "vibrations",
    "benchmark_quick",
    "parallel_training",
)


def load_example(name: str) -> ModuleType:
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"equiforce_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Output folder of examples/train_from_trajectory.py --tiny (30 exported frames, 2 epochs, toy model)."""
    out = tmp_path_factory.mktemp("train_from_trajectory")
    assert load_example("train_from_trajectory").main(["--tiny", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", SCRIPTS + TUTORIAL_SCRIPTS)
def test_scripts_run_as_programs(name):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and ("--model" in done.stdout or "--tiny" in done.stdout)


def test_readme_main_job_trains_mace():
    """The README's first command trains the most accurate model at equal CPU time (MACE, see BENCHMARKS.md)."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "equiforce train examples/aspirin_cpu.yaml" in readme
    cfg = load_config(EXAMPLES / "aspirin_cpu.yaml")
    assert cfg.model.name == "mace" and cfg.data.train == "sample:train"
    assert 0 < cfg.optim.time_budget_minutes <= 15
    assert load_config(EXAMPLES / "aspirin_nequip_cpu.yaml").model.name == "nequip"


def test_train_from_trajectory(tiny_run, capsys):
    # The exported extxyz files carry the DFT labels and read back through equiforce's readers.
    train_set = read_structures(tiny_run / "aspirin_train.extxyz")
    assert len(train_set) == 30 and train_set.energy is not None and train_set.forces is not None
    assert len(read_structures(tiny_run / "aspirin_test.extxyz")) == 10
    # The model file loads and records test metrics; the run wrote its metrics files.
    potential, _, header = load_model(tiny_run / "model.eqf")
    assert list(potential.species) == [1, 6, 8]
    test_metrics = header["metadata"]["test_metrics"]
    assert np.isfinite(test_metrics["forces_mae_meV_per_A"])
    final = json.loads((tiny_run / "final_metrics.json").read_text())
    assert final["n_train"] == 27 and final["n_test"] == 10 and final["trained_epochs"] == 2
    assert (tiny_run / "metrics.jsonl").read_text().count("\n") == 2


def test_train_config_from_own_file(tmp_path):
    """--data/--test/--format go into the config as given (checked without training)."""
    module = load_example("train_from_trajectory")
    data, test = tmp_path / "dft.extxyz", tmp_path / "dft_test.extxyz"
    args = module.parse_args(["--data", str(data), "--test", str(test), "--format", "extxyz", "--out", str(tmp_path)])
    cfg = load_config(None, module.build_overrides(args, args.data, args.test))
    assert Path(cfg.data.train) == data.resolve() and Path(cfg.data.test) == test.resolve()
    assert cfg.data.format == "extxyz" and cfg.md_check.steps > 0 and cfg.optim.max_epochs == 100
    no_test = load_config(None, module.build_overrides(args, args.data, None))
    assert no_test.data.test is None


def test_md_from_script(tiny_run, tmp_path, capsys):
    out = tmp_path / "md"
    argv = ["--model", str(tiny_run / "model.eqf"), "--steps", "100", "--report-interval", "10"]
    assert load_example("md_from_script").main([*argv, "--out", str(out), "--no-progress"]) == 0
    traj = read_h5md(out / "md.h5")
    assert traj["positions"].shape == (11, 21, 3)  # frame 0 is the starting structure
    np.testing.assert_array_equal(traj["step"], np.arange(0, 101, 10))
    assert np.all(np.isfinite(traj["positions"])) and np.all(np.isfinite(traj["velocities"]))
    temperature = traj["observables"]["temperature"]
    assert np.all((temperature > 0) & (temperature < 5000))
    table = np.genfromtxt(out / "thermo.csv", delimiter=",", names=True)
    assert table.size == 11 and table["step"][-1] == 100
    np.testing.assert_allclose(table["temperature_K"], temperature)
    final = ase.io.read(out / "final.extxyz")
    np.testing.assert_allclose(final.get_positions(), traj["positions"][-1], atol=1e-6)
    printed = capsys.readouterr().out
    assert "ns/day" in printed and "final temperature" in printed


def test_ase_relax_and_md(tiny_run, tmp_path, capsys):
    out = tmp_path / "ase"
    argv = ["--model", str(tiny_run / "model.eqf"), "--relax-steps", "10", "--md-steps", "40", "--log-interval", "10"]
    assert load_example("ase_relax_and_md").main([*argv, "--out", str(out)]) == 0
    relax = ase.io.read(out / "relax.traj", ":")
    energies = [a.get_potential_energy() for a in relax]
    assert 2 <= len(relax) <= 11  # at most 10 BFGS steps after the start
    assert energies[-1] < energies[0]
    relaxed = ase.io.read(out / "relaxed.extxyz")
    np.testing.assert_allclose(relaxed.get_potential_energy(), energies[-1], rtol=0, atol=1e-3)
    md = ase.io.read(out / "md.traj", ":")
    assert len(md) == 5  # steps 0, 10, 20, 30, 40
    assert all(np.isfinite(a.get_potential_energy()) and 0 < a.get_temperature() < 5000 for a in md)
    printed = capsys.readouterr().out
    assert "BFGS" in printed and "MD done: 40 steps" in printed


@pytest.mark.parametrize("name", ["md_from_script", "ase_relax_and_md"])
def test_missing_model_is_a_clear_error(name, tmp_path, capsys):
    assert load_example(name).main(["--model", str(tmp_path / "none.eqf"), "--out", str(tmp_path)]) == 2
    assert "train one first" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_name_a_valid_model(path):
    from equiforce.potentials import config_from_dict

    cfg = load_config(path)
    model = config_from_dict({"name": cfg.model.name, **cfg.model.hyperparameters})
    assert model.name == cfg.model.name
    assert cfg.model.r_max > 0 and cfg.optim.batch_size >= 1


@pytest.mark.slow
def test_active_learning_example_runs(tmp_path):
    """examples/active_learning.py --tiny: both strategies add the same number of frames per round."""
    assert load_example("active_learning").main(["--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for strategy in ("uncertainty", "random"):
        rows = results[strategy]
        assert [r["n_train"] for r in rows] == [10, 15]
        assert all(np.isfinite(r["forces_mae_meV_per_A"]) for r in rows)
    assert results["uncertainty"][0] == results["random"][0]  # the same round-0 model
