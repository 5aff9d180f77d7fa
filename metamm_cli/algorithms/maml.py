"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), batched over tasks."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm

Params = Dict[str, torch.Tensor]


def sgd_adapt(loss_fn: Callable[[Params], torch.Tensor], params: Params, lr: float, steps: int,
              first_order: bool = False) -> Params:
    """``steps`` plain SGD steps ``theta <- theta - lr * grad(loss)``; differentiable w.r.t. the
    initial ``params`` (second order) unless ``first_order``, which stops the inner gradients."""
    for _ in range(steps):
        grads = grad(loss_fn)(params)
        params = {k: p - lr * (grads[k].detach() if first_order else grads[k]) for k, p in params.items()}
    return params


class BatchStatNorm(nn.Module):
    """BatchNorm that always normalises with the statistics of the batch at hand, in plain tensor
    ops. It replaces ``nn.BatchNorm*`` under MAML: torch's vmap batching rule for the native
    batch_norm gives a wrong second-order gradient (float64: 1e-2 off a per-task loop, while this
    matches it to 1e-15; tests/test_algorithms.py checks it)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps, self.weight, self.bias = bn.eps, bn.weight, bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        var, mean = torch.var_mean(xf, dims, unbiased=False, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def use_batch_statistics(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm inside ``module`` for :class:`BatchStatNorm` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, BatchStatNorm(child))
        else:
            use_batch_statistics(child)
    return module


class Classifier(nn.Module):
    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, inputs, present):
        return self.head(self.model(inputs, present))


class MAML(MetaAlgorithm):
    """Every task adapts all weights (encoders, fusion, linear head) with ``inner_steps`` SGD
    steps on its support set; the meta-loss is the adapted model's query loss, differentiated
    through the inner loop (second order; ``first_order=true`` gives FOMAML). All tasks run in
    one ``vmap`` of a ``functional_call``/``grad`` program. BatchNorm always uses the statistics
    of the batch at hand (as in the paper). ``head=learned`` meta-learns the head's
    initialisation (fixing the way); ``head=zero`` starts every task from a zero head, so any
    way works at test time.
    """

    def __init__(self, model, way, inner_lr: float = 0.4, inner_steps: int = 1,
                 inner_steps_eval: int = 3, first_order: bool = False, head: str = "learned"):
        super().__init__(model, way)
        if head not in ("learned", "zero"):
            raise ConfigError(f"algorithm.head={head}: must be learned or zero")
        if inner_steps < 1 or inner_steps_eval < 1 or inner_lr <= 0:
            raise ConfigError("algorithm.inner_steps and inner_steps_eval must be >= 1, inner_lr > 0")
        use_batch_statistics(model)
        self.net = Classifier(model, nn.Linear(model.out_dim, way))
        if head == "zero":
            self.net.head.requires_grad_(False)
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.first_order, self.head = first_order, head

    def forward(self, episode):
        params = dict(self.net.named_parameters())
        if self.head == "zero":
            ref = params["head.weight"]
            params["head.weight"] = ref.new_zeros(episode.way, ref.shape[1])
            params["head.bias"] = ref.new_zeros(episode.way)
        elif episode.way != self.way:
            raise ConfigError(f"episode.way={episode.way}: this MAML head was trained for "
                              f"{self.way}-way tasks; train with algorithm.head=zero to change the way")
        steps = self.inner_steps if self.training else self.inner_steps_eval

        def task(params, sx, sp, sy, qx, qp, qy):
            def support_loss(p):
                return F.cross_entropy(functional_call(self.net, p, (sx, sp)).float(), sy)
            fast = sgd_adapt(support_loss, params, self.inner_lr, steps, self.first_order)
            logits = functional_call(self.net, fast, (qx, qp)).float()
            return F.cross_entropy(logits, qy), logits

        losses, logits = vmap(task, in_dims=(None, 0, 0, 0, 0, 0, 0), randomness="same")(
            params, episode.support, episode.support_present, episode.support_labels,
            episode.query, episode.query_present, episode.query_labels)
        return losses.mean(), logits


def maml_loss_loop(algo: MAML, episode) -> torch.Tensor:
    """The same meta-loss as :meth:`MAML.forward`, computed the way learn2learn/higher do it: a
    Python loop over tasks with ``torch.autograd.grad(create_graph=True)``. A reference for tests
    and the baseline of ``scripts/bench_maml.py``; not used in training."""
    params = dict(algo.net.named_parameters())
    if algo.head == "zero":
        weight = params["head.weight"]
        params["head.weight"] = weight.new_zeros(episode.way, weight.shape[1], requires_grad=True)
        params["head.bias"] = weight.new_zeros(episode.way, requires_grad=True)
    steps = algo.inner_steps if algo.training else algo.inner_steps_eval
    losses = []
    for t in range(episode.num_tasks):
        sx, qx = ({m: x[t] for m, x in d.items()} for d in (episode.support, episode.query))
        fast = params
        for _ in range(steps):
            out = functional_call(algo.net, fast, (sx, episode.support_present[t])).float()
            loss = F.cross_entropy(out, episode.support_labels[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not algo.first_order,
                                        allow_unused=True)
            fast = {k: p - algo.inner_lr * (torch.zeros_like(p) if g is None else g)
                    for (k, p), g in zip(fast.items(), grads)}
        logits = functional_call(algo.net, fast, (qx, episode.query_present[t])).float()
        losses.append(F.cross_entropy(logits, episode.query_labels[t]))
    return torch.stack(losses).mean()
