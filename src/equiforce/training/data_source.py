"""Where the training loop's data come from: every set in memory (the default), or the training set streamed
from a native HDF5 file (``data.streaming: true``, :mod:`equiforce.data.streaming`).

Both give the loop the same thing, a :class:`TrainingData`: the sizes of every training structure (for the
padding budget and the batch plan), the in-memory sets the statistics and the post-training steps use, and
:meth:`TrainingData.epoch`, the padded batches of one shuffled epoch. The batches are the same either way
(the same seeded permutation and packing), so a streamed run reproduces the in-memory run's loss curve and
resumes exactly where it stopped.

Streaming keeps memory flat as the training set grows: only about 64 bytes per training structure (sizes, file
offsets) stay in memory, and the batches are read a few ahead by a background thread. In memory stay: the
validation and test sets, and the *statistics sample*, a seeded random ``data.statistics_size`` training
structures (all of them when there are fewer) from which the E0s and force RMS are fitted and on which the
post-training steps that need training data run (E0 re-fit, the LLPR uncertainty fit). The average neighbour
count and the species come from the whole file.

Over several processes (:mod:`equiforce.training.distributed`) every process plans the same global batches
from the sizes alone (the file's ``n_atoms`` / ``n_edges`` index and the epoch's seed), and each batch is
split into one part per device (:class:`~equiforce.training.parallel.DataParallel`). What each process
reads:

* streamed: of the training structures, only those of its own devices' parts of each batch (so the
  processes together read each training structure once per epoch, each a ``1/P`` share); in addition, every
  process reads the file's index (sizes, ~16 bytes per structure), its atomic-number column once (4 bytes per
  atom, for the species), the statistics sample and the validation set. The statistics sample is drawn from
  ``seed``, so the E0s, scale and average neighbour count are the same on every process (checked before
  training). The validation set is kept whole on every process: it is small (``data.valid_fraction``) and
  every process evaluates it, so process 0's validation loss needs no gathering. Without stored edge
  counts for the model's cutoff every process also reads the whole file once to count them
  (``equiforce preprocess --r-max R`` stores them).
* in memory: every process reads the whole training data (any format) and builds only its devices' parts of
  each batch; this is logged, with the advice to convert to native HDF5 and stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from equiforce.data.errors import DataError
from equiforce.data.graph import BatchShard, PaddingBudget, batch_groups
from equiforce.data.neighbours import NeighbourGraph, build_neighbour_graphs
from equiforce.data.readers import load_sample, read_structures
from equiforce.data.splits import random_split
from equiforce.data.streaming import HDF5Stream, sample_rows
from equiforce.data.structures import StructureSet
from equiforce.training.config import ConfigError, TrainConfig

__all__ = ["Datasets", "TrainingData", "load_datasets", "load_training_data"]


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Train, validation and test sets in memory (``train``: with streaming, the statistics sample).

    Attributes:
      n_train: the size of the whole training set (``None``: ``len(train)``).
    """

    train: StructureSet
    valid: StructureSet
    test: StructureSet | None
    n_train: int | None = None

    @property
    def train_size(self) -> int:
        return len(self.train) if self.n_train is None else self.n_train


def _read(cfg: TrainConfig, spec: str, size: int | None, fmt: str | None, energy_unit: str) -> StructureSet:
    """A data set by its config spec (``sample:...`` or a path relative to the config) in ``fmt`` (None:
    from the file name) and ``energy_unit``; the first ``size`` structures when given."""
    if spec.startswith("sample:"):
        s = load_sample(spec.split(":", 1)[1])
    else:
        kwargs = {} if energy_unit == "eV" else {"energy_unit": energy_unit}
        s = read_structures(cfg.resolve_path(spec), format=fmt, **kwargs)
    if size is not None:
        if size > len(s):
            raise ConfigError(f"asked for {size} structures from {spec}, which has only {len(s)}")
        s = s.subset(np.arange(size))
    return s


