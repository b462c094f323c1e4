"""equiforce: E(3)-equivariant machine-learning interatomic potentials in JAX.

Subpackages:
  equiforce.data        structures, readers/writers, neighbour graphs, padded batches
  equiforce.potentials  models (NequIP, ...), the Potential (energy, forces, stress), model files
  equiforce.training    losses, optimisers, the training loop, checkpoints, metrics
  equiforce.md          molecular dynamics with jax-md and the ASE calculator
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("equiforce")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
