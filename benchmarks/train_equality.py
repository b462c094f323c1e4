"""Bit-equality of training before and after a refactoring of the loop (issue 28, "Training").

``run OUT`` trains tiny float64 NequIP potentials on the shipped aspirin sample, with a fixed seed, and saves
what a user gets from each run under ``OUT/<scenario>/``: the final weights (``model.eqf``), the best and
last-epoch weights (``best.eqf``, the checkpoint), the per-epoch history without its wall-clock fields,
``metrics.jsonl`` and ``final_metrics.json`` (timings left out), including the NVE gate and the uncertainty
calibration of the plain run. Scenarios:

* ``plain``: 3 epochs, NVE gate (60 steps) and uncertainty calibration at the end;
* ``finetune``: ``model.init_from`` the plain model, E0s fitted, one parameter group frozen at a lower
  learning rate, 2 epochs;
* ``resumed``: the plain config, interrupted (KeyboardInterrupt) before step 7 of 15, then ``--resume``;
* ``resumed_foreign`` (with ``--foreign-checkpoint DIR``): the interrupted checkpoint of another tree's run
  (``DIR/resumed/interrupted/checkpoints/last.ckpt``) resumed by this tree: checkpoints stay readable.

``compare A B`` prints, per scenario and file, the largest absolute difference of the weights and whether
the histories and metrics are equal; it exits 1 when anything differs.

Run against the code before a change with a worktree (``git worktree add /tmp/base HEAD``). As
``equiforce.data``, ``.potentials`` and ``.md`` live at the repository root (``package-dir``), give each run
a folder of symbolic links that takes every part from the worktree and only ``training/`` from the tree under
test, so that nothing but the training code differs (and others' uncommitted work elsewhere stays out)::

    farm() { mkdir -p $1/equiforce; for e in /tmp/base/src/equiforce/*; do ln -sfn $e $1/equiforce/; done
             for p in data potentials md; do ln -sfn /tmp/base/$p $1/equiforce/$p; done
             ln -sfn $2 $1/equiforce/training; }
    farm /tmp/pkg_before /tmp/base/src/equiforce/training; farm /tmp/pkg_after $PWD/src/equiforce/training
    PYTHONPATH=/tmp/pkg_before python benchmarks/train_equality.py run /tmp/eq_before
    PYTHONPATH=/tmp/pkg_after python benchmarks/train_equality.py run /tmp/eq_after --foreign-checkpoint /tmp/eq_before
    python benchmarks/train_equality.py compare /tmp/eq_before /tmp/eq_after

``compare`` also checks exact resume within each tree: the training loop of ``plain`` is the uninterrupted
run of ``resumed`` (only what follows the loop differs), so their ``best.eqf`` weights and histories must be
equal. About 7 minutes per ``run`` on 2 shared cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

TINY = "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}"
TIMING = {"time_s", "epoch_time_s", "first_step_s", "elapsed_s", "wall_s", "seconds", "total_s"}
PATHS = {"output_dir", "init_from", "lineage", "model_path"}  # differ between the two trees' output folders


def _base(out: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        "progress_bar=false",
        "model.name=nequip",
        "model.dtype=float64",
        TINY,
        "data.train_size=23",  # 5 batches of 5 per epoch, the last one partial
        "data.valid_fraction=0.01",
        "data.test_size=10",
        "optim.batch_size=5",
        "optim.max_epochs=3",
        "optim.schedule=plateau",
        *extra,
    ]


def _strip(obj):
    """``obj`` without wall-clock fields (a key in TIMING or ending in ``_s``, ``_seconds``, ``_minutes``) and
    without the paths of the output folders (PATHS)."""
    if isinstance(obj, dict):
        return {
            k: _strip(v)
            for k, v in obj.items()
            if k not in TIMING | PATHS and not k.endswith(("_s", "_seconds", "_minutes"))
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _save(run_dir: Path, dest: Path, result) -> None:
    from equiforce.potentials.model_io import load_model, read_header

    dest.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in ("model.eqf", "best.eqf"):
        _, params, _ = load_model(run_dir / name)
        arrays.update({f"{name}:{k}": v for k, v in _flat(params).items()})
    arrays.update({f"result:{k}": v for k, v in _flat(result.params).items()})
    np.savez(dest / "params.npz", **arrays)
    meta = read_header(run_dir / "model.eqf").get("metadata", {})
    meta.pop("lineage", None)  # the source's path differs between trees (its sha256 is compared via weights)
    meta.pop("config", None)  # output_dir differs
    doc = {
        "history": _strip(result.history),
        "stopped_because": result.stopped_because,
        "metrics_jsonl": _strip([json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]),
        "final_metrics": _strip(json.loads((run_dir / "final_metrics.json").read_text())),
        "metadata": _strip(meta),
        "potential": read_header(run_dir / "model.eqf")["potential"],
    }
    (dest / "outputs.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))


def _interrupting_step(before: int):
    from equiforce.training import trainer

    real = trainer.make_train_step
    calls = [0]

    def make(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, batch, weights=None):
            if calls[0] == before:
                raise KeyboardInterrupt
            calls[0] += 1
            return fn(state, batch, weights)

        return step

    return trainer, real, make


def run(out: Path, foreign: Path | None) -> None:
    import equiforce
    from equiforce.training import load_config, train

    print(f"equiforce from {Path(equiforce.__file__).parent}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    quiet = lambda _line: None  # noqa: E731
    t0 = time.perf_counter()

    if not (out / "plain" / "outputs.json").is_file():  # (kept from an earlier, failed invocation)
        plain = _base(work / "plain", "md_check.steps=60", "md_check.report_interval=20", "model.uncertainty=true")
        result = train(load_config(None, plain), log=quiet)
        _save(work / "plain", out / "plain", result)
        print(f"plain: {time.perf_counter() - t0:.0f} s", flush=True)

    ft = [
        f"model.init_from={work / 'plain' / 'model.eqf'}",
        "optim.max_epochs=2",
        "finetune.freeze=[embedding]",
        "finetune.frozen_learning_rate=0.0001",
        "md_check.steps=0",
        "model.uncertainty=false",
    ]
    result = train(load_config(None, _base(work / "finetune", *ft)), log=quiet)
    _save(work / "finetune", out / "finetune", result)
    print(f"finetune: {time.perf_counter() - t0:.0f} s", flush=True)

    resumed = _base(work / "resumed", "md_check.steps=0", "model.uncertainty=false")
    trainer, real, make = _interrupting_step(7)
    trainer.make_train_step = make
    try:
        train(load_config(None, resumed), log=quiet)
        raise SystemExit("the interruption did not happen")
    except KeyboardInterrupt:
        pass
    finally:
        trainer.make_train_step = real
    shutil.copytree(work / "resumed", out / "resumed" / "interrupted")
    result = train(load_config(None, resumed), resume=True, log=quiet)
    _save(work / "resumed", out / "resumed", result)
    print(f"resumed: {time.perf_counter() - t0:.0f} s", flush=True)

    if foreign is not None:  # another tree's interrupted run, resumed by this one
        run_dir = work / "resumed_foreign"
        shutil.copytree(foreign / "resumed" / "interrupted", run_dir)
        result = train(
            load_config(None, _base(run_dir, "md_check.steps=0", "model.uncertainty=false")), resume=True, log=quiet
        )
        _save(run_dir, out / "resumed_foreign", result)
        print(f"resumed_foreign: {time.perf_counter() - t0:.0f} s", flush=True)


def compare(a: Path, b: Path) -> int:
    bad = 0
    pairs = [(s, s) for s in ("plain", "finetune", "resumed")]
    if (b / "resumed_foreign").is_dir():
        pairs.append(("resumed", "resumed_foreign"))
    for sa, sb in pairs:
        pa, pb = np.load(a / sa / "params.npz"), np.load(b / sb / "params.npz")
        if set(pa) != set(pb):
            print(f"{sa} vs {sb}: different parameter trees")
            bad += 1
            continue
        for prefix in ("model.eqf", "best.eqf", "result"):
            keys = [k for k in pa if k.startswith(prefix + ":")]
            diff = max(float(np.max(np.abs(pa[k] - pb[k]), initial=0.0)) for k in keys)
            print(f"{sa:>8} vs {sb:<15} {prefix:>9}: {len(keys)} arrays, max |Δ| = {diff:.3g}")
            bad += diff != 0.0
        oa = _strip(json.loads((a / sa / "outputs.json").read_text()))
        ob = _strip(json.loads((b / sb / "outputs.json").read_text()))
        for key in oa:
            same = oa[key] == ob.get(key)
            where = ""
            if not same and isinstance(oa[key], dict) and isinstance(ob.get(key), dict):
                where = " in " + ", ".join(
                    k for k in oa[key].keys() | ob[key].keys() if oa[key].get(k) != ob[key].get(k)
                )
            print(f"{sa:>8} vs {sb:<15} {key}: {'equal' if same else 'DIFFERENT'}{where}")
            bad += not same
    for d in (a, b):  # exact resume within one tree: the loop of `plain` is the uninterrupted one of `resumed`
        pp, pr = np.load(d / "plain" / "params.npz"), np.load(d / "resumed" / "params.npz")
        keys = [k for k in pp if k.startswith("best.eqf:")]
        diff = max(float(np.max(np.abs(pp[k] - pr[k]), initial=0.0)) for k in keys)
        hp = _strip(json.loads((d / "plain" / "outputs.json").read_text()))["history"]
        hr = _strip(json.loads((d / "resumed" / "outputs.json").read_text()))["history"]
        same = "equal" if hp == hr else "DIFFERENT"
        print(f"{d}: uninterrupted vs resumed best.eqf max |Δ| = {diff:.3g}, history {same}")
        bad += diff != 0.0 or hp != hr
    print("IDENTICAL" if bad == 0 else f"{bad} DIFFERENCES")
    return int(bad != 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--foreign-checkpoint", type=Path, default=None)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.out, args.foreign_checkpoint)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
