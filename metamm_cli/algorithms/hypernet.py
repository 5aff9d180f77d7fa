"""A classifier generator: the support set -> the weights of a cosine classifier
(Gidaris & Komodakis, CVPR 2018, "Dynamic few-shot visual learning without forgetting";
Qiao, Liu, Shen & Yuille, CVPR 2018, "Few-shot image recognition by predicting parameters
from activations")."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast
from metamm_cli.algorithms.protonet import cosine_similarity, prototypes


class HyperNet(MetaAlgorithm):
    """A generator network reads each class's mean support embedding (Qiao et al.: weights
    predicted from activations) and outputs that class's classifier weight vector,
    ``w_c = a * mean_c + MLP(mean_c)`` (Gidaris & Komodakis: the feature average, reweighted,
    plus a learned term); queries are scored by a cosine classifier ``tau cos(z, w_c)`` with a
    learned temperature. No inner gradient steps; any way at test time."""

    family = "model-based"

    def __init__(self, model, way, num_classes: Optional[int] = None, hidden: int = 128,
                 temperature: float = 10.0, bn_stats: str = "task",
                 execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
        if hidden < 1 or not temperature > 0:
            raise ConfigError(f"algorithm.hidden={hidden} must be >= 1 and algorithm.temperature="
                              f"{temperature} > 0")
        D = model.out_dim
        self.average_weight = nn.Parameter(torch.ones(D))
        self.generator = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, D))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def classifier(self, zs: torch.Tensor, ys: torch.Tensor, way: int) -> torch.Tensor:
        """``[T, S, D]`` support embeddings -> ``[T, way, D]`` classifier weights."""
        mean = prototypes(zs, ys, way)
        return self.average_weight * mean + self.generator(mean)

    def forward(self, episode):
        zs, zq = self.embed_episode(episode)
        weights = self.classifier(zs, episode.support_labels, episode.way)
        logits = upcast(self.log_temperature.exp() * cosine_similarity(zq, weights))
        return self.loss(logits, episode.query_labels), logits
