"""After the training loop: E0s, final metrics, the model file, then the optional steps.

Order (nothing a post-training step does can lose the trained model):

1. the E0s: re-fitted or kept as ``model.refit_atomic_energies`` says (:func:`resolve_atomic_energies`);
2. validation metrics;
3. ``model.eqf`` and ``final_metrics.json`` are written (atomically);
4. the optional steps, each caught on its own: test-set metrics, the parity plot, the NVE
   energy-conservation gate (:mod:`equiforce.training.nve_check`); a failure is logged and recorded in the
   metadata under ``post_training.errors``;
5. ``model.eqf`` and ``final_metrics.json`` are written again with their results
   (``post_training.complete: true``);
6. the summary is logged; with ``md_check.on_failure: fail`` a failed gate raises
   :class:`MDCheckFailedError` (the files are already written).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graphs
from equiforce.data.statistics import fit_atomic_energies
from equiforce.data.structures import StructureSet
from equiforce.potentials.model_io import atomic_write_bytes, save_model
from equiforce.potentials.potential import Potential
from equiforce.training.config import TrainConfig
from equiforce.training.evaluate import Predictions, compute_metrics, predict

if TYPE_CHECKING:
    from equiforce.data.graph import PaddingBudget
    from equiforce.training.data_source import Datasets

__all__ = [
    "LoopOutcome",
    "MDCheckFailedError",
    "TrainResult",
    "finish_training",
    "format_metrics",
    "refit_atomic_energies",
    "resolve_atomic_energies",
]


#: ``shift_from`` of the model file's ``atomic_energies`` record for given E0s (see ``build_potential``)
SHIFT_FROM_GIVEN_E0S = "training-set mean per-atom energy after the given E0s"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run produced: the model file, final metrics and the per-epoch history.

    ``nve_check`` is the energy-conservation gate's result (None when ``md_check.steps`` is 0);
    ``metadata`` is what the model file's header carries.
    """

    model_path: Path
    potential: Potential
    params: Any
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    history: list[dict[str, Any]]
    stopped_because: str
    nve_check: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class MDCheckFailedError(RuntimeError):
    """The post-training NVE gate failed with ``md_check.on_failure: fail``.

    Raised after ``model.eqf`` and ``final_metrics.json`` were written; ``result`` is the run's
    :class:`TrainResult` (``result.nve_check`` holds the verdict).
    """

    def __init__(self, message: str, result: TrainResult):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True)
class LoopOutcome:
    """What the training loop hands over: the potential as trained (E0s of the start), the weights to save
    (best validation epoch, EMA), dataset statistics and the loop's bookkeeping."""

    potential: Potential
    params: Any
    stats: dict[str, Any]
    trained_epochs: int
    best_epoch: int | None
    stopped_because: str
    first_step_s: float | None
    history: list[dict[str, Any]]
    lineage: list[dict[str, Any]] | None = None


def _with_energy(s: StructureSet, energy: np.ndarray) -> StructureSet:
    return dataclasses.replace(s, energy=energy)


def _energy_offset(potential: Potential, params: Any, train: StructureSet, **kw: Any) -> tuple[dict[int, float], float]:
    """Per-species least-squares fit of the training-set residuals ``E_ref − E_pred`` (eV per atom of each
    species) and their mean per atom (eV)."""
    pred = predict(potential, params, train, **kw)
    residual = _with_energy(train, train.energy - pred.energy)
    delta = fit_atomic_energies(residual, potential.species, warn=False)
    return delta, float(np.mean(residual.energy / train.n_atoms))


def refit_atomic_energies(potential: Potential, params: Any, train: StructureSet, **kw: Any) -> Potential:
    """Fold the network's remaining per-composition energy offset on the training set into the E0s.

    Least squares of the residuals ``E_ref − E_pred`` (eV) on composition (well-posed for single-composition
    sets, see :func:`~equiforce.data.statistics.fit_atomic_energies`), added to the E0s. Forces and stress do
    not change; the energy offset that a force-dominated loss leaves behind is removed.

    Args:
      potential, params: the trained potential.
      train: the training set (energy labels required).
      kw: passed to :func:`~equiforce.training.evaluate.predict` (graphs, budget, batch size, predict_fn).

    Returns:
      ``potential`` with new ``atomic_energies`` (eV, same species order).
    """
    delta, _ = _energy_offset(potential, params, train, **kw)
    return _shifted(potential, delta)


def _shifted(potential: Potential, delta: dict[int, float]) -> Potential:
    e0 = tuple(e + delta[z] for z, e in zip(potential.species, potential.atomic_energies, strict=True))
    return potential.replace(atomic_energies=e0)


