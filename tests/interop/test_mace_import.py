"""The mace-torch importer without torch: the committed fixture (``fixtures/mace_mp0b3.npz``, written by
``make_mace_fixture.py`` with mace-torch 0.3.16) converted by the torch-free core and checked against
mace-torch's own outputs; the imported model in the calculator, a model file and MD; the core's errors.

The parity across configurations, with torch, is ``test_mace_parity.py`` (``pytest -m torch``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from ase import Atoms

from equiforce.interop.mace import MaceImportError, convert_mace
from equiforce.md import EquiforceCalculator, run_md
from equiforce.potentials import load_model, save_model

FIXTURE = Path(__file__).parent / "fixtures" / "mace_mp0b3.npz"


@pytest.fixture(scope="module")
def fixture():
    data = np.load(FIXTURE)
    state = {k.removeprefix("state/"): data[k] for k in data.files if k.startswith("state/")}
    hyper = json.loads(str(data["hyperparameters"]))
    cases = []
    i = 0
    while f"ref{i}/numbers" in data.files:
        atoms = Atoms(
            numbers=data[f"ref{i}/numbers"],
            positions=data[f"ref{i}/positions"],
            cell=data[f"ref{i}/cell"],
            pbc=data[f"ref{i}/pbc"],
        )
        ref = {key: data[f"ref{i}/{key}"] for key in ("energy", "forces", "stress", "energies")}
        cases.append((atoms, ref))
        i += 1
    return state, hyper, cases


@pytest.fixture(autouse=True)
def _x64():
    jax.config.update("jax_enable_x64", True)


def _evaluate(potential, params, atoms):
    atoms = atoms.copy()
    atoms.calc = EquiforceCalculator.from_potential(potential, params)
    stress = atoms.get_stress() if atoms.pbc.all() else np.zeros(6)
    return atoms.get_potential_energy(), atoms.get_forces(), stress, atoms.get_potential_energies()


def test_fixture_is_the_published_form(fixture):
    _, hyper, cases = fixture
    assert hyper["pair_repulsion"] and hyper["distance_transform"] == "Agnesi"
    assert hyper["interaction_classes"] == ["RealAgnosticResidualInteractionBlock"] * 2
    assert len(cases) == 3 and sum(a.pbc.all() for a, _ in cases) == 2


def test_float64_conversion_equals_mace_torch(fixture):
    state, hyper, cases = fixture
    potential, params = convert_mace(state, hyper)
    assert potential.model.name == "mace_compat" and potential.model.pair_repulsion
    for atoms, ref in cases:
        energy, forces, stress, energies = _evaluate(potential, params, atoms)
        assert np.abs(ref["forces"]).max() > 1e-2
        assert abs(energy - ref["energy"]) / len(atoms) < 1e-8
        np.testing.assert_allclose(forces, ref["forces"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(stress, ref["stress"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(energies, ref["energies"], rtol=0, atol=1e-8)


def test_float32_conversion_is_within_float32(fixture):
    state, hyper, cases = fixture
    potential, params = convert_mace(state, hyper, dtype="float32")
    assert potential.dtype == "float32"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    for atoms, ref in cases:
        _, forces, _, energies = _evaluate(potential, params, atoms)
        assert np.abs(forces - ref["forces"]).max() <= 5e-5 * np.abs(ref["forces"]).max()
        assert np.abs(energies - ref["energies"]).max() <= 5e-5 * np.abs(ref["energies"]).max()


def test_imported_model_file_loads_and_runs_md(fixture, tmp_path):
    state, hyper, cases = fixture
    potential, params = convert_mace(state, hyper)
    path = save_model(tmp_path / "mp0b3.eqf", potential, params, {"source": {"format": "mace-torch"}})
    loaded, loaded_params, header = load_model(path)
    assert loaded == potential and header["metadata"]["source"]["format"] == "mace-torch"
    atoms, ref = cases[2]  # the triclinic H/C/O cell
    energy, *_ = _evaluate(loaded, loaded_params, atoms)
    assert abs(energy - ref["energy"]) < 1e-8
    big = atoms.repeat((4, 4, 4))  # cell heights above 2 r_max for jax-md's minimum image
    result = run_md(path, big, ensemble="nve", temperature_K=30.0, steps=40, report_interval=20, progress=False)
    assert result.steps == 40 and np.isfinite(result.frames[-1].conserved)
    # the MD engine's own path (jax-md neighbour list) gives mace-torch's energy of the 64 copies
    assert result.frames[0].potential_energy == pytest.approx(64 * ref["energy"], rel=1e-10)


def test_species_order_of_the_model_is_mapped(fixture):
    state, hyper, cases = fixture
    reordered = dict(hyper, atomic_numbers=[8, 1, 6])
    order = [2, 0, 1]  # one-hot index of O, H, C in the original table
    perm_state = dict(state)
    for key, value in state.items():
        if key.endswith(".weights_max") or ".weights." in key:
            perm_state[key] = value[order]
    perm_state["atomic_energies_fn.atomic_energies"] = state["atomic_energies_fn.atomic_energies"][..., order]
    emb = state["node_embedding.linear.weight"].reshape(3, -1)
    perm_state["node_embedding.linear.weight"] = emb[order].reshape(-1)
    for key in [k for k in state if k.endswith("skip_tp.weight")]:
        c = 8
        w = state[key]
        start, out = 0, []
        per = w.size // (c * 3 * c)
        for _ in range(per):
            block = w[start : start + c * 3 * c].reshape(c, 3, c)
            out.append(block[:, order, :].reshape(-1))
            start += c * 3 * c
        perm_state[key] = np.concatenate(out)
    a, pa = convert_mace(state, hyper)
    b, pb = convert_mace(perm_state, reordered)
    assert a.species == b.species == (1, 6, 8)
    atoms, _ = cases[0]
    np.testing.assert_allclose(_evaluate(a, pa, atoms)[0], _evaluate(b, pb, atoms)[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_class": "AtomicDipolesMACE"}, "AtomicDipolesMACE"),
        ({"gate": "tanh"}, "activation 'tanh'"),
        ({"radial_type": "gaussian"}, "radial basis 'gaussian'"),
        ({"distance_transform": "Soft"}, "distance transform 'Soft'"),
        ({"unsupported": {"use_agnostic_product": True}}, "use_agnostic_product"),
        ({"interaction_classes": ["RealAgnosticAttResidualInteractionBlock"] * 2}, "RealAgnosticAttResidual"),
        ({"readout_classes": ["LinearReadoutBlock", "NonLinearBiasReadoutBlock"]}, "readout blocks"),
        ({"hidden_irreps": "8x0e+4x1o"}, "hidden_irreps"),
        ({"num_interactions": 3}, "readout blocks"),
    ],
)
def test_unsupported_parts_are_named(fixture, change, message):
    state, hyper, _ = fixture
    with pytest.raises(MaceImportError, match=message):
        convert_mace(state, {**hyper, **change})


def test_bad_state_dicts_and_heads(fixture):
    state, hyper, _ = fixture
    with pytest.raises(MaceImportError, match="head 'r2scan' is not"):
        convert_mace(state, hyper, head="r2scan")
    missing = {k: v for k, v in state.items() if not k.startswith("products.1.linear")}
    with pytest.raises(MaceImportError, match=r"products\.1\.linear\.weight"):
        convert_mace(missing, hyper)
    cut = dict(state, **{"interactions.0.linear_up.weight": state["interactions.0.linear_up.weight"][:-1]})
    with pytest.raises(MaceImportError, match=r"interactions\.0\.linear_up"):
        convert_mace(cut, hyper)
    with pytest.raises(MaceImportError, match="hyperparameters"):
        convert_mace(state, {k: v for k, v in hyper.items() if k != "max_ell"})
    with pytest.raises(MaceImportError, match="dtype"):
        convert_mace(state, hyper, dtype="float16")


def test_reading_a_torch_file_without_torch_says_what_to_install(monkeypatch, tmp_path):
    from equiforce.cli import main
    from equiforce.interop.mace_torch import read_mace_model

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "mace", None)
    with pytest.raises(ImportError, match=r"equiforce\[mace-import\]"):
        read_mace_model(tmp_path / "model.model")
    assert main(["import", "mace", str(tmp_path / "model.model"), str(tmp_path / "out.eqf")]) == 2


def _zip(path, names):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(name, b"\x80\x02}q\x00.")
    return path


def test_torchscript_model_is_named_before_torch_is_needed(monkeypatch, tmp_path, capsys):
    """A TorchScript archive (the layout torch.jit.save writes: constants.pkl and code/ under one folder) is
    refused with what it is and what to give instead, with torch absent; a torch.save archive (data.pkl,
    data/, byteorder, no constants.pkl) is not mistaken for one and gets the missing-torch error."""
    from equiforce.cli import main
    from equiforce.interop.mace_torch import is_torchscript, read_mace_model

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "mace", None)
    compiled = _zip(
        tmp_path / "MACE_compiled.model",
        [
            "MACE_compiled/data.pkl",
            "MACE_compiled/code/__torch__/mace/modules/models.py",
            "MACE_compiled/constants.pkl",
            "MACE_compiled/version",
            "MACE_compiled/extra/config.json",
        ],
    )
    saved = _zip(
        tmp_path / "MACE.model",
        ["MACE/data.pkl", "MACE/data/0", "MACE/byteorder", "MACE/version", "MACE/.data/serialization_id"],
    )
    assert is_torchscript(compiled) and not is_torchscript(saved) and not is_torchscript(FIXTURE)
    with pytest.raises(MaceImportError, match=r"TorchScript-compiled.*give the uncompiled model file"):
        read_mace_model(compiled)
    with pytest.raises(ImportError, match=r"equiforce\[mace-import\]"):
        read_mace_model(saved)
    capsys.readouterr()
    assert main(["import", "mace", str(compiled), str(tmp_path / "out.eqf")]) == 2
    err = capsys.readouterr().err
    assert "equiforce import: error:" in err and "TorchScript" in err and "uncompiled" in err
    assert not (tmp_path / "out.eqf").exists()


X64_OFF = """
import json, sys, warnings
import numpy as np
import jax
assert not jax.config.jax_enable_x64
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from ase import Atoms
    from equiforce.interop.mace import convert_mace
    from equiforce.md import EquiforceCalculator
    data = np.load(sys.argv[1])
    state = {k.removeprefix("state/"): data[k] for k in data.files if k.startswith("state/")}
    potential, params = convert_mace(state, json.loads(str(data["hyperparameters"])), dtype="float32")
    atoms = Atoms(numbers=data["ref2/numbers"], positions=data["ref2/positions"], cell=data["ref2/cell"], pbc=True)
    atoms.calc = EquiforceCalculator.from_potential(potential, params)
    forces = atoms.get_forces()
print(json.dumps({
    "x64": bool(jax.config.jax_enable_x64),
    "df": float(np.abs(forces - data["ref2/forces"]).max() / np.abs(data["ref2/forces"]).max()),
    "warnings": [str(w.message) for w in caught if "float64" in str(w.message)],
}))
"""


def test_float32_import_with_x64_off():
    """The float32 user's path: a fresh process that never turns 64-bit types on."""
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run(
        [sys.executable, "-c", X64_OFF, str(FIXTURE)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["x64"] is False and result["warnings"] == []
    assert result["df"] < 5e-5
