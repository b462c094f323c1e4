"""Training-step and energy+forces timings of a model on rMD17 aspirin (the shipped sample).

Protocol of ../shared/BENCHMARKS.md: one optimiser step on a batch of aspirin configurations, loss
MSE(E) + w·MSE(F) with forces by autograd; medians over timed repeats after warm-up; the first call
(compilation included) reported separately.

    python benchmarks/train_step.py --dtype float32 --batch-size 16 \
        --hp '{"num_interactions": 4, "l_max": 2, "num_features": 32}'
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nequip")
    ap.add_argument("--hp", default="{}", help="model hyperparameters as JSON")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--r-max", type=float, default=5.0)
    args = ap.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    from equiforce.data.graph import batch_iterator, estimate_budget
    from equiforce.data.neighbours import build_neighbour_graphs
    from equiforce.data.readers import load_sample
    from equiforce.training.config import load_config
    from equiforce.training.optim import make_optimizer
    from equiforce.training.trainer import TrainState, build_potential, make_train_step

    hp = json.loads(args.hp)
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            f"model.dtype={args.dtype}",
            f"model.r_max={args.r_max}",
            f"optim.batch_size={args.batch_size}",
            f"model.hyperparameters={json.dumps(hp)}",
        ],
    )
    s = load_sample("train").subset(np.arange(args.batch_size * 4))
    graphs = build_neighbour_graphs(s, args.r_max)
    pot, _ = build_potential(cfg, s, graphs)
    budget = estimate_budget(s.n_atoms, [g.n_edges for g in graphs], args.batch_size)
    batches = [
        jax.tree.map(jnp.asarray, b)
        for b in batch_iterator(s, graphs, args.batch_size, budget, dtype=np.dtype(args.dtype))
    ]
    opt = make_optimizer(cfg.optim, 10)
    params = pot.init(jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = TrainState(params, opt.init(params), jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32))
    step = make_train_step(pot, cfg, opt, False)
    t0 = time.perf_counter()
    state, loss = step(state, batches[0])
    jax.block_until_ready(loss)
    first = time.perf_counter() - t0
    times = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        state, loss = step(state, batches[i % len(batches)])
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)

    fwd = jax.jit(lambda p, g: pot(p, g).forces)
    jax.block_until_ready(fwd(state.params, batches[0].graph))
    ftimes = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state.params, batches[i % len(batches)].graph))
        ftimes.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "model": args.model,
                "hp": hp,
                "dtype": args.dtype,
                "batch_size": args.batch_size,
                "n_params": int(n_params),
                "first_step_s": round(first, 2),
                "train_step_s_median": round(float(np.median(times)), 4),
                "energy_forces_s_median": round(float(np.median(ftimes)), 4),
                "edges_per_batch": int(sum(g.n_edges for g in graphs[: args.batch_size])),
            }
        )
    )


if __name__ == "__main__":
    main()
