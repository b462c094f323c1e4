"""σ under a temperature shift (issue 29 §4): coverage and ranking of LLPR and a committee, before and after
recalibration on a few shifted frames.

Data: ``benchmarks/data/al_ethanol`` (GFN2-xTB ethanol MD at 300, 600 and 1000 K, ``benchmarks/al_shift_data.py``).

* Models: a single network (LLPR σ) and a K-member committee (``--members``), the same architecture and
  epochs, trained with ``equiforce.training.train`` on ``--n-train`` frames of the 300 K start pool and
  calibrated by training on ``--n-valid`` other 300 K frames (LLPR: ``fit_llpr``; committee: one scale).
* Calibrations of each model's raw σ_F (``σ_F,i = a · σ_raw,i^b · σ̄_raw,s^q``, σ̄ the structure's mean raw
  σ_F; ``equiforce.uncertainty.calibration``), fitted on ``@300K``: the 300 K validation frames alone, or
  ``@300K+shift``: those plus the first ``--n-recal`` frames of each expert pool at 600 and 1000 K ("a few
  freshly labelled shifted frames", what the active-learning loop calls ``recalibrate`` with):
  ``scale`` (b = 1, q = 0; ``scale @300K`` is the model as trained), ``power law`` (b fitted, q = 0) and
  ``power law + structure`` (b and q fitted; ``@300K+shift`` is computed by ``recalibrate`` itself, the
  others by the same fits on the same raw σ).
* Test sets: the 100-frame test sets at 300, 600, 1000 K (disjoint from every frame used above). Reported:
  coverage of the 95 % interval (force components inside ±1.96 σ_F of their atom), per-structure Spearman
  ρ(mean σ_F, force RMSE) within each temperature and pooled over all three, force RMSE, mean σ_F.

    python benchmarks/sigma_shift.py --out runs/sigma_shift --json runs/sigma_shift/sigma_shift.json

``--reuse`` loads the models of an earlier run in ``--out`` and only recomputes the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "al_ethanol"
TEMPS = (300, 600, 1000)


def _read(path: Path):
    from equiforce.data.readers import read_structures

    if not path.exists():
        raise SystemExit(f"error: {path} is missing: run `OMP_NUM_THREADS=1 python benchmarks/al_shift_data.py`")
    return read_structures(path)


def _write(path: Path, s) -> None:
    import ase.io

    ase.io.write(path, [s.to_atoms(k) for k in range(len(s))], format="extxyz")


def _train(out: Path, args: argparse.Namespace, members: int):
    from equiforce.training.config import load_config
    from equiforce.training.trainer import train

    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            f"data.train={out.parent / 'train.extxyz'}",
            f"data.valid={out.parent / 'valid.extxyz'}",
            "data.test=null",
            f"model.name={args.model}",
            f"model.hyperparameters={args.hp}",
            f"model.ensemble_size={members}",
            f"optim.max_epochs={args.epochs}",
            "optim.batch_size=8",
            f"optim.learning_rate={args.lr}",
            "optim.schedule=cosine",
            "optim.early_stopping_patience=null",
            "md_check.steps=0",
            f"seed={args.seed}",
        ],
    )
    t0 = time.perf_counter()
    result = train(cfg, log=lambda s: None)
    return (result.potential, result.params), time.perf_counter() - t0


def _raw_predictions(potential, params, sets: dict):
    """Raw σ (scale 1, exponent 1) and errors of every set, from one prediction over all sets together."""
    import dataclasses

    from equiforce.data.structures import StructureSet
    from equiforce.uncertainty.calibration import predict_uncertainties

    raw_cfg = dataclasses.replace(
        potential.uncertainty_config, energy_scale=1.0, forces_scale=1.0, energy_exponent=1.0, forces_exponent=1.0
    )
    names = list(sets)
    allset = StructureSet.concatenate([sets[n] for n in names])
    pred = predict_uncertainties(potential.replace(uncertainty=raw_cfg), params, allset)
    out, s0, a0 = {}, 0, 0
    for n in names:
        s = sets[n]
        na = s.n_total_atoms
        out[n] = {
            "err": pred.forces[a0 : a0 + na] - s.forces,  # [atoms, 3] eV/Å
            "raw": pred.forces_uncertainty[a0 : a0 + na],  # [atoms]
            "n_atoms": s.n_atoms,
        }
        s0, a0 = s0 + len(s), a0 + na
    return out


def _metrics(p: dict, a: float, b: float, q: float) -> dict:
    from scipy import stats

    from equiforce.uncertainty.calibration import structure_mean_sigma
    from equiforce.uncertainty.metrics import per_structure_mean

    sigma = a * p["raw"] ** b * structure_mean_sigma(p["raw"], p["n_atoms"]) ** q
    err = np.abs(p["err"])
    rmse = np.sqrt(per_structure_mean(np.mean(p["err"] ** 2, axis=1), p["n_atoms"]))
    mean_sigma = per_structure_mean(sigma, p["n_atoms"])
    return {
        "coverage_95": float(np.mean(err <= stats.norm.ppf(0.975) * sigma[:, None])),
        "coverage_68": float(np.mean(err <= sigma[:, None])),
        "rho_structure": float(stats.spearmanr(mean_sigma, rmse).statistic),
        "force_rmse": float(np.sqrt(np.mean(p["err"] ** 2))),
        "mean_sigma_F": float(np.mean(sigma)),
        "_rmse": rmse,
        "_mean_sigma": mean_sigma,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/sigma_shift"))
    ap.add_argument("--model", default="mace")
    ap.add_argument("--hp", default='{"num_interactions": 2, "num_features": 16, "l_max": 2, "correlation": 2}')
    ap.add_argument("--members", type=int, default=4, help="committee size; 0 or 1: the single network only")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--n-valid", type=int, default=20)
    ap.add_argument("--n-recal", type=int, default=10, help="shifted frames per target temperature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="load the models of an earlier run in --out")
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    from scipy import stats

    from equiforce.data.structures import StructureSet
    from equiforce.uncertainty.calibration import fit_power_law, fit_scale, fit_structure_power_law, recalibrate

    start = _read(args.data / "start_300K.xyz")
    if args.n_train + args.n_valid > len(start):
        raise SystemExit(f"error: --n-train + --n-valid exceeds the {len(start)} frames of the start pool")
    perm = np.random.default_rng(args.seed).permutation(len(start))
    train, valid = start.subset(perm[: args.n_train]), start.subset(perm[args.n_train : args.n_train + args.n_valid])
    tests = {t: _read(args.data / f"test_{t}K.xyz") for t in TEMPS}
    shifted = [_read(args.data / f"expert_{t}K.xyz").subset(np.arange(args.n_recal)) for t in TEMPS[1:]]
    recal = StructureSet.concatenate([valid, *shifted])
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "train.extxyz", train)
    _write(args.out / "valid.extxyz", valid)

    names = {"LLPR (single)": args.out / "single"}
    if args.members > 1:
        names[f"committee K={args.members}"] = args.out / f"committee{args.members}"
    models, times = {}, {}
    for name, folder in names.items():
        if args.reuse:
            from equiforce.potentials import load_model

            models[name] = load_model(folder / "model.eqf")[:2]
            times[name] = float("nan")
        else:
            members = 1 if name.startswith("LLPR") else args.members
            models[name], times[name] = _train(folder, args, members)
        print(f"{name}: trained in {times[name]:.0f} s", flush=True)

    rows, record = [], {"args": {k: str(v) for k, v in vars(args).items()}, "train_s": times, "results": {}}
    for name, (pot, params) in models.items():
        sets = {"valid": valid, "recal": recal, **{f"{t} K": tests[t] for t in TEMPS}}
        p = _raw_predictions(pot, params, sets)
        cfg = pot.uncertainty_config
        ev, sv = p["valid"]["err"], p["valid"]["raw"]
        er, sr = p["recal"]["err"], p["recal"]["raw"]
        t0 = time.perf_counter()
        rpot, _, rrec = recalibrate(pot, params, recal)
        t_recal = time.perf_counter() - t0
        rc = rpot.uncertainty_config

        def rep(x: np.ndarray) -> np.ndarray:
            return np.repeat(x[:, None], 3, axis=1)

        calibrations = {
            "scale @300K": (cfg.forces_scale, cfg.forces_exponent, cfg.forces_structure_exponent),
            "scale @300K+shift": (fit_scale(er, rep(sr)), 1.0, 0.0),
            "power law @300K+shift": (*fit_power_law(er, rep(sr)), 0.0),
            "power law + structure @300K": fit_structure_power_law(ev, sv, p["valid"]["n_atoms"]),
            "power law + structure @300K+shift": (rc.forces_scale, rc.forces_exponent, rc.forces_structure_exponent),
        }
        host = fit_structure_power_law(er, sr, p["recal"]["n_atoms"])  # same fit, same raw σ: must agree
        assert np.allclose(host, calibrations["power law + structure @300K+shift"], rtol=1e-4), (host, rc)
        record["results"][name] = {"recalibrate": rrec, "recalibrate_s": t_recal}
        for cal, (a, b, q) in calibrations.items():
            m = {f"{t} K": _metrics(p[f"{t} K"], a, b, q) for t in TEMPS}
            pooled = stats.spearmanr(
                np.concatenate([m[k]["_mean_sigma"] for k in m]), np.concatenate([m[k]["_rmse"] for k in m])
            ).statistic
            record["results"][name][cal] = {
                "a": a,
                "b": b,
                "q": q,
                "rho_pooled": float(pooled),
                **{k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in m.items()},
            }
            cells = " | ".join(f"{m[f'{t} K']['coverage_95']:.3f} / {m[f'{t} K']['rho_structure']:.2f}" for t in TEMPS)
            rows.append(f"| {name} | {cal} | {a:.3g} | {b:.2f} | {q:.2f} | {cells} | {pooled:.2f} |")
        errs = " | ".join(
            f"{1e3 * record['results'][name]['scale @300K'][f'{t} K']['force_rmse']:.0f} / "
            f"{1e3 * record['results'][name]['scale @300K'][f'{t} K']['mean_sigma_F']:.0f}"
            for t in TEMPS
        )
        rows.append(f"| {name} | F RMSE / mean σ_F (meV/Å), scale @300K | | | | {errs} | |")
    head = (
        "| model | calibration | a | b | q | 300 K cover95 / ρ | 600 K cover95 / ρ | 1000 K cover95 / ρ | ρ pooled |\n"
        + "|---" * 9
        + "|"
    )
    print(head + "\n" + "\n".join(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
