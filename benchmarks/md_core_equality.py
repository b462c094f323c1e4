"""Trajectory equality of the MD core before and after a refactor (issue 28 §3): every ensemble, single runs,
replicas and a sharded run, float64, fixed seeds; positions, velocities (from the H5MD trajectories) and the
thermo frames of every report saved to one ``.npz``.

Model: a small NequIP (1 interaction, 8 features, l_max 1, r_max 4 Å) with random parameters from
``PRNGKey(0)`` on aspirin (21 atoms) and salicylic acid (16 atoms) from the shipped samples; NPT on aspirin in a
periodic 12 Å box. 0.1 fs steps (the model is untrained), 100 steps, a report every 20.

    # the code before (a git worktree) and after, then the comparison
    git worktree add /tmp/md_base <commit>
    python benchmarks/md_core_equality.py --tree /tmp/md_base --out /tmp/md_base.npz
    python benchmarks/md_core_equality.py --out /tmp/md_new.npz
    python benchmarks/md_core_equality.py --compare /tmp/md_base.npz /tmp/md_new.npz

``--tree`` imports equiforce from another checkout (the editable install's path mapping is pointed at it).
Two simulated CPU devices (``XLA_FLAGS``) serve the sharded runs (one structure over 2 devices, and replicas
over 2 devices).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")


def use_tree(tree: str) -> None:
    """Import ``equiforce`` from the checkout ``tree`` instead of the editable install's one."""
    import importlib

    finder = next(m for m in sys.modules if m.startswith("__editable___equiforce"))
    mapping = importlib.import_module(finder).MAPPING
    root = str(Path(mapping["equiforce"]).parents[1])
    for name, path in list(mapping.items()):
        mapping[name] = path.replace(root, str(Path(tree).resolve()), 1)


def trajectory_arrays(path: Path) -> dict[str, object]:
    """Every numeric dataset of an H5MD file's ``particles`` and ``observables`` groups."""
    import h5py
    import numpy as np

    out = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and name.startswith(("particles", "observables")):
                if obj.dtype.kind in "fiu" and name.endswith("/value"):
                    out[name] = np.asarray(obj[()], np.float64)

        f.visititems(visit)
    return out


def frames_array(frames: list) -> object:
    import numpy as np

    fields = ("step", "potential_energy", "kinetic_energy", "temperature", "conserved", "pressure", "volume")
    return np.array([[float(getattr(f, k)) for k in fields] for f in frames], np.float64)


