"""Building blocks shared by the models: NaN-safe edge geometry, radial bases, cutoff envelopes, and the
blocked evaluation of per-edge and per-atom work (:func:`chunked_edge_sum`, :func:`chunked_node_map`).

All functions are pure and jittable; none allocates parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CPU_CHUNK_MIN_EDGES",
    "CPU_EDGE_CHUNK",
    "CPU_NODE_CHUNK",
    "bessel_basis",
    "chunked_edge_sum",
    "chunked_node_map",
    "edge_lengths",
    "edge_shards",
    "full_edges",
    "pair_messages",
    "polynomial_envelope",
    "pure_submodule",
    "radial_embedding",
    "resolve_edge_chunk",
    "reverse_edge_signs",
    "safe_unit_vectors",
]

#: edges per block of the chunked edge evaluation on CPU (128-256 measured best for MACE on a 2-core EPYC)
CPU_EDGE_CHUNK = 128
#: atoms per block of node-wise work on CPU when edges are blocked (MACE's symmetric contraction)
CPU_NODE_CHUNK = 64
#: below this many edges the automatic setting evaluates all edges at once (they fit in cache anyway;
#: blocks cost about 10 % on a 21-atom molecule)
CPU_CHUNK_MIN_EDGES = 2048

EdgeFn = Callable[..., jnp.ndarray]
Array = jnp.ndarray
Arrays = tuple[jnp.ndarray, ...]

_EDGE_SHARDS: contextvars.ContextVar[int] = contextvars.ContextVar("equiforce_edge_shards", default=1)


@contextlib.contextmanager
def edge_shards(n: int) -> Iterator[None]:
    """Trace the network with its edge axis in ``n`` equal contiguous shards, one per device.

    Used by :mod:`equiforce.md.sharded` around the network's tracing. Inside, :func:`chunked_edge_sum` blocks
    each shard on its own (``vmap`` over the shards of its ``lax.scan`` over blocks, the shards' partial node
    sums added at the end), so that a device's blocks hold only its own edges and the scan never runs across
    the sharded axis; :func:`chunked_node_map` likewise blocks each device's atoms on their own.

    Raises:
      ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"edge shards must be >= 1, got {n}")
    token = _EDGE_SHARDS.set(int(n))
    try:
        yield
    finally:
        _EDGE_SHARDS.reset(token)


