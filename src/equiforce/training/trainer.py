"""The training loop: data → statistics → potential → optax steps with EMA → validation, checkpoints,
early stopping, wall-clock budget and exact resume. What follows the loop (E0s, final and test metrics,
the model file, the NVE gate) is :mod:`equiforce.training.finish`.

Everything a CLI run does is callable from Python: ``train(load_config("config.yaml"))``. Runs over several
processes (``jax.distributed``) are set up by :mod:`equiforce.training.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from equiforce import faults
from equiforce.data.graph import Batch, collate, estimate_budget
from equiforce.data.neighbours import NeighbourGraph, average_num_neighbours
from equiforce.data.statistics import compute_statistics
from equiforce.data.structures import StructureSet
from equiforce.potentials.model_io import atomic_write_bytes, save_model
from equiforce.potentials.potential import Potential
from equiforce.potentials.registry import config_from_dict
from equiforce.training import distributed
from equiforce.training.bootstrap import batch_weights, bootstrap_counts
from equiforce.training.checkpoint import load_checkpoint, save_checkpoint
from equiforce.training.config import ConfigError, TrainConfig
from equiforce.training.data_source import Datasets, TrainingData, load_datasets, load_training_data
from equiforce.training.evaluate import _predict_fn, compute_metrics, e0_sum, predict
from equiforce.training.finetune import FinetuneSource, check_freeze_patterns, resolve_source, start_from_source
from equiforce.training.finish import (
    LoopOutcome,
    MDCheckFailedError,
    TrainResult,
    _with_energy,  # noqa: F401 (kept importable here)
    finish_training,
    format_metrics,
    refit_atomic_energies,
)
from equiforce.training.nve_check import energy_conservation_check
from equiforce.training.optim import (
    PlateauState,
    ema_update,
    make_optimizer,
    member_wise,
    plateau_update,
    set_lr_factor,
)
from equiforce.training.parallel import DataParallel, resolve_devices

if TYPE_CHECKING:
    from equiforce.data.graph import PaddingBudget

__all__ = [
    "Datasets",
    "MDCheckFailedError",
    "TrainResult",
    "TrainState",
    "build_potential",
    "energy_conservation_check",
    "load_datasets",
    "make_train_step",
    "refit_atomic_energies",
    "train",
]


class TrainState(NamedTuple):
    """Device-side training state (a pytree)."""

    params: Any
    opt_state: Any
    ema_params: Any
    step: jnp.ndarray


def build_potential(
    cfg: TrainConfig,
    train: StructureSet,
    graphs: list[NeighbourGraph],
    *,
    species: tuple[int, ...] | None = None,
    avg_num_neighbours: float | None = None,
) -> tuple[Potential, dict]:
    """The Potential for a training set: E0s (fitted or given), scale = force RMS, shift, avg neighbours.

    The shift (eV per atom) is 0 with fitted E0s, which already carry the mean energy. With given E0s (e.g. the
    isolated-atom energies of the reference method) it is the training set's mean per-atom energy after the
    E0s, ``mean_k((E_k − Σ_i E0[Z_i]) / N_k)`` (as mace-torch's ``ScaleShiftMACE``), so that the network
    starts at the cohesive energy instead of having to learn it; the E0s stay as given.

    ``species`` (default: those of ``train``) and ``avg_num_neighbours`` (default: from ``train`` and
    ``graphs``) are given when ``train`` is a sample of a streamed training set (the shift is then the
    sample's mean).

    Returns:
      ``(potential, statistics)``: the :class:`Potential` and the dataset statistics as a JSON-friendly dict.

    Raises:
      DataError: no energy labels, or given E0s that miss a species of ``train``."""
    m = cfg.model
    model_cfg = config_from_dict({"name": m.name, **m.hyperparameters})
    e0s = m.atomic_energies
    if isinstance(e0s, dict):
        e0s = {int(k): float(v) for k, v in e0s.items()}
    stats = compute_statistics(train, e0s, species)
    avg_nn = average_num_neighbours(train, graphs) if avg_num_neighbours is None else avg_num_neighbours
    stats = dataclasses.replace(stats, avg_num_neighbours=avg_nn)
    given = isinstance(e0s, dict)
    potential = Potential(
        model=model_cfg,
        species=stats.species,
        r_max=m.r_max,
        atomic_energies=tuple(stats.atomic_energies[z] for z in stats.species),
        scale=float(stats.force_rms or 1.0),
        # fitted E0s already carry the mean energy (an isolated atom gets exactly E0); given ones do not
        shift=float(stats.energy_per_atom_residual_mean) if given else 0.0,
        avg_num_neighbours=max(avg_nn, 1.0),
        dtype=m.dtype,
        ensemble_size=m.ensemble_size,
    )
    return potential, stats.to_dict()


# ---------------------------------------------------------------------------------------------- steps
def _rho(kind: str, delta: float) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if kind == "huber":
        return lambda x: optax.huber_loss(x, delta=delta)
    return lambda x: x * x


def make_loss_terms_fn(potential: Potential, cfg: TrainConfig, use_stress: bool):
    """``terms(params, batch, graph_weight=None) -> (sums [3], counts [3])``: the summed ρ(error) of the
    energy-per-atom, force-component and stress-component terms and how many items each sum runs over.

    The counts do not depend on the parameters, so a loss split over several batches (data parallelism,
    :mod:`equiforce.training.parallel`) is exactly the one-batch loss when the sums and the counts are each
    added up first: ``loss = Σ_t w_t Σ_d sums_d[t] / Σ_d counts_d[t]``. ``graph_weight``: see
    :func:`make_loss_fn`."""
    potential = potential.single()
    lc = cfg.loss
    rho = _rho(lc.kind, lc.huber_delta)

    def terms(params: Any, batch: Batch, graph_weight: jnp.ndarray | None = None):
        g = batch.graph
        out = potential(params, g, compute_forces=True, compute_stress=use_stress, include_e0=False)
        dtype = out.energy.dtype
        gm = g.graph_mask.astype(dtype)
        if graph_weight is not None:
            gm = gm * graph_weight.astype(dtype)
        nm = gm[g.node_graph] * g.node_mask.astype(dtype)
        n_atoms = jnp.maximum(g.n_node, 1).astype(dtype)
        de = (out.energy - batch.energy) / n_atoms
        sums = [jnp.sum(rho(de) * gm), jnp.sum(rho(out.forces - batch.forces) * nm[:, None])]
        counts = [jnp.sum(gm), 3.0 * jnp.sum(nm)]
        if use_stress:
            sm = batch.stress_mask.astype(dtype) * gm
            sums.append(jnp.sum(rho(out.stress - batch.stress) * sm[:, None]))
            counts.append(6.0 * jnp.sum(sm))
        else:
            sums.append(jnp.zeros((), dtype))
            counts.append(jnp.zeros((), dtype))
        return jnp.stack(sums), jnp.stack(counts)

    return terms


def combine_loss_terms(cfg: TrainConfig, sums: jnp.ndarray, counts: jnp.ndarray):
    """``(total, (loss_e, loss_f))`` from the summed terms and their counts (see :func:`make_loss_terms_fn`)."""
    lc = cfg.loss
    means = sums / jnp.maximum(counts, 1.0)
    total = lc.energy_weight * means[0] + lc.forces_weight * means[1] + lc.stress_weight * means[2]
    return total, (means[0], means[1])


def make_loss_fn(potential: Potential, cfg: TrainConfig, use_stress: bool):
    """``loss(params, batch, graph_weight=None) -> (scalar, aux)``; energies are compared without E0s.

    ``graph_weight`` (``[n_graphs]``, optional): how often each structure counts (a bootstrap resample's
    counts, :mod:`equiforce.training.bootstrap`); the loss is then the loss of the batch with each structure
    repeated that many times. Default: each real structure once.

    For a committee (``ensemble_size > 1``) this is one member's loss on one member's parameters; the step
    vmaps it over the members."""
    terms = make_loss_terms_fn(potential, cfg, use_stress)

    def loss_fn(params: Any, batch: Batch, graph_weight: jnp.ndarray | None = None):
        return combine_loss_terms(cfg, *terms(params, batch, graph_weight))

    return loss_fn


def make_train_step(potential: Potential, cfg: TrainConfig, optimizer: optax.GradientTransformation, use_stress: bool):
    """The jitted step ``(state, batch, member_weights) -> (state, (loss, loss_e, loss_f))``.

    ``member_weights``: ``None``, or for a bootstrapped committee ``[K, n_graphs]`` per-member structure
    counts (:func:`equiforce.training.bootstrap.batch_weights`). The state buffer is donated."""
    loss_fn = make_loss_fn(potential, cfg, use_stress)
    ema_decay = cfg.optim.ema_decay
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if potential.ensemble_size > 1:  # each member its own loss and gradient, all on the same padded batch
        member_value_and_grad = jax.vmap(value_and_grad, in_axes=(0, None, 0))

        def value_and_grad(params: Any, batch: Batch, weights: jnp.ndarray | None):
            (loss, (le, lf)), grads = member_value_and_grad(params, batch, weights)
            return (jnp.mean(loss), (jnp.mean(le), jnp.mean(lf))), grads

    def step(state: TrainState, batch: Batch, weights: jnp.ndarray | None = None):
        (loss, (le, lf)), grads = value_and_grad(state.params, batch, weights)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, ema_decay)
        return TrainState(params, opt_state, ema, state.step + 1), (loss, le, lf)

    return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------- loop
def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _val_loss(cfg: TrainConfig, m: dict[str, float]) -> float:
    """Validation objective: the training loss's weighting of per-atom energy, force and (with
    ``loss.stress_weight > 0``, where evaluated) stress RMSEs, in eV units."""
    loss = (
        cfg.loss.energy_weight * (m["energy_per_atom_rmse_meV"] * 1e-3) ** 2
        + cfg.loss.forces_weight * (m["forces_rmse_meV_per_A"] * 1e-3) ** 2
    )
    if cfg.loss.stress_weight > 0 and "stress_rmse_meV_per_A3" in m:
        loss += cfg.loss.stress_weight * (m["stress_rmse_meV_per_A3"] * 1e-3) ** 2
    return loss


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a potential as ``cfg`` says; write checkpoints, metrics log and model files to ``cfg.output_dir``.

    Files written (atomically): ``checkpoints/last.ckpt`` (every epoch and on interruption),
    ``best.eqf`` (best validation, EMA weights), ``model.eqf`` and ``final_metrics.json`` (final: best
    weights, E0s as ``model.refit_atomic_energies`` says; written before the optional post-training steps and
    again with their results: test metrics, NVE gate), ``metrics.jsonl`` (one line per epoch),
    ``config.yaml``, ``parity_test.png``, ``learning_curve.png``. See :mod:`equiforce.training.finish`.

    Over several processes (``parallel.coordinator_address`` / ``num_processes`` / ``process_id``, their
    environment variables, or a SLURM / Open MPI launch; :mod:`equiforce.training.distributed`) every process
    calls ``train`` with the same config: ``jax.distributed`` starts first, the global batches are split over
    the devices of all processes, and process 0 alone logs and writes the files above. The other processes
    return once process 0 is done, with the result read back from ``model.eqf`` when they can see it. An
    error in any process ends that process at once (after printing it) and with it the run: then ``train``
    does not return or raise in any process.

    Args:
      cfg: the configuration.
      resume: continue from ``checkpoints/last.ckpt`` (same config required), or start from scratch when
        there is none yet (so a job script can always re-issue the same command); the loss curve continues
        exactly as an uninterrupted run's would.
      log: receives one line per event (default: ``tqdm.write``); process 0 only.

    Raises:
      ConfigError / DataError: bad configuration or data (before training starts).
      CoordinatorUnreachableError: (a ConfigError) process 0 of a multi-process run did not answer.
      MDCheckFailedError: the NVE gate failed with ``md_check.on_failure: fail`` (the model is saved first).
      DistributedError: on processes other than 0, when process 0 failed after training.
    """
    log = log or tqdm.write
    procs = distributed.initialize(cfg.parallel, log)
    with distributed.stop_all_on_failure(procs):
        finish, loop, out = _train_loop(cfg, resume, log if procs.is_main else _quiet, procs)
    result = distributed.run_on_main(procs, finish)  # final metrics, model file, NVE gate: process 0 only
    return result if procs.is_main else _result_of_main(out, loop)


def _quiet(_: str) -> None:
    """The log of processes other than 0."""


def _result_of_main(out: Any, loop: LoopOutcome) -> TrainResult:
    """A process other than 0: process 0's result, read from its ``model.eqf``, or the loop's own outcome
    (EMA weights of the last epoch, no metrics) when that file is not visible here."""
    from equiforce.potentials.model_io import load_model

    path = out / "model.eqf"
    try:
        potential, params, header = load_model(path)
    except Exception:  # e.g. process 0 wrote to a file system this host does not share
        return TrainResult(path, loop.potential, loop.params, {}, None, loop.history, loop.stopped_because)
    meta = header.get("metadata", {})
    return TrainResult(
        path,
        potential,
        params,
        meta.get("valid_metrics") or {},
        meta.get("test_metrics"),
        loop.history,
        loop.stopped_because,
        nve_check=meta.get("nve_check"),
        metadata=meta,
    )


def _train_loop(
    cfg: TrainConfig, resume: bool, log: Callable[[str], None], procs: distributed.Processes
) -> tuple[Callable[[], TrainResult], LoopOutcome, Any]:
    """Everything up to the end of the training loop: ``(finish, loop, out)``, where ``finish()`` (process 0
    only) writes the model file and runs the post-training steps (:func:`finish_training`) and ``loop`` is
    what the loop produced (its ``params`` the last EMA weights).

    A fine-tuning source (``model.init_from``) is read and checked here, once, before the training data."""
    main = procs.is_main
    if cfg.model.dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)  # a float64 potential needs 64-bit JAX types
    out = cfg.resolve_path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoints" / "last.ckpt"
    if resume and not ckpt_path.is_file():
        # like GROMACS -cpi: a job script re-issues the same command after a crash, also one that came
        # before the first checkpoint
        log(f"resume: no checkpoint at {ckpt_path} yet; starting from scratch")
        resume = False
    t_start = time.perf_counter()
    source = resolve_source(cfg) if cfg.model.init_from is not None else None

    td = load_training_data(cfg, log)
    try:
        return _train_with(cfg, td, resume, log, procs, out, ckpt_path, t_start, source)
    finally:
        td.close()


