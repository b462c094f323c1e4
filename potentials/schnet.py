"""SchNet: an invariant network of continuous-filter convolutions.

References:
  K. T. Schütt, P.-J. Kindermans, H. E. Sauceda, S. Chmiela, A. Tkatchenko, K.-R. Müller, "SchNet: A
  continuous-filter convolutional neural network for modeling quantum interactions", NeurIPS 2017,
  arXiv:1706.08566.
  K. T. Schütt, H. E. Sauceda, P.-J. Kindermans, A. Tkatchenko, K.-R. Müller, "SchNet – A deep learning
  architecture for molecules and materials", J. Chem. Phys. 148, 241722 (2018), arXiv:1712.06113.
  Reference implementation: atomistic-machine-learning/schnetpack (``representation/schnet.py``,
  ``nn/radial.py``, ``nn/cutoff.py``, ``nn/activations.py``, ``atomistic/atomwise.py``), followed here
  layer for layer.

Layer structure: species one-hot → bias-free linear embedding to ``num_features`` (schnetpack's
``nn.Embedding``); ``num_interactions`` interaction blocks, each a residual update ``x ← x + v`` with::

    h_j   = in2f(x_j)                                          (linear, no bias, num_filters)
    W_ij  = Dense(ssp(Dense(rbf(r_ij)))) · f_cut(r_ij)         (filter-generating network)
    m_i   = Σ_{j ∈ N(i)} h_j ⊙ W_ij                            (continuous-filter convolution)
    v_i   = Dense(ssp(Dense(m_i)))                              (f2out, back to num_features)

with the shifted softplus ``ssp(x) = softplus(x) - ln 2``, a Gaussian radial basis ``rbf`` of ``num_rbf``
centres evenly spaced on [0, r_max] with width equal to the spacing (schnetpack's ``GaussianRBF``) and a
cutoff ``f_cut`` (the polynomial envelope by default, or schnetpack's cosine cutoff); then an atom-wise output MLP
``num_features → num_features // 2 → 1`` with ssp (schnetpack's ``Atomwise``). The network only sees
interatomic distances, so it is invariant under O(3) by construction (no angular information).

Deviations from schnetpack, all optional or conventions of this package:
  * the default ``cutoff_fn="polynomial"`` replaces schnetpack's cosine cutoff by
    :func:`~equiforce.potentials.layers.polynomial_envelope` (p = 6): the cosine cutoff has zero value and
    slope at r_max but a non-zero curvature, so the force decays only linearly, ~1e-6 eV/Å at 1e-3 Å below
    r_max at init, and fails the package's smoothness check (force < 1e-6 eV/Å there); the envelope's
    force decays as (r_max - r)^2. Set ``cutoff_fn="cosine"`` to reproduce schnetpack/the paper;
  * ``normalise_neighbour_sum=True`` divides the neighbour sum by ``avg_num_neighbours`` (schnetpack does
    not; off by default);
  * the scale/shift/E0 of the per-atom outputs are applied by the :class:`~equiforce.potentials.potential.
    Potential`, not by the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from equiforce.potentials.layers import edge_lengths, full_edges, polynomial_envelope
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = [
    "CUTOFF_FUNCTIONS",
    "SchNet",
    "SchNetConfig",
    "SchNetInteraction",
    "cosine_cutoff",
    "gaussian_rbf",
    "shifted_softplus",
]

CUTOFF_FUNCTIONS = ("cosine", "polynomial")

# schnetpack's Dense layers: Xavier-uniform weights, zero biases; its embedding: N(0, 1).
_dense_init = jax.nn.initializers.glorot_uniform()
_embedding_init = jax.nn.initializers.normal(stddev=1.0)


def shifted_softplus(x: jnp.ndarray) -> jnp.ndarray:
    """``ssp(x) = ln(1 + e^x) - ln 2`` elementwise (so ``ssp(0) = 0``), in the dtype of ``x``.

    References: Schütt et al., arXiv:1706.08566, Sec. 3.
    """
    return jax.nn.softplus(x) - jnp.asarray(math.log(2.0), dtype=x.dtype)


def gaussian_rbf(r: jnp.ndarray, num_rbf: int, r_max: float) -> jnp.ndarray:
    """Gaussian radial basis ``exp(-(r - μ_k)² / (2 w²))`` with ``num_rbf`` centres μ_k evenly on [0, r_max].

    The width ``w`` is the spacing ``r_max / (num_rbf - 1)`` of the centres, as in schnetpack's
    ``GaussianRBF(n_rbf, cutoff)``.

    Args:
      r: ``[n_edges]`` distances in Å.
      num_rbf: number of Gaussians (>= 2).
      r_max: centre of the last Gaussian, Å.

    Returns:
      ``[n_edges, num_rbf]`` in the dtype of ``r``.

    Raises:
      ValueError: ``num_rbf < 2`` or ``r_max <= 0`` (the width would be zero).
    """
    if num_rbf < 2 or not r_max > 0:
        raise ValueError(f"gaussian_rbf needs num_rbf >= 2 and r_max > 0, got {num_rbf} and {r_max}")
    centres = jnp.linspace(0.0, r_max, num_rbf, dtype=r.dtype)
    width = r_max / (num_rbf - 1)
    coeff = jnp.asarray(-0.5 / width**2, dtype=r.dtype)
    return jnp.exp(coeff * (r[:, None] - centres) ** 2)


def cosine_cutoff(r: jnp.ndarray, r_max: float) -> jnp.ndarray:
    """Behler's cosine cutoff ``0.5 (cos(π r / r_max) + 1)`` for ``r < r_max``, zero beyond.

    Value and first derivative vanish at ``r = r_max`` (the second derivative does not).

    Args:
      r: distances in Å (any shape).
      r_max: cutoff radius, Å.

    Returns:
      same shape and dtype as ``r``.

    References:
      J. Behler, J. Chem. Phys. 134, 074106 (2011); schnetpack ``nn/cutoff.py`` (``CosineCutoff``).
    """
    f = 0.5 * (jnp.cos(r * jnp.asarray(math.pi / r_max, dtype=r.dtype)) + 1.0)
    return jnp.where(r < r_max, f, jnp.zeros_like(f))


@register_model
@dataclass(frozen=True)
class SchNetConfig(ModelConfig):
    """Hyperparameters of :class:`SchNet` (frozen; saved with the weights).

    Attributes:
      num_interactions: number of interaction blocks (schnetpack's MD17 recipe: 6).
      num_features: width of the atom-wise features (schnetpack ``n_atom_basis``).
      num_filters: width of the continuous filters (schnetpack ``n_filters``).
      num_rbf: number of Gaussians of the radial basis (>= 2).
      cutoff_fn: ``"polynomial"`` (:func:`~equiforce.potentials.layers.polynomial_envelope`, the default:
        smoother at r_max) or ``"cosine"`` (schnetpack and the paper; see the module docstring).
      envelope_p: exponent p of the polynomial envelope (used only with ``cutoff_fn="polynomial"``).
      normalise_neighbour_sum: divide the neighbour sum of every convolution by ``avg_num_neighbours``
        (schnetpack does not; off by default).

    Raises:
      ValueError: on a non-positive size, ``num_rbf < 2``, an unknown ``cutoff_fn`` or ``envelope_p < 2``.
    """

    name: ClassVar[str] = "schnet"
    #: regular expressions of the last linear layer's parameters (LLPR uncertainty; the output is linear in them)
    last_layer: ClassVar[tuple[str, ...]] = (r"params/output/kernel",)

    num_interactions: int = 3
    num_features: int = 128
    num_filters: int = 128
    num_rbf: int = 50
    cutoff_fn: str = "polynomial"
    envelope_p: int = 6
    normalise_neighbour_sum: bool = False

    def __post_init__(self) -> None:
        if self.num_interactions < 1:
            raise ValueError(f"num_interactions must be >= 1, got {self.num_interactions}")
        if self.num_features < 1 or self.num_filters < 1:
            raise ValueError(f"num_features and num_filters must be >= 1, got {self.num_features}, {self.num_filters}")
        if self.num_rbf < 2:
            raise ValueError(f"num_rbf must be >= 2 (the Gaussian width is the centre spacing), got {self.num_rbf}")
        if self.cutoff_fn not in CUTOFF_FUNCTIONS:
            raise ValueError(f"cutoff_fn must be one of {CUTOFF_FUNCTIONS}, got {self.cutoff_fn!r}")
        if self.envelope_p < 2:
            raise ValueError(f"envelope_p must be >= 2, got {self.envelope_p}")

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        return SchNet(config=self, num_species=num_species, r_max=r_max, avg_num_neighbours=avg_num_neighbours)


class SchNetInteraction(nn.Module):
    """One SchNet interaction block; returns the residual update ``v`` (``[n_nodes, num_features]``).

    Attributes:
      num_features: width of the atom-wise features.
      num_filters: width of the continuous filters.
      norm: the neighbour sum is divided by it (1.0: plain sum, as in schnetpack).
    """

    num_features: int
    num_filters: int
    norm: float = 1.0

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,  # [n_nodes, num_features]
        edge_rbf: jnp.ndarray,  # [n_edges, num_rbf]
        edge_cutoff: jnp.ndarray,  # [n_edges], zero on padding edges and beyond r_max
        senders: jnp.ndarray,  # [n_edges] int, neighbour j
        receivers: jnp.ndarray,  # [n_edges] int, centre i
    ) -> jnp.ndarray:
        n_nodes = x.shape[0]
        h = nn.Dense(self.num_filters, use_bias=False, kernel_init=_dense_init, name="in2f")(x)
        w = nn.Dense(self.num_filters, kernel_init=_dense_init, name="filter_0")(edge_rbf)
        w = nn.Dense(self.num_filters, kernel_init=_dense_init, name="filter_1")(shifted_softplus(w))
        w = w * edge_cutoff[:, None]
        m = jax.ops.segment_sum(h[senders] * w, receivers, num_segments=n_nodes)
        if self.norm != 1.0:
            m = m / jnp.asarray(self.norm, dtype=m.dtype)
        v = nn.Dense(self.num_features, kernel_init=_dense_init, name="f2out_0")(m)
        return nn.Dense(self.num_features, kernel_init=_dense_init, name="f2out_1")(shifted_softplus(v))


class SchNet(nn.Module):
    """The SchNet network: per-atom scalar outputs (unscaled) from edge vectors and species.

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (``pos[sender] - pos[receiver]`` + periodic shift), zero on
        padding edges; sets the dtype of the whole computation.
      species: ``[n_nodes]`` int, index into the potential's species table (0..num_species-1).
      senders, receivers: ``[n_edges]`` int (the receiver is the centre atom).
      edge_mask: ``[n_edges]`` bool; masked edges contribute nothing.
      half_list: the edges are a half neighbour list, each pair once (static); expanded to both directions.

    Returns:
      ``[n_nodes]`` per-atom outputs in the dtype of ``vectors``.
    """

    config: SchNetConfig
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
        dtype = vectors.dtype
        lengths = edge_lengths(vectors, edge_mask)
        edge_rbf = gaussian_rbf(lengths, cfg.num_rbf, self.r_max)
        if cfg.cutoff_fn == "cosine":
            cutoff = cosine_cutoff(lengths, self.r_max)
        else:
            cutoff = polynomial_envelope(lengths / jnp.asarray(self.r_max, dtype=dtype), cfg.envelope_p)
        edge_cutoff = cutoff * edge_mask.astype(dtype)

        onehot = jax.nn.one_hot(species, self.num_species, dtype=dtype)
        x = nn.Dense(cfg.num_features, use_bias=False, kernel_init=_embedding_init, name="embedding")(onehot)
        norm = float(self.avg_num_neighbours) if cfg.normalise_neighbour_sum else 1.0
        for i in range(cfg.num_interactions):
            x = x + SchNetInteraction(
                num_features=cfg.num_features, num_filters=cfg.num_filters, norm=norm, name=f"interaction_{i}"
            )(x, edge_rbf, edge_cutoff, senders, receivers)

        out = nn.Dense(max(cfg.num_features // 2, 1), kernel_init=_dense_init, name="output_hidden")(x)
        out = nn.Dense(1, kernel_init=_dense_init, name="output")(shifted_softplus(out))
        return out[:, 0]
