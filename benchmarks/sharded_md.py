"""Per-device memory of one system's force call sharded over D devices (equiforce.md.sharded), against atoms.

Protocol: periodic water boxes at 1 g/cm³ (:func:`md_throughput.water_box`, ``n_side³`` molecules), an untrained
MACE (default the protocol size of ../shared/BENCHMARKS.md: 2 interactions, 64x0e+64x1o, l_max 3, correlation 3;
``--hp`` to change), r_max 5 Å, skin 1 Å, float32, random parameters from ``PRNGKey(0)``. For each box the
force function the MD engine runs (``jit(value_and_grad(energy_fn))`` with the edges compacted into
``ceil(1.15 x pairs within r_max)`` slots, as :class:`equiforce.md.engine.MDEngine` does) is lowered and
compiled, and XLA's ``compiled.memory_analysis()`` gives the memory of one device's program: arguments
(positions, the neighbour list: replicated), outputs, and temporaries (the network's intermediates, kept for
the backward pass). Nothing is executed, so boxes far larger than this machine's memory can be measured.

Four layouts:

* ``1dev_blocked``: one device, edge blocks on (the CPU default, see
  :func:`equiforce.potentials.layers.resolve_edge_chunk`);
* ``1dev``: one device, no edge blocks (the GPU default);
* ``{D}dev``: edges and the network's per-atom work sharded over ``--devices`` D devices
  (``run_md(..., devices=D)``), no edge blocks (the GPU default);
* ``{D}dev_blocked``: sharded as ``{D}dev``, each device blocking its own edges (the CPU default).

The devices are simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=D``, set by this
script); XLA's SPMD partitioner compiles the same per-device program for them as for D GPUs, so the per-device
bytes are what one GPU would hold (up to backend-specific buffer assignment).

    python benchmarks/sharded_md.py --sizes 8 12 18 --devices 4 --out /tmp/sharded_md.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 18], help="water boxes of n_side³ molecules")
    p.add_argument("--devices", type=int, default=4, help="devices the edges are sharded over (simulated on CPU)")
    p.add_argument("--hp", default="{}", help="JSON overrides of the MACE hyperparameters")
    p.add_argument("--r-max", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    return p.parse_args()


def measure(system: Any, positions: Any, capacity_multiplier: float = 1.15) -> dict[str, Any]:
    """Compile the force call of ``system`` at ``positions`` and return its per-device memory (MB)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    neighbor = system.neighbor_fn.allocate(positions)
    pairs = int(system.edge_count(positions, neighbor))
    capacity = max(int(np.ceil(pairs * capacity_multiplier)), pairs + 8)
    force_call = jax.jit(jax.value_and_grad(partial(system.energy_fn, edge_capacity=capacity)))
    t0 = time.perf_counter()
    compiled = force_call.lower(jnp.asarray(positions), neighbor).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mb = 1e-6
    args, out, temp = m.argument_size_in_bytes * mb, m.output_size_in_bytes * mb, m.temp_size_in_bytes * mb
    return {
        "pairs": pairs,
        "neighbour_capacity": int(neighbor.idx.shape[-1]),
        "argument_MB": round(args, 2),
        "output_MB": round(out, 2),
        "temp_MB": round(temp, 2),
        "total_MB": round(args + out + temp, 2),
        "compile_s": round(compile_s, 1),
    }


def main() -> None:
    args = _parse()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from md_throughput import PROTOCOL_HP, water_box

    from equiforce.md.sharded import make_sharded_system
    from equiforce.potentials.mace import MACEConfig
    from equiforce.potentials.potential import Potential

    hp = {**PROTOCOL_HP["mace"], **json.loads(args.hp)}
    potential = Potential(
        model=MACEConfig(**hp),
        species=(1, 8),
        r_max=args.r_max,
        atomic_energies=(0.0, 0.0),
        avg_num_neighbours=30.0,
        dtype="float32",
    )
    params = potential.init(jax.random.PRNGKey(0))
    unblocked = potential.replace(model=dataclasses.replace(potential.model, edge_chunk_size=0))
    layouts = {
        "1dev_blocked": (potential, None),
        "1dev": (unblocked, None),
        f"{args.devices}dev": (unblocked, args.devices),
        f"{args.devices}dev_blocked": (potential, args.devices),
    }
    print(f"# MACE {hp}, r_max {args.r_max} Å, float32; {jax.device_count()} {jax.devices()[0].platform} devices")
    print(f"{'atoms':>7} {'pairs':>8} {'layout':>13} {'args MB':>9} {'temp MB':>9} {'total MB':>9} {'compile s':>9}")
    rows = []
    for n_side in args.sizes:
        atoms = water_box(n_side)
        positions = np.asarray(atoms.get_positions(), np.float32)
        for name, (pot, devices) in layouts.items():
            system = make_sharded_system(pot, params, atoms, devices=devices, skin=1.0)
            row = {"atoms": len(atoms), "layout": name, "devices": devices or 1, **measure(system, positions)}
            rows.append(row)
            print(
                f"{row['atoms']:>7} {row['pairs']:>8} {name:>13} {row['argument_MB']:>9.1f} {row['temp_MB']:>9.1f} "
                f"{row['total_MB']:>9.1f} {row['compile_s']:>9.1f}",
                flush=True,
            )
    if args.out is not None:
        args.out.write_text(json.dumps({"model": hp, "r_max": args.r_max, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
