"""Training configuration: defaults, YAML round trip, dotted overrides and strict validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from equiforce.potentials.registry import config_from_dict
from equiforce.training.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    ModelSection,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults_load():
    cfg = load_config()
    assert cfg == TrainConfig(base_dir=".")
    assert cfg.data == DataConfig()
    assert cfg.model == ModelSection()
    assert cfg.loss == LossConfig()
    assert cfg.optim == OptimConfig()
    assert cfg.data.train == "sample:train" and cfg.data.test == "sample:test"
    assert cfg.optim.optimizer == "amsgrad" and cfg.optim.schedule == "plateau"
    assert cfg.model.name == "nequip" and cfg.model.dtype == "float32" and cfg.model.hyperparameters == {}


def test_empty_file_gives_defaults_with_base_dir(tmp_path):
    cfg = load_config(_write(tmp_path / "empty.yaml", ""))
    assert dataclasses.replace(cfg, base_dir=".") == TrainConfig()
    assert Path(cfg.base_dir) == tmp_path.resolve()


# ---------------------------------------------------------------------------------------------- YAML
def test_yaml_round_trip(tmp_path):
    doc = {
        "seed": 7,
        "output_dir": "runs/x",
        "data": {"train": "train.xyz", "valid": "valid.xyz", "test": None, "train_size": 50, "energy_unit": "kcal/mol"},
        "model": {
            "r_max": 4,  # an int where a float is expected is accepted and coerced
            "dtype": "float64",
            "atomic_energies": {1: -13.6, 6: -1029.5, 8: -2041.8},
            "hyperparameters": {"num_interactions": 1, "num_features": 4, "l_max": 1},
        },
        "loss": {"kind": "huber", "huber_delta": 0.05, "forces_weight": 100},
        "optim": {"optimizer": "adamw", "weight_decay": 1e-4, "schedule": "cosine", "ema_decay": None},
        "progress_bar": False,
    }
    path = _write(tmp_path / "cfg.yaml", doc)
    cfg = load_config(path)
    assert cfg.seed == 7
    assert cfg.data.valid == "valid.xyz" and cfg.data.test is None and cfg.data.train_size == 50
    assert cfg.model.r_max == 4.0 and isinstance(cfg.model.r_max, float)
    assert cfg.loss.forces_weight == 100.0 and isinstance(cfg.loss.forces_weight, float)
    assert cfg.model.atomic_energies == {1: -13.6, 6: -1029.5, 8: -2041.8}
    assert cfg.optim.ema_decay is None and cfg.optim.optimizer == "adamw"
    # relative paths resolve against the config file's folder
    assert Path(cfg.base_dir) == tmp_path.resolve()
    assert cfg.resolve_path(cfg.data.train) == tmp_path.resolve() / "train.xyz"
    assert cfg.resolve_path("/abs/file.xyz") == Path("/abs/file.xyz")

    # to_dict -> YAML -> load_config gives the same config back (base_dir included)
    again = load_config(_write(tmp_path / "again.yaml", cfg.to_dict()))
    assert again == cfg


def test_trainer_style_dump_round_trips(tmp_path):
    """The trainer writes ``config.yaml`` via JSON (string keys); it must load back to the same config."""
    from equiforce.training.trainer import _yaml_dump

    cfg = load_config(None, ["optim.max_epochs=3", "model.hyperparameters={num_features: 4}", "seed=3"])
    again = load_config(_write(tmp_path / "config.yaml", _yaml_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("text", ["a: [1, 2", "- 1\n- 2\n", "just a string"])
def test_unreadable_or_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path / "bad.yaml", text))


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------- overrides
def test_dotted_overrides():
    cfg = load_config(
        None,
        [
            "optim.max_epochs=3",
            "model.hyperparameters={num_features: 4}",
            "optim.learning_rate=1",
            "data.test=null",
            "optim.time_budget_minutes=0.5",
            "progress_bar=false",
            "output_dir=some/where",
        ],
    )
    assert cfg.optim.max_epochs == 3 and isinstance(cfg.optim.max_epochs, int)
    assert cfg.model.hyperparameters == {"num_features": 4}
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.data.test is None
    assert cfg.optim.time_budget_minutes == 0.5
    assert cfg.progress_bar is False
    assert cfg.output_dir == "some/where"
    # untouched fields keep their defaults
    assert cfg.optim.batch_size == OptimConfig().batch_size and cfg.model.name == "nequip"


def test_overrides_win_over_file_and_keep_other_file_values(tmp_path):
    path = _write(tmp_path / "c.yaml", {"optim": {"max_epochs": 50, "batch_size": 2}, "model": {"r_max": 4.5}})
    cfg = load_config(path, ["optim.max_epochs=3", "model.hyperparameters.num_features=4"])
    assert cfg.optim.max_epochs == 3 and cfg.optim.batch_size == 2
    assert cfg.model.r_max == 4.5 and cfg.model.hyperparameters == {"num_features": 4}


def test_scientific_notation_is_a_float(tmp_path):
    """PyYAML (YAML 1.1) would read ``1e-6`` as a string; configs are full of such learning rates."""
    path = _write(
        tmp_path / "c.yaml", "optim:\n  learning_rate: 5e-3\n  min_learning_rate: 1e-6\n  weight_decay: 1.5E2\n"
    )
    cfg = load_config(path, ["optim.time_budget_minutes=1e-9", "loss.huber_delta=+2.5e-3"])
    assert cfg.optim.learning_rate == 5e-3 and cfg.optim.min_learning_rate == 1e-6 and cfg.optim.weight_decay == 150.0
    assert cfg.optim.time_budget_minutes == 1e-9 and cfg.loss.huber_delta == 2.5e-3
    # strings that only resemble numbers stay strings
    assert load_config(None, ["output_dir=1e", "data.train=e5"]).output_dir == "1e"


def test_apply_overrides_does_not_mutate_input():
    data = {"optim": {"max_epochs": 5}}
    out = apply_overrides(data, ["optim.max_epochs=7", "seed=2"])
    assert out == {"optim": {"max_epochs": 7}, "seed": 2}
    assert data == {"optim": {"max_epochs": 5}}


@pytest.mark.parametrize("item", ["optim.max_epochs", "seed.sub=1"])
def test_malformed_override(tmp_path, item):
    path = _write(tmp_path / "c.yaml", {"seed": 1})
    with pytest.raises(ConfigError):
        load_config(path, [item])


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("doc", "name"),
    [
        ({"bogus": 1}, "bogus"),
        ({"optim": {"max_epoch": 3}}, "optim.max_epoch"),
        ({"data": {"trian": "x.xyz"}}, "data.trian"),
        ({"model": {"hyper_parameters": {}}}, "model.hyper_parameters"),
        ({"loss": {"energy_weigth": 1.0}}, "loss.energy_weigth"),
    ],
)
def test_unknown_key_names_the_key(tmp_path, doc, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(_write(tmp_path / "c.yaml", doc))


def test_unknown_key_via_override_names_the_key():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["optim.lr=0.1"])


@pytest.mark.parametrize(
    "override",
    [
        "optim.max_epochs=abc",
        "optim.max_epochs=2.5",
        "optim.max_epochs=true",  # a bool is not an int
        "optim.max_epochs=null",
        "optim.learning_rate=fast",
        "progress_bar=1",
        "seed=[1, 2]",
        "data.train=3",
        "model.hyperparameters=4",
        "model.atomic_energies=[1.0, 2.0]",
        "optim=3",
    ],
)
def test_wrong_type(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ("optim.optimizer=sgd", "optim.optimizer"),
        ("optim.schedule=step", "optim.schedule"),
        ("model.dtype=float16", "model.dtype"),
        ("loss.kind=l1", "loss.kind"),
    ],
)
def test_bad_enum(override, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    ["optim.batch_size=0", "optim.max_epochs=-1", "optim.learning_rate=0", "data.valid_fraction=1.5", "model.r_max=0"],
)
def test_inconsistent_values(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_valid_fraction_irrelevant_with_explicit_valid():
    cfg = load_config(None, ["data.valid=valid.xyz", "data.valid_fraction=0"])
    assert cfg.data.valid == "valid.xyz"


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------- model section
def test_unknown_hyperparameter_fails_when_building_the_potential():
    cfg = load_config(None, ["model.hyperparameters={num_features: 4, bogus_width: 3}"])
    assert cfg.model.hyperparameters == {"num_features": 4, "bogus_width": 3}  # loads: free-form section
    with pytest.raises(ValueError, match="bogus_width"):
        config_from_dict({"name": cfg.model.name, **cfg.model.hyperparameters})


def test_unknown_hyperparameter_fails_in_build_potential():
    from equiforce.data.neighbours import build_neighbour_graphs
    from equiforce.data.readers import load_sample
    from equiforce.training.trainer import build_potential

    s = load_sample("test").subset(list(range(3)))
    graphs = build_neighbour_graphs(s, 5.0)
    good = load_config(None, ["model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}"])
    potential, _ = build_potential(good, s, graphs)
    assert potential.species == (1, 6, 8) and potential.model.num_features == 4
    bad = load_config(None, ["model.hyperparameters={num_features: 4, bogus_width: 3}"])
    with pytest.raises(ValueError, match="bogus_width"):
        build_potential(bad, s, graphs)
    with pytest.raises(ValueError, match="unknown model"):
        build_potential(load_config(None, ["model.name=no_such_model"]), s, graphs)