def _train_rows(cfg: TrainConfig, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The training rows of the train file and the validation rows (None: ``data.valid`` is a file)."""
    d = cfg.data
    if d.valid is None:
        n_valid = max(1, round(d.valid_fraction * n))
        train_idx, valid_idx = random_split(n, sizes=(n - n_valid, n_valid), seed=d.split_seed)
    else:
        train_idx, valid_idx = np.arange(n), None
    if d.train_size is not None:
        if d.train_size > len(train_idx):
            raise ConfigError(f"data.train_size={d.train_size} but only {len(train_idx)} training structures")
        train_idx = train_idx[: d.train_size]
    return np.asarray(train_idx, dtype=np.int64), valid_idx


def _check_labels(train: StructureSet, valid: StructureSet) -> None:
    for name, s in (("train", train), ("valid", valid)):
        if s.energy is None or s.forces is None:
            raise ConfigError(f"the {name} set needs energy and forces labels")


def load_datasets(cfg: TrainConfig) -> Datasets:
    """Read train/validation/test sets as the config says.

    Without ``data.valid`` the validation set is a seeded random ``data.valid_fraction`` of the whole train
    file (e.g. 950 + 50 of the 1000 frames of an rMD17 split file: ``valid_fraction: 0.05``);
    ``data.train_size`` then keeps the first that many of the remaining training structures. Fine-tuning with replay
    appends ``finetune.replay_fraction`` x that many structures of ``finetune.replay_data`` to the training set.
    """
    d = cfg.data
    full = _read(cfg, d.train, None, d.format, d.energy_unit)
    train_idx, valid_idx = _train_rows(cfg, len(full))
    train = full.subset(train_idx)
    valid = full.subset(valid_idx) if valid_idx is not None else _read(cfg, d.valid, None, d.format, d.energy_unit)
    test = _read(cfg, d.test, d.test_size, d.format, d.energy_unit) if d.test else None
    replay = replay_structures(cfg, len(train), lambda spec: _read(cfg, spec, None, cfg.finetune.replay_format, "eV"))
    if replay is not None:  # fine-tuning with replay: part of the source's training data joins the new
        train = StructureSet.concatenate([train, replay])
    _check_labels(train, valid)
    return Datasets(train=train, valid=valid, test=test)


@dataclasses.dataclass
class TrainingData:
    """The training loop's data (see the module docstring).

    Attributes:
      data: the in-memory sets (``data.train``: every training structure, or the statistics sample).
      train_graphs, valid_graphs: neighbour graphs of ``data.train`` and ``data.valid``.
      n_atoms, n_edges: ``[n_train]`` int64 sizes of every training structure.
      species: atomic numbers of the whole training data (streaming: the whole file), or None: those of
        ``data.train``.
      stream: the HDF5 stream of the training set, or None (in memory).
      prefetch: batches read ahead when streaming.
    """

    data: Datasets
    train_graphs: list[NeighbourGraph]
    valid_graphs: list[NeighbourGraph]
    n_atoms: np.ndarray
    n_edges: np.ndarray
    species: tuple[int, ...] | None = None
    stream: HDF5Stream | None = None
    prefetch: int = 8

    @property
    def n_train(self) -> int:
        return int(self.n_atoms.size)

    @property
    def avg_num_neighbours(self) -> float:
        """Edges per atom over the whole training set."""
        return float(self.n_edges.sum()) / float(self.n_atoms.sum())

    def epoch(
        self,
        batch_size: int,
        budget: PaddingBudget,
        make: Callable[[list[int], StructureSet, list[NeighbourGraph], list[int]], Any],
        *,
        seed: int,
        start: int = 0,
        energy_shift: Callable[[StructureSet], np.ndarray],
        shard: BatchShard | None = None,
    ) -> Iterator[Any]:
        """``make(group, structures, graphs, rows)`` for each batch of one shuffled epoch, from batch ``start``.

        ``group``: the batch's training-set indices; ``structures``/``graphs`` hold them (with ``energy_shift``
        subtracted from the energies); ``rows``: the positions of ``group``'s structures in ``structures``.
        Streamed batches are made in a background thread; close the iterator when leaving early.

        ``shard`` (one process of several, :attr:`DataParallel.shard
        <equiforce.training.parallel.DataParallel.shard>`): a streamed epoch reads only the structures of
        this process's parts of each batch; ``rows`` is then -1 at the positions of the other parts. In
        memory every structure is at hand and ``shard`` changes nothing.
        """
        if self.stream is None:
            train = self.data.train
            shifted = dataclasses.replace(train, energy=train.energy - energy_shift(train))
            groups = batch_groups(shifted, self.train_graphs, batch_size, budget, shuffle=True, seed=seed)
            return _skip_and_make(groups, start, lambda g: make(g, shifted, self.train_graphs, g))

        def make_streamed(group: list[int], s: StructureSet, graphs: list[NeighbourGraph]) -> Any:
            s = dataclasses.replace(s, energy=s.energy - energy_shift(s))
            return make(group, s, graphs, shard_rows(len(group), shard))

        return self.stream.batches(
            batch_size, budget, make_streamed, seed=seed, start=start, prefetch=self.prefetch, shard=shard
        )

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def shard_rows(batch_len: int, shard: BatchShard | None) -> list[int]:
    """``[batch_len]`` row of each batch position in the structures read for ``shard`` (those of its parts,
    in batch order), -1 where another process holds it; ``0..batch_len-1`` without a shard."""
    if shard is None:
        return list(range(batch_len))
    rows = [-1] * batch_len
    for k, j in enumerate(shard.positions(batch_len)):
        rows[j] = k
    return rows


def _skip_and_make(groups: Iterator[list[int]], start: int, make: Callable[[list[int]], Any]) -> Iterator[Any]:
    for i, group in enumerate(groups):
        if i >= start:
            yield make(group)


def load_training_data(cfg: TrainConfig, log: Callable[[str], None]) -> TrainingData:
    """The data of a training run, in memory or streamed as ``data.streaming`` says.

    Raises:
      ConfigError: streaming from something other than a native HDF5 file, with fine-tuning replay, missing
        labels, sizes that do not fit.
      DataError: unreadable, corrupt or truncated files.
    """
    r_max = cfg.model.r_max
    if not cfg.data.streaming:
        data = load_datasets(cfg)
        if jax.process_count() > 1:
            log(_whole_file_note(cfg, len(data.train), jax.process_count()))
        train_graphs = build_neighbour_graphs(data.train, r_max)
        return TrainingData(
            data,
            train_graphs,
            build_neighbour_graphs(data.valid, r_max),
            data.train.n_atoms,
            np.array([g.n_edges for g in train_graphs], dtype=np.int64),
        )
    d = cfg.data
    path = cfg.resolve_path(d.train)
    if not _is_native_hdf5(d.train, d.format):
        raise ConfigError(
            f"data.streaming reads the native HDF5 format; data.train = {d.train!r} is not an .h5 file "
            "(convert it with `equiforce preprocess INPUT OUT.h5 --r-max R`)"
        )
    if cfg.finetune.replay_data is not None:
        raise ConfigError("data.streaming does not support finetune.replay_data yet; train in memory")
    from equiforce.data.hdf5 import HDF5Dataset

    with HDF5Dataset(path) as ds:
        if len(ds) == 0:
            raise DataError(f"{path}: the file holds no structures")
        train_rows, valid_rows = _train_rows(cfg, len(ds))
        valid = ds.read(valid_rows) if valid_rows is not None else _read(cfg, d.valid, None, d.format, d.energy_unit)
        sample = ds.read(train_rows[sample_rows(train_rows.size, d.statistics_size, cfg.seed)])
        species = _species(ds)
    if d.energy_unit != "eV":
        raise ConfigError("the native HDF5 format is always in eV: leave data.energy_unit at eV with streaming")
    test = _read(cfg, d.test, d.test_size, d.format, d.energy_unit) if d.test else None
    _check_labels(sample, valid)
    stream = HDF5Stream(path, r_max, train_rows, log=log)
    log(
        f"streaming {len(stream)} training structures from {path} "
        f"({'stored' if stream.stored_graphs else 'built on the fly'} neighbour graphs, {d.prefetch_batches} batches "
        f"read ahead); statistics from {len(sample)} of them"
    )
    data = Datasets(train=sample, valid=valid, test=test, n_train=len(stream))
    return TrainingData(
        data,
        build_neighbour_graphs(sample, r_max),
        build_neighbour_graphs(valid, r_max),
        stream.n_atoms,
        stream.n_edges,
        species=species,
        stream=stream,
        prefetch=d.prefetch_batches,
    )


def _is_native_hdf5(spec: str, fmt: str | None) -> bool:
    """Whether a data spec (``data.train``) names a native HDF5 file (by ``fmt`` or else its suffix)."""
    return not spec.startswith("sample:") and (fmt or Path(spec).suffix.lower().lstrip(".")) in ("h5", "hdf5")


def _whole_file_note(cfg: TrainConfig, n_train: int, n_processes: int) -> str:
    """The log line of an in-memory run over several processes: every process reads everything."""
    d = cfg.data
    how = (
        "set data.streaming: true"
        if _is_native_hdf5(d.train, d.format)
        else f"convert the data once with `equiforce preprocess INPUT OUT.h5 --r-max {cfg.model.r_max:g}` and "
        "train from OUT.h5 with data.streaming: true"
    )
    return (
        f"each of the {n_processes} processes reads the whole training data ({d.train}) and holds its "
        f"{n_train} training structures in memory (it builds only its own devices' parts of each batch); to have "
        f"each process read only the structures of its parts, {how}"
    )


def _species(ds: Any, chunk: int = 1 << 22) -> tuple[int, ...]:
    """Distinct atomic numbers of a whole HDF5 file, read in chunks of atoms."""
    z = ds._file["atomic_numbers"]
    found: set[int] = set()
    for a in range(0, ds.n_total_atoms, chunk):
        found.update(int(v) for v in np.unique(z[a : min(a + chunk, ds.n_total_atoms)]))
    return tuple(sorted(found))


def replay_structures(cfg: TrainConfig, n_train: int, read: Callable[[str], StructureSet]) -> StructureSet | None:
    """The replayed part of the source's training data: ``round(replay_fraction · n_train)`` structures of
    ``finetune.replay_data`` (a seeded random draw without replacement), or None.

    Raises:
      ConfigError: the file has fewer structures than asked for, or no energy and forces labels.
    """
    f = cfg.finetune
    if f.replay_data is None or f.replay_fraction <= 0:
        return None
    pool = read(f.replay_data)
    n = max(1, round(f.replay_fraction * n_train))
    if n > len(pool):
        raise ConfigError(
            f"finetune.replay_fraction={f.replay_fraction} asks for {n} replay structures but "
            f"{f.replay_data} has {len(pool)}"
        )
    if pool.energy is None or pool.forces is None:
        raise ConfigError(f"finetune.replay_data {f.replay_data} needs energy and forces labels")
    pick = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x4E91A7])).choice(len(pool), n, replace=False)
    return pool.subset(np.sort(pick))