# ---------------------------------------------------------------------------------------------- loop state
@dataclasses.dataclass
class LoopState:
    """The training loop's state: what the stages hand on and what a checkpoint holds.

    ``train_state`` is the device-side part; the other saved fields are the checkpoint's JSON block, under the
    same keys as ever (:meth:`host`, :meth:`restored`), so checkpoints stay readable across versions.

    Attributes:
      train_state: parameters, optimiser state, EMA parameters and step counter (on the device(s)).
      potential: the potential's description (``Potential.to_dict()``); resuming a checkpoint of another
        potential or config is refused.
      epoch: epochs finished (the 0-based index of the epoch in progress).
      batch_in_epoch: batches of epoch ``epoch`` done (resuming continues after them).
      epoch_loss_sum: summed per-batch ``(loss, energy loss, force loss)`` of those batches (eV² units of the
        loss); device scalars during the batch loop (no host sync per step), floats otherwise.
      plateau: the plateau scheduler (learning-rate factor, best loss, bad epochs).
      best_val: the best validation loss so far (:func:`_val_loss`), None before the first validation.
      best_epoch: the 1-based epoch of ``best_val``.
      bad_epochs: validations since the last improvement (early stopping).
      history: one record per finished epoch (the lines of ``metrics.jsonl``).
      elapsed_s: wall-clock seconds of training up to the last checkpoint, earlier runs of a resume included.
      stopped_because: ``max_epochs``, ``early_stopping`` or ``time_budget`` (not saved).
      first_step_s: seconds of this process's first step, compilation included; None before it (not saved).
    """

    train_state: TrainState
    potential: dict[str, Any]
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: list[Any] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    plateau: PlateauState = dataclasses.field(default_factory=PlateauState)
    best_val: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0
    stopped_because: str = "max_epochs"
    first_step_s: float | None = None

    def host(self) -> dict[str, Any]:
        """The checkpoint's JSON block (keys and order as written since checkpoint version 1)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_loss_sum": [float(s) for s in self.epoch_loss_sum],
            "plateau": dataclasses.asdict(self.plateau),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "elapsed_s": self.elapsed_s,
            "potential": self.potential,
        }

    @classmethod
    def restored(cls, train_state: TrainState, host: dict[str, Any]) -> LoopState:
        """The state a checkpoint holds (``host``: its JSON block, as :meth:`host` writes it)."""
        fields = {k: v for k, v in host.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(train_state=train_state, **{**fields, "plateau": PlateauState(**host["plateau"])})


@dataclasses.dataclass
class _Run:
    """What the stages share and do not change: config, processes, files, data, potential, step function."""

    cfg: TrainConfig
    procs: distributed.Processes
    log: Callable[[str], None]
    out: Path
    ckpt_path: Path
    td: TrainingData
    budget: PaddingBudget
    potential: Potential
    stats: dict[str, Any]
    lineage: list[dict[str, Any]] | None
    step_fn: Callable
    dp: DataParallel | None  # several devices: the global batch split over them
    counts: np.ndarray | None  # bootstrapped committee: [K, n_train] structure counts per member
    t_start: float  # time.perf_counter() at the start of this process's run
    elapsed_before: float  # seconds of training before this process (a resumed run's earlier ones)

    @property
    def main(self) -> bool:
        return self.procs.is_main

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.td.n_train / self.cfg.optim.batch_size)

    @functools.cached_property
    def predict_fn(self) -> Callable:
        """The jitted prediction of validation, final and test metrics; stress where a set is periodic."""
        data = self.td.data
        sets = [data.train, data.valid] + ([data.test] if data.test is not None else [])
        periodic = any(bool(np.any(np.all(s.pbc, axis=-1))) for s in sets)
        return _predict_fn(self.potential, periodic)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def make_batch(self, group: list[int], s: StructureSet, graphs: list[NeighbourGraph], rows: list[int]):
        """One padded batch of training-set indices ``group`` (held at ``rows`` of ``s``), on the device(s)."""
        dtype = np.dtype(self.cfg.model.dtype)
        if self.dp is not None:
            return self.dp.batch(s, graphs, group, dtype, self.counts, rows=rows)
        batch = jax.tree.map(jnp.asarray, collate(s, graphs, rows, self.budget, dtype))
        weights = None if self.counts is None else batch_weights(self.counts, group, self.budget.n_graphs, dtype)
        return batch, weights

    def local(self, tree: Any) -> Any:
        """This process's copy of a tree replicated over the devices."""
        return tree if self.dp is None else self.dp.to_local(tree)


