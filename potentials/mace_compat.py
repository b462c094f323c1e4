"""MACE exactly as mace-torch computes it: the form that imported mace-torch models run in.

:class:`MACECompat` reproduces mace-torch's ``MACE`` and ``ScaleShiftMACE`` (ACEsuit/mace 0.3.x) for the
configurations its published models use (MACE-MP-0, MACE-OFF, MACE-MP-0b3, MACE-OMAT: one head of a
multi-head model), so a model read by :func:`equiforce.interop.mace.convert_mace` gives mace-torch's energies,
forces and stress to floating-point rounding. It is an ordinary registered model: it can also be trained,
fine-tuned and calibrated like any other.

How it differs from equiforce's own :class:`~equiforce.potentials.mace.MACE` (registry name ``"mace"``, kept
unchanged), each difference being mace-torch's choice:

* per layer: ``RealAgnosticInteractionBlock`` / ``RealAgnosticResidualInteractionBlock`` (first layer by
  ``first_layer_residual``, later layers always residual) and their density-normalised variants
  (``RealAgnosticDensity[Residual]InteractionBlock``: the neighbour sum is divided by ``1 + Σ_j tanh(w·R(r_ij))²``
  instead of ``avg_num_neighbours``), with the correlation order per layer;
* the radial MLP and the last readout use e3nn-torch's normalised SiLU, whose constant (``activation_scale``,
  e3nn-torch's ``normalize2mom``: 1.679176792...) differs in the fourth digit from e3nn-jax's estimate; the
  radial MLP keeps e3nn-torch's parametrisation (unit-variance weights divided by sqrt(fan-in) at run time) and
  takes any list of hidden widths;
* optional Agnesi transform of the distances fed to the Bessel basis (ACEpotentials.jl, Witt et al., J. Chem.
  Phys. 159, 164101 (2023)) and optional ZBL pair repulsion (Ziegler, Biersack, Littmark 1985) under the
  polynomial envelope, as mace-torch's ``AgnesiTransform`` and ``ZBLBasis``;
* no isolated-atom reference: the per-atom energy is ``E0[Z] + scale * (readouts + ZBL) + shift`` exactly as
  mace-torch's ``ScaleShiftMACE`` (equiforce's own models subtract each species' isolated-atom output, see
  :class:`~equiforce.potentials.potential.Potential`).

The product basis is equiforce's :class:`~equiforce.potentials.mace.SymmetricContraction` (e3nn-jax's reduced
symmetric basis). mace-torch's weights live on its own coupling basis (``mace.tools.cg.U_matrix_real``); both
bases span the same symmetric equivariant couplings, and the importer maps the weights from one to the other
exactly (see :mod:`equiforce.interop.mace`). Linear layers hold e3nn-torch's weights divided by sqrt(fan-in),
so the layers are the fast channels-last ones of :mod:`equiforce.potentials.mace`.

References:
  I. Batatia, D. P. Kovács, G. N. C. Simm, C. Ortner, G. Csányi, "MACE: Higher Order Equivariant Message
  Passing Neural Networks for Fast and Accurate Force Fields", NeurIPS 2022, arXiv:2206.07697;
  I. Batatia et al., "A foundation model for atomistic materials chemistry", arXiv:2401.00096 (MACE-MP-0);
  reference implementation ACEsuit/mace (``mace/modules/models.py``, ``blocks.py``, ``radial.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from equiforce.potentials.layers import (
    edge_lengths,
    polynomial_envelope,
    radial_embedding,
    resolve_edge_chunk,
    safe_unit_vectors,
)
from equiforce.potentials.mace import (
    ChannelLinear,
    SpeciesChannelLinear,
    channelwise_convolution,
    natural_irreps,
    product_basis_and_readout,
    tensor_product_irreps,
)
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = ["TORCH_SILU_SCALE", "ZBL_COEFFICIENTS", "MACECompat", "MACECompatConfig"]

#: e3nn-torch's ``normalize2mom(silu).cst`` (1 / sqrt(E[silu(z)^2]) estimated on 10^6 normal samples drawn with
#: torch's generator seeded 0; e3nn 0.4.4, torch 2.x). The importer records the value of the installed e3nn.
TORCH_SILU_SCALE = 1.6791767923989418
#: ZBL screening function φ(x) = Σ_k c_k exp(-d_k x): (c_k, d_k), as mace-torch's ``ZBLBasis``
ZBL_COEFFICIENTS = ((0.1818, 3.2), (0.5099, 0.9423), (0.2802, 0.4028), (0.02817, 0.2016))
_COULOMB = 14.3996  # e^2 / (4 π ε0) in eV Å, the constant of mace-torch's ZBLBasis
_BOHR = 0.529  # Å, as in mace-torch's ZBLBasis


@register_model
@dataclass(frozen=True)
class MACECompatConfig(ModelConfig):
    """Hyperparameters of :class:`MACECompat`: mace-torch's ``MACE`` / ``ScaleShiftMACE`` (frozen).

    Attributes:
      num_interactions: number of layers T (mace-torch ``num_interactions``).
      num_features: channels of every irrep (the multiplicity of mace-torch's ``hidden_irreps``).
      l_max: degree of the edge spherical harmonics and of the A basis (mace-torch ``max_ell``).
      hidden_l_max: maximal L of the node features between layers, natural parity (``max_L``; hidden irreps
        ``128x0e+128x1o`` is 1); the last layer keeps only scalars.
      correlation: order ν of the symmetric contraction of each layer, 1..4 (one value for all layers or one
        per layer).
      num_bessel: number of Bessel radial basis functions.
      envelope_p: exponent p of the polynomial cutoff (mace-torch ``num_polynomial_cutoff``), also used by the
        ZBL envelope.
      radial_mlp: hidden widths of the radial MLP (mace-torch ``radial_MLP``).
      readout_mlp_hidden: hidden width of the last layer's nonlinear readout (mace-torch ``MLP_irreps``, per head).
      first_layer_residual: the first layer is a residual block (``RealAgnosticResidualInteractionBlock``, a
        species-indexed linear of its input added to the message) instead of ``RealAgnosticInteractionBlock``
        (a species-indexed linear of A).
      density_normalization: the density-normalised blocks (``RealAgnosticDensityInteractionBlock`` /
        ``RealAgnosticDensityResidualInteractionBlock``): the neighbour sum is divided by 1 + a learned edge
        density instead of ``avg_num_neighbours``.
      distance_transform: ``"none"`` or ``"agnesi"``: the Bessel basis sees the Agnesi-transformed distance
        (mace-torch ``distance_transform="Agnesi"``; the cutoff envelope still sees the distance).
      agnesi: ``(q, p, a)`` of the Agnesi transform (mace-torch's defaults 0.9183, 4.5791, 1.0805).
      pair_repulsion: add the ZBL pair repulsion (mace-torch ``pair_repulsion=True``), inside the scale and
        shift as mace-torch does.
      zbl_a: ``(prefactor, exponent)`` of the ZBL screening length a = prefactor · 0.529 Å / (Z_i^exponent +
        Z_j^exponent) (mace-torch's 0.4543, 0.300).
      covalent_radii: ``(Z, radius Å)`` pairs: the covalent radii of ZBL (its cutoff is the sum of the pair's
        radii) and Agnesi (r0 = their mean), as the imported model holds them; elements not listed (all, when
        empty; a species added by fine-tuning) take ASE's ``covalent_radii``. The elements themselves are the
        potential's species (the model is built with them, see ``uses_atomic_numbers``).
      activation_scale: the constant multiplying SiLU in the radial MLP and the nonlinear readout
        (e3nn-torch's ``normalize2mom``, see :data:`TORCH_SILU_SCALE`).
      edge_chunk_size: edges in blocks of this many (a compute setting, as
        :attr:`equiforce.potentials.mace.MACEConfig.edge_chunk_size`; None: chosen per device).

    Raises:
      ValueError: on a value outside the ranges above.
    """

    name: ClassVar[str] = "mace_compat"
    last_layer: ClassVar[tuple[str, ...]] = (r"params/interaction_\d+/readout/kernel",)
    isolated_atom_reference: ClassVar[bool] = False
    uses_atomic_numbers: ClassVar[bool] = True

    num_interactions: int = 2
    num_features: int = 128
    l_max: int = 3
    hidden_l_max: int = 1
    correlation: int | tuple[int, ...] = 3
    num_bessel: int = 8
    envelope_p: int = 5
    radial_mlp: tuple[int, ...] = (64, 64, 64)
    readout_mlp_hidden: int = 16
    first_layer_residual: bool = False
    density_normalization: bool = False
    distance_transform: str = "none"
    agnesi: tuple[float, float, float] = (0.9183, 4.5791, 1.0805)
    pair_repulsion: bool = False
    zbl_a: tuple[float, float] = (0.4543, 0.300)
    covalent_radii: tuple[tuple[int, float], ...] = ()
    activation_scale: float = TORCH_SILU_SCALE
    edge_chunk_size: int | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("radial_mlp", "agnesi", "zbl_a"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "covalent_radii", tuple((int(z), float(r)) for z, r in self.covalent_radii))
        if not isinstance(self.correlation, int):
            object.__setattr__(self, "correlation", tuple(int(c) for c in self.correlation))
        if self.num_interactions < 1:
            raise ValueError(f"num_interactions must be >= 1, got {self.num_interactions}")
        if not 0 <= self.l_max <= 4:
            raise ValueError(f"l_max must lie in 0..4, got {self.l_max}")
        if not 0 <= self.hidden_l_max <= self.l_max:
            raise ValueError(f"hidden_l_max must lie in 0..l_max={self.l_max}, got {self.hidden_l_max}")
        if len(self.correlations) != self.num_interactions or not all(1 <= c <= 4 for c in self.correlations):
            raise ValueError(
                f"correlation must be one value in 1..4 or one per layer ({self.num_interactions}), "
                f"got {self.correlation}"
            )
        for name in ("num_features", "num_bessel", "readout_mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(w < 1 for w in self.radial_mlp):
            raise ValueError(f"radial_mlp widths must be >= 1, got {self.radial_mlp}")
        if self.envelope_p < 2:
            raise ValueError(f"envelope_p must be >= 2, got {self.envelope_p}")
        if self.distance_transform not in ("none", "agnesi"):
            raise ValueError(f"distance_transform must be 'none' or 'agnesi', got {self.distance_transform!r}")
        if len(self.agnesi) != 3 or len(self.zbl_a) != 2:
            raise ValueError("agnesi needs (q, p, a) and zbl_a (prefactor, exponent)")
        if any(not 0 < z < 119 or not r > 0 for z, r in self.covalent_radii):
            raise ValueError(f"covalent_radii needs (Z in 1..118, radius > 0) pairs, got {self.covalent_radii}")
        if not self.activation_scale > 0:
            raise ValueError(f"activation_scale must be positive, got {self.activation_scale}")
        if self.edge_chunk_size is not None and self.edge_chunk_size < 0:
            raise ValueError(f"edge_chunk_size must be >= 0, got {self.edge_chunk_size}")

    @property
    def correlations(self) -> tuple[int, ...]:
        """The correlation order of each layer."""
        if isinstance(self.correlation, int):
            return (self.correlation,) * self.num_interactions
        return self.correlation

    def radii(self, atomic_numbers: tuple[int, ...]) -> np.ndarray:
        """``[len(atomic_numbers)]`` covalent radii (Å): :attr:`covalent_radii` where listed, else ASE's."""
        from ase.data import covalent_radii

        given = dict(self.covalent_radii)
        return np.array([given.get(int(z), covalent_radii[int(z)]) for z in atomic_numbers], np.float64)

    def build(
        self, *, num_species: int, r_max: float, avg_num_neighbours: float, atomic_numbers: tuple[int, ...] = ()
    ) -> nn.Module:
        if len(atomic_numbers) != num_species:
            raise ValueError(f"mace_compat is built with the atomic numbers of its {num_species} species")
        return MACECompat(
            config=self,
            num_species=num_species,
            r_max=r_max,
            avg_num_neighbours=avg_num_neighbours,
            atomic_numbers=tuple(int(z) for z in atomic_numbers),
        )


class TorchMLP(nn.Module):
    """e3nn-torch's ``FullyConnectedNet``: bias-free layers ``x @ W / sqrt(fan_in)``, scaled SiLU between them.

    Parameters ``layer{i}``: ``[fan_in, fan_out]`` ~ N(0, 1), the layout of e3nn-torch's ``layer{i}.weight``.
    Zero input gives zero output (no biases).
    """

    features: tuple[int, ...]
    activation_scale: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, width in enumerate(self.features):
            w = self.param(f"layer{i}", nn.initializers.normal(1.0), (x.shape[-1], width), x.dtype)
            x = x @ (w / jnp.sqrt(jnp.asarray(x.shape[-1], x.dtype)))
            if i < len(self.features) - 1:
                x = jax.nn.silu(x) * jnp.asarray(self.activation_scale, x.dtype)
        return x


def agnesi_transform(r: jnp.ndarray, r0: jnp.ndarray, q: float, p: float, a: float) -> jnp.ndarray:
    """``1 / (1 + a (r/r0)^q / (1 + (r/r0)^(q-p)))``, mace-torch's ``AgnesiTransform`` (dimensionless)."""
    x = r / r0
    return 1.0 / (1.0 + a * x**q / (1.0 + x ** (q - p)))


def zbl_pair_energy(
    r: jnp.ndarray, z_i: jnp.ndarray, z_j: jnp.ndarray, r_cut: jnp.ndarray, p: int, zbl_a: tuple[float, float]
) -> jnp.ndarray:
    """``[n_edges]`` ZBL repulsion of each pair (eV) under the polynomial envelope cut at ``r_cut`` (Å).

    ``V = 14.3996 Z_i Z_j / r · Σ_k c_k exp(-d_k r / a) · u(r / r_cut)``, a = prefactor · 0.529 / (Z_i^e + Z_j^e),
    as mace-torch's ``ZBLBasis`` (which gives each receiver half of it per directed edge).
    """
    prefactor, exponent = zbl_a
    a = prefactor * _BOHR / (z_i**exponent + z_j**exponent)
    x = r / a
    phi = sum(c * jnp.exp(-d * x) for c, d in ZBL_COEFFICIENTS)
    return _COULOMB * z_i * z_j / r * phi * polynomial_envelope(r / r_cut, p)


class MACECompatInteraction(nn.Module):
    """One mace-torch layer: interaction block, product basis block and readout (see :class:`MACECompat`).

    Features are channels-last ``[n_nodes, irreps dim, num_features]``. Returns ``(node_feats, readout [n])``.
    """

    irreps_in: str
    irreps_out: str
    num_features: int
    l_max: int
    correlation: int
    num_species: int
    avg_num_neighbours: float
    radial_mlp: tuple[int, ...]
    residual: bool
    density_normalization: bool
    last: bool
    readout_mlp_hidden: int
    activation_scale: float
    edge_chunk_size: int = 0
    half_list: bool = False

    @nn.compact
    def __call__(
        self,
        node_feats: jnp.ndarray,  # [n_nodes, D_in, C]
        onehot: jnp.ndarray,  # [n_nodes, num_species]
        edge_sh: jnp.ndarray,  # [n_edges, (l_max+1)^2]
        edge_radial: jnp.ndarray,  # [n_edges, num_bessel], zero on padding / beyond r_max
        senders: jnp.ndarray,
        receivers: jnp.ndarray,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        channels, dtype, n_nodes = self.num_features, node_feats.dtype, node_feats.shape[0]
        irreps_a = str(natural_irreps(self.l_max))
        sc = None
        if self.residual:  # skip_tp of the residual blocks: species-indexed linear of the input
            sc = SpeciesChannelLinear(self.irreps_in, self.irreps_out, channels, self.num_species, name="skip")(
                node_feats, onehot
            )
        x = ChannelLinear(self.irreps_in, self.irreps_in, channels, name="linear_up")(node_feats)
        n_paths = e3nn.Irreps(tensor_product_irreps(self.irreps_in, self.l_max)).num_irreps
        mlp = TorchMLP((*self.radial_mlp, n_paths * channels), self.activation_scale, name="radial_mlp")
        aggregated, irreps_mid = channelwise_convolution(
            x,
            edge_sh,
            edge_radial,
            senders,
            receivers,
            irreps_in=self.irreps_in,
            l_max=self.l_max,
            radial_weights=lambda r: mlp(r).reshape(-1, n_paths, channels),
            edge_chunk_size=self.edge_chunk_size,
            half_list=self.half_list,
        )
        a = ChannelLinear(irreps_mid, irreps_a, channels, name="linear_down")(aggregated)
        if self.density_normalization:  # 1 + Σ_j tanh(R(r_ij) · w)^2 ... (mace-torch: tanh(density_fn(R)^2))
            density_fn = TorchMLP((1,), self.activation_scale, name="density")
            edge_density = jnp.tanh(density_fn(edge_radial)[:, 0] ** 2)
            density = jax.ops.segment_sum(edge_density, receivers, num_segments=n_nodes)
            if self.half_list:
                density = density + jax.ops.segment_sum(edge_density, senders, num_segments=n_nodes)
            a = a / (density + 1.0)[:, None, None]
        else:
            a = a / jnp.asarray(self.avg_num_neighbours, dtype)
        if not self.residual:  # skip_tp of RealAgnosticInteractionBlock: species-indexed linear of A
            a = SpeciesChannelLinear(irreps_a, irreps_a, channels, self.num_species, name="species_linear")(a, onehot)

        scale = self.activation_scale
        return product_basis_and_readout(
            a,
            onehot,
            sc,
            irreps_a=irreps_a,
            irreps_out=self.irreps_out,
            correlation=self.correlation,
            num_species=self.num_species,
            edge_chunk_size=self.edge_chunk_size,
            last=self.last,
            readout_mlp_hidden=self.readout_mlp_hidden,
            activation=lambda x: jax.nn.silu(x) * jnp.asarray(scale, x.dtype),
        )


class MACECompat(nn.Module):
    """mace-torch's MACE network: per-atom outputs (readouts + ZBL, before scale and shift).

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (receiver → sender), zero on padding edges; sets the dtype.
      species: ``[n_nodes]`` int index into the potential's species table.
      senders, receivers: ``[n_edges]`` int.
      edge_mask: ``[n_edges]`` bool.
      half_list: each edge is an unordered pair (static); the result equals that of the full list.

    Returns:
      ``[n_nodes]`` Σ_t readout_t (+ the ZBL energy of each atom). Each layer's readout is also sown into the
      ``"intermediates"`` collection as ``readout_<t>``.
    """

    config: MACECompatConfig
    num_species: int
    r_max: float
    avg_num_neighbours: float
    atomic_numbers: tuple[int, ...]  # of each species index (the potential's species)

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
        dtype = vectors.dtype
        n_nodes = species.shape[0]
        lengths = edge_lengths(vectors, edge_mask)
        mask = edge_mask.astype(dtype)
        radii = jnp.asarray(cfg.radii(self.atomic_numbers), dtype)
        bessel_input = None
        if cfg.distance_transform == "agnesi":
            q, p, a = cfg.agnesi
            r0 = 0.5 * (radii[species[senders]] + radii[species[receivers]])
            bessel_input = agnesi_transform(lengths, r0, q, p, a)
        edge_radial = radial_embedding(
            lengths,
            edge_mask,
            r_max=self.r_max,
            num_basis=cfg.num_bessel,
            envelope_p=cfg.envelope_p,
            basis_input=bessel_input,
        )
        edge_sh = e3nn.spherical_harmonics(
            natural_irreps(cfg.l_max), safe_unit_vectors(vectors, edge_mask), normalize=True, normalization="component"
        ).array

        onehot = jax.nn.one_hot(species, self.num_species, dtype=dtype)
        embedding = self.param(
            "embedding", nn.initializers.normal(self.num_species**-0.5), (self.num_species, cfg.num_features), dtype
        )
        node_feats = (onehot @ embedding)[:, None, :]

        total = jnp.zeros((n_nodes,), dtype)
        if cfg.pair_repulsion:
            z = jnp.asarray(self.atomic_numbers, dtype)
            zs, zr = z[species[senders]], z[species[receivers]]
            r_cut = radii[species[senders]] + radii[species[receivers]]
            pair = 0.5 * zbl_pair_energy(lengths, zs, zr, r_cut, cfg.envelope_p, cfg.zbl_a) * mask
            total = total + jax.ops.segment_sum(pair, receivers, num_segments=n_nodes)
            if half_list:
                total = total + jax.ops.segment_sum(pair, senders, num_segments=n_nodes)

        hidden = str(natural_irreps(cfg.hidden_l_max))
        irreps_in = "0e"
        edge_chunk_size = resolve_edge_chunk(cfg.edge_chunk_size, vectors.shape[0], half_list=half_list)
        for t, correlation in enumerate(cfg.correlations):
            last = t == cfg.num_interactions - 1
            irreps_out = "0e" if last else hidden
            node_feats, readout = MACECompatInteraction(
                irreps_in=irreps_in,
                irreps_out=irreps_out,
                num_features=cfg.num_features,
                l_max=cfg.l_max,
                correlation=correlation,
                num_species=self.num_species,
                avg_num_neighbours=self.avg_num_neighbours,
                radial_mlp=cfg.radial_mlp,
                residual=t > 0 or cfg.first_layer_residual,
                density_normalization=cfg.density_normalization,
                last=last,
                readout_mlp_hidden=cfg.readout_mlp_hidden,
                activation_scale=cfg.activation_scale,
                edge_chunk_size=edge_chunk_size,
                half_list=half_list,
                name=f"interaction_{t}",
            )(node_feats, onehot, edge_sh, edge_radial, senders, receivers)
            self.sow("intermediates", f"readout_{t}", readout)
            total = total + readout
            irreps_in = irreps_out
        return total
