"""Fine-tune a trained model on a few frames of a new molecule (same elements), with freezing and replay.

    python -m equiforce train examples/aspirin_cpu.yaml   # once: the source model (aspirin)
    python examples/finetune.py                           # fine-tune it on 50 salicylic-acid frames (~5 min)
    python examples/finetune.py --model my.eqf --data my_frames.extxyz --test my_test.extxyz
    python examples/finetune.py --tiny                    # seconds: a toy source model, just to see the flow

``model.init_from`` starts training from a model file: its architecture, cutoff and committee size are taken
over, its weights are the starting point, and the E0s are re-fitted on the new data against the source
network's predictions. Options used here:

* ``finetune.freeze``: regular expressions on parameter paths (``params/<layer>/...``); those parameters
  train at ``finetune.frozen_learning_rate`` (0: not at all) after ``finetune.frozen_warmup_epochs``. Here
  the first interaction layer is frozen and the rest adapts.
* ``finetune.replay_data`` / ``finetune.replay_fraction``: structures of the source's training data mixed
  into every epoch (here: as many aspirin frames as new frames), so the model does not forget aspirin.

The new model file records its lineage (source path, sha256, what it was trained on). The script prints the
test force error on the new molecule before and after, and on aspirin after (the forgetting check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "runs" / "aspirin_cpu" / "model.eqf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune an equiforce model on new data.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="source model file (.eqf)")
    p.add_argument("--data", default="sample:salicylic:train", help="new training data (a file, or a sample)")
    p.add_argument("--test", default="sample:salicylic:test", help="new test data")
    p.add_argument("--frames", type=int, default=50, help="training frames of --data")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget")
    p.add_argument("--freeze", default="params/interaction_0/", help="regex of the parameters to freeze ('' none)")
    p.add_argument("--replay", default="sample:train", help="the source's training data for replay ('' none)")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "finetune", help="output folder")
    p.add_argument("--tiny", action="store_true", help="a toy source model and 2 epochs, in seconds")
    return p.parse_args(argv)


def _force_mae(model, data: str, n: int) -> float:
    import numpy as np

    from equiforce.data import load_sample
    from equiforce.data.readers import read_structures
    from equiforce.potentials import load_model
    from equiforce.training.evaluate import compute_metrics, predict

    s = load_sample(data.split(":", 1)[1]) if data.startswith("sample:") else read_structures(data)
    s = s.subset(np.arange(min(n, len(s))))
    potential, params, _ = load_model(model)
    return compute_metrics(predict(potential, params, s))["forces_mae_meV_per_A"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from equiforce.training import load_config, train

    source = args.model
    if args.tiny:  # a toy "aspirin model" to start from
        toy = [
            f"output_dir={args.out / 'source'}",
            "model.name=nequip",
            "model.hyperparameters={num_interactions: 2, l_max: 1, num_features: 4, num_bessel: 4}",
            "data.train_size=20",
            "data.test_size=10",
            "optim.max_epochs=2",
            "model.uncertainty=false",
            "md_check.steps=0",
            "progress_bar=false",
        ]
        source = train(load_config(None, toy)).model_path
    elif not source.is_file():
        print(
            f"no model file at {source}; train one first (`python -m equiforce train examples/aspirin_cpu.yaml`)"
            " or pass --model PATH",
            file=sys.stderr,
        )
        return 2
    n_test = 20 if args.tiny else 200
    before = _force_mae(source, args.test, n_test)

    overrides = [
        f"model.init_from={Path(source).resolve()}",  # architecture, cutoff and weights come from here
        f"data.train={args.data}",
        f"data.test={args.test}",
        f"data.train_size={10 if args.tiny else args.frames}",
        f"data.test_size={n_test}",
        "data.valid_fraction=0.1",
        f"output_dir={args.out / 'finetuned'}",
        "optim.learning_rate=0.002",  # lower than from scratch: start from good weights
        "model.uncertainty=false",
        "md_check.steps=0",
        "progress_bar=false",
    ]
    if args.freeze:
        overrides += [f"finetune.freeze=[{args.freeze}]", "finetune.frozen_learning_rate=0.0"]
    if args.replay:
        overrides += [f"finetune.replay_data={args.replay}", "finetune.replay_fraction=1.0"]
    overrides += ["optim.max_epochs=2"] if args.tiny else [f"optim.time_budget_minutes={args.minutes}"]
    result = train(load_config(None, overrides))

    after = _force_mae(result.model_path, args.test, n_test)
    print(f"test force MAE on {args.test}: {before:.1f} meV/Å before fine-tuning, {after:.1f} after")
    if args.replay:
        print(
            f"and on {args.replay} (the source's data): {_force_mae(result.model_path, args.replay, n_test):.1f} meV/Å"
        )
    print(f"fine-tuned model: {result.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