def _train_with(
    cfg: TrainConfig,
    td: TrainingData,
    resume: bool,
    log: Callable[[str], None],
    procs: distributed.Processes,
    out: Path,
    ckpt_path: Path,
    t_start: float,
    source: FinetuneSource | None = None,
) -> tuple[Callable[[], TrainResult], LoopOutcome, Any]:
    """:func:`_train_loop` once the data are loaded, in named stages: setup, then epochs (each the stage
    "epoch", then "validation and checkpoint") until a stop, then "finish"."""
    run, ls = _setup(cfg, td, resume, log, procs, out, ckpt_path, t_start, source)
    _run_epochs(run, ls)
    return _finish(run, ls)


# ---------------------------------------------------------------------------------------------- stage: setup
def _setup(
    cfg: TrainConfig,
    td: TrainingData,
    resume: bool,
    log: Callable[[str], None],
    procs: distributed.Processes,
    out: Path,
    ckpt_path: Path,
    t_start: float,
    source: FinetuneSource | None,
) -> tuple[_Run, LoopState]:
    """Stage "setup": padding budget, potential (fine-tuned or fresh), optimiser, the initial or resumed
    :class:`LoopState`, output files, the start line and the step function."""
    budget = estimate_budget(
        np.concatenate([td.n_atoms, td.data.valid.n_atoms]),
        np.concatenate([td.n_edges, [g.n_edges for g in td.valid_graphs]]).astype(np.int64),
        cfg.optim.batch_size,
    )
    potential, stats, start_params, lineage = _starting_potential(cfg, td, source, log)
    optimizer, ls = _initial_state(cfg, td, potential, start_params, log)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(ls.train_state.params)) // potential.ensemble_size
    if resume:
        ls = _restore(ckpt_path, ls, log)
    ls.train_state = jax.tree.map(lambda x: jnp.array(x, copy=True), ls.train_state)
    if procs.is_main:  # only process 0 writes files
        _prepare_outputs(cfg, out, ckpt_path, resume, ls.history)
    committee = f" x {potential.ensemble_size} committee members" if potential.ensemble_size > 1 else ""
    log(
        f"equiforce train: {cfg.model.name} ({n_params:,} parameters{committee}, {cfg.model.dtype}), "
        f"{td.n_train} train / {len(td.data.valid)} valid structures, species {list(potential.species)}, "
        f"avg neighbours {stats['avg_num_neighbours']:.2f}, force RMS {stats['force_rms']:.3f} eV/Å, "
        f"budget {budget.n_nodes} nodes / {budget.n_edges} edges / {budget.n_graphs} graphs"
    )
    devices = resolve_devices(cfg.parallel.devices)
    _check_processes_agree(cfg, td, procs, out, [resume, ls.epoch, ls.batch_in_epoch], devices)
    step_fn, dp, counts = _step_function(cfg, td, potential, optimizer, devices, log)
    if dp is not None:
        ls.train_state = dp.replicate(ls.train_state)
    run = _Run(
        cfg=cfg, procs=procs, log=log, out=out, ckpt_path=ckpt_path, td=td, budget=budget, potential=potential,
        stats=stats, lineage=lineage, step_fn=step_fn, dp=dp, counts=counts, t_start=t_start,
        elapsed_before=float(ls.elapsed_s),
    )  # fmt: skip
    return run, ls


