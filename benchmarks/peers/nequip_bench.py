"""MD and training-step speed of NequIP / Allegro (``nequip`` + ``nequip-allegro``), untrained, CPU, eager torch.

Run with the python of the ``nequip`` peer venv (see ``setup.sh``); never imports equiforce.

Models (protocol sizes, ``seed=0``, ``model_dtype`` = ``--dtype``, r_max 5 Å, type names H C N O, per-type
energy scales 1 and shifts 0, avg_num_neighbors = mean neighbour count of the structure), built with the
packages' own model builders in eager mode (no ``torch.compile``, no ``nequip-compile``):

* ``--model nequip``: ``nequip.model.NequIPGNNModel(num_layers=4, l_max=2, parity=True, num_features=32,
  radial_mlp_depth=1, radial_mlp_width=128, num_bessels=8, polynomial_cutoff_p=6)``, i.e. hidden features
  32x0e+32x0o+32x1o+32x1e+32x2e+32x2o;
* ``--model allegro``: ``allegro.model.AllegroModel(num_layers=2, l_max=2, parity=True, num_scalar_features=64,
  num_tensor_features=32)`` with a ``TwoBodyBesselScalarEmbed`` (8 Bessel functions, p = 6); MLP sizes at the
  package defaults (two-body/scalar-embed MLP 1 x 64, Allegro MLP 1 x 64, readout MLP 1 x 32).

MD path ``ase``: ``nequip.integrations.ase.NequIPCalculator(model=model, transforms=basic_transforms(...))``,
the same object and transforms (type mapper + neighbour list) its ``from_compiled_model`` builds, driven by
``ase.md.verlet.VelocityVerlet``; a chunk is one ``dyn.run(N)``.

Training: one ``torch.optim.Adam`` step (lr 1e-3) on a batch of ``--train-batch`` frames (the same transforms,
``AtomicDataDict.batched_from_list``), loss = MSE(E) + 10·MSE(F), forces by autograd inside the model.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from nequip.data import AtomicDataDict
from nequip.data.ase import from_ase
from nequip.integrations.ase import NequIPCalculator
from nequip.integrations.utils import basic_transforms
from nequip.model import NequIPGNNModel
from nequip.utils.global_state import set_global_state
from peer_common import (
    SEED,
    base_result,
    build_parser,
    count_pairs,
    phase,
    read_structure,
    read_training_frames,
    record_training,
    run_ase_md,
    summary_line,
    timed,
    training_targets,
    write_json,
)

TYPE_NAMES = ["H", "C", "N", "O"]


def build_model(name: str, r_max: float, avg_num_neighbors: float, dtype: str) -> torch.nn.Module:
    """The protocol-size NequIP or Allegro model with random weights from ``seed=0``."""
    common: dict[str, Any] = {
        "seed": SEED,
        "model_dtype": dtype,
        "r_max": r_max,
        "type_names": TYPE_NAMES,
        "avg_num_neighbors": avg_num_neighbors,
        "per_type_energy_scales": 1.0,
        "per_type_energy_shifts": 0.0,
    }
    if name == "nequip":
        return NequIPGNNModel(
            num_layers=4,
            l_max=2,
            parity=True,
            num_features=32,
            radial_mlp_depth=1,
            radial_mlp_width=128,
            num_bessels=8,
            polynomial_cutoff_p=6,
            **common,
        )
    from allegro.model import AllegroModel

    return AllegroModel(
        num_layers=2,
        l_max=2,
        parity=True,
        num_scalar_features=64,
        num_tensor_features=32,
        radial_chemical_embed={
            "_target_": "allegro.nn.TwoBodyBesselScalarEmbed",
            "num_bessels": 8,
            "bessel_trainable": False,
            "polynomial_cutoff_p": 6,
        },
        **common,
    )


def transforms_for(model: torch.nn.Module, r_max: float) -> list[Any]:
    """Type mapper (chemical symbol = type name) and neighbour list, as nequip's integrations build them."""
    return basic_transforms(model.metadata, r_max, TYPE_NAMES, {t: t for t in TYPE_NAMES})


def training_batch(frames: list[Any], transforms: list[Any]) -> dict[str, torch.Tensor]:
    data = []
    for f in frames:
        d = from_ase(f.copy())  # copy: labels are taken separately, the graph only needs positions/species
        for t in transforms:
            d = t(d)
        data.append(d)
    return AtomicDataDict.batched_from_list(data)


def run_training(args: Any, avg_num_neighbors: float, result: dict[str, Any]) -> None:
    """Adam steps on one batch: the first (warm-up) and ``args.train_steps`` timed ones."""
    frames = read_training_frames(args.train_data, args.train_batch)
    tdtype = torch.float64 if args.dtype == "float64" else torch.float32
    e_ref, f_ref = (torch.tensor(x, dtype=tdtype) for x in training_targets(frames))
    model = build_model(args.model, args.r_max, avg_num_neighbors, args.dtype)
    model.train()
    batch = training_batch(frames, transforms_for(model, args.r_max))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(dict(batch))
        energy = out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)
        forces = out[AtomicDataDict.FORCE_KEY]
        loss = torch.mean((energy - e_ref) ** 2) + 10.0 * torch.mean((forces - f_ref) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    first = timed(step)
    steps = [timed(step) for _ in range(args.train_steps)]
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite training loss {losses}")
    record_training(result, first, steps, losses[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser(__doc__.splitlines()[0], ["ase"], models=["nequip", "allegro"]).parse_args(argv)
    code_version = version("nequip") if args.model == "nequip" else version("nequip-allegro")
    result = base_result(args, args.model, code_version, "ase")
    result["versions"] = {
        "torch": torch.__version__,
        "nequip": version("nequip"),
        "nequip-allegro": version("nequip-allegro"),
        "e3nn": version("e3nn"),
        "ase": version("ase"),
    }
    result["notes"].append(f"torch threads {torch.get_num_threads()}, eager (no torch.compile / nequip-compile)")
    set_global_state(allow_tf32=False)
    avg_nn = 0.0
    model = None
    with phase(result, "setup"):
        atoms = read_structure(args.structure)
        result["n_atoms"] = len(atoms)
        result["pairs_start"] = count_pairs(atoms, args.r_max)
        avg_nn = result["pairs_start"] / len(atoms)
        model = build_model(args.model, args.r_max, avg_nn, args.dtype)
        model.eval()
        result["n_params"] = int(sum(p.numel() for p in model.parameters()))
    if model is not None:
        with phase(result, "md"):
            calc = NequIPCalculator(model=model, device="cpu", transforms=transforms_for(model, args.r_max))
            run_ase_md(args, atoms, calc, result)
        with phase(result, "pairs_end"):
            result["pairs_end"] = count_pairs(atoms, args.r_max)
    if args.train_data:
        with phase(result, "train"):
            run_training(args, avg_nn, result)
    write_json(args.json, result)
    print(summary_line(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["error"] is None else 1)
