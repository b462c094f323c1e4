"""equiforce.potentials: equivariant networks and the Potential that turns them into energies and forces.

Importing this package registers every built-in model (see :data:`MODELS`).
"""

from equiforce.potentials import nequip as _nequip  # noqa: F401  (registers the model)
from equiforce.potentials.allegro import AllegroConfig
from equiforce.potentials.mace import MACEConfig
from equiforce.potentials.mace_compat import MACECompatConfig
from equiforce.potentials.model_io import ModelFileError, load_model, read_header, save_model
from equiforce.potentials.nequip import NequIPConfig
from equiforce.potentials.painn import PaiNNConfig
from equiforce.potentials.potential import Potential, PotentialOutput, UnknownSpeciesError
from equiforce.potentials.registry import MODELS, ModelConfig, config_from_dict, register_model
from equiforce.potentials.schnet import SchNetConfig

__all__ = [
    "MODELS",
    "AllegroConfig",
    "MACECompatConfig",
    "MACEConfig",
    "ModelConfig",
    "ModelFileError",
    "NequIPConfig",
    "PaiNNConfig",
    "Potential",
    "PotentialOutput",
    "SchNetConfig",
    "UnknownSpeciesError",
    "config_from_dict",
    "load_model",
    "read_header",
    "register_model",
    "save_model",
]