def _starting_potential(
    cfg: TrainConfig, td: TrainingData, source: FinetuneSource | None, log: Callable[[str], None]
) -> tuple[Potential, dict[str, Any], Any, list[dict[str, Any]] | None]:
    """``(potential, dataset statistics, starting weights or None, lineage or None)``: a fresh potential for
    the training set, or with ``source`` (fine-tuning) the source's architecture and weights."""
    potential, stats = build_potential(
        cfg,
        td.data.train,
        td.train_graphs,
        species=td.species,
        avg_num_neighbours=td.avg_num_neighbours if td.stream is not None else None,
    )
    start_params, lineage = None, None
    if source is not None:  # fine-tuning: the source's architecture and weights
        potential, start_params, lineage = start_from_source(cfg, td.data.train, log, source=source)
        stats = {**stats, "avg_num_neighbours_of_source": potential.avg_num_neighbours}
    potential.check_species(td.data.valid.atomic_numbers)
    if td.data.test is not None:
        potential.check_species(td.data.test.atomic_numbers)
    return potential, stats, start_params, lineage


def _initial_state(
    cfg: TrainConfig, td: TrainingData, potential: Potential, start_params: Any, log: Callable[[str], None]
) -> tuple[optax.GradientTransformation, LoopState]:
    """The optimiser and the state of a run's first step: weights from the seed (or the fine-tuning source),
    fresh optimiser state, EMA = weights, step 0."""
    optimizer = make_optimizer(cfg.optim, math.ceil(td.n_train / cfg.optim.batch_size), cfg.finetune)
    if potential.ensemble_size > 1:
        optimizer = member_wise(optimizer)
    params = potential.init(jax.random.PRNGKey(cfg.seed)) if start_params is None else start_params
    if cfg.finetune.freeze:
        n_frozen = check_freeze_patterns(params, cfg.finetune.freeze)
        rate = cfg.finetune.frozen_learning_rate
        log(f"fine-tuning: {n_frozen} parameter arrays {'frozen' if rate == 0 else f'trained at lr {rate:g}'}")
    ema_params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # distinct buffers (donation)
    state = TrainState(params, optimizer.init(params), ema_params, jnp.zeros((), jnp.int32))
    return optimizer, LoopState(train_state=state, potential=potential.to_dict())


