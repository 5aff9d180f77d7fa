"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from metamm_cli.algorithms.base import MetaAlgorithm


def prototypes(z: torch.Tensor, labels: torch.Tensor, way: int) -> torch.Tensor:
    """Class means: ``z [T, S, D]``, ``labels [T, S]`` in ``0..way-1`` -> ``[T, way, D]``."""
    onehot = F.one_hot(labels, way).to(z.dtype)  # [T, S, N]
    return onehot.transpose(1, 2) @ z / onehot.sum(1)[..., None]


def squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for ``a [T, Q, D]``, ``b [T, N, D]`` -> ``[T, Q, N]``."""
    return (a.pow(2).sum(-1)[..., None] - 2 * a @ b.transpose(1, 2)
            + b.pow(2).sum(-1)[..., None, :]).clamp_min(0)


class ProtoNet(MetaAlgorithm):
    """Embed support and query of every task in one call, average each class's support
    embeddings into a prototype, and score queries by negative squared Euclidean distance."""

    prototype_fusion = True  # prototype-level fusions (am3, late) build the logits: see below

    def scores(self, zq: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        return -squared_euclidean(zq, protos)

    def forward(self, episode):
        if getattr(self.model.fusion, "level", "sample") == "prototype":  # am3, late: the fusion mixes prototypes/scores
            logits = self.model.fusion.episode_logits(self.model, episode, self.scores)
            return self.loss(logits, episode.query_labels), logits
        nk = episode.support_labels.shape[1]
        inputs = {m: torch.cat([episode.support[m], episode.query[m]], 1) for m in episode.support}
        present = torch.cat([episode.support_present, episode.query_present], 1)
        z = self.embed(inputs, present).float()
        protos = prototypes(z[:, :nk], episode.support_labels, episode.way)
        logits = self.scores(z[:, nk:], protos)
        return self.loss(logits, episode.query_labels), logits
