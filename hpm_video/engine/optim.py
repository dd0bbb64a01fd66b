"""Optimiser parameter groups and per-step schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip_names: Iterable[str] = (),
    layer_decay: float = 1.0,
    num_layers: int | None = None,
) -> list[dict]:
    """AdamW groups: no weight decay for biases, norms and tokens (1-D params and ``skip_names``).

    With ``layer_decay < 1`` the groups also carry an ``lr_scale`` per layer (timm's layer-wise
    decay from the model's ``group_matcher``), applied by ``apply_schedules``.
    """
    skip = set(skip_names)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    if layer_decay < 1.0:
        from timm.optim import param_groups_layer_decay

        # Built with weight decay 1 so that the groups timm decays can be told from the others by
        # value even when ``weight_decay`` is 0 (a schedule may still raise it later).
        groups = param_groups_layer_decay(
            model, weight_decay=1.0, no_weight_decay_list=list(skip), layer_decay=layer_decay
        )
        return _with_weight_decay(groups, weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return _with_weight_decay(
        [{"params": decay, "weight_decay": 1.0}, {"params": no_decay, "weight_decay": 0.0}], weight_decay
    )


def _with_weight_decay(groups: list[dict], weight_decay: float) -> list[dict]:
    # Groups come with weight decay 1 (decayed) or 0; ``wd_scale`` keeps that apart from the value,
    # which ``apply_schedules`` sets every step and which may start or pass through 0.
    for group in groups:
        group["wd_scale"] = group["weight_decay"]
        group["weight_decay"] = weight_decay * group["wd_scale"]
    return groups


def cosine_value(
    step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then half-cycle cosine to ``final``."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def apply_schedules(optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr (times each group's ``lr_scale``) and weight decay (decayed groups only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)


class StepSchedules:
    """The per-update learning rate (warm-up + cosine) and weight decay (constant, or cosine to
    ``SOLVER.WEIGHT_DECAY_END``) of a run, from its config."""

    def __init__(self, solver, base_lr: float, total_updates: int, warmup_updates: int) -> None:
        self.solver = solver
        self.base_lr = base_lr
        self.total = total_updates
        self.warmup = warmup_updates

    def values(self, update: int) -> tuple[float, float]:
        s = self.solver
        lr = cosine_value(update, self.base_lr, s.MIN_LR, self.total, self.warmup, s.WARMUP_LR)
        wd = s.WEIGHT_DECAY
        if s.WEIGHT_DECAY_END >= 0:
            wd = cosine_value(update, wd, s.WEIGHT_DECAY_END, self.total)
        return lr, wd

    def apply(self, optimizer, update: int) -> tuple[float, float]:
        """Set this update's values on ``optimizer``; returns ``(lr, weight_decay)`` for the log."""
        lr, wd = self.values(update)
        apply_schedules(optimizer, lr, wd)
        return lr, wd
