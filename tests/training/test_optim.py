"""Optimiser: warmup schedule, the plateau factor injected without recompiling, ReduceLROnPlateau."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from equiforce.training.config import OptimConfig
from equiforce.training.optim import PlateauState, make_optimizer, plateau_update, set_lr_factor

LR = 0.01


def _params():
    return {"w": jnp.ones(3, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def _grads(value: float = 0.1):
    return {"w": jnp.full(3, value, jnp.float32), "b": jnp.asarray(value, jnp.float32)}


def _step_sizes(cfg: OptimConfig, steps_per_epoch: int, n_steps: int) -> list[float]:
    """|update| of a constant gradient: with Adam this is the learning rate of that step."""
    opt = make_optimizer(cfg, steps_per_epoch)
    params = _params()
    state = opt.init(params)
    update = jax.jit(opt.update)
    sizes = []
    for _ in range(n_steps):
        u, state = update(_grads(), state, params)
        sizes.append(float(jnp.abs(u["w"][0])))
    return sizes


@pytest.mark.parametrize("optimizer", ["adam", "amsgrad"])
def test_warmup_ramps_the_learning_rate(optimizer):
    cfg = OptimConfig(optimizer=optimizer, learning_rate=LR, warmup_epochs=1.0, schedule="constant", max_epochs=10)
    sizes = _step_sizes(cfg, steps_per_epoch=4, n_steps=8)
    # linear from lr/4 to lr over 4 steps, then constant lr
    np.testing.assert_allclose(sizes[:4], [LR / 4, LR * 7 / 16, LR * 10 / 16, LR * 13 / 16], rtol=1e-4)
    assert all(b > a for a, b in itertools.pairwise(sizes[:5]))
    np.testing.assert_allclose(sizes[4:], LR, rtol=1e-4)


def test_no_warmup_is_constant():
    cfg = OptimConfig(learning_rate=LR, warmup_epochs=0.0, schedule="constant")
    np.testing.assert_allclose(_step_sizes(cfg, steps_per_epoch=4, n_steps=5), LR, rtol=1e-4)


def test_cosine_warms_up_then_decays_to_min():
    cfg = OptimConfig(learning_rate=LR, warmup_epochs=1.0, schedule="cosine", max_epochs=3, min_learning_rate=1e-4)
    sizes = _step_sizes(cfg, steps_per_epoch=4, n_steps=14)
    assert sizes[0] < 0.5 * LR  # warming up from ~0
    peak = int(np.argmax(sizes))
    assert sizes[peak] == pytest.approx(LR, rel=1e-3)
    assert all(b <= a + 1e-9 for a, b in zip(sizes[peak:], sizes[peak + 1 :], strict=False))
    assert sizes[-1] == pytest.approx(1e-4, rel=1e-2)


def test_set_lr_factor_scales_updates_without_recompiling():
    cfg = OptimConfig(learning_rate=LR, warmup_epochs=0.0, schedule="constant", clip_grad_norm=10.0)
    opt = make_optimizer(cfg, steps_per_epoch=4)
    params = _params()
    state = opt.init(params)
    assert float(state.hyperparams["lr_factor"]) == 1.0
    update = jax.jit(opt.update)

    u1, state = update(_grads(), state, params)
    assert update._cache_size() == 1
    state = set_lr_factor(state, 0.25)
    assert float(state.hyperparams["lr_factor"]) == 0.25
    u2, state = update(_grads(), state, params)
    state = set_lr_factor(state, 0.1)
    u3, state = update(_grads(), state, params)

    np.testing.assert_allclose(np.asarray(u2["w"]), 0.25 * np.asarray(u1["w"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u3["w"]), 0.1 * np.asarray(u1["w"]), rtol=1e-5)
    assert update._cache_size() == 1  # the factor is data, not a compile-time constant


def test_set_lr_factor_keeps_dtype_and_other_hyperparams():
    opt = make_optimizer(OptimConfig(), steps_per_epoch=3)
    state = opt.init(_params())
    new = set_lr_factor(state, 0.5)
    old_f, new_f = jnp.asarray(state.hyperparams["lr_factor"]), jnp.asarray(new.hyperparams["lr_factor"])
    assert new_f.dtype == old_f.dtype and new_f.shape == old_f.shape
    assert float(state.hyperparams["lr_factor"]) == 1.0  # input not modified
    assert jax.tree.structure(new) == jax.tree.structure(state)


def test_weight_decay_and_clipping_are_applied():
    base = OptimConfig(learning_rate=LR, warmup_epochs=0.0, schedule="constant", optimizer="adamw")
    params = _params()
    sizes = {}
    for wd in (0.0, 0.5):
        opt = make_optimizer(dataclasses.replace(base, weight_decay=wd), 4)
        u, _ = opt.update(_grads(), opt.init(params), params)
        sizes[wd] = float(jnp.abs(u["w"][0]))
    assert sizes[0.5] > sizes[0.0]  # decoupled decay adds wd·w to the step

    # clipping: a huge gradient is clipped before Adam; the step stays finite and of size lr
    opt = make_optimizer(dataclasses.replace(base, clip_grad_norm=1e-3), 4)
    u, _ = opt.update(_grads(1e6), opt.init(params), params)
    assert np.all(np.isfinite(np.asarray(u["w"])))
    np.testing.assert_allclose(np.abs(np.asarray(u["w"])), LR, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- plateau
def test_plateau_reduces_after_patience_and_respects_minimum():
    cfg = OptimConfig(learning_rate=1e-3, plateau_patience=2, plateau_factor=0.5, min_learning_rate=2e-4)
    s = PlateauState()
    s = plateau_update(s, 1.0, cfg)  # first value is an improvement over inf
    assert s == PlateauState(best=1.0, bad_epochs=0, factor=1.0)
    factors = []
    for _ in range(12):
        s = plateau_update(s, 1.0, cfg)
        factors.append(s.factor)
    # patience 2: reduced on the 3rd bad epoch, then every 3 bad epochs; floor at min_lr / lr = 0.2
    assert factors == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2]
    assert s.best == 1.0


def test_plateau_improvement_resets_counter():
    cfg = OptimConfig(plateau_patience=2, plateau_factor=0.5)
    s = plateau_update(PlateauState(), 1.0, cfg)
    s = plateau_update(s, 1.5, cfg)
    s = plateau_update(s, 1.2, cfg)
    assert s.bad_epochs == 2 and s.factor == 1.0
    s = plateau_update(s, 0.9, cfg)  # improvement
    assert s == PlateauState(best=0.9, bad_epochs=0, factor=1.0)
    s = plateau_update(s, 0.9 * (1 - 1e-5), cfg)  # below the relative threshold of 1e-4: not an improvement
    assert s.bad_epochs == 1 and s.best == 0.9
    for _ in range(2):
        s = plateau_update(s, 1.0, cfg)
    assert s.factor == 0.5 and s.bad_epochs == 0


def test_plateau_state_is_json_round_trippable():
    import json

    s = PlateauState(best=0.3, bad_epochs=2, factor=0.64)
    assert PlateauState(**json.loads(json.dumps(dataclasses.asdict(s)))) == s
