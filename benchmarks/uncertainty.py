"""Uncertainty under a distribution shift on rMD17 aspirin: calibration tables and MD cost ratios.

Protocol (issue 13):

* data: ``rmd17_aspirin_train_01`` sorted by energy; the training (``--train``) and validation (``--valid``)
  frames are drawn from its lower ``--low-quantile`` of energies. Test sets: *in distribution* (frames of
  ``rmd17_aspirin_test_01`` below that energy), *high energy* (the test frames above the training set's
  ``--high-quantile`` energy), *other molecule* (salicylic acid, the same elements, ``rmd17_salicylic_test_01``)
  and *stretched* (in-distribution frames with one C-H bond stretched by ``--stretch`` Å; no DFT labels, so
  only σ is reported for them);
* models: a K-member committee (``--members``) and a single network with the LLPR uncertainty, the same
  architecture and epochs, trained with ``equiforce.training.train`` and calibrated on the validation set;
* tables: Gaussian NLL, miscalibration area, coverage of the 68 % / 95 % intervals, Spearman ρ(σ, |error|)
  for energies and forces, the per-structure Spearman ρ between the mean σ_F and the force RMSE, and the
  mean σ_F per set;
* MD cost: NVE steps/s of aspirin for the plain single network, the single network with σ at every step
  (LLPR), and the committee with σ at every step (one run, ratios within it).

    python benchmarks/uncertainty.py --shared ../shared --out runs/uncertainty --epochs 40

Needs ``../shared/data/rmd17`` (not shipped). Prints Markdown; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np


def _split(shared: Path, args: argparse.Namespace):
    from equiforce.data.readers import read_structures

    rmd = shared / "data" / "rmd17"
    full = read_structures(rmd / "rmd17_aspirin_train_01.npz")
    test = read_structures(rmd / "rmd17_aspirin_test_01.npz")
    other = read_structures(rmd / "rmd17_salicylic_test_01.npz")
    rng = np.random.default_rng(args.seed)
    cut = float(np.quantile(full.energy, args.low_quantile))
    high = float(np.quantile(full.energy, args.high_quantile))
    low = rng.permutation(np.flatnonzero(full.energy <= cut))
    train = full.subset(low[: args.train])
    valid = full.subset(low[args.train : args.train + args.valid])
    t_in = rng.permutation(np.flatnonzero(test.energy <= cut))[: args.n_test]
    t_high = np.flatnonzero(test.energy >= high)
    sets = {
        "in distribution": test.subset(t_in),
        "high energy": test.subset(t_high),
        "other molecule": other.subset(rng.permutation(len(other))[: args.n_test]),
    }
    return train, valid, sets, cut, high


def _write(path: Path, s) -> None:
    import ase.io

    ase.io.write(path, [s.to_atoms(k) for k in range(len(s))], format="extxyz")


def _train(out: Path, args: argparse.Namespace, members: int):
    from equiforce.training.config import load_config
    from equiforce.training.trainer import train

    hp = json.loads(args.hp)
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            f"data.train={out.parent / 'train.extxyz'}",
            f"data.valid={out.parent / 'valid.extxyz'}",
            "data.test=null",
            f"model.name={args.model}",
            f"model.hyperparameters={json.dumps(hp)}",
            f"model.ensemble_size={members}",
            f"optim.max_epochs={args.epochs}",
            "optim.batch_size=5",
            f"optim.learning_rate={args.lr}",
            "optim.schedule=cosine",
            "md_check.steps=0",
            f"seed={args.seed}",
        ],
    )
    t0 = time.perf_counter()
    result = train(cfg, log=lambda s: None)
    return result, time.perf_counter() - t0


def _tables(models: dict, sets: dict, stretch_set) -> tuple[str, dict]:
    from equiforce.uncertainty.calibration import predict_uncertainties
    from equiforce.uncertainty.metrics import forces_per_structure, uncertainty_report

    rows, record, per_structure = [], {}, {}
    for name, (pot, params) in models.items():
        for set_name, s in sets.items():
            pred = predict_uncertainties(pot, params, s)
            per_structure[(name, set_name)] = forces_per_structure(pred)
            rep = uncertainty_report(pred)
            rep["mean_sigma_F"] = float(np.mean(pred.forces_uncertainty))
            record[f"{name} / {set_name}"] = rep
            e, f = rep["energy"], rep["forces"]
            rows.append(
                f"| {name} | {set_name} | {1e3 * e['rmse']:.1f} | {e['nll']:.2f} | {e['miscalibration_area']:.3f} | "
                f"{e['coverage_68']:.2f} / {e['coverage_95']:.2f} | {e['spearman']:.2f} | {1e3 * f['rmse']:.1f} | "
                f"{f['nll']:.2f} | {f['miscalibration_area']:.3f} | {f['coverage_68']:.2f} / {f['coverage_95']:.2f} | "
                f"{f['spearman']:.2f} | {rep.get('forces_per_structure_spearman', float('nan')):.2f} | "
                f"{1e3 * rep['mean_sigma_F']:.1f} |"
            )
        pred = predict_uncertainties(pot, params, stretch_set)
        record[f"{name} / stretched"] = {"mean_sigma_F": float(np.mean(pred.forces_uncertainty))}
        sigma = 1e3 * np.mean(pred.forces_uncertainty)
        rows.append(f"| {name} | stretched C-H (no labels) |{' |' * 11} {sigma:.1f} |")
    head = (
        "| model | test set | E RMSE meV | E NLL | E miscal. area | E cover 68/95 | E ρ | F RMSE meV/Å | F NLL | "
        "F miscal. area | F cover 68/95 | F ρ | F ρ per structure | mean σ_F meV/Å |\n" + "|---" * 14 + "|"
    )
    return head + "\n" + "\n".join(rows) + "\n\n" + _pooled(per_structure, sets, record), record


def _pooled(per_structure: dict, sets: dict, record: dict) -> str:
    """Per-structure Spearman ρ(mean σ_F, force RMSE) on each labelled set and on the pooled shift test (the
    high-energy frames and the other molecule together), each model's and LLPR's fraction of the committee's."""
    from scipy import stats

    names = sorted({n for n, _ in per_structure})
    groups = {k: [k] for k in sets} | {"shift test (high energy + other molecule)": ["high energy", "other molecule"]}
    lines = ["| per-structure ρ(σ_F, force RMSE) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, members in groups.items():
        rhos = []
        for n in names:
            rmse = np.concatenate([per_structure[(n, m)][0] for m in members])
            sigma = np.concatenate([per_structure[(n, m)][1] for m in members])
            rhos.append(float(stats.spearmanr(sigma, rmse).statistic))
        record[f"per-structure rho / {label}"] = dict(zip(names, rhos, strict=True))
        lines.append(f"| {label} | " + " | ".join(f"{r:.2f}" for r in rhos) + " |")
    return "\n".join(lines)


def _md_cost(models: dict, steps: int) -> tuple[str, dict]:
    from equiforce.md import run_md

    rows, record = [], {}
    base = None
    for name, (pot, params) in models.items():
        r = run_md(
            (pot, params),
            "sample:test:0",
            ensemble="nve",
            timestep_fs=0.5,
            steps=steps,
            report_interval=100,
            progress=False,
            log=lambda s: None,
        )
        record[name] = r.steps_per_s
        base = base or r.steps_per_s
        rows.append(f"| {name} | {r.steps_per_s:.0f} | {base / r.steps_per_s:.2f}x |")
    return "| MD (aspirin, NVE, float32) | steps/s | cost vs plain |\n|---|---|---|\n" + "\n".join(rows), record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--out", type=Path, default=Path("runs/uncertainty"))
    ap.add_argument("--model", default="mace")
    ap.add_argument("--hp", default='{"num_interactions": 2, "num_features": 16, "l_max": 2, "correlation": 2}')
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--valid", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--low-quantile", type=float, default=0.8)
    ap.add_argument("--high-quantile", type=float, default=0.98)
    ap.add_argument("--stretch", type=float, default=0.3)
    ap.add_argument("--md-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="load the models of an earlier run in --out")
    ap.add_argument("--md-only", action="store_true", help="only the MD cost (with --reuse)")
    ap.add_argument("--no-md", action="store_true", help="only the calibration tables, no MD cost")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train, valid, sets, cut, high = _split(args.shared, args)
    _write(args.out / "train.extxyz", train)
    _write(args.out / "valid.extxyz", valid)
    from equiforce.benchmark.shift import stretched

    stretch_set = stretched(sets["in distribution"].subset(np.arange(50)), args.stretch, args.seed)
    print(
        f"train {len(train)} / valid {len(valid)} frames with E <= {cut:.3f} eV; high-energy test: "
        f"{len(sets['high energy'])} frames with E >= {high:.3f} eV"
    )
    if args.reuse:
        from equiforce.potentials import load_model

        single_model = load_model(args.out / "single" / "model.eqf")[:2]
        committee_model = load_model(args.out / f"committee{args.members}" / "model.eqf")[:2]
        t_single = t_committee = float("nan")
    else:
        single, t_single = _train(args.out / "single", args, 1)
        committee, t_committee = _train(args.out / f"committee{args.members}", args, args.members)
        print(f"training: single {t_single:.0f} s, committee of {args.members} {t_committee:.0f} s")
        single_model = (single.potential, single.params)
        committee_model = (committee.potential, committee.params)
    models = {"LLPR (single)": single_model, f"committee K={args.members}": committee_model}
    record = {}
    if not args.md_only:
        table, record = _tables(models, sets, stretch_set)
        print(table)
    md_record: dict = {}
    if args.no_md:
        _dump(args, t_single, t_committee, record, md_record)
        return
    plain = single_model[0].single()
    net = {k: v for k, v in single_model[1].items() if k != "llpr"}
    md_models = {
        "single, no σ": (plain, net),
        "single + LLPR σ every step": models["LLPR (single)"],
        f"committee K={args.members} + σ every step": models[f"committee K={args.members}"],
    }
    md_table, md_record = _md_cost(md_models, args.md_steps)
    print(md_table)
    _dump(args, t_single, t_committee, record, md_record)


def _dump(args: argparse.Namespace, t_single: float, t_committee: float, record: dict, md_record: dict) -> None:
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "train_s": {"single": t_single, "committee": t_committee},
                    "calibration": record,
                    "md_steps_per_s": md_record,
                    "jax": jax.__version__,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
