"""`equiforce benchmark materials`: the split, the run, and the table's numbers against independent ones.

The dataset is generated here: strained and rattled fcc Cu cells labelled by ASE's EMT and written in
DeePMD's npy layout with the virial W = −σ·V (DeePMD's sign), so the test also goes through the DeePMD
reader. A tiny NequIP preset and one epoch keep it to seconds; the real runs on LiPS20 and water are in
BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from equiforce.benchmark import PRESETS
from equiforce.benchmark.materials import MaterialsSettings, prepare_dataset, run_materials_benchmark
from equiforce.benchmark.presets import Preset
from equiforce.cli import main
from equiforce.data.errors import DataError
from equiforce.data.hdf5 import read_hdf5
from equiforce.md.calculator import EquiforceCalculator

TINY = Preset(
    "nequip",
    "cpu",
    dict(num_interactions=1, l_max=1, num_features=4, parity=False, num_bessel=4, radial_mlp_hidden=8),
    learning_rate=0.01,
    r_max=3.0,
)
N_FRAMES = 20


def _emt_frames(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms, 7.22 Å > 2 r_max
        strain = np.eye(3) + 0.01 * rng.normal(size=(3, 3))
        atoms.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
        atoms.positions += 0.05 * rng.normal(size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


def _write_deepmd(folder: Path, frames: list, *, forces: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "type.raw").write_text(" ".join("0" for _ in frames[0]))
    (folder / "type_map.raw").write_text("Cu")
    s = folder / "set.000"
    s.mkdir()
    np.save(s / "box.npy", np.stack([a.cell[:].reshape(9) for a in frames]))
    np.save(s / "coord.npy", np.stack([a.positions.reshape(-1) for a in frames]))
    np.save(s / "energy.npy", np.array([a.get_potential_energy() for a in frames]))
    if forces:
        np.save(s / "force.npy", np.stack([a.get_forces().reshape(-1) for a in frames]))
    virial = [-a.get_stress(voigt=False) * a.get_volume() for a in frames]  # DeePMD: W = −σ V
    np.save(s / "virial.npy", np.stack([w.reshape(9) for w in virial]))


@pytest.fixture(scope="module")
def cu_data(tmp_path_factory) -> tuple[Path, list]:
    frames = _emt_frames(N_FRAMES)
    folder = tmp_path_factory.mktemp("cu") / "cu_emt"
    _write_deepmd(folder, frames)
    return folder, frames


@pytest.fixture()
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, ("nequip", "cpu"), TINY)


def _settings(tmp_path: Path, data: Path, **kw) -> MaterialsSettings:
    defaults = dict(
        datasets=(str(data),),
        models=("nequip",),
        budget_minutes=5.0,
        out_dir=str(tmp_path / "bench"),
        max_epochs=1,
        test_fraction=0.25,
        nve_supercell=(2, 1, 1),
        md_check_steps=40,
        progress_bar=False,
    )
    defaults.update(kw)
    return MaterialsSettings(**defaults)


def test_split_is_seeded_disjoint_and_complete(tmp_path, cu_data):
    folder, frames = cu_data
    settings = _settings(tmp_path, folder)
    train_path, test_path, info = prepare_dataset(settings, 0, log=lambda _: None)
    train, test = read_hdf5(train_path), read_hdf5(test_path)
    assert (len(train), len(test)) == (15, 5) and info["formulas"] == ["Cu32"] and info["atoms_per_frame"] == [32]
    assert info["n_test_with_stress"] == 5
    # every frame lands in exactly one set: match by energy (distinct for rattled frames)
    energies = np.array([a.get_potential_energy() for a in frames])
    got = np.sort(np.concatenate([train.energy, test.energy]))
    np.testing.assert_allclose(got, np.sort(energies), rtol=0, atol=1e-12)
    # the stored stress is EMT's, in ASE's sign, recovered from DeePMD's virial
    k = int(np.argmin(np.abs(energies - test.energy[0])))
    np.testing.assert_allclose(test.stress[0], frames[k].get_stress(), rtol=0, atol=1e-12)
    # seeded: the same split again, another seed another one
    again = prepare_dataset(_settings(tmp_path / "again", folder), 0, log=lambda _: None)
    np.testing.assert_array_equal(read_hdf5(again[1]).energy, test.energy)
    other = prepare_dataset(_settings(tmp_path / "other", folder, seed=1), 0, log=lambda _: None)
    assert not np.array_equal(np.sort(read_hdf5(other[1]).energy), np.sort(test.energy))


def test_run_table_matches_an_independent_evaluation(tmp_path, cu_data, tiny_preset):
    folder, frames = cu_data
    settings = _settings(tmp_path, folder)
    lines: list[str] = []
    (result,) = run_materials_benchmark(settings, log=lines.append)
    assert result.n_test == 5 and result.n_train + result.n_valid == 15 and result.n_test_with_stress == 5
    # the NVE check ran on the requested 2x1x1 supercell of the 32-atom cell
    assert result.nve_supercell == [2, 1, 1] and result.nve_atoms == 64
    assert result.nve_status in ("passed", "failed")  # it ran; 1 epoch need not conserve energy
    # the table's errors equal an independent evaluation through the ASE calculator against EMT's labels
    test = read_hdf5(Path(settings.out_dir) / "data" / "cu_emt_test.h5")
    calc = EquiforceCalculator(result.model_path)
    de, df, ds = [], [], []
    for k in range(len(test)):
        atoms = test.to_atoms(k)
        ref = next(f for f in frames if abs(f.get_potential_energy() - test.energy[k]) < 1e-12)
        atoms.calc = calc
        de.append((atoms.get_potential_energy() - ref.get_potential_energy()) / len(atoms))
        df.append(atoms.get_forces() - ref.get_forces())
        ds.append(atoms.get_stress() - ref.get_stress())
    assert result.energy_per_atom_mae_meV == pytest.approx(1e3 * np.mean(np.abs(de)), rel=1e-4, abs=1e-6)
    assert result.forces_mae_meV_per_A == pytest.approx(1e3 * np.mean(np.abs(np.concatenate(df))), rel=1e-4)
    assert result.stress_mae_meV_per_A3 == pytest.approx(1e3 * np.mean(np.abs(ds)), rel=1e-4)
    # the Markdown table carries the numbers; a second run reuses the finished one
    table = (Path(settings.out_dir) / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| cu_emt"))
    assert f"{result.stress_mae_meV_per_A3:.2f}" in row and "| 64 |" in row
    assert json.loads((Path(settings.out_dir) / "results.json").read_text())["results"][0]["nve_atoms"] == 64
    lines.clear()
    run_materials_benchmark(settings, log=lines.append)
    assert any("reusing the finished run" in line for line in lines)


def test_bad_datasets(tmp_path, cu_data):
    folder, frames = cu_data
    no_forces = tmp_path / "no_forces"
    _write_deepmd(no_forces, frames[:6], forces=False)
    with pytest.raises(DataError, match="energy and forces"):
        prepare_dataset(_settings(tmp_path, no_forces), 0, log=lambda _: None)
    few = tmp_path / "few"
    _write_deepmd(few, frames[:4])
    with pytest.raises(DataError, match="too few"):
        prepare_dataset(_settings(tmp_path, few), 0, log=lambda _: None)
    with pytest.raises(ValueError, match="test_fraction"):
        _settings(tmp_path, folder, test_fraction=1.0)
    with pytest.raises(ValueError, match="names must differ"):
        _settings(tmp_path, folder, datasets=(str(folder), str(folder)))
    # the command line: a clear error, no traceback
    assert main(["benchmark", "materials", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
