"""equiforce.data: atoms, files and graphs. Imports no model and no MD code.

Units are ASE's everywhere (Å, eV, eV/Å, eV/Å³); readers convert at the edge.
"""

from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet, full_3x3_to_voigt, voigt_to_full_3x3

__all__ = ["DataError", "StructureSet", "full_3x3_to_voigt", "voigt_to_full_3x3"]
