"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from metamm_cli.algorithms.functional import sgd_adapt, upcast
from metamm_cli.algorithms.maml import MAML


def reptile_loss(theta, adapted) -> torch.Tensor:
    """``mean_t 1/2 ||theta - stopgrad(phi_t)||^2``: its gradient is ``theta - mean_t phi_t``, so a
    plain SGD step of size ``eps`` on it is Reptile's update ``theta <- theta - eps (theta - phi_bar)``.
    ``adapted[k]`` is ``[T, *theta[k].shape]``."""
    total = 0
    for k, p in theta.items():
        total = total + (p[None] - adapted[k].detach()).pow(2).flatten(1).sum(1)
    return 0.5 * total.mean()


class Reptile(MAML):
    """Each task takes ``inner_steps`` plain SGD steps from ``theta`` on its support set (no
    second-order terms; the paper's inner optimizer is Adam with beta1=0, here SGD); the
    meta-loss :func:`reptile_loss` pulls ``theta`` towards the adapted weights, so it fits the
    one-loss interface and the trainer's optimizer. Outer learning rate: with plain SGD at lr
    ``eps`` the trainer's step would be exactly Reptile's ``theta - eps (theta - phi_bar)``; the
    trainer's Adam at ``trainer.lr`` normalises the same direction per coordinate.

    Evaluation is the paper's *non-transductive* one: after adapting on the support set, each
    query is classified on its own, with the norm statistics of the support set plus that one
    query (no information flows between queries). Training logits (reported accuracy only) are
    computed on the whole query set. The reported training loss is the distance above."""

    population = False  # not tested under the population vmap (hydra/launcher=population)

    query_meta_loss = False  # its meta-loss is ½‖θ − stopgrad(φ̄)‖², not the query loss

    def __init__(self, model, way, num_classes: Optional[int] = None, inner_lr: float = 0.1,
                 inner_steps: int = 5, inner_steps_eval: int = 50, head: str = "learned",
                 execution: str = "auto"):
        super().__init__(model, way, num_classes, inner_lr=inner_lr, inner_steps=inner_steps,
                         inner_steps_eval=inner_steps_eval, first_order=True, head=head,
                         execution=execution)

    def task_fn(self, steps: int, functional: bool = True):
        transductive = self.training

        def task(fast, shared, lrs, sx, sp, sy, qx, qp, qy):
            def support_loss(p):
                return F.cross_entropy(upcast(functional_call(self.net, {**shared, **p}, (sx, sp))), sy)
            fast = sgd_adapt(support_loss, fast, self.inner_lr, steps, first_order=True, functional=functional)
            params = {**shared, **fast}
            if transductive:
                logits = upcast(functional_call(self.net, params, (qx, qp)))
            else:
                def one(x, p):  # the support set plus one query; its row is the last
                    xs = {m: torch.cat([sx[m], x[m][None]]) for m in sx}
                    return functional_call(self.net, params, (xs, torch.cat([sp, p[None]])))[-1]
                logits = upcast(vmap(one)(qx, qp))
            return fast, logits
        return task

    def forward(self, episode):
        theta, shared = self.initial_params(episode.way)
        detached = ({k: p.detach() for k, p in theta.items()}, {k: p.detach() for k, p in shared.items()})
        with torch.enable_grad():
            adapted, logits = self.run(episode, *detached, {})
        if not self.training:
            return self.loss(logits, episode.query_labels), logits
        return reptile_loss(theta, adapted), logits
