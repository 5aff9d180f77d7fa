"""Shared maths of the optimization-based algorithms, as pure functions (learn2learn style).

* :func:`sgd_adapt`: the inner loop, ``theta <- theta - lr * grad(loss)``, with a scalar or a
  per-parameter (Meta-SGD) learning rate, second order unless ``first_order``.
* :func:`run_tasks`: one per-task program over a meta-batch, either as one ``torch.func.vmap``
  (``execution=vmap``) or a Python loop over tasks (``execution=loop``); both compute the same
  values and gradients. ``auto`` picks ``vmap`` on CUDA and ``loop`` on CPU, where the vmap'ed
  convolutions are slower than a loop (scripts/bench_algorithms.py measures both).
* :func:`functional_norms`: swap every normalisation layer for a plain-tensor-op equivalent. Torch's
  vmap batching rules for the native ``batch_norm`` and ``layer_norm`` give wrong second-order
  gradients (float64: 1e-2 relative off a per-task loop); these modules match the loop to 1e-12
  (tests/test_algorithm_gradients.py checks every shipped encoder and fusion). The parameters are
  kept (same objects, same state-dict keys); BatchNorm's running-statistics buffers are dropped,
  because a task always normalises with the statistics of its own batch (as in MAML).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.func import grad, vmap

from metamm_cli import ConfigError

Params = Dict[str, torch.Tensor]
LR = Union[float, Mapping[str, torch.Tensor]]

EXECUTIONS = ("auto", "vmap", "loop")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and statistics under AMP); float32/64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sgd_step(params: Params, grads: Params, lr: LR, first_order: bool = False) -> Params:
    """One step ``p - lr_p * g_p``; ``lr`` is a float or a dict of per-parameter tensors."""
    out = {}
    for k, p in params.items():
        g = grads[k].detach() if first_order else grads[k]
        out[k] = p - (lr[k] if isinstance(lr, Mapping) else lr) * g
    return out


def autograd_grad(loss_fn: Callable[[Params], torch.Tensor], params: Params,
                  create_graph: bool) -> Params:
    """``grad(loss_fn)(params)`` with ``torch.autograd.grad`` (the per-task-loop path: on CPU it
    is several times faster than ``torch.func.grad`` outside ``vmap``); works under no_grad."""
    with torch.enable_grad():
        leaves = {k: p if p.requires_grad else p.detach().requires_grad_() for k, p in params.items()}
        values = list(leaves.values())
        grads = torch.autograd.grad(loss_fn(leaves), values, create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


def sgd_adapt(loss_fn: Callable[[Params], torch.Tensor], params: Params, lr: LR, steps: int,
              first_order: bool = False, functional: bool = True) -> Params:
    """``steps`` SGD steps on ``loss_fn``; differentiable w.r.t. the initial ``params`` (second
    order) unless ``first_order``, which stops the inner gradients. ``functional``: gradients by
    ``torch.func.grad`` (composes with ``vmap``), else by ``torch.autograd.grad`` (same values)."""
    for _ in range(steps):
        if functional:
            grads = grad(loss_fn)(params)
        else:
            grads = autograd_grad(loss_fn, params, create_graph=not first_order and torch.is_grad_enabled())
        params = sgd_step(params, grads, lr, first_order)
    return params


def _index(x, t: int):
    return {k: v[t] for k, v in x.items()} if isinstance(x, dict) else x[t]


def _stack(outs: Sequence):
    first = outs[0]
    if isinstance(first, tuple):
        return tuple(_stack([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: torch.stack([o[k] for o in outs]) for k in first}
    return torch.stack(outs)


def resolve_execution(execution: str, device: torch.device) -> str:
    if execution == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return execution


def run_tasks(make_fn: Callable, shared: Sequence, batched: Sequence, execution: str):
    """``fn(*shared, *task_slices)`` for every task, outputs stacked over a leading task dim, with
    ``fn = make_fn(functional)`` (``functional``: the program runs under ``vmap``). ``batched``
    holds tensors or dicts of tensors with tasks first."""
    first = batched[0]
    device = (next(iter(first.values())) if isinstance(first, dict) else first).device
    batched_run = resolve_execution(execution, device) == "vmap"
    fn = make_fn(batched_run)
    if batched_run:
        dims = (None,) * len(shared) + (0,) * len(batched)
        return vmap(fn, in_dims=dims, randomness="same")(*shared, *batched)
    n = (next(iter(first.values())) if isinstance(first, dict) else first).shape[0]
    return _stack([fn(*shared, *[_index(b, t) for b in batched]) for t in range(n)])


def check_execution(execution: str) -> None:
    if execution not in EXECUTIONS:
        raise ConfigError(f"algorithm.execution={execution}: must be one of {', '.join(EXECUTIONS)}")


# ---------------------------------------------------------------------------------------------
# Normalisation layers in plain tensor ops


class _OpsNorm(nn.Module):
    """Base: keeps the wrapped layer's ``weight``/``bias`` Parameters (same state-dict keys)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps = norm.eps
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)

    def affine(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    @staticmethod
    def standardise(x: torch.Tensor, dims, eps: float) -> torch.Tensor:
        var, mean = torch.var_mean(x, dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)


class BatchStatNorm(_OpsNorm):
    """BatchNorm that always normalises with the statistics of the batch at hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.standardise(upcast(x), [0] + list(range(2, x.dim())), self.eps)
        return self.affine(y, [1, -1] + [1] * (x.dim() - 2)).to(x.dtype)


class InstanceStatNorm(_OpsNorm):
    """InstanceNorm: statistics per sample and channel over the spatial dims ``[B, C, *]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.standardise(upcast(x), list(range(2, x.dim())), self.eps)
        return self.affine(y, [1, -1] + [1] * (x.dim() - 2)).to(x.dtype)


class LayerStatNorm(_OpsNorm):
    """LayerNorm over the trailing ``normalized_shape`` dims."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__(norm)
        self.normalized_shape = tuple(norm.normalized_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = list(range(x.dim() - len(self.normalized_shape), x.dim()))
        y = self.standardise(upcast(x), dims, self.eps)
        return self.affine(y, self.normalized_shape).to(x.dtype)


class GroupStatNorm(_OpsNorm):
    """GroupNorm: ``[B, C, *]`` split into ``num_groups`` channel groups, statistics per group."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__(norm)
        self.num_groups = norm.num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = upcast(x).reshape(x.shape[0], self.num_groups, -1)
        y = self.standardise(g, [-1], self.eps).reshape(x.shape)
        return self.affine(y, [1, -1] + [1] * (x.dim() - 2)).to(x.dtype)


class RMSStatNorm(_OpsNorm):
    """RMSNorm over the trailing ``normalized_shape`` dims."""

    def __init__(self, norm: nn.Module):
        super().__init__(norm)
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = list(range(x.dim() - len(self.normalized_shape), x.dim()))
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + self.eps)
        return self.affine(y, self.normalized_shape).to(x.dtype)


_SWAPS = [(nn.modules.batchnorm._BatchNorm, BatchStatNorm),
          (nn.modules.instancenorm._InstanceNorm, InstanceStatNorm),
          (nn.LayerNorm, LayerStatNorm), (nn.GroupNorm, GroupStatNorm)]
if hasattr(nn, "RMSNorm"):
    _SWAPS.append((nn.RMSNorm, RMSStatNorm))


def functional_norms(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm inside ``module`` (in place)
    for its plain-tensor-op equivalent above; returns ``module``."""
    for name, child in module.named_children():
        for kind, swap in _SWAPS:
            if isinstance(child, kind):
                setattr(module, name, swap(child))
                break
        else:
            functional_norms(child)
    return module

