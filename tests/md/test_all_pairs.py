"""The all-pairs neighbour list (equiforce.md.all_pairs) against jax-md's own (``disable_cell_list=True``): the
same pairs in the same order, the same rebuilds and overflow flags, and no int64-into-int32 scatter under x64
(jax-md's warns: JAX's FutureWarning, an error in future releases)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import partition, space

from equiforce.md.all_pairs import all_pairs_neighbor_list

FORMATS = [partition.NeighborListFormat.Sparse, partition.NeighborListFormat.OrderedSparse]


def _spaces():
    box = jnp.asarray([[9.0, 0.0, 0.0], [1.5, 8.0, 0.0], [0.5, 1.0, 8.5]]).T  # triclinic, columns
    return {"free": space.free()[0], "triclinic": space.periodic_general(box, fractional_coordinates=False)[0]}


@pytest.mark.parametrize(
    ("fmt", "where", "skin"),
    [(FORMATS[0], "free", 1.0), (FORMATS[1], "triclinic", 1.0), (FORMATS[1], "free", 0.0)],
    ids=["sparse-free", "ordered-triclinic", "ordered-free-no-skin"],
)
def test_same_pairs_rebuilds_and_overflow_as_jax_md(fmt, where, skin):
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    pos = jnp.asarray(rng.uniform(0.0, 8.0, (40, 3)))
    moved = pos + 0.2 * rng.standard_normal(pos.shape)  # beyond half the skin: a rebuild
    squeezed = 4.0 + 0.35 * (pos - 4.0)  # denser: more pairs than the capacity holds
    displacement = _spaces()[where]

    def drop_some(idx):  # a custom mask (as the replica engine's padding): atoms 3, 10, 17, ... drop out
        return jnp.where(idx % 7 == 3, idx.shape[0], idx)

    def run(fns):
        first = fns.allocate(pos)
        step = jax.jit(lambda p, nb: nb.update(p))
        return [first, step(pos + 0.01, first), step(moved, first), step(squeezed, first), fns.allocate(pos, 2)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jax-md's own int64 scatter (the reason for all_pairs)
        ref = partition.neighbor_list(
            displacement,
            1.0,
            3.0,
            dr_threshold=skin,
            format=fmt,
            disable_cell_list=True,
            custom_mask_function=drop_some,
        )
        expected = run(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(
            all_pairs_neighbor_list(displacement, 3.0, dr_threshold=skin, format=fmt, custom_mask_function=drop_some)
        )
    for a, b in zip(expected, got, strict=True):
        assert b.idx.dtype == jnp.int32 and a.idx.shape == b.idx.shape
        np.testing.assert_array_equal(np.asarray(a.idx), np.asarray(b.idx))
        assert bool(a.did_buffer_overflow) == bool(b.did_buffer_overflow)
        np.testing.assert_array_equal(np.asarray(a.reference_position), np.asarray(b.reference_position))
    assert bool(got[3].did_buffer_overflow) and not bool(got[2].did_buffer_overflow)
    assert got[4].idx.shape[-1] > got[0].idx.shape[-1]  # extra_capacity


def test_dense_format_is_refused():
    with pytest.raises(ValueError, match="sparse"):
        all_pairs_neighbor_list(space.free()[0], 3.0, format=partition.NeighborListFormat.Dense)
