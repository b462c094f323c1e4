"""Write the committed mace-torch fixture (needs torch and mace-torch): ``python -m tests.interop.make_mace_fixture``.

``fixtures/mace_mp0b3.npz`` holds a mace-torch model of the MACE-MP-0b3 form at 8 channels (Agnesi
distances, ZBL, residual blocks, correlation 3, float64, random weights): its state dict (keys prefixed
``state/``), its hyperparameters (``hyperparameters``, JSON text, as :func:`equiforce.interop.mace_torch.
read_mace_model` reads them) and mace-torch's outputs on the structures of
:func:`tests.interop.mace_reference.structures` (``ref<i>/...``), so ``test_mace_import.py`` checks the
conversion without torch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from equiforce.interop.mace_torch import read_mace_model
from tests.interop.mace_reference import build_mace, reference, structures

OUT = Path(__file__).parent / "fixtures" / "mace_mp0b3.npz"


def main() -> None:
    model = build_mace("mp0b3", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mp0b3.model"
        torch.save(model, path)
        state, hyper, source = read_mace_model(path)
        arrays = {f"state/{k}": v for k, v in state.items()}
        arrays["hyperparameters"] = np.array(json.dumps(hyper))
        arrays["source"] = np.array(json.dumps(source))
        for i, atoms in enumerate(structures()):
            ref = reference(path, atoms)
            arrays[f"ref{i}/numbers"] = atoms.numbers
            arrays[f"ref{i}/positions"] = atoms.positions
            arrays[f"ref{i}/cell"] = np.asarray(atoms.cell)
            arrays[f"ref{i}/pbc"] = atoms.pbc
            for key, value in ref.items():
                arrays[f"ref{i}/{key}"] = np.asarray(value)
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