def _restore(ckpt_path: Path, initial: LoopState, log: Callable[[str], None]) -> LoopState:
    """The state saved in ``ckpt_path``, read into the structure of ``initial``.

    Raises:
      ConfigError: a checkpoint of another potential or config (CheckpointError: an unreadable one)."""
    train_state, host = load_checkpoint(ckpt_path, initial.train_state)
    if host["potential"] != initial.potential:
        raise ConfigError(f"{ckpt_path} was written for another potential/config; cannot resume")
    log(f"resumed from {ckpt_path}: epoch {host['epoch']}, batch {host['batch_in_epoch']}")
    return LoopState.restored(train_state, host)


def _prepare_outputs(cfg: TrainConfig, out: Path, ckpt_path: Path, resume: bool, history: list) -> None:
    """Process 0: ``config.yaml`` (atomically); ``metrics.jsonl`` emptied (new run) or cut to the checkpoint's history
    (resume); temporary files of atomic writes that a kill left behind removed."""
    metrics_path = out / "metrics.jsonl"
    atomic_write_bytes(out / "config.yaml", _yaml_dump(cfg.to_dict()).encode())
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    if resume:  # a kill between an epoch's metrics line and its checkpoint left one line too many
        atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in history).encode())
    for stale in [*out.glob(".*.tmp"), *ckpt_path.parent.glob(".*.tmp")]:  # a kill inside an atomic write's
        stale.unlink(missing_ok=True)  # temporary files (model files, checkpoint): this run is their only writer