def resolve_atomic_energies(
    cfg: TrainConfig,
    potential: Potential,
    params: Any,
    train: StructureSet,
    log: Callable[[str], None],
    **kw: Any,
) -> tuple[Potential, dict[str, Any]]:
    """The final E0s as ``model.refit_atomic_energies`` says, and their provenance per element.

    ``None`` re-fits fitted E0s (``model.atomic_energies: fit``) and keeps given ones; ``True`` re-fits
    either (logging old → new per element); ``False`` keeps them. The training set's remaining energy offset
    is measured either way; where it is kept it is logged, so a kept offset is never silent.

    Args:
      cfg: the run's config (``model.atomic_energies``, ``model.refit_atomic_energies``).
      potential, params: the trained potential (E0s as training used them).
      train: the training set.
      log: receives the messages.
      kw: passed to :func:`~equiforce.training.evaluate.predict`.

    Returns:
      ``(potential, provenance)``; provenance is ``{"refit_setting": None | bool,
      "train_energy_offset_meV_per_atom": mean (E_ref − E_pred)/N on the training set with the initial E0s,
      "shift_eV_per_atom": the potential's shift (added to every atom's energy besides its E0),
      "shift_from": where the shift comes from (:data:`SHIFT_FROM_GIVEN_E0S`, "none: fitted E0s carry the mean
      energy", or the fine-tuning source's),
      "elements": {"Z": {"symbol", "source": "fitted" | "given", "initial_eV", "offset_eV" (the per-species
      least-squares offset), "refitted", "final_eV"}}}``.
    """
    from ase.data import chemical_symbols

    given = isinstance(cfg.model.atomic_energies, dict)
    setting = cfg.model.refit_atomic_energies
    refit = (not given) if setting is None else bool(setting)
    delta, mean_offset = _energy_offset(potential, params, train, **kw)
    final = _shifted(potential, delta) if refit else potential
    source = "given" if given else "fitted"
    elements = {
        str(z): {
            "symbol": chemical_symbols[z],
            "source": source,
            "initial_eV": e0,
            "offset_eV": delta[z],
            "refitted": refit,
            "final_eV": e1,
        }
        for z, e0, e1 in zip(potential.species, potential.atomic_energies, final.atomic_energies, strict=True)
    }
    if refit and given:
        changes = ", ".join(f"{v['symbol']} {v['initial_eV']:.6f} → {v['final_eV']:.6f} eV" for v in elements.values())
        log(f"E0s given in the config re-fitted (model.refit_atomic_energies: true): {changes}")
    elif not refit:
        why = "given in the config" if given else "fitted before training"
        log(
            f"E0s {why} kept (model.refit_atomic_energies: {setting}); the trained model's mean energy error on "
            f"the training set is {-1e3 * mean_offset:+.2f} meV/atom (true would fold it into the E0s)"
        )
    record = {
        "refit_setting": setting,
        "train_energy_offset_meV_per_atom": 1e3 * mean_offset,
        "shift_eV_per_atom": float(final.shift),
        "shift_from": (
            "the source model's (fine-tuning)"
            if cfg.model.init_from is not None
            else SHIFT_FROM_GIVEN_E0S
            if given
            else "none: fitted E0s carry the mean energy"
        ),
        "elements": elements,
    }
    return final, record


def format_metrics(m: dict[str, float]) -> str:
    """One line of energy, force and (where evaluated) stress errors."""
    if "energy_mae_meV" not in m:
        return "no metrics"
    line = (
        f"energy MAE {m['energy_mae_meV']:.1f} meV ({m['energy_per_atom_mae_meV']:.2f} meV/atom), "
        f"RMSE {m['energy_rmse_meV']:.1f} meV; forces MAE {m['forces_mae_meV_per_A']:.1f} meV/Å, "
        f"RMSE {m['forces_rmse_meV_per_A']:.1f} meV/Å"
    )
    if "stress_mae_meV_per_A3" in m:
        gpa = 0.1602176634  # 1 meV/Å³ in GPa
        line += (
            f"; stress MAE {m['stress_mae_meV_per_A3']:.3f} meV/Å³ ({gpa * m['stress_mae_meV_per_A3']:.3f} GPa), "
            f"RMSE {m['stress_rmse_meV_per_A3']:.3f} meV/Å³"
        )
    return line


