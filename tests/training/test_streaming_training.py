"""Training streamed from an HDF5 file (``data.streaming``) against training in memory: the same batches, so
the same loss curve (float64), with graphs stored in the file or built on the fly, and an exact resume after
a mid-epoch interruption of a streamed run."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.data import build_neighbour_graphs, load_sample, write_hdf5
from equiforce.data.hdf5 import HDF5Writer
from equiforce.training import trainer
from equiforce.training.config import ConfigError, load_config
from equiforce.training.trainer import train

TINY = "model.hyperparameters={num_interactions: 1, num_features: 4, l_max: 1}"
R_MAX = 5.0


def _cfg(out, data, *overrides: str):
    base = [
        f"output_dir={out}",
        f"data.train={data}",
        "progress_bar=false",
        TINY,
        f"model.r_max={R_MAX}",
        "model.dtype=float64",
        "data.train_size=23",  # 5 batches of 5: the last one is partial
        "data.valid_fraction=0.1",
        "data.test=null",
        "optim.batch_size=5",
        "optim.max_epochs=3",
        "md_check.steps=0",
        "model.uncertainty=false",
    ]
    return load_config(None, base + list(overrides))


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 60 aspirin frames: with stored graphs, and plain (graphs built while streaming)."""
    root = tmp_path_factory.mktemp("streaming")
    s = load_sample("train").subset(np.arange(60))
    with HDF5Writer(root / "graphs.h5", r_max=R_MAX) as w:
        w.append(s, build_neighbour_graphs(s, R_MAX))
    write_hdf5(root / "plain.h5", s)
    return root


@pytest.fixture(scope="module")
def in_memory(files):
    return train(_cfg(files / "run_memory", files / "plain.h5"), log=_quiet)


def _assert_same_curve(a, b):
    assert len(a) == len(b) == 3
    for ha, hb in zip(a, b, strict=True):
        for key in ("train_loss", "train_loss_energy", "train_loss_forces", "valid_loss", "step", "lr_factor"):
            np.testing.assert_allclose(hb[key], ha[key], rtol=1e-12, atol=0, err_msg=key)


@pytest.mark.parametrize("name", ["plain", "graphs"])
def test_streamed_training_gives_the_in_memory_loss_curve(files, in_memory, name):
    lines = []
    result = train(_cfg(files / f"run_{name}", files / f"{name}.h5", "data.streaming=true"), log=lines.append)
    assert any(f"streaming 23 training structures from {files / name}.h5" in line for line in lines)
    assert any(("stored neighbour graphs" if name == "graphs" else "built on the fly") in line for line in lines)
    _assert_same_curve(in_memory.history, result.history)
    assert result.metadata["n_train"] == 23


def test_streamed_run_resumes_exactly_after_a_mid_epoch_interrupt(files, in_memory, monkeypatch):
    out = files / "run_interrupted"
    cfg = _cfg(out, files / "graphs.h5", "data.streaming=true", "data.prefetch_batches=2")
    real = trainer.make_train_step
    calls = []

    def spy(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, batch, weights=None):
            if len(calls) == 7:  # 5 steps per epoch: in the middle of epoch 2, with batches read ahead
                raise KeyboardInterrupt
            calls.append(1)
            return fn(state, batch, weights)

        return step

    monkeypatch.setattr(trainer, "make_train_step", spy)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=_quiet)
    monkeypatch.undo()
    assert len(calls) == 7 and (out / "checkpoints" / "last.ckpt").is_file()
    resumed = train(cfg, resume=True, log=_quiet)
    _assert_same_curve(in_memory.history, resumed.history)


def test_streaming_needs_the_native_format(tmp_path):
    cfg = _cfg(tmp_path / "x", "sample:train", "data.streaming=true")
    with pytest.raises(ConfigError, match="equiforce preprocess"):
        train(cfg, log=_quiet)
    with pytest.raises(ConfigError, match="prefetch_batches"):
        _cfg(tmp_path / "x", "sample:train", "data.prefetch_batches=0")


def test_the_in_memory_multi_process_note_recommends_streaming(tmp_path):
    from equiforce.training.data_source import _whole_file_note

    note = _whole_file_note(_cfg(tmp_path, "frames.extxyz"), 23, 4)
    assert note.startswith("each of the 4 processes reads the whole training data (frames.extxyz)")
    assert "equiforce preprocess INPUT OUT.h5 --r-max 5" in note and "data.streaming: true" in note
    note = _whole_file_note(_cfg(tmp_path, "big.h5"), 23, 4)
    assert "preprocess" not in note and note.endswith("set data.streaming: true")