def _check_processes_agree(
    cfg: TrainConfig, td: TrainingData, procs: distributed.Processes, out: Path, resume_point: list, devices: list
) -> None:
    """Every process runs the same config on the same data from the same resume point (a no-op in one process).

    Raises:
      DistributedError: the processes disagree (the message names what differs)."""
    data = td.data
    distributed.check_same_on_every_process(
        procs,
        {
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("parallel", "base_dir")},
            "output folder": str(out),
            "training data": [td.n_atoms, td.n_edges, data.train.positions, data.train.energy],
            "validation data": [data.valid.n_atoms, data.valid.positions, data.valid.energy],
            "resume point": resume_point,
            "devices": [d.id for d in devices],
        },
    )


def _step_function(
    cfg: TrainConfig,
    td: TrainingData,
    potential: Potential,
    optimizer: optax.GradientTransformation,
    devices: list,
    log: Callable[[str], None],
) -> tuple[Callable, DataParallel | None, np.ndarray | None]:
    """``(step_fn, dp, counts)``: the jitted step (on one device, or split over several by ``dp``) and a
    bootstrapped committee's per-member structure counts (:func:`bootstrap_counts`)."""
    bs = cfg.optim.batch_size
    use_stress = cfg.loss.stress_weight > 0 and bool(np.any(td.data.train.has_stress))
    dp = None
    if len(devices) > 1:  # the global batch split over the devices, parameters replicated
        dp = DataParallel(devices, td.n_atoms, td.n_edges, bs)
        log(dp.describe(bs))
        step_fn = dp.make_train_step(
            make_loss_terms_fn(potential, cfg, use_stress),
            lambda sums, counts: combine_loss_terms(cfg, sums, counts),
            optimizer,
            cfg.optim.ema_decay,
            potential.ensemble_size,
            cfg.model.bootstrap,
        )
    else:
        step_fn = make_train_step(potential, cfg, optimizer, use_stress)
    counts = None
    if cfg.model.bootstrap:  # bagging: member k's structure counts, the same on resume (drawn from the seed)
        counts = bootstrap_counts(td.n_train, potential.ensemble_size, cfg.seed)
        log(
            f"bootstrap: each member trains on a resample of the {td.n_train} training structures "
            f"({np.mean(counts > 0):.0%} distinct on average)"
        )
    return step_fn, dp, counts


# ---------------------------------------------------------------------------------------------- epochs
def _run_epochs(run: _Run, ls: LoopState) -> None:
    """Epochs until ``optim.max_epochs``, early stopping or the time budget (``ls.stopped_because`` says
    which); an interruption (KeyboardInterrupt) saves a checkpoint first, then propagates."""
    cfg = run.cfg
    try:
        while ls.epoch < cfg.optim.max_epochs:
            out_of_time, epoch_s = _train_epoch(run, ls)
            if out_of_time and ls.batch_in_epoch < run.steps_per_epoch:
                _checkpoint(run, ls)
                ls.stopped_because = "time_budget"
                run.log(f"time budget of {cfg.optim.time_budget_minutes} min reached during epoch {ls.epoch + 1}")
                return
            if _validate_and_checkpoint(run, ls, epoch_s, out_of_time):
                return
    except KeyboardInterrupt:
        _checkpoint(run, ls)
        run.log(f"interrupted: checkpoint saved to {run.ckpt_path}; continue with --resume")
        raise


