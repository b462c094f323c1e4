"""Uncertainty: train a committee, judge its σ on test data, watch σ during MD, pick frames to label.

    python examples/uncertainty_md.py            # a committee of 3 small NequIPs on 200 aspirin frames, ~10 min
    python examples/uncertainty_md.py --tiny     # seconds: toy models, just to see the flow

1. ``model.ensemble_size: 3`` trains three networks with independent initialisations in one program; after
   training their spread is calibrated on the validation set and stored in the model file
   (``model.ensemble_size: 1`` gives a single network with the cheaper LLPR uncertainty instead).
2. :func:`~equiforce.uncertainty.predict_uncertainties` and
   :func:`~equiforce.uncertainty.metrics.uncertainty_report` judge σ on the test set: coverage of the 68 % /
   95 % intervals and how well σ ranks the errors (Spearman ρ), as ``equiforce evaluate --uncertainty`` does.
3. ``run_md(..., uncertainty_threshold=σ)`` computes σ_E and the largest σ_F at every step from the step's own
   force call, writes them to the thermo log, and records the configurations whose σ_F crosses the threshold
   (``uncertainty_action="stop"`` ends the run instead). Here the MD runs hot (800 K) to leave the training data.
4. :func:`~equiforce.uncertainty.select.select_structures` picks the most uncertain, mutually different frames
   of the trajectory for DFT labelling (``equiforce select``).

Outputs in ``--out``: the training run (``train/model.eqf``), ``hot.h5``, ``hot.csv``,
``hot_uncertain.extxyz`` (the recorded configurations) and ``to_label.extxyz``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Committee uncertainty: train, evaluate, MD with σ, select frames.")
    p.add_argument("--members", type=int, default=3, help="committee size K")
    p.add_argument("--frames", type=int, default=200, help="training frames of the shipped aspirin data")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget")
    p.add_argument("--temperature", type=float, default=800.0, help="MD temperature, K")
    p.add_argument("--steps", type=int, default=4000, help="MD steps of 0.5 fs")
    p.add_argument("--threshold", type=float, default=None, help="σ_F threshold, eV/Å (default: 2x the test mean)")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "uncertainty_md", help="output folder")
    p.add_argument("--tiny", action="store_true", help="toy models and 100 MD steps at 300 K, in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from equiforce.data import load_sample
    from equiforce.md import load_structure, run_md
    from equiforce.potentials import load_model
    from equiforce.training import load_config, train
    from equiforce.uncertainty import predict_uncertainties
    from equiforce.uncertainty.metrics import uncertainty_report
    from equiforce.uncertainty.select import read_pool, select_structures, write_selection

    frames = 20 if args.tiny else args.frames
    overrides = [
        f"output_dir={args.out / 'train'}",
        f"model.ensemble_size={args.members}",  # a committee; 1 = a single network with LLPR
        f"data.train_size={frames}",
        "data.test_size=50",
        "model.name=nequip",
        "md_check.steps=0",
        "progress_bar=false",
    ]
    if args.tiny:
        overrides += [
            "model.hyperparameters={num_interactions: 1, l_max: 1, num_features: 4, num_bessel: 4}",
            "optim.max_epochs=2",
        ]
    else:
        overrides += [
            "model.hyperparameters={num_interactions: 2, l_max: 1, num_features: 16}",
            f"optim.time_budget_minutes={args.minutes}",
            "optim.max_epochs=500",
        ]
    result = train(load_config(None, overrides))
    potential, params, _ = load_model(result.model_path)

    # 2. how good is σ on test data?
    test = load_sample("test").subset(np.arange(50))
    pred = predict_uncertainties(potential, params, test)
    report = uncertainty_report(pred)
    f = report["forces"]
    print(
        f"test forces: RMSE {f['rmse']:.3f} eV/Å, mean σ_F {f['mean_sigma']:.3f} eV/Å, coverage 68 % / 95 %: "
        f"{f['coverage_68']:.2f} / {f['coverage_95']:.2f}, Spearman ρ(σ, |error|) {f['spearman']:.2f}"
    )

    # 3. σ during hot MD
    threshold = args.threshold or 2.0 * f["mean_sigma"]
    md = run_md(
        result.model_path,
        load_structure("sample:test:0"),
        ensemble="nvt_langevin",
        temperature_K=300.0 if args.tiny else args.temperature,  # a toy model would not survive 800 K
        timestep_fs=0.5,
        steps=100 if args.tiny else args.steps,
        report_interval=20,
        trajectory=args.out / "hot.h5",
        thermo=args.out / "hot.csv",
        uncertainty_threshold=threshold,  # eV/Å
        uncertainty_action="record",  # or "stop"
        progress=False,
    )
    sigma = [fr.max_forces_uncertainty for fr in md.frames]
    print(
        f"MD: largest σ_F per frame from {sigma[0]:.3f} to {max(sigma):.3f} eV/Å; "
        f"{len(md.uncertainty_events)} configurations above {threshold:.3f} eV/Å recorded"
    )
    for event in md.uncertainty_events[:5]:
        print(f"  step {event['step']}: atom {event['atom']}, σ_F {event['max_forces_uncertainty']:.3f} eV/Å")

    # 4. what to label next: the most uncertain, mutually different frames of the trajectory
    pool = read_pool(args.out / "hot.h5")  # the H5MD trajectory's frames (or any structure file)
    picked, pool_sigma = select_structures(potential, params, pool, min(5, len(pool)))
    write_selection(args.out / "to_label.extxyz", pool, picked, pool_sigma)  # extxyz for the DFT code
    print(f"picked frames {picked.tolist()} (mean σ_F {pool_sigma[picked].round(3).tolist()} eV/Å) -> to_label.extxyz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
