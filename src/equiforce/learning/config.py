"""The active-learning configuration: a YAML file read into frozen dataclasses, every value checked.

Paths are relative to the config file's folder. Units: σ thresholds eV/Å (the largest per-atom force
uncertainty σ_F of a frame), temperatures K, pressures GPa, times fs / ps.

Example (``examples/active_learning_cu.yaml``)::

    output_dir: runs/al_cu
    start: {model: null, data: cu_300K.extxyz, structures: null}
    seeds: cu_seeds.extxyz
    test: cu_test.extxyz
    labeller: {kind: emt, workers: 2}
    md:
      conditions: [{temperature_K: 600}, {temperature_K: 1200}]
      timestep_fs: 2.0
      target_ps: 2.0
      report_interval: 10
    selection: {lower: 0.05, upper: 0.25, batch_size: 8}
    budget: {max_labels: 64, max_generations: 8}
    training:
      mode: finetune
      config: {model: {name: schnet, r_max: 3.0}, optim: {max_epochs: 30}}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from equiforce.learning.labellers import KINDS, TBLITE_METHODS
from equiforce.training.config import ConfigError, load_yaml, num_field

__all__ = [
    "BudgetConfig",
    "Condition",
    "ConfigError",
    "LabellerConfig",
    "LearnConfig",
    "MDSection",
    "SelectionConfig",
    "StartConfig",
    "TrainingSection",
    "config_from_dict",
    "load_learn_config",
]

#: ensembles a condition may use (NPT only for periodic seeds)
ENSEMBLES = ("nvt_langevin", "nvt_nose_hoover", "nve", "npt_nose_hoover")
MODES = ("finetune", "scratch")


@dataclasses.dataclass(frozen=True)
class StartConfig:
    """Where the loop starts (at least one of the three).

    Attributes:
      model: a model file with an uncertainty (committee or LLPR): the loop's first model.
      data: labelled frames (any readable file): trained on first when ``model`` is not given, and always part
        of the training data of every generation (replay).
      structures: unlabelled structures: labelled first (not counted in ``budget.max_labels``), then as
        ``data``.
    """

    model: str | None = None
    data: str | None = None
    structures: str | None = None


@dataclasses.dataclass(frozen=True)
class LabellerConfig:
    """The reference method (see :mod:`equiforce.learning.labellers`).

    Attributes:
      kind: ``emt``, ``tblite`` or ``python``.
      method: for ``tblite``: ``GFN2-xTB`` (default) or ``GFN1-xTB``.
      function: for ``python``: ``module:function`` returning an ASE calculator.
      options: keyword arguments of the calculator (or of ``function``).
      workers: labelling processes (1: in the loop's own process).
    """

    kind: str = "emt"
    method: str | None = None
    function: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    workers: int = num_field(1, ">= 1")

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "function": self.function, "options": dict(self.options)}


@dataclasses.dataclass(frozen=True)
class Condition:
    """One MD condition: each seed structure runs as one replica under it.

    Attributes:
      temperature_K: thermostat target and initial temperature, K.
      ensemble: ``nvt_langevin``, ``nvt_nose_hoover``, ``nve`` or ``npt_nose_hoover`` (periodic seeds).
      pressure_GPa: NPT target pressure, GPa (``npt_nose_hoover`` only).
    """

    temperature_K: float = num_field(300.0, "> 0")
    ensemble: str = "nvt_langevin"
    pressure_GPa: float | None = None

    @property
    def name(self) -> str:
        p = "" if self.pressure_GPa is None else f"_{self.pressure_GPa:g}GPa"
        return f"{self.ensemble}_{self.temperature_K:g}K{p}"


@dataclasses.dataclass(frozen=True)
class MDSection:
    """The MD of each generation.

    Attributes:
      conditions: the conditions (at least one).
      timestep_fs: time step, fs.
      target_ps: MD time each replica must run below ``selection.upper`` for the loop to stop, ps; each
        generation runs every replica up to this long.
      report_interval: steps between trajectory frames (each frame is a candidate), and per jitted chunk.
      friction_per_ps: Langevin friction, 1/ps.
      precision: ``float32``, ``float64``, ``mixed`` or null (the model's).
    """

    conditions: tuple[Condition, ...] = (Condition(),)
    timestep_fs: float = num_field(1.0, "> 0")
    target_ps: float = num_field(1.0, "> 0")
    report_interval: int = num_field(20, ">= 1")
    friction_per_ps: float = num_field(1.0, "> 0")
    precision: str | None = None

    @property
    def steps(self) -> int:
        return max(self.report_interval, round(self.target_ps * 1000.0 / self.timestep_fs))


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Candidates and the batch.

    Attributes:
      lower: a frame whose largest per-atom σ_F exceeds this is a candidate, eV/Å.
      upper: a replica whose σ_F exceeds this stops (inside the compiled MD), eV/Å; next generation it
        restarts from its last frame below ``lower``.
      batch_size: labels per generation.
      candidates: the most uncertain ``candidates x batch_size`` candidates enter the diversity pick
        (:func:`equiforce.uncertainty.select.select_structures`).
    """

    lower: float = num_field(0.05, "> 0")
    upper: float = num_field(0.3, "> 0")
    batch_size: int = num_field(8, ">= 1")
    candidates: float = num_field(5.0, ">= 1")


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """When the loop stops (besides every condition reaching ``md.target_ps`` below ``selection.upper``).

    Attributes:
      max_labels: labeller calls of the loop (failed ones count; ``start.structures`` do not).
      max_generations: generations (each: MD, select, label, train).
    """

    max_labels: int = num_field(100, ">= 1")
    max_generations: int = num_field(10, ">= 1")


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    """Training of each generation (through :func:`equiforce.training.train`).

    Attributes:
      mode: ``finetune`` (``model.init_from`` the current model, trained on all data so far) or ``scratch``.
      recalibrate: refit σ's calibration on the frames the loop labelled so far
        (:func:`equiforce.uncertainty.calibration.recalibrate`).
      config: a training config mapping (``model``, ``loss``, ``optim``, ...; see the configuration
        reference); the loop sets ``output_dir``, ``data.train``, ``data.test`` and ``model.init_from``, and
        ``md_check.steps: 0`` unless ``md_check`` is given.
    """

    mode: str = "finetune"
    recalibrate: bool = True
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LearnConfig:
    """The whole active-learning run: the top level of a ``equiforce learn`` YAML file.

    Attributes:
      output_dir: the run's folder (state, generations, reports), relative to the config file.
      seed: seeds the MD (replica ``r`` of generation ``g`` gets ``seed + 1000 g + r``).
      start: see :class:`StartConfig`.
      seeds: structures MD starts from (every frame of the file, one replica per frame and condition); null:
        the first frame of ``start.structures`` or ``start.data``.
      test: labelled held-out frames: each generation's model is evaluated on them.
      labeller: the reference method (see :class:`LabellerConfig`).
      md: the MD of each generation (see :class:`MDSection`).
      selection: σ thresholds and the batch (see :class:`SelectionConfig`).
      budget: labels and generations (see :class:`BudgetConfig`).
      training: training and recalibration (see :class:`TrainingSection`).
      base_dir: folder relative paths are resolved against (the config file's).
    """

    output_dir: str = "runs/active_learning"
    seed: int = num_field(0, ">= 0")
    start: StartConfig = dataclasses.field(default_factory=StartConfig)
    seeds: str | None = None
    test: str | None = None
    labeller: LabellerConfig = dataclasses.field(default_factory=LabellerConfig)
    md: MDSection = dataclasses.field(default_factory=MDSection)
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    base_dir: str = "."

    def __post_init__(self) -> None:
        s = self.start
        if s.model is None and s.data is None and s.structures is None:
            raise ConfigError(
                "start needs a model, labelled data or unlabelled structures (start.model/data/structures)"
            )
        sel, b = self.selection, self.budget
        if sel.lower >= sel.upper:
            raise ConfigError(
                f"selection.lower ({sel.lower} eV/Å) must be below selection.upper ({sel.upper} eV/Å): frames between "
                "the two are the candidates"
            )
        if b.max_labels < sel.batch_size:
            raise ConfigError(
                f"budget.max_labels = {b.max_labels} is smaller than one batch (selection.batch_size = "
                f"{sel.batch_size})"
            )
        lab = self.labeller
        if lab.kind not in KINDS:
            raise ConfigError(f"labeller.kind must be one of {KINDS}, got {lab.kind!r}")
        if lab.kind == "tblite" and lab.method is not None and lab.method not in TBLITE_METHODS:
            raise ConfigError(f"labeller.method must be one of {TBLITE_METHODS}, got {lab.method!r}")
        if lab.kind == "python" and not lab.function:
            raise ConfigError("labeller.kind python needs labeller.function: module:function")
        if not self.md.conditions:
            raise ConfigError("md.conditions needs at least one condition")
        for k, c in enumerate(self.md.conditions):
            if c.ensemble not in ENSEMBLES:
                raise ConfigError(f"md.conditions[{k}].ensemble must be one of {ENSEMBLES}, got {c.ensemble!r}")
            if (c.pressure_GPa is not None) != (c.ensemble == "npt_nose_hoover"):
                raise ConfigError(f"md.conditions[{k}]: pressure_GPa goes with (and only with) npt_nose_hoover")
        if self.md.precision not in (None, "float32", "float64", "mixed"):
            raise ConfigError(f"md.precision must be float32, float64, mixed or null, got {self.md.precision!r}")
        if self.training.mode not in MODES:
            raise ConfigError(f"training.mode must be one of {MODES}, got {self.training.mode!r}")
        tc = self.training.config
        bad = (["output_dir"] if "output_dir" in tc else []) + [
            f"data.{k}" for k in ("train", "valid", "test") if k in dict(tc.get("data") or {})
        ]
        if "init_from" in dict(tc.get("model") or {}):
            bad.append("model.init_from")
        if bad:
            raise ConfigError(
                f"training.config may not set {', '.join(bad)}: the loop sets them (its data and the model it "
                "fine-tunes)"
            )

    def resolve(self, path: str | None) -> Path | None:
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(cls: type, name: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} may not be null")
    for a in args:
        base = typing.get_origin(a) or a
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{where} = {value!r} is not a finite number")
            value = float(value)
            break
        if base in (int, bool, str, dict) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
            break
    else:
        raise ConfigError(f"{where} = {value!r} has the wrong type (expected {hint})")
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    allowed = field.metadata.get("range")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where} must be {allowed}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; valid: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        elif name == "conditions":
            if not isinstance(value, list):
                raise ConfigError(f"{where}conditions must be a list of mappings")
            kwargs[name] = tuple(_build(Condition, c, f"{where}conditions[{k}].") for k, c in enumerate(value))
        else:
            kwargs[name] = _check(cls, name, value, f"{where}{name}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> LearnConfig:
    """A :class:`LearnConfig` from a mapping (the YAML file's content).

    Raises:
      ConfigError: unknown keys, wrong types, values outside their ranges, inconsistent settings.
    """
    data = dict(data)
    data.setdefault("base_dir", base_dir)
    return _build(LearnConfig, data, "")


def load_learn_config(path: str | Path) -> LearnConfig:
    """Read an active-learning YAML config.

    Raises:
      ConfigError: an unreadable file, or a bad config (the message names the file and the key).
    """
    path = Path(path)
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    try:
        return config_from_dict(loaded or {}, str(path.resolve().parent))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
