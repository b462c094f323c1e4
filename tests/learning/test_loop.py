"""The active-learning loop end to end (issue 29 §2 and "Bad input"), on tiny EMT copper cells.

One run of ``equiforce learn`` (module fixture, in-process): 6 unlabelled 32-atom Cu cells are labelled and a
tiny SchNet trained on them (generation 0), then one generation: Langevin MD at 1200 K with σ in the compiled
chunk, candidates, a batch of 3, labels, fine-tuning, recalibration, reports. The labeller is a ``python:``
EMT that logs every call, so the test sees how often each frame was computed. Checked against independent
computations: labels against ASE's EMT, the stored per-atom σ_F against the picking model's own prediction,
the lineage's checksums against ``hashlib``. Running the same command again says the run is finished and
computes nothing. Bad inputs fail before any MD (the output folder is not even created).

Slow: a kill at ``al-label`` during generation 1 (a subprocess), then the same command: no label computed
twice, each generation once in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT

from equiforce.cli import main
from equiforce.learning.labelling import LABELLED, read_frames

from .test_labelling import COUNTING_LABELLER

TRAINING = {
    "model": {
        "name": "schnet",
        "r_max": 3.0,  # the 2x2x2 cubic cell (7.22 Å) must be more than 2 r_max high for MD
        "hyperparameters": {"num_interactions": 1, "num_features": 8, "num_filters": 8, "num_rbf": 6},
    },
    "optim": {"max_epochs": 2, "batch_size": 4},
    "data": {"valid_fraction": 0.34},
}


def _cu(seed: int, rattle: float = 0.05):
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    a.rattle(rattle, seed=seed)
    return a


def _config(folder, **changes) -> dict:
    cfg = {
        "output_dir": "run",
        "start": {"structures": "start.extxyz"},
        "seeds": "seeds.extxyz",
        "labeller": {"kind": "python", "function": "al_counting:make"},
        "md": {
            "conditions": [{"temperature_K": 1200}],
            "timestep_fs": 2.0,
            "target_ps": 0.04,
            "report_interval": 10,
        },
        # upper: low enough that the tiny model's MD crosses it (so a generation labels), yet above lower
        "selection": {"lower": 0.001, "upper": 0.02, "batch_size": 3, "candidates": 2},
        "budget": {"max_labels": 3, "max_generations": 1},
        "training": {"mode": "finetune", "config": TRAINING},
    }
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    path = folder / f"al_{len(list(folder.glob('al_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def counting_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("al")
    (folder / "al_counting.py").write_text(COUNTING_LABELLER)
    ase.io.write(folder / "start.extxyz", [_cu(k) for k in range(6)])
    ase.io.write(folder / "seeds.extxyz", [_cu(100, 0.0)])
    ase.io.write(folder / "fe.extxyz", bulk("Fe", "bcc", a=2.87, cubic=True).repeat(3))
    ag = _cu(0)
    ag.symbols[0] = "Ag"
    ase.io.write(folder / "ag.extxyz", ag)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(folder))
    mp.setenv("PYTHONPATH", f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    mp.setenv("AL_CALL_LOG", str(folder / "calls.log"))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def one_generation(counting_env):
    """About 2 minutes on 2 busy cores (two trainings and one MD, each compiled): the tests using it are slow."""
    folder = counting_env
    config = _config(folder)
    rc = main(["learn", str(config)])
    return folder, config, rc


@pytest.mark.slow
def test_one_generation_via_the_cli(one_generation):
    folder, _, rc = one_generation
    assert rc == 0
    run = folder / "run"
    report = json.loads((run / "report.json").read_text())
    assert [g["generation"] for g in report["generations"]] == [0, 1]
    assert report["finished"].startswith("label budget spent")
    csv_rows = (run / "report.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and "| 1 |" in (run / "report.md").read_text()
    assert (run / "report.png").stat().st_size > 0 and (run / "gen_001" / "sigma.png").stat().st_size > 0
    g1 = report["generations"][1]
    cond = g1["conditions"]["nvt_langevin_1200K"]
    assert 0 < cond["min_time_below_upper_ps"] <= 0.04 + 1e-9 and cond["n_replicas"] == 1
    cal = g1["calibration"]
    assert all(0.0 <= cal[k] <= 1.0 for k in ("previous_model", "before", "after"))
    # recalibrated on the 6 start frames (in distribution) with the 3 labelled ones: too few for the power law
    assert (cal["n_in_distribution"], cal["n_shifted"], cal["fit"]) == (6, 3, "scale")
    assert cal["record"]["forces"]["exponent"] == 1.0 and cal["record"]["forces"]["structure_exponent"] == 0.0
    # every label computed once: 6 start structures + 3 picked frames
    calls = (folder / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)) == 9


@pytest.mark.slow
def test_labelled_frames_carry_emt_labels_and_the_picking_models_sigma(one_generation):
    from equiforce.data.structures import StructureSet
    from equiforce.potentials.model_io import load_model
    from equiforce.uncertainty.calibration import predict_uncertainties

    folder, _, _ = one_generation
    frames = read_frames(folder / "run" / "gen_001" / LABELLED)
    assert len(frames) == 3
    for a in frames:
        ref = a.copy()
        ref.calc = EMT()
        assert a.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(a.get_forces(), ref.get_forces(), atol=1e-6)
    potential, params, _ = load_model(folder / "run" / "gen_000" / "model.eqf")
    pred = predict_uncertainties(potential, params, StructureSet.from_atoms(frames))
    stored = np.concatenate([a.arrays["sigma_forces"] for a in frames])
    # float32 LLPR: a frame's σ_F depends on its batch's padding to rounding (up to ~1 % on the smallest σ);
    # another model's σ differs by its whole calibration factor
    rel = np.abs(stored / pred.forces_uncertainty - 1.0)
    assert np.median(rel) < 1e-3 and np.max(rel) < 3e-2


@pytest.mark.slow
def test_final_model_lists_each_generations_data_with_checksums(one_generation):
    from equiforce.potentials.model_io import read_header

    folder, _, _ = one_generation
    run = folder / "run"
    meta = read_header(run / "model.eqf")["metadata"]["active_learning"]
    gens = {e["generation"]: e for e in meta["generations"]}
    assert sorted(gens) == [0, 1]
    for g, n in ((0, 6), (1, 3)):
        f = run / f"gen_{g:03d}" / LABELLED
        assert gens[g]["n_frames"] == n == len(ase.io.read(f, ":"))
        assert gens[g]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_same_command_again_says_finished_and_computes_nothing(one_generation, capsys):
    folder, config, _ = one_generation
    before = (folder / "run" / "report.json").read_bytes()
    n_calls = len((folder / "calls.log").read_text().split())
    assert main(["learn", str(config)]) == 0
    assert "already finished" in capsys.readouterr().out
    assert (folder / "run" / "report.json").read_bytes() == before
    assert len((folder / "calls.log").read_text().split()) == n_calls


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selection.lower": 0.5}, "must be below selection.upper"),
        ({"budget.max_labels": 2}, "smaller than one batch"),
        ({"labeller": {"kind": "python", "function": "no_such_labeller_mod:make"}}, "cannot import"),
        ({"labeller": {"kind": "emt"}, "seeds": "fe.extxyz"}, r"does not support element\(s\) \['Fe'\]"),
        ({"seeds": "ag.extxyz"}, r"element\(s\) \['Ag'\] that the start data lack"),
        ({"start": {"model": "no_such_model.eqf"}}, "no such file"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_md(counting_env, capsys, changes, message):
    folder = counting_env
    out = f"bad_{len(list(folder.glob('bad_*')))}"
    config = _config(folder, output_dir=out, **changes)
    assert main(["learn", str(config)]) == 2
    err = capsys.readouterr().err
    assert "equiforce learn: error:" in err and "Traceback" not in err
    assert re.search(message, err), err
    assert not (folder / out).exists()  # nothing ran, nothing written


@pytest.mark.slow
def test_model_that_does_not_know_a_seed_element(one_generation, capsys):
    folder, _, _ = one_generation
    config = _config(folder, output_dir="bad_model", start={"model": "run/model.eqf"}, seeds="ag.extxyz")
    assert main(["learn", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Ag" in err and "Traceback" not in err and not (folder / "bad_model").exists()


@pytest.mark.slow
def test_kill_at_al_label_then_resume_computes_no_label_twice(counting_env):
    folder = counting_env
    (folder / "calls.log").unlink(missing_ok=True)
    config = _config(folder, output_dir="killed", **{"budget.max_generations": 2, "budget.max_labels": 6})
    cmd = [sys.executable, "-m", "equiforce", "learn", str(config)]
    # occurrence 8: the 6 start labels, then the second label of generation 1
    env = {**os.environ, "EQUIFORCE_FAULT": "al-label:computed:8"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode in (-9, 137) and "killed at al-label:computed" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = (folder / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)) == 6 + 6
    report = json.loads((folder / "killed" / "report.json").read_text())
    assert [g["generation"] for g in report["generations"]] == [0, 1, 2]


def test_collapsed_frames_are_recognised_across_the_periodic_boundary():
    """A replica that collapses with σ_F below upper: its frames from the collapse on are cut from the
    candidates (the data pipeline refuses atoms closer than 0.5 Å), found also across the cell boundary."""
    from equiforce.learning.loop import _collapsed

    a = _cu(0, 0.0)
    assert not _collapsed(a)
    b = a.copy()
    b.positions[1] = b.positions[0] + [0.3, 0.0, 0.0]
    assert _collapsed(b)
    c = a.copy()
    c.positions[0] = [0.1, 0.1, 0.1]
    c.positions[1] = [c.cell[0, 0] - 0.1, 0.1, 0.1]  # 0.2 Å apart through the periodic boundary only
    assert np.linalg.norm(c.positions[1] - c.positions[0]) > 7.0 and _collapsed(c)
