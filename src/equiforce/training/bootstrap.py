"""Bootstrap resampling (bagging) of the training set for a committee.

Each member k trains on its own resample of the n training structures, drawn with replacement (Efron 1979;
for neural-network committees, Breiman 1996, "Bagging predictors", doi:10.1007/BF00058655). All members still
share one data order and one padded batch per step: a resample is applied as integer weights — structure s
counts ``c_k[s]`` times in member k's loss (``c_k`` ~ Multinomial(n, 1/n), about 37 % of the structures get
0) — so member k's loss on a batch equals the unweighted loss on that batch with each structure repeated
``c_k[s]`` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["batch_weights", "bootstrap_counts"]

_TAG = 0xB0075  # separates these draws from the other uses of the training seed


def bootstrap_counts(n_structures: int, ensemble_size: int, seed: int) -> np.ndarray:
    """``[ensemble_size, n_structures]`` int64: how often each structure appears in each member's resample.

    Each row sums to ``n_structures``; row k depends only on ``(seed, k)`` (a resumed run draws the same).

    Raises:
      ValueError: ``n_structures`` < 1 or ``ensemble_size`` < 1.
    """
    if n_structures < 1 or ensemble_size < 1:
        raise ValueError(f"need n_structures >= 1 and ensemble_size >= 1, got {n_structures}, {ensemble_size}")
    rows = []
    for k in range(ensemble_size):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), k, _TAG]))
        rows.append(np.bincount(rng.integers(0, n_structures, n_structures), minlength=n_structures))
    return np.stack(rows)


def batch_weights(counts: np.ndarray, group: Sequence[int], n_graphs: int, dtype: np.dtype | type) -> np.ndarray:
    """``[K, n_graphs]`` per-graph weights of one padded batch: the counts of its structures, 0 on padding.

    Args:
      counts: ``[K, n_structures]`` from :func:`bootstrap_counts`.
      group: the batch's structure indices, in graph order (:func:`equiforce.data.graph.batch_groups`).
      n_graphs: the batch's padded graph count.
      dtype: the float dtype of the weights.
    """
    w = np.zeros((counts.shape[0], n_graphs), dtype=dtype)
    w[:, : len(group)] = counts[:, list(group)]
    return w
