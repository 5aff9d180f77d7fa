"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), batched over tasks.

Also the base of the other optimization-based algorithms (FOMAML = ``first_order=true``,
ANIL, Meta-SGD, Reptile): they override which parameters adapt (:meth:`MAML.fast_names`), the
inner learning rates (:meth:`MAML.learned_lrs`) or the per-task program (:meth:`MAML.task_fn`).
"""
from __future__ import annotations

from typing import Annotated, Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metamm_cli import ConfigError
from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import (BatchStatNorm, Params, check_execution,  # noqa: F401
                                              functional_norms, run_tasks, sgd_adapt, upcast)


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
    one ``vmap`` of a ``functional_call``/``grad`` program, or a loop over tasks
    (``execution=auto|vmap|loop``; auto: vmap on CUDA, loop on CPU). Norm layers always use
    the statistics of the batch at hand (as in the paper). ``head=learned`` meta-learns the
    head's initialisation (fixing the way); ``head=zero`` starts every task from a zero head,
    so any way works at test time.
    """

    population = True  # hydra/launcher=population: one vmap over members (tests/test_population.py)

    family = "optimization"
    task_batchnorm = False  # its norm layers are functional: per task by construction
    inner_loop = True
    query_meta_loss = True

    @property
    def differentiates_twice(self) -> bool:
        return not self.first_order

    def __init__(self, model, way, num_classes: Optional[int] = None, inner_lr: Annotated[float, Range("> 0")] = 0.4,
                 inner_steps: Annotated[int, Range(">= 1")] = 1, inner_steps_eval: Annotated[int, Range(">= 1")] = 3,
                 first_order: bool = False, head: Literal["learned", "zero"] = "learned", execution: str = "auto"):
        super().__init__(model, way, num_classes)
        check_execution(execution)
        functional_norms(model)
        self.net = Classifier(model, nn.Linear(model.out_dim, way))
        if head == "zero":
            self.net.head.requires_grad_(False)
        self.inner_lr, self.inner_steps, self.inner_steps_eval = inner_lr, inner_steps, inner_steps_eval
        self.first_order, self.head, self.execution = first_order, head, execution

    # -- what adapts, and how fast -------------------------------------------------------------
    def fast_names(self):
        """Names (in ``self.net``) of the parameters adapted in the inner loop."""
        return [k for k, _ in self.net.named_parameters()]

    def learned_lrs(self) -> Dict[str, torch.Tensor]:
        """Per-parameter inner learning rates (Meta-SGD); empty: the scalar ``inner_lr``."""
        return {}

    def initial_params(self, way: int, loop: bool = False) -> Tuple[Params, Params]:
        """(fast, shared) parameter dicts; a zero head for ``head=zero`` (``loop``: a leaf that
        requires grad, for ``torch.autograd.grad``)."""
        params = dict(self.net.named_parameters())
        if self.head == "zero":
            w = params["head.weight"]
            params["head.weight"] = w.new_zeros(way, w.shape[1], requires_grad=loop)
            params["head.bias"] = w.new_zeros(way, requires_grad=loop)
        elif way != self.way:
            raise ConfigError(f"episode.way={way}: this {type(self).__name__} head was trained for "
                              f"{self.way}-way tasks; train with algorithm.head=zero to change the way")
        names = set(self.fast_names())
        return ({k: p for k, p in params.items() if k in names},
                {k: p for k, p in params.items() if k not in names})

    def fixed_way(self):
        if self.head == "learned":
            return (f"{type(self).__name__} with algorithm.head=learned learns a {self.way}-way head "
                    f"(algorithm.head=zero evaluates at any way)")
        return None

    def embed_batch(self, cfg, device):
        """A task's support or its query (embedded apart): the larger."""
        E = cfg.episode
        return E.way * max(E.shot, E.query)

    @property
    def steps(self) -> int:
        return self.inner_steps if self.training else self.inner_steps_eval

    # -- the per-task program ------------------------------------------------------------------
    def adapt(self, fast: Params, shared: Params, lrs: Params, sx, sp, sy, steps: int,
              functional: bool = True) -> Params:
        """One task's inner loop: ``fast`` after ``steps`` SGD steps on the support loss of
        ``self.net`` with ``shared`` held (differentiable w.r.t. ``fast`` unless ``first_order``)."""
        def support_loss(p):
            return F.cross_entropy(upcast(functional_call(self.net, {**shared, **p}, (sx, sp))), sy)
        return sgd_adapt(support_loss, fast, lrs or self.inner_lr, steps, self.first_order, functional)

    def task_fn(self, steps: int, functional: bool = True):
        """``(fast, shared, lrs, sx, sp, sy, qx, qp, qy) -> (query loss, query logits)`` for one task."""
        def task(fast, shared, lrs, sx, sp, sy, qx, qp, qy):
            fast = self.adapt(fast, shared, lrs, sx, sp, sy, steps, functional)
            logits = upcast(functional_call(self.net, {**shared, **fast}, (qx, qp)))
            return F.cross_entropy(logits, qy), logits
        return task

    def run(self, episode, *shared):
        steps = self.steps
        return run_tasks(lambda functional: self.task_fn(steps, functional), shared, (episode.support, episode.support_present, episode.support_labels,
                                      episode.query, episode.query_present, episode.query_labels),
                         self.execution)

    def forward(self, episode):
        fast, shared = self.initial_params(episode.way)
        losses, logits = self.run(episode, fast, shared, self.learned_lrs())
        return losses.mean(), logits


def meta_loss_loop(algo: MAML, episode) -> torch.Tensor:
    """The meta-loss of :class:`MAML` and its subclasses computed the way learn2learn/higher do it:
    a Python loop over tasks, each cloning the initial weights and taking inner SGD steps with
    ``torch.autograd.grad(create_graph=True)`` on the adapted parameters only, then the mean of the
    query losses. A reference for the tests and the baseline of the benchmarks; not used in training."""
    fast0, shared = algo.initial_params(episode.way, loop=True)
    lrs = algo.learned_lrs()
    losses = []
    for t in range(episode.num_tasks):
        sx, qx = ({m: x[t] for m, x in d.items()} for d in (episode.support, episode.query))
        fast = dict(fast0)
        for _ in range(algo.steps):
            out = upcast(functional_call(algo.net, {**shared, **fast}, (sx, episode.support_present[t])))
            loss = F.cross_entropy(out, episode.support_labels[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not algo.first_order,
                                        allow_unused=True)
            fast = {k: p - (lrs[k] if lrs else algo.inner_lr) * (torch.zeros_like(p) if g is None else g)
                    for (k, p), g in zip(fast.items(), grads)}
        logits = upcast(functional_call(algo.net, {**shared, **fast}, (qx, episode.query_present[t])))
        losses.append(F.cross_entropy(logits, episode.query_labels[t]))
    return torch.stack(losses).mean()
