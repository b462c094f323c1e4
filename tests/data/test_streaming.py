"""Datasets larger than memory: neighbour graphs in the HDF5 file, truncated files, ``equiforce preprocess``
(parallel, resumable, byte-identical after an interruption), the streamed epoch's order and the prefetch
thread."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from equiforce.cli import main as cli_main
from equiforce.data import DataError, StructureSet, build_neighbour_graphs, load_sample
from equiforce.data.graph import BatchShard, batch_groups, estimate_budget, plan_batches
from equiforce.data.hdf5 import HDF5Dataset, HDF5Writer, read_hdf5
from equiforce.data.preprocess import parts_folder, preprocess
from equiforce.data.streaming import HDF5Stream, Prefetcher, sample_rows

R_MAX = 4.0


def _periodic_set(rng, n=12) -> StructureSet:
    """Small periodic structures of different sizes (edges with non-zero cell shifts)."""
    sizes = rng.integers(2, 6, n)
    total = int(sizes.sum())
    return StructureSet(
        atomic_numbers=rng.integers(1, 10, total),
        positions=rng.uniform(0, 3.0, (total, 3)),
        n_atoms=sizes,
        cell=np.tile(np.eye(3) * 3.0, (n, 1, 1)),
        pbc=np.ones((n, 3), bool),
        energy=rng.normal(size=n),
        forces=rng.normal(size=(total, 3)),
    )


def _spread(rng, n=12) -> StructureSet:
    s = _periodic_set(rng, n)
    # atoms kept >= 0.5 Å apart: a jittered grid inside the cell
    pos = []
    for k in range(n):
        grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3) * 1.5
        pos.append(grid[: s.n_atoms[k]] + rng.uniform(-0.1, 0.1, (s.n_atoms[k], 3)))
    return StructureSet(
        atomic_numbers=s.atomic_numbers,
        positions=np.concatenate(pos),
        n_atoms=s.n_atoms,
        cell=s.cell,
        pbc=s.pbc,
        energy=s.energy,
        forces=s.forces,
    )


def _same_graphs(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("senders", "receivers", "shifts"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
            assert getattr(x, name).dtype == np.int32


def test_stored_graphs_equal_fresh_ones(tmp_path, rng):
    s = _spread(rng)
    graphs = build_neighbour_graphs(s, R_MAX)
    assert any(np.any(g.shifts) for g in graphs)  # periodic images are exercised
    path = tmp_path / "g.h5"
    with HDF5Writer(path, r_max=R_MAX) as w:
        w.append(s.subset(range(5)), graphs[:5])
        w.append(s.subset(range(5, 12)), graphs[5:])
    with HDF5Dataset(path) as ds:
        assert ds.r_max == R_MAX and ds.has_graphs
        np.testing.assert_array_equal(ds.n_edges, [g.n_edges for g in graphs])
        _same_graphs(ds.read_graphs(), graphs)
        idx = [7, 0, 7, 11]
        _same_graphs(ds.read_graphs(idx), [graphs[k] for k in idx])
        # a fresh build from the stored structures gives the stored graphs
        _same_graphs(build_neighbour_graphs(ds.read(), R_MAX), graphs)
    assert read_hdf5(path).positions.tobytes() == s.positions.tobytes()
    # sizes only: the budget without the edges
    counts = tmp_path / "c.h5"
    with HDF5Writer(counts, r_max=R_MAX, edges=False) as w:
        w.append(s, graphs)
    with HDF5Dataset(counts) as ds:
        assert not ds.has_graphs
        np.testing.assert_array_equal(ds.n_edges, [g.n_edges for g in graphs])
        with pytest.raises(DataError, match="no neighbour graphs"):
            ds.read_graphs([0])
    # an exception inside the block leaves no file
    with pytest.raises(RuntimeError), HDF5Writer(tmp_path / "x.h5", r_max=R_MAX) as w:
        w.append(s, graphs)
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "g.h5"]


def test_graph_reads_across_runs_with_edgeless_structures(tmp_path):
    """Runs of structures read in one go: structures without edges (isolated atoms) between and inside runs."""
    single = np.array([[0.0, 0.0, 0.0]])
    pair = np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]])
    parts = [pair, single, single, pair, single, pair]
    s = StructureSet(
        atomic_numbers=np.ones(sum(len(p) for p in parts), int),
        positions=np.concatenate(parts),
        n_atoms=[len(p) for p in parts],
        cell=np.zeros((6, 3, 3)),
        pbc=np.zeros((6, 3), bool),
        energy=np.arange(6.0),
    )
    graphs = build_neighbour_graphs(s, R_MAX)
    assert [g.n_edges for g in graphs] == [2, 0, 0, 2, 0, 2]
    path = tmp_path / "e.h5"
    with HDF5Writer(path, r_max=R_MAX) as w:
        w.append(s, graphs)
    with HDF5Dataset(path) as ds:
        for idx in ([0, 2, 3, 5], [5, 1, 0], [1, 2, 4], [4, 3, 0, 1]):
            _same_graphs(ds.read_graphs(idx), [graphs[k] for k in idx])
            np.testing.assert_array_equal(ds.read(idx).energy, np.asarray(idx, float))


def _chunk_ranges(path):
    """(first row, byte end) of every chunk of every dataset of an intact file."""
    out = {}
    with h5py.File(path) as f:
        for name in f:
            ds = f[name]
            infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
            out[name] = [(int(i.chunk_offset[0]), i.byte_offset + i.size) for i in infos]
    return out


def test_truncated_file_names_the_first_lost_frame(tmp_path):
    base = load_sample("train").subset(range(200))
    s = StructureSet.concatenate([base] * 15)  # 3000 frames, several chunks per dataset
    graphs = build_neighbour_graphs(base, 5.0) * 15
    path = tmp_path / "full.h5"
    with HDF5Writer(path, r_max=5.0) as w:
        for a in range(0, 3000, 500):
            w.append(s.subset(range(a, a + 500)), graphs[a : a + 500])
    data = path.read_bytes()
    chunks = _chunk_ranges(path)
    with HDF5Dataset(path) as ds:
        atom_offsets, edge_offsets = ds.offsets, ds.edge_offsets
    for fraction in (0.9, 0.6):
        cut = int(len(data) * fraction)
        # the truth from the intact file: the first frame with a row in a chunk that ends beyond the cut
        first = len(s)
        for name, ranges in chunks.items():
            offsets = {"positions": atom_offsets, "atomic_numbers": atom_offsets, "forces": atom_offsets}.get(name)
            if name.startswith("edge_"):
                offsets = edge_offsets
            for row, end in ranges:
                if end > cut:
                    k = row if offsets is None else int(np.searchsorted(offsets, row, side="right") - 1)
                    first = min(first, k)
                    break
        assert 0 < first < len(s)
        bad = tmp_path / f"cut{fraction}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match=rf"truncated \({cut} of {len(data)} bytes.*frames {first} to 2999 of 3000"):
            HDF5Dataset(bad)
        with pytest.raises(DataError, match=rf"frames {first} to"):
            read_hdf5(bad)


def _write_inputs(tmp_path):
    """Two inputs of different formats: an rMD17 npz (kcal/mol) and an extxyz file (eV)."""
    from ase.io import write

    npz = tmp_path / "in.npz"
    src = np.load(load_sample_path())
    n = 30
    np.savez(
        npz,
        nuclear_charges=src["nuclear_charges"],
        coords=src["coords"][:n],
        energies=src["energies"][:n],
        forces=src["forces"][:n],
    )
    xyz = tmp_path / "in.extxyz"
    s = _spread(np.random.default_rng(3), 9)
    write(xyz, [s.to_atoms(k) for k in range(len(s))], format="extxyz")
    return [npz, xyz]


def load_sample_path():
    from equiforce.data.readers import sample_path

    return sample_path("rmd17_aspirin_train_01.npz")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_preprocess_matches_in_memory_graphs_and_resumes_to_the_same_file(tmp_path):
    from equiforce.data.readers import read_structures

    inputs = _write_inputs(tmp_path)
    expected = StructureSet.concatenate([read_structures(p) for p in inputs])
    # uninterrupted, in parallel (2 worker processes) and through the command line
    ref = tmp_path / "ref.h5"
    args = [*map(str, inputs), str(ref), "--r-max", str(R_MAX), "--chunk-size", "7", "--workers", "2"]
    assert cli_main(["preprocess", *args]) == 0
    assert not parts_folder(ref).exists()
    with HDF5Dataset(ref) as ds:
        got = ds.read()
        for name in ("atomic_numbers", "positions", "n_atoms", "cell", "pbc", "energy", "forces"):
            assert getattr(got, name).tobytes() == getattr(expected, name).tobytes(), name
        _same_graphs(ds.read_graphs(), build_neighbour_graphs(expected, R_MAX))

    # interrupted after 3 parts (in-process workers, so the interruption is deterministic)
    out = tmp_path / "out.h5"

    def stop_after_3(count: int) -> None:
        if count == 3:
            raise KeyboardInterrupt

    kw = {"chunk_size": 7, "workers": 1}
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, out, R_MAX, on_part=stop_after_3, **kw)
    assert not out.exists()
    parts = sorted(p.name for p in parts_folder(out).glob("*.h5"))
    assert len(parts) == 3
    # a half-written part: a leftover temporary file and a part cut short are redone
    (parts_folder(out) / ".0000_000003.h5.abc.tmp").write_bytes(b"half")
    second = parts_folder(out) / parts[1]
    second.write_bytes(second.read_bytes()[:500])
    # other settings are refused, not mixed in
    with pytest.raises(DataError, match="other inputs or settings"):
        preprocess(inputs, out, R_MAX + 1, **kw)
    lines = []
    preprocess(inputs, out, R_MAX, log=lines.append, **kw)
    assert any("resuming" in line for line in lines)
    assert "(5 parts written, 2 kept)" in lines[-1]  # 7 parts in all: 2 intact ones kept, the cut one redone
    assert _sha(out) == _sha(ref)  # the same bytes as the uninterrupted parallel run
    assert not parts_folder(out).exists()
    with pytest.raises(DataError, match="exists"):
        preprocess(inputs, out, R_MAX, **kw)


def test_epoch_plan_is_seeded_complete_and_equal_to_the_in_memory_one(tmp_path, rng):
    s = _spread(rng, 40)
    graphs = build_neighbour_graphs(s, R_MAX)
    n_edges = np.array([g.n_edges for g in graphs])
    budget = estimate_budget(s.n_atoms, n_edges, 4)
    for seed in (0, 1):
        plan = list(plan_batches(s.n_atoms, n_edges, 4, budget, shuffle=True, seed=seed))
        assert plan == list(batch_groups(s, graphs, 4, budget, shuffle=True, seed=seed))
        assert sorted(k for g in plan for k in g) == list(range(40))  # every frame once per epoch
        assert list(plan_batches(s.n_atoms, n_edges, 4, budget, shuffle=True, seed=seed, start=3)) == plan[3:]
    assert plan != list(plan_batches(s.n_atoms, n_edges, 4, budget, shuffle=True, seed=0))

    path = tmp_path / "s.h5"
    with HDF5Writer(path, r_max=R_MAX) as w:
        w.append(s, graphs)
    rows = np.array([5, 3, 8, 13, 21, 34, 1, 2])  # a subset in its own order, as a validation split leaves it
    for stored in (True, False):
        with HDF5Stream(path, R_MAX if stored else R_MAX + 0.5, rows) as stream:
            assert stream.stored_graphs == stored
            sub = s.subset(rows)
            sub_graphs = build_neighbour_graphs(sub, stream.r_max)
            np.testing.assert_array_equal(stream.n_edges, [g.n_edges for g in sub_graphs])
            b = estimate_budget(stream.n_atoms, stream.n_edges, 3)
            seen = list(stream.batches(3, b, lambda g, x, gr: (g, x, gr), seed=7, prefetch=2))
            assert [g for g, _, _ in seen] == list(batch_groups(sub, sub_graphs, 3, b, shuffle=True, seed=7))
            for group, x, gr in seen:
                assert x.positions.tobytes() == sub.subset(group).positions.tobytes()
                _same_graphs(gr, [sub_graphs[k] for k in group])


def test_a_shard_reads_only_its_parts_of_each_batch(tmp_path, rng):
    """Batches of 4, 4, 3 split into 4 parts: each shard reads its parts' structures only (none at all of
    the last batch for part 3), and the shards together read each batch once."""
    s = _spread(rng, 11)
    graphs = build_neighbour_graphs(s, R_MAX)
    path = tmp_path / "s.h5"
    with HDF5Writer(path, r_max=R_MAX) as w:
        w.append(s, graphs)
    shards = [BatchShard(4, (0,)), BatchShard(4, (1, 2)), BatchShard(4, (3,))]
    assert shards[1].positions(3) == [1, 2] and shards[2].positions(3) == []
    for stored in (True, False):
        with HDF5Stream(path, R_MAX if stored else R_MAX + 0.5) as stream:
            b = estimate_budget(stream.n_atoms, stream.n_edges, 4)
            whole = list(stream.batches(4, b, lambda g, x, gr: g, seed=3, prefetch=2))
            assert [len(g) for g in whole] == [4, 4, 3]
            read = [list(stream.batches(4, b, lambda g, x, gr: (g, x, gr), seed=3, shard=sh)) for sh in shards]
            for i, group in enumerate(whole):
                got = []
                for sh, batches in zip(shards, read, strict=True):
                    g, x, gr = batches[i]
                    assert g == group  # every shard sees the whole batch plan
                    mine = [group[j] for j in sh.positions(len(group))]
                    assert len(x) == len(gr) == len(mine)
                    assert x.positions.tobytes() == s.subset(mine).positions.tobytes()
                    got += mine
                assert got == group
            assert len(read[2][2][1]) == 0  # part 3 of the last batch is empty: nothing read


def test_batch_shard_rejects_bad_parts():
    for n_parts, mine in ((0, (0,)), (2, ()), (2, (1, 0)), (2, (2,)), (2, (0, 0))):
        with pytest.raises(ValueError, match="must be"):
            BatchShard(n_parts, mine)


def test_prefetcher_passes_errors_and_stops(rng):
    def items():
        yield 1
        yield 2
        raise DataError("frame 3 is bad")

    p = Prefetcher(items(), 1)
    assert next(p) == 1 and next(p) == 2
    with pytest.raises(DataError, match="frame 3"):
        next(p)
    endless = Prefetcher(iter(range(10**9)), 2)
    assert next(endless) == 0
    endless.close()  # returns: the thread stops although the iterator is endless
    assert not endless._thread.is_alive()
    np.testing.assert_array_equal(sample_rows(5, 10, 0), np.arange(5))
    r = sample_rows(100, 10, 0)
    assert r.size == 10 and np.all(np.diff(r) > 0)
    np.testing.assert_array_equal(r, sample_rows(100, 10, 0))
