"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016)."""
from __future__ import annotations

from typing import Annotated, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import Range
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast
from metamm_cli.algorithms.protonet import cosine_similarity


def matching_log_probs(zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, way: int,
                       scale: float = 1.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log sum_i a(q, s_i) onehot(y_i)`` with ``a = softmax_i(scale * cos(q, s_i))``:
    ``zs [T, S, D]``, ``ys [T, S]``, ``zq [T, Q, D]`` -> ``[T, Q, way]``; with ``mask [T, S]``
    the attention runs over the support samples it keeps."""
    sim = scale * cosine_similarity(zq, zs)  # [T, Q, S]
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, :], torch.finfo(sim.dtype).min)
    attn = sim.softmax(-1)
    if mask is not None:
        attn = attn * mask[:, None, :]
    return (attn @ F.one_hot(ys, way).to(attn.dtype)).clamp_min(1e-12).log()


class FullContextEmbedding(nn.Module):
    """The paper's full-context embeddings: support ``g = z + fwd + bwd`` of a bidirectional LSTM
    over the support set; query ``f`` from ``steps`` rounds of an attention LSTM reading the
    support (state ``h + r``, the common single-width form of the paper's ``[h, r]``)."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, dim)
        self.steps = steps

    def forward(self, zs, zq):
        out, _ = self.support_lstm(zs)  # [T, S, 2D]
        g = zs + out[..., : zs.shape[-1]] + out[..., zs.shape[-1]:]
        T, Q, D = zq.shape
        x = zq.reshape(T * Q, D)
        h, c = torch.zeros_like(x), torch.zeros_like(x)
        gq = g.repeat_interleave(Q, 0)  # [T*Q, S, D]
        for _ in range(self.steps):
            r = ((h[:, None] @ gq.transpose(1, 2)).softmax(-1) @ gq).squeeze(1)
            h, c = self.query_cell(x, (h + r, c))
            h = h + x
        return g, h.reshape(T, Q, D)


class MatchingNet(MetaAlgorithm):
    """Each query is labelled by cosine attention over the support embeddings (the paper's
    ``P(y|x, S) = sum_i a(x, x_i) y_i``); ``fce=true`` adds the full-context embeddings.
    ``scale`` multiplies the cosine before the softmax (1 in the paper). Any way at test time."""

    population = True  # hydra/launcher=population: one vmap over members (tests/test_population.py)

    def __init__(self, model, way, num_classes: Optional[int] = None, fce: bool = False,
                 fce_steps: Annotated[int, Range(">= 1")] = 5, scale: Annotated[float, Range("> 0")] = 1.0,
                 bn_stats: str = "task", execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
        if fce and getattr(model.fusion, "level", "sample") == "prototype":
            raise ConfigError("algorithm.fce=true reads the whole support set through an LSTM and cannot "
                              "be split by modality: use a sample-level fusion, or algorithm.fce=false "
                              "with fusion=presence/late")
        self.fce = FullContextEmbedding(model.out_dim, fce_steps) if fce else None
        self.scale = scale

    def class_scores(self, zq, zs, mask, labels, way):
        return matching_log_probs(upcast(zs), labels, upcast(zq), way, self.scale, mask)

    def forward(self, episode):
        if self.fce is None:
            logits = self.episode_scores(episode)
        else:
            zs, zq = self.fce(*self.embed_episode(episode))
            logits = self.class_scores(zq, zs, None, episode.support_labels, episode.way)
        return F.nll_loss(logits.flatten(0, 1), episode.query_labels.flatten()), logits
