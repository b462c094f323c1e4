"""One registry of model families behind one interface.

Every model declares a frozen config dataclass (a subclass of :class:`ModelConfig`) with a class-level
``name`` and a ``build`` method returning a flax module with the call signature::

    module.apply(params, vectors, species, senders, receivers, edge_mask) -> [n_nodes] per-atom outputs

(vectors ``[n_edges, 3]`` Å, species ``[n_nodes]`` int index into the potential's species table,
senders/receivers ``[n_edges]`` int, edge_mask ``[n_edges]`` bool). The :class:`~equiforce.potentials.
potential.Potential` turns those outputs into energies, forces and stress, so MD, the ASE calculator
and training have no model-specific code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

__all__ = ["MODELS", "ModelConfig", "config_from_dict", "register_model"]

MODELS: dict[str, type[ModelConfig]] = {}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base class of the frozen per-model hyperparameter configs."""

    name: ClassVar[str] = ""
    #: regular expressions (full match on ``/``-joined parameter paths) of the last linear layer: the per-atom
    #: output must be linear in these parameters (the LLPR uncertainty differentiates with respect to them)
    last_layer: ClassVar[tuple[str, ...]] = ()
    #: weights with per-species rows that need more than a plain copy when species are added (fine-tuning):
    #: ``(regex, axis, blocks, fan_in_normalised)`` says that along ``axis`` the weight starts with ``blocks``
    #: consecutive blocks of one entry per species (e.g. the one-hot species of both atoms of an edge,
    #: concatenated with other inputs), and whether the layer divides by sqrt(fan-in) at run time (e3nn's
    #: ``Linear`` and ``MultiLayerPerceptron``: the copied weights are then rescaled so that the function on
    #: the old species stays the same). Plain unnormalised tables need no declaration.
    species_blocks: ClassVar[tuple[tuple[str, int, int, bool], ...]] = ()
    #: the Potential subtracts each species' isolated-atom output from the network's per-atom outputs (so an
    #: isolated atom has exactly E0 + shift). False for models that reproduce another code's energies exactly
    #: (:class:`~equiforce.potentials.mace_compat.MACECompatConfig`: mace-torch has no such reference).
    isolated_atom_reference: ClassVar[bool] = True
    #: ``build`` also takes ``atomic_numbers`` (the potential's species, one per species index), for models with
    #: element-specific physics (ZBL repulsion, covalent radii)
    uses_atomic_numbers: ClassVar[bool] = False

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def register_model(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: make a config (and so its model) available by ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class-level `name`")
    if cls.name in MODELS and MODELS[cls.name] is not cls:
        raise ValueError(f"a model named {cls.name!r} is already registered")
    MODELS[cls.name] = cls
    return cls


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a model config from ``{"name": ..., **hyperparameters}``.

    Raises:
      ValueError: unknown model name or unknown hyperparameter key (listing the valid ones).
    """
    data = dict(data)
    name = data.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    cls = MODELS[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown {name} hyperparameters {unknown}; valid keys: {sorted(valid)}")
    return cls(**data)
