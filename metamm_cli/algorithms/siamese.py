"""Siamese Neural Networks for one-shot recognition (Koch, Zemel & Salakhutdinov, ICML DL
workshop 2015)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast


def weighted_l1(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The verification logit ``sum_j alpha_j |a_ij - b_kj| + bias`` for every pair:
    ``[T, Q, D]``, ``[T, S, D]`` -> ``[T, Q, S]`` (the probability is its sigmoid)."""
    return (a[:, :, None] - b[:, None]).abs() @ alpha + bias


class Siamese(MetaAlgorithm):
    """Twin embeddings compared by a learned weighted L1 distance; trained as verification on
    every (query, support) pair of the episode (same class or not), with binary cross-entropy
    in which positive and negative pairs weigh half each (an episode has N-1 times more
    negatives). Classification: a query takes the class of its best-scoring support; with
    K > 1 shots, a class scores the maximum over its supports (the one-shot rule applied to
    every shot). Any way at test time."""

    def __init__(self, model, way, num_classes: Optional[int] = None, bn_stats: str = "task",
                 execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
        self.alpha = nn.Parameter(torch.full((model.out_dim,), -1.0 / model.out_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, episode):
        zs, zq = self.embed_episode(episode)
        scores = weighted_l1(upcast(zq), upcast(zs), upcast(self.alpha), upcast(self.bias))  # [T, Q, S]
        same = episode.query_labels[:, :, None] == episode.support_labels[:, None, :]
        bce = F.binary_cross_entropy_with_logits(scores, same.to(scores.dtype), reduction="none")
        pos = same.to(bce.dtype)  # masked means: no host sync
        loss = 0.5 * ((bce * pos).sum() / pos.sum() + (bce * (1 - pos)).sum() / (1 - pos).sum())
        member = F.one_hot(episode.support_labels, episode.way).bool()  # [T, S, N]
        logits = scores[..., None].masked_fill(~member[:, None], float("-inf")).amax(2)
        return loss, logits
