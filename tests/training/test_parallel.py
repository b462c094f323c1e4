"""Data-parallel training (``parallel.devices``): the same loss curve on 4 devices as on 1, checkpoints that move
between device counts, one compilation of the step.

JAX fixes its device count when it starts, so the runs go in one fresh subprocess with 4 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), in float64 so that agreement to 1e-6 means the
same mathematics (the observed difference is ~1e-15: only the order of additions changes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from equiforce.training import load_config
from equiforce.training.config import ConfigError
from equiforce.training.parallel import resolve_devices, split_group

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    from equiforce.training import load_config, train

    out = sys.argv[1]
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "Finished XLA compilation of jit(step)" in msg:
                compiles.append(msg)

    logging.getLogger("jax").addHandler(Count())
    logging.getLogger("jax").setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)

    def run(name, devices, epochs, extra=(), resume=False):
        cfg = load_config(None, [
            f"output_dir={out}/{name}", "model.name=nequip", "model.dtype=float64",
            "model.hyperparameters={num_interactions: 1, l_max: 1, num_features: 4, num_bessel: 4}",
            "data.train_size=14", "data.test=null", "optim.batch_size=5", f"optim.max_epochs={epochs}",
            "model.uncertainty=false", "md_check.steps=0", "progress_bar=false",
            f"parallel.devices={devices}", *extra])
        before = len(compiles)
        train(cfg, resume=resume, log=lambda s: None)
        rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
        return {"train_loss": [r["train_loss"] for r in rows], "valid_loss": [r["valid_loss"] for r in rows],
                "step_compiles": len(compiles) - before}

    committee = ("model.ensemble_size=2", "model.bootstrap=true")
    result = {
        "n_devices": len(jax.devices()),
        "one": run("one", 1, 3),
        "four": run("four", 4, 3),
        "four_then_one": (run("a", 4, 2), run("a", 1, 3, resume=True))[1],
        "one_then_four": (run("b", 1, 2), run("b", 4, 3, resume=True))[1],
        "committee_one": run("c1", 1, 2, committee),
        "committee_four": run("c4", 4, 2, committee),
    }
    print("RESULT" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path_factory.mktemp("parallel")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _close(a: list[float], b: list[float], rtol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(a, b, strict=True))


def test_four_devices_reproduce_the_one_device_loss_curve(runs):
    assert runs["n_devices"] == 4
    one, four = runs["one"], runs["four"]
    assert len(one["train_loss"]) == 3
    assert _close(four["train_loss"], one["train_loss"]) and _close(four["valid_loss"], one["valid_loss"])
    assert one["train_loss"][-1] < one["train_loss"][0]  # it trained


def test_checkpoints_move_between_device_counts(runs):
    one = runs["one"]
    for key in ("four_then_one", "one_then_four"):
        assert _close(runs[key]["train_loss"], one["train_loss"]), key
        assert _close(runs[key]["valid_loss"], one["valid_loss"]), key


def test_committee_with_bootstrap_is_the_same_on_four_devices(runs):
    assert _close(runs["committee_four"]["train_loss"], runs["committee_one"]["train_loss"])
    assert _close(runs["committee_four"]["valid_loss"], runs["committee_one"]["valid_loss"])


def test_the_step_compiles_once(runs):
    # the last batch of an epoch is smaller: the per-device budget still holds it, so no second compilation
    assert runs["four"]["step_compiles"] == 1
    assert runs["one"]["step_compiles"] == 1


def test_split_group():
    assert split_group([1, 2, 3, 4, 5], 4) == [[1, 2], [3], [4], [5]]
    assert split_group([7], 3) == [[7], [], []]
    parts = split_group(list(range(10)), 3)
    assert [i for p in parts for i in p] == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]


def test_device_settings():
    assert len(resolve_devices(None)) == 1  # CPU: one device by default
    assert len(resolve_devices("all")) >= 1 and len(resolve_devices(1)) == 1
    with pytest.raises(ConfigError, match="device"):
        resolve_devices(10_000)
    with pytest.raises(ConfigError, match=r"parallel\.devices"):
        load_config(None, ["parallel.devices=some"])
    with pytest.raises(ConfigError, match=r"parallel\.devices"):
        load_config(None, ["parallel.devices=0"])
    assert load_config(None, ["parallel.devices=all"]).parallel.devices == "all"