def run_all(out: str, steps: int, interval: int) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from equiforce.md import run_md, run_replicas
    from equiforce.md.inputs import load_structure
    from equiforce.potentials import config_from_dict
    from equiforce.potentials.potential import Potential

    potential = Potential(
        model=config_from_dict(
            {"name": "nequip", "num_interactions": 1, "num_features": 8, "l_max": 1, "parity": False}
        ),
        species=(1, 6, 8),
        r_max=4.0,
        atomic_energies=(0.0, 0.0, 0.0),
        avg_num_neighbours=10.0,
        dtype="float64",
    )
    model = (potential, potential.init(jax.random.PRNGKey(0)))
    aspirin = load_structure("sample:test:0")
    aspirin1 = load_structure("sample:test:1")
    salicylic = load_structure("sample:salicylic:test:0")
    boxed = aspirin.copy()
    boxed.set_cell([12.0, 12.0, 12.0])
    boxed.center()
    boxed.set_pbc(True)
    common = dict(timestep_fs=0.1, steps=steps, report_interval=interval, progress=False, precision="float64")
    common["log"] = lambda _: None
    saved: dict[str, np.ndarray] = {}
    tmp = Path(tempfile.mkdtemp())

    def keep(name: str, traj: Path, frames: list) -> None:
        saved[f"{name}/frames"] = frames_array(frames)
        for key, value in trajectory_arrays(traj).items():
            saved[f"{name}/{key}"] = value
        print(f"{name}: {len(frames)} frames, E_pot[-1] = {frames[-1].potential_energy:.12f} eV", flush=True)

    singles = [
        ("nve", aspirin, {}),
        ("nvt_langevin", aspirin, {"seed": 3, "temperature_K": 350.0, "friction_per_ps": 5.0}),
        ("nvt_nose_hoover", aspirin, {"seed": 4, "thermostat_tau_fs": 5.0}),
        (
            "npt_nose_hoover",
            boxed,
            {"seed": 5, "pressure_GPa": 0.0, "thermostat_tau_fs": 5.0, "barostat_tau_fs": 200.0},
        ),
    ]
    for ensemble, atoms, extra in singles:
        traj = tmp / f"single_{ensemble}.h5"
        result = run_md(model, atoms, ensemble=ensemble, trajectory=traj, **common, **extra)
        keep(f"single/{ensemble}", traj, result.frames)
    traj = tmp / "sharded_nve.h5"
    result = run_md(model, aspirin, ensemble="nvt_langevin", trajectory=traj, devices=2, seed=6, **common)
    keep("sharded/nvt_langevin", traj, result.frames)
    structures = [aspirin, aspirin1, salicylic]
    per = {"temperature_K": [300.0, 400.0, 350.0], "seed": [7, 8, 9]}
    for devices in (1, 2):
        for ensemble in ("nve", "nvt_langevin", "nvt_nose_hoover"):
            extra = {"thermostat_tau_fs": [5.0, 8.0, 6.0]} if ensemble == "nvt_nose_hoover" else {}
            if ensemble == "nvt_langevin":
                extra = {"friction_per_ps": [2.0, 5.0, 10.0]}
            result = run_replicas(
                model,
                structures,
                ensemble=ensemble,
                trajectory=tmp / f"rep{devices}_{ensemble}_{{replica}}.h5",
                devices=devices,
                **common,
                **per,
                **extra,
            )
            for i, rep in enumerate(result.replicas):
                keep(f"replicas{devices}/{ensemble}/{i}", tmp / f"rep{devices}_{ensemble}_{i}.h5", rep.frames)
    np.savez(out, **saved)
    print(f"saved {len(saved)} arrays to {out}")


def compare(base: str, new: str) -> float:
    import numpy as np

    a, b = np.load(base), np.load(new)
    if set(a.files) != set(b.files):
        print(
            f"arrays differ: only in {base}: {sorted(set(a.files) - set(b.files))}; "
            f"only in {new}: {sorted(set(b.files) - set(a.files))}"
        )
    worst = 0.0
    runs: dict[str, float] = {}
    for key in sorted(set(a.files) & set(b.files)):
        x, y = a[key], b[key]
        if x.shape != y.shape:
            print(f"{key}: shapes {x.shape} vs {y.shape}")
            worst = float("inf")
            continue
        both_nan = np.isnan(x) & np.isnan(y)
        diff = float(np.max(np.where(both_nan, 0.0, np.abs(x - y)), initial=0.0))
        run = key.split("/particles")[0].split("/observables")[0].split("/frames")[0]
        runs[run] = max(runs.get(run, 0.0), diff)
        worst = max(worst, diff)
    for run, diff in runs.items():
        print(f"{run:32s} max |diff| = {diff:.3e}")
    print(f"overall max |diff| = {worst:.3e}")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", help="import equiforce from this checkout (e.g. a git worktree of the old code)")
    ap.add_argument("--out", default="md_core_equality.npz")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=20)
    ap.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"), help="compare two saved files and exit")
    ap.add_argument("--tolerance", type=float, default=1e-12)
    args = ap.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.compare) <= args.tolerance else 1)
    if args.tree:
        use_tree(args.tree)
    import equiforce

    print(f"equiforce from {Path(equiforce.__file__).parents[2]}", flush=True)
    run_all(args.out, args.steps, args.interval)


if __name__ == "__main__":
    main()
