"""Building blocks shared by the models: NaN-safe edge geometry, radial bases, cutoff envelopes.

All functions are pure and jittable; none allocates parameters.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax.numpy as jnp

__all__ = ["bessel_basis", "edge_lengths", "polynomial_envelope", "radial_embedding", "safe_unit_vectors"]


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
    """Smooth cutoff u(x) of ``x = r / r_max``, zero with p-1 vanishing derivatives at x = 1.

    ``u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` for x < 1, 0 beyond.

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
    r: jnp.ndarray, edge_mask: jnp.ndarray, *, r_max: float, num_basis: int = 8, envelope_p: int = 6
) -> jnp.ndarray:
    """Bessel basis times the polynomial envelope, zero on padding edges and beyond ``r_max``.

    Args:
      r: ``[n_edges]`` NaN-safe lengths in Å (see :func:`edge_lengths`).
      edge_mask: ``[n_edges]`` bool.

    Returns:
      ``[n_edges, num_basis]`` in the dtype of ``r``.
    """
    envelope = polynomial_envelope(r / r_max, envelope_p) * edge_mask.astype(r.dtype)
    return bessel_basis(r, num_basis, r_max) * envelope[:, None]
