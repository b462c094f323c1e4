"""Fit and calibrate a potential's uncertainty, and predict with it on a structure set.

* :func:`fit_llpr`: the single-network LLPR (Bigi et al., arXiv:2403.02251; see
  :mod:`equiforce.potentials.uncertainty`) of a trained model, from its last-layer features on the training
  set, with the regulariser ``ς²`` and the factors ``α_E``, ``α_F`` chosen on a validation set by Gaussian
  negative log-likelihood, as in the paper (Sec. 2.3).
* :func:`calibrate`: the factors of a committee (one scale per quantity, the maximum-likelihood
  ``s² = mean(ε²/σ²)`` of a Gaussian error model), or :func:`fit_llpr` for a single network.
* :func:`predict_uncertainties`: energies, forces, σ_E and σ_F of every structure of a set (host arrays).
* :func:`recalibrate`: refit the calibration of a model's σ (either method) on labelled frames, e.g. the
  validation frames plus the shifted frames an active-learning generation has just labelled: for forces the
  power law ``σ_F,i = a · σ_raw,i^b · σ̄_raw,s^q`` with ``σ̄_raw,s`` the structure's mean raw σ_F
  (:func:`fit_structure_power_law`), for energies ``a · σ_raw^b`` (:func:`fit_power_law`), with the coverage
  before and after.

Errors are energies per structure (eV) and force components (eV/Å); a force component is given its atom's
σ_F.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from equiforce.data.graph import PaddingBudget, estimate_budget
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graphs
from equiforce.data.structures import StructureSet
from equiforce.potentials.potential import Potential
from equiforce.potentials.predict import e0_sum, padded_batches, predict
from equiforce.potentials.uncertainty import UncertaintyConfig, last_layer_features, network_params

__all__ = [
    "UncertainPredictions",
    "UncertaintyError",
    "calibrate",
    "fit_llpr",
    "fit_power_law",
    "fit_scale",
    "fit_structure_power_law",
    "predict_uncertainties",
    "recalibrate",
    "structure_mean_sigma",
]

#: the range searched for the exponent ``b`` of :func:`fit_power_law` and :func:`fit_structure_power_law`
POWER_LAW_EXPONENT_RANGE = (0.1, 10.0)
#: the range searched for the structure exponent ``q`` of :func:`fit_structure_power_law`
STRUCTURE_EXPONENT_RANGE = (-5.0, 10.0)

#: LLPR regularisers tried, relative to the mean eigenvalue of the training features' Gram matrix
LLPR_REGULARIZERS = tuple(10.0 ** np.arange(-10, 1))


class UncertaintyError(ValueError):
    """The uncertainty cannot be fitted or used: no labels, no uncertainty in the model, degenerate data."""


@dataclasses.dataclass(frozen=True)
class UncertainPredictions:
    """Predictions with uncertainties of a structure set (host side, float64).

    Attributes:
      energy: ``[S]`` eV (E0s included); energy_ref: labels or None.
      forces: ``[n_atoms_total, 3]`` eV/Å (structures concatenated); forces_ref: labels or None.
      n_atoms: ``[S]``.
      energy_uncertainty: ``[S]`` σ_E, eV.
      forces_uncertainty: ``[n_atoms_total]`` σ_F per atom (one Cartesian component), eV/Å.
      member_energies: ``[K, S]`` committee members' energies (eV, E0s included), None for LLPR.
    """

    energy: np.ndarray
    energy_ref: np.ndarray | None
    forces: np.ndarray
    forces_ref: np.ndarray | None
    n_atoms: np.ndarray
    energy_uncertainty: np.ndarray
    forces_uncertainty: np.ndarray
    member_energies: np.ndarray | None = None


@functools.lru_cache(maxsize=8)
def _uncertainty_fn(potential: Potential) -> Callable:
    """The jitted ``(params, graph) -> (energy, forces, σ_E, σ_F, member energies)``, one per potential."""

    @jax.jit
    def fn(params: Any, graph: Any):
        p = potential.predict_uncertainty(params, graph, include_e0=False)
        energy = jax.ops.segment_sum(p.node_energies, jnp.asarray(graph.node_graph), num_segments=graph.n_graphs)
        return energy, p.forces, p.energy_uncertainty, p.forces_uncertainty, p.member_energies

    return fn


@functools.lru_cache(maxsize=8)
def _features_fn(single: Potential) -> Callable:
    """The jitted ``(params, graph) -> (G [n_graphs, P], g [n_nodes, P])`` last-layer features."""

    @jax.jit
    def fn(params: Any, graph: Any):
        g = last_layer_features(
            single.model.last_layer, params, lambda p: single.node_energies(p, graph, include_e0=False)
        )
        return jax.ops.segment_sum(g, jnp.asarray(graph.node_graph), num_segments=graph.n_graphs), g

    return fn


def predict_uncertainties(
    potential: Potential,
    params: Any,
    structures: StructureSet,
    *,
    batch_size: int = 16,
    graphs: list[NeighbourGraph] | None = None,
    budget: PaddingBudget | None = None,
) -> UncertainPredictions:
    """Mean energies and forces with calibrated σ_E and σ_F for every structure.

    Raises:
      UncertaintyError: the potential has no uncertainty.
      UnknownSpeciesError: an element the potential does not know.
    """
    if potential.uncertainty_config is None:
        raise UncertaintyError(
            "this model has no uncertainty: train a committee (model.ensemble_size > 1) or add the single-model "
            "LLPR uncertainty with `equiforce calibrate MODEL DATA`"
        )

    fn = _uncertainty_fn(potential)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("e", "f", "se", "sf", "m")}
    for batch in padded_batches(potential, structures, batch_size, graphs, budget):
        g = batch.graph
        e, f, se, sf, m = fn(params, jax.tree.map(jnp.asarray, g))
        n_real, n_nodes = int(np.sum(g.graph_mask)), int(np.sum(g.node_mask))
        parts["e"].append(np.asarray(e, np.float64)[:n_real])
        parts["f"].append(np.asarray(f, np.float64)[:n_nodes])
        parts["se"].append(np.asarray(se, np.float64)[:n_real])
        parts["sf"].append(np.asarray(sf, np.float64)[:n_nodes])
        if m is not None:
            parts["m"].append(np.asarray(m, np.float64)[:, :n_real])
    e0 = e0_sum(potential, structures)
    return UncertainPredictions(
        energy=np.concatenate(parts["e"]) + e0,
        energy_ref=structures.energy,
        forces=np.concatenate(parts["f"]),
        forces_ref=structures.forces,
        n_atoms=structures.n_atoms,
        energy_uncertainty=np.concatenate(parts["se"]),
        forces_uncertainty=np.concatenate(parts["sf"]),
        member_energies=np.concatenate(parts["m"], axis=1) + e0 if parts["m"] else None,
    )


def fit_scale(errors: np.ndarray, sigma: np.ndarray) -> float:
    """Maximum-likelihood factor ``s`` of a Gaussian error model ``ε ~ N(0, (s σ)²)``: ``sqrt(mean(ε²/σ²))``.

    Raises:
      UncertaintyError: no finite, positive σ, or all errors zero.
    """
    err = np.asarray(errors, np.float64).ravel()
    sig = np.asarray(sigma, np.float64).ravel()
    ok = np.isfinite(sig) & (sig > 0) & np.isfinite(err)
    if not np.any(ok):
        raise UncertaintyError("cannot calibrate: no finite, positive uncertainty to scale")
    s = float(np.sqrt(np.mean((err[ok] / sig[ok]) ** 2)))
    if not (s > 0 and np.isfinite(s)):
        raise UncertaintyError("cannot calibrate: the errors are all zero or not finite")
    return s


def _require_labels(s: StructureSet, what: str) -> None:
    if s.energy is None or s.forces is None:
        raise UncertaintyError(f"calibrating the uncertainty needs energy and forces labels in the {what} set")
    if len(s) < 2:
        raise UncertaintyError(f"calibrating the uncertainty needs at least 2 structures in the {what} set")


def _features(
    potential: Potential,
    params: Any,
    structures: StructureSet,
    batch_size: int,
    graphs: list[NeighbourGraph] | None = None,
    budget: PaddingBudget | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(G [S, P], g [n_atoms_total, P])``: per-structure and per-atom last-layer features (float64)."""
    single = potential.single()
    net = network_params(params)
    fn = _features_fn(single)
    per_graph, per_atom = [], []
    for batch in padded_batches(single, structures, batch_size, graphs, budget):
        gr = batch.graph
        big_g, g = fn(net, jax.tree.map(jnp.asarray, gr))
        per_graph.append(np.asarray(big_g, np.float64)[: int(np.sum(gr.graph_mask))])
        per_atom.append(np.asarray(g, np.float64)[: int(np.sum(gr.node_mask))])
    return np.concatenate(per_graph), np.concatenate(per_atom)


