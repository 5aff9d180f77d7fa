"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017), with a choice of distance."""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm

DISTANCES = ("sq_euclidean", "euclidean", "manhattan", "cosine")


def prototypes(z: torch.Tensor, labels: torch.Tensor, way: int,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class means: ``z [T, S, D]``, ``labels [T, S]`` in ``0..way-1`` -> ``[T, way, D]``; with
    ``mask [T, S]``, the means over the samples it keeps (a class with none: zeros)."""
    onehot = F.one_hot(labels, way).to(z.dtype)  # [T, S, N]
    if mask is None:
        return onehot.transpose(1, 2) @ z / onehot.sum(1)[..., None]
    onehot = onehot * mask[..., None].to(z.dtype)
    return onehot.transpose(1, 2) @ z / onehot.sum(1).clamp_min(1)[..., None]


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for ``a [T, Q, D]``, ``b [T, N, D]`` -> ``[T, Q, N]``."""
    return (a.pow(2).sum(-1)[..., None] - 2 * a @ b.transpose(1, 2)
            + b.pow(2).sum(-1)[..., None, :]).clamp_min(0)


def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||`` (the square root is kept away from 0, where its gradient is infinite)."""
    return squared_euclidean(a, b).clamp_min(1e-12).sqrt()


def manhattan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d |a_id - b_jd|`` -> ``[T, Q, N]``."""
    return (a[..., :, None, :] - b[..., None, :, :]).abs().sum(-1)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_i, b_j> / (|a_i| |b_j|)`` -> ``[T, Q, N]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


class ProtoNet(MetaAlgorithm):
    """Embed support and query of every task in one call, average each class's support
    embeddings into a prototype, and score queries by a negative distance
    (``distance=sq_euclidean`` as in the paper, ``euclidean``, ``manhattan``), or by
    ``cosine`` similarity times a learned temperature (initialised to ``temperature``)."""

    population = True  # hydra/launcher=population: one vmap over members (tests/test_population.py)

    def __init__(self, model, way, num_classes: Optional[int] = None,
                 distance: Literal[DISTANCES] = "sq_euclidean", temperature: Annotated[float, Range("> 0")] = 10.0,
                 bn_stats: str = "task", execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
        self.distance = distance
        if distance == "cosine":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def scores(self, zq: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """Queries against prototypes ``[T, N, D]`` -> ``[T, Q, N]`` (``fusion=am3`` mixes prototypes
        and scores with this)."""
        if self.distance == "cosine":
            return self.log_temperature.exp() * cosine_similarity(zq, protos)
        return -{"sq_euclidean": squared_euclidean, "euclidean": euclidean,
                 "manhattan": manhattan}[self.distance](zq, protos)

    def class_scores(self, zq, zs, mask, labels, way):
        return self.scores(zq, prototypes(zs, labels, way, mask))

    def forward(self, episode):
        logits = self.episode_scores(episode)
        return self.loss(logits, episode.query_labels), logits
