"""Active learning on rMD17 aspirin: grow the training set by uncertainty against growing it at random.

Start from ``--start`` labelled frames of the shipped aspirin training sample (the 1,000 training frames of
rMD17 split 1); the rest of the file is the pool, its labels hidden (they are only looked up for the frames a
strategy picks, as a DFT code would compute them). Each round trains a model from scratch on the labelled
frames, measures its force MAE on the test sample, then adds ``--add`` frames:

* ``uncertainty``: :func:`equiforce.uncertainty.select.select_structures` (most uncertain, spread out by
  farthest-point sampling; what ``equiforce select`` does);
* ``random``: a seeded random draw from the pool.

Both strategies start from the same model (round 0). Prints a Markdown table of the test force MAE per round
and writes ``results.json``::

    python examples/active_learning.py --out runs/active_learning            # 4 rounds of +25, committee of 3
    python examples/active_learning.py --tiny --out /tmp/al                    # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.io
import numpy as np

from equiforce.data.readers import load_sample
from equiforce.data.structures import StructureSet
from equiforce.training.config import load_config
from equiforce.training.evaluate import evaluate
from equiforce.training.trainer import train
from equiforce.uncertainty.select import select_structures


def _write(path: Path, s: StructureSet) -> None:
    ase.io.write(path, [s.to_atoms(k) for k in range(len(s))], format="extxyz")


def _train(out: Path, labelled: StructureSet, valid: StructureSet, args: argparse.Namespace):
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.extxyz", labelled)
    _write(out / "valid.extxyz", valid)
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            f"data.train={out / 'train.extxyz'}",
            f"data.valid={out / 'valid.extxyz'}",
            "data.test=null",
            f"model.name={args.model}",
            f"model.hyperparameters={args.hp}",
            f"model.ensemble_size={args.members}",
            f"optim.max_epochs={args.epochs}",
            "optim.schedule=cosine",
            f"optim.learning_rate={args.lr}",
            "optim.batch_size=5",
            "md_check.steps=0",
            f"seed={args.seed}",
        ],
    )
    return train(cfg, log=lambda _: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/active_learning"))
    ap.add_argument("--start", type=int, default=50)
    ap.add_argument("--add", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--valid", type=int, default=25, help="validation frames (fixed, from the pool's file)")
    ap.add_argument("--test", type=int, default=300, help="test frames of the test sample")
    ap.add_argument("--model", default="mace")
    ap.add_argument("--hp", default="{num_interactions: 2, num_features: 16, l_max: 2, correlation: 2}")
    ap.add_argument("--members", type=int, default=3, help="committee size (1: single network with LLPR)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="toy sizes for a test run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.start, args.add, args.rounds, args.valid, args.test, args.epochs = 10, 5, 1, 5, 10, 2
        args.model, args.hp, args.members = "nequip", "{num_interactions: 1, num_features: 4, l_max: 1}", 2

    full, test = load_sample("train"), load_sample("test")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(full))
    valid = full.subset(order[: args.valid])
    start = order[args.valid : args.valid + args.start]
    pool0 = order[args.valid + args.start :]
    test = test.subset(rng.permutation(len(test))[: args.test])

    results: dict[str, list[dict]] = {"uncertainty": [], "random": []}
    first = _train(args.out / "round0", full.subset(start), valid, args)
    mae0 = evaluate(first.potential, first.params, test)["forces_mae_meV_per_A"]
    for strategy in results:
        labelled, pool, model = list(start), list(pool0), first
        results[strategy].append({"round": 0, "n_train": len(labelled), "forces_mae_meV_per_A": mae0})
        draw = np.random.default_rng(args.seed + 1)
        for r in range(1, args.rounds + 1):
            if strategy == "uncertainty":
                picked, _ = select_structures(model.potential, model.params, full.subset(pool), args.add)
                new = [pool[k] for k in picked]
            else:
                new = [pool[k] for k in draw.choice(len(pool), args.add, replace=False)]
            labelled += new
            pool = [k for k in pool if k not in set(new)]
            model = _train(args.out / f"{strategy}{r}", full.subset(labelled), valid, args)
            mae = evaluate(model.potential, model.params, test)["forces_mae_meV_per_A"]
            results[strategy].append({"round": r, "n_train": len(labelled), "forces_mae_meV_per_A": mae})
            print(f"{strategy} round {r}: {len(labelled)} frames, test force MAE {mae:.1f} meV/Å", flush=True)

    lines = ["| round | training frames | force MAE, by uncertainty (meV/Å) | force MAE, random (meV/Å) |"]
    lines.append("|---|---|---|---|")
    for a, b in zip(results["uncertainty"], results["random"], strict=True):
        lines.append(
            f"| {a['round']} | {a['n_train']} | {a['forces_mae_meV_per_A']:.1f} | {b['forces_mae_meV_per_A']:.1f} |"
        )
    print("\n".join(lines))
    (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
