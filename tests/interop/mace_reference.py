"""mace-torch models with random weights and their reference outputs (needs torch and mace-torch).

Used by the torch parity tests (``test_mace_parity.py``) and by ``make_mace_fixture.py``, which writes the
committed fixture the default suite checks without torch. Every configuration is a published model's
hyperparameters at a reduced width (8 channels instead of 64-256) so that the tests stay fast.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
    warnings.simplefilter("ignore")
    import mace  # noqa: F401  (first: sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for e3nn 0.4.4)
    import torch
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

Z = [1, 6, 8]
E0 = np.array([-13.6, -1029.8, -2041.5])  # eV, realistic magnitudes (PBE-like isolated atoms)

#: name -> (mace-torch model class, keyword arguments): published models' hyperparameters at 8 channels
CONFIGURATIONS: dict[str, tuple[str, dict]] = {
    # MACE-MP-0 "medium": ScaleShiftMACE, residual blocks, 0e+1o hidden, max_ell 3, correlation 3, 10 Bessel, r 6
    "mp0": (
        "ScaleShiftMACE",
        dict(hidden="8x0e+8x1o", first="RealAgnosticResidualInteractionBlock", r_max=6.0, num_bessel=10, correlation=3),
    ),
    # MACE-OFF23 "small": scalars-only hidden features, r 4.5
    "off_small": (
        "ScaleShiftMACE",
        dict(hidden="8x0e", first="RealAgnosticResidualInteractionBlock", r_max=4.5, num_bessel=8, correlation=3),
    ),
    # MACE-MP-0b3 / MACE-OMAT: Agnesi-transformed distances and ZBL pair repulsion
    "mp0b3": (
        "ScaleShiftMACE",
        dict(
            hidden="8x0e+8x1o",
            first="RealAgnosticResidualInteractionBlock",
            r_max=6.0,
            num_bessel=10,
            correlation=3,
            pair_repulsion=True,
            distance_transform="Agnesi",
        ),
    ),
    # the paper's MACE (rMD17): non-residual first layer, hidden L = 2, per-layer correlation, no scale/shift
    "paper": (
        "MACE",
        dict(
            hidden="8x0e+8x1o+8x2e", first="RealAgnosticInteractionBlock", r_max=5.0, num_bessel=8, correlation=[3, 2]
        ),
    ),
    # density-normalised blocks
    "density": (
        "ScaleShiftMACE",
        dict(
            hidden="8x0e+8x1o",
            first="RealAgnosticDensityInteractionBlock",
            later="RealAgnosticDensityResidualInteractionBlock",
            r_max=5.0,
            num_bessel=8,
            correlation=3,
        ),
    ),
    # a multi-head model (MACE-MH / fine-tuned foundation models): two heads, different E0, scale and shift
    "multihead": (
        "ScaleShiftMACE",
        dict(
            hidden="8x0e+8x1o",
            first="RealAgnosticResidualInteractionBlock",
            r_max=5.0,
            num_bessel=8,
            correlation=3,
            heads=["pbe", "r2scan"],
        ),
    ),
}


def build_mace(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A mace-torch model of configuration ``name`` with random weights (every parameter perturbed)."""
    cls, kw = CONFIGURATIONS[name]
    kw = dict(kw)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        heads = kw.pop("heads", None)
        n_heads = len(heads) if heads else 1
        first = kw.pop("first")
        later = kw.pop("later", "RealAgnosticResidualInteractionBlock")
        args = dict(
            r_max=kw.pop("r_max"),
            num_bessel=kw.pop("num_bessel"),
            num_polynomial_cutoff=5,
            max_ell=3,
            interaction_cls=modules.interaction_classes[later],
            interaction_cls_first=modules.interaction_classes[first],
            num_interactions=2,
            num_elements=len(Z),
            hidden_irreps=o3.Irreps(kw.pop("hidden")),
            MLP_irreps=o3.Irreps("16x0e"),
            gate=torch.nn.functional.silu,
            atomic_energies=np.stack([E0 + 0.1 * k for k in range(n_heads)]) if heads else E0,
            avg_num_neighbors=7.3,
            atomic_numbers=Z,
            correlation=kw.pop("correlation"),
            radial_type="bessel",
            **kw,
        )
        if heads:
            args["heads"] = heads
        if cls == "ScaleShiftMACE":
            scale = np.array([0.8 + 0.3 * k for k in range(n_heads)])
            shift = np.array([-0.05 + 0.1 * k for k in range(n_heads)])
            model = modules.ScaleShiftMACE(
                atomic_inter_scale=scale if heads else 0.8, atomic_inter_shift=shift if heads else -0.05, **args
            )
        else:
            model = modules.MACE(**args)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))  # no layer left at its special initial value
    finally:
        torch.set_default_dtype(previous)
    return model


def structures() -> list[Atoms]:
    """A molecule and two periodic cells with self-images (cells shorter than the cutoff)."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    diamond = bulk("C", "diamond", a=3.57)  # 2 atoms: every neighbour is an image, also of the atom itself
    diamond.numbers[1] = 8
    diamond.rattle(0.05, seed=2)
    tri = Atoms(
        "HCO",
        positions=[[0.1, 0.2, 0.0], [1.2, 0.3, 0.4], [0.4, 1.5, 1.1]],
        cell=[[3.1, 0.0, 0.0], [0.7, 3.3, 0.0], [0.4, -0.6, 3.6]],
        pbc=True,
    )
    return [ethanol, diamond, tri]


def reference(model_file: str | Path, atoms: Atoms, *, head: str | None = None, dtype: str = "float64") -> dict:
    """mace-torch's energy (eV), forces (eV/Å), stress (eV/Å³, ASE Voigt) and per-atom energies incl. E0."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        kwargs = {"head": head} if head is not None else {}
        calc = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype=dtype, **kwargs)
        atoms = atoms.copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress() if atoms.pbc.all() else np.zeros(6)
        model = calc.models[0]
        heads = list(model.heads)
        e0 = np.atleast_2d(model.atomic_energies_fn.atomic_energies.detach().numpy())
        e0 = e0[heads.index(calc.head) if e0.shape[0] > 1 else 0]
        index = {z: i for i, z in enumerate(model.atomic_numbers.tolist())}
        node = calc.results["node_energy"] + e0[[index[z] for z in atoms.numbers]]
    return {"energy": float(energy), "forces": forces, "stress": stress, "energies": node}