class _Steps:
    """Runs post-training steps, catching and recording their failures."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.errors: dict[str, str] = {}

    def run(self, name: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except Exception as err:  # optional steps must not lose the model; Ctrl-C still propagates
            msg = f"{type(err).__name__}: {err}"
            self.errors[name] = msg
            self.log(f"post-training step '{name}' failed (the model is saved regardless): {msg}")
            return default


def _write(out: Path, potential: Potential, params: Any, metadata: dict[str, Any]) -> Path:
    path = save_model(out / "model.eqf", potential, params, metadata)
    atomic_write_bytes(out / "final_metrics.json", json.dumps(metadata, indent=2, default=str).encode())
    return path


def _test_predictions(
    potential: Potential, params: Any, test: StructureSet, budget: PaddingBudget, kw: dict[str, Any]
) -> Predictions:
    test_graphs = build_neighbour_graphs(test, potential.r_max)
    if all(budget.fits(int(n), g.n_edges, 1) for n, g in zip(test.n_atoms, test_graphs, strict=True)):
        return predict(potential, params, test, graphs=test_graphs, **kw)
    # test structures larger than the training budget: a budget (and a compilation) of their own
    return predict(potential, params, test, batch_size=kw["batch_size"], graphs=test_graphs)


def _write_parity(path: Path, pred: Predictions, title: str) -> None:
    from equiforce.training.plots import parity_plot

    parity_plot(pred, path, title=title)


def _log_summary(
    vm: dict[str, float], tm: dict[str, float] | None, nve: dict[str, Any] | None, log: Callable[[str], None]
) -> None:
    log(f"valid: {format_metrics(vm)}")
    if tm is not None:
        log(f"test:  {format_metrics(tm)}")
    if nve is None:
        return
    limit = nve["threshold_meV_per_atom_per_ps"]
    if "drift_meV_per_atom_per_ps" in nve:
        figures = (
            f"drift {nve['drift_meV_per_atom_per_ps']:.3f} meV/atom/ps (limit ±{limit}), "
            f"fluctuation {nve['fluctuation_meV_per_atom']:.3f} meV/atom"
        )
        if "time_ps" in nve:
            figures += f", over {nve['steps']} steps = {nve['time_ps']:.3g} ps"
            if nve.get("stopped_by_time_limit"):
                figures += f" of {nve['steps_requested']} asked (time limit {nve['time_limit_s'] / 60:.1f} min)"
    else:
        figures = nve.get("message", "")
    verdict = {"passed": "PASSED", "failed": "FAILED", "blew_up": "FAILED (blew up)", "error": "FAILED (no run)"}
    log(f"NVE:   {verdict[nve['status']]}: {figures}")
    if not nve["passed"]:
        log(
            f"WARNING: the NVE energy-conservation check did not pass ({nve.get('message', nve['status'])}); "
            "this model may be unstable in MD"
        )


def _write_learning_curve(path: Path, history: list[dict[str, Any]]) -> None:
    from equiforce.training.plots import learning_curve_plot

    learning_curve_plot(history, path)


def _test_metrics(
    cfg: TrainConfig,
    out: Path,
    potential: Potential,
    params: Any,
    test: StructureSet,
    budget: PaddingBudget,
    kw: dict[str, Any],
    steps: _Steps,
) -> dict[str, float] | None:
    """Test-set metrics and the parity plot (two optional steps); None if the prediction failed."""
    tpred = steps.run("test_metrics", lambda: _test_predictions(potential, params, test, budget, kw))
    if tpred is None:
        return None
    steps.run("parity_plot", lambda: _write_parity(out / "parity_test.png", tpred, f"{cfg.model.name} test set"))
    return compute_metrics(tpred)


def _nve_gate(
    cfg: TrainConfig,
    potential: Potential,
    params: Any,
    valid: StructureSet,
    steps: _Steps,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The NVE check's verdict; a check that raised counts as a failed gate (status ``error``)."""
    from equiforce.training.nve_check import energy_conservation_check

    nve = steps.run(
        "nve_check",
        lambda: energy_conservation_check(
            potential, params, valid, cfg.md_check, log, training_budget_minutes=cfg.optim.time_budget_minutes
        ),
    )
    if nve is None:  # the check itself raised (it reports MD failures on its own)
        return {
            "status": "error",
            "passed": False,
            "blew_up": False,
            "threshold_meV_per_atom_per_ps": cfg.md_check.max_drift_meV_per_atom_per_ps,
            "on_failure": cfg.md_check.on_failure,
            "message": steps.errors["nve_check"],
        }
    if nve["status"] == "error":
        steps.errors["nve_check"] = nve["message"]
    return nve


def _calibrate(cfg: TrainConfig, potential: Potential, params: Any, data: Datasets, log: Callable[[str], None]):
    """The uncertainty calibrated on the validation set (LLPR also fitted on the training set), with its
    validation report."""
    from equiforce.uncertainty.calibration import calibrate

    bs = cfg.optim.batch_size
    potential, params, record = calibrate(potential, params, data.valid, train=data.train, batch_size=bs, log=log)
    record["valid_report"] = _uncertainty_report(cfg, potential, params, data.valid)
    return potential, params, record


def _uncertainty_report(cfg: TrainConfig, potential: Potential, params: Any, structures: StructureSet):
    from equiforce.uncertainty.calibration import predict_uncertainties
    from equiforce.uncertainty.metrics import uncertainty_report

    pred = predict_uncertainties(potential, params, structures, batch_size=cfg.optim.batch_size)
    return uncertainty_report(pred)


