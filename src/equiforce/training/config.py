"""Training configuration: frozen dataclasses loaded from YAML, with dotted command-line overrides.

Every key is documented in the README ("Configuration reference"). Unknown keys are errors.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LossConfig",
    "MDCheckConfig",
    "ModelSection",
    "OptimConfig",
    "ParallelConfig",
    "Range",
    "TrainConfig",
    "apply_overrides",
    "field_range",
    "load_config",
]


class ConfigError(ValueError):
    """An unknown key, a value of the wrong type, or an inconsistent setting in a training config."""


#: the seeds' range: NumPy's seeds must be >= 0, JAX's ``PRNGKey`` takes at most a signed 64-bit integer
SEED_RANGE = "in [0, 2^63 - 1]"


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric config key: an interval, open or closed at either end.

    Declared once per key in the field's metadata (``metadata["range"]``), enforced by :class:`TrainConfig`
    and listed in the generated configuration reference. ``text`` is how messages and the reference show it:
    ``>= 0``, ``> 0``, ``in (0, 1)``, ``in [0, 10]``.
    """

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> Range:
        """``">= a"``, ``"> a"`` or ``"in [a, b]"`` / ``"in (a, b)"`` / ``"in [a, b)"`` / ``"in (a, b]"``; a bound
        may be ``2^k - 1``."""

        def number(token: str) -> float:
            m = re.fullmatch(r"2\^(\d+) - 1", token.strip())
            return 2 ** int(m.group(1)) - 1 if m else float(token)

        m = re.fullmatch(r"(>=|>) (\S+)", text)
        if m:
            return cls(number(m.group(2)), math.inf, m.group(1) == ">", True, text)
        m = re.fullmatch(r"in ([\[(])([^,]+), ([^\])]+)([\])])", text)
        if not m:
            raise ValueError(f"not a range: {text!r}")
        return cls(number(m.group(2)), number(m.group(3)), m.group(1) == "(", m.group(4) == ")", text)

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return self.text


def num_field(default: Any, allowed: str, *, unless: str | None = None) -> Any:
    """A numeric field with its allowed range (see :class:`Range`); ``unless``: another field of the section
    that, when not None, makes this one irrelevant (the range is then not enforced)."""
    return dataclasses.field(default=default, metadata={"range": Range.parse(allowed), "unless": unless})