def _nll(errors: np.ndarray, sigma2: np.ndarray) -> float:
    """Mean Gaussian negative log-likelihood."""
    return float(np.mean(0.5 * np.log(2 * np.pi * sigma2) + 0.5 * errors**2 / sigma2))


def _projections(gram: np.ndarray) -> list[tuple[float, float, np.ndarray]]:
    """``(λ, ς², L)`` with ``Lᵀ L = (gram + ς² I)⁻¹`` for ``ς² = λ · tr(gram)/P``, λ in :data:`LLPR_REGULARIZERS`.

    Raises:
      UncertaintyError: features that are all zero.
    """
    mean_eig = float(np.trace(gram)) / gram.shape[0]
    if not mean_eig > 0:
        raise UncertaintyError("the training set's last-layer features are all zero: cannot fit LLPR")
    eigval, eigvec = np.linalg.eigh(gram)
    out = []
    for lam in LLPR_REGULARIZERS:
        reg = float(lam * mean_eig)
        out.append((float(lam), reg, (eigvec / np.sqrt(np.maximum(eigval, 0.0) + reg)).T))
    return out


def _best_scale(errors: np.ndarray, projections, features: np.ndarray, repeat: int) -> tuple[float, float, float]:
    """The ``(λ, ς², L, α)`` of lowest Gaussian NLL of ``errors`` under ``σ = α |L g|`` (ML ``α`` per ``L``)."""
    best = None
    for lam, reg, proj in projections:
        s2 = np.sum((proj @ features.T) ** 2, axis=0)
        if not np.all(s2 > 0):
            continue
        s2 = np.repeat(s2, repeat)
        alpha = fit_scale(errors, np.sqrt(s2))
        score = _nll(errors, alpha**2 * s2)
        if best is None or score < best[0]:
            best = (score, lam, reg, proj, alpha)
    if best is None:
        raise UncertaintyError("LLPR gave zero uncertainty on every validation structure: cannot calibrate")
    return best[1:]


