"""`equiforce benchmark rmd17`: settings, data sources, reuse of finished runs, the Markdown table.

The end-to-end runs use the shipped rMD17 aspirin split-01 files laid out as a split directory (and as a
miniature extracted full archive) with a tiny NequIP preset, a few frames and one epoch, so they take
seconds; the real 30-minute runs are documented in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from equiforce.benchmark import PRESETS, PUBLISHED, BenchmarkSettings, get_preset, markdown_table, run_benchmark
from equiforce.benchmark.presets import Preset
from equiforce.benchmark.rmd17 import BenchmarkResult, load_split
from equiforce.cli import main
from equiforce.data import load_sample
from equiforce.data.errors import DataError
from equiforce.data.readers import sample_path
from equiforce.potentials import MODELS

TINY = Preset(
    "nequip",
    "cpu",
    dict(num_interactions=1, l_max=1, num_features=4, parity=False, num_bessel=4, radial_mlp_hidden=8),
    learning_rate=0.01,
)


@pytest.fixture()
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, ("nequip", "cpu"), TINY)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    """The shipped aspirin split-01 files under their andersx/rmd17-npz names."""
    d = tmp_path_factory.mktemp("rmd17")
    for part in ("train", "test"):
        name = f"rmd17_aspirin_{part}_01.npz"
        shutil.copy(sample_path(name), d / name)
    return d


def _settings(tmp_path: Path, **kw) -> BenchmarkSettings:
    defaults = dict(
        molecules=("aspirin",),
        models=("nequip",),
        budget_minutes=5.0,
        out_dir=str(tmp_path / "bench"),
        max_epochs=1,
        train_frames=10,
        test_frames=12,
        md_check_steps=0,
        progress_bar=False,
    )
    defaults.update(kw)
    return BenchmarkSettings(**defaults)


# ----------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kw",
    [
        {"molecules": ("caffeine",)},
        {"models": ("not-a-model",)},
        {"size": "huge"},
        {"split": 6},
        {"budget_minutes": 0.0},
        {"dtype": "float16"},
        {"train_frames": 0},
    ],
)
def test_bad_settings_are_rejected_before_training(kw):
    with pytest.raises(ValueError):
        BenchmarkSettings(**kw)


def test_every_registered_model_has_both_presets():
    for name in MODELS:
        for size in ("cpu", "paper"):
            preset = get_preset(name, size)
            MODELS[name](**preset.hyperparameters)  # the preset's keys are the config's fields
    for size in ("cpu", "paper"):
        BenchmarkSettings(size=size)  # the default model list is fully covered


def test_published_values_are_the_mace_paper_table():
    assert PUBLISHED[("aspirin", "mace")] == (2.2, 6.6)
    assert PUBLISHED[("aspirin", "allegro")] == (2.3, 7.3)
    assert PUBLISHED[("aspirin", "nequip")] == (2.3, 8.2)
    assert PUBLISHED[("ethanol", "mace")] == (0.4, 2.1)
    assert PUBLISHED[("ethanol", "nequip")] == (0.4, 2.8)


def test_markdown_table_lists_results_and_published_values():
    settings = BenchmarkSettings(molecules=("aspirin",), models=("nequip",))
    r = BenchmarkResult(
        molecule="aspirin",
        model="nequip",
        size="cpu",
        dtype="float32",
        hyperparameters={"num_features": 32},
        n_params=153_000,
        n_train=950,
        n_valid=50,
        n_test=1000,
        epochs=76,
        training_time_s=1805.0,
        first_step_s=14.7,
        stopped_because="time_budget",
        energy_mae_meV=15.13,
        forces_mae_meV_per_A=29.31,
        energy_rmse_meV=20.0,
        forces_rmse_meV_per_A=40.0,
        nve_drift_meV_per_atom_per_ps=0.002,
        device="CPU: test (2 cores)",
        model_path="x.eqf",
    )
    table = markdown_table(settings, [r])
    row = next(line for line in table.splitlines() if line.startswith("| aspirin"))
    assert "| 153,000 | 76 | 30 min 05 s | 15.1 | 29.3 | 2.3 / 8.2 | +0.002 |" in row
    assert "950 training / 50 validation" in table and "NON-STANDARD" not in table
    assert "arXiv:2206.07697" in table
    quick = markdown_table(dataclasses.replace(settings, train_frames=10), [r])
    assert "NON-STANDARD quick check: 10 training frames" in quick


# ------------------------------------------------------------------------------------------- data
def test_split_directory_and_full_archive_give_the_same_frames(split_dir, tmp_path):
    train, test = load_split("aspirin", 1, data_dir=split_dir)
    assert (len(train), len(test)) == (1000, 1000)
    # A miniature extracted full archive: npz_data/rmd17_aspirin.npz (test frames first) + index files.
    root = tmp_path / "cache" / "rmd17"
    (root / "npz_data").mkdir(parents=True)
    (root / "splits").mkdir()
    a, b = (np.load(sample_path(f"rmd17_aspirin_{p}_01.npz")) for p in ("test", "train"))
    np.savez(
        root / "npz_data" / "rmd17_aspirin.npz",
        nuclear_charges=a["nuclear_charges"],
        **{k: np.concatenate([a[k], b[k]]) for k in ("coords", "energies", "forces")},
    )
    np.savetxt(root / "splits" / "index_train_01.csv", np.arange(1000, 2000), fmt="%d")
    np.savetxt(root / "splits" / "index_test_01.csv", np.arange(1000), fmt="%d")
    train2, test2 = load_split("aspirin", 1, cache=tmp_path / "cache")
    np.testing.assert_array_equal(train2.positions, train.positions)
    np.testing.assert_array_equal(test2.energy, test.energy)
    np.testing.assert_allclose(train.energy, load_sample("train").energy)


def test_missing_split_files_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="rmd17_ethanol"):
        load_split("ethanol", 1, data_dir=tmp_path)
    args = ["benchmark", "rmd17", "--molecules", "ethanol", "--models", "nequip", "--data-dir", str(tmp_path)]
    code = main([*args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2


# ------------------------------------------------------------------------------------ end to end
def test_run_writes_table_and_reuses_finished_runs(split_dir, tmp_path, tiny_preset):
    settings = _settings(tmp_path, data_dir=str(split_dir))
    lines: list[str] = []
    (result,) = run_benchmark(settings, log=lines.append)
    out = Path(settings.out_dir)
    assert (result.n_train, result.n_valid, result.n_test) == (10, 50, 12)
    assert result.epochs == 1 and result.stopped_because == "max_epochs"
    assert np.isfinite(result.energy_mae_meV) and np.isfinite(result.forces_mae_meV_per_A)
    assert result.n_params > 0 and result.device.startswith("CPU")
    table = (out / "results.md").read_text()
    assert f"{result.forces_mae_meV_per_A:.1f}" in table and "2.3 / 8.2" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"][0]["energy_mae_meV"] == pytest.approx(result.energy_mae_meV)
    assert (out / "data" / "rmd17_aspirin_test_01.h5").is_file()

    model_file = out / "aspirin_nequip" / "model.eqf"
    stamp = model_file.stat().st_mtime_ns
    lines.clear()
    (again,) = run_benchmark(settings, log=lines.append)
    assert any("reusing the finished run" in line for line in lines)
    assert model_file.stat().st_mtime_ns == stamp
    assert again == result

    # Another setting (more frames) is another configuration: it retrains instead of reusing.
    lines.clear()
    (other,) = run_benchmark(dataclasses.replace(settings, train_frames=11), log=lines.append)
    assert not any("reusing" in line for line in lines)
    assert other.n_train == 11 and model_file.stat().st_mtime_ns != stamp


@pytest.mark.slow  # the same run as test_run_writes_table_and_reuses_finished_runs, through the command line
def test_cli_prints_the_table(split_dir, tmp_path, tiny_preset, capsys):
    args = ["benchmark", "rmd17", "--molecules", "aspirin", "--models", "nequip", "--data-dir", str(split_dir)]
    args += ["--out", str(tmp_path / "cli"), "--max-epochs", "1", "--train-frames", "8", "--test-frames", "8"]
    args += ["--md-check-steps", "0", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| aspirin | nequip |" in printed and "NON-STANDARD quick check: 8 training frames" in printed