def field_range(cls: type, name: str) -> tuple[Range, str | None] | None:
    """The declared range of field ``name`` of a config dataclass and its ``unless`` field, or None when the
    field has no declared range (not numeric)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    r = f.metadata.get("range")
    return None if r is None else (r, f.metadata.get("unless"))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data come from. Paths are relative to the config file's folder.

    Attributes:
      train: training data: any file or folder :func:`~equiforce.data.readers.read_structures` reads (npz,
        extxyz, ASE db, HDF5, a DeePMD folder), or ``"sample:train"`` / ``"sample:test"`` for the shipped
        rMD17 aspirin split 01 (``"sample:salicylic:train"`` / ``"sample:salicylic:test"``: salicylic acid).
      valid: validation data; ``None``: a seeded random ``valid_fraction`` of ``train``.
      valid_fraction: share of ``train`` held out for validation when ``valid`` is not given, in (0, 1).
      test: test data, evaluated once after training; ``None``: no test.
      format: reader format for every file (``None``: detected from the name and content; an ASE format
        name is passed to ``ase.io.read``).
      energy_unit: unit of the files' energies (a key of :data:`equiforce.data.readers.ENERGY_UNITS`:
        ``eV``, ``meV``, ``kcal/mol``, ``kJ/mol``, ``Hartree``, ``Ry``);
        forces and stress follow it. Converted to eV on reading.
      train_size: keep only the first this many training structures after the validation split
        (``None``: all).
      test_size: evaluate only the first this many test structures (``None``: all).
      split_seed: seed of the validation split.
      streaming: read the training set batch by batch from ``train``, a native HDF5 file (``equiforce
        preprocess`` writes one, with neighbour graphs), in a background thread, instead of loading it: memory
        stays flat however large the file. The batches, and so the loss curve, are those of the in-memory
        path (the default, ``false``); the validation and test sets are still loaded into memory (give a
        moderate ``valid`` file or ``valid_fraction`` for a very large ``train``).
      prefetch_batches: with ``streaming``, how many batches the reading thread keeps ready.
      statistics_size: with ``streaming``, the E0 fit, the force RMS and the post-training steps that need
        training data (E0 re-fit, LLPR uncertainty) use a seeded random sample of this many training
        structures (all of them when there are fewer), held in memory.
    """

    train: str = "sample:train"
    valid: str | None = None
    valid_fraction: float = num_field(0.05, "in (0, 1)", unless="valid")
    test: str | None = "sample:test"
    format: str | None = None
    energy_unit: str = "eV"
    train_size: int | None = num_field(None, ">= 1")
    test_size: int | None = num_field(None, ">= 1")
    split_seed: int = num_field(1, SEED_RANGE)
    streaming: bool = False
    prefetch_batches: int = num_field(8, ">= 1")
    statistics_size: int = num_field(10000, ">= 1")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The potential: model family, its hyperparameters and the physics around it.

    Attributes:
      name: registered model: ``mace``, ``nequip``, ``allegro``, ``painn`` or ``schnet``.
      r_max: cutoff radius, Å.
      dtype: parameter and compute precision, ``float32`` or ``float64`` (float64 switches JAX's x64 on).
      atomic_energies: ``"fit"`` or given E0s ``{Z: eV}`` (see below).
      hyperparameters: the model's own settings (see the model hyperparameter tables); unknown keys are an
        error.
      refit_atomic_energies: re-fit E0s after training (see below); the model file's metadata
        (``atomic_energies``) records per element whether its E0 was fitted or given, re-fitted, and the
        values before and after.
      ensemble_size: committee size K >= 1 (see below).
      bootstrap: train each committee member on its own bootstrap resample (see below).
      uncertainty: calibrate and store an uncertainty after training (see below).
      init_from: fine-tune from this model file (see below); ``None``: train from scratch.

    ``atomic_energies``: ``"fit"`` (least squares on the training set) or given E0s ``{Z: eV}`` (e.g. the
    isolated-atom energies of the reference method); given E0s are kept, and the potential's per-atom shift
    starts at the training set's mean per-atom energy after them (as mace-torch's ``ScaleShiftMACE``), so the
    network does not have to learn the cohesive energy (fitted E0s carry it themselves, shift 0).
    ``refit_atomic_energies``: after training, fold the network's remaining per-composition energy offset
    into the E0s? ``None`` (default): only fitted E0s are re-fitted, given ones are kept as they are;
    ``True``: re-fit whatever their source (the change is logged); ``False``: never.
    ``ensemble_size``: K >= 1 committee members trained together in one program (parameters stacked and
    vmapped, independent initialisations: member k's key is ``fold_in(PRNGKey(seed), k)``, member 0's is
    ``PRNGKey(seed)``; one shared data order). ``bootstrap``: each member trains on its own bootstrap resample
    of the training set (bagging; applied as per-structure weights on the shared batches, see
    :mod:`equiforce.training.bootstrap`); needs ``ensemble_size > 1``. ``uncertainty``: after training,
    calibrate the uncertainty on the validation set and store it in the model file: the committee's spread
    (K > 1) or the single network's last-layer prediction rigidity (LLPR, fitted on the training set; see
    :mod:`equiforce.potentials.uncertainty`). ``init_from``: fine-tune: start from this model file's weights
    (its architecture, cutoff and committee size are taken over; see :mod:`equiforce.training.finetune`).
    """

    name: str = "nequip"
    r_max: float = num_field(5.0, "> 0")
    dtype: str = "float32"
    atomic_energies: str | dict[int, float] = "fit"
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    refit_atomic_energies: bool | None = None
    ensemble_size: int = num_field(1, ">= 1")
    bootstrap: bool = False
    uncertainty: bool = True
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss = energy_weight·L(ΔE/N) + forces_weight·L(ΔF) + stress_weight·L(Δσ), L = MSE or Huber.

    Attributes:
      energy_weight: weight of the energy-per-atom term (ΔE/N in eV).
      forces_weight: weight of the force term (eV/Å, per component).
      stress_weight: weight of the stress term (eV/Å³, per Voigt component; structures without a stress
        label are masked out). 0: no stress term. Stress is small in these units (1 GPa = 6.24e-3 eV/Å³), so
        the term is invisible at weights near 1: a stress error δσ costs as much as a force error
        δF = δσ·√(stress_weight / forces_weight). 1e4 (with forces_weight 10) makes a 0.1 GPa stress error
        weigh like a 20 meV/Å force error, 1e5 like 62 meV/Å: start at 1e4.
      kind: ``mse`` or ``huber``.
      huber_delta: the Huber loss's switch-over point, in the unit of each term.
    """

    energy_weight: float = num_field(1.0, ">= 0")
    forces_weight: float = num_field(10.0, ">= 0")
    stress_weight: float = num_field(0.0, ">= 0")
    kind: str = "mse"
    huber_delta: float = num_field(0.01, "> 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule, EMA and stopping (optax).

    Attributes:
      optimizer: ``amsgrad``, ``adam`` or ``adamw`` (Adam with ``weight_decay``).
      learning_rate: peak learning rate.
      weight_decay: decoupled weight decay added to the update (0: none).
      clip_grad_norm: clip the global gradient norm to this (``None``: no clipping).
      warmup_epochs: linear warm-up from 0 to ``learning_rate``, in epochs.
      schedule: ``plateau`` (multiply by ``plateau_factor`` after ``plateau_patience`` epochs without a
        relative validation improvement of 1e-4), ``cosine`` (decay to ``min_learning_rate`` over
        ``max_epochs``) or ``constant``.
      plateau_patience: epochs without improvement before the plateau schedule lowers the rate.
      plateau_factor: the plateau schedule's factor, in (0, 1).
      min_learning_rate: floor of the plateau and cosine schedules.
      ema_decay: decay of the exponential moving average of the weights used for validation and the saved
        model (``None``: no EMA).
      batch_size: structures per step (per committee, all members see the same batch).
      max_epochs: upper bound on epochs.
      time_budget_minutes: stop after this much wall-clock time, compilation included (``None``: no limit).
      early_stopping_patience: stop after this many epochs without a validation improvement (``None``: never).
    """

    optimizer: str = "amsgrad"
    learning_rate: float = num_field(0.005, "> 0")
    weight_decay: float = num_field(0.0, ">= 0")
    clip_grad_norm: float | None = num_field(10.0, "> 0")
    warmup_epochs: float = num_field(1.0, ">= 0")
    schedule: str = "plateau"
    plateau_patience: int = num_field(5, ">= 0")
    plateau_factor: float = num_field(0.8, "in (0, 1)")
    min_learning_rate: float = num_field(1e-6, ">= 0")
    ema_decay: float | None = num_field(0.99, "in [0, 1)")
    batch_size: int = num_field(5, ">= 1")
    max_epochs: int = num_field(100, ">= 1")
    time_budget_minutes: float | None = num_field(None, "> 0")
    early_stopping_patience: int | None = num_field(30, ">= 1")


@dataclasses.dataclass(frozen=True)
class MDCheckConfig:
    """The energy-conservation gate run after training: NVE from a validation structure.

    Attributes:
      steps: NVE steps (0: no check).
      timestep_fs: time step, fs.
      temperature_K: initial Maxwell–Boltzmann temperature, K.
      report_interval: steps between energy samples (and per jitted chunk).
      max_drift_meV_per_atom_per_ps: the gate's threshold on |drift| (slope of a linear fit of the total
        energy). Why 1: sound models drift <= 0.01 meV/atom/ps; 1 meV/atom/ps heats an NVE run by about 8 K
        per ps, while the slope noise of the default 1 ps check is about 0.5 x the fluctuation per ps.
      on_failure: ``warn`` or ``fail`` (see below); either way the model file is saved first and the
        verdict (``nve_check.status``: passed / failed / blew_up / error) is in its metadata.
      supercell: minimal repetitions of a periodic start cell (see below).
      max_minutes: wall-clock limit of the check, minutes, compilation included (see below); ``None``: a quarter
        of ``optim.time_budget_minutes`` (at least 1 minute) when training has a time budget, else no limit.

    ``steps: 0`` switches it off. The drift (meV/atom/ps) and fluctuation (meV/atom) of the total energy
    go into the final report and the model file's metadata next to the MAE.

    The gate passes when ``|drift| <= max_drift_meV_per_atom_per_ps``; a blow-up, an unmeasurable drift or a
    check that could not run is a failure too. ``on_failure``: ``warn`` (log a warning, record the verdict)
    or ``fail`` (the same, then :func:`~equiforce.training.train` raises
    :class:`~equiforce.training.finish.MDCheckFailedError` after the model is saved: ``equiforce train``
    exits non-zero).

    ``supercell``: repeat a periodic start structure at least ``(n1, n2, n3)`` times along its lattice
    vectors (the cutoff may need more, see :func:`~equiforce.training.nve_check.supercell_for_cutoff`);
    ``None``: only what the cutoff needs. Ignored for molecules.

    ``max_minutes`` keeps the check proportionate to the run: after its first chunks it logs the expected time
    (extrapolated from a timed chunk) and then its progress, and it stops at the chunk where the limit would be
    passed (at least two chunks run). The verdict then rests on fewer steps: ``nve_check`` records the steps and
    picoseconds run, the steps asked for, and the limit.
    """

    steps: int = num_field(2000, ">= 0")
    timestep_fs: float = num_field(0.5, "> 0")
    temperature_K: float = num_field(300.0, ">= 0")
    report_interval: int = num_field(50, ">= 1")
    max_drift_meV_per_atom_per_ps: float = num_field(1.0, "> 0")
    on_failure: str = "warn"
    supercell: tuple[int, ...] | None = num_field(None, ">= 1")
    max_minutes: float | None = num_field(None, "> 0")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning options, used with ``model.init_from`` (see :mod:`equiforce.training.finetune`).

    Attributes:
      freeze: regular expressions on parameter paths (see below); empty: everything trains alike.
      frozen_learning_rate: learning rate of the matched parameters (0: frozen).
      frozen_warmup_epochs: linear warm-up of the matched parameters' rate, epochs.
      replay_data: the source's training data, mixed in to limit forgetting (``None``: no replay).
      replay_format: reader format of ``replay_data`` (``None``: detected).
      replay_fraction: replayed structures as a multiple of the training-set size, in [0, 10].

    ``freeze``: regular expressions on parameter paths (e.g. ``params/interaction_0/``); the matching
    parameters train with ``frozen_learning_rate`` (0: not at all) after ``frozen_warmup_epochs`` of linear
    warm-up, the others with ``optim.learning_rate``. ``replay_data``: a file of the source's training data
    (any readable format); ``replay_fraction`` x the training-set size of its structures (seeded random
    draw) join the training set, to limit forgetting.
    """

    freeze: tuple[str, ...] = ()
    frozen_learning_rate: float = num_field(0.0, ">= 0")
    frozen_warmup_epochs: float = num_field(0.0, ">= 0")
    replay_data: str | None = None
    replay_format: str | None = None
    replay_fraction: float = num_field(0.0, "in [0, 10]")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Data-parallel training over the devices of one host (see :mod:`equiforce.training.parallel`) and over
    several processes on one or more hosts (see :mod:`equiforce.training.distributed`).

    Attributes:
      devices: this process's devices: ``"all"``, a device count N (the first N devices), or ``None``: all
        devices on a GPU/TPU machine or in a run over several processes, one on CPU. Each global batch of
        ``optim.batch_size`` structures is split over the devices of every process; the loss and gradients are
        those of the whole batch, so results do not depend on the device or process count.
      coordinator_address: ``host:port`` of process 0's coordination service (``jax.distributed``), the same
        for every process; ``None``: the environment variable ``EQUIFORCE_COORDINATOR_ADDRESS`` (or JAX's
        ``JAX_COORDINATOR_ADDRESS``), else found by ``cluster_detection``.
      num_processes: the number of processes P of the run; ``None``: ``EQUIFORCE_NUM_PROCESSES``, else
        found by ``cluster_detection``, else 1; 1: a single process (``jax.distributed`` is not started).
      process_id: this process's index, 0 to P - 1 (process 0 hosts the coordinator and alone writes logs,
        checkpoints and model files); ``None``: ``EQUIFORCE_PROCESS_ID``, else found by ``cluster_detection``.
      cluster_detection: where the three settings above come from when they are not given: ``auto`` (a SLURM
        step started by ``srun`` or an Open MPI 4 ``mpirun`` job with more than one task, as JAX detects
        them), ``slurm``, ``ompi`` (only that one; an error if absent) or ``off``.
      initialization_timeout: seconds to wait for the coordinator and for every process to join, at the
        start; an unreachable coordinator is then an error, and JAX ends process 0 when not all joined.
      heartbeat_timeout: seconds without a heartbeat after which JAX's coordination service declares a
        process dead and stops all the others.
      shutdown_timeout: seconds a finishing process waits at JAX's shutdown barrier for the others.
    """

    devices: int | str | None = num_field(None, ">= 1")
    coordinator_address: str | None = None
    num_processes: int | None = num_field(None, ">= 1")
    process_id: int | None = num_field(None, ">= 0")
    cluster_detection: str = "auto"
    initialization_timeout: int = num_field(300, ">= 1")
    heartbeat_timeout: int = num_field(100, ">= 1")
    shutdown_timeout: int = num_field(300, ">= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training run: the top level of a training YAML file.

    Attributes:
      seed: initialisation and data-order seed.
      output_dir: where the model file, metrics, checkpoints and plots go (relative to the config file).
      data: see :class:`DataConfig`.
      model: see :class:`ModelSection`.
      loss: see :class:`LossConfig`.
      optim: see :class:`OptimConfig`.
      md_check: see :class:`MDCheckConfig`.
      finetune: see :class:`FinetuneConfig`.
      parallel: see :class:`ParallelConfig`.
      progress_bar: show a tqdm progress bar per epoch.
      base_dir: folder that relative paths are resolved against (set by :func:`load_config` to the config
        file's folder).
    """

    seed: int = num_field(0, SEED_RANGE)
    output_dir: str = "runs/default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    md_check: MDCheckConfig = dataclasses.field(default_factory=MDCheckConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    progress_bar: bool = True
    base_dir: str = "."

    def __post_init__(self) -> None:
        _check_finite_fields(self, "")
        _check_ranges(self, "")
        o = self.optim
        if o.optimizer not in ("adam", "amsgrad", "adamw"):
            raise ConfigError(f"optim.optimizer must be adam, amsgrad or adamw, got {o.optimizer!r}")
        if o.schedule not in ("plateau", "cosine", "constant"):
            raise ConfigError(f"optim.schedule must be plateau, cosine or constant, got {o.schedule!r}")
        if self.loss.kind not in ("mse", "huber"):
            raise ConfigError(f"loss.kind must be mse or huber, got {self.loss.kind!r}")
        if self.model.dtype not in ("float32", "float64"):
            raise ConfigError(f"model.dtype must be float32 or float64, got {self.model.dtype!r}")
        self._check_finetune()
        if self.model.bootstrap and self.model.ensemble_size < 2:
            raise ConfigError("model.bootstrap resamples the training set per committee member: set ensemble_size >= 2")
        self._check_md_check()
        self._check_parallel()

    def _check_finetune(self) -> None:
        f = self.finetune
        defaults = FinetuneConfig()
        used = [
            f"finetune.{k.name}"
            for k in dataclasses.fields(f)
            if k.name in ("freeze", "replay_data", "replay_fraction")
            and getattr(f, k.name) != getattr(defaults, k.name)
        ]
        if used and self.model.init_from is None:
            raise ConfigError(
                f"{', '.join(used)} set, but fine-tuning needs model.init_from (the model file to start from)"
            )
        if (f.replay_fraction > 0) != (f.replay_data is not None):
            raise ConfigError("finetune.replay_data and finetune.replay_fraction > 0 go together")

    def _check_md_check(self) -> None:
        c = self.md_check
        if c.on_failure not in ("warn", "fail"):
            raise ConfigError(f"md_check.on_failure must be warn or fail, got {c.on_failure!r}")
        if 0 < c.steps <= c.report_interval:
            raise ConfigError(
                f"md_check.steps = {c.steps} gives a single energy sample every {c.report_interval} steps: the drift "
                "needs at least two (steps > md_check.report_interval), or steps: 0 to switch the check off"
            )
        if c.supercell is not None and len(c.supercell) != 3:
            raise ConfigError(f"md_check.supercell must be three integers >= 1, got {list(c.supercell)}")

    def _check_parallel(self) -> None:
        p = self.parallel
        d = p.devices
        if isinstance(d, str) and d != "all":
            raise ConfigError(f"parallel.devices must be 'all', null or a device count >= 1, got {d!r}")
        if p.process_id is not None and p.num_processes is not None and p.process_id >= p.num_processes:
            raise ConfigError(
                f"parallel.process_id = {p.process_id} is out of range for parallel.num_processes = "
                f"{p.num_processes} (0 to {p.num_processes - 1})"
            )
        if p.coordinator_address is not None:
            check_coordinator_address(p.coordinator_address, "parallel.coordinator_address")
        if p.cluster_detection not in CLUSTER_DETECTION:
            raise ConfigError(
                f"parallel.cluster_detection must be one of {', '.join(CLUSTER_DETECTION)}, got {p.cluster_detection!r}"
            )

    def resolve_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: values of ``parallel.cluster_detection``
