"""Model sizes and optimiser settings of the benchmark runs, one per (model, size).

Two sizes per model:

* ``"cpu"``: small enough that a 30-minute CPU budget on 950 rMD17 frames runs many epochs;
* ``"paper"``: the rMD17 settings of the model's paper (for a GPU; on a CPU an epoch takes minutes).

Training settings shared by every model (loss weights, EMA, schedule, 950/50 split) live in
:func:`equiforce.benchmark.rmd17.benchmark_config`; a preset only holds what differs between models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["PRESETS", "SIZES", "Preset", "get_preset"]

SIZES: tuple[str, ...] = ("cpu", "paper")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One model size for the benchmark.

    Attributes:
      model: registered model name.
      size: ``"cpu"`` or ``"paper"``.
      hyperparameters: the model config's fields (see the model's ``*Config`` class).
      learning_rate: peak learning rate of AMSGrad.
      batch_size: structures per step.
      r_max: cutoff, Å.
      source: where the paper-size values come from (empty for the CPU sizes).
    """

    model: str
    size: str
    hyperparameters: dict[str, Any]
    learning_rate: float
    batch_size: int = 5
    r_max: float = 5.0
    source: str = ""


_PRESETS: tuple[Preset, ...] = (
    # ---------------------------------------------------------------- NequIP (arXiv:2101.03164)
    Preset(
        "nequip",
        "cpu",
        dict(num_interactions=3, l_max=2, num_features=32, parity=False, num_bessel=8, radial_mlp_hidden=64),
        learning_rate=0.005,
    ),
    Preset(
        "nequip",
        "paper",
        dict(num_interactions=5, l_max=3, num_features=64, parity=True, num_bessel=8, radial_mlp_hidden=64),
        learning_rate=0.01,
        source="Batzner et al. 2022 (arXiv:2101.03164), rMD17: 5 layers, l_max 3, 64 features, r_max 5 Å, batch 5",
    ),
    # ---------------------------------------------------------------- MACE (arXiv:2206.07697)
    Preset(
        "mace",
        "cpu",
        dict(num_interactions=2, num_features=32, l_max=3, hidden_l_max=1, correlation=3, radial_mlp_hidden=64),
        learning_rate=0.01,
    ),
    Preset(
        "mace",
        "paper",
        dict(
            num_interactions=2,
            num_features=256,
            l_max=3,
            hidden_l_max=2,
            correlation=3,
            radial_mlp_hidden=64,
            residual_first_layer=True,
        ),
        learning_rate=0.01,
        source="Batatia et al. 2022 (arXiv:2206.07697), rMD17: 2 layers, 256 channels, hidden L 2, l_max 3, "
        "correlation 3, 8 Bessel, r_max 5 Å, batch 5, AMSGrad lr 0.01 "
        "(values of the mace README's paper-era rMD17 example)",
    ),
    # ---------------------------------------------------------------- MACE in mace-torch's exact form
    Preset(
        "mace_compat",
        "cpu",
        dict(num_interactions=2, num_features=32, l_max=3, hidden_l_max=1, correlation=3, radial_mlp=(64, 64, 64)),
        learning_rate=0.01,
    ),
    Preset(
        "mace_compat",
        "paper",
        dict(
            num_interactions=2,
            num_features=256,
            l_max=3,
            hidden_l_max=2,
            correlation=3,
            radial_mlp=(64, 64, 64),
            first_layer_residual=True,
        ),
        learning_rate=0.01,
        source="as the mace paper preset, in mace-torch's form (ScaleShiftMACE with residual first layer)",
    ),
    # ---------------------------------------------------------------- SchNet (arXiv:1706.08566)
    Preset(
        "schnet",
        "cpu",
        dict(num_interactions=3, num_features=64, num_filters=64, num_rbf=32, cutoff_fn="polynomial"),
        learning_rate=0.001,
    ),
    Preset(
        "schnet",
        "paper",
        dict(num_interactions=6, num_features=128, num_filters=128, num_rbf=20, cutoff_fn="polynomial"),
        learning_rate=0.0005,
        source="schnetpack 2 MD17 recipe (arXiv:2212.05517): 6 interactions, 128 features, 20 Gaussians, "
        "r_max 5 Å (polynomial instead of cosine cutoff for smooth forces)",
    ),
    # ---------------------------------------------------------------- PaiNN (arXiv:2102.03150)
    Preset(
        "painn",
        "cpu",
        dict(num_interactions=3, num_features=64, num_rbf=20, cutoff_fn="cosine"),
        learning_rate=0.001,
    ),
    Preset(
        "painn",
        "paper",
        dict(num_interactions=3, num_features=128, num_rbf=20, cutoff_fn="cosine"),
        learning_rate=0.0005,
        source="Schütt et al. 2021 (arXiv:2102.03150), MD17: 3 interactions, 128 features, 20 radial functions, "
        "cosine cutoff 5 Å, learning rate 5e-4",
    ),
    # ---------------------------------------------------------------- Allegro (arXiv:2204.05249)
    Preset(
        "allegro",
        "cpu",
        dict(
            num_layers=2,
            l_max=2,
            num_tensor_features=8,
            latent_dim=64,
            two_body_mlp_hidden=(64,),
            latent_mlp_hidden=(64,),
            edge_energy_mlp_hidden=(32,),
        ),
        learning_rate=0.002,
    ),
    Preset(
        "allegro",
        "paper",
        dict(
            num_layers=2,
            l_max=3,
            parity=True,
            num_tensor_features=64,
            latent_dim=1024,
            two_body_mlp_hidden=(128, 256, 512),
            latent_mlp_hidden=(1024, 1024),
            edge_energy_mlp_hidden=(128,),
        ),
        learning_rate=0.002,
        r_max=7.0,
        source="MLP widths of mir-group/allegro configs/example.yaml; 2 layers, l_max 3, 64 tensor features, "
        "r_max 7 Å as recalled from Musaelian et al. 2023 (arXiv:2204.05249) — not checked against its SI",
    ),
)

PRESETS: dict[tuple[str, str], Preset] = {(p.model, p.size): p for p in _PRESETS}


def get_preset(model: str, size: str = "cpu") -> Preset:
    """The preset of ``model`` at ``size``.

    Raises:
      ValueError: unknown model or size (listing the known ones).
    """
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; choose one of {SIZES}")
    if (model, size) not in PRESETS:
        known = sorted({m for m, _ in PRESETS})
        raise ValueError(f"no benchmark preset for model {model!r}; models with presets: {known}")
    return PRESETS[(model, size)]
