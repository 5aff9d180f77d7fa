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


# -- the same optimizers over a population: every tensor has a leading member dim P ---------
# Pure functions (learn2learn style), torch's Adam/SGD maths exactly (weight decay as L2 added
# to the gradient, not AdamW; eps outside the square root); ``lr``, ``weight_decay``, ``ok``
# are [P] and broadcast over each parameter's own dims. ``ok`` False keeps a member as it was
# (a non-finite step, as fused Adam's found_inf; a member that stopped).

def per_member(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x [P]`` shaped to broadcast against ``like [P, ...]``."""
    return x.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def adam_update(p: torch.Tensor, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor, ok: torch.Tensor,
                betas=(0.9, 0.999), eps: float = 1e-8):
    """One Adam step of stacked ``p`` with gradient ``g`` at (already incremented) ``step [P]``
    -> (p, exp_avg, exp_avg_sq), members not ``ok`` unchanged."""
    b1, b2 = betas
    g = g + per_member(weight_decay, p) * p
    m = exp_avg.lerp(g, 1 - b1)
    v = exp_avg_sq * b2 + (1 - b2) * g * g
    s = step.to(torch.float64)
    bc1, bc2_sqrt = 1 - b1 ** s, (1 - b2 ** s).sqrt()
    step_size = per_member((lr / bc1).to(p.dtype), p)
    denom = v.sqrt() / per_member(bc2_sqrt.to(p.dtype), p) + eps
    new = p - step_size * m / denom
    keep = per_member(ok, p).bool()
    return torch.where(keep, new, p), torch.where(keep, m, exp_avg), torch.where(keep, v, exp_avg_sq)


def sgd_update(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor,
               weight_decay: torch.Tensor, ok: torch.Tensor, momentum: float = 0.0, nesterov: bool = False):
    """One SGD step (momentum buffer ``buf`` starts at zeros: torch's first step, without dampening)
    -> (p, buf), members not ``ok`` unchanged."""
    g = g + per_member(weight_decay, p) * p
    keep = per_member(ok, p).bool()
    if momentum:
        new_buf = buf * momentum + g
        g = g + momentum * new_buf if nesterov else new_buf
        buf = torch.where(keep, new_buf, buf)
    return torch.where(keep, p - per_member(lr, p) * g, p), buf