CLUSTER_DETECTION = ("auto", "slurm", "ompi", "off")


def check_coordinator_address(address: str, where: str) -> tuple[str, int]:
    """Split a coordinator address ``host:port`` (IPv6 hosts in brackets: ``[::1]:1234``) into host and port.

    Args:
      address: the address.
      where: the setting it came from, for the error message.

    Raises:
      ConfigError: no host, no port, or a port outside 1-65535.
    """
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where} must look like host:port (port 1-65535), e.g. node001:12345; got {address!r}")
    return host, int(port)


def _check_finite_fields(obj: Any, where: str) -> None:
    """Every float field of a config dataclass (recursively) must be finite: NaN and inf are never a
    meaningful learning rate, cutoff, weight or time (use null where a setting can be switched off)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite_fields(value, f"{where}{f.name}.")
        else:
            _check_finite_values(value, f"{where}{f.name}")


def _check_ranges(obj: Any, where: str) -> None:
    """Every numeric field of a config dataclass (recursively) must lie in its declared :class:`Range`
    (None, the off switch of optional settings, and non-numeric values of mixed fields are not numbers)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{where}{f.name}.")
            continue
        allowed, unless = f.metadata.get("range"), f.metadata.get("unless")
        if allowed is None or (unless is not None and getattr(obj, unless) is not None):
            continue
        entries = value if isinstance(value, tuple) else (value,)
        for v in entries:
            if isinstance(v, int | float) and not isinstance(v, bool) and v not in allowed:
                when = f" when {where}{unless} is not given" if unless else ""
                if isinstance(value, tuple):
                    raise ConfigError(f"{where}{f.name}: every entry must be {allowed}{when}, got {list(value)}")
                raise ConfigError(f"{where}{f.name} must be {allowed}{when}, got {value!r}")


