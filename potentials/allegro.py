"""Allegro: strictly local, edge-based E(3)-equivariant interatomic potential.

References:
  A. Musaelian, S. Batzner, A. Johansson, L. Sun, C. J. Owen, M. Kornbluth, B. Kozinsky, "Learning local
  equivariant representations for large-scale atomistic dynamics", Nat. Commun. 14, 579 (2023),
  arXiv:2204.05249. Reference implementation: mir-group/allegro (``allegro/nn/_allegro.py``,
  ``allegro/nn/_edgewise.py``, v0.2 layout with the latent ResNet).

Every quantity lives on the directed edges ij of the neighbour graph (i = receiver = centre atom,
j = sender), so the energy of atom i depends only on the atoms within ``r_max`` of i (no message passing):

* two-body latent ``x_ij = MLP_2b([onehot(Z_i), onehot(Z_j), B(r_ij) u(r_ij)]) u(r_ij)`` (Bessel basis B,
  polynomial envelope u);
* a linear map of ``x_ij`` gives per-channel, per-l weights; the initial tensor features are
  ``V_ij = w_ij ⊙ Y(r̂_ij)`` (``num_tensor_features`` channels of every spherical harmonic l ≤ ``l_max``);
* each of ``num_layers`` layers: environment embedding of the centre ``Γ_i = Σ_k w_ik ⊙ Y(r̂_ik) / sqrt(N_avg)``
  with weights ``w_ik`` linear in the current latent ``x_ik``; channel-wise ("uuu", weightless) tensor
  product ``V_ij ⊗ Γ_i`` filtered to the allowed irreps (the last layer keeps only scalars); the even
  scalars (0e) of the product are concatenated with ``x_ij`` and fed to the latent MLP, whose output times
  ``u(r_ij)`` updates the latent by the normalised residual ``x ← (x + α x_new) / sqrt(1 + α²)``;
  a linear layer mixes channels and paths of the tensor features (not needed after the last layer);
* edge energy ``E_ij = MLP_E(x_ij) u(r_ij)``, per-atom output ``Σ_{j: receiver i} E_ij / sqrt(N_avg)``
  (the reference's ``normalize_edge_energy_sum``).

Built on e3nn-jax irreps, tensor products and spherical harmonics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from equiforce.potentials.layers import (
    edge_lengths,
    full_edges,
    polynomial_envelope,
    radial_embedding,
    safe_unit_vectors,
)
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = ["Allegro", "AllegroConfig", "tensor_track_irreps"]


def _allowed_irreps(l_max: int, parity: bool) -> e3nn.Irreps:
    """One copy of every irrep l ≤ l_max: both parities with ``parity``, else only the natural (-1)^l."""
    irreps = []
    for ell in range(l_max + 1):
        natural = 1 if ell % 2 == 0 else -1
        irreps.append((1, (ell, natural)))
        if parity:
            irreps.append((1, (ell, -natural)))
    return e3nn.Irreps(irreps)


def _products(ir_a: e3nn.Irrep, env: e3nn.Irreps) -> set[e3nn.Irrep]:
    return {ir for _, ir_env in env for ir in ir_a * ir_env}


def tensor_track_irreps(num_layers: int, l_max: int, parity: bool) -> list[e3nn.Irreps]:
    """Irreps (one copy each) of the tensor features before the first and after every tensor product.

    Follows the reference: starting from the spherical harmonics ``Y`` (l ≤ l_max), layer n keeps the
    allowed irreps that ``features ⊗ Y`` can produce (only ``0e`` after the last layer); then irreps that
    cannot contribute to any later output are pruned backwards.

    Returns:
      ``num_layers + 1`` irreps; entry 0 is the initial edge features, the last is ``1x0e``.
    """
    env = e3nn.Irreps.spherical_harmonics(l_max)
    allowed = _allowed_irreps(l_max, parity)
    irreps = [env]
    for layer in range(num_layers):
        target = e3nn.Irreps("0e") if layer == num_layers - 1 else allowed
        reachable = set().union(*(_products(ir, env) for _, ir in irreps[-1]))
        irreps.append(e3nn.Irreps([(1, ir) for _, ir in target if ir in reachable]))
    pruned = [irreps[-1]]
    for arg in reversed(irreps[:-1]):
        wanted = {ir for _, ir in pruned[-1]}
        pruned.append(e3nn.Irreps([(1, ir) for _, ir in arg if _products(ir, env) & wanted]))
    return list(reversed(pruned))


def _as_width_tuple(name: str, value: Sequence[int]) -> tuple[int, ...]:
    try:
        widths = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return widths


@register_model
@dataclass(frozen=True)
class AllegroConfig(ModelConfig):
    """Hyperparameters of :class:`Allegro` (frozen; saved with the weights).

    Attributes:
      num_layers: number of Allegro layers (tensor products); body order ``num_layers + 2``. Paper: 1-3.
      l_max: maximum rotation order of the spherical harmonics and tensor features.
      num_tensor_features: channels per irrep of the equivariant (tensor) track.
      parity: keep both parities of every l in the tensor track (the reference's ``o3_full``), or only
        (-1)^l (``o3_restricted``). Only the even scalars enter the latents, so the energy is O(3)
        invariant either way. With ``num_layers <= 2`` the backward pruning removes the extra parities,
        so the flag matters from 3 layers on (as in the reference).
      latent_dim: width of the scalar edge latent x_ij (the output width of the two-body and latent MLPs).
      two_body_mlp_hidden: hidden widths of the two-body MLP (then a linear layer to ``latent_dim``).
      latent_mlp_hidden: hidden widths of each layer's latent MLP (then a linear layer to ``latent_dim``).
      edge_energy_mlp_hidden: hidden widths of the edge-energy MLP (then a linear layer to one scalar);
        linear layers without nonlinearity, as the reference's ``edge_eng_mlp_nonlinearity: null``.
      num_bessel: number of Bessel radial basis functions.
      envelope_p: exponent p of the polynomial cutoff envelope.
      latent_resnet_update_ratio: α of the residual latent update ``(x + α x_new) / sqrt(1 + α²)``
        (reference default sigmoid(0) = 0.5, not trained).

    Sequences given as lists (e.g. from JSON) are stored as tuples.

    Raises:
      ValueError: on a non-positive size, ``l_max`` outside 0..6, ``envelope_p < 2`` or a non-positive ratio.
    """

    name: ClassVar[str] = "allegro"
    #: regular expressions of the last linear layer's parameters (LLPR uncertainty; the output is linear in them)
    last_layer: ClassVar[tuple[str, ...]] = (r"params/edge_energy_mlp/Dense_1/kernel",)
    #: the two-body MLP's input is [one-hot(receiver), one-hot(sender), radial basis]
    species_blocks: ClassVar[tuple[tuple[str, int, int, bool], ...]] = (
        (r"params/two_body_mlp/Dense_0/kernel", 0, 2, True),
    )

    num_layers: int = 2
    l_max: int = 2
    num_tensor_features: int = 32
    parity: bool = False
    latent_dim: int = 64
    two_body_mlp_hidden: tuple[int, ...] = (32, 64)
    latent_mlp_hidden: tuple[int, ...] = (64,)
    edge_energy_mlp_hidden: tuple[int, ...] = (32,)
    num_bessel: int = 8
    envelope_p: int = 6
    latent_resnet_update_ratio: float = 0.5

    def __post_init__(self) -> None:
        for field in ("two_body_mlp_hidden", "latent_mlp_hidden", "edge_energy_mlp_hidden"):
            object.__setattr__(self, field, _as_width_tuple(field, getattr(self, field)))
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.l_max < 0 or self.l_max > 6:
            raise ValueError(f"l_max must lie in 0..6, got {self.l_max}")
        for field in ("num_tensor_features", "latent_dim", "num_bessel"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.envelope_p < 2:
            raise ValueError(f"envelope_p must be >= 2, got {self.envelope_p}")
        if not (math.isfinite(self.latent_resnet_update_ratio) and self.latent_resnet_update_ratio > 0):
            raise ValueError(f"latent_resnet_update_ratio must be positive, got {self.latent_resnet_update_ratio}")

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        return Allegro(config=self, num_species=num_species, r_max=r_max, avg_num_neighbours=avg_num_neighbours)


def _mlp(hidden: tuple[int, ...], out: int, act: Any, name: str) -> nn.Module:
    """Bias-free MLP (like the reference's ``ScalarMLPFunction``): no activation after the last layer."""
    return e3nn.flax.MultiLayerPerceptron((*hidden, out), act=act, output_activation=False, name=name)


def _weighted_channels(weights: jnp.ndarray, sh: e3nn.IrrepsArray, channels: int) -> e3nn.IrrepsArray:
    """``[n_edges, channels, sh.dim]`` features ``w[e, u, l] Y_l(r̂_e)`` (one weight per channel and irrep).

    Args:
      weights: ``[n_edges, channels * len(sh.irreps)]``.
      sh: ``[n_edges, sh.dim]`` spherical harmonics.
    """
    index = np.concatenate([np.full(ir.dim, k) for k, (_, ir) in enumerate(sh.irreps)])
    w = weights.reshape(weights.shape[0], channels, len(sh.irreps))[:, :, index]
    return e3nn.IrrepsArray(sh.irreps, w * sh.array[:, None, :])


class Allegro(nn.Module):
    """The Allegro network: per-atom scalar outputs (unscaled) from edge vectors and species.

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (receiver → sender), zero on padding edges.
      species: ``[n_nodes]`` int, index into the potential's species table (0..num_species-1).
      senders, receivers: ``[n_edges]`` int; the receiver is the centre atom i of edge ij.
      edge_mask: ``[n_edges]`` bool.
      half_list: the edges are a half neighbour list, each pair once (static); expanded to both directions.

    Returns:
      ``[n_nodes]`` per-atom outputs in the dtype of ``vectors``: the sum of the edge energies of the
      edges centred on each atom divided by ``sqrt(avg_num_neighbours)``; zero for atoms without
      neighbours within ``r_max``. Padding edges and edges beyond ``r_max`` contribute exactly zero.
    """

    config: AllegroConfig
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
        n_nodes = species.shape[0]
        channels = cfg.num_tensor_features
        act = jax.nn.silu
        inv_sqrt_neighbours = 1.0 / math.sqrt(self.avg_num_neighbours)  # Python float: keeps the dtype
        coeff_old = 1.0 / math.sqrt(1.0 + cfg.latent_resnet_update_ratio**2)
        coeff_new = cfg.latent_resnet_update_ratio * coeff_old

        lengths = edge_lengths(vectors, edge_mask)
        envelope = (polynomial_envelope(lengths / self.r_max, cfg.envelope_p) * edge_mask.astype(dtype))[:, None]
        radial = radial_embedding(
            lengths, edge_mask, r_max=self.r_max, num_basis=cfg.num_bessel, envelope_p=cfg.envelope_p
        )
        sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(cfg.l_max),
            safe_unit_vectors(vectors, edge_mask),
            normalize=True,
            normalization="component",
        )
        n_env_weights = channels * len(sh.irreps)
        track = tensor_track_irreps(cfg.num_layers, cfg.l_max, cfg.parity)

        # two-body latent and initial tensor features
        onehot = jax.nn.one_hot(species, self.num_species, dtype=dtype)
        latent = _mlp(cfg.two_body_mlp_hidden, cfg.latent_dim, act, "two_body_mlp")(
            jnp.concatenate([onehot[receivers], onehot[senders], radial], axis=-1)
        )
        latent = latent * envelope
        weights = _mlp((), 2 * n_env_weights, None, "env_embed_0")(latent)
        features = _weighted_channels(weights[:, :n_env_weights], sh, channels).filter(keep=track[0])
        env_weights = weights[:, n_env_weights:]

        for layer in range(cfg.num_layers):
            if layer > 0:
                env_weights = _mlp((), n_env_weights, None, f"env_embed_{layer}")(latent)
            # environment of the centre atom, scattered back onto its edges
            env_edges = _weighted_channels(env_weights, sh, channels)
            env = jax.ops.segment_sum(env_edges.array, receivers, num_segments=n_nodes) * inv_sqrt_neighbours
            env = e3nn.IrrepsArray(sh.irreps, env[receivers])
            # channel-wise, weightless tensor product ("uuu")
            features = e3nn.tensor_product(features, env, filter_ir_out=track[layer + 1])
            scalars = features.filter(keep="0e").array.reshape(features.shape[0], -1)
            new_latent = _mlp(cfg.latent_mlp_hidden, cfg.latent_dim, act, f"latent_mlp_{layer}")(
                jnp.concatenate([latent, scalars], axis=-1)
            )
            latent = coeff_old * latent + coeff_new * (new_latent * envelope)
            if layer < cfg.num_layers - 1:
                features = e3nn.flax.Linear(track[layer + 1], channel_out=channels, name=f"tensor_linear_{layer}")(
                    features
                )

        edge_energy = _mlp(cfg.edge_energy_mlp_hidden, 1, None, "edge_energy_mlp")(latent) * envelope
        return jax.ops.segment_sum(edge_energy[:, 0], receivers, num_segments=n_nodes) * inv_sqrt_neighbours
