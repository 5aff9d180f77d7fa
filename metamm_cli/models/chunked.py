"""Cache-sized embedding with the same maths (``trainer.embed_chunk``).

A large batch (a 60-way episode, many 84-px images) falls out of the CPU's cache: every layer
streams its activations through main memory. Here a batch runs through an encoder's layers in
pieces of ``chunk`` samples, each piece through every layer up to the next BatchNorm while it is
still in cache, and every BatchNorm that uses batch statistics still normalises over its whole
batch (each task group, ``bn_stats=task``), as one call would:

* the statistics are combined from per-piece ``var_mean`` (Chan's parallel rule), exact;
* each piece is normalised by the native kernel fed those whole-batch statistics;
* the backward pass needs the whole batch's sums of ``g`` and ``g * x_hat`` before any piece's
  input gradient: :class:`ChunkedBatchNorm` is one autograd node over all pieces, so autograd
  calls its backward once every piece's gradient is there, and gets the sums from the native
  kernel per piece;
* the running statistics take the same update (per task group, in order) as one call.

Losses, gradients and running statistics equal one call's to float tolerance
(tests/test_chunked.py, float64). Differentiating twice (second-order MAML, Meta-SGD, ANIL)
runs the same statistics in plain differentiable tensor ops instead (``twice``).

What is chunked: every ``nn.Sequential`` of an encoder that holds a normalisation layer
(:func:`make_chunkable`; the same object, same state-dict keys), nested ``Sequential``s
flattened into one list of layers. Within it, a layer with no batch-statistics norm inside runs
piece by piece; a BatchNorm runs as above; any other layer holding one (a residual block) runs on
the whole batch. Dropout and DropBlock draw their masks piece by piece (the same distribution,
other numbers). Only plain tensors are chunked (not under ``torch.func`` transforms).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _dims(x: torch.Tensor):
    return [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)


def combined_stats(pieces: Sequence[torch.Tensor]):
    """``(mean [C], biased var [C], count)`` over all pieces ``[n_i, C, *]`` from each piece's
    ``var_mean``: ``var = sum n_i (v_i + (m_i - mean)^2) / n`` (differentiable)."""
    dims, _ = _dims(pieces[0])
    counts = [p.numel() // p.shape[1] for p in pieces]
    n = sum(counts)
    stats = [torch.var_mean(p, dims, unbiased=False) for p in pieces]
    mean = sum(k * m for k, (_, m) in zip(counts, stats)) / n
    var = sum(k * (v + (m - mean) ** 2) for k, (v, m) in zip(counts, stats)) / n
    return mean, var, n


class ChunkedBatchNorm(torch.autograd.Function):
    """BatchNorm (batch statistics) over a batch given as pieces: ``(weight, bias, eps, *pieces)
    -> (*normalised pieces, mean, var)``; one node, native kernels per piece."""

    @staticmethod
    def forward(ctx, weight, bias, eps, *pieces):
        with torch.no_grad():
            mean, var, n = combined_stats(pieces)
            outs = [torch.batch_norm(p, weight, bias, mean, var, False, 0.0, eps, False) for p in pieces]
        ctx.eps, ctx.n, ctx.affine = eps, n, (weight is not None, bias is not None)
        ctx.save_for_backward(weight, mean, var, *pieces)
        ctx.mark_non_differentiable(mean, var)
        return (*outs, mean, var)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        weight, mean, var, *pieces = ctx.saved_tensors
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, pieces)]
        _, shape = _dims(pieces[0])
        sum_g, sum_gx = torch.zeros_like(mean), torch.zeros_like(mean)  # sum g, sum g * x_hat
        for g, p in zip(grads, pieces):
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, p, weight, mean, var, None, None, False, ctx.eps, [False, True, True])
            sum_gx += gw
            sum_g += gb
        invstd = torch.rsqrt(var + ctx.eps)
        w = invstd if weight is None else weight * invstd
        # dx = w invstd (g - sum_g / n - x_hat sum_gx / n) = a g + b x + c, per channel
        a = w.view(shape)
        b = (-w * invstd * sum_gx / ctx.n).view(shape)
        c = (-w * sum_g / ctx.n).view(shape) - b * mean.view(shape)
        dx = [torch.addcmul(torch.addcmul(c, p, b), g, a) for g, p in zip(grads, pieces)]
        return (sum_gx if ctx.affine[0] else None, sum_g if ctx.affine[1] else None, None, *dx)


def normalise_pieces(norm: nn.Module, pieces: List[torch.Tensor], twice: bool):
    """The pieces of one batch normalised with its batch statistics -> (pieces, mean, var)."""
    if twice or pieces[0].dtype not in _NATIVE_DTYPES:
        mean, var, _ = combined_stats([p.float() if p.dtype not in _NATIVE_DTYPES else p for p in pieces])
        _, shape = _dims(pieces[0])
        scale = torch.rsqrt(var + norm.eps) * (1 if norm.weight is None else norm.weight)
        shift = -mean * scale + (0 if norm.bias is None else norm.bias)
        outs = [torch.addcmul(shift.view(shape), p.to(scale.dtype), scale.view(shape)).to(p.dtype) for p in pieces]
        return outs, mean.detach(), var.detach()
    *outs, mean, var = ChunkedBatchNorm.apply(norm.weight, norm.bias, norm.eps, *pieces)
    return outs, mean, var


def sequential_running_stats(running: torch.Tensor, stats: torch.Tensor, momentum: Optional[float],
                             tracked: Union[int, torch.Tensor] = 0) -> torch.Tensor:
    """``running [C]`` after one update per row of ``stats [G, C]``, in order, by BatchNorm's rule
    ``r <- (1 - m) r + m s_g`` (closed form: ``(1-m)^G r + sum_g m (1-m)^(G-1-g) s_g``); with
    ``momentum=None`` the cumulative average over ``tracked`` earlier batches and these ``G``."""
    G = stats.shape[0]
    if momentum is None:
        return (tracked * running + stats.sum(0)) / (tracked + G)
    power = torch.arange(G - 1, -1, -1, device=stats.device, dtype=stats.dtype)
    weights = momentum * (1 - momentum) ** power  # [G]
    return (1 - momentum) ** G * running + (weights[:, None] * stats).sum(0)


def is_norm(m: nn.Module) -> bool:
    """A BatchNorm, or a layer that always normalises by its batch (``always_batch_stats``: the
    MAML family's functional norms, algorithms/functional.py)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "always_batch_stats", False)


def batch_stat_norm(m: nn.Module) -> bool:
    """Whether ``m`` normalises with the statistics of the batch at hand (here and now)."""
    if getattr(m, "always_batch_stats", False):
        return True
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


def _flatten(seq: nn.Sequential) -> List[nn.Module]:
    out = []
    for m in seq:
        out.extend(_flatten(m) if type(m) in (nn.Sequential, ChunkedSequential) else [m])
    return out


def _update_running(norm: nn.Module, means: List[torch.Tensor], variances: List[torch.Tensor], counts: List[int]):
    """The running statistics after one update per task group, in order (as one call)."""
    if not (isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training and norm.track_running_stats):
        return
    with torch.no_grad():
        mean = torch.stack(means).to(norm.running_mean.dtype)
        unbiased = torch.stack([v * (n / max(n - 1, 1)) for v, n in zip(variances, counts)]).to(norm.running_var.dtype)
        tracked = norm.num_batches_tracked if norm.momentum is None else 0
        norm.running_mean.data.copy_(sequential_running_stats(norm.running_mean, mean, norm.momentum, tracked))
        norm.running_var.data.copy_(sequential_running_stats(norm.running_var, unbiased, norm.momentum, tracked))
        norm.num_batches_tracked.add_(len(means))


class ChunkedSequential(nn.Sequential):
    """``nn.Sequential`` that, with ``chunk`` set, runs a larger batch in pieces (module doc)."""

    chunk: Optional[int] = None
    twice = False  # the step differentiates through gradients: plain-op statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.chunk
        if (not chunk or x.shape[0] <= chunk or torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return super().forward(x)
        layers = _flatten(self)
        groups = next((getattr(m, "groups", 1) for m in layers if batch_stat_norm(m)), 1)
        size = x.shape[0] // groups
        # pieces[g]: the pieces of task group g, each at most `chunk` samples
        pieces = [list(xg.split(chunk)) for xg in x.split(size)]
        segment: List[nn.Module] = []

        def flush():
            for g, group in enumerate(pieces):
                for i, p in enumerate(group):
                    for layer in segment:
                        p = layer(p)
                    group[i] = p
            segment.clear()

        for layer in layers:
            if batch_stat_norm(layer):
                flush()
                means, variances, counts = [], [], []
                for g, group in enumerate(pieces):
                    pieces[g], mean, var = normalise_pieces(layer, group, self.twice)
                    means.append(mean)
                    variances.append(var)
                    counts.append(sum(p.numel() // p.shape[1] for p in group))
                _update_running(layer, means, variances, counts)
            elif any(batch_stat_norm(m) for m in layer.modules()):
                flush()  # a block holding a norm (a residual block): the whole batch at once
                flat = [p for group in pieces for p in group]
                sizes = [[p.shape[0] for p in group] for group in pieces]
                out = layer(torch.cat(flat))
                parts = iter(out.split([s for group in sizes for s in group]))
                pieces = [[next(parts) for _ in group] for group in sizes]
            else:
                segment.append(layer)
        flush()
        return torch.cat([p for group in pieces for p in group])


def make_chunkable(module: nn.Module) -> nn.Module:
    """Turn every outermost ``nn.Sequential`` in ``module`` (itself included) that holds a
    normalisation layer into a :class:`ChunkedSequential` (in place; same object and keys)."""
    if type(module) is nn.Sequential and any(is_norm(m) for m in module.modules()):
        module.__class__ = ChunkedSequential
        return module
    for child in module.children():
        make_chunkable(child)
    return module


def set_chunk(module: nn.Module, chunk: Optional[int], twice: bool = False) -> None:
    """Every :class:`ChunkedSequential` in ``module`` runs batches in pieces of ``chunk`` (None: whole)."""
    for m in module.modules():
        if isinstance(m, ChunkedSequential):
            m.chunk, m.twice = chunk, twice


def chunkable(module: nn.Module) -> bool:
    return any(isinstance(m, ChunkedSequential) for m in module.modules())