def _check_finite_values(value: Any, where: str, _seen: set[int] | None = None) -> None:
    """Raise :class:`ConfigError` if a float inside ``value`` (nested dicts/lists included) is NaN or inf.

    Containers shared through YAML aliases (even recursive ones) are visited once.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r} is not a finite number")
    if not isinstance(value, dict | list | tuple):
        return
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return
    seen.add(id(value))
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        _check_finite_values(v, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]", seen)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a key or value of a ``dict[K, V]`` field fits ``K``/``V`` (an int key may be written as a
    string of digits: JSON, which the trainer's config dump goes through, only has string keys)."""
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        if isinstance(value, str):
            return bool(re.fullmatch(r"[+-]?[0-9]+", value.strip()))
        return isinstance(value, int) and not isinstance(value, bool)
    base = typing.get_origin(hint) or hint
    return isinstance(value, base) if isinstance(base, type) else True


def _type_check(cls: type, name: str, value: Any, where: str) -> Any:
    """Coerce ints to floats where floats are expected; reject wrong types and non-finite numbers."""
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} may not be null")
    _check_finite_values(value, where)
    for a in args:
        base = typing.get_origin(a) or a
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{where} = {value} is too large for a float") from None
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is tuple and isinstance(value, list | tuple):  # tuple[str, ...] fields: a YAML list
            item = (typing.get_args(a) or (Any,))[0]
            for i, v in enumerate(value):
                if not _fits(v, item):
                    raise ConfigError(f"{where}[{i}] = {v!r} has the wrong type (expected {hint})")
            return tuple(value)
        if base is dict and isinstance(value, dict):
            key_hint, value_hint = typing.get_args(a) or (Any, Any)
            for k, v in value.items():
                if not _fits(k, key_hint):
                    raise ConfigError(f"{where}: key {k!r} has the wrong type (expected {hint})")
                if not _fits(v, value_hint):
                    raise ConfigError(f"{where}.{k} = {v!r} has the wrong type (expected {hint})")
            return value
    raise ConfigError(f"{where} = {value!r} has the wrong type (expected {hint})")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(
            f"config keys must be strings, got {bad_keys[0]!r} ({type(bad_keys[0]).__name__}) in "
            f"{where.rstrip('.') or 'the top level'}"
        )
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


