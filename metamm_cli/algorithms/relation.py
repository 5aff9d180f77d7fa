"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast


def class_sums(zs: torch.Tensor, ys: torch.Tensor, way: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The paper's class feature for K-shot: the element-wise sum of its support embeddings
    (with ``mask [T, S]``: of those it keeps)."""
    onehot = F.one_hot(ys, way).to(zs.dtype)
    if mask is not None:
        onehot = onehot * mask[..., None].to(zs.dtype)
    return onehot.transpose(1, 2) @ zs  # [T, N, D]


def relation_pairs(zq: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Every (query, class) pair concatenated: ``[T, Q, D]``, ``[T, N, D]`` -> ``[T, Q, N, 2D]``."""
    T, Q, D = zq.shape
    N = classes.shape[1]
    return torch.cat([zq[:, :, None].expand(T, Q, N, D), classes[:, None].expand(T, Q, N, D)], -1)


class RelationNet(MetaAlgorithm):
    """A learned relation module ``g([f(q), f(c)])`` scores every (query, class) pair; with
    ``loss=mse`` (the paper) the score goes through a sigmoid and regresses the one-hot match,
    with ``loss=ce`` the scores are logits of a softmax. The embeddings here are vectors (the
    fusion's output), so the module is an MLP (the paper: two conv blocks then FC 8 -> 1)."""

    def __init__(self, model, way, num_classes: Optional[int] = None, hidden: Annotated[int, Range(">= 1")] = 8,
                 loss: Literal["mse", "ce"] = "mse", bn_stats: str = "task", execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
        D = model.out_dim
        # LayerNorm on the pair (the paper's relation module has BatchNorm in its conv blocks):
        # without it the ReLUs die on unnormalised embeddings and every pair scores the same
        self.relation = nn.Sequential(nn.LayerNorm(2 * D), nn.Linear(2 * D, 2 * D), nn.ReLU(),
                                      nn.Linear(2 * D, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.loss_kind = loss

    def class_scores(self, zq, zs, mask, labels, way):
        """The relation module's score of every (query, class) pair (before the sigmoid)."""
        return upcast(self.relation(relation_pairs(zq, class_sums(zs, labels, way, mask))).squeeze(-1))

    def forward(self, episode):
        scores = self.episode_scores(episode)  # [T, Q, N]
        if self.loss_kind == "ce":
            return self.loss(scores, episode.query_labels), scores
        scores = scores.sigmoid()
        target = F.one_hot(episode.query_labels, episode.way).to(scores.dtype)
        return F.mse_loss(scores, target), scores
