"""Fine-tuning vs training from scratch on a new molecule (issue 16, section 4).

A small MACE pre-trained on rMD17 aspirin is fine-tuned on 50 frames of salicylic acid (same elements) and
compared with the same network trained from scratch on the same 50 frames with the same budget; both are
tested on 200 salicylic-acid test frames. Uses only the shipped samples.

    python benchmarks/finetune.py --out /tmp/bench/finetune
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from equiforce.benchmark.finetune import compare_finetune_with_scratch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--pretrain-frames", type=int, default=500)
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = compare_finetune_with_scratch(
        args.out,
        pretrain_frames=args.pretrain_frames,
        pretrain_epochs=args.pretrain_epochs,
        frames=args.frames,
        epochs=args.epochs,
        seed=args.seed,
        log=print,
    )
    print(result.table(args.frames))
    if args.json:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, **asdict(result)}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