def resolve_edge_chunk(
    edge_chunk_size: int | None, n_edges: int, small_graph_chunk: int = 0, *, half_list: bool = False
) -> int:
    """The block size for ``n_edges`` edges under a model's ``edge_chunk_size`` setting.

    An explicit size is used as is (0: no blocks). None (automatic) means, on CPU, :data:`CPU_EDGE_CHUNK` for
    at least :data:`CPU_CHUNK_MIN_EDGES` edges and ``small_graph_chunk`` (the model's choice; 0: no blocks)
    below that; on other backends no blocks. Sizes count directed edges: with ``half_list`` the ``n_edges`` rows
    are pairs (``2 n_edges`` directed edges) and the result is in pairs, half the directed size, so that a block
    holds as many messages either way.
    """
    if edge_chunk_size is None:
        directed = 2 * n_edges if half_list else n_edges
        if jax.default_backend() != "cpu":
            edge_chunk_size = 0
        else:
            edge_chunk_size = CPU_EDGE_CHUNK if directed >= CPU_CHUNK_MIN_EDGES else small_graph_chunk
    if half_list and edge_chunk_size > 0:
        return max(edge_chunk_size // 2, 1)
    return edge_chunk_size


def _balanced_blocks(n: int, chunk: int) -> tuple[int, int, int]:
    """``(n_blocks, block, pad)``: the fewest blocks of at most ``chunk`` rows, equal in size, covering ``n``.

    Equal blocks keep the padding below one row per block (336 edges in blocks of at most 64: 6 x 56, no
    padding, instead of 6 x 64 with 48 padding rows).
    """
    n_blocks = -(-n // chunk)
    block = -(-n // n_blocks)
    return n_blocks, block, n_blocks * block - n


def pure_submodule(module: nn.Module, sample: jnp.ndarray) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """A bound flax submodule as a pure function of its input (usable inside ``lax.scan``/``jax.checkpoint``).

    The module is called once on ``sample`` (one row is enough), which creates its parameters at init and
    binds them at apply; the returned function applies an unbound clone with those parameters, so they get
    gradients as usual and keep their names in the parameter tree.
    """
    module(sample)
    params = module.variables["params"]
    unbound = module.clone(parent=None)
    return lambda x: unbound.apply({"params": params}, x)


def chunked_edge_sum(
    edge_fn: Callable[..., jnp.ndarray],
    edge_args: tuple[jnp.ndarray, ...],
    receivers: jnp.ndarray,
    n_nodes: int,
    chunk: int,
) -> jnp.ndarray:
    """``Σ_{edges e into node i} edge_fn(*edge_args)[e]``, ``[n_nodes, ...]``, ``chunk`` edges at a time.

    ``edge_fn`` maps per-edge arrays ``[e, ...]`` (the rows of ``edge_args``) to per-edge outputs ``[e, ...]``
    and must be pure (no bound flax module inside; see :func:`pure_submodule`). With ``receivers`` of shape
    ``[n_edges, k]``, each row of ``edge_args`` is one item giving k outputs ``[e, k, ...]``, output j going to
    node ``receivers[e, j]`` (a pair of a half neighbour list gives its two directed messages, k = 2).

    With ``chunk <= 0`` or at most ``chunk`` edges, it is evaluated on all edges at once and summed with
    ``segment_sum``. Otherwise a ``lax.scan`` runs over equal blocks of at most ``chunk`` edges and adds each
    block's outputs into the node array, and the block's work is rematerialised (``jax.checkpoint``) in the backward
    pass: the per-edge intermediates (``[edges, irreps, channels]`` in the equivariant models) then stay in cache,
    and memory grows with the number of atoms rather than with edges x irreps x channels. The last block is padded
    with copies of edge 0's inputs whose outputs are dropped (receiver index ``n_nodes``, out of range). Same sum,
    any order of differentiation. Inside :func:`edge_shards` (n shards), each shard of ``n_edges / n`` edges is
    blocked on its own and the shards' node sums are added (all at once when a shard has at most ``chunk`` edges).

    Raises:
      ValueError: inside :func:`edge_shards`, an edge count that is not a multiple of the shard count.
    """
    n_edges = receivers.shape[0]
    shards = _EDGE_SHARDS.get()
    if chunk <= 0 or n_edges <= chunk * shards:
        out = edge_fn(*edge_args)
        out = out.reshape(receivers.size, *out.shape[receivers.ndim :])
        return jax.ops.segment_sum(out, receivers.reshape(-1), num_segments=n_nodes)
    if shards == 1:
        return _blocked_edge_sum(edge_fn, edge_args, receivers, n_nodes, chunk)
    if n_edges % shards:
        raise ValueError(f"{n_edges} edges do not split into {shards} equal shards")

    def split(a: jnp.ndarray) -> jnp.ndarray:
        return a.reshape(shards, n_edges // shards, *a.shape[1:])

    def shard_sum(args: tuple[jnp.ndarray, ...], r: jnp.ndarray) -> jnp.ndarray:
        return _blocked_edge_sum(edge_fn, args, r, n_nodes, chunk)

    return jax.vmap(shard_sum)(tuple(split(a) for a in edge_args), split(receivers)).sum(axis=0)


def _blocked_edge_sum(edge_fn: EdgeFn, edge_args: Arrays, receivers: jnp.ndarray, n_nodes: int, chunk: int) -> Array:
    """:func:`chunked_edge_sum`'s ``lax.scan`` over blocks of at most ``chunk`` edges."""
    n_chunks, chunk, pad = _balanced_blocks(receivers.shape[0], chunk)

    def blocks(a: jnp.ndarray, fill: int | None = None) -> jnp.ndarray:
        if fill is None:
            a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
        else:
            a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    contribution = jax.checkpoint(edge_fn)

    def body(acc: jnp.ndarray, block: tuple[jnp.ndarray, ...]):
        *args, r = block
        return acc.at[r].add(contribution(*args), mode="drop"), None

    out = jax.eval_shape(edge_fn, *(a[:1] for a in edge_args))
    init = jnp.zeros((n_nodes, *out.shape[receivers.ndim :]), out.dtype)
    acc, _ = jax.lax.scan(body, init, (*(blocks(a) for a in edge_args), blocks(receivers, fill=n_nodes)))
    return acc


def chunked_node_map(fn: Callable[..., jnp.ndarray], args: tuple[jnp.ndarray, ...], chunk: int) -> jnp.ndarray:
    """``fn(*args)`` for a row-wise ``fn`` (row i of the output depends on row i of each arg only), ``chunk`` rows
    at a time.

    With ``chunk <= 0`` or at most ``chunk`` rows, ``fn`` is called once. Otherwise ``lax.map`` runs it on equal
    blocks of at most ``chunk`` rows, rematerialised in the backward pass (``jax.checkpoint``), so that large per-atom
    intermediates (MACE's ``[monomials, atoms x channels]``) exist for one block at a time; the last block is
    padded with copies of row 0 whose outputs are dropped. ``fn`` must be pure (no bound flax module inside).
    Same result, any order of differentiation. Inside :func:`edge_shards` (n shards: sharded MD), the rows are
    padded to a multiple of n (copies of row 0, dropped) and each of the n contiguous shards is blocked on its own.
    """
    n = args[0].shape[0]
    shards = _EDGE_SHARDS.get()
    if chunk <= 0 or n <= chunk * shards:
        return fn(*args)
    if shards > 1:  # each device's atoms in their own blocks: rows padded to a multiple of the shard count
        per = -(-n // shards)
        padded = tuple(jnp.concatenate([a, jnp.broadcast_to(a[:1], (per * shards - n, *a.shape[1:]))]) for a in args)
        split = tuple(a.reshape(shards, per, *a.shape[1:]) for a in padded)
        out = jax.vmap(lambda *xs: _blocked_node_map(fn, xs, chunk))(*split)
        return out.reshape(shards * per, *out.shape[2:])[:n]
    return _blocked_node_map(fn, args, chunk)


def _blocked_node_map(fn: Callable[..., jnp.ndarray], args: tuple[jnp.ndarray, ...], chunk: int) -> jnp.ndarray:
    """:func:`chunked_node_map`'s ``lax.map`` over blocks of at most ``chunk`` rows."""
    n = args[0].shape[0]
    n_chunks, chunk, pad = _balanced_blocks(n, chunk)

    def blocks(a: jnp.ndarray) -> jnp.ndarray:
        a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    block_fn = jax.checkpoint(fn)
    out = jax.lax.map(lambda xs: block_fn(*xs), tuple(blocks(a) for a in args))
    return out.reshape(n_chunks * chunk, *out.shape[2:])[:n]


def full_edges(
    vectors: jnp.ndarray, senders: jnp.ndarray, receivers: jnp.ndarray, edge_mask: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The directed edge list of a half neighbour list: every pair, then all reversed pairs.

    Args:
      vectors: ``[n_pairs, 3]`` Å, sender minus receiver position of each pair (listed once).
      senders, receivers: ``[n_pairs]`` int.
      edge_mask: ``[n_pairs]`` bool.

    Returns:
      ``(vectors, senders, receivers, edge_mask)`` with ``2 n_pairs`` rows; row ``n_pairs + k`` is pair k
      reversed (its vector negated).
    """
    return (
        jnp.concatenate([vectors, -vectors]),
        jnp.concatenate([senders, receivers]),
        jnp.concatenate([receivers, senders]),
        jnp.concatenate([edge_mask, edge_mask]),
    )


def pair_messages(
    coupling: jnp.ndarray,
    x: jnp.ndarray,
    senders: jnp.ndarray,
    receivers: jnp.ndarray,
    weights: jnp.ndarray,
    sign: jnp.ndarray,
) -> jnp.ndarray:
    """``[e, 2, D_mid, C]``: the messages receiver ← sender and sender ← receiver of a block of pairs.

    Both directions share the per-pair ``coupling`` ``[e, D_mid, D_in]`` (a tensor product with Y(r̂) of the
    pair's vector) and radial ``weights`` ``[e, D_mid, C]``; the reversed message has its columns multiplied by
    ``sign`` ``[D_mid, 1]`` (:func:`reverse_edge_signs`). ``x`` ``[n_nodes, D_in, C]`` are the node features.
    One ``[e, D_mid, D_in] @ [e, D_in, 2C]`` matmul gives both. Sum them with :func:`chunked_edge_sum` and
    receivers ``stack([receivers, senders], axis=1)``.
    """
    channels = x.shape[-1]
    both = coupling @ jnp.concatenate([x[senders], x[receivers]], axis=-1)  # [e, D_mid, 2C]
    return jnp.stack([both[..., :channels] * weights, both[..., channels:] * (weights * sign)], axis=1)


def reverse_edge_signs(cg: np.ndarray, sh_degrees: np.ndarray) -> np.ndarray:
    """``[D_mid]`` ±1: how each output column of an edge's tensor product changes when the edge is reversed.

    ``cg`` ``[D_in, D_sh, D_mid]`` is the bilinear map from a sender's features and the edge's spherical
    harmonics Y(r̂) to a message, ``sh_degrees`` ``[D_sh]`` the degree l of each Y row (0 for a constant row).
    Since Y^l(-r̂) = (-1)^l Y^l(r̂), the message of the reversed edge has column k multiplied by (-1)^l of the
    harmonics it reads; every column reads one degree's parity (one path), which is checked.

    Raises:
      ValueError: a column that mixes even and odd degrees.
    """
    reads = np.any(cg != 0, axis=0)  # [D_sh, D_mid]
    odd = (np.asarray(sh_degrees) % 2 == 1)[:, None]
    has_odd = np.any(reads & odd, axis=0)
    if np.any(has_odd & np.any(reads & ~odd, axis=0)):
        raise ValueError("a tensor-product column reads harmonics of both parities")
    return np.where(has_odd, -1.0, 1.0)


def edge_lengths(vectors: jnp.ndarray, edge_mask: jnp.ndarray) -> jnp.ndarray:
    """``[n_edges]`` lengths of ``[n_edges, 3]`` vectors (Å), NaN-safe on padding.

    Padding edges (``edge_mask`` False) have zero-length vectors; their length is reported as
    1 so that neither the value nor the gradient is NaN. Callers must still mask their output.
    """
    r2 = jnp.sum(vectors**2, axis=-1)
    r2 = jnp.where(edge_mask, r2, jnp.ones_like(r2))
    return jnp.sqrt(r2)


def safe_unit_vectors(vectors: jnp.ndarray, edge_mask: jnp.ndarray) -> jnp.ndarray:
    """``[n_edges, 3]`` vectors with padding rows replaced by a fixed unit vector (NaN-safe)."""
    unit = jnp.zeros_like(vectors).at[:, 2].set(1.0)
    return jnp.where(edge_mask[:, None], vectors, unit)


def polynomial_envelope(x: jnp.ndarray, p: int = 6) -> jnp.ndarray:
    """Smooth cutoff u(x) of ``x = r / r_max``: u(1) = 0 with vanishing first and second derivatives at x = 1.

    ``u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` for x < 1, 0 beyond. Its three
    coefficients fix exactly u(1) = u'(1) = u''(1) = 0 (the third derivative at 1 is −p(p+1)(p+2) ≠ 0), so energies
    and forces go to zero smoothly at the cutoff and force derivatives (Hessians) stay continuous. At x = 0,
    u = 1 with its first p − 1 derivatives zero.

    References:
      J. Gasteiger, J. Groß, S. Günnemann, "Directional Message Passing for Molecular Graphs",
      ICLR 2020, arXiv:2003.03123, eq. (8); used with p = 6 by NequIP (arXiv:2101.03164).
    """
    xp = x**p
    u = 1.0 - (p + 1.0) * (p + 2.0) / 2.0 * xp + p * (p + 2.0) * xp * x - p * (p + 1.0) / 2.0 * xp * x * x
    return jnp.where(x < 1.0, u, jnp.zeros_like(u))


def bessel_basis(r: jnp.ndarray, num_basis: int, r_max: float) -> jnp.ndarray:
    """``[n_edges, num_basis]`` sine Bessel functions sqrt(2/r_max) sin(n π r / r_max) / r, n = 1..num_basis.

    References: Gasteiger et al., arXiv:2003.03123, eq. (7).
    """
    return e3nn.bessel(r, num_basis, r_max)


def radial_embedding(
    r: jnp.ndarray,
    edge_mask: jnp.ndarray,
    *,
    r_max: float,
    num_basis: int = 8,
    envelope_p: int = 6,
    basis_input: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Bessel basis times the polynomial envelope, zero on padding edges and beyond ``r_max``.

    Args:
      r: ``[n_edges]`` NaN-safe lengths in Å (see :func:`edge_lengths`); the envelope's argument.
      edge_mask: ``[n_edges]`` bool.
      basis_input: ``[n_edges]`` what the Bessel basis sees instead of ``r`` (a transformed distance, e.g.
        mace-torch's Agnesi transform); None: ``r``.

    Returns:
      ``[n_edges, num_basis]`` in the dtype of ``r``.
    """
    envelope = polynomial_envelope(r / r_max, envelope_p) * edge_mask.astype(r.dtype)
    return bessel_basis(r if basis_input is None else basis_input, num_basis, r_max) * envelope[:, None]