def load_yaml(text: str) -> Any:
    """YAML text as Python values, with YAML 1.2 floats (``1e-3`` is a number); safe (no arbitrary objects)."""
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects


def _parse_value(text: str) -> Any:
    return load_yaml(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested config dict.

    ``data`` is not modified (the result is a deep copy).

    Raises:
      ConfigError: an override that is not a ``key=value`` string, has an empty key part, has a value
        that is not valid YAML, or descends into a value that is not a section.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: the key {key!r} has an empty part")
        parts = [p.strip() for p in parts]
        try:
            parsed = _parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value of {key.strip()} is not valid YAML ({err})") from None
        node = data
        for k, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: k + 1])} is not a section")
        node[parts[-1]] = parsed
    return data


def _resolve(path: str, base_dir: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def resolve_model_section(model: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """The config's ``model`` mapping with the architecture of ``model["init_from"]`` filled in.

    Keys the config sets explicitly must agree with the source: ``name``, ``r_max`` (to 1e-9 Å), each given
    ``hyperparameters`` entry, ``ensemble_size``. ``dtype`` may differ (the weights are cast).

    Raises:
      ConfigError: unreadable source file, or a conflict (the message names the key and both values).
    """
    from equiforce.potentials.model_io import ModelFileError, read_header

    path = _resolve(str(model["init_from"]), base_dir)
    try:
        header = read_header(path)
    except (ModelFileError, OSError) as err:
        raise ConfigError(f"model.init_from: cannot read {path}: {err}") from err
    pot = header["potential"]
    src = dict(pot["model"])
    name = src.pop("name")
    model = {k: v for k, v in model.items() if v is not None}  # `key=null` on the command line: not set
    conflicts = []
    if "name" in model and model["name"] != name:
        conflicts.append(f"model.name is {model['name']!r} but the source is a {name!r} model")
    if "r_max" in model and abs(float(model["r_max"]) - float(pot["r_max"])) > 1e-9:
        conflicts.append(f"model.r_max is {model['r_max']} Å but the source's cutoff is {pot['r_max']} Å")
    for key, value in dict(model.get("hyperparameters") or {}).items():
        if key not in src:
            conflicts.append(f"model.hyperparameters.{key} is not a hyperparameter of the source's {name!r} model")
        elif src[key] != value and not (isinstance(src[key], list) and list(value or []) == src[key]):
            conflicts.append(f"model.hyperparameters.{key} is {value!r} but the source's is {src[key]!r}")
    k_src = int(pot.get("ensemble_size", 1))
    if "ensemble_size" in model and int(model["ensemble_size"]) != k_src:
        conflicts.append(f"model.ensemble_size is {model['ensemble_size']} but the source has {k_src} member(s)")
    if conflicts:
        raise ConfigError(f"model.init_from {path}: the config conflicts with the source model: {'; '.join(conflicts)}")
    return {
        **model,
        "name": name,
        "r_max": float(pot["r_max"]),
        "hyperparameters": src,
        "ensemble_size": k_src,
        "dtype": model.get("dtype", pot.get("dtype", "float32")),
    }


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    An empty file means all defaults. Every error names the file (when there is one) and the key.

    Raises:
      ConfigError: unreadable file (missing, not UTF-8, not YAML), a top level that is not a mapping,
        unknown keys, wrong types, NaN or inf numbers, a number outside its key's range (declared with the
        field, see :func:`field_range`; the message names the key, the value and the range), inconsistent
        settings, malformed overrides.
    """
    try:
        return _load_config(path, overrides)
    except ConfigError as err:
        if path is None or str(path) in str(err):
            raise
        raise ConfigError(f"{path}: {err}") from err


def _load_config(path: str | Path | None, overrides: list[str] | None) -> TrainConfig:
    data: dict[str, Any] = {}
    base = "."
    if path is not None:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {err.start})") from None
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if loaded is None:  # an empty document: all defaults
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
        base = str(path.resolve().parent)
    data = apply_overrides(data, overrides or [])
    data.setdefault("base_dir", base)
    model = data.get("model")
    if isinstance(model, dict) and model.get("init_from"):  # fine-tuning: the architecture is the source's
        data["model"] = resolve_model_section(model, str(data["base_dir"]))
    try:
        return _build(TrainConfig, data, "")
    except TypeError as err:
        raise ConfigError(str(err)) from err
