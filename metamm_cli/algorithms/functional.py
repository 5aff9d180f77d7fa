"""Shared maths of the optimization-based algorithms, as pure functions (learn2learn style).

* :func:`sgd_adapt`: the inner loop, ``theta <- theta - lr * grad(loss)``, with a scalar or a
  per-parameter (Meta-SGD) learning rate, second order unless ``first_order``.
* :func:`run_tasks`: one per-task program over a meta-batch, either as one ``torch.func.vmap``
  (``execution=vmap``) or a Python loop over tasks (``execution=loop``); both compute the same
  values and gradients. Random layers (dropout, DropBlock) draw separately for each task under
  ``vmap`` (``randomness="different"``), as in the loop. ``auto`` picks ``vmap`` on CUDA and ``loop`` on CPU, where the vmap'ed
  convolutions are slower than a loop (scripts/bench_algorithms.py measures both).
* :func:`functional_norms`: swap every normalisation layer for a plain-tensor-op equivalent. Torch's
  vmap batching rules for the native ``batch_norm`` and ``layer_norm`` give wrong second-order
  gradients (float64: 1e-2 relative off a per-task loop); these modules match the loop to 1e-12
  (tests/test_algorithm_gradients.py checks every shipped encoder and fusion). The parameters are
  kept (same objects, same state-dict keys); BatchNorm's running-statistics buffers are dropped,
  because a task always normalises with the statistics of its own batch (as in MAML).
* :func:`task_norms` / :func:`task_groups`: the metric algorithms embed every task of a meta-batch
  in one call; with ``bn_stats=task`` their BatchNorm layers (:class:`TaskBatchNorm2d` etc., same
  state-dict keys) normalise each task's samples with that task's own batch statistics while
  training and update the running statistics as if the tasks had been embedded one after another
  (:func:`sequential_running_stats`), as the papers train: one episode per forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from metamm_cli import ConfigError
from metamm_cli.device import upcast  # noqa: F401 - the algorithms import it from here
from metamm_cli.models.chunked import sequential_running_stats  # noqa: F401 - tests import it from here

Params = Dict[str, torch.Tensor]
LR = Union[float, Mapping[str, torch.Tensor]]

EXECUTIONS = ("auto", "vmap", "loop")



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


_TRANSFORMS = []  # population.py's vmap over members is running (a stack: nested calls)


@contextlib.contextmanager
def population_transform():
    """Within the block the algorithm runs under population.py's vmap over members: per-task
    programs use ``torch.func`` transforms (no ``torch.autograd.grad`` under vmap) and the
    metric algorithms embed task by task (their per-task BatchNorm groups write their running
    statistics in place, which only the per-task path does under vmap)."""
    _TRANSFORMS.append(True)
    try:
        yield
    finally:
        _TRANSFORMS.pop()


def under_transform() -> bool:
    return bool(_TRANSFORMS)


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
    fn = make_fn(batched_run or under_transform())
    if batched_run:
        dims = (None,) * len(shared) + (0,) * len(batched)
        return vmap(fn, in_dims=dims, randomness="different")(*shared, *batched)
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
    """BatchNorm that always normalises with the statistics of the batch at hand: in plain tensor
    ops under torch.func transforms (``vmap``, where the native kernel's second-order gradient is
    wrong), the native kernel otherwise (the per-task loop: a MAML step 26% faster on the CPU,
    the same values; tests/test_algorithm_gradients.py compares the two to 1e-9)."""

    always_batch_stats = True  # models/chunked.py: normalises by the batch at hand, in any mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch._C._functorch.is_functorch_wrapped_tensor(x):  # not under vmap/grad transforms
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
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


# ---------------------------------------------------------------------------------------------
# BatchNorm with per-task statistics (metric algorithms, ``bn_stats=task``)

BN_STATS = ("task", "batch")


class _TaskGroups:
    """Mixin for ``nn.BatchNorm*d``: when ``groups > 1`` and batch statistics are used (training,
    or no running statistics), the batch ``[G*B, C, *]`` is ``G`` tasks of ``B`` samples, each
    normalised over its own ``B`` samples; the running statistics take ``G`` sequential updates.
    ``groups == 1`` (the default, and eval mode with running statistics): ``nn.BatchNorm*d``.
    ``one_call``: all groups in one native call on a ``[B, G*C, *]`` view (two transposing
    copies; fewer kernels, for GPUs) instead of one call per contiguous task slice (faster on
    CPU); None: the slices on CPU. Both give the same values."""

    groups = 1
    one_call: Optional[bool] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.groups
        batch_stats = self.training or self.running_mean is None
        if G == 1 or not batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % G:
            raise ValueError(f"{type(self).__name__}: a batch of {x.shape[0]} is not {G} equal task groups")
        B, C, rest = x.shape[0] // G, x.shape[1], x.shape[2:]
        track = self.training and self.track_running_stats
        one_call = self.one_call if self.one_call is not None else x.device.type != "cpu"
        # momentum 1: these [G, C] buffers come back holding each group's batch statistics
        mean = self.running_mean.new_zeros(G, C) if track else None
        var = self.running_var.new_zeros(G, C) if track else None
        if one_call:  # [G*B, C, *] -> [B, G*C, *]: one (task, channel) pair per channel
            xg = x.reshape(G, B, C, *rest).transpose(0, 1).reshape(B, G * C, *rest)
            weight = None if self.weight is None else self.weight.repeat(G)
            bias = None if self.bias is None else self.bias.repeat(G)
            y = F.batch_norm(xg, mean.view(-1) if track else None, var.view(-1) if track else None,
                             weight, bias, True, 1.0, self.eps)
            y = y.reshape(B, G, C, *rest).transpose(0, 1).reshape(x.shape)
        else:  # the task slices are contiguous: one call each
            y = torch.cat([F.batch_norm(xs, mean[g] if track else None, var[g] if track else None,
                                        self.weight, self.bias, True, 1.0, self.eps)
                           for g, xs in enumerate(x.split(B))])
        if track:
            with torch.no_grad():
                tracked = self.num_batches_tracked if self.momentum is None else 0  # no host sync
                # through .data, as the native kernel updates them: an autograd graph that saved the
                # buffers (a native BatchNorm call earlier in the step) must not see a new version
                self.running_mean.data.copy_(sequential_running_stats(self.running_mean, mean, self.momentum, tracked))
                self.running_var.data.copy_(sequential_running_stats(self.running_var, var, self.momentum, tracked))
                self.num_batches_tracked.add_(G)
        return y


class TaskBatchNorm1d(_TaskGroups, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-task batch statistics (see :class:`_TaskGroups`)."""


