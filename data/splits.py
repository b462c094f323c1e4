"""Train/validation/test splits: seeded random splits, index files, and index validation.

Every function returns or checks disjoint integer index arrays (int64, 0-based) and raises
:class:`~equiforce.data.errors.DataError` for out-of-range, duplicate or overlapping indices.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.structures import StructureSet

__all__ = ["check_indices", "random_split", "read_index_file", "split_by_indices"]

PathLike = str | os.PathLike


def random_split(
    n: int,
    fractions: Sequence[float] | None = None,
    *,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Split ``range(n)`` into disjoint random parts, reproducibly.

    Give either ``fractions`` (each in (0, 1], sum ≤ 1) or ``sizes`` (each ≥ 1, sum ≤ n). With fractions
    summing to 1 every index is used: part sizes are ``floor(f * n)`` and the leftover indices go to the
    parts with the largest remainders. With a smaller sum the remaining indices are left out.

    Args:
      n: number of items.
      fractions: relative part sizes, e.g. ``(0.9, 0.1)``.
      sizes: absolute part sizes, e.g. ``(950, 50)``.
      seed: seed of ``np.random.default_rng``.

    Returns:
      One sorted ``int64`` index array per part; the parts never share an index.

    Raises:
      DataError: both or neither of fractions/sizes, a negative or too large request, or an empty part.
    """
    if n < 0 or int(n) != n:
        raise DataError(f"n must be a non-negative integer, got {n}")
    n = int(n)
    if (fractions is None) == (sizes is None):
        raise DataError("give exactly one of fractions or sizes")
    if fractions is not None:
        fr = np.asarray(fractions, dtype=np.float64).reshape(-1)
        if fr.size == 0 or np.any(~np.isfinite(fr)) or np.any(fr <= 0) or fr.sum() > 1 + 1e-9:
            raise DataError(f"fractions must be positive and sum to at most 1, got {fr.tolist()}")
        raw = fr * n
        counts = np.floor(raw + 1e-9).astype(np.int64)
        if abs(fr.sum() - 1.0) <= 1e-9:
            leftover = n - int(counts.sum())
            order = np.argsort(-(raw - counts), kind="stable")
            counts[order[:leftover]] += 1
    else:
        counts = np.asarray(sizes).reshape(-1)
        if counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
            raise DataError(f"sizes must be integers, got {sizes!r}")
        counts = counts.astype(np.int64)
        if np.any(counts < 1):
            raise DataError(f"sizes must be >= 1, got {counts.tolist()}")
    if counts.sum() > n:
        raise DataError(f"requested {int(counts.sum())} items in total but only {n} are available")
    if np.any(counts == 0):
        raise DataError(f"a part of the split would be empty (sizes {counts.tolist()} of {n})")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return tuple(np.sort(perm[a:b]).astype(np.int64) for a, b in itertools.pairwise(bounds))


def check_indices(*parts: Sequence[int] | np.ndarray, n: int | None = None) -> tuple[np.ndarray, ...]:
    """Validate index arrays: integers, in ``[0, n)`` if ``n`` is given, no duplicates, mutually disjoint.

    Returns:
      The parts as ``int64`` arrays (order kept).

    Raises:
      DataError: a non-integer, negative, out-of-range or duplicate index, or two parts overlapping
        (the message names the parts and a few shared indices).
    """
    out = []
    for k, p in enumerate(parts):
        a = np.asarray(p).reshape(-1)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.isfinite(a)) or not np.all(np.mod(a, 1) == 0):
                raise DataError(f"index part {k} contains non-integers")
        a = a.astype(np.int64)
        if a.size and a.min() < 0:
            raise DataError(f"index part {k} contains negative index {int(a.min())}")
        if n is not None and a.size and a.max() >= n:
            raise DataError(f"index part {k} contains index {int(a.max())}, out of range for {n} items")
        uniq, counts = np.unique(a, return_counts=True)
        if np.any(counts > 1):
            raise DataError(f"index part {k} has duplicate indices {uniq[counts > 1][:10].tolist()}")
        out.append(a)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            shared = np.intersect1d(out[i], out[j])
            if shared.size:
                raise DataError(
                    f"index parts {i} and {j} overlap in {shared.size} indices, e.g. {shared[:10].tolist()}"
                )
    return tuple(out)


_SEP = re.compile(r"[,\s;]+")


def read_index_file(path: PathLike, n: int | None = None) -> np.ndarray:
    """Read 0-based integer indices from a text file (one per line, or separated by commas/whitespace).

    Blank lines and ``#`` comments are ignored. Integral floats such as ``12.0`` are accepted (some CSV
    writers produce them); anything else is an error. This reads the rMD17 ``splits/index_*.csv`` files.

    Args:
      path: the file.
      n: number of items the indices refer to; when given, every index must lie in ``[0, n)``.

    Returns:
      ``int64`` array in file order.

    Raises:
      DataError: missing/unreadable/empty file, a token that is not an integer, a negative or
        out-of-range index, or a duplicate.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read index file ({type(err).__name__}: {err})") from err
    values: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        for tok in _SEP.split(line):
            if not tok:
                continue
            try:
                v = int(tok)
            except ValueError:
                try:
                    fv = float(tok)
                except ValueError:
                    raise DataError(f"{path}:{lineno}: {tok!r} is not an integer index") from None
                if not np.isfinite(fv) or fv != int(fv):
                    raise DataError(f"{path}:{lineno}: {tok!r} is not an integer index") from None
                v = int(fv)
            values.append(v)
    if not values:
        raise DataError(f"{path}: index file holds no indices")
    try:
        (idx,) = check_indices(np.asarray(values, dtype=np.int64), n=n)
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    return idx


def split_by_indices(
    structures: StructureSet, *indices: Sequence[int] | np.ndarray, allow_overlap: bool = False
) -> tuple[StructureSet, ...]:
    """Cut ``structures`` into the parts given by index arrays (e.g. train and test indices).

    Args:
      structures: the full set.
      *indices: one 0-based index array per part.
      allow_overlap: skip the disjointness check between parts (duplicates within a part still fail).

    Returns:
      One :class:`StructureSet` per index array, in index order.

    Raises:
      DataError: an out-of-range or duplicate index, or (unless ``allow_overlap``) overlapping parts.
    """
    if not indices:
        raise DataError("give at least one index array")
    if allow_overlap:
        parts = tuple(check_indices(p, n=len(structures))[0] for p in indices)
    else:
        parts = check_indices(*indices, n=len(structures))
    return tuple(structures.subset(p) for p in parts)
