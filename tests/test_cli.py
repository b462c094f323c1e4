"""The ``equiforce`` command line: train → evaluate → info on a tiny model, and its error handling."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import yaml

from equiforce.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``equiforce train config.yaml optim.max_epochs=1 ...`` with a relative output_dir."""
    folder = tmp_path_factory.mktemp("cli")
    cfg = folder / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "output_dir": "run",  # relative to the config file's folder
                "progress_bar": False,
                "model": {"hyperparameters": {"num_interactions": 1, "num_features": 4, "l_max": 1}},
                "data": {"train_size": 20, "valid_fraction": 0.01, "test_size": 10},
                "optim": {"max_epochs": 5, "batch_size": 5},
                "md_check": {"steps": 100, "report_interval": 50},
            }
        )
    )
    rc = main(["train", str(cfg), "optim.max_epochs=1", "seed=3"])
    return rc, folder, cfg


def test_train(trained_run):
    rc, folder, _ = trained_run
    assert rc == 0
    out = folder / "run"
    assert (out / "model.eqf").is_file() and (out / "best.eqf").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the override won over the file's 5
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["seed"] == 3 and written["optim"]["max_epochs"] == 1
    assert (out / "learning_curve.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluate_writes_parity_and_json(trained_run, tmp_path, capsys):
    _, folder, _ = trained_run
    model = folder / "run" / "model.eqf"
    png, js = tmp_path / "parity.png", tmp_path / "metrics.json"
    rc = main(["evaluate", str(model), "sample:test", "--parity", str(png), "--json", str(js), "--batch-size", "10"])
    assert rc == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads(js.read_text())
    assert {"energy_mae_meV", "energy_rmse_meV", "forces_mae_meV_per_A", "forces_rmse_meV_per_A"} <= set(metrics)
    assert all(math.isfinite(v) and v > 0 for v in metrics.values())
    assert metrics["forces_rmse_meV_per_A"] >= metrics["forces_mae_meV_per_A"]
    out = capsys.readouterr().out
    assert "(1000 structures)" in out and "forces_mae_meV_per_A" in out and "parity plot written" in out


def test_info_describes_the_model_for_a_person(trained_run, capsys):
    """Labelled plain-text lines, each checked against the header's own values (and the parameter count against
    the loaded parameter tree), not JSON."""
    import jax

    from equiforce.potentials import load_model, read_header

    _, folder, _ = trained_run
    path = folder / "run" / "model.eqf"
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    header = read_header(path)
    meta = header["metadata"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()[1:] if ":" in line[:14]}
    _, params, _ = load_model(path)
    network = {k: v for k, v in params.items() if k != "llpr"}  # LLPR's projections are not network weights
    n_params = sum(np.size(x) for x in jax.tree.leaves(network))
    r_max = header["potential"]["r_max"]
    assert lines["model"].startswith(f"nequip, {n_params:,} parameters, float32, r_max {r_max:g}")
    assert lines["species"] == "H, C, O"
    e0 = header["potential"]["atomic_energies"]
    assert lines["E0s"].startswith(f"H {e0[0]:.4f}") and f"O {e0[2]:.4f}" in lines["E0s"]
    sizes = f"{meta['n_train']} train / {meta['n_valid']} valid / 10 test structures"
    assert lines["trained on"] == f"sample:train (test: sample:test); {sizes}"
    assert lines["training"].startswith("1 epochs")
    assert f"energy MAE {meta['test_metrics']['energy_mae_meV']:.1f} meV" in lines["test errors"]
    nve = meta["nve_check"]
    assert lines["NVE check"].startswith(nve["status"].replace("failed", "FAILED"))
    assert "100 steps of 0.5 fs = 0.05 ps" in lines["NVE check"]
    assert "uncertainty" in lines and "lineage" not in lines  # trained from scratch


def test_info_json_prints_the_raw_header(trained_run, capsys):
    _, folder, _ = trained_run
    capsys.readouterr()
    assert main(["info", str(folder / "run" / "model.eqf"), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["format"] == "equiforce-model"
    assert header["potential"]["species"] == [1, 6, 8]
    assert header["potential"]["model"]["num_features"] == 4
    meta = header["metadata"]
    assert meta["trained_epochs"] == 1 and meta["n_train"] == 20 and meta["n_test"] == 10
    assert meta["test_metrics"]["forces_mae_meV_per_A"] > 0
    # the energy-conservation gate ran after training and its figures sit next to the MAE
    nve = meta["nve_check"]
    assert nve["steps"] == 100 and nve["blew_up"] is False and nve["status"] in ("passed", "failed")
    assert np.isfinite(nve["drift_meV_per_atom_per_ps"]) and nve["fluctuation_meV_per_atom"] > 0
    assert nve["passed"] == (abs(nve["drift_meV_per_atom_per_ps"]) <= 1.0)


def test_resume_of_finished_run_extends_it(trained_run, tmp_path):
    _, folder, _ = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # leave the shared run untouched
    assert main(["train", str(copy / "config.yaml"), "optim.max_epochs=2", "seed=3", "--resume"]) == 0
    assert len((copy / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((copy / "run" / "final_metrics.json").read_text())["trained_epochs"] == 2


# ---------------------------------------------------------------------------------------------- errors
def test_bad_config_path(tmp_path, capsys):
    rc = main(["train", str(tmp_path / "missing.yaml")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "equiforce train: error" in err and "missing.yaml" in err


def test_unknown_config_key_in_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epoch: 3\n")
    assert main(["train", str(cfg)]) == 2
    assert "optim.max_epoch" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_unknown_config_key_in_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["train", str(cfg), "optim.bogus=1"]) == 2
    assert "optim.bogus" in capsys.readouterr().err
    assert main(["train", str(cfg), "optim.max_epochs=many"]) == 2
    assert "optim.max_epochs" in capsys.readouterr().err


def test_evaluate_bad_model_file(tmp_path, capsys):
    bad = tmp_path / "bad.eqf"
    bad.write_bytes(b"not a model")
    assert main(["evaluate", str(bad), "sample:test"]) == 2
    assert "equiforce evaluate: error" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.eqf")]) == 2
    assert "equiforce info: error" in capsys.readouterr().err


def test_keyboard_interrupt_returns_130(tmp_path, monkeypatch):
    from equiforce.training import trainer

    def interrupted(cfg, resume=False, log=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["train", str(cfg)]) == 130


def test_parser_requires_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    args = build_parser().parse_args(["evaluate", "m.eqf", "data.xyz"])
    assert (args.batch_size, args.energy_unit, args.parity, args.json, args.format) == (16, "eV", None, None, None)


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"equiforce {version('equiforce')}"


def test_help_is_plain_text(capsys):
    """No reStructuredText markup (``name``, :func:) in any command's --help."""
    import argparse

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "The equiforce command line" in out and "--version" in out
    helps = []

    def walk(parser):
        helps.append(parser.format_help())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    assert len(helps) > 10
    assert not [h for h in helps if "``" in h or ":func:" in h or ":class:" in h]


def test_an_error_without_a_message_still_says_what_it_is(monkeypatch, capsys):
    from equiforce import cli

    def fails(args):
        raise RuntimeError()

    monkeypatch.setattr(cli, "_cmd_info", fails)
    assert cli.main(["info", "m.eqf"]) == 2
    assert capsys.readouterr().err.strip() == "equiforce info: error: RuntimeError"
