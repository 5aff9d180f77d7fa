"""Few-shot learning with graph neural networks (Garcia & Bruna, ICLR 2018).

Reference code: github.com/vgsatorras/few-shot-gnn (``models/gnn_iclr.py``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms.base import MetaAlgorithm
from metamm_cli.algorithms.functional import upcast


def node_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over each node's features (no parameters; the same in train and
    eval). Stands in for the paper's batch norm, so that the embedding's scale does not decide
    what ``|x_i - x_j|`` tells the edge MLP."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class EdgeMLP(nn.Module):
    """``MLP(d) - sum(d)`` on ``d = |x_i - x_j|``: a learned MLP with a fixed negative-L1 skip, so
    the adjacency starts as a soft nearest-neighbour graph instead of uniform. From a uniform
    start the label-to-logit map and the edge MLP only receive gradient through each other and
    the GNN sat at chance for the first ~60 Adam steps (lr 1e-3)."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.LeakyReLU(0.01),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, 1))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return self.net(d) - d.sum(-1, keepdim=True)


class EdgeSimilarity(nn.Module):
    """Adjacency ``A_ij = softmax_j(MLP(|x_i - x_j|))`` over ``j != i``: ``[..., V, F] -> [..., V, V]``."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.mlp = EdgeMLP(features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.mlp((x[..., :, None, :] - x[..., None, :, :]).abs()).squeeze(-1)
        eye = torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
        return scores.masked_fill(eye, float("-inf")).softmax(-1)


class GraphConv(nn.Module):
    """One layer with the operator family ``{I, A}``: ``Linear([x, A x])``."""

    def __init__(self, features: int, out: int):
        super().__init__()
        self.linear = nn.Linear(2 * features, out)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, adjacency @ x], -1))


class GNN(MetaAlgorithm):
    """As in the paper's few-shot setting, every query gets its own graph: the N*K support
    samples plus that query, so queries never see each other. A node's features are its embedding
    (normalised to unit norm, the one-hot's scale: the label path starts as strong as the
    embedding's) and its label,
    one-hot for support and uniform ``1/N`` for the query. Each of ``layers`` rounds learns the
    edges from the current node features and passes messages (normalised, leaky ReLU); new
    features are concatenated to the old (dense connections). A last round maps every node to
    N class scores; the query node's are its logits. The label field is N wide, so the way is
    fixed by training."""

    def __init__(self, model, way, num_classes: Optional[int] = None, layers: int = 2,
                 hidden: int = 48, edge_hidden: int = 64, bn_stats: str = "task",
                 execution: str = "auto"):
        super().__init__(model, way, num_classes, bn_stats, execution)
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

    def fixed_way(self):
        return f"GNN's label features are {self.way}-way"

    def forward(self, episode):
        if episode.way != self.way:
            raise ConfigError(f"episode.way={episode.way}: the gnn was trained on {self.way}-way graphs "
                              f"(its label features are way-sized); evaluate with episode.way={self.way}")
        zs, zq = self.embed_episode(episode)
        scale = zs.shape[-1] ** -0.5  # unit-norm embedding, on the scale of the one-hot label
        x = graph_nodes(node_norm(zs) * scale, episode.support_labels, node_norm(zq) * scale, episode.way)
        for edge, conv in zip(self.edges, self.convs):
            x = torch.cat([x, F.leaky_relu(node_norm(conv(x, edge(x))), 0.01)], -1)
        logits = upcast(self.out_conv(x, self.out_edges(x))[..., -1, :])  # the query node: [T, Q, N]
        return self.loss(logits, episode.query_labels), logits


def graph_nodes(zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, way: int) -> torch.Tensor:
    """One graph per query: ``[T, S, D]``, ``[T, S]``, ``[T, Q, D]`` -> ``[T, Q, S + 1, D + N]``,
    support nodes ``[z, onehot(y)]`` then the query node ``[z, 1/N]``."""
    T, Q, D = zq.shape
    support = torch.cat([zs, F.one_hot(ys, way).to(zs.dtype)], -1)  # [T, S, D + N]
    query = torch.cat([zq, zq.new_full((T, Q, way), 1.0 / way)], -1)  # [T, Q, D + N]
    return torch.cat([support[:, None].expand(T, Q, *support.shape[1:]), query[:, :, None]], 2)