def _checkpoint(run: _Run, ls: LoopState) -> None:
    """Save ``ls`` to ``checkpoints/last.ckpt`` (process 0), with the elapsed time up to now."""
    ls.elapsed_s = run.elapsed()
    if run.main:
        save_checkpoint(run.ckpt_path, ls.train_state, ls.host())


# ---------------------------------------------------------------------------------------------- stage: epoch
def _train_epoch(run: _Run, ls: LoopState) -> tuple[bool, float]:
    """Stage "epoch": one optimiser step per remaining batch of epoch ``ls.epoch`` (from
    ``ls.batch_in_epoch`` on), the batch losses summed into ``ls.epoch_loss_sum``.

    Returns ``(out_of_time, seconds)``: whether the time budget ran out (on any process: all stop at the
    same step) and the epoch's training time."""
    cfg, budget_min = run.cfg, run.cfg.optim.time_budget_minutes
    budget_s = None if budget_min is None else 60.0 * budget_min
    skip = ls.batch_in_epoch
    batches = run.td.epoch(
        cfg.optim.batch_size,
        run.budget,
        run.make_batch,
        seed=_epoch_seed(cfg.seed, ls.epoch),
        start=skip,
        energy_shift=lambda s: e0_sum(run.potential, s),
        shard=None if run.dp is None else run.dp.shard,  # several processes: a streamed epoch reads its parts only
    )
    bar = _progress_bar(run, ls)
    sum_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    ls.epoch_loss_sum = [jnp.asarray(v, sum_dtype) for v in ls.epoch_loss_sum]
    out_of_time = False
    t_epoch = time.perf_counter()
    try:
        for i, (batch, weights) in enumerate(batches, start=skip):
            t0 = time.perf_counter()
            ls.train_state, losses = run.step_fn(ls.train_state, batch, weights)
            losses = run.local(losses)  # replicated over the mesh: this process's copy
            if ls.first_step_s is None:
                jax.block_until_ready(losses)
                ls.first_step_s = time.perf_counter() - t0
                run.log(f"first training step (compilation included): {ls.first_step_s:.1f} s")
            ls.epoch_loss_sum = [s + v for s, v in zip(ls.epoch_loss_sum, losses, strict=False)]
            ls.batch_in_epoch = i + 1
            bar.update(1)
            if (i + 1) % 10 == 0:
                bar.set_postfix(loss=f"{float(losses[0]):.4g}")
            if budget_s is not None and distributed.any_process(run.procs, run.elapsed() > budget_s):
                out_of_time = True
                break
    finally:
        if hasattr(batches, "close"):  # the reading thread of a streamed epoch
            batches.close()
    bar.close()
    ls.epoch_loss_sum = [float(s) for s in ls.epoch_loss_sum]
    return out_of_time, time.perf_counter() - t_epoch


def _progress_bar(run: _Run, ls: LoopState) -> tqdm:
    """The epoch's progress bar (process 0, ``progress_bar: true``), starting at the batches already done."""
    return tqdm(
        total=run.steps_per_epoch,
        initial=ls.batch_in_epoch,
        desc=f"epoch {ls.epoch + 1}/{run.cfg.optim.max_epochs}",
        disable=not (run.cfg.progress_bar and run.main),
        leave=False,
        dynamic_ncols=True,
    )


# ------------------------------------------------------------------------------ stage: validation and checkpoint
def _validate_and_checkpoint(run: _Run, ls: LoopState, epoch_s: float, out_of_time: bool) -> bool:
    """Stage "validation and checkpoint" after a finished epoch: validation metrics (EMA weights), the plateau
    schedule, ``best.eqf`` on improvement, the metrics line, the next epoch's checkpoint. Returns whether
    training stops (early stopping, time budget; ``ls.stopped_because`` says which)."""
    vm, vloss, improved = _validate(run, ls)
    _record_epoch(run, ls, vm, vloss, improved, epoch_s)
    ls.epoch, ls.batch_in_epoch, ls.epoch_loss_sum = ls.epoch + 1, 0, [0.0, 0.0, 0.0]
    _checkpoint(run, ls)
    patience = run.cfg.optim.early_stopping_patience
    if patience is not None and ls.bad_epochs >= patience:
        ls.stopped_because = "early_stopping"
        run.log(f"early stopping: no improvement for {patience} epochs")
        return True
    if out_of_time:
        ls.stopped_because = "time_budget"
        run.log(f"time budget of {run.cfg.optim.time_budget_minutes} min reached")
        return True
    return False


