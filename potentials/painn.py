"""PaiNN: polarizable atom interaction neural network (equivariant message passing with vector features).

References:
  K. T. Schütt, O. T. Unke, M. Gastegger, "Equivariant message passing for the prediction of tensorial
  properties and molecular spectra", ICML 2021, arXiv:2102.03150. Reference implementation:
  atomistic-machine-learning/schnetpack, ``src/schnetpack/representation/painn.py``.

Every atom carries scalar features ``s_i`` ``[n_nodes, F]`` and vector features ``v_i`` ``[n_nodes, 3, F]``
(Cartesian, polar: odd under inversion), ``v = 0`` initially and ``s`` a learned species embedding.
Vectors are only ever built from the unit edge vectors ``r̂_ij`` and from ``v`` itself, and only scaled
by invariants, so the energy is O(3)-invariant (rotations and inversion). Each of ``num_interactions``
interactions is (paper eqs. (7)-(10), Fig. 2):

* message block (residual)::

      x_ij = φ(s_j) ∘ W(r_ij),  φ = Dense(F→3F)∘silu∘Dense(F→F),  W = Dense(rbf→3F) · f_cut(r_ij)
      (Δs_ij, Δv^v_ij, Δv^s_ij) = split(x_ij)
      s_i += Σ_j Δs_ij,   v_i += Σ_j (v_j ∘ Δv^v_ij + Δv^s_ij ∘ r̂_ij)

* update block (residual)::

      a = Dense(F→3F)∘silu∘Dense(2F→F)([s_i, ||V v_i||]),  (a_vv, a_sv, a_ss) = split(a)
      v_i += a_vv ∘ (U v_i),   s_i += a_ss + a_sv ∘ <U v_i, V v_i>

  with U, V bias-free linear maps on the channel axis and the NaN-safe norm ``sqrt(Σ_xyz (Vv)² + ε)``
  (finite gradients where ``v = 0``, e.g. isolated atoms).

Readout: per-atom MLP on ``s``: Dense(F→F/2), silu, Dense(F/2→1).

Choices (see :class:`PaiNNConfig`):

* Radial basis: the paper's ``sin(nπr/r_c)/r``, n = 1..num_rbf (:func:`~equiforce.potentials.layers.
  bessel_basis`, which only adds the constant sqrt(2/r_c) that the Dense absorbs).
* Cutoff: ``"cosine"`` (the paper's ``0.5 (cos(πr/r_c) + 1)``, value and slope zero at r_c, so energy and
  forces are continuous) or ``"polynomial"`` (:func:`~equiforce.potentials.layers.polynomial_envelope`,
  smoother: also the curvature vanishes at r_c, which MD energy conservation prefers).
* Neighbour sums: not normalised, as in the paper and schnetpack; ``normalize_sum=True`` divides them by
  the dataset's average number of neighbours (keeps feature scales independent of the density).
* Filters: ``shared_filters=False`` (default) gives each interaction its own filter ``W``, computed by
  one Dense ``rbf → num_interactions·3F`` as in schnetpack; ``shared_interactions=True`` reuses one
  interaction's weights for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from equiforce.potentials.layers import bessel_basis, edge_lengths, full_edges, polynomial_envelope, safe_unit_vectors
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = ["PaiNN", "PaiNNConfig", "PaiNNInteraction", "PaiNNMessage", "PaiNNUpdate", "cosine_cutoff"]

CUTOFF_FUNCTIONS = ("cosine", "polynomial")


def cosine_cutoff(r: jnp.ndarray, r_max: float) -> jnp.ndarray:
    """Behler's cosine cutoff ``0.5 (cos(π r / r_max) + 1)`` for r < r_max, 0 beyond (same shape/dtype as r).

    Value and first derivative vanish at r_max; used by PaiNN (arXiv:2102.03150, Sec. 4).

    References:
      J. Behler, "Atom-centered symmetry functions for constructing high-dimensional neural network
      potentials", J. Chem. Phys. 134, 074106 (2011).
    """
    f = 0.5 * (jnp.cos(jnp.pi * r / r_max) + 1.0)
    return jnp.where(r < r_max, f, jnp.zeros_like(f))


@register_model
@dataclass(frozen=True)
class PaiNNConfig(ModelConfig):
    """Hyperparameters of :class:`PaiNN` (frozen; saved with the weights).

    The defaults are the paper's MD17 setting (3 interactions, 128 features, 20 radial functions, cosine
    cutoff; the cutoff radius r_c = 5 Å is the Potential's ``r_max``).

    Attributes:
      num_interactions: number of interaction (message + update) blocks.
      num_features: channels F of the scalar and of the vector features.
      num_rbf: number of ``sin(nπr/r_c)/r`` radial basis functions.
      cutoff_fn: ``"cosine"`` (paper) or ``"polynomial"`` (the envelope of ``envelope_p``).
      envelope_p: exponent p of the polynomial envelope (only used with ``cutoff_fn="polynomial"``).
      shared_filters: use one radial filter network for every interaction.
      shared_interactions: use the same interaction weights in every layer.
      normalize_sum: divide the neighbour sums by the average number of neighbours (the paper does not).
      epsilon: added under the square root of the vector norm ``||V v||`` (NaN-safe gradient at v = 0).

    Raises:
      ValueError: on a non-positive size, an unknown ``cutoff_fn``, ``envelope_p < 2`` or ``epsilon <= 0``.
    """

    name: ClassVar[str] = "painn"
    #: regular expressions of the last linear layer's parameters (LLPR uncertainty; the output is linear in them)
    last_layer: ClassVar[tuple[str, ...]] = (r"params/readout_out/kernel",)

    num_interactions: int = 3
    num_features: int = 128
    num_rbf: int = 20
    cutoff_fn: str = "cosine"
    envelope_p: int = 6
    shared_filters: bool = False
    shared_interactions: bool = False
    normalize_sum: bool = False
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if self.num_interactions < 1:
            raise ValueError(f"num_interactions must be >= 1, got {self.num_interactions}")
        if self.num_features < 1 or self.num_rbf < 1:
            raise ValueError(f"num_features and num_rbf must be >= 1, got {self.num_features}, {self.num_rbf}")
        if self.cutoff_fn not in CUTOFF_FUNCTIONS:
            raise ValueError(f"cutoff_fn must be one of {CUTOFF_FUNCTIONS}, got {self.cutoff_fn!r}")
        if self.envelope_p < 2:
            raise ValueError(f"envelope_p must be >= 2, got {self.envelope_p}")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {self.epsilon}")

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        return PaiNN(config=self, num_species=num_species, r_max=r_max, avg_num_neighbours=avg_num_neighbours)


class PaiNNMessage(nn.Module):
    """Message block (paper eq. (7)-(8)): feature increments ``(Δs [n_nodes, F], Δv [n_nodes, 3, F])``.

    Attributes:
      num_features: F.
      norm: the neighbour sums are divided by this (1.0: plain sums).
    """

    num_features: int
    norm: float = 1.0

    @nn.compact
    def __call__(
        self,
        s: jnp.ndarray,  # [n_nodes, F]
        v: jnp.ndarray,  # [n_nodes, 3, F]
        filters: jnp.ndarray,  # [n_edges, 3F], W(r_ij) times cutoff, zero on padding / beyond r_max
        unit_vectors: jnp.ndarray,  # [n_edges, 3] r̂_ij (receiver → sender)
        senders: jnp.ndarray,  # [n_edges]
        receivers: jnp.ndarray,  # [n_edges]
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        f, dtype, n_nodes = self.num_features, s.dtype, s.shape[0]
        phi = nn.Dense(f, dtype=dtype, name="phi_hidden")(s)
        phi = nn.Dense(3 * f, dtype=dtype, name="phi_out")(jax.nn.silu(phi))
        x = phi[senders] * filters  # [n_edges, 3F]
        ds, dv_v, dv_s = jnp.split(x, 3, axis=-1)
        dv = v[senders] * dv_v[:, None, :] + dv_s[:, None, :] * unit_vectors[:, :, None]  # [n_edges, 3, F]
        ds = jax.ops.segment_sum(ds, receivers, num_segments=n_nodes)
        dv = jax.ops.segment_sum(dv, receivers, num_segments=n_nodes)
        if self.norm != 1.0:
            inv = jnp.asarray(1.0 / self.norm, dtype)
            ds, dv = ds * inv, dv * inv
        return ds, dv


class PaiNNUpdate(nn.Module):
    """Update block (paper eq. (9)-(10)): atom-wise increments ``(Δs [n_nodes, F], Δv [n_nodes, 3, F])``.

    Attributes:
      num_features: F.
      epsilon: stabiliser of the vector norm ``sqrt(Σ_xyz (V v)² + ε)``.
    """

    num_features: int
    epsilon: float = 1e-8

    @nn.compact
    def __call__(self, s: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        f, dtype = self.num_features, s.dtype
        uv = nn.Dense(f, use_bias=False, dtype=dtype, name="U")(v)  # [n_nodes, 3, F]
        vv = nn.Dense(f, use_bias=False, dtype=dtype, name="V")(v)
        vv_norm = jnp.sqrt(jnp.sum(vv**2, axis=1) + jnp.asarray(self.epsilon, dtype))  # [n_nodes, F]
        a = nn.Dense(f, dtype=dtype, name="context_hidden")(jnp.concatenate([s, vv_norm], axis=-1))
        a = nn.Dense(3 * f, dtype=dtype, name="context_out")(jax.nn.silu(a))
        a_vv, a_sv, a_ss = jnp.split(a, 3, axis=-1)
        dv = a_vv[:, None, :] * uv
        ds = a_ss + a_sv * jnp.sum(uv * vv, axis=1)
        return ds, dv


class PaiNNInteraction(nn.Module):
    """One interaction: message block then update block, both residual. Returns the new ``(s, v)``."""

    num_features: int
    norm: float = 1.0
    epsilon: float = 1e-8

    @nn.compact
    def __call__(
        self,
        s: jnp.ndarray,
        v: jnp.ndarray,
        filters: jnp.ndarray,
        unit_vectors: jnp.ndarray,
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        ds, dv = PaiNNMessage(self.num_features, self.norm, name="message")(
            s, v, filters, unit_vectors, senders, receivers
        )
        s, v = s + ds, v + dv
        ds, dv = PaiNNUpdate(self.num_features, self.epsilon, name="update")(s, v)
        return s + ds, v + dv


class PaiNN(nn.Module):
    """The PaiNN network: per-atom scalar outputs (unscaled) from edge vectors and species.

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (``pos[senders] - pos[receivers]``), zero on padding.
      species: ``[n_nodes]`` int, index into the potential's species table (0..num_species-1).
      senders, receivers: ``[n_edges]`` int; the receiver is the centre atom i.
      edge_mask: ``[n_edges]`` bool.
      half_list: the edges are a half neighbour list, each pair once (static); expanded to both directions.

    Returns:
      ``[n_nodes]`` outputs in the dtype of ``vectors``. The final features of interaction k are the
      output of submodule ``interaction_k`` (``interaction`` when shared), readable with flax's
      ``capture_intermediates=True``.
    """

    config: PaiNNConfig
    num_species: int
    r_max: float
    avg_num_neighbours: float

    @nn.compact
    def __call__(
        self,
        vectors: jnp.ndarray,
        species: jnp.ndarray,
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
        edge_mask: jnp.ndarray,
        *,
        half_list: bool = False,
    ) -> jnp.ndarray:
        cfg = self.config
        if half_list:  # a half neighbour list: this model evaluates every directed edge
            vectors, senders, receivers, edge_mask = full_edges(vectors, senders, receivers, edge_mask)
        f, dtype = cfg.num_features, vectors.dtype
        n_nodes = species.shape[0]

        lengths = edge_lengths(vectors, edge_mask)  # [n_edges], 1 on padding
        unit_vectors = safe_unit_vectors(vectors, edge_mask) / lengths[:, None]
        if cfg.cutoff_fn == "cosine":
            cutoff = cosine_cutoff(lengths, self.r_max)
        else:
            cutoff = polynomial_envelope(lengths / self.r_max, cfg.envelope_p)
        cutoff = cutoff * edge_mask.astype(dtype)
        rbf = bessel_basis(lengths, cfg.num_rbf, self.r_max)  # [n_edges, num_rbf]

        n_filters = 1 if cfg.shared_filters else cfg.num_interactions
        filters = nn.Dense(n_filters * 3 * f, dtype=dtype, name="filter_net")(rbf) * cutoff[:, None]
        filters = jnp.split(filters, n_filters, axis=-1)

        s = nn.Embed(self.num_species, f, dtype=dtype, name="embedding")(species)  # [n_nodes, F]
        v = jnp.zeros((n_nodes, 3, f), dtype)
        norm = float(self.avg_num_neighbours) if cfg.normalize_sum else 1.0
        shared = PaiNNInteraction(f, norm, cfg.epsilon, name="interaction") if cfg.shared_interactions else None
        for i in range(cfg.num_interactions):
            block = shared if shared is not None else PaiNNInteraction(f, norm, cfg.epsilon, name=f"interaction_{i}")
            s, v = block(s, v, filters[0 if cfg.shared_filters else i], unit_vectors, senders, receivers)

        out = nn.Dense(max(f // 2, 1), dtype=dtype, name="readout_hidden")(s)
        out = nn.Dense(1, dtype=dtype, name="readout_out")(jax.nn.silu(out))
        return out[:, 0]