def fit_llpr(
    potential: Potential,
    params: Any,
    train: StructureSet,
    valid: StructureSet,
    *,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> tuple[Potential, Any, dict[str, Any]]:
    """Add the calibrated last-layer prediction rigidity to a single trained network.

    From the training structures' last-layer features (labels not needed): ``A = Σ_s G_s G_sᵀ`` (energies) and
    ``A_F = Σ_atoms g_j g_jᵀ`` (forces, local prediction rigidity; see
    :mod:`equiforce.potentials.uncertainty`). For each regulariser ``ς² = λ · tr(A)/P`` with λ in
    :data:`LLPR_REGULARIZERS` the factor ``α`` is the maximum-likelihood scale on the validation errors, and
    the ``ς²`` with the lowest Gaussian NLL is kept, separately for energies and forces.

    Returns:
      ``(potential, params, record)``: the potential with ``uncertainty=UncertaintyConfig("llpr", ...)``,
      the parameters with the ``"llpr"`` collection, and what was fitted (JSON-serialisable).

    Raises:
      UncertaintyError: a committee (use :func:`calibrate`), a validation set without energy or forces
        labels, or features that are all zero.
    """
    if potential.ensemble_size > 1:
        raise UncertaintyError("LLPR is for a single network; a committee's uncertainty is its spread")
    _require_labels(valid, "validation")
    single = potential.single()
    net = network_params(params)
    # one padded shape for both sets: each jitted function compiles once
    graphs_t = build_neighbour_graphs(train, single.r_max)
    graphs_v = build_neighbour_graphs(valid, single.r_max)
    budget = estimate_budget(
        np.concatenate([train.n_atoms, valid.n_atoms]), [g.n_edges for g in graphs_t + graphs_v], batch_size
    )
    big_g, g_atoms = _features(single, net, train, batch_size, graphs_t, budget)
    gv, gv_atoms = _features(single, net, valid, batch_size, graphs_v, budget)
    pred = predict(single, net, valid, batch_size=batch_size, graphs=graphs_v, budget=budget)
    err_e = pred.energy - valid.energy
    err_f = (pred.forces - valid.forces).ravel()
    lam_e, reg_e, proj_e, alpha_e = _best_scale(err_e, _projections(big_g.T @ big_g), gv, 1)
    lam_f, reg_f, proj_f, alpha_f = _best_scale(err_f, _projections(g_atoms.T @ g_atoms), gv_atoms, 3)
    n_p = big_g.shape[1]
    config = UncertaintyConfig(
        "llpr",
        energy_scale=alpha_e,
        forces_scale=alpha_f,
        regularizer=reg_e,
        force_regularizer=reg_f,
        calibration=f"LLPR on {len(train)} training structures, scales on {len(valid)} validation structures",
    )
    dtype = np.dtype(potential.dtype)
    out_params = {
        **net,
        "llpr": {"projection": np.asarray(proj_e, dtype), "force_projection": np.asarray(proj_f, dtype)},
    }
    record = {
        "method": "llpr",
        "n_features": n_p,
        "regularizer": reg_e,
        "regularizer_relative": lam_e,
        "force_regularizer": reg_f,
        "force_regularizer_relative": lam_f,
        "energy_scale": alpha_e,
        "forces_scale": alpha_f,
        "n_train": len(train),
        "n_valid": len(valid),
    }
    if log:
        log(
            f"LLPR uncertainty: {n_p} last-layer features, ς² = {lam_e:.0e} (energies) and {lam_f:.0e} (forces) "
            f"x mean eigenvalue, α_E = {alpha_e:.4g}, α_F = {alpha_f:.4g}"
        )
    return single.replace(uncertainty=config), out_params, record


def calibrate(
    potential: Potential,
    params: Any,
    valid: StructureSet,
    *,
    train: StructureSet | None = None,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> tuple[Potential, Any, dict[str, Any]]:
    """Calibrate a potential's uncertainty on ``valid`` (and, for LLPR, fit it on ``train``).

    A committee gets one scale factor per quantity (energies, forces); a single network gets
    :func:`fit_llpr` (``train`` required).

    Returns:
      ``(potential, params, record)`` with the calibrated :class:`UncertaintyConfig`.

    Raises:
      UncertaintyError: missing labels, a single network without ``train``, degenerate uncertainties.
    """
    _require_labels(valid, "validation")
    if potential.ensemble_size == 1:
        if train is None:
            raise UncertaintyError("a single network's LLPR uncertainty needs the training structures")
        return fit_llpr(potential, params, train, valid, batch_size=batch_size, log=log)
    raw = potential.replace(uncertainty=UncertaintyConfig("committee"))
    pred = predict_uncertainties(raw, params, valid, batch_size=batch_size)
    s_e = fit_scale(pred.energy - valid.energy, pred.energy_uncertainty)
    s_f = fit_scale(pred.forces - valid.forces, pred.forces_uncertainty[:, None] * np.ones((1, 3)))
    config = UncertaintyConfig(
        "committee",
        energy_scale=s_e,
        forces_scale=s_f,
        calibration=f"committee spread scaled on {len(valid)} validation structures",
    )
    if log:
        log(f"committee uncertainty ({potential.ensemble_size} members): scale σ_E x {s_e:.4g}, σ_F x {s_f:.4g}")
    record = {"method": "committee", "energy_scale": s_e, "forces_scale": s_f, "n_valid": len(valid)}
    return potential.replace(uncertainty=config), network_params(params), record


def fit_power_law(errors: np.ndarray, sigma: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(a, b)`` of the Gaussian error model ``ε ~ N(0, (a σ^b)²)``.

    For a given ``b`` the best ``a`` is closed-form, ``a² = mean(ε² σ^(-2b))``, so the Gaussian NLL is
    minimised over ``b`` alone (its profile ``½ log mean(ε² σ^(-2b)) + b · mean(log σ)`` is convex in ``b``),
    within :data:`POWER_LAW_EXPONENT_RANGE`. ``b = 1`` is :func:`fit_scale`. ``b`` is determined only when the
    data hold a spread of σ; with all σ equal, ``b = 1`` is returned. ``a`` carries the unit of σ^(1-b).

    Args:
      errors: any shape, the signed or absolute errors (e.g. force components, eV/Å).
      sigma: the same shape, the raw σ of each error (same unit), finite and > 0 where used.

    Raises:
      UncertaintyError: no finite, positive σ, or all errors zero.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    err = np.asarray(errors, np.float64).ravel()
    sig = np.asarray(sigma, np.float64).ravel()
    if err.shape != sig.shape:
        raise UncertaintyError(f"errors and sigma differ in size: {err.shape} and {sig.shape}")
    ok = np.isfinite(sig) & (sig > 0) & np.isfinite(err)
    if not np.any(ok):
        raise UncertaintyError("cannot calibrate: no finite, positive uncertainty to scale")
    err2, log_s = err[ok] ** 2, np.log(sig[ok])
    if not np.any(err2 > 0):
        raise UncertaintyError("cannot calibrate: the errors are all zero")
    log_e2 = np.log(np.where(err2 > 0, err2, 1.0))
    keep = err2 > 0

    def log_a2(b: float) -> float:
        # log mean(ε² σ^(-2b)), stable for large b (zero errors add nothing to the mean)
        return float(logsumexp(log_e2[keep] - 2 * b * log_s[keep]) - np.log(err2.size))

    def profile(b: float) -> float:
        return 0.5 * log_a2(b) + b * float(np.mean(log_s))

    if np.ptp(log_s) < 1e-12:
        b = 1.0
    else:
        lo, hi = POWER_LAW_EXPONENT_RANGE
        b = float(minimize_scalar(profile, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x)
    a = float(np.exp(0.5 * log_a2(b)))
    if not (a > 0 and np.isfinite(a)):
        raise UncertaintyError("cannot calibrate: the fitted scale is not finite")
    return a, b


def structure_mean_sigma(sigma: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """``[n_atoms_total]``: each atom's structure mean of the per-atom ``sigma`` (structures concatenated in
    order, ``n_atoms`` ``[S]``), the σ̄ of :func:`fit_structure_power_law`."""
    n_atoms = np.asarray(n_atoms)
    sig = np.asarray(sigma, np.float64)
    idx = np.repeat(np.arange(n_atoms.size), n_atoms)
    return (np.bincount(idx, sig, minlength=n_atoms.size) / n_atoms)[idx]


def fit_structure_power_law(errors: np.ndarray, sigma: np.ndarray, n_atoms: np.ndarray) -> tuple[float, float, float]:
    """Maximum-likelihood ``(a, b, q)`` of ``ε_iα ~ N(0, (a σ_i^b σ̄_s^q)²)`` for force components.

    ``σ_i`` is atom i's raw σ_F and ``σ̄_s`` the mean raw σ_F of its structure. The structure term lets σ rise
    with a whole structure's distance from the training data more steeply than it varies between the atoms
    of one structure (``b + q`` is the structure-level exponent, ``b`` the atom-level one). For given
    ``(b, q)`` the best ``a`` is closed-form; the profile NLL ``½ log mean(ε² σ^(-2b) σ̄^(-2q)) + b·mean(log σ)
    + q·mean(log σ̄)`` is convex in ``(b, q)`` and minimised within :data:`POWER_LAW_EXPONENT_RANGE` and
    :data:`STRUCTURE_EXPONENT_RANGE`. With one structure, or no spread of σ̄, ``q = 0`` (:func:`fit_power_law`).

    Args:
      errors: ``[n_atoms_total, 3]`` force errors, eV/Å (structures concatenated in order).
      sigma: ``[n_atoms_total]`` raw σ_F per atom, eV/Å, > 0.
      n_atoms: ``[S]`` atoms per structure.

    Raises:
      UncertaintyError: mismatched shapes, a σ that is not finite and positive, all errors zero.
    """
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    err = np.asarray(errors, np.float64)
    sig = np.asarray(sigma, np.float64).ravel()
    n_atoms = np.asarray(n_atoms)
    if err.ndim != 2 or err.shape[0] != sig.size or int(np.sum(n_atoms)) != sig.size:
        raise UncertaintyError(
            f"errors [n_atoms, 3], sigma [n_atoms] and n_atoms must match, got {err.shape}, {sig.shape} and "
            f"{int(np.sum(n_atoms))} atoms"
        )
    if not np.all(np.isfinite(sig) & (sig > 0)) or not np.all(np.isfinite(err)):
        raise UncertaintyError("cannot calibrate: every σ must be finite and positive and every error finite")
    bar = structure_mean_sigma(sig, n_atoms)
    if n_atoms.size < 2 or np.ptp(np.log(bar)) < 1e-12:
        a, b = fit_power_law(err, np.repeat(sig[:, None], err.shape[1], axis=1))
        return a, b, 0.0
    e2 = (err**2).ravel()
    if not np.any(e2 > 0):
        raise UncertaintyError("cannot calibrate: the errors are all zero")
    keep = e2 > 0
    log_e2 = np.log(e2[keep])
    ls = np.repeat(np.log(sig), err.shape[1])
    lb = np.repeat(np.log(bar), err.shape[1])

    def log_a2(x: np.ndarray) -> float:
        return float(logsumexp(log_e2 - 2 * x[0] * ls[keep] - 2 * x[1] * lb[keep]) - np.log(e2.size))

    def profile(x: np.ndarray) -> float:
        return 0.5 * log_a2(x) + x[0] * float(np.mean(ls)) + x[1] * float(np.mean(lb))

    res = minimize(
        profile,
        np.array([1.0, 0.0]),
        method="L-BFGS-B",
        bounds=[POWER_LAW_EXPONENT_RANGE, STRUCTURE_EXPONENT_RANGE],
        options={"ftol": 1e-14, "gtol": 1e-10},
    )
    b, q = (float(v) for v in res.x)
    a = float(np.exp(0.5 * log_a2(res.x)))
    if not (a > 0 and np.isfinite(a)):
        raise UncertaintyError("cannot calibrate: the fitted scale is not finite")
    return a, b, q


def _coverage_95(errors: np.ndarray, sigma: np.ndarray) -> float:
    from scipy import stats

    return float(np.mean(np.abs(errors) <= stats.norm.ppf(0.975) * sigma))


def _as_structures(frames: Any) -> StructureSet:
    if isinstance(frames, StructureSet):
        return frames
    try:
        return StructureSet.from_atoms(list(frames), require_labels=True)
    except TypeError as exc:
        raise UncertaintyError(f"frames must be a StructureSet or a list of ase.Atoms, got {type(frames)}") from exc


def recalibrate(
    potential: Potential,
    params: Any,
    frames: Any,
    *,
    exponent: bool = True,
    structure_term: bool = True,
    min_energy_structures: int = 20,
    batch_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> tuple[Potential, Any, dict[str, Any]]:
    """Refit the calibration of a model's σ (LLPR or committee) on labelled ``frames``.

    Meant for the active-learning loop: after each generation, call it with the frames just labelled (they are
    the shifted ones) together with the earlier calibration frames, so that a σ threshold means the same thing
    in every generation. The raw σ (LLPR's quadratic form or the committee's spread, as the model computes it)
    is kept; only its calibration (:class:`~equiforce.potentials.uncertainty.UncertaintyConfig`
    ``forces_scale``/``forces_exponent``/``forces_structure_exponent`` and ``energy_scale``/``energy_exponent``)
    is refitted by Gaussian NLL: forces per Cartesian component, ``σ_F,i = a σ_raw,i^b σ̄_raw,s^q``
    (:func:`fit_structure_power_law`), energies per structure with ``a σ_raw^b`` (:func:`fit_power_law`) when
    there are at least ``min_energy_structures`` frames and one scale factor otherwise.
    Parameters are returned unchanged (LLPR's projections are not refitted: after retraining, call
    :func:`fit_llpr` first).

    Args:
      potential: a model with an uncertainty (LLPR or committee).
      params: its parameters (with the ``"llpr"`` collection for LLPR, stacked members for a committee).
      frames: a :class:`StructureSet` or a list of ``ase.Atoms`` with energy (eV) and forces (eV/Å) labels;
        at least 2 structures.
      exponent: fit the exponents (True) or keep ``b = 1, q = 0`` and fit one scale factor per quantity (False:
        what few frames support; the active-learning loop uses it below ``RECALIBRATE_MIN_STRUCTURES``).
      structure_term: with ``exponent``, fit the structure exponent ``q`` too (True) or keep ``q = 0``.

    Returns:
      ``(potential, params, record)``: the potential with the new calibration and a JSON-serialisable record
      with, per quantity, the fitted ``scale``, ``exponent`` (and, for forces, ``structure_exponent``) and the
      95 % coverage and Gaussian NLL on ``frames`` before (the model's current calibration) and after.

    Raises:
      UncertaintyError: a model without uncertainty, frames without labels or fewer than 2, degenerate σ.
    """
    structures = _as_structures(frames)
    _require_labels(structures, "recalibration")
    current = potential.uncertainty_config
    if current is None:
        raise UncertaintyError(
            "this model has no uncertainty to recalibrate: train a committee or fit LLPR (`equiforce calibrate`)"
        )
    raw_config = dataclasses.replace(
        current,
        energy_scale=1.0,
        forces_scale=1.0,
        energy_exponent=1.0,
        forces_exponent=1.0,
        forces_structure_exponent=0.0,
    )
    pred = predict_uncertainties(potential.replace(uncertainty=raw_config), params, structures, batch_size=batch_size)
    err_f = pred.forces - structures.forces  # [atoms, 3]
    raw_f = pred.forces_uncertainty  # [atoms]
    bar_f = structure_mean_sigma(raw_f, structures.n_atoms)
    err_e = pred.energy - structures.energy
    raw_e = pred.energy_uncertainty

    if exponent and structure_term:
        a_f, b_f, q_f = fit_structure_power_law(err_f, raw_f, structures.n_atoms)
    elif exponent:
        (a_f, b_f), q_f = fit_power_law(err_f, np.repeat(raw_f[:, None], 3, axis=1)), 0.0
    else:
        a_f, b_f, q_f = fit_scale(err_f, np.repeat(raw_f[:, None], 3, axis=1)), 1.0, 0.0
    if exponent and len(structures) >= min_energy_structures:
        a_e, b_e = fit_power_law(err_e, raw_e)
    else:
        a_e, b_e = fit_scale(err_e, raw_e), 1.0

    def forces_sigma(a: float, b: float, q: float) -> np.ndarray:
        return np.repeat(a * raw_f**b * bar_f**q, 3)

    q0 = current.forces_structure_exponent
    record: dict[str, Any] = {
        "method": current.method,
        "n_frames": len(structures),
        "exponent_fitted": exponent,
        "structure_term_fitted": exponent and structure_term,
    }
    for name, err, before, after, fitted in (
        (
            "forces",
            err_f.ravel(),
            forces_sigma(current.forces_scale, current.forces_exponent, q0),
            forces_sigma(a_f, b_f, q_f),
            {"scale": a_f, "exponent": b_f, "structure_exponent": q_f},
        ),
        (
            "energy",
            err_e,
            current.energy_scale * raw_e**current.energy_exponent,
            a_e * raw_e**b_e,
            {"scale": a_e, "exponent": b_e},
        ),
    ):
        ok = (before > 0) & (after > 0)
        record[name] = {
            **fitted,
            "coverage_95_before": _coverage_95(err[ok], before[ok]),
            "coverage_95_after": _coverage_95(err[ok], after[ok]),
            "nll_before": _nll(err[ok], before[ok] ** 2),
            "nll_after": _nll(err[ok], after[ok] ** 2),
        }
    config = dataclasses.replace(
        current,
        energy_scale=a_e,
        energy_exponent=b_e,
        forces_scale=a_f,
        forces_exponent=b_f,
        forces_structure_exponent=q_f,
        calibration=f"{current.method} σ recalibrated ({'power laws' if exponent else 'scale factors'}) on "
        f"{len(structures)} labelled structures",
    )
    if log:
        f = record["forces"]
        log(
            f"σ recalibrated on {len(structures)} frames: σ_F = {a_f:.4g} σ_raw^{b_f:.3f} σ̄_raw^{q_f:.3f}; 95 % "
            f"coverage of the force errors {f['coverage_95_before']:.3f} -> {f['coverage_95_after']:.3f}"
        )
    return potential.replace(uncertainty=config), params, record
