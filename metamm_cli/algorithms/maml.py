"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), batched over tasks."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

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
        replace_all_batch_norm_modules_(model)
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
