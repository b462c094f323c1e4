"""Splits: seeded random splits, index files, index validation."""

import numpy as np
import pytest

from equiforce.data import DataError
from equiforce.data.readers import load_sample
from equiforce.data.splits import check_indices, random_split, read_index_file, split_by_indices


def test_random_split_fractions_disjoint_and_seeded():
    parts = random_split(103, (0.8, 0.1, 0.1), seed=3)
    assert sum(len(p) for p in parts) == 103
    assert [len(p) for p in parts] == [83, 10, 10] or sorted(len(p) for p in parts) == [10, 10, 83]
    union = np.concatenate(parts)
    assert np.unique(union).size == union.size == 103
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.intersect1d(parts[i], parts[j]).size == 0
    again = random_split(103, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = random_split(103, (0.8, 0.1, 0.1), seed=4)
    assert not np.array_equal(parts[1], other[1])


def test_random_split_sizes_and_errors():
    a, b = random_split(50, sizes=(30, 5), seed=0)
    assert len(a) == 30 and len(b) == 5 and np.intersect1d(a, b).size == 0
    assert a.dtype == np.int64
    with pytest.raises(DataError):
        random_split(10, sizes=(8, 5))
    with pytest.raises(DataError):
        random_split(10, (0.7, 0.5))
    with pytest.raises(DataError):
        random_split(10)
    with pytest.raises(DataError, match="empty"):
        random_split(5, (0.9, 0.05))


def test_read_index_file(tmp_path):
    p = tmp_path / "idx.csv"
    p.write_text("# header comment\n5\n3\n\n7.0\n")
    np.testing.assert_array_equal(read_index_file(p), [5, 3, 7])
    p.write_text("1, 2,3\n4")
    np.testing.assert_array_equal(read_index_file(p, n=5), [1, 2, 3, 4])
    with pytest.raises(DataError, match="out of range"):
        read_index_file(p, n=4)
    p.write_text("1\n2\n1\n")
    with pytest.raises(DataError, match=r"idx\.csv.*duplicate"):
        read_index_file(p)
    p.write_text("1\nx\n")
    with pytest.raises(DataError, match=r"idx\.csv:2"):
        read_index_file(p)
    p.write_text("-1\n")
    with pytest.raises(DataError, match="negative"):
        read_index_file(p)
    p.write_text("\n")
    with pytest.raises(DataError, match="no indices"):
        read_index_file(p)


def test_split_by_indices():
    s = load_sample("test").subset(range(20))
    train, test = split_by_indices(s, [0, 5, 7], [1, 2])
    assert len(train) == 3 and len(test) == 2
    np.testing.assert_array_equal(train.energy, s.energy[[0, 5, 7]])
    with pytest.raises(DataError, match="overlap"):
        split_by_indices(s, [0, 1], [1, 2])
    with pytest.raises(DataError, match="out of range"):
        split_by_indices(s, [0, 20])
    with pytest.raises(DataError, match="duplicate"):
        split_by_indices(s, [3, 3])
    both = split_by_indices(s, [0, 1], [1, 2], allow_overlap=True)
    assert len(both[1]) == 2
    with pytest.raises(DataError, match="overlap"):
        check_indices([1, 2], [3], [2])