class TaskBatchNorm2d(_TaskGroups, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-task batch statistics (see :class:`_TaskGroups`)."""


class TaskBatchNorm3d(_TaskGroups, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with per-task batch statistics (see :class:`_TaskGroups`)."""


def is_task_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a per-task BatchNorm (updates its running statistics once per task)."""
    return isinstance(module, _TaskGroups)


_TASK_SWAPS = {nn.BatchNorm1d: TaskBatchNorm1d, nn.BatchNorm2d: TaskBatchNorm2d,
               nn.BatchNorm3d: TaskBatchNorm3d}


def task_norms(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm1d/2d/3d`` inside ``module`` (in place) for its per-task
    :class:`TaskBatchNorm2d` etc., keeping the same Parameter and buffer objects (same state-dict
    keys); returns ``module``. Other BatchNorm subclasses (SyncBatchNorm, lazy) are refused."""
    for name, child in module.named_children():
        if isinstance(child, _TaskGroups):
            continue
        if type(child) in _TASK_SWAPS:
            new = _TASK_SWAPS[type(child)].__new__(_TASK_SWAPS[type(child)])
            new.__dict__.update(child.__dict__)  # the same parameters, buffers, hooks and flags
            setattr(module, name, new)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"algorithm.bn_stats=task: {type(child).__name__} is not supported "
                              f"(BatchNorm1d/2d/3d are); set algorithm.bn_stats=batch")
        else:
            task_norms(child)
    return module


@contextlib.contextmanager
def task_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, every :class:`TaskBatchNorm2d` etc. in ``module`` treats its batch as
    ``groups`` equal, contiguous task groups (the flattened ``[T, n, ...]`` of an episode)."""
    norms = [m for m in module.modules() if isinstance(m, _TaskGroups)]
    previous = [m.groups for m in norms]
    for m in norms:
        m.groups = groups
    try:
        yield
    finally:
        for m, g in zip(norms, previous):
            m.groups = g
