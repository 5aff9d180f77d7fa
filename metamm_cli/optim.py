"""The outer optimizer and its learning-rate schedule (``trainer.optimizer``, ``trainer.scheduler``)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from metamm_cli.device import enum_name


def make_optimizer(params: Iterable[torch.nn.Parameter], T) -> torch.optim.Optimizer:
    """``trainer.optimizer``: adam (``trainer.lr``, ``trainer.weight_decay``) or sgd (with
    ``trainer.momentum``; Reptile's outer step is plain SGD). Fused: a step whose gradients are
    not finite is skipped on the device (``found_inf``), without a host sync."""
    params = [p for p in params if p.requires_grad]
    if enum_name(T.optimizer) == "sgd":
        return torch.optim.SGD(params, lr=T.lr, momentum=T.momentum, weight_decay=T.weight_decay,
                               nesterov=bool(T.get("nesterov", False)), fused=True)
    return torch.optim.Adam(params, lr=T.lr, weight_decay=T.weight_decay, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, T):
    """``trainer.scheduler``, stepped once per optimizer step: none (constant), cosine (to 0 at
    ``max_steps``), step (times ``trainer.gamma`` every ``trainer.step_size`` steps: ProtoNet's
    'halved every 2000 episodes') or linear (from ``trainer.lr`` at step 0 to
    ``trainer.lr_final`` at ``max_steps``, constant after: Reptile's annealed meta step size,
    ``lr_i = (i / max_steps) lr_final + (1 - i / max_steps) lr``) or multistep (times
    ``trainer.factors[i]`` from step ``trainer.milestones[i]`` on: MetaOptNet's 0.1 -> 0.006 ->
    0.0012 -> 0.00024)."""
    name, max_steps = enum_name(T.scheduler), T.max_steps
    final = T.lr_final / T.lr

    def factor(step: int) -> float:
        if name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, max_steps) / max(max_steps, 1)))
        if name == "step":
            return T.gamma ** (step // T.step_size)
        if name == "multistep":
            passed = [f for m, f in zip(T.milestones, T.factors) if step >= m]
            return passed[-1] if passed else 1.0
        if name == "linear":
            done = min(step, max_steps) / max(max_steps, 1)
            return done * final + (1 - done)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
