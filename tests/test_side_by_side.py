"""`benchmarks/side_by_side.py --rounds R`: the codes interleaved over rounds, each ratio as the median with its
minimum and maximum over the rounds.

No peer venv and no MD run: the measurements are replaced by fake ones with known figures, so the test
checks the order of the runs, the statistics and what lands in ``results.json`` / ``results.md`` (a second).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def sbs():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("side_by_side")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_rounds_interleave_the_codes(sbs):
    calls: list[str] = []

    def runner(label: str):
        def run_once() -> dict:
            calls.append(label)
            return {"steps_per_s": float(len(calls))}

        return run_once

    results = sbs.run_rounds([(c, runner(c)) for c in "ABC"], rounds=3)
    assert calls == list("ABCABCABC")
    assert [r["steps_per_s"] for r in results["B"]] == [2.0, 5.0, 8.0]
    with pytest.raises(ValueError, match="rounds"):
        sbs.run_rounds([("A", runner("A"))], rounds=0)


def test_ratio_stats_pair_the_rounds(sbs):
    stats = sbs.ratio_stats([100.0, 200.0, 150.0], [50.0, 50.0, 100.0])  # per round: 2, 4, 1.5
    assert stats == {"median": 2.0, "min": 1.5, "max": 4.0, "rounds": [2.0, 4.0, 1.5], "n": 3}
    # a failed round (None, 0, NaN) on either side is left out, not counted as a ratio
    stats = sbs.ratio_stats([100.0, None, 90.0, 80.0], [50.0, 40.0, float("nan"), 0.0])
    assert stats["rounds"] == [2.0, None, None, None] and stats["n"] == 1 and stats["median"] == 2.0
    assert sbs.ratio_stats([None], [1.0]) is None
    assert sbs._fmt_ratio(sbs.ratio_stats([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])) == "4 (3–5)"
    assert sbs._fmt_ratio(sbs.ratio_stats([3.0], [1.0])) == "3"
    assert sbs._fmt_ratio(None) == "–"


def test_summarise_rounds(sbs):
    rounds = [
        {"steps_per_s": 10.0, "first_call_s": 3.0, "peak_rss_mb": 900.0, "pairs": [292, 292], "n_params": 7},
        {"steps_per_s": 30.0, "first_call_s": 2.0, "peak_rss_mb": 1000.0, "pairs": [292, 300], "n_params": 7},
        {"steps_per_s": 20.0, "first_call_s": 4.0, "peak_rss_mb": 950.0, "pairs": [292, 293], "error": "slow"},
    ]
    row = sbs.summarise_rounds(rounds)
    assert row["steps_per_s"] == 20.0 and row["first_call_s"] == 3.0 and row["peak_rss_mb"] == 1000.0
    assert row["pairs"] == [292, 300] and row["n_params"] == 7 and row["error"] == "slow"
    assert row["rounds"] == rounds and row["train_step_s"] is None


def test_main_writes_median_min_max(sbs, monkeypatch, tmp_path):
    """The whole harness with fake measurements: equiforce 100/200/150 steps/s against a peer's 50/50/100."""
    order: list[str] = []
    ours = iter([100.0, 200.0, 150.0])
    theirs = iter([50.0, 50.0, 100.0])

    def fake_md(model, system, dtype, args, work):
        order.append("equiforce")
        return {"steps_per_s": next(ours), "atom_steps_per_s": 21.0, "pairs": [292, 292]}

    def fake_train(model, dtype, args, work):
        return {"train_step_s": 0.5, "train_first_s": 4.0}

    def fake_peer(peer, system, dtype, paths, args, work):
        order.append(peer[0])
        return {"code": "peer-pkg", "steps_per_s": next(theirs), "train_step_s": 1.0, "pairs": [292, 292]}

    peer = ("fake peer (ASE)", "fake", "fake_bench.py", [], True)
    monkeypatch.setitem(sbs.PEERS, "mace", [peer])
    monkeypatch.setattr(sbs, "write_inputs", lambda work: {})
    monkeypatch.setattr(sbs, "machine_info", lambda: dict.fromkeys(("cpu", "nproc", "jax", "git_commit", "date"), "x"))
    monkeypatch.setattr(sbs, "equiforce_md", fake_md)
    monkeypatch.setattr(sbs, "equiforce_train", fake_train)
    monkeypatch.setattr(sbs, "peer_run", fake_peer)
    monkeypatch.setattr(sbs, "peer_python", lambda peer, args: Path(sys.executable))
    argv = ["side_by_side.py", "--systems", "aspirin", "--dtypes", "float32", "--rounds", "3", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    sbs.main()

    assert order == ["equiforce", "fake peer (ASE)"] * 3
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["code"] for r in rows] == ["equiforce mace", "fake peer (ASE)"]
    assert rows[0]["steps_per_s"] == 150.0 and rows[1]["steps_per_s"] == 50.0  # each code's median
    assert rows[1]["ratio"] == 2.0
    assert {k: rows[1]["ratio_stats"][k] for k in ("median", "min", "max")} == {"median": 2.0, "min": 1.5, "max": 4.0}
    assert rows[1]["train_ratio"] == 0.5 and rows[1]["package"] == "peer-pkg" and len(rows[1]["rounds"]) == 3
    table = (tmp_path / "results.md").read_text()
    assert "| 2 (1.5–4) |" in table and "| 0.5 (0.5–0.5) |" in table
    assert "3 round(s)" in table
