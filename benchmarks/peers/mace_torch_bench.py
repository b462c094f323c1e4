"""MD and training-step speed of mace-torch (ACEsuit ``ScaleShiftMACE``), untrained, on CPU, eager torch.

Run with the python of the ``mace-torch`` peer venv (see ``setup.sh``); never imports equiforce.

Model (protocol size, seed 0): 2 interactions, hidden irreps 64x0e+64x1o, max_ell 3, correlation 3, 8 Bessel
functions, polynomial cutoff p = 5, radial MLP [64, 64, 64], r_max 5 Å, species H C N O, MLP_irreps 16x0e,
gate silu, RealAgnosticInteractionBlock first then RealAgnosticResidualInteractionBlock, atomic energies 0,
scale 1, shift 0, avg_num_neighbors = mean neighbour count of the structure.

MD path ``ase``: ``mace.calculators.MACECalculator(models=model, default_dtype=dtype)`` (the same object
mace's own ASE users get, including its per-call graph construction and stress evaluation) driven by
``ase.md.verlet.VelocityVerlet``; a chunk is one ``dyn.run(N)``. The first chunk (warm-up) is
``first_call_s``; then ``--chunks`` chunks are timed.

Training: one ``torch.optim.Adam`` step (lr 1e-3) on a batch of ``--train-batch`` frames, loss = MSE(E) +
10·MSE(F), forces by autograd (``model(batch, training=True, compute_force=True)``); the graph batch is
built once outside the timing.

``--save-model FILE`` only builds the protocol-size model of ``--structure`` and saves it (``torch.save``), for
``equiforce import mace``; ``--model-file FILE`` runs that file instead of a freshly built model, so both codes
compute the same function (``side_by_side.py --imported-mace``).
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Any

import mace  # noqa: F401  (first: sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which e3nn 0.4.4 needs on torch>=2.6)
import numpy as np
import torch
from e3nn import o3
from mace import data as mace_data
from mace import modules
from mace.calculators import MACECalculator
from mace.tools import torch_geometric, utils
from peer_common import (
    ATOMIC_NUMBERS,
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

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(r_max: float, avg_num_neighbors: float, dtype: str) -> modules.ScaleShiftMACE:
    """The protocol-size ScaleShiftMACE with random weights from ``torch.manual_seed(SEED)``."""
    torch.set_default_dtype(TORCH_DTYPES[dtype])
    torch.manual_seed(SEED)
    model = modules.ScaleShiftMACE(
        r_max=r_max,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=2,
        num_elements=len(ATOMIC_NUMBERS),
        hidden_irreps=o3.Irreps("64x0e+64x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(ATOMIC_NUMBERS)),
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=ATOMIC_NUMBERS,
        correlation=3,
        gate=modules.gate_dict["silu"],
        radial_MLP=[64, 64, 64],
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    )
    return model.to(TORCH_DTYPES[dtype])


def training_batch(frames: list[Any], r_max: float, dtype: str) -> dict[str, torch.Tensor]:
    """One mace graph batch of ``frames`` (as MACECalculator builds a single graph)."""
    z_table = utils.AtomicNumberTable(ATOMIC_NUMBERS)
    graphs = [
        mace_data.AtomicData.from_config(mace_data.config_from_atoms(f), z_table=z_table, cutoff=r_max) for f in frames
    ]
    batch = torch_geometric.Batch.from_data_list(graphs)
    out = batch.to_dict()
    return {k: v.to(TORCH_DTYPES[dtype]) if torch.is_floating_point(v) else v for k, v in out.items()}


def run_training(args: Any, avg_num_neighbors: float, result: dict[str, Any]) -> None:
    """Adam steps on one batch: the first (warm-up) and ``args.train_steps`` timed ones."""
    frames = read_training_frames(args.train_data, args.train_batch)
    e_ref, f_ref = (torch.tensor(x, dtype=TORCH_DTYPES[args.dtype]) for x in training_targets(frames))
    batch = training_batch(frames, args.r_max, args.dtype)
    model = build_model(args.r_max, avg_num_neighbors, args.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(dict(batch), training=True, compute_force=True)
        loss = torch.mean((out["energy"] - e_ref) ** 2) + 10.0 * torch.mean((out["forces"] - f_ref) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    first = timed(step)
    steps = [timed(step) for _ in range(args.train_steps)]
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite training loss {losses}")
    record_training(result, first, steps, losses[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser(__doc__.splitlines()[0], ["ase"])
    parser.add_argument("--save-model", default=None, help="only build the protocol-size model and save it here")
    parser.add_argument("--model-file", default=None, help="run this mace-torch model file instead")
    args = parser.parse_args(argv)
    result = base_result(args, "mace-torch", version("mace-torch"), "ase")
    result["versions"] = {"torch": torch.__version__, "e3nn": version("e3nn"), "ase": version("ase")}
    result["notes"].append(f"torch threads {torch.get_num_threads()}, eager (no torch.compile)")
    avg_nn = 0.0
    model = None
    with phase(result, "setup"):
        atoms = read_structure(args.structure)
        result["n_atoms"] = len(atoms)
        result["pairs_start"] = count_pairs(atoms, args.r_max)
        avg_nn = result["pairs_start"] / len(atoms)
        model = build_model(args.r_max, avg_nn, args.dtype)
        if args.save_model:  # the protocol-size model of this structure, for `equiforce import mace`
            torch.save(model, args.save_model)
            print(f"saved {args.save_model}", flush=True)
            return result
        if args.model_file:  # the same model file another code imported
            model = torch.load(args.model_file, map_location="cpu", weights_only=False).to(TORCH_DTYPES[args.dtype])
            result["notes"].append(f"model file {args.model_file}")
        result["n_params"] = int(sum(p.numel() for p in model.parameters()))
    if model is not None:
        with phase(result, "md"):
            run_ase_md(args, atoms, MACECalculator(models=model, device="cpu", default_dtype=args.dtype), result)
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
