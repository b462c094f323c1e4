"""equiforce.data: atoms, files and graphs. Imports no model and no MD code.

Units are ASE's everywhere (Å, eV, eV/Å, eV/Å³); readers convert at the edge.
"""

from equiforce.data.deepmd import read_deepmd
from equiforce.data.errors import DataError
from equiforce.data.graph import Batch, Graph, PaddingBudget, batch_iterator, collate, estimate_budget
from equiforce.data.h5md import H5MDWriter, read_h5md, read_h5md_structures, read_restart_state, repair_h5md
from equiforce.data.hdf5 import HDF5Dataset, append_hdf5, read_hdf5, write_hdf5
from equiforce.data.neighbours import (
    MIN_PAIR_DISTANCE,
    NeighbourGraph,
    average_num_neighbours,
    build_neighbour_graph,
    build_neighbour_graphs,
    check_finite_positions,
    check_pair_distances,
)
from equiforce.data.readers import (
    load_sample,
    read_ase,
    read_md17_npz,
    read_nequip_npz,
    read_rmd17_npz,
    read_structures,
    sample_path,
)
from equiforce.data.splits import check_indices, random_split, read_index_file, split_by_indices
from equiforce.data.statistics import (
    DatasetStatistics,
    check_atomic_energies,
    composition_matrix,
    compute_statistics,
    energy_per_atom_residual_stats,
    fit_atomic_energies,
    force_rms,
)
from equiforce.data.structures import StructureSet, full_3x3_to_voigt, voigt_to_full_3x3

__all__ = [
    "MIN_PAIR_DISTANCE",
    "Batch",
    "DataError",
    "DatasetStatistics",
    "Graph",
    "H5MDWriter",
    "HDF5Dataset",
    "NeighbourGraph",
    "PaddingBudget",
    "StructureSet",
    "append_hdf5",
    "average_num_neighbours",
    "batch_iterator",
    "build_neighbour_graph",
    "build_neighbour_graphs",
    "check_atomic_energies",
    "check_finite_positions",
    "check_indices",
    "check_pair_distances",
    "collate",
    "composition_matrix",
    "compute_statistics",
    "energy_per_atom_residual_stats",
    "estimate_budget",
    "fit_atomic_energies",
    "force_rms",
    "full_3x3_to_voigt",
    "load_sample",
    "random_split",
    "read_ase",
    "read_deepmd",
    "read_h5md",
    "read_h5md_structures",
    "read_hdf5",
    "read_index_file",
    "read_md17_npz",
    "read_nequip_npz",
    "read_restart_state",
    "read_rmd17_npz",
    "read_structures",
    "repair_h5md",
    "sample_path",
    "split_by_indices",
    "voigt_to_full_3x3",
    "write_hdf5",
]
