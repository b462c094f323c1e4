"""Interoperability with other MLIP codes: import models trained elsewhere.

* :mod:`equiforce.interop.mace`: the torch-free conversion core of mace-torch models (plain arrays in, an
  equiforce potential out);
* :mod:`equiforce.interop.mace_torch`: reading mace-torch model files (needs ``equiforce[mace-import]``).
"""

from equiforce.interop.mace import MaceImportError, convert_mace

__all__ = ["MaceImportError", "convert_mace"]
