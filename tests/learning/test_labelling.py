"""Labellers and resumable labelling (issue 29 §1), without JAX: cheap.

* EMT through the labeller equals ASE's EMT called directly (energy, forces, stress of a periodic cell).
* GFN2-xTB through tblite: forces equal the central finite difference of its own energy (eV/Å), and the
  energy of water at its GFN2 minimum equals the xtb program's printed total energy (Hartree → eV with
  ``ase.units``), so a unit slip in either shows.
* A kill at the fault point ``al-label`` (between a label's computation and its append) in a subprocess:
  the resumed batch computes no label twice (a ``python:`` labeller logs every call) and labels every frame.
* A torn last frame is dropped and cut off; a failing labeller (raises, NaN) is recorded and skipped, in
  worker processes; a labeller that cannot be built is a clear error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from equiforce.learning.labellers import LabellerError, build_calculator, check_species, label_frame
from equiforce.learning.labelling import FAILURES, LABELLED, label_batch, read_failures, read_frames

COUNTING_LABELLER = '''
import os
from ase.calculators.emt import EMT

class Logged(EMT):
    """EMT that logs the al_id of every frame it computes; raises on ids in FAIL, NaN energy on ids in NAN."""
    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        al_id = atoms.info.get("al_id", "?")
        with open(os.environ["AL_CALL_LOG"], "a") as fh:
            fh.write(al_id + "\\n")
        super().calculate(atoms, properties, system_changes)
        if al_id in os.environ.get("AL_FAIL", "").split(","):
            raise RuntimeError("SCF did not converge in 0 iterations")
        if al_id in os.environ.get("AL_NAN", "").split(","):
            self.results["energy"] = float("nan")

def make():
    return Logged()
'''


def _cu_frames(n: int) -> list:
    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.rattle(0.05, seed=k)
        a.info["al_id"] = f"g001-{k:04d}"
        a.arrays["sigma_forces"] = np.full(len(a), 0.01 * (k + 1))
        frames.append(a)
    return frames


@pytest.fixture
def counting(tmp_path, monkeypatch):
    (tmp_path / "al_counting.py").write_text(COUNTING_LABELLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log = tmp_path / "calls.log"
    monkeypatch.setenv("AL_CALL_LOG", str(log))
    return log


def test_emt_labeller_equals_ase_emt_and_keeps_sigma(tmp_path):
    frames = _cu_frames(3)
    labelled, failures = label_batch({"kind": "emt"}, frames, tmp_path)
    assert failures == [] and [a.info["al_id"] for a in labelled] == [a.info["al_id"] for a in frames]
    for a, ref in zip(labelled, frames, strict=True):
        r = ref.copy()
        r.calc = EMT()
        # extxyz stores positions to 1e-8 Å: the labels match to that
        assert a.get_potential_energy() == pytest.approx(r.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(a.get_forces(), r.get_forces(), atol=1e-6)
        np.testing.assert_allclose(a.get_stress(), r.get_stress(voigt=True), atol=1e-8)
        np.testing.assert_allclose(a.arrays["sigma_forces"], ref.arrays["sigma_forces"])  # σ_F per atom kept


def test_tblite_gfn2_water_energy_and_forces_in_ev():
    pytest.importorskip("tblite")
    from ase.optimize import BFGS
    from ase.units import Hartree

    calc = build_calculator({"kind": "tblite", "method": "GFN2-xTB"})
    water = molecule("H2O")
    out = label_frame(calc, water)
    assert out.ok and out.forces.shape == (3, 3) and out.stress is None
    h = 1e-4  # Å: central differences of the labeller's own energy, eV/Å, on the in-plane components
    for i, j in ((0, 2), (1, 1), (2, 2)):
        e = []
        for sign in (1, -1):
            a = water.copy()
            a.positions[i, j] += sign * h
            e.append(label_frame(calc, a).energy)
        assert out.forces[i, j] == pytest.approx(-(e[0] - e[1]) / (2 * h), abs=2e-4)
    assert abs(out.forces[1, 1]) > 0.1  # a component that is not zero by symmetry
    opt = water.copy()
    opt.calc = calc
    BFGS(opt, logfile=None).run(fmax=1e-4)
    # xtb 6 (GFN2-xTB) on water optimised to a gradient norm of 6e-5 Eh/a0 prints
    # ":: total energy -5.070544440612 Eh" (its documented summary block)
    assert label_frame(build_calculator({"kind": "tblite"}), opt).energy == pytest.approx(
        -5.070544440612 * Hartree, abs=2e-5 * Hartree
    )


def test_kill_at_al_label_computes_no_label_twice(tmp_path, counting):
    frames = _cu_frames(5)
    ase.io.write(tmp_path / "todo.extxyz", frames)
    script = textwrap.dedent(
        f"""
        import ase.io
        from equiforce.learning.labelling import label_batch
        frames = ase.io.read({str(tmp_path / "todo.extxyz")!r}, ":")
        label_batch({{"kind": "python", "function": "al_counting:make"}}, frames, {str(tmp_path / "batch")!r})
        """
    )
    env = {**os.environ, "EQUIFORCE_FAULT": "al-label:computed:3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (-9, 137), proc.stderr
    assert "killed at al-label:computed" in proc.stderr
    assert len(read_frames(tmp_path / "batch" / LABELLED)) == 2  # the third was computed, not appended
    labelled, failures = label_batch(
        {"kind": "python", "function": "al_counting:make"}, frames, tmp_path / "batch", workers=1
    )
    calls = counting.read_text().split()
    assert sorted(calls) == sorted(a.info["al_id"] for a in frames)  # each frame computed exactly once
    assert sorted(a.info["al_id"] for a in labelled) == sorted(calls) and failures == []


def test_torn_last_frame_is_dropped_and_cut_off(tmp_path):
    frames = _cu_frames(3)
    label_batch({"kind": "emt"}, frames[:2], tmp_path)
    path = tmp_path / LABELLED
    whole = path.read_text()
    second = whole[whole.index("\n4\n") + 1 :]
    path.write_text(whole + second[: len(second) // 2])  # a kill in the middle of appending a third frame
    assert len(read_frames(path)) == 2
    labelled, _ = label_batch({"kind": "emt"}, frames, tmp_path)
    assert [a.info["al_id"] for a in labelled] == [a.info["al_id"] for a in frames]
    assert len(ase.io.read(path, ":")) == 3  # the file itself parses again


def test_failing_labeller_is_recorded_and_skipped_in_workers(tmp_path, counting, monkeypatch):
    frames = _cu_frames(4)
    monkeypatch.setenv("AL_FAIL", "g001-0001")
    monkeypatch.setenv("AL_NAN", "g001-0002")
    spec = {"kind": "python", "function": "al_counting:make"}
    labelled, failures = label_batch(spec, frames, tmp_path, workers=2)
    assert sorted(a.info["al_id"] for a in labelled) == ["g001-0000", "g001-0003"]
    reasons = {r["al_id"]: r["reason"] for r in failures}
    assert "SCF did not converge" in reasons["g001-0001"] and "not finite" in reasons["g001-0002"]
    assert [json.loads(x)["al_id"] for x in (tmp_path / FAILURES).read_text().splitlines()] == list(reasons)
    again, failures_again = label_batch(spec, frames, tmp_path, workers=2)  # resumed: nothing computed again
    assert len(counting.read_text().split()) == 4 and len(again) == 2 and len(read_failures(tmp_path / FAILURES)) == 2
    assert failures_again == failures


def test_labeller_that_cannot_be_built_or_lacks_an_element():
    with pytest.raises(LabellerError, match="cannot import no_such_module_xyz"):
        build_calculator({"kind": "python", "function": "no_such_module_xyz:make"})
    with pytest.raises(LabellerError, match="module:function"):
        build_calculator({"kind": "python", "function": "no_colon"})
    with pytest.raises(LabellerError, match="not an ASE calculator"):
        build_calculator({"kind": "python", "function": "os:getcwd"})
    with pytest.raises(LabellerError, match=r"does not support element\(s\) \['Fe'\]"):
        check_species({"kind": "emt"}, {"Cu", "Fe"})