def finish_training(
    cfg: TrainConfig,
    out: Path,
    data: Datasets,
    loop: LoopOutcome,
    *,
    train_graphs: list[NeighbourGraph],
    valid_graphs: list[NeighbourGraph],
    budget: PaddingBudget,
    predict_fn: Any,
    elapsed: Callable[[], float],
    log: Callable[[str], None],
) -> TrainResult:
    """E0s, final metrics, model file, then test metrics, parity plot and the NVE gate (see the module doc).

    Args:
      cfg: the run's configuration.
      out: the output folder.
      data: train/valid/test sets.
      loop: what the training loop produced.
      train_graphs, valid_graphs, budget, predict_fn: the loop's neighbour graphs, padding budget and
        jitted prediction function (reused so nothing recompiles).
      elapsed: seconds of the run so far (resumed runs included).
      log: receives the messages.

    Returns:
      The :class:`TrainResult`.

    Raises:
      MDCheckFailedError: the NVE gate failed and ``md_check.on_failure`` is ``fail`` (after the files are
        written).
    """
    steps = _Steps(log)
    kw = {"batch_size": cfg.optim.batch_size, "budget": budget, "predict_fn": predict_fn}
    params = loop.params
    initial_e0 = {"refit_setting": cfg.model.refit_atomic_energies, "elements": None}
    final, e0_record = steps.run(
        "atomic_energies",
        lambda: resolve_atomic_energies(cfg, loop.potential, params, data.train, log, graphs=train_graphs, **kw),
        (loop.potential, initial_e0),
    )
    vm = steps.run(
        "valid_metrics", lambda: compute_metrics(predict(final, params, data.valid, graphs=valid_graphs, **kw)), {}
    )
    optional = []
    if cfg.model.uncertainty:
        optional.append("uncertainty")
    if data.test is not None:
        optional.append("test_metrics")
    if cfg.md_check.steps > 0:
        optional.append("nve_check")
    metadata: dict[str, Any] = {
        "trained_epochs": loop.trained_epochs,
        "best_epoch": loop.best_epoch,
        "stopped_because": loop.stopped_because,
        "training_time_s": elapsed(),
        "first_step_s": loop.first_step_s,
        "valid_metrics": vm,
        "test_metrics": None,
        "nve_check": None,
        "uncertainty": None,
        "atomic_energies": e0_record,
        "dataset_statistics": loop.stats,
        "lineage": loop.lineage or [],
        "n_train": data.train_size,
        "n_valid": len(data.valid),
        "n_test": None if data.test is None else len(data.test),
        "config": cfg.to_dict(),
        "post_training": {"complete": not optional, "pending": optional, "errors": dict(steps.errors)},
    }
    model_path = _write(out, final, params, metadata)
    if optional:
        log(f"model saved to {model_path}; now: {', '.join(optional)}")
    if loop.history:  # after the model file: a failing plot never costs the result
        steps.run("learning_curve", lambda: _write_learning_curve(out / "learning_curve.png", loop.history))

    t0 = time.perf_counter()
    unc = None
    if cfg.model.uncertainty:
        calibrated = steps.run("uncertainty", lambda: _calibrate(cfg, final, params, data, log))
        if calibrated is not None:
            final, params, unc = calibrated
    tm = None if data.test is None else _test_metrics(cfg, out, final, params, data.test, budget, kw, steps)
    if unc is not None and data.test is not None and data.test.forces is not None and data.test.energy is not None:
        unc["test_report"] = steps.run("test_uncertainty", lambda: _uncertainty_report(cfg, final, params, data.test))
    nve = None if cfg.md_check.steps == 0 else _nve_gate(cfg, final, params, data.valid, steps, log)
    if optional:
        metadata.update(
            test_metrics=tm,
            nve_check=nve,
            uncertainty=unc,
            post_training={
                "complete": True,
                "pending": [],
                "errors": dict(steps.errors),
                "time_s": time.perf_counter() - t0,
            },
        )
        model_path = _write(out, final, params, metadata)
    _log_summary(vm, tm, nve, log)
    if steps.errors:
        log(f"post-training steps that failed (recorded in the metadata): {sorted(steps.errors)}")
    log(f"model saved to {model_path}")
    result = TrainResult(
        model_path, final, params, vm, tm, loop.history, loop.stopped_because, nve_check=nve, metadata=metadata
    )
    if nve is not None and not nve["passed"] and cfg.md_check.on_failure == "fail":
        reason = nve.get("message", nve["status"])
        raise MDCheckFailedError(
            f"NVE energy-conservation gate failed ({reason}); md_check.on_failure is 'fail'. "
            f"The model is saved at {model_path} with the verdict in its metadata.",
            result,
        )
    return result
