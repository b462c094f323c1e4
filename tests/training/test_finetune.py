"""Fine-tuning (``model.init_from``): weight transfer with new species, config resolution, freezing, replay,
E0s and lineage. The learning benefit (fine-tuned beats from-scratch on a new molecule) is in
``test_finetune_beats_scratch`` (slow) and ``benchmarks/finetune.py``."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from equiforce.data.errors import DataError
from equiforce.data.readers import load_sample
from equiforce.potentials import MODELS, load_model
from equiforce.potentials.potential import Potential
from equiforce.training import finetune, trainer
from equiforce.training.config import ConfigError, load_config
from equiforce.training.evaluate import predict
from equiforce.training.finetune import freeze_labels, transfer_params
from equiforce.training.trainer import train
from tests.potentials.property_suite import MODEL_TEST_CASES, molecule, structure

TINY = "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}"


def _potential(name: str, species: tuple[int, ...]) -> Potential:
    return Potential(
        MODEL_TEST_CASES[name].config,
        species=species,
        r_max=3.0,
        atomic_energies=tuple(-float(z) for z in species),
        scale=1.3,
        avg_num_neighbours=4.0,
        dtype="float64",
    )


@pytest.mark.parametrize(
    "name",  # the MACE forms in the default run, every other model in the slow target (10-20 s each)
    [m if m in ("mace", "mace_compat") else pytest.param(m, marks=pytest.mark.slow) for m in sorted(MODELS)],
)
def test_adding_a_species_keeps_the_function_on_the_old_ones(name):
    """With O added to an H/C model, H/C structures get exactly the source's energies and forces; only
    per-species tables grew, and an O-containing structure is now computable."""
    jax.config.update("jax_enable_x64", True)
    source = _potential(name, (1, 6))
    target = _potential(name, (1, 6, 8))
    src_params = source.init(jax.random.PRNGKey(1))
    params, extended = transfer_params(source, src_params, target, target.init(jax.random.PRNGKey(2)))
    assert extended  # at least the species embedding
    hc = molecule(seed=3)
    hc = structure(np.where(hc.atomic_numbers == 8, 6, hc.atomic_numbers), hc.positions)
    a = predict(source, src_params, hc)
    b = predict(target, params, hc)
    np.testing.assert_allclose(b.energy, a.energy, rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.forces, a.forces, rtol=0, atol=1e-10)
    out = predict(target, params, molecule(seed=3))  # with O
    assert np.all(np.isfinite(out.forces))


def test_transfer_refuses_a_different_architecture():
    jax.config.update("jax_enable_x64", True)
    source = _potential("schnet", (1, 6))
    other = _potential("painn", (1, 6))
    with pytest.raises(ConfigError, match="not the same architecture"):
        transfer_params(source, source.init(jax.random.PRNGKey(0)), other, other.init(jax.random.PRNGKey(0)))


def test_freeze_labels_match_paths():
    params = {"params": {"interaction_0": {"w": np.zeros(2)}, "readout": {"w": np.zeros(2)}}}
    labels = freeze_labels(params, ["interaction_0/"])
    assert labels == {"params": {"interaction_0": {"w": "frozen"}, "readout": {"w": "trainable"}}}


# ---------------------------------------------------------------------------------------------- config
@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    """A tiny float64 MACE trained 2 epochs on 20 aspirin frames: (its file, the training result)."""
    jax.config.update("jax_enable_x64", True)
    out = tmp_path_factory.mktemp("source")
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            "progress_bar=false",
            "model.name=mace",
            "model.r_max=4.0",
            "model.dtype=float64",
            TINY,
            "model.uncertainty=false",
            "data.train_size=20",
            "data.valid_fraction=0.01",
            "data.test_size=10",
            "optim.batch_size=5",
            "optim.max_epochs=2",
            "md_check.steps=0",
        ],
    )
    result = train(cfg, log=lambda _: None)
    return result.model_path, result


def test_init_from_takes_the_source_architecture(source_file, tmp_path):
    path, _ = source_file
    cfg = load_config(None, [f"model.init_from={path}", f"output_dir={tmp_path}"])
    assert cfg.model.name == "mace" and cfg.model.r_max == 4.0
    assert cfg.model.hyperparameters["num_features"] == 4
    assert cfg.model.dtype == "float64"
    for bad, match in [
        ("model.r_max=5.0", "cutoff"),
        ("model.name=nequip", "source is a 'mace' model"),
        ("model.hyperparameters={num_features: 8}", "num_features"),
        ("model.ensemble_size=2", "member"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"model.init_from={path}", bad])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, [f"model.init_from={tmp_path / 'missing.eqf'}"])
    with pytest.raises(ConfigError, match=r"finetune\.freeze set, but fine-tuning needs model\.init_from"):
        load_config(None, ["finetune.freeze=[interaction_0]"])
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, [f"model.init_from={path}", "finetune.replay_fraction=0.5"])


def test_finetuning_freezes_replays_and_records_lineage(source_file, tmp_path, monkeypatch):
    """Frozen weights stay the source's bit for bit, the others move; replayed structures join the training
    set; E0s are refitted; the lineage names the source by its sha256. The source is read once, before the
    training data."""
    path, _ = source_file
    events: list[str] = []
    real_source, real_data = finetune.load_source, trainer.load_training_data
    monkeypatch.setattr(finetune, "load_source", lambda *a: events.append("source") or real_source(*a))
    monkeypatch.setattr(trainer, "load_training_data", lambda *a: events.append("data") or real_data(*a))
    freeze = "params/interaction_0/"
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "progress_bar=false",
            f"model.init_from={path}",
            "model.uncertainty=false",
            "data.train=sample:test",
            "data.train_size=10",
            "data.valid_fraction=0.2",
            "data.test=null",
            "optim.batch_size=5",
            "optim.max_epochs=1",
            "md_check.steps=0",
            f"finetune.freeze=[{freeze}]",
            "finetune.replay_data=sample:train",
            "finetune.replay_fraction=0.5",
        ],
    )
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    assert events == ["source", "data"]
    _, src_params, _ = load_model(path)
    moved = frozen = 0
    flat_src = dict(jax.tree_util.tree_flatten_with_path(src_params)[0])
    for key, value in jax.tree_util.tree_flatten_with_path(result.params)[0]:
        name = jax.tree_util.keystr(key)
        if "interaction_0" in name:
            np.testing.assert_array_equal(value, flat_src[key], err_msg=name)
            frozen += 1
        elif not np.array_equal(value, flat_src[key]):
            moved += 1
    assert frozen > 0 and moved > 0
    meta = result.metadata
    assert meta["n_train"] == 10 + 5  # 10 new structures + 50 % replayed
    lineage = meta["lineage"]
    assert lineage[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lineage[0]["model"] == "mace"
    assert any("fine-tuning" in line for line in lines)


def test_an_unreadable_source_is_refused_before_the_data_are_read(source_file, tmp_path, monkeypatch):
    """A source that went bad between load_config and train: a ConfigError naming it, and no data read."""
    copy = tmp_path / "source.eqf"
    copy.write_bytes(source_file[0].read_bytes())
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.init_from={copy}", "progress_bar=false"])
    copy.write_bytes(copy.read_bytes()[:100])  # truncated

    def no_data(*_args):
        raise AssertionError("the training data were read before the source was checked")

    monkeypatch.setattr(trainer, "load_training_data", no_data)
    with pytest.raises(ConfigError, match=r"model\.init_from: cannot load .*source\.eqf"):
        train(cfg, log=lambda _: None)


def test_new_species_and_e0_fit(source_file, tmp_path):
    """Fine-tuning data with an element the source lacks: the species list grows, E0s are fitted for all,
    the run trains, and the model still evaluates the source's kind of structure."""
    path, _ = source_file
    jax.config.update("jax_enable_x64", True)
    asp = load_sample("test")
    frames = []
    for k in range(12):
        a = asp.to_atoms(k)
        z = a.get_atomic_numbers()
        z[np.flatnonzero(z == 8)[0]] = 7  # one O → N: a species the source never saw
        a.set_atomic_numbers(z)
        frames.append(a)
    import ase.io

    ase.io.write(tmp_path / "n.extxyz", frames, format="extxyz")
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "progress_bar=false",
            f"model.init_from={path}",
            "model.uncertainty=false",
            f"data.train={tmp_path / 'n.extxyz'}",
            "data.valid_fraction=0.2",
            "data.test=null",
            "optim.batch_size=5",
            "optim.max_epochs=1",
            "md_check.steps=0",
        ],
    )
    result = train(cfg, log=lambda _: None)
    assert result.potential.species == (1, 6, 7, 8)
    assert np.all(np.isfinite(result.potential.atomic_energies))
    pot, params, _ = load_model(result.model_path)
    out = predict(pot, params, asp.subset([0]))  # N-free aspirin
    assert np.all(np.isfinite(out.forces))


