"""Checkpoints: exact round trip of the training state, corrupt files and mismatched templates."""

from __future__ import annotations

import os
import stat

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.training.checkpoint import CheckpointError, CheckpointMismatchError, load_checkpoint, save_checkpoint
from equiforce.training.config import ConfigError, OptimConfig
from equiforce.training.optim import make_optimizer, set_lr_factor
from equiforce.training.trainer import TrainState


def _state(rng: np.random.Generator, width: int = 4) -> TrainState:
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, width)), jnp.float32), "bias": jnp.zeros(width)},
        "scale": jnp.asarray(rng.normal(), jnp.float64),
    }
    opt = make_optimizer(OptimConfig(), steps_per_epoch=3)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and counts
    opt_state = set_lr_factor(opt_state, 0.64)
    ema = jax.tree.map(lambda x: x * 0.5, params)
    return TrainState(params, opt_state, ema, jnp.asarray(17, jnp.int32))


HOST = {
    "epoch": 3,
    "batch_in_epoch": 2,
    "epoch_loss_sum": [0.1234567890123, 0.5, 1e-300],
    "plateau": {"best": 0.25, "bad_epochs": 1, "factor": 0.64},
    "best_val": None,
    "history": [{"epoch": 1, "train_loss": 3.0}],
    "elapsed_s": 12.5,
}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path, rng):
    state = _state(rng)
    path = tmp_path / "sub" / "last.ckpt"
    save_checkpoint(path, state, HOST)
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "last.ckpt"]  # no temporary files left
    template = _state(np.random.default_rng(99))  # same structure, other values
    loaded, host = load_checkpoint(path, template)
    assert isinstance(loaded, TrainState)
    _assert_trees_equal(loaded, state)
    assert host == HOST
    assert float(loaded.opt_state.hyperparams["lr_factor"]) == pytest.approx(0.64)
    assert int(loaded.step) == 17


def test_overwrite_replaces(tmp_path, rng):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, _state(rng), HOST)
    newer = _state(rng)
    save_checkpoint(path, newer, {**HOST, "epoch": 4})
    loaded, host = load_checkpoint(path, newer)
    _assert_trees_equal(loaded, newer)
    assert host["epoch"] == 4


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_file(tmp_path, rng, kind):
    path = tmp_path / "last.ckpt"
    state = _state(rng)
    save_checkpoint(path, state, HOST)
    raw = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not msgpack at all\xff" * 10, "truncated": raw[: len(raw) // 2], "empty": b""}[kind]
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, state)
    assert not isinstance(info.value, CheckpointMismatchError)


@pytest.mark.parametrize("damage", ["no_host", "bad_host_json", "no_state"])
def test_damaged_document(tmp_path, rng, damage):
    path = tmp_path / "last.ckpt"
    state = _state(rng)
    save_checkpoint(path, state, HOST)
    doc = flax.serialization.msgpack_restore(path.read_bytes())
    if damage == "no_host":
        del doc["host"]
    elif damage == "bad_host_json":
        doc["host"] = "{not json"
    else:
        del doc["state"]
    path.write_bytes(flax.serialization.msgpack_serialize(doc))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, state)
    assert not isinstance(info.value, CheckpointMismatchError)


def test_missing_file(tmp_path, rng):
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nope.ckpt", _state(rng))


def test_foreign_document_and_version(tmp_path, rng):
    state = _state(rng)
    path = tmp_path / "x.ckpt"
    path.write_bytes(flax.serialization.msgpack_serialize({"format": "something-else", "version": 1}))
    with pytest.raises(CheckpointError, match="not an equiforce checkpoint"):
        load_checkpoint(path, state)
    path.write_bytes(flax.serialization.msgpack_serialize([1, 2, 3]))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, state)
    save_checkpoint(path, state, HOST)
    doc = flax.serialization.msgpack_restore(path.read_bytes())
    doc["version"] = 99
    path.write_bytes(flax.serialization.msgpack_serialize(doc))
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(path, state)


def test_template_shape_mismatch(tmp_path, rng):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, _state(rng, width=4), HOST)
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        load_checkpoint(path, _state(rng, width=5))
    # a mismatch is a CheckpointError and a ConfigError (resuming with another config)
    assert issubclass(CheckpointMismatchError, CheckpointError) and issubclass(CheckpointMismatchError, ConfigError)


def test_template_structure_mismatch(tmp_path, rng):
    path = tmp_path / "last.ckpt"
    state = _state(rng)
    save_checkpoint(path, state, HOST)
    other_params = {"dense": {"kernel": jnp.zeros((3, 4), jnp.float32)}, "other": jnp.zeros(())}
    opt = make_optimizer(OptimConfig(), steps_per_epoch=3)
    other = TrainState(other_params, opt.init(other_params), other_params, jnp.asarray(0, jnp.int32))
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(path, other)
    # another optimiser state layout (no clipping) does not match either
    no_clip = make_optimizer(OptimConfig(clip_grad_norm=None, weight_decay=0.1), steps_per_epoch=3)
    other = state._replace(opt_state=no_clip.init(state.params))
    with pytest.raises(CheckpointMismatchError):
        load_checkpoint(path, other)


def test_checkpoint_file_gets_the_usual_permissions(tmp_path, rng):
    """0o666 less the umask, like ``open(path, "w")`` (not the 0600 of a temporary file); a replaced
    checkpoint keeps its mode."""
    previous = os.umask(0o022)
    try:
        path = tmp_path / "last.ckpt"
        save_checkpoint(path, _state(rng), HOST)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        path.chmod(0o600)
        save_checkpoint(path, _state(rng), HOST)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.umask(0o002)
        save_checkpoint(tmp_path / "other.ckpt", _state(rng), HOST)
        assert stat.S_IMODE((tmp_path / "other.ckpt").stat().st_mode) == 0o664
    finally:
        os.umask(previous)
