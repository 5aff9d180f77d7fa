"""The transfer baselines of Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification" (ICLR 2019): Baseline (linear head) and Baseline++ (cosine head)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm

HEADS = ("linear", "cosine")


def head_logits(z: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], head: str,
                scale: float) -> torch.Tensor:
    """``[..., D]`` features, ``[..., C, D]`` weights -> ``[..., C]``: ``z W^T + b`` (linear) or
    ``scale * cos(z, w_c)`` (cosine, Baseline++)."""
    if head == "cosine":
        return scale * F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)
    return z @ weight.transpose(-1, -2) + bias[..., None, :]


class Finetune(MetaAlgorithm):
    """Training is ordinary classification over all ``num_classes`` classes of the training
    split (every support and query sample of the meta-batch, labelled with its global class id
    from ``episode.classes``); the training logits reported are the base classifier's restricted
    to the episode's classes. At validation/test time the body is frozen and a fresh head
    (``head=linear``: Baseline, ``head=cosine``: Baseline++) is fitted on each task's support
    embeddings with ``finetune_steps`` of SGD (``finetune_lr``, momentum, weight decay; the
    paper's 100 steps at lr 0.01, here full-batch instead of batches of 4), all tasks at once.
    Any way at test time."""

    def __init__(self, model, way, num_classes: Optional[int] = None, head: str = "linear",
                 scale: Optional[float] = None, finetune_steps: int = 100, finetune_lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 0.001):
        super().__init__(model, way, num_classes)
        if head not in HEADS:
            raise ConfigError(f"algorithm.head={head}: must be one of {', '.join(HEADS)}")
        if finetune_steps < 1:
            raise ConfigError(f"algorithm.finetune_steps={finetune_steps} is out of range: must be >= 1")
        if not finetune_lr > 0:
            raise ConfigError(f"algorithm.finetune_lr={finetune_lr} is out of range: must be > 0")
        if not 0 <= momentum < 1 or weight_decay < 0:
            raise ConfigError(f"algorithm.momentum={momentum} must be in [0, 1) and "
                              f"algorithm.weight_decay={weight_decay} >= 0")
        if scale is not None and not scale > 0:
            raise ConfigError(f"algorithm.scale={scale} is out of range: must be null or > 0")
        if not num_classes:
            raise ConfigError("algorithm=finetune needs the number of training classes "
                              "(build it with metamm_cli.algorithms.build_algorithm)")
        self.head, self.steps, self.lr = head, finetune_steps, finetune_lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.scale = scale if scale is not None else (2.0 if num_classes <= 200 else 10.0)  # paper's code
        self.classifier = nn.Linear(model.out_dim, num_classes, bias=head == "linear")

    def forward(self, episode):
        zs, zq = self.embed_episode(episode)
        if self.training:
            z = torch.cat([zs, zq], 1)
            labels = torch.cat([episode.support_labels, episode.query_labels], 1)
            glob = torch.gather(episode.classes, 1, labels)  # global class ids
            logits = head_logits(z, self.classifier.weight.float(), None if self.classifier.bias is None
                                 else self.classifier.bias.float(), self.head, self.scale)
            index = episode.classes[:, None].expand(-1, zq.shape[1], -1)
            return self.loss(logits, glob), torch.gather(logits[:, zs.shape[1]:], 2, index)
        weight, bias = self.finetune(zs.detach(), episode.support_labels, episode.way)
        logits = head_logits(zq.float(), weight, bias, self.head, self.scale)
        return self.loss(logits, episode.query_labels), logits

    def finetune(self, zs: torch.Tensor, ys: torch.Tensor, way: int):
        """A fresh head per task, fitted on the support embeddings ``[T, S, D]``; all tasks at once."""
        T, S, D = zs.shape
        g = torch.Generator(device=zs.device).manual_seed(0)
        bound = 1 / D ** 0.5  # nn.Linear's initialisation
        weight = (torch.rand(T, way, D, generator=g, device=zs.device) * 2 - 1) * bound
        bias = torch.zeros(T, way, device=zs.device)
        params = [weight.requires_grad_(), bias.requires_grad_()]
        velocity = [torch.zeros_like(p) for p in params]
        device_type = zs.device.type
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            for _ in range(self.steps):
                logits = head_logits(zs.float(), weight, bias if self.head == "linear" else None,
                                     self.head, self.scale)
                # sum over tasks of each task's mean loss: every task gets its own gradient
                loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum") / S
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, v, gr in zip(params, velocity, grads):
                        if gr is None:
                            continue
                        v.mul_(self.momentum).add_(gr + self.weight_decay * p)
                        p.sub_(self.lr * v)
        return weight.detach(), bias.detach()