def _validate(run: _Run, ls: LoopState) -> tuple[dict[str, float], float, bool]:
    """``(metrics, loss, improved)`` of the EMA weights on the validation set; updates the plateau schedule,
    the best epoch and the early-stopping count, and writes ``best.eqf`` (process 0) on improvement."""
    cfg = run.cfg
    eval_params = run.local(ls.train_state.ema_params)
    pred = predict(
        run.potential,
        eval_params,
        run.td.data.valid,
        batch_size=cfg.optim.batch_size,
        graphs=run.td.valid_graphs,
        budget=run.budget,
        predict_fn=run.predict_fn,
    )
    vm = compute_metrics(pred)
    # process 0's value decides the schedule, the best epoch and early stopping on every process
    vloss = distributed.from_main(run.procs, _val_loss(cfg, vm))
    if cfg.optim.schedule == "plateau":
        ls.plateau = plateau_update(ls.plateau, vloss, cfg.optim)
        ls.train_state = ls.train_state._replace(opt_state=set_lr_factor(ls.train_state.opt_state, ls.plateau.factor))
        if run.dp is not None:  # the new factor as replicated as the rest, so the step does not recompile
            ls.train_state = run.dp.replicate(ls.train_state)
    improved = ls.best_val is None or vloss < ls.best_val
    if improved:
        ls.best_val, ls.best_epoch, ls.bad_epochs = vloss, ls.epoch + 1, 0
        if run.main:
            meta = {"epoch": ls.epoch + 1, "valid_metrics": vm, "dataset_statistics": run.stats}
            save_model(run.out / "best.eqf", run.potential, eval_params, meta)
    else:
        ls.bad_epochs += 1
    return vm, vloss, improved


def _record_epoch(run: _Run, ls: LoopState, vm: dict[str, float], vloss: float, improved: bool, epoch_s: float) -> None:
    """The epoch's record: appended to ``ls.history`` and (process 0) ``metrics.jsonl``, and logged."""
    n_batches = max(ls.batch_in_epoch, 1)
    train_loss = [s / n_batches for s in ls.epoch_loss_sum]
    epoch, factor = ls.epoch + 1, ls.plateau.factor
    record = {
        "epoch": epoch,
        "step": int(ls.train_state.step),
        "time_s": round(run.elapsed(), 3),
        "epoch_time_s": round(epoch_s, 3),
        "lr_factor": factor,
        "train_loss": train_loss[0],
        "train_loss_energy": train_loss[1],
        "train_loss_forces": train_loss[2],
        "valid_loss": vloss,
        **{f"valid_{k}": v for k, v in vm.items()},
    }
    ls.history.append(record)
    if run.main:
        line = json.dumps(record) + "\n"
        with run.metrics_path.open("a") as fh:  # two writes: a kill between them is a torn line (faults)
            fh.write(line[: len(line) // 2])
            fh.flush()
            faults.point("metrics-line", "half-written")
            fh.write(line[len(line) // 2 :])
        faults.point("metrics-line", "written")
    s_mae = f"  S MAE {vm['stress_mae_meV_per_A3']:.3f} meV/Å³" if "stress_mae_meV_per_A3" in vm else ""
    run.log(
        f"epoch {epoch:4d}  loss {train_loss[0]:.4g}  valid E MAE {vm['energy_mae_meV']:.1f} meV "
        f"({vm['energy_per_atom_mae_meV']:.2f} meV/atom)  F MAE {vm['forces_mae_meV_per_A']:.1f} meV/Å"
        f"{s_mae}  lr×{factor:.3g}  {epoch_s:.1f} s{'  *' if improved else ''}"
    )


# ---------------------------------------------------------------------------------------------- stage: finish
def _finish(run: _Run, ls: LoopState) -> tuple[Callable[[], TrainResult], LoopOutcome, Any]:
    """Stage "finish": ``(finish, loop, out)`` of :func:`_train_loop` from the loop's final state."""
    last_params = jax.tree.map(np.asarray, run.local(ls.train_state.ema_params))
    loop = LoopOutcome(
        potential=run.potential,
        params=last_params,
        stats=run.stats,
        trained_epochs=ls.epoch,
        best_epoch=ls.best_epoch,
        stopped_because=ls.stopped_because,
        first_step_s=ls.first_step_s,
        history=ls.history,
        lineage=run.lineage,
    )

    def finish() -> TrainResult:
        best_params = last_params  # no epoch finished (e.g. a tiny time budget): the current EMA weights
        if (run.out / "best.eqf").is_file():
            from equiforce.potentials.model_io import load_model

            _, best_params, _ = load_model(run.out / "best.eqf")
        # One jitted prediction function serves all three sets (it leaves E0s out, so the re-fit keeps it valid).
        return finish_training(
            run.cfg,
            run.out,
            run.td.data,
            dataclasses.replace(loop, params=best_params),
            train_graphs=run.td.train_graphs,
            valid_graphs=run.td.valid_graphs,
            budget=run.budget,
            predict_fn=run.predict_fn,
            elapsed=run.elapsed,
            log=run.log,
        )

    return finish, loop, run.out


_fmt = format_metrics  # the summary line's formatter (kept under its old name)


def _yaml_dump(d: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False)
