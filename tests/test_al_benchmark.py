"""`benchmarks/active_learning.py`: the two targets of issue 29 §3 evaluated from per-generation rows.

No training and no MD: hand-made rows with known figures (a second). The expected label ratios are worked out
by hand in the comments, not with the script's formula.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def al():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("active_learning")
    finally:
        sys.path.remove(str(BENCHMARKS))


SYSDEF = {"name": "toy", "tests": {300: None, 1000: None}, "targets": (600, 1000)}


def _row(seed, strategy, gen, labels, mae_1000, unstable=float("nan"), simulated=10.0):
    stab = {"1000": {"unstable_ps": unstable, "simulated_ps": simulated, "reason": "x"}}
    return {
        "seed": seed,
        "strategy": strategy,
        "generation": gen,
        "labels": labels,
        "forces_mae_meV_per_A": {"300": 50.0, "1000": mae_1000},
        "stability": stab,
        "wall_s": {"md": 1.0, "labelling": 0.1, "training": 2.0, "stability": 3.0},
    }


def _rows(final_unstable=float("nan")):
    rows = []
    # seed 0: b ends at 100 meV/Å with 20 labels; a is at 90 after 5 labels -> 5/20 = 0.25
    # seed 1: b ends at 100 with 20; a first at or below 100 after 10 labels -> 0.5
    # seed 2: a never reaches b's 60 -> no ratio (counts as infinite)
    for seed, a_mae, b_final in ((0, (150, 90, 80), 100), (1, (150, 120, 100), 100), (2, (150, 120, 100), 60)):
        for g, (labels, mae) in enumerate(zip((0, 5, 10), a_mae, strict=True)):
            rows.append(_row(seed, "a", g, labels, mae, unstable=final_unstable if g == 2 else float("nan")))
        rows += [_row(seed, "b", 1, 10, 130), _row(seed, "b", 2, 20, b_final)]
    return rows


def test_label_ratio_median_and_stability_target(al):
    tg = al.targets(_rows(), SYSDEF, stability_ps=10.0)
    assert tg["per_seed"][0]["ratio"] == pytest.approx(0.25)
    assert tg["per_seed"][1]["ratio"] == pytest.approx(0.5)
    assert tg["per_seed"][2]["a_labels_to_reach"] is None
    assert tg["median_label_ratio"] == pytest.approx(0.5)  # median of 0.25, 0.5, inf
    assert tg["target1_met"] and tg["target2_assessable"] and tg["target2_met"]


def test_an_unstable_final_model_or_short_runs_fail_target_2(al):
    assert not al.targets(_rows(final_unstable=3.2), SYSDEF, stability_ps=10.0)["target2_met"]
    short = al.targets(_rows(), SYSDEF, stability_ps=2.0)
    assert not short["target2_assessable"] and not short["target2_met"]


def test_markdown_lists_every_row_and_the_verdicts(al):
    rows = _rows()
    tg = al.targets(rows, SYSDEF, stability_ps=10.0)
    md = al.markdown(rows, {**SYSDEF, "tests": {300: None, 1000: None}, "targets": (1000,)}, tg, {"command": "x"})
    assert sum(line.startswith("| ") and "|---" not in line for line in md.splitlines()) == len(rows) + 1
    assert "median ratio 0.50 -> met" in md and "(2 of 3 seeds" in md
