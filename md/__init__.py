"""equiforce.md: molecular dynamics with a trained potential (jax-md engine) and the ASE calculator.

* :func:`run_md` — one call: model file + structure → jit-compiled NVE/NVT run, H5MD trajectory,
  thermo CSV, exact restart.
* :func:`run_replicas` — many structures in one jit-compiled program sharded over the devices (``run_md``
  given a list calls it): periodic or not, NVE / Langevin / Nosé–Hoover with per-replica thermostats and
  seeds, a trajectory per replica, blow-up handling, restart (:mod:`equiforce.md.replicas`).
* ``run_md(..., devices="all")``, :func:`make_sharded_system` — one large system over several devices
  (edges sharded, neighbour sums reduced; see :mod:`equiforce.md.sharded`).
* :class:`MDEngine`, :func:`make_system` — the lower-level pieces (jax-md space, neighbour list, chunks).
* :class:`EquiforceCalculator` — an ASE calculator for any ASE workflow.
* :class:`UncertaintyMonitor` — what a run does when σ_F crosses ``uncertainty_threshold`` (record / stop).
"""

from equiforce.data.h5md import ASE_VELOCITY_TO_A_PER_PS, H5MDWriter, read_h5md, read_restart_state, repair_h5md
from equiforce.md.calculator import EquiforceCalculator, bucket_size
from equiforce.md.engine import ENSEMBLES, MDBlowUpError, MDConfig, MDEngine, ThermoFrame, UncertaintyCrossing
from equiforce.md.replicas import ReplicaEngine, ReplicaResult, ReplicasResult, run_replicas
from equiforce.md.reporters import ThermoLog
from equiforce.md.run import MDResult, energy_drift, load_structure, run_md
from equiforce.md.sharded import make_sharded_system
from equiforce.md.system import MDSystem, check_structure, make_system
from equiforce.md.uncertainty_monitor import UncertaintyMonitor

__all__ = [
    "ASE_VELOCITY_TO_A_PER_PS",
    "ENSEMBLES",
    "EquiforceCalculator",
    "H5MDWriter",
    "MDBlowUpError",
    "MDConfig",
    "MDEngine",
    "MDResult",
    "MDSystem",
    "ReplicaEngine",
    "ReplicaResult",
    "ReplicasResult",
    "ThermoFrame",
    "ThermoLog",
    "UncertaintyCrossing",
    "UncertaintyMonitor",
    "bucket_size",
    "check_structure",
    "energy_drift",
    "load_structure",
    "make_sharded_system",
    "make_system",
    "read_h5md",
    "read_restart_state",
    "repair_h5md",
    "run_md",
    "run_replicas",
]
