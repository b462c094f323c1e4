"""Prediction uncertainties computed with the forces, in one jit-compilable pass.

Two methods, both giving an energy uncertainty ``σ_E`` per structure (eV) and a force uncertainty ``σ_F``
per atom (eV/Å, the standard deviation of one Cartesian component):

``committee`` (deep ensemble; B. Lakshminarayanan, A. Pritzel, C. Blundell, arXiv:1612.01474; for MLIPs
e.g. J. S. Smith et al., J. Chem. Phys. 148, 241733 (2018), arXiv:1801.09319)
    ``K`` independently initialised networks whose parameters are stacked on a leading axis and
    ``jax.vmap``-ped. The prediction is the members' mean; ``σ_E`` is the sample standard deviation of the
    members' energies and ``σ_F[i] = sqrt(mean_α var_k F_kiα)``. Everything that does not depend on the
    parameters (edge vectors, spherical harmonics, radial basis) is computed once for all members: vmap
    over the parameters leaves it unbatched.

``llpr`` (last-layer prediction rigidity; F. Bigi, S. Chong, M. Ceriotti, F. Grasselli, "A prediction
rigidity formalism for low-cost uncertainties in trained neural networks", arXiv:2403.02251)
    One trained network. Every registered model ends in a linear map ``w`` (its *last layer*, named by the
    model config's ``last_layer`` patterns), so a per-atom energy is ``e_i = g_i · w + c_i`` with
    ``g_i = ∂e_i/∂w`` the atom's last-layer features. With ``G_s = Σ_{i∈s} g_i`` the features of a
    structure and ``A = Σ_train G_s G_sᵀ + ς² I``, the LLPR energy uncertainty is
    ``σ_E = α_E sqrt(G_sᵀ A⁻¹ G_s)`` (Bigi et al., Eq. 8). The exact LLPR force covariance would need
    ``∂G/∂positions``, one backward pass per feature. Instead σ_F uses the prediction rigidity of each atom's
    *local* energy (S. Chong et al., "Robustness of local predictions in atomistic machine learning models",
    J. Chem. Theory Comput. 19, 8020 (2023), arXiv:2306.15638) against the Gram matrix of the training
    *atoms'* features, ``A_F = Σ_train atoms g_j g_jᵀ + ς_F² I``: ``σ_F[i] = α_F sqrt(g_iᵀ A_F⁻¹ g_i)``, large
    for an atom whose environment's features are unlike those of the training atoms. It needs no backward
    pass beyond the force's own, so MD computes it at every step. (Measured on aspirin, ``BENCHMARKS.md``:
    the structure-level ``A`` and an LLPR ensemble of sampled last-layer weights ranked force errors worse.)

    Why LLPR: it needs no second network and no retraining, so ``equiforce calibrate`` adds it to any
    trained model file of any registered model; the shallow-ensemble alternative (Kellner & Ceriotti,
    arXiv:2402.16621) needs training with its own loss.

The stored LLPR state is the matrices ``L`` with ``Lᵀ L = A⁻¹`` (``projection``) and ``L_F`` with
``L_Fᵀ L_F = A_F⁻¹`` (``force_projection``), so ``σ² = |L g|²``, a sum of squares that float32 cannot make
negative, in the parameter collection ``"llpr"`` beside the network's ``"params"``.
Calibration factors (``α``) are in :class:`UncertaintyConfig`.

Calibration maps the raw σ of either method to ``σ_E = α_E · σ_E,raw^b_E`` and
``σ_F,i = α_F · σ_F,raw,i^b_F · σ̄_F,raw,s^q`` with ``σ̄_F,raw,s`` the mean raw σ_F over the atoms of atom
i's structure ``s`` (atoms with a zero raw σ, i.e. padding, left out). ``b = 1, q = 0`` (the defaults) is one
scale factor. The power laws are fitted by Gaussian NLL (:func:`equiforce.uncertainty.calibration.recalibrate`)
for a raw σ that rises too little with the error: LLPR's σ_F ranks atoms within a structure but rises too
little when whole structures move away from the training data (a temperature shift), which the structure
term ``q > 0`` corrects (``BENCHMARKS.md``). ``α`` then carries the unit of σ^(1-b-q) (eV, eV/Å). With
``q ≠ 0`` σ_F depends on the whole structure: in LAMMPS over several ranks the mean runs over each rank's
atoms and ghosts, so σ_F differs slightly from one rank's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = [
    "METHODS",
    "UncertainPrediction",
    "UncertaintyConfig",
    "last_layer_paths",
    "network_params",
    "predict_with_uncertainty",
    "split_last_layer",
]

METHODS = ("committee", "llpr")


@dataclasses.dataclass(frozen=True)
class UncertaintyConfig:
    """How a potential computes its uncertainty, and its calibration.

    Attributes:
      method: ``"committee"`` (needs ``Potential.ensemble_size > 1``) or ``"llpr"``.
      energy_scale: calibration factor ``α_E`` of ``σ_E = α_E · σ_E,raw^b_E`` (1: uncalibrated).
      forces_scale: calibration factor ``α_F`` of ``σ_F = α_F · σ_F,raw^b_F``.
      energy_exponent: the power ``b_E`` (1: one scale factor, the default).
      forces_exponent: the power ``b_F`` (1: one scale factor, the default).
      forces_structure_exponent: the power ``q`` of the structure's mean raw σ_F (0, the default: none).
      regularizer: LLPR's ``ς²`` (in units of the features squared); unused by committees.
      force_regularizer: the ``ς_F²`` of the atom-level Gram matrix of LLPR's σ_F.
      calibration: a short description of the data the factors were fitted on ("" when uncalibrated).

    Raises:
      ValueError: an unknown method, or a scale, exponent or regularizer that is not finite and positive.
    """

    method: str = "committee"
    energy_scale: float = 1.0
    forces_scale: float = 1.0
    regularizer: float = 0.0
    force_regularizer: float = 0.0
    calibration: str = ""
    energy_exponent: float = 1.0
    forces_exponent: float = 1.0
    forces_structure_exponent: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"uncertainty method must be one of {METHODS}, got {self.method!r}")
        for name in ("energy_scale", "forces_scale", "energy_exponent", "forces_exponent"):
            v = float(getattr(self, name))
            if not (v > 0 and v < float("inf")):
                raise ValueError(f"uncertainty {name} must be finite and positive, got {v}")
        q = float(self.forces_structure_exponent)
        if not abs(q) < float("inf"):
            raise ValueError(f"uncertainty forces_structure_exponent must be finite, got {q}")
        for name in ("regularizer", "force_regularizer"):
            v = float(getattr(self, name))
            if not (v >= 0 and v < float("inf")):
                raise ValueError(f"uncertainty {name} must be finite and >= 0, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class UncertainPrediction(NamedTuple):
    """Mean prediction with uncertainties (padding entries are zero).

    Attributes:
      node_energies: ``[n_nodes]`` per-atom energies, eV (E0s as the caller's energy function gives them).
      forces: ``[n_nodes, 3]`` eV/Å.
      energy_uncertainty: ``[n_graphs]`` calibrated σ_E, eV.
      forces_uncertainty: ``[n_nodes]`` calibrated σ_F per atom (one Cartesian component), eV/Å.
      member_energies: ``[K, n_graphs]`` committee members' energies, eV (None for LLPR).
    """

    node_energies: jnp.ndarray
    forces: jnp.ndarray
    energy_uncertainty: jnp.ndarray
    forces_uncertainty: jnp.ndarray
    member_energies: jnp.ndarray | None


def network_params(params: Any) -> Any:
    """The network's variables (``{"params": ...}``) without the LLPR collection."""
    if isinstance(params, dict) and "llpr" in params:
        return {k: v for k, v in params.items() if k != "llpr"}
    return params


def last_layer_paths(patterns: tuple[str, ...], params: Any) -> list[tuple[str, ...]]:
    """Flattened paths of the parameters matching the model's ``last_layer`` regular expressions (full match
    on the ``/``-joined path, e.g. ``params/output/kernel``), in a fixed (sorted) order.

    Raises:
      ValueError: no parameter matches (a model config whose ``last_layer`` patterns are out of date).
    """
    flat = flatten_dict(network_params(params))
    paths = sorted(k for k in flat if any(re.fullmatch(p, "/".join(map(str, k))) for p in patterns))
    if not paths:
        raise ValueError(f"no parameter matches the last-layer patterns {patterns}")
    return paths


def split_last_layer(patterns: tuple[str, ...], params: Any) -> tuple[jnp.ndarray, Callable[[jnp.ndarray], Any]]:
    """``(w, rebuild)``: the last-layer weights as one flat vector ``[P]`` and ``rebuild(w')``, the network
    variables with ``w'`` in their place (traceable)."""
    net = network_params(params)
    flat = flatten_dict(net)
    paths = last_layer_paths(patterns, net)
    shapes = [jnp.shape(flat[p]) for p in paths]
    sizes = [int(jnp.size(flat[p])) for p in paths]
    w = jnp.concatenate([jnp.ravel(flat[p]) for p in paths])

    def rebuild(w_new: jnp.ndarray) -> Any:
        out = dict(flat)
        start = 0
        for p, shape, size in zip(paths, shapes, sizes, strict=True):
            out[p] = w_new[start : start + size].reshape(shape)
            start += size
        return unflatten_dict(out)

    return w, rebuild


def _calibrated(scale: float, exponent: float, raw: jnp.ndarray) -> jnp.ndarray:
    """``scale · raw^exponent`` (``raw`` ≥ 0; zero stays zero, so padding stays zero)."""
    if float(exponent) == 1.0:
        return scale * raw
    return scale * jnp.power(raw, exponent)


def _calibrated_forces(
    config: UncertaintyConfig, raw: jnp.ndarray, node_graph: jnp.ndarray, n_graphs: int
) -> jnp.ndarray:
    """``α_F · raw_i^b_F · mean_s(raw)^q`` per atom (the structure mean over atoms with ``raw > 0``)."""
    sigma = _calibrated(config.forces_scale, config.forces_exponent, raw)
    q = float(config.forces_structure_exponent)
    if q == 0.0:
        return sigma
    real = raw > 0
    total = _segment_sum(raw, node_graph, n_graphs)
    count = _segment_sum(real.astype(raw.dtype), node_graph, n_graphs)
    mean = (total / jnp.maximum(count, 1.0))[node_graph]
    return jnp.where(real, sigma * jnp.power(jnp.where(real, mean, 1.0), q), 0.0)


def _segment_sum(x: jnp.ndarray, node_graph: jnp.ndarray, n_graphs: int) -> jnp.ndarray:
    return jax.ops.segment_sum(x, node_graph, num_segments=n_graphs)


def predict_with_uncertainty(
    config: UncertaintyConfig,
    last_layer: tuple[str, ...],
    params: Any,
    member_node_energies: Callable[[Any, jnp.ndarray], jnp.ndarray],
    positions: jnp.ndarray,
    node_graph: jnp.ndarray,
    n_graphs: int,
) -> UncertainPrediction:
    """Per-atom energies, forces and calibrated uncertainties from one pass (traceable; jit it).

    Args:
      config: method and calibration.
      last_layer: the model config's last-layer patterns (LLPR).
      params: committee: variables with every leaf stacked on a leading axis of size K; LLPR: the network's
        variables plus the ``"llpr"`` collection ``{"projection": [P, P], "force_projection": [P, P]}``.
      member_node_energies: ``(variables of one network, positions) -> [n_nodes]`` per-atom energies, eV,
        zero on padding.
      positions: ``[n_nodes, 3]`` what the forces are the negative gradient with respect to.
      node_graph: ``[n_nodes]`` int32 structure index of each atom; ``n_graphs`` (static) structures.
    """
    if config.method == "committee":
        net = network_params(params)

        def member(p: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
            def total(pos: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
                e = member_node_energies(p, pos)
                return jnp.sum(e), e

            grad, e = jax.grad(total, has_aux=True)(positions)
            return e, -grad

        e_k, f_k = jax.vmap(member)(net)  # [K, N], [K, N, 3]
        member_energies = jax.vmap(lambda e: _segment_sum(e, node_graph, n_graphs))(e_k)  # [K, G]
        sigma_e = jnp.std(member_energies, axis=0, ddof=1)
        sigma_f = jnp.sqrt(jnp.mean(jnp.var(f_k, axis=0, ddof=1), axis=-1))
        return UncertainPrediction(
            jnp.mean(e_k, axis=0),
            jnp.mean(f_k, axis=0),
            _calibrated(config.energy_scale, config.energy_exponent, sigma_e),
            _calibrated_forces(config, sigma_f, node_graph, n_graphs),
            member_energies,
        )
    proj = params["llpr"]["projection"]
    proj_f = params["llpr"]["force_projection"]

    def total(pos: jnp.ndarray):
        e, g = _energies_and_features(last_layer, params, lambda p: member_node_energies(p, pos))
        return jnp.sum(e), (e, jax.lax.stop_gradient(g))

    grad, (e, g) = jax.grad(total, has_aux=True)(positions)
    proj, proj_f = proj.astype(g.dtype), proj_f.astype(g.dtype)
    sigma_f = jnp.sqrt(jnp.sum((proj_f @ g) ** 2, axis=0))
    z_graphs = proj @ _segment_sum(g.T, node_graph, n_graphs).T  # [P, G]
    sigma_e = jnp.sqrt(jnp.sum(z_graphs**2, axis=0))
    return UncertainPrediction(
        e,
        -grad,
        _calibrated(config.energy_scale, config.energy_exponent, sigma_e),
        _calibrated_forces(config, sigma_f.astype(e.dtype), node_graph, n_graphs),
        None,
    )


def last_layer_features(
    last_layer: tuple[str, ...],
    params: Any,
    node_energies: Callable[[Any], jnp.ndarray],
) -> jnp.ndarray:
    """``[n_nodes, P]`` per-atom last-layer features ``g_i = ∂e_i/∂w`` (traceable).

    Args:
      node_energies: ``(network variables) -> [n_nodes]`` per-atom energies of one network.
    """
    return _energies_and_features(last_layer, params, node_energies)[1].T


def _energies_and_features(
    last_layer: tuple[str, ...], params: Any, node_energies: Callable[[Any], jnp.ndarray]
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(e [n_nodes], g [P, n_nodes])``: per-atom energies and last-layer features from one forward pass.

    ``e`` is linear in the last-layer weights ``w``, so the forward-mode products over the ``P`` basis
    directions only run through the last layer (vmap leaves the rest unbatched)."""
    w, rebuild = split_last_layer(last_layer, params)
    basis = jnp.eye(w.shape[0], dtype=w.dtype)

    def e_of(w_: jnp.ndarray) -> jnp.ndarray:
        return node_energies(rebuild(w_))

    return jax.vmap(lambda t: jax.jvp(e_of, (w,), (t,)), out_axes=(None, 0))(basis)
