"""MACE: higher-order equivariant message passing with the atomic cluster expansion.

References:
  I. Batatia, D. P. Kovács, G. N. C. Simm, C. Ortner, G. Csányi, "MACE: Higher Order Equivariant Message
  Passing Neural Networks for Fast and Accurate Force Fields", NeurIPS 2022, arXiv:2206.07697.
  Reference implementations: ACEsuit/mace (``RealAgnosticInteractionBlock``,
  ``RealAgnosticResidualInteractionBlock``, ``EquivariantProductBasisBlock``, ``SymmetricContraction``),
  ACEsuit/mace-jax and instadeepai/mlip.

Layer structure (paper Sec. 3 and eqs. 8-13), for layers t = 0 .. T-1:

* node embedding (t = 0 input): linear map of the species one-hot to ``num_features x 0e``;
* residual ``sc``: species-indexed linear of the node features (t >= 1, MACE's residual block; also at
  t = 0 with ``residual_first_layer``);
* ``linear_up``, then the one-particle basis A (eq. 8-9): a channel-wise ("uvu") tensor product of the
  sender's features with Y^l(r̂_ij), l <= ``l_max``, weighted per path and channel by an MLP of the Bessel
  basis times the polynomial cutoff, summed over neighbours, divided by ``avg_num_neighbours`` and mixed by
  a linear layer to ``num_features x (0e + 1o + 2e + ...)`` (natural parity up to ``l_max``); in a layer
  without residual (t = 0 by default) a species-indexed linear follows (MACE's ``RealAgnosticInteractionBlock``);
* the product basis and message (eq. 10-11): a symmetric contraction of each channel of A with itself up to
  ``correlation`` times, projected on the irreps L <= ``hidden_l_max`` with generalised Clebsch-Gordan
  coefficients and combined with species-dependent weights (only 0e in the last layer), then a linear layer;
* update: message + ``sc``; readout: a linear map to one scalar (t < T-1) or an MLP with one SiLU hidden
  layer of ``readout_mlp_hidden`` neurons (t = T-1). The per-atom output is the sum of all readouts.

Implementation notes (efficiency): per-atom features are channels-last, ``[n, irreps dim, num_features]``.
The tensor product is one dense Clebsch-Gordan constant contracted with Y(r̂) and the sender features (no
per-path loop); the radial weights are expanded to the output columns by broadcasting. The symmetric
contraction builds the distinct monomials ``A_i1 .. A_iν`` (i1 <= .. <= iν) of every channel once and
contracts them with the constant coupling coefficients in one matmul per order ν (see
:class:`SymmetricContraction`). All constants are computed once per process at trace time with NumPy and
cast to the dtype of the edge vectors; nothing loops over atoms or edges.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from equiforce.potentials.layers import (
    CPU_NODE_CHUNK,
    chunked_edge_sum,
    chunked_node_map,
    edge_lengths,
    pair_messages,
    pure_submodule,
    radial_embedding,
    resolve_edge_chunk,
    reverse_edge_signs,
    safe_unit_vectors,
)
from equiforce.potentials.registry import ModelConfig, register_model

__all__ = [
    "MACE",
    "ChannelLinear",
    "MACEConfig",
    "MACEInteraction",
    "SpeciesChannelLinear",
    "SymmetricContraction",
    "bias_free_dense",
    "channelwise_convolution",
    "natural_irreps",
    "product_basis_and_readout",
    "tensor_product_irreps",
]

_ZERO_TOL = 1e-10  # |coefficient| below this in a numerically computed basis is exact zero


def natural_irreps(l_max: int) -> e3nn.Irreps:
    """``0e + 1o + 2e + ...`` up to ``l_max`` (one copy each, parity (-1)^l)."""
    return e3nn.Irreps.spherical_harmonics(l_max)


def _blocks(irreps: e3nn.Irreps) -> list[tuple[e3nn.Irrep, int, int]]:
    """``(irrep, start, multiplicity)`` of each group of equal consecutive irreps of the per-atom layout."""
    out: list[tuple[e3nn.Irrep, int, int]] = []
    start = 0
    for mul, ir in irreps:
        if out and out[-1][0] == ir:
            out[-1] = (ir, out[-1][1], out[-1][2] + mul)
        else:
            out.append((ir, start, mul))
        start += mul * ir.dim
    return out


# ---------------------------------------------------------------------------------------- constants
@functools.cache
def _tensor_product_constants(irreps_in: str, l_max: int, irreps_target: str) -> tuple[np.ndarray, str, np.ndarray]:
    """Dense Clebsch-Gordan tensor of the channel-wise tensor product ``x ⊗ Y(r̂)`` (every allowed path).

    Returns:
      cg: ``[D_in, D_sh, D_mid]`` float64, e3nn's "component" normalisation (as ``e3nn.tensor_product``).
        Output columns are grouped by irrep (sorted); inside the group of the P paths giving one irrep the
        index is ``m * P + p`` (component-major, path-minor; see :class:`ChannelLinear`).
      irreps_mid: the output irreps, ``"Px0e + ..."`` (P = number of paths giving the irrep).
      path_of_column: ``[D_mid]`` int, the path (0..num_paths-1, numbered group by group) of each column.
    """
    ir_in = e3nn.Irreps(irreps_in)
    sh = natural_irreps(l_max)
    target = {ir for _, ir in e3nn.Irreps(irreps_target)}
    paths = []  # (ir_out, slice_in, slice_sh, block [d_in, d_sh, d_out])
    for (mul_in, ir1), s_in in zip(ir_in, ir_in.slices(), strict=True):
        if mul_in != 1:
            raise ValueError(f"per-channel irreps must have multiplicity 1, got {ir_in}")
        for (_, ir2), s_sh in zip(sh, sh.slices(), strict=True):
            for ir_out in ir1 * ir2:
                if ir_out in target:  # as e3nn.tensor_product with irrep_normalization="component"
                    block = np.asarray(e3nn.clebsch_gordan(ir1.l, ir2.l, ir_out.l), np.float64) * np.sqrt(ir_out.dim)
                    paths.append((ir_out, s_in, s_sh, block))
    paths.sort(key=lambda path: path[0])  # stable: groups the paths by output irrep
    irreps_mid = e3nn.Irreps([(1, path[0]) for path in paths]).regroup()
    cg = np.zeros((ir_in.dim, sh.dim, irreps_mid.dim))
    path_of_column = np.zeros(irreps_mid.dim, np.int32)
    p = 0
    for ir, start, mul in _blocks(irreps_mid):
        for k in range(mul):
            _, s_in, s_sh, block = paths[p + k]
            columns = start + np.arange(ir.dim) * mul + k
            cg[s_in, s_sh, columns] = block
            path_of_column[columns] = p + k
        p += mul
    cg[np.abs(cg) < _ZERO_TOL] = 0.0
    return cg, str(irreps_mid), path_of_column


@dataclass(frozen=True)
class _SymmetricBasis:
    """Constant generalised Clebsch-Gordan coefficients of one symmetric contraction (trace-time NumPy).

    Attributes:
      parents: for ν = 2..correlation, ``(parent, factor)`` index arrays: the monomials of degree ν are
        ``mono_{ν-1}[parent] * A[factor]``.
      sizes: number of monomials of each degree ν = 1..correlation (degree 1: every component of A).
      u: ``{(ν, irrep): [sizes[ν-1], M, 2L+1]}`` coefficients on the monomials, multiplicities of the symmetric
        tensor folded in and divided by ν (mace-jax normalisation); M = number of couplings.
      irreps_out: per-channel output irreps (those with at least one coupling).
      monomials: for ν = 1..correlation, ``[sizes[ν-1], ν]`` int: the sorted component indices
        ``(i1 <= .. <= iν)`` of each kept monomial, in the row order of ``u`` (used to express other coupling
        bases in this one, e.g. mace-torch's, see :mod:`equiforce.interop.mace`).
    """

    parents: tuple[tuple[np.ndarray, np.ndarray], ...]
    sizes: tuple[int, ...]
    u: dict[tuple[int, str], np.ndarray]
    irreps_out: str
    monomials: tuple[np.ndarray, ...] = ()


@functools.cache
def _symmetric_basis(irreps_in: str, irreps_out: str, correlation: int) -> _SymmetricBasis:
    """Reduced symmetric tensor-product bases of A^{⊗ν}, ν <= ``correlation``, on the distinct monomials.

    ``e3nn.reduced_symmetric_tensor_product_basis`` gives U_ν ``[d]*ν + [Σ M_L (2L+1)]`` symmetric in its
    first ν indices; Σ_{i1..iν} U[i1..iν] A_i1..A_iν equals the sum over sorted tuples of U times the number
    of distinct permutations of the tuple. Monomials whose coefficients vanish for every kept output are
    dropped unless they are prefixes of a needed monomial of the next degree.
    """
    ir_in = e3nn.Irreps(irreps_in)
    keep = [ir for _, ir in e3nn.Irreps(irreps_out)]
    d = ir_in.dim
    coefficients: dict[int, dict[str, np.ndarray]] = {}
    tuples: dict[int, list[tuple[int, ...]]] = {}
    for nu in range(1, correlation + 1):
        with jax.ensure_compile_time_eval():
            basis = e3nn.reduced_symmetric_tensor_product_basis(ir_in, nu, keep_ir=keep)
        tup = list(itertools.combinations_with_replacement(range(d), nu))
        idx = tuple(np.array(t) for t in zip(*tup, strict=True))
        mult = np.array([math.factorial(nu) / np.prod([math.factorial(t.count(i)) for i in set(t)]) for t in tup])
        coefficients[nu] = {}
        for (mul, ir), chunk in zip(basis.irreps, basis.chunks, strict=True):
            if mul == 0 or chunk is None:
                continue
            c = np.asarray(chunk, dtype=np.float64)[idx] * (mult / nu)[:, None, None]  # [T, M, 2L+1]
            c[np.abs(c) < _ZERO_TOL] = 0.0
            coefficients[nu][str(ir)] = c
        tuples[nu] = tup
    # needed monomials, highest degree first
    needed: dict[int, list[int]] = {}
    prefixes: set[tuple[int, ...]] = set()
    for nu in range(correlation, 0, -1):
        used = np.zeros(len(tuples[nu]), bool)
        for c in coefficients[nu].values():
            used |= np.any(c != 0.0, axis=(1, 2))
        if nu == 1:
            used[:] = True  # degree 1 is A itself
        keep_rows = [i for i, t in enumerate(tuples[nu]) if used[i] or t in prefixes]
        needed[nu] = keep_rows
        prefixes = {tuples[nu][i][:-1] for i in keep_rows}
    parents = []
    for nu in range(2, correlation + 1):
        position = {tuples[nu - 1][i]: k for k, i in enumerate(needed[nu - 1])}
        rows = [tuples[nu][i] for i in needed[nu]]
        parents.append(
            (np.array([position[t[:-1]] for t in rows], np.int32), np.array([t[-1] for t in rows], np.int32))
        )
    u = {(nu, ir): c[needed[nu]] for nu in coefficients for ir, c in coefficients[nu].items()}
    present = {ir for (_, ir) in u}
    out = e3nn.Irreps([(1, ir) for ir in keep if str(ir) in present])
    monomials = tuple(
        np.array([tuples[nu][i] for i in needed[nu]], np.int32).reshape(-1, nu) for nu in range(1, correlation + 1)
    )
    return _SymmetricBasis(
        tuple(parents), tuple(len(needed[nu]) for nu in range(1, correlation + 1)), u, str(out), monomials
    )


# ---------------------------------------------------------------------------------------- layers
class ChannelLinear(nn.Module):
    """Equivariant linear map of per-atom features ``[..., D_in, C_in] -> [..., D_out, C_out]``.

    Layout (channels last): the features of one atom are ``[irreps dim, channels]``; a block of ``P`` copies
    of one irrep (``"Px1o"``) occupies ``P (2l+1)`` rows ordered ``m * P + p`` (component-major). Each output
    irrep mixes all channels and copies of the same input irrep (Schur's lemma) in one matmul; an output
    irrep absent from the input is zero. Weights ``w_<irrep>: [P, C_in, C_out]`` ~ N(0, 1/(P C_in)).

    Attributes:
      irreps_in: input irreps of one channel (equal irreps consecutive, e.g. sorted and regrouped).
      irreps_out: output irreps of one channel (multiplicity 1 each).
      channels_out: number of output channels.
    """

    irreps_in: str
    irreps_out: str
    channels_out: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        lead, c_in = x.shape[:-2], x.shape[-1]
        blocks_in = {ir: (start, mul) for ir, start, mul in _blocks(e3nn.Irreps(self.irreps_in))}
        outs = []
        for _, ir in e3nn.Irreps(self.irreps_out):
            if ir not in blocks_in:
                outs.append(jnp.zeros((*lead, ir.dim, self.channels_out), x.dtype))
                continue
            start, mul = blocks_in[ir]
            xi = x[..., start : start + mul * ir.dim, :].reshape(*lead, ir.dim, mul * c_in)
            w = self.param(
                f"w_{ir}", nn.initializers.normal((mul * c_in) ** -0.5), (mul, c_in, self.channels_out), x.dtype
            )
            outs.append(xi @ w.reshape(mul * c_in, self.channels_out))
        return jnp.concatenate(outs, axis=-2)


class SpeciesChannelLinear(nn.Module):
    """:class:`ChannelLinear` with one weight matrix per species (MACE's species "skip" tensor products).

    ``y[n] = W[species[n]] x[n]``, evaluated per irrep as one dense matmul of the (species one-hot ⊗
    features) outer product. Weights ``w_<irrep>: [num_species, P, C_in, C_out]``.
    """

    irreps_in: str
    irreps_out: str
    channels_out: int
    num_species: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, onehot: jnp.ndarray) -> jnp.ndarray:
        """``x``: ``[n, D_in, C_in]``; ``onehot``: ``[n, num_species]`` in the dtype of x."""
        n, c_in = x.shape[0], x.shape[-1]
        blocks_in = {ir: (start, mul) for ir, start, mul in _blocks(e3nn.Irreps(self.irreps_in))}
        outs = []
        for _, ir in e3nn.Irreps(self.irreps_out):
            if ir not in blocks_in:
                outs.append(jnp.zeros((n, ir.dim, self.channels_out), x.dtype))
                continue
            start, mul = blocks_in[ir]
            xi = x[:, start : start + mul * ir.dim, :].reshape(n, ir.dim, mul * c_in)
            w = self.param(
                f"w_{ir}",
                nn.initializers.normal((mul * c_in) ** -0.5),
                (self.num_species, mul, c_in, self.channels_out),
                x.dtype,
            )
            xs = (onehot[:, None, :, None] * xi[:, :, None, :]).reshape(n, ir.dim, self.num_species * mul * c_in)
            outs.append(xs @ w.reshape(-1, self.channels_out))
        return jnp.concatenate(outs, axis=-2)


class SymmetricContraction(nn.Module):
    """MACE's product basis and message (paper eqs. 10-11), channel-wise and species-dependent.

    For each channel c and output irrep L: ``B[n, L, c] = Σ_ν Σ_k W_ν,L[species_n, k, c] Σ_{i1..iν}
    U_ν,L[i1..iν, k] A[n, i1, c]..A[n, iν, c]`` with ν = 1..``correlation`` and U the reduced symmetric
    tensor-product basis (generalised Clebsch-Gordan coefficients, ``e3nn.reduced_symmetric_tensor_product_basis``).

    Evaluation: the distinct monomials ``A_i1..A_iν`` (i1 <= .. <= iν, only those with a non-zero coefficient)
    are built degree by degree, each from the previous degree times one component of A (row gathers of an
    irreps-major ``[D, n * C]`` array); one matmul per ν with the constant ``[Σ_L M_ν,L (2L+1), T_ν]``
    coefficient matrix gives the product basis, and a multiply-add with the per-atom weights the output.
    This needs Σ_ν T_ν P_ν multiply-adds per atom and channel (17 k for A = 0e+1o+2e+3o, ν <= 3 and outputs
    0e+1o, versus 4096 M_3 for the dense tensor ``U_3`` of the recursive mace-jax contraction).

    Attributes:
      irreps_in: per-channel irreps of A, e.g. ``"0e+1o+2e+3o"``.
      irreps_out: per-channel output irreps, e.g. ``"0e+1o"``; irreps with no coupling are dropped (see
        :attr:`output_irreps`).
      correlation: maximal order ν of the products (body order ν + 1).
      num_species: number of species (leading dimension of every weight ``w{ν}_{irrep}: [S, M, C]``).
    """

    irreps_in: str
    irreps_out: str
    correlation: int
    num_species: int
    node_chunk_size: int = 0  # > 0: atoms in blocks of this size (see layers.chunked_node_map)

    @property
    def output_irreps(self) -> e3nn.Irreps:
        """The per-channel output irreps (those reachable with ``correlation`` products)."""
        return e3nn.Irreps(self._basis().irreps_out)

    def _basis(self) -> _SymmetricBasis:
        return _symmetric_basis(str(e3nn.Irreps(self.irreps_in)), str(e3nn.Irreps(self.irreps_out)), self.correlation)

    @nn.compact
    def __call__(self, a: jnp.ndarray, onehot: jnp.ndarray) -> jnp.ndarray:
        """``a``: ``[n, D_in, C]``; ``onehot``: ``[n, num_species]``. Returns ``[n, output_irreps.dim, C]``."""
        basis = self._basis()
        irreps_out = e3nn.Irreps(basis.irreps_out)
        d_in, c = a.shape[1:]
        dtype = a.dtype

        # per degree ν: the kept output irreps, their weights and the constant [Σ_L M (2L+1), T_ν] matrix
        terms = []
        for nu in range(1, self.correlation + 1):
            keys = [str(ir) for _, ir in irreps_out if (nu, str(ir)) in basis.u]
            if not keys:
                continue
            weights = []
            for k in keys:
                m = basis.u[nu, k].shape[1]
                weights.append(
                    self.param(f"w{nu}_{k}", nn.initializers.normal(m**-0.5), (self.num_species, m, c), dtype)
                )
            coefficients = np.concatenate(  # rows (L, k, m)
                [basis.u[nu, k].transpose(1, 2, 0).reshape(-1, basis.sizes[nu - 1]) for k in keys]
            )
            terms.append((nu, keys, weights, jnp.asarray(coefficients, dtype)))

        def contract(a: jnp.ndarray, onehot: jnp.ndarray) -> jnp.ndarray:
            n = a.shape[0]
            # distinct monomials of each channel's A, degree 1..correlation: [T_ν, n * C] (irreps-major)
            a_t = jnp.swapaxes(a, 0, 1).reshape(d_in, n * c)
            monomials = [a_t]
            for parent, factor in basis.parents:
                monomials.append(monomials[-1][parent] * a_t[factor])
            outs = {str(ir): jnp.zeros((ir.dim, n, c), dtype) for _, ir in irreps_out}
            for nu, keys, weights, coefficients in terms:
                product = (coefficients @ monomials[nu - 1]).reshape(-1, n, c)  # product basis B_ν
                row = 0
                for k, w in zip(keys, weights, strict=True):
                    _, m, dim = basis.u[nu, k].shape
                    w_atoms = (onehot @ w.reshape(self.num_species, m * c)).reshape(n, m, c)
                    b = product[row : row + m * dim].reshape(m, dim, n, c)
                    outs[k] = outs[k] + jnp.einsum("kmnc,nkc->mnc", b, w_atoms)
                    row += m * dim
            out = jnp.concatenate([outs[str(ir)] for _, ir in irreps_out], axis=0)  # [D_out, n, C]
            return jnp.swapaxes(out, 0, 1)

        return chunked_node_map(contract, (a, onehot), self.node_chunk_size)


def tensor_product_irreps(irreps_in: str, l_max: int) -> str:
    """The per-channel output irreps of :func:`channelwise_convolution` (``"Px0e + Px1o + ..."``, sorted)."""
    return _tensor_product_constants(str(e3nn.Irreps(irreps_in)), l_max, str(natural_irreps(l_max)))[1]


def channelwise_convolution(
    x: jnp.ndarray,
    edge_sh: jnp.ndarray,
    edge_radial: jnp.ndarray,
    senders: jnp.ndarray,
    receivers: jnp.ndarray,
    *,
    irreps_in: str,
    l_max: int,
    radial_weights: Callable[[jnp.ndarray], jnp.ndarray],
    edge_chunk_size: int,
    half_list: bool,
) -> tuple[jnp.ndarray, str]:
    """MACE's one-particle basis before its linear layer: Σ_j R(r_ij) (x_j ⊗ Y(r̂_ij)), channel by channel.

    Every path ``l_in ⊗ l_sh -> L`` with L of natural parity up to ``l_max`` (e3nn "uvu" instructions, e3nn's
    "component" normalisation: the Clebsch-Gordan block times sqrt(2L+1), as mace-torch's ``conv_tp``), weighted
    per path and channel by ``radial_weights``, summed over each receiver's edges (no division).

    Args:
      x: ``[n_nodes, D_in, C]`` sender features (channels last, see :class:`ChannelLinear`).
      edge_sh: ``[n_edges, (l_max+1)^2]`` spherical harmonics of the edge directions.
      edge_radial: ``[n_edges, B]`` input of ``radial_weights`` (zero on padding edges).
      senders, receivers: ``[n_edges]`` int.
      irreps_in: per-channel irreps of ``x``.
      l_max: maximal degree of ``edge_sh`` and of the output.
      radial_weights: ``[e, B] -> [e, P, C]`` weights of the P paths (in the order of the output irreps'
        groups, paths of one group in the order input irrep, then harmonic) and C channels; must be zero where
        its input is zero, so padding edges contribute nothing.
      edge_chunk_size: > 0: edges (pairs with ``half_list``) in blocks of this size (layers.chunked_edge_sum).
      half_list: each edge is an unordered pair: also send its reversed message.

    Returns:
      ``([n_nodes, D_mid, C], irreps_mid)``, ``irreps_mid`` as :func:`tensor_product_irreps`.
    """
    n_nodes, dtype = x.shape[0], x.dtype
    cg_np, irreps_mid, _ = _tensor_product_constants(str(e3nn.Irreps(irreps_in)), l_max, str(natural_irreps(l_max)))
    mid_blocks = _blocks(e3nn.Irreps(irreps_mid))
    cg = jnp.asarray(cg_np, dtype)

    def weights_of(radial_in: jnp.ndarray) -> jnp.ndarray:
        """``[e, D_mid, C]`` per-column radial weights: slices + broadcasts, no gather."""
        radial = radial_weights(radial_in)
        channels = radial.shape[-1]
        expanded, path = [], 0
        for ir, _, mul in mid_blocks:
            block = jnp.broadcast_to(radial[:, None, path : path + mul, :], (radial.shape[0], ir.dim, mul, channels))
            expanded.append(block.reshape(radial.shape[0], ir.dim * mul, channels))
            path += mul
        return jnp.concatenate(expanded, axis=1)

    if not half_list:

        def edge_fn(radial_in, sh, s):
            """``[e, D_mid, C]`` messages of a block of edges."""
            coupling = jnp.einsum("ej,ijk->eki", sh, cg)  # [e, D_mid, D_in]
            return (coupling @ x[s]) * weights_of(radial_in)

        aggregated = chunked_edge_sum(edge_fn, (edge_radial, edge_sh, senders), receivers, n_nodes, edge_chunk_size)
    else:
        # a pair's two messages share the radial weights and the coupling; reversing the edge flips the
        # sign of Y^l for odd l, i.e. of the columns of paths through odd-l harmonics
        sh_degrees = np.floor(np.sqrt(np.arange(edge_sh.shape[1]))).astype(int)  # rows of 0e + 1o + 2e + ...
        sign = jnp.asarray(reverse_edge_signs(cg_np, sh_degrees), dtype)[:, None]

        def pair_fn(radial_in, sh, s, r):
            """``[e, 2, D_mid, C]``: the messages r <- s and s <- r of a block of pairs."""
            coupling = jnp.einsum("ej,ijk->eki", sh, cg)  # [e, D_mid, D_in]
            return pair_messages(coupling, x, s, r, weights_of(radial_in), sign)

        aggregated = chunked_edge_sum(
            pair_fn,
            (edge_radial, edge_sh, senders, receivers),
            jnp.stack([receivers, senders], axis=1),
            n_nodes,
            edge_chunk_size,
        )
    return aggregated, irreps_mid


class MACEInteraction(nn.Module):
    """One MACE layer: interaction (A basis), product basis (B, message), update and readout.

    Features are channels-last, ``[n_nodes, irreps dim, num_features]`` (see :class:`ChannelLinear`).
    Returns ``(node_feats [n, D_out, C], readout [n])``.
    """

    irreps_in: str  # per-channel irreps of the input node features
    irreps_out: str  # per-channel irreps of the output node features
    num_features: int
    l_max: int
    correlation: int
    num_species: int
    avg_num_neighbours: float
    radial_mlp_hidden: int
    radial_mlp_layers: int
    residual: bool  # species-indexed residual (True) or species-indexed linear of A (False, MACE's first layer)
    last: bool
    readout_mlp_hidden: int
    edge_chunk_size: int = 0  # > 0: edges (pairs with half_list) in blocks of this size (layers.chunked_edge_sum)
    half_list: bool = False  # each edge is a pair: also send its reversed message

    @nn.compact
    def __call__(
        self,
        node_feats: jnp.ndarray,  # [n_nodes, D_in, C]
        onehot: jnp.ndarray,  # [n_nodes, num_species]
        edge_sh: jnp.ndarray,  # [n_edges, (l_max+1)^2]
        edge_radial: jnp.ndarray,  # [n_edges, num_bessel], zero on padding / beyond r_max
        senders: jnp.ndarray,  # [n_edges]
        receivers: jnp.ndarray,  # [n_edges]
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        channels = self.num_features
        dtype = node_feats.dtype
        irreps_a = str(natural_irreps(self.l_max))

        sc = None
        if self.residual:  # RealAgnosticResidualInteractionBlock: species-indexed residual
            sc = SpeciesChannelLinear(self.irreps_in, self.irreps_out, channels, self.num_species, name="skip")(
                node_feats, onehot
            )

        x = ChannelLinear(self.irreps_in, self.irreps_in, channels, name="linear_up")(node_feats)

        # channel-wise ("uvu") tensor product with Y(r̂), weighted per path and channel by the radial MLP
        n_paths = e3nn.Irreps(tensor_product_irreps(self.irreps_in, self.l_max)).num_irreps
        radial_mlp = e3nn.flax.MultiLayerPerceptron(
            self.radial_mlp_layers * (self.radial_mlp_hidden,) + (n_paths * channels,),
            act=jax.nn.silu,
            output_activation=False,
            name="radial_mlp",
        )  # bias-free: zero where edge_radial is zero (padding, beyond r_max)
        mlp = pure_submodule(radial_mlp, edge_radial[:1])
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
        aggregated = aggregated / jnp.asarray(self.avg_num_neighbours, dtype)
        a = ChannelLinear(irreps_mid, irreps_a, channels, name="linear_down")(aggregated)  # [n, D_A, C]
        if not self.residual:  # RealAgnosticInteractionBlock: species-indexed linear of A
            a = SpeciesChannelLinear(irreps_a, irreps_a, channels, self.num_species, name="species_linear")(a, onehot)

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
            activation=_normalized_silu(),
        )


def product_basis_and_readout(
    a: jnp.ndarray,
    onehot: jnp.ndarray,
    sc: jnp.ndarray | None,
    *,
    irreps_a: str,
    irreps_out: str,
    correlation: int,
    num_species: int,
    edge_chunk_size: int,
    last: bool,
    readout_mlp_hidden: int,
    activation: Callable[[jnp.ndarray], jnp.ndarray],
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The second half of a MACE layer, called inside a compact ``__call__`` (its submodules are the caller's):
    product basis and message (:class:`SymmetricContraction` of A, then ``linear_product``), plus the residual
    ``sc``; readout of the scalars (a linear map, or in the ``last`` layer a hidden layer of
    ``readout_mlp_hidden`` neurons with ``activation`` first).

    Args:
      a: ``[n, D_A, C]`` the A basis; ``onehot``: ``[n, num_species]``; ``sc``: ``[n, D_out, C]`` or None.

    Returns:
      ``(node_feats [n, D_out, C], readout [n])``.
    """
    channels, dtype = a.shape[-1], a.dtype
    contraction = SymmetricContraction(
        irreps_a,
        irreps_out,
        correlation,
        num_species,
        node_chunk_size=CPU_NODE_CHUNK if edge_chunk_size > 0 else 0,  # blocked with the edges
        name="symmetric_contraction",
    )
    b = contraction(a, onehot)
    out = ChannelLinear(str(contraction.output_irreps), irreps_out, channels, name="linear_product")(b)
    if sc is not None:
        out = out + sc

    # readout on the scalars (the first row of the per-channel irreps is 0e)
    scalars = out[:, 0, :]
    if last:
        scalars = activation(bias_free_dense(readout_mlp_hidden, channels, dtype, "readout_hidden")(scalars))
    readout = bias_free_dense(1, scalars.shape[-1], dtype, "readout")(scalars)
    return out, readout[:, 0]


def bias_free_dense(features: int, fan_in: int, dtype: jnp.dtype, name: str) -> nn.Dense:
    """Bias-free dense layer with N(0, 1/fan_in) weights (e3nn's initialisation), computing in ``dtype``."""
    return nn.Dense(
        features,
        use_bias=False,
        kernel_init=nn.initializers.normal(fan_in**-0.5),
        param_dtype=dtype,
        dtype=dtype,
        name=name,
    )


@functools.lru_cache(maxsize=1)
def _normalized_silu():
    """SiLU scaled to unit second moment under a standard normal input (e3nn's ``Activation`` convention)."""
    return e3nn.normalize_function(jax.nn.silu)


# ---------------------------------------------------------------------------------------- config and model
@register_model
@dataclass(frozen=True)
class MACEConfig(ModelConfig):
    """Hyperparameters of :class:`MACE` (frozen; saved with the weights).

    Attributes:
      num_interactions: number of MACE layers T (paper: 2).
      num_features: channels k of every irrep (paper rMD17: 256).
      l_max: maximal degree of the edge spherical harmonics and of the A basis (paper: 3).
      hidden_l_max: maximal L of the node features between layers (natural parity, ``0e + 1o + ...``); the
        last layer keeps only scalars (paper rMD17: 2, i.e. 256x0e+256x1o+256x2e). Must not exceed ``l_max``.
      correlation: order ν of the symmetric contraction, 1..4 (body order ν + 1 per layer; paper: 3). The
        coupling coefficients are computed once per process when the model is first traced (instant for ν <= 3;
        about 1.5 min for ν = 4 with ``l_max = 3``).
      num_bessel: number of Bessel radial basis functions (paper: 8).
      envelope_p: exponent p of the polynomial cutoff envelope (paper / MACE default: 5).
      radial_mlp_hidden: width of the hidden layers of the radial MLP (MACE: 64).
      radial_mlp_layers: number of hidden layers of the radial MLP (MACE: 3, i.e. [64, 64, 64]).
      readout_mlp_hidden: hidden width of the last layer's nonlinear readout (MACE: 16).
      edge_chunk_size: evaluate the edges (radial MLP, tensor product, neighbour sum) in blocks of this many
        (see :func:`equiforce.potentials.layers.chunked_edge_sum`), so the ``[edges, irreps, channels]``
        intermediates stay in cache: same result, 3-4x faster and 7x less temporary memory for a 1029-atom
        water box on a 2-core CPU. 0: all edges at once (the better choice on GPUs). None (default): blocks of
        128 on CPU for graphs of at least 2048 edges, all at once otherwise. Whenever edges are blocked, the
        symmetric contraction runs in blocks of 64 atoms too (:func:`equiforce.potentials.layers.chunked_node_map`;
        its ``[monomials, atoms x channels]`` intermediates were 94 MB each for the water box). Sizes count
        directed edges: with a half neighbour list a block holds half as many pairs. A compute setting: it changes
        no parameter or output.
      residual_first_layer: give the first layer a species-indexed residual like the later ones (mace's
        ``ScaleShiftMACE`` default, ``interaction_first=RealAgnosticResidualInteractionBlock``) instead of a
        species-indexed linear of A (mace's ``MACE`` model and mlip's default; False).

    Raises:
      ValueError: on a value outside the ranges above.
    """

    name: ClassVar[str] = "mace"
    #: regular expressions of the last linear layer's parameters (LLPR uncertainty; the output is linear in them)
    last_layer: ClassVar[tuple[str, ...]] = (r"params/interaction_\d+/readout/kernel",)

    num_interactions: int = 2
    num_features: int = 128
    l_max: int = 3
    hidden_l_max: int = 1
    correlation: int = 3
    num_bessel: int = 8
    envelope_p: int = 5
    radial_mlp_hidden: int = 64
    radial_mlp_layers: int = 3
    readout_mlp_hidden: int = 16
    residual_first_layer: bool = False
    edge_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.num_interactions < 1:
            raise ValueError(f"num_interactions must be >= 1, got {self.num_interactions}")
        if not 0 <= self.l_max <= 4:
            raise ValueError(f"l_max must lie in 0..4, got {self.l_max}")
        if not 0 <= self.hidden_l_max <= self.l_max:
            raise ValueError(f"hidden_l_max must lie in 0..l_max={self.l_max}, got {self.hidden_l_max}")
        if not 1 <= self.correlation <= 4:
            raise ValueError(f"correlation must lie in 1..4, got {self.correlation}")
        for field in ("num_features", "num_bessel", "radial_mlp_hidden", "radial_mlp_layers", "readout_mlp_hidden"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.edge_chunk_size is not None and self.edge_chunk_size < 0:
            raise ValueError(f"edge_chunk_size must be >= 0, got {self.edge_chunk_size}")
        if self.envelope_p < 2:
            raise ValueError(f"envelope_p must be >= 2, got {self.envelope_p}")

    def build(self, *, num_species: int, r_max: float, avg_num_neighbours: float) -> nn.Module:
        return MACE(config=self, num_species=num_species, r_max=r_max, avg_num_neighbours=avg_num_neighbours)


class MACE(nn.Module):
    """The MACE network: per-atom scalar outputs (unscaled) from edge vectors and species.

    Call signature (shared by every model of the registry)::

        model.apply(params, vectors, species, senders, receivers, edge_mask, half_list=False) -> [n_nodes]

    Args:
      vectors: ``[n_edges, 3]`` edge vectors in Å (receiver → sender), zero on padding edges; sets the dtype.
      species: ``[n_nodes]`` int, index into the potential's species table (0..num_species-1).
      senders, receivers: ``[n_edges]`` int.
      edge_mask: ``[n_edges]`` bool.
      half_list: the edges are a half neighbour list, each pair once (static). The radial basis, radial MLP,
        spherical harmonics and per-edge coupling are then evaluated once per pair for both directed messages
        (Y^l(-r̂) = (-1)^l Y^l(r̂)); the result equals that of the full list.

    Returns:
      ``[n_nodes]`` sum over layers of the per-layer readouts. Each layer's readout is also sown into the
      ``"intermediates"`` collection as ``readout_<t>`` (``apply(..., mutable="intermediates")``).
    """

    config: MACEConfig
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
        dtype = vectors.dtype
        lengths = edge_lengths(vectors, edge_mask)
        edge_radial = radial_embedding(
            lengths, edge_mask, r_max=self.r_max, num_basis=cfg.num_bessel, envelope_p=cfg.envelope_p
        )
        edge_sh = e3nn.spherical_harmonics(
            natural_irreps(cfg.l_max), safe_unit_vectors(vectors, edge_mask), normalize=True, normalization="component"
        ).array

        onehot = jax.nn.one_hot(species, self.num_species, dtype=dtype)
        embedding = self.param(
            "embedding", nn.initializers.normal(self.num_species**-0.5), (self.num_species, cfg.num_features), dtype
        )
        node_feats = (onehot @ embedding)[:, None, :]  # [n, 1, C]: num_features x 0e

        hidden = str(natural_irreps(cfg.hidden_l_max))
        irreps_in = "0e"
        total = jnp.zeros(species.shape, dtype)
        edge_chunk_size = resolve_edge_chunk(cfg.edge_chunk_size, vectors.shape[0], half_list=half_list)
        for t in range(cfg.num_interactions):
            last = t == cfg.num_interactions - 1
            irreps_out = "0e" if last else hidden
            node_feats, readout = MACEInteraction(
                irreps_in=irreps_in,
                irreps_out=irreps_out,
                num_features=cfg.num_features,
                l_max=cfg.l_max,
                correlation=cfg.correlation,
                num_species=self.num_species,
                avg_num_neighbours=self.avg_num_neighbours,
                radial_mlp_hidden=cfg.radial_mlp_hidden,
                radial_mlp_layers=cfg.radial_mlp_layers,
                residual=t > 0 or cfg.residual_first_layer,
                last=last,
                readout_mlp_hidden=cfg.readout_mlp_hidden,
                edge_chunk_size=edge_chunk_size,
                half_list=half_list,
                name=f"interaction_{t}",
            )(node_feats, onehot, edge_sh, edge_radial, senders, receivers)
            self.sow("intermediates", f"readout_{t}", readout)
            total = total + readout
            irreps_in = irreps_out
        return total
