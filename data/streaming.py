"""Training data larger than memory: batches read from a native HDF5 file on demand, in a background thread.

:class:`HDF5Stream` holds only the sizes and file offsets of the structures it streams (about 64 bytes per
structure with the row map and the reader's offsets); every batch is read from the file when it is needed. The
batches of an epoch are exactly those of the in-memory path, :func:`~equiforce.data.graph.batch_groups`
(the same seeded permutation, the same greedy packing to the same padding budget, see
:func:`~equiforce.data.graph.plan_batches`), so a streamed run's loss curve is the in-memory run's. Each
batch's structures are read with one read per contiguous run of the file (random frames of a shuffled epoch
touch one small chunk each, see :class:`~equiforce.data.hdf5.HDF5Writer`).

Neighbour graphs come from the file when it stores them for the same cutoff (``equiforce preprocess``),
otherwise they are built per batch in the reading thread. The padding budget needs every structure's edge
count before training: stored in the file (``n_edges``, same cutoff), else counted in one chunked pass over
the file at start (logged; ``equiforce preprocess`` saves that pass).

:class:`Prefetcher` runs any batch iterator in a background thread with a bounded queue, so the next
batches are read and collated while the device computes; an error in the thread is raised in the consumer.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.graph import BatchShard, PaddingBudget, plan_batches
from equiforce.data.hdf5 import HDF5Dataset
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graph
from equiforce.data.structures import StructureSet

__all__ = ["HDF5Stream", "Prefetcher", "sample_rows"]

PathLike = str | os.PathLike


class Prefetcher:
    """Iterate ``items`` in a background thread, up to ``size`` items ahead.

    An exception raised by ``items`` is raised by :meth:`__next__` (after the items produced before it).
    :meth:`close` (or leaving a ``with`` block) stops the thread; items not taken are dropped.

    Attributes:
      wait_s: seconds the consumer spent waiting for an item (0 when the producer keeps ahead).
    """

    def __init__(self, items: Iterator[Any], size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._done = False
        self._thread = threading.Thread(target=self._run, name="equiforce-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer
            self._put(("error", err))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        kind, value = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if kind == "item":
            return value
        self._done = True
        self._thread.join()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and drop what it has read ahead."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        self._done = True

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``[min(n, size)]`` int64 row indices: all ``n`` in order when ``n <= size``, else a seeded random
    sample of ``size`` of them, sorted."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


class HDF5Stream:
    """Structures of a native HDF5 file (all, or the file rows ``rows``), read batch by batch.

    Args:
      path: the file (:mod:`equiforce.data.hdf5`).
      r_max: the model's cutoff, Å. The file's graphs are used when stored for this cutoff.
      rows: ``[n]`` file indices of the structures to stream, in the order that defines their positions
        ``0..n-1`` (``None``: every structure of the file).
      log: receives a line when the edge counts must be counted first.
      count_chunk: structures per read in that counting pass.

    Attributes:
      n_atoms: ``[n]`` int64 atoms of each streamed structure.
      n_edges: ``[n]`` int64 edges within ``r_max`` of each streamed structure.
      stored_graphs: whether the graphs are read from the file (else built when read).

    Raises:
      DataError: missing, foreign, corrupt or truncated file (the message names the first lost frame).
    """

    def __init__(
        self,
        path: PathLike,
        r_max: float,
        rows: Sequence[int] | np.ndarray | None = None,
        *,
        log: Callable[[str], None] | None = None,
        count_chunk: int = 4096,
    ) -> None:
        self.dataset = HDF5Dataset(path)
        self.path = self.dataset.path
        self.r_max = float(r_max)
        n_file = len(self.dataset)
        self.rows = np.arange(n_file, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= n_file):
            self.dataset.close()
            raise IndexError(f"row index out of range for {self.path} with {n_file} structures")
        self.n_atoms = self.dataset.n_atoms[self.rows]
        same_cutoff = self.dataset.r_max is not None and np.isclose(self.dataset.r_max, self.r_max, rtol=0, atol=1e-12)
        self.stored_graphs = bool(same_cutoff and self.dataset.has_graphs)
        if same_cutoff:
            self.n_edges = self.dataset.n_edges[self.rows]
        else:
            why = "has none" if self.dataset.r_max is None else f"has them for r_max = {self.dataset.r_max} Å"
            if log is not None:
                log(
                    f"{self.path}: counting the edges of {self.rows.size} structures within r_max = {self.r_max} Å "
                    f"(the file {why}; `equiforce preprocess --r-max {self.r_max}` stores them)"
                )
            self.n_edges = self._count_edges(count_chunk)

    def _count_edges(self, chunk: int) -> np.ndarray:
        """Every streamed structure's edge count, from the file in sorted chunks (memory: one chunk)."""
        order = np.argsort(self.rows, kind="stable")
        counts = np.zeros(self.rows.size, dtype=np.int64)
        for a in range(0, order.size, chunk):
            pos = order[a : a + chunk]
            _, graphs = self.read(pos)
            counts[pos] = [g.n_edges for g in graphs]
        return counts

    def __len__(self) -> int:
        return int(self.rows.size)

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> HDF5Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, positions: Sequence[int] | np.ndarray) -> tuple[StructureSet, list[NeighbourGraph]]:
        """The streamed structures at ``positions`` (in that order) and their neighbour graphs.

        Raises:
          DataError: a read failure or bad data (naming the file and the file's frame).
        """
        frames = self.rows[np.asarray(positions, dtype=np.int64)]
        s = self.dataset.read(frames)
        if self.stored_graphs:
            return s, self.dataset.read_graphs(frames)
        graphs = []
        for k in range(len(s)):
            sl = s.atom_slice(k)
            try:
                graphs.append(build_neighbour_graph(s.positions[sl], s.cell[k], s.pbc[k], self.r_max))
            except DataError as err:
                raise DataError(f"{self.path}: structure {int(frames[k])}: {err}") from None
        return s, graphs

    def batches(
        self,
        batch_size: int,
        budget: PaddingBudget,
        make: Callable[[list[int], StructureSet, list[NeighbourGraph]], Any],
        *,
        seed: int,
        start: int = 0,
        prefetch: int = 4,
        shard: BatchShard | None = None,
    ) -> Prefetcher:
        """One shuffled epoch: ``make(group, structures, graphs)`` for each batch, computed ``prefetch``
        batches ahead in a background thread.

        ``group`` holds the batch's positions (as :func:`~equiforce.data.graph.batch_groups` with the same
        ``seed`` would give them for the same sizes); ``structures`` and ``graphs`` hold just those
        structures, in that order. ``start`` skips that many batches without reading them (exact resume).
        Close the returned :class:`Prefetcher` when stopping early.

        ``shard``: one process of several reads only its parts of each batch: ``structures`` and ``graphs``
        then hold the structures at ``group[j]`` for ``j`` in ``shard.positions(len(group))``, in that order
        (possibly none). The batches themselves (``group``) are planned from the sizes alone, so they are
        the same on every process.
        """
        plan = plan_batches(self.n_atoms, self.n_edges, batch_size, budget, shuffle=True, seed=seed, start=start)

        def produce() -> Iterator[Any]:
            for group in plan:
                wanted = group if shard is None else [group[j] for j in shard.positions(len(group))]
                s, graphs = self.read(wanted)
                yield make(group, s, graphs)

        return Prefetcher(produce(), prefetch)
