"""equiforce.data.h5md as a format module: a trajectory read as structures (the pool of ``equiforce select``), and
the old import paths (cheap, default run; the writer and reader themselves: tests/md/test_reporters.py)."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.data.errors import DataError
from equiforce.data.h5md import H5MDWriter, is_h5md, read_h5md_structures
from equiforce.data.hdf5 import write_hdf5
from equiforce.data.structures import StructureSet

Z, MASSES = np.array([8, 1, 1]), np.array([16.0, 1.0, 1.0])
OBS = ("potential_energy", "kinetic_energy", "total_energy", "temperature")


def _write(path, positions, box=None):
    periodic = box is not None
    observables = OBS + (("pressure", "volume") if periodic else ())
    n = len(positions)
    with H5MDWriter(path, Z, MASSES, periodic) as w:
        steps = np.arange(n) * 10
        w.write(
            steps, steps * 1e-3, positions, np.zeros_like(positions), box=box, **{k: np.ones(n) for k in observables}
        )


def test_trajectory_as_structures(tmp_path):
    """Frame k of the trajectory is structure k: the positions and boxes written, species repeated, periodic
    frames with their box, a non-periodic run with zero cells."""
    from equiforce.uncertainty.select import read_pool

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3)) * 3.0
    box = np.stack([np.diag([9.0, 10.0, 11.0]) + 0.1 * k for k in range(4)])
    _write(tmp_path / "p.h5", x, box)
    s = read_h5md_structures(tmp_path / "p.h5")
    assert isinstance(s, StructureSet) and len(s) == 4
    assert s.atomic_numbers.tolist() == [8, 1, 1] * 4 and s.n_atoms.tolist() == [3] * 4
    np.testing.assert_array_equal(s.positions, x.reshape(12, 3))
    np.testing.assert_array_equal(s.cell, box)
    assert s.pbc.all()
    assert read_pool(tmp_path / "p.h5").positions.tobytes() == s.positions.tobytes()

    _write(tmp_path / "m.h5", x[:2])
    m = read_h5md_structures(tmp_path / "m.h5")
    np.testing.assert_array_equal(m.cell, np.zeros((2, 3, 3)))
    assert not m.pbc.any()


def test_is_h5md_and_errors(tmp_path):
    _write(tmp_path / "t.h5", np.zeros((1, 3, 3)))
    assert is_h5md(tmp_path / "t.h5")
    native = write_hdf5(
        tmp_path / "s.h5",
        StructureSet(
            atomic_numbers=Z.astype(np.int32),
            positions=np.eye(3) * 1.5,
            n_atoms=np.array([3]),
            cell=np.zeros((1, 3, 3)),
            pbc=np.zeros((1, 3), bool),
        ),
    )
    assert not is_h5md(native) and not is_h5md(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    assert not is_h5md(tmp_path / "junk.h5")
    with H5MDWriter(tmp_path / "empty.h5", Z, MASSES, False):
        pass
    with pytest.raises(DataError, match="no committed frame"):
        read_h5md_structures(tmp_path / "empty.h5")


def test_old_import_paths_are_the_same_objects():
    import equiforce.data as data
    import equiforce.data.h5md as h5md
    import equiforce.md as md
    import equiforce.md.reporters as reporters

    for name in h5md.__all__:
        if hasattr(reporters, name):
            assert getattr(reporters, name) is getattr(h5md, name), name
    for name in ("H5MDWriter", "read_h5md", "read_restart_state", "repair_h5md", "ASE_VELOCITY_TO_A_PER_PS"):
        assert getattr(md, name) is getattr(h5md, name) and getattr(reporters, name) is getattr(h5md, name)
    assert data.H5MDWriter is h5md.H5MDWriter and data.read_h5md is h5md.read_h5md
    assert reporters.ThermoLog.__module__ == "equiforce.md.reporters"  # the thermo CSV stays with MD
