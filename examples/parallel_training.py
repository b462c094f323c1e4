"""Data-parallel training over the devices of one machine (``parallel.devices``).

    python examples/parallel_training.py                                 # every GPU of this machine
    python examples/parallel_training.py --simulate-cpu-devices 4 --tiny # 4 simulated CPU devices, seconds

Each global batch of ``optim.batch_size`` structures is split over the devices; every device computes its
part's loss terms and gradients, and the sums are combined across devices (``jax.shard_map`` over a device
mesh), so the loss and gradient are exactly those of the whole batch on one device: the learning curve does
not depend on the number of devices, and a checkpoint written on 4 devices resumes on 1. Parameters,
optimiser and EMA state are replicated; each device's part is padded to the same size, so the step compiles
once. The start of the run logs the global and the per-device batch.

In a config file: ``parallel: {devices: all}`` (the default on GPU machines; on CPU the default is one
device) or a count. Simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set
before JAX starts) share the same cores: they test the code path, they do not make a CPU faster.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Data-parallel training over the devices of one machine.")
    p.add_argument("--devices", default="all", help="'all' or a device count")
    p.add_argument("--simulate-cpu-devices", type=int, help="run on N simulated CPU devices (testing)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch: structures per step over all devices")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument("--out", type=Path, default=HERE / "runs" / "parallel_training", help="output folder")
    p.add_argument("--tiny", action="store_true", help="a toy model, 2 epochs on 20 frames, in seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.simulate_cpu_devices:  # must happen before JAX initialises its backends
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.simulate_cpu_devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from equiforce.training import load_config, train

    print(f"{len(jax.devices())} {jax.devices()[0].platform} device(s) available")
    overrides = [
        f"output_dir={args.out}",
        f"parallel.devices={args.devices}",
        f"optim.batch_size={args.batch_size}",
        "model.name=mace",
        "progress_bar=false",
    ]
    if args.tiny:
        overrides += [
            "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1, hidden_l_max: 0, correlation: 2}",
            "data.train_size=20",
            "data.test_size=10",
            "optim.max_epochs=2",
            "model.uncertainty=false",
            "md_check.steps=0",
        ]
    else:
        overrides += [f"optim.time_budget_minutes={args.minutes}", "optim.max_epochs=1000"]
    result = train(load_config(None, overrides), log=print)
    print(f"model: {result.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
