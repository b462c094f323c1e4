"""Training configuration: frozen dataclasses loaded from YAML, with dotted command-line overrides.

Every key is documented in the README ("Configuration reference"). Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "MDCheckConfig",
    "ModelSection",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
]


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type, or an inconsistent setting in a training config."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data come from. Paths are relative to the config file's folder.

    ``train`` may be ``"sample:train"`` / ``"sample:test"`` for the shipped rMD17 aspirin split 01.
    """

    train: str = "sample:train"
    valid: str | None = None
    valid_fraction: float = 0.05
    test: str | None = "sample:test"
    format: str | None = None
    energy_unit: str = "eV"
    train_size: int | None = None
    test_size: int | None = None
    split_seed: int = 1


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The potential: model family, its hyperparameters and the physics around it."""

    name: str = "nequip"
    r_max: float = 5.0
    dtype: str = "float32"
    atomic_energies: str | dict[int, float] = "fit"
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss = energy_weight·L(ΔE/N) + forces_weight·L(ΔF) + stress_weight·L(Δσ), L = MSE or Huber."""

    energy_weight: float = 1.0
    forces_weight: float = 10.0
    stress_weight: float = 0.0
    kind: str = "mse"
    huber_delta: float = 0.01


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, EMA and stopping."""

    optimizer: str = "amsgrad"
    learning_rate: float = 0.005
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 10.0
    warmup_epochs: float = 1.0
    schedule: str = "plateau"
    plateau_patience: int = 5
    plateau_factor: float = 0.8
    min_learning_rate: float = 1e-6
    ema_decay: float | None = 0.99
    batch_size: int = 5
    max_epochs: int = 100
    time_budget_minutes: float | None = None
    early_stopping_patience: int | None = 30


@dataclasses.dataclass(frozen=True)
class MDCheckConfig:
    """The energy-conservation gate run after training: NVE from a validation structure.

    ``steps: 0`` switches it off. The drift (meV/atom/ps) and fluctuation (meV/atom) of the total energy
    go into the final report and the model file's metadata next to the MAE.
    """

    steps: int = 2000
    timestep_fs: float = 0.5
    temperature_K: float = 300.0
    report_interval: int = 50


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training run."""

    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    md_check: MDCheckConfig = dataclasses.field(default_factory=MDCheckConfig)
    progress_bar: bool = True
    base_dir: str = "."

    def __post_init__(self) -> None:
        o = self.optim
        if o.optimizer not in ("adam", "amsgrad", "adamw"):
            raise ConfigError(f"optim.optimizer must be adam, amsgrad or adamw, got {o.optimizer!r}")
        if o.schedule not in ("plateau", "cosine", "constant"):
            raise ConfigError(f"optim.schedule must be plateau, cosine or constant, got {o.schedule!r}")
        if self.loss.kind not in ("mse", "huber"):
            raise ConfigError(f"loss.kind must be mse or huber, got {self.loss.kind!r}")
        if self.model.dtype not in ("float32", "float64"):
            raise ConfigError(f"model.dtype must be float32 or float64, got {self.model.dtype!r}")
        if o.batch_size < 1 or o.max_epochs < 0 or o.learning_rate <= 0:
            raise ConfigError("optim.batch_size >= 1, optim.max_epochs >= 0 and optim.learning_rate > 0 required")
        if not 0.0 < self.data.valid_fraction < 1.0 and self.data.valid is None:
            raise ConfigError("data.valid_fraction must lie in (0, 1) when data.valid is not given")
        if self.model.r_max <= 0:
            raise ConfigError("model.r_max must be positive")

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_check(cls: type, name: str, value: Any, where: str) -> Any:
    """Coerce ints to floats where floats are expected; reject obviously wrong types."""
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} may not be null")
    for a in args:
        base = typing.get_origin(a) or a
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is dict and isinstance(value, dict):
            return value
    raise ConfigError(f"{where} = {value!r} has the wrong type (expected {hint})")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        sub = f.type if isinstance(f.type, type) else typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        else:
            kwargs[name] = _type_check(cls, name, value, f"{where}{name}")
    return cls(**kwargs)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads ``1e-3`` and ``5.0e3`` as strings; read them as floats (YAML 1.2)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def _parse_value(text: str) -> Any:
    return _yaml_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested config dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
      ConfigError: unreadable YAML, unknown keys, wrong types, inconsistent settings.
    """
    data: dict[str, Any] = {}
    base = "."
    if path is not None:
        path = Path(path)
        try:
            loaded = _yaml_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        base = str(path.resolve().parent)
    data = apply_overrides(data, overrides or [])
    data.setdefault("base_dir", base)
    try:
        return _build(TrainConfig, data, "")
    except TypeError as err:
        raise ConfigError(str(err)) from err
