"""The optax optimiser: clipping, Adam/AMSGrad/AdamW, warmup then constant or cosine schedule, and a
host-driven ReduceLROnPlateau factor injected as a hyperparameter (changing it never recompiles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from equiforce.training.config import FinetuneConfig, OptimConfig

__all__ = ["PlateauState", "ema_update", "make_optimizer", "member_wise", "plateau_update", "set_lr_factor"]


def _warmup_constant(peak: float, warmup: int) -> optax.Schedule:
    if not warmup:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(peak / warmup, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )


def make_optimizer(
    cfg: OptimConfig, steps_per_epoch: int, finetune: FinetuneConfig | None = None
) -> optax.GradientTransformation:
    """Build the optimiser for ``cfg`` (learning-rate schedule counted in optimiser steps).

    With ``finetune.freeze`` patterns the parameters they match get their own chain (``optax.multi_transform``):
    ``finetune.frozen_learning_rate`` after ``finetune.frozen_warmup_epochs`` of linear warm-up, or no update
    at all (``optax.set_to_zero``) when that rate is 0. The plateau factor scales both groups."""
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
    else:
        schedule = _warmup_constant(cfg.learning_rate, warmup)

    def group(lr: optax.Schedule, lr_factor: float) -> optax.GradientTransformation:
        parts = []
        if cfg.clip_grad_norm:
            parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
        parts.append(optax.scale_by_amsgrad() if cfg.optimizer == "amsgrad" else optax.scale_by_adam())
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.scale_by_learning_rate(lr))
        parts.append(optax.scale(lr_factor))
        return optax.chain(*parts)

    patterns = tuple(finetune.freeze) if finetune is not None else ()
    if not patterns:
        return optax.inject_hyperparams(lambda lr_factor: group(schedule, lr_factor))(lr_factor=1.0)
    from equiforce.training.finetune import freeze_labels

    frozen_warmup = max(round(finetune.frozen_warmup_epochs * steps_per_epoch), 0)
    frozen_lr = _warmup_constant(finetune.frozen_learning_rate, frozen_warmup)

    def chain(lr_factor: float) -> optax.GradientTransformation:
        frozen = optax.set_to_zero() if finetune.frozen_learning_rate == 0 else group(frozen_lr, lr_factor)
        return optax.multi_transform(
            {"trainable": group(schedule, lr_factor), "frozen": frozen},
            lambda params: freeze_labels(params, patterns),
        )

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


def ema_update(ema_params: Any, params: Any, step: Any, decay: float | None) -> Any:
    """The exponential moving average of the weights after optimiser step ``step`` (0-based).

    The decay warms up as ``min(decay, (1 + t) / (10 + t))``; the update is ``e + (1 - d)(p - e)``, so a weight
    that does not move (frozen) keeps its EMA bit for bit. ``decay`` None: no EMA (the weights themselves)."""
    if not decay:
        return params
    t = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p: (e + (1.0 - d) * (p - e)).astype(p.dtype), ema_params, params)