def test_species_that_cannot_be_added_are_refused():
    """A weight whose shape is not a per-species table of the source: a clear error naming it."""
    jax.config.update("jax_enable_x64", True)
    source = _potential("schnet", (1, 6))
    params = source.init(jax.random.PRNGKey(0))
    target = _potential("schnet", (1, 6, 8))
    bad = jax.tree.map(lambda x: x, params)
    leaf_path = next(p for p, v in jax.tree_util.tree_flatten_with_path(bad)[0] if np.ndim(v) == 2)
    flat, treedef = jax.tree_util.tree_flatten_with_path(bad)
    leaves = [np.zeros((v.shape[0] + 5, v.shape[1])) if p == leaf_path else v for p, v in flat]
    bad = jax.tree_util.tree_unflatten(treedef, leaves)
    with pytest.raises(DataError, match="cannot add species"):
        transfer_params(source, bad, target, target.init(jax.random.PRNGKey(0)))


@pytest.mark.slow
def test_finetune_beats_scratch(tmp_path):
    """Pre-trained on aspirin, fine-tuned on 50 salicylic-acid frames: lower test force MAE than the same
    network trained from scratch on those 50 frames with the same budget (figures: benchmarks/finetune.py)."""
    from equiforce.benchmark.finetune import compare_finetune_with_scratch

    r = compare_finetune_with_scratch(
        tmp_path,
        hyperparameters={"num_interactions": 2, "num_features": 8, "l_max": 1, "correlation": 2},
        pretrain_frames=200,
        pretrain_epochs=15,
        frames=50,
        epochs=15,
        test_frames=100,
    )
    assert r.finetune_forces_mae < r.scratch_forces_mae, r
