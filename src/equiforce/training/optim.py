"""The optax optimiser: clipping, Adam/AMSGrad/AdamW, warmup then constant or cosine schedule, and a
host-driven ReduceLROnPlateau factor injected as a hyperparameter (changing it never recompiles)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from equiforce.training.config import OptimConfig

__all__ = ["PlateauState", "make_optimizer", "member_wise", "plateau_update", "set_lr_factor"]


def make_optimizer(cfg: OptimConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """Build the optimiser for ``cfg`` (learning-rate schedule counted in optimiser steps)."""
    warmup = max(round(cfg.warmup_epochs * steps_per_epoch), 0)
    total = max(cfg.max_epochs * steps_per_epoch, warmup + 1)
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else cfg.learning_rate,
            peak_value=cfg.learning_rate,
            warmup_steps=warmup,
            decay_steps=total,
            end_value=cfg.min_learning_rate,
        )
    elif warmup:
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup),
                optax.constant_schedule(cfg.learning_rate),
            ],
            [warmup],
        )
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)

    def chain(lr_factor: float) -> optax.GradientTransformation:
        parts = []
        if cfg.clip_grad_norm:
            parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
        parts.append(optax.scale_by_amsgrad() if cfg.optimizer == "amsgrad" else optax.scale_by_adam())
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.scale_by_learning_rate(schedule))
        parts.append(optax.scale(lr_factor))
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(lr_factor=1.0)


def member_wise(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` applied to each committee member on its own (parameters, gradients and state stacked on
    a leading axis and vmapped): gradient clipping and every other statistic stay per member, so a member
    is updated exactly as a network trained alone would be."""

    def init(params: optax.Params) -> optax.OptState:
        return jax.vmap(optimizer.init)(params)

    def update(updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None):
        return jax.vmap(optimizer.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


def set_lr_factor(opt_state: optax.OptState, factor: float) -> optax.OptState:
    """Return ``opt_state`` with the plateau factor replaced (also in a committee's stacked state)."""
    hyper = dict(opt_state.hyperparams)
    old = jnp.asarray(hyper["lr_factor"])
    hyper["lr_factor"] = jnp.full(old.shape, factor, dtype=old.dtype)
    return opt_state._replace(hyperparams=hyper)


@dataclass(frozen=True)
class PlateauState:
    """ReduceLROnPlateau bookkeeping on the validation loss (host side, saved in checkpoints)."""

    best: float = float("inf")
    bad_epochs: int = 0
    factor: float = 1.0


def plateau_update(state: PlateauState, value: float, cfg: OptimConfig) -> PlateauState:
    """One epoch of ReduceLROnPlateau: multiply the factor by ``plateau_factor`` after
    ``plateau_patience`` epochs without a relative improvement of 1e-4, down to ``min_learning_rate``."""
    if value < state.best * (1 - 1e-4):
        return PlateauState(best=value, bad_epochs=0, factor=state.factor)
    bad = state.bad_epochs + 1
    if bad > cfg.plateau_patience:
        floor = cfg.min_learning_rate / cfg.learning_rate
        return PlateauState(best=state.best, bad_epochs=0, factor=max(state.factor * cfg.plateau_factor, floor))
    return PlateauState(best=state.best, bad_epochs=bad, factor=state.factor)
