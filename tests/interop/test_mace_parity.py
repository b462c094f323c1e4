"""mace-torch parity: models built and evaluated by mace-torch, imported, evaluated by equiforce.

Needs torch and mace-torch (``pip install -e '.[mace-import]'``, CPU torch first); marked ``torch``, which the
default run deselects and ``.ci/run``'s second target runs. Every configuration of
:data:`tests.interop.mace_reference.CONFIGURATIONS` (published models' hyperparameters at 8 channels) on a
molecule and two periodic cells with self-images: energy per atom to 1e-8 eV, forces to 1e-7 eV/Å, stress to
1e-8 eV/Å³ and per-atom energies to 1e-8 eV in float64; float32 imports of float32 models to
:data:`FLOAT32_RELATIVE` of each quantity's magnitude.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mace")

import jax
import torch

from equiforce.cli import main
from equiforce.interop.mace import MaceImportError
from equiforce.interop.mace_torch import import_mace, read_mace_model
from equiforce.md import EquiforceCalculator
from equiforce.potentials import load_model
from tests.interop.mace_reference import CONFIGURATIONS, build_mace, reference, structures

# torch, e3nn and mace-torch warn about TorchScript and torch.load internals that do not concern these tests
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::UserWarning")]

#: float32 model in mace-torch against its float32 import: the largest error of the per-atom energies, forces and
#: stress relative to the largest magnitude of each (float32 resolves 6e-8; both codes round differently through
#: a few hundred operations per output)
FLOAT32_RELATIVE = 5e-5


@pytest.fixture(autouse=True)
def _x64():
    jax.config.update("jax_enable_x64", True)


def _ours(path, atoms):
    calc = EquiforceCalculator(path)
    atoms = atoms.copy()
    atoms.calc = calc
    return {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress() if atoms.pbc.all() else np.zeros(6),
        "energies": atoms.get_potential_energies(),
    }


def _compare_relative(ref, got, rel):
    for key in ("forces", "stress", "energies"):
        scale = np.abs(ref[key]).max()
        assert np.abs(got[key] - ref[key]).max() <= rel * scale + 1e-12, key
    assert abs(got["energy"] - ref["energy"]) <= rel * np.abs(ref["energies"]).sum()


def _compare(ref, got, n_atoms, tol):
    e_tol, f_tol, s_tol = tol
    assert abs(ref["energy"] - got["energy"]) / n_atoms < e_tol
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=f_tol)
    np.testing.assert_allclose(got["stress"], ref["stress"], rtol=0, atol=s_tol)
    np.testing.assert_allclose(got["energies"], ref["energies"], rtol=0, atol=e_tol)


@pytest.mark.parametrize("name", sorted(CONFIGURATIONS))
def test_float64_parity(name, tmp_path):
    model = build_mace(name)
    torch.save(model, tmp_path / "m.model")
    heads = list(model.heads)
    for head in heads if len(heads) > 1 else [None]:
        out = tmp_path / f"{head}.eqf"
        import_mace(tmp_path / "m.model", out, head=head)
        for atoms in structures():
            ref = reference(tmp_path / "m.model", atoms, head=head)
            got = _ours(out, atoms)
            assert np.abs(ref["forces"]).max() > 1e-2  # a non-trivial surface
            _compare(ref, got, len(atoms), (1e-8, 1e-7, 1e-8))


@pytest.mark.parametrize("name", ["mp0", "mp0b3"])
def test_float32_parity(name, tmp_path):
    model = build_mace(name, dtype=torch.float32)
    torch.save(model, tmp_path / "m.model")
    out = tmp_path / "m32.eqf"
    import_mace(tmp_path / "m.model", out, dtype="float32")
    assert load_model(out)[0].dtype == "float32"
    for atoms in structures():
        ref = reference(tmp_path / "m.model", atoms, dtype="float32")
        _compare_relative(ref, _ours(out, atoms), FLOAT32_RELATIVE)


def test_cli_import_records_the_source(tmp_path, capsys):
    model = build_mace("mp0")
    torch.save(model, tmp_path / "mp0.model")
    rc = main(["import", "mace", str(tmp_path / "mp0.model"), str(tmp_path / "mp0.eqf")])
    assert rc == 0
    assert "imported mp0.model" in capsys.readouterr().out
    potential, _, header = load_model(tmp_path / "mp0.eqf")
    source = header["metadata"]["source"]
    assert source["sha256"] == hashlib.sha256((tmp_path / "mp0.model").read_bytes()).hexdigest()
    assert source["mace_torch_version"] == "0.3.16"
    assert source["hyperparameters"]["hidden_irreps"] == "8x0e+8x1o"
    assert header["metadata"]["lineage"][0]["kind"] == "import"
    assert potential.model.name == "mace_compat" and potential.species == (1, 6, 8)


def test_not_a_mace_model_is_refused(tmp_path):
    (tmp_path / "junk.model").write_bytes(b"not a torch file at all")
    with pytest.raises(MaceImportError, match="not a mace-torch model file"):
        read_mace_model(tmp_path / "junk.model")
    torch.save(build_mace("mp0").state_dict(), tmp_path / "state.pt")
    with pytest.raises(MaceImportError, match="dictionary"):
        read_mace_model(tmp_path / "state.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.model")
    with pytest.raises(MaceImportError, match="not a mace-torch MACE"):
        read_mace_model(tmp_path / "linear.model")
    with pytest.raises(FileNotFoundError):
        read_mace_model(tmp_path / "missing.model")
    assert main(["import", "mace", str(tmp_path / "junk.model"), str(tmp_path / "x.eqf")]) == 2
    assert not (tmp_path / "x.eqf").exists()


def test_torchscript_file_is_named(tmp_path, capsys):
    """What torch.jit.save writes (mace-torch's *_compiled.model) is refused with what it is, not torch.load's
    dispatch to torch.jit.load; torch.save's file of the same model imports."""
    from equiforce.interop.mace_torch import is_torchscript

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "linear_compiled.model")
    torch.save(build_mace("mp0"), tmp_path / "mp0.model")
    assert is_torchscript(tmp_path / "linear_compiled.model") and not is_torchscript(tmp_path / "mp0.model")
    with pytest.raises(MaceImportError, match="TorchScript-compiled"):
        read_mace_model(tmp_path / "linear_compiled.model")
    capsys.readouterr()
    assert main(["import", "mace", str(tmp_path / "linear_compiled.model"), str(tmp_path / "x.eqf")]) == 2
    assert "uncompiled" in capsys.readouterr().err


def test_unsupported_architecture_names_the_part(tmp_path):
    model = build_mace("mp0")
    model.use_agnostic_product = True
    torch.save(model, tmp_path / "agnostic.model")
    with pytest.raises(MaceImportError, match="use_agnostic_product"):
        import_mace(tmp_path / "agnostic.model", tmp_path / "a.eqf")
    model = build_mace("mp0")
    model.readouts[-1].non_linearity.acts[0].f = torch.tanh
    torch.save(model, tmp_path / "tanh.model")
    with pytest.raises(MaceImportError, match="activation 'tanh'"):
        import_mace(tmp_path / "tanh.model", tmp_path / "t.eqf")
    multi = build_mace("multihead")
    torch.save(multi, tmp_path / "multi.model")
    with pytest.raises(MaceImportError, match="several heads"):
        import_mace(tmp_path / "multi.model", tmp_path / "m.eqf")
    assert not any(tmp_path.glob("*.eqf"))


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"equiforce\[mace-import\]"):
        read_mace_model(tmp_path / "any.model")
