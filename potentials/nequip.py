"""NequIP: E(3)-equivariant interatomic potential with tensor-product convolutions.

References:
  S. Batzner, A. Musaelian, L. Sun, M. Geiger, J. P. Mailoa, M. Kornbluth, N. Molinari, T. E. Smidt,
  B. Kozinsky, "E(3)-equivariant graph neural networks for data-efficient and accurate interatomic
  potentials", Nat. Commun. 13, 2453 (2022), arXiv:2101.03164.

Layer structure (paper Fig. 1): one-hot species → linear embedding to scalars; ``num_interactions``
interaction blocks, each: species-indexed self-connection, linear, convolution (tensor product of the
sender's features with spherical harmonics Y^l(r̂_ij) for l ≤ ``l_max``, weighted per path by an MLP of
the Bessel radial basis times the polynomial cutoff), sum over neighbours / sqrt(avg neighbours),
linear, add self-connection, gated nonlinearity; then an output block of two linears to one scalar per
atom. Built on e3nn-jax irreps, linears, gates and spherical harmonics.

The convolution's tensor product is evaluated as one dense bilinear map per channel (the Clebsch-Gordan
coefficients of every path, e3nn's "component" normalisation, in the order of ``e3nn.tensor_product``; see
:func:`_convolution_constants`): one ``[edges, paths x m, irreps] @ [edges, irreps, channels]`` matmul instead
of one small einsum per path. Same parameters and outputs as the e3nn formulation (tests compare them), 1.6x
the MD speed and 40 % less compilation time at the protocol size (4 layers, 32 channels of each l <= 2
irrep of both parities) on a 2-core CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from equiforce.potentials.layers import (
    chunked_edge_sum,
    edge_lengths,
    pair_messages,
    pure_submodule,
    radial_embedding,
    resolve_edge_chunk,
    reverse_edge_signs,
    safe_unit_vectors,
)
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = ["CPU_SMALL_GRAPH_BLOCK_BYTES", "CPU_SMALL_GRAPH_EDGE_CHUNK", "NequIP", "NequIPConfig", "NequIPInteraction"]

#: edge block size of the automatic setting on CPU for graphs below ``layers.CPU_CHUNK_MIN_EDGES`` edges whose
#: per-edge messages (``[edges, D_mid, channels]``, the largest per-edge intermediate) take more than
#: :data:`CPU_SMALL_GRAPH_BLOCK_BYTES`: those overflow the cache, blocks of <= 64 edges do not. At the protocol
#: size (4 layers, 32 channels, l_max 2 with both parities) a 21-atom aspirin's messages are 8.8 MB in float64,
#: and blocks gave 1.25-1.5x MD speed on a 2-core EPYC; in float32 (4.4 MB) they gained nothing.
CPU_SMALL_GRAPH_EDGE_CHUNK = 64
#: message size (bytes, whole graph, one layer) above which a small graph is evaluated in edge blocks on CPU
CPU_SMALL_GRAPH_BLOCK_BYTES = 6 * 2**20


def _hidden_irreps(num_features: int, l_max: int, parity: bool) -> e3nn.Irreps:
    """``num_features`` channels of every l ≤ l_max: both parities with ``parity``, else only (-1)^l."""
    irreps = []
    for ell in range(l_max + 1):
        natural = 1 if ell % 2 == 0 else -1
        irreps.append((num_features, (ell, natural)))
        if parity:
            irreps.append((num_features, (ell, -natural)))
    return e3nn.Irreps(irreps).regroup()


def _channels(irreps: e3nn.Irreps) -> int:
    """The common multiplicity C of every irrep group (NequIP's features have C channels of each irrep)."""
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1:
        raise ValueError(f"every irrep needs the same number of channels, got {irreps}")
    return muls.pop()


def _channels_last(x: e3nn.IrrepsArray) -> jnp.ndarray:
    """``[n, D, C]`` of e3nn's ``[n, Σ C·dim]`` layout (each group ``[C, dim]``, channel-major)."""
    blocks = []
    for (mul, ir), s in zip(x.irreps, x.irreps.slices(), strict=True):
        blocks.append(jnp.swapaxes(x.array[:, s].reshape(-1, mul, ir.dim), 1, 2))
    return jnp.concatenate(blocks, axis=1)


def _from_channels_last(a: jnp.ndarray, per_channel: e3nn.Irreps, channels: int) -> e3nn.IrrepsArray:
    """Inverse of :func:`_channels_last` for per-channel irreps ``k x ir`` (path-major inside a group)."""
    blocks, start = [], 0
    for mul, ir in per_channel:
        block = a[:, start : start + mul * ir.dim].reshape(-1, mul, ir.dim, channels)
        blocks.append(jnp.swapaxes(block, 2, 3).reshape(a.shape[0], mul * channels * ir.dim))
        start += mul * ir.dim
    irreps = e3nn.Irreps([(mul * channels, ir) for mul, ir in per_channel])
    return e3nn.IrrepsArray(irreps, jnp.concatenate(blocks, axis=1))


@functools.cache
def _convolution_constants(irreps_x: str, irreps_sh: str, irreps_gated: str) -> tuple[np.ndarray, e3nn.Irreps]:
    """Dense Clebsch-Gordan tensor of NequIP's per-channel message ``[x, x ⊗ Y(r̂)]``, filtered to the gate input.

    The message of the reference formulation ``concatenate([x.filter(keep=gated), e3nn.tensor_product(x, Y,
    filter_ir_out=gated)]).regroup()`` (e3nn's "component" normalisation) is bilinear in one channel of ``x``
    and ``[1, Y]``; this returns that bilinear map, with the paths in exactly the reference order so that the
    radial MLP's outputs keep their meaning.

    Returns:
      cg: ``[D_in, 1 + D_sh, D_mid]`` float64 (``D_in``: one channel of x; index 0 of the middle axis is the
        constant 1 of the identity paths). Inside the group of the P paths giving one irrep, column
        ``q * dim + m`` is component m of path q.
      per_channel: the message irreps of one channel, ``"P x ir + ..."`` (sorted, regrouped).
    """
    x = [ir for _, ir in e3nn.Irreps(irreps_x)]
    sh = e3nn.Irreps(irreps_sh)
    if any(mul != 1 for mul, _ in sh) or list(sh) != sorted(sh):
        raise ValueError(f"spherical-harmonics irreps must be sorted with multiplicity 1, got {sh}")
    gated = e3nn.Irreps(irreps_gated)
    starts = np.cumsum([0] + [ir.dim for ir in x])
    sh_starts = 1 + np.cumsum([0] + [ir.dim for _, ir in sh])
    # (ir_out, input rows, sh rows, block [d_in, d_sh, d_out]); identity paths first, then e3nn.tensor_product's
    # paths, which iterate over its regrouped (stably sorted) inputs
    paths = [
        (ir, slice(starts[k], starts[k + 1]), slice(0, 1), np.eye(ir.dim)[:, None, :])
        for k, ir in enumerate(x)
        if ir in gated
    ]
    for k in sorted(range(len(x)), key=lambda k: (x[k], k)):
        for b, (_, ir2) in enumerate(sh):
            for ir_out in x[k] * ir2:
                if ir_out in gated:
                    block = np.asarray(e3nn.clebsch_gordan(x[k].l, ir2.l, ir_out.l), np.float64) * np.sqrt(ir_out.dim)
                    paths.append(
                        (ir_out, slice(starts[k], starts[k + 1]), slice(sh_starts[b], sh_starts[b + 1]), block)
                    )
    paths.sort(key=lambda path: path[0])  # stable: the reference's final regroup
    per_channel = e3nn.Irreps([(1, path[0]) for path in paths]).regroup()
    cg = np.zeros((starts[-1], sh_starts[-1], per_channel.dim))
    p = 0
    for (mul, ir), s in zip(per_channel, per_channel.slices(), strict=True):
        for q in range(mul):
            _, rows, sh_rows, block = paths[p + q]
            cg[rows, sh_rows, s.start + q * ir.dim : s.start + (q + 1) * ir.dim] = block
        p += mul
    cg[np.abs(cg) < 1e-10] = 0.0
    return cg, per_channel


def _gate_input_irreps(target: e3nn.Irreps) -> e3nn.Irreps:
    """The gate's input for ``target``: the target irreps, then one even scalar gate per non-scalar irrep.

    e3nn.gate takes the *last* scalars as gates, so the gates are appended (not regrouped).
    """
    n_gates = target.filter(drop=["0e", "0o"]).num_irreps
    return target + e3nn.Irreps(f"{n_gates}x0e") if n_gates else target


def _small_graph_chunk(hidden: e3nn.Irreps, sh_irreps: e3nn.Irreps, n_edges: int, dtype: jnp.dtype) -> int:
    """The edge block size for a graph below ``layers.CPU_CHUNK_MIN_EDGES`` edges on CPU (0: all at once).

    :data:`CPU_SMALL_GRAPH_EDGE_CHUNK` when the messages of an interaction between hidden layers (the largest,
    ``n_edges x D_mid x channels`` values of ``dtype``) exceed :data:`CPU_SMALL_GRAPH_BLOCK_BYTES`.
    """
    _, per_channel = _convolution_constants(str(hidden), str(sh_irreps), str(_gate_input_irreps(hidden)))
    message_bytes = n_edges * per_channel.dim * _channels(hidden) * jnp.dtype(dtype).itemsize
    return CPU_SMALL_GRAPH_EDGE_CHUNK if message_bytes > CPU_SMALL_GRAPH_BLOCK_BYTES else 0


@register_model
@dataclass(frozen=True)
class NequIPConfig(ModelConfig):
    """Hyperparameters of :class:`NequIP` (frozen; saved with the weights).

    Attributes:
      num_interactions: number of interaction blocks (paper: 4-6).
      l_max: maximum rotation order of the features and spherical harmonics.
      num_features: channels per irrep.
      parity: keep both parities of every l (the paper's "O(3)" setting) or only the natural one.
      num_bessel: number of Bessel radial basis functions.
      envelope_p: exponent p of the polynomial cutoff envelope.
      radial_mlp_hidden: width of the radial MLP hidden layers.
      radial_mlp_layers: number of hidden layers of the radial MLP.
      edge_chunk_size: evaluate the edges (tensor product, radial MLP, neighbour sum) in blocks of this many
        (see :func:`equiforce.potentials.layers.chunked_edge_sum`): same result, less memory and traffic.
        0: all edges at once (the better choice on GPUs). None (default): on CPU, blocks of 128 for graphs of at
        least 2048 edges; below that blocks of :data:`CPU_SMALL_GRAPH_EDGE_CHUNK` when the per-edge messages
        exceed :data:`CPU_SMALL_GRAPH_BLOCK_BYTES` (the protocol-size model on aspirin in float64), else all at
        once; on GPUs all at once. Sizes count directed edges: with a half neighbour list a block holds half as
        many pairs. A compute setting: it changes no parameter or output.
    """

    name: ClassVar[str] = "nequip"
    #: regular expressions of the last linear layer's parameters (LLPR uncertainty; the output is linear in them)
    last_layer: ClassVar[tuple[str, ...]] = (r"params/output/.*",)
    #: the species embedding is an e3nn Linear of the one-hot (normalised by sqrt(num_species))
    species_blocks: ClassVar[tuple[tuple[str, int, int, bool], ...]] = ((r"params/embedding/.*", 0, 1, True),)

    num_interactions: int = 3
    l_max: int = 2
    num_features: int = 16
    parity: bool = True
    num_bessel: int = 8
    envelope_p: int = 6
    radial_mlp_hidden: int = 64
    radial_mlp_layers: int = 2
    edge_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.num_interactions < 1:
            raise ValueError("num_interactions must be >= 1")
        if self.l_max < 0 or self.l_max > 6:
            raise ValueError("l_max must lie in 0..6")
        if self.num_features < 1 or self.num_bessel < 1 or self.radial_mlp_hidden < 1:
            raise ValueError("num_features, num_bessel and radial_mlp_hidden must be >= 1")
        if self.envelope_p < 2:
            raise ValueError("envelope_p must be >= 2")
        if self.edge_chunk_size is not None and self.edge_chunk_size < 0:
            raise ValueError(f"edge_chunk_size must be >= 0, got {self.edge_chunk_size}")

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        return NequIP(config=self, num_species=num_species, r_max=r_max, avg_num_neighbours=avg_num_neighbours)


class NequIPInteraction(nn.Module):
    """One NequIP interaction block (convolution + self-connection + gate)."""

    target_irreps: e3nn.Irreps
    num_species: int
    avg_num_neighbours: float
    radial_mlp_hidden: int
    radial_mlp_layers: int
    edge_chunk_size: int = 0  # > 0: edges (pairs with half_list) in blocks of this size (layers.chunked_edge_sum)
    half_list: bool = False  # each edge is a pair: also send its reversed message

    @nn.compact
    def __call__(
        self,
        node_feats: e3nn.IrrepsArray,  # [n_nodes, irreps]
        species: jnp.ndarray,  # [n_nodes] int
        edge_sh: e3nn.IrrepsArray,  # [n_edges, sh irreps] (l >= 1)
        edge_radial: jnp.ndarray,  # [n_edges, num_bessel], zero on padding / beyond r_max
        senders: jnp.ndarray,  # [n_edges]
        receivers: jnp.ndarray,  # [n_edges]
    ) -> e3nn.IrrepsArray:
        n_nodes = node_feats.shape[0]
        target = e3nn.Irreps(self.target_irreps).regroup()
        gated_irreps = _gate_input_irreps(target)

        self_connection = e3nn.flax.Linear(
            gated_irreps, num_indexed_weights=self.num_species, force_irreps_out=True, name="self_connection"
        )(species, node_feats)

        x = e3nn.flax.Linear(node_feats.irreps, name="linear_up")(node_feats)
        channels = _channels(x.irreps)
        x_cl = _channels_last(x)  # [n, D_in, C]

        # message = [x_send (filtered), x_send ⊗ Y^{l>=1}(r̂)] per channel, as one dense bilinear map
        cg, mid = _convolution_constants(str(x.irreps), str(edge_sh.irreps), str(gated_irreps))
        n_paths = mid.num_irreps
        dtype = x_cl.dtype
        cg_np, cg = cg, jnp.asarray(cg, dtype)  # [D_in, 1 + D_sh, D_mid]
        radial_mlp = pure_submodule(
            e3nn.flax.MultiLayerPerceptron(
                self.radial_mlp_layers * (self.radial_mlp_hidden,) + (n_paths * channels,),
                act=jax.nn.silu,
                output_activation=False,
                name="radial_mlp",
            ),
            edge_radial[:1],
        )

        def coupling_of(sh: jnp.ndarray) -> jnp.ndarray:
            """``[e, D_mid, D_in]`` per-edge bilinear map (the constant 1 of the identity paths prepended)."""
            sh1 = jnp.concatenate([jnp.ones_like(sh[:, :1]), sh], axis=1)
            return jnp.einsum("ej,ijk->eki", sh1, cg)

        def weights_of(radial_in: jnp.ndarray) -> jnp.ndarray:
            """``[e, D_mid, C]`` per-path radial weights (zero where ``radial_in`` is zero), broadcast over
            each path's components."""
            radial = radial_mlp(radial_in).reshape(-1, n_paths, channels)
            weights, path = [], 0
            for mul, ir in mid:
                block = jnp.broadcast_to(
                    radial[:, path : path + mul, None, :], (radial.shape[0], mul, ir.dim, channels)
                )
                weights.append(block.reshape(radial.shape[0], mul * ir.dim, channels))
                path += mul
            return jnp.concatenate(weights, axis=1)

        if not self.half_list:

            def edge_fn(radial_in: jnp.ndarray, sh: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
                """``[e, D_mid, C]`` messages of a block of edges, weighted per path and channel."""
                return (coupling_of(sh) @ x_cl[s]) * weights_of(radial_in)

            summed = chunked_edge_sum(
                edge_fn, (edge_radial, edge_sh.array, senders), receivers, n_nodes, self.edge_chunk_size
            )
        else:
            # each pair gives two messages that share the radial weights and the coupling: reversing an edge
            # flips the sign of Y^l for odd l, i.e. of the columns of paths through odd-l harmonics
            sh_degrees = np.concatenate([[0], [ir.l for mul, ir in edge_sh.irreps for _ in range(mul * ir.dim)]])
            sign = jnp.asarray(reverse_edge_signs(cg_np, sh_degrees), dtype)[:, None]

            def pair_fn(radial_in: jnp.ndarray, sh: jnp.ndarray, s: jnp.ndarray, r: jnp.ndarray) -> jnp.ndarray:
                """``[e, 2, D_mid, C]``: the messages r <- s and s <- r of a block of pairs."""
                return pair_messages(coupling_of(sh), x_cl, s, r, weights_of(radial_in), sign)

            summed = chunked_edge_sum(
                pair_fn,
                (edge_radial, edge_sh.array, senders, receivers),
                jnp.stack([receivers, senders], axis=1),
                n_nodes,
                self.edge_chunk_size,
            )
        aggregated = _from_channels_last(summed, mid, channels) / jnp.sqrt(self.avg_num_neighbours).astype(dtype)
        x = e3nn.flax.Linear(gated_irreps, force_irreps_out=True, name="linear_down")(aggregated)
        x = x + self_connection
        return e3nn.gate(x, even_act=jax.nn.silu, odd_act=jnp.tanh, even_gate_act=jax.nn.silu)


class NequIP(nn.Module):
    """The NequIP network: per-atom scalar outputs (unscaled) from edge vectors and species.

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (receiver → sender), zero on padding edges.
      species: ``[n_nodes]`` int, index into the potential's species table (0..num_species-1).
      senders, receivers: ``[n_edges]`` int.
      edge_mask: ``[n_edges]`` bool.
      half_list: the edges are a half neighbour list, each pair once (static). NequIP then evaluates the
        radial basis, radial MLP, spherical harmonics and per-edge coupling once per pair for both directed
        messages (Y^l(-r̂) = (-1)^l Y^l(r̂)); the result equals that of the full list.
    """

    config: NequIPConfig
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
        lengths = edge_lengths(vectors, edge_mask)
        edge_radial = radial_embedding(
            lengths, edge_mask, r_max=self.r_max, num_basis=cfg.num_bessel, envelope_p=cfg.envelope_p
        )
        edge_sh = e3nn.spherical_harmonics(
            e3nn.Irreps.spherical_harmonics(cfg.l_max).filter(drop="0e") if cfg.l_max > 0 else "0e",
            safe_unit_vectors(vectors, edge_mask),
            normalize=True,
            normalization="component",
        )

        onehot = jax.nn.one_hot(species, self.num_species, dtype=vectors.dtype)
        node_feats = e3nn.flax.Linear(f"{cfg.num_features}x0e", name="embedding")(
            e3nn.IrrepsArray(f"{self.num_species}x0e", onehot)
        )
        hidden = _hidden_irreps(cfg.num_features, cfg.l_max, cfg.parity)
        n_edges = vectors.shape[0]
        n_messages = 2 * n_edges if half_list else n_edges
        edge_chunk_size = resolve_edge_chunk(
            cfg.edge_chunk_size,
            n_edges,
            small_graph_chunk=_small_graph_chunk(hidden, edge_sh.irreps, n_messages, vectors.dtype),
            half_list=half_list,
        )
        for i in range(cfg.num_interactions):
            node_feats = NequIPInteraction(
                target_irreps=hidden,
                num_species=self.num_species,
                avg_num_neighbours=self.avg_num_neighbours,
                radial_mlp_hidden=cfg.radial_mlp_hidden,
                radial_mlp_layers=cfg.radial_mlp_layers,
                edge_chunk_size=edge_chunk_size,
                half_list=half_list,
                name=f"interaction_{i}",
            )(node_feats, species, edge_sh, edge_radial, senders, receivers)

        out = e3nn.flax.Linear(f"{max(cfg.num_features // 2, 1)}x0e", name="output_hidden")(
            node_feats.filter(keep="0e")
        )
        out = e3nn.flax.Linear("0e", name="output")(out)
        return out.array[:, 0]
