"""Few-shot learning with graph neural networks (Garcia & Bruna, ICLR 2018)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm


class EdgeSimilarity(nn.Module):
    """Learned adjacency ``A_ij = softmax_j(MLP(|x_i - x_j|))`` over ``j != i``: ``[T, V, F] -> [T, V, V]``."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.mlp((x[:, :, None] - x[:, None]).abs()).squeeze(-1)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        return scores.masked_fill(eye, float("-inf")).softmax(-1)


class GraphConv(nn.Module):
    """One layer with the operator family ``{I, A}``: ``Linear([x, A x])``."""

    def __init__(self, features: int, out: int):
        super().__init__()
        self.linear = nn.Linear(2 * features, out)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, adjacency @ x], -1))


class GNN(MetaAlgorithm):
    """Support and query samples are the nodes of one graph per task; a node's features are its
    embedding and its label (one-hot for support, uniform ``1/N`` for query). Each of ``layers``
    rounds learns the edges from the current node features and passes messages; new features
    are concatenated to the old (dense connections, as in the paper). A last round maps every
    node to N class scores; the query nodes' are the logits. The label field is N wide, so the
    way is fixed by training."""

    def __init__(self, model, way, num_classes: Optional[int] = None, layers: int = 2,
                 hidden: int = 48, edge_hidden: int = 64):
        super().__init__(model, way, num_classes)
        if layers < 1 or hidden < 1 or edge_hidden < 1:
            raise ConfigError(f"algorithm.layers={layers}, hidden={hidden}, edge_hidden={edge_hidden}: "
                              f"each must be >= 1")
        width = model.out_dim + way
        self.edges, self.convs = nn.ModuleList(), nn.ModuleList()
        for _ in range(layers):
            self.edges.append(EdgeSimilarity(width, edge_hidden))
            self.convs.append(GraphConv(width, hidden))
            width += hidden
        self.out_edges, self.out_conv = EdgeSimilarity(width, edge_hidden), GraphConv(width, way)

    def forward(self, episode):
        if episode.way != self.way:
            raise ConfigError(f"episode.way={episode.way}: the gnn was trained on {self.way}-way graphs "
                              f"(its label features are way-sized); evaluate with episode.way={self.way}")
        zs, zq = self.embed_episode(episode)
        N = episode.way
        labels = torch.cat([F.one_hot(episode.support_labels, N).to(zs.dtype),
                            zq.new_full((*zq.shape[:2], N), 1.0 / N)], 1)
        x = torch.cat([torch.cat([zs, zq], 1), labels], -1)  # [T, V, D + N]
        for edge, conv in zip(self.edges, self.convs):
            x = torch.cat([x, F.leaky_relu(conv(x, edge(x)), 0.01)], -1)
        logits = self.out_conv(x, self.out_edges(x))[:, zs.shape[1]:].float()
        return self.loss(logits, episode.query_labels), logits
