"""Metric, graph, model-based and transfer algorithms against their definitions on small tensors
computed by hand; norm-layer replacements against torch's own layers; bad options refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.config import check_arguments
from metamm_cli.algorithms.finetune import head_logits
from metamm_cli.algorithms.functional import functional_norms
from metamm_cli.algorithms.matching import matching_log_probs
from metamm_cli.algorithms.protonet import cosine_similarity, euclidean, manhattan, squared_euclidean
from metamm_cli.algorithms.relation import class_sums, relation_pairs
from metamm_cli.algorithms.siamese import weighted_l1

A = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # [T=1, 2, D=2]
B = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]])  # [1, 3, 2]


def test_protonet_distances_by_hand():
    torch.testing.assert_close(squared_euclidean(A, B), torch.tensor([[[0.0, 2, 5], [25, 13, 20]]]))
    torch.testing.assert_close(euclidean(A, B)[0, 1], torch.tensor([5.0, 13 ** 0.5, 20 ** 0.5]))
    torch.testing.assert_close(manhattan(A, B), torch.tensor([[[0.0, 2, 3], [7, 5, 6]]]))
    cos = cosine_similarity(A[:, 1:], B[:, 1:])  # (3,4).(1,1)/(5 sqrt2), (3,4).(-1,2)/(5 sqrt5)
    torch.testing.assert_close(cos, torch.tensor([[[7 / (5 * 2 ** 0.5), 5 / (5 * 5 ** 0.5)]]]))


def test_matching_attention_by_hand():
    zs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    ys = torch.tensor([[0, 1, 1]])
    zq = torch.tensor([[[2.0, 0.0]]])
    cos = torch.tensor([1.0, 0.0, 2 ** -0.5])
    a = cos.exp() / cos.exp().sum()
    expected = torch.log(torch.stack([a[0], a[1] + a[2]]))
    torch.testing.assert_close(matching_log_probs(zs, ys, zq, 2)[0, 0], expected)
    a3 = (3 * cos).softmax(0)
    torch.testing.assert_close(matching_log_probs(zs, ys, zq, 2, scale=3.0)[0, 0],
                               torch.log(torch.stack([a3[0], a3[1] + a3[2]])))


def test_relation_pairs_and_class_sums_by_hand():
    zs = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    sums = class_sums(zs, torch.tensor([[0, 1, 0]]), 2)
    torch.testing.assert_close(sums, torch.tensor([[[6.0, 8.0], [3.0, 4.0]]]))
    pairs = relation_pairs(torch.tensor([[[9.0, 9.5]]]), sums)
    torch.testing.assert_close(pairs, torch.tensor([[[[9.0, 9.5, 6, 8], [9.0, 9.5, 3, 4]]]]))


def test_siamese_weighted_l1_and_best_support():
    alpha, bias = torch.tensor([2.0, -1.0]), torch.tensor(0.5)
    s = weighted_l1(A, B, alpha, bias)  # 2|a1-b1| - |a2-b2| + 0.5
    torch.testing.assert_close(s, torch.tensor([[[0.5, 1.5, 0.5], [2.5, 1.5, 6.5]]]))
    from metamm_cli.algorithms.siamese import Siamese

    class Identity(nn.Module):
        out_dim = 2

        def forward(self, inputs, present):
            return inputs["x"]

    algo = Siamese(Identity(), 2)
    with torch.no_grad():
        algo.alpha.copy_(alpha), algo.bias.copy_(bias)
    from metamm_cli.data.episodes import Episode
    ep = Episode({"x": B}, torch.ones(1, 3, 1, dtype=torch.bool), torch.tensor([[0, 1, 1]]),
                 {"x": A}, torch.ones(1, 2, 1, dtype=torch.bool), torch.tensor([[0, 1]]),
                 torch.tensor([[0, 1]]))
    loss, logits = algo(ep)  # class 1 scores the max of its two supports
    torch.testing.assert_close(logits, torch.tensor([[[0.5, 1.5], [2.5, 6.5]]]))
    bce = F.binary_cross_entropy_with_logits
    same = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    pos = bce(s[0][same.bool()], torch.ones(3))
    neg = bce(s[0][~same.bool()], torch.zeros(3))
    torch.testing.assert_close(loss, 0.5 * (pos + neg))


def test_gnn_edges_and_layer_by_hand():
    from metamm_cli.algorithms.gnn import EdgeSimilarity, GraphConv
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4)
    edge = EdgeSimilarity(4, 5)
    A_ = edge(x)[0]
    for i in range(3):  # softmax over j != i of MLP(|x_i - x_j|)
        s = torch.stack([edge.mlp((x[0, i] - x[0, j]).abs()).squeeze() for j in range(3) if j != i])
        torch.testing.assert_close(A_[i, [j for j in range(3) if j != i]], s.softmax(0))
        assert A_[i, i] == 0
    conv = GraphConv(4, 2)
    out = conv(x, A_[None])[0]
    torch.testing.assert_close(out, conv.linear(torch.cat([x[0], A_ @ x[0]], -1)))


def test_finetune_heads_by_hand():
    z = torch.tensor([[[3.0, 4.0]]])
    w = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    torch.testing.assert_close(head_logits(z, w, torch.tensor([[1.0, -1.0]]), "linear", 1.0),
                               torch.tensor([[[4.0, 7.0]]]))
    torch.testing.assert_close(head_logits(z, w, None, "cosine", 2.0), torch.tensor([[[1.2, 1.6]]]))


@pytest.mark.parametrize("layer, shape", [
    (nn.BatchNorm2d(3), (4, 3, 5, 5)), (nn.BatchNorm1d(3), (4, 3, 7)), (nn.LayerNorm(6), (4, 2, 6)),
    (nn.LayerNorm([2, 6]), (4, 2, 6)), (nn.GroupNorm(2, 4), (3, 4, 5)),
    (nn.InstanceNorm1d(3, affine=True), (2, 3, 8)), (nn.LayerNorm(6, elementwise_affine=False), (3, 6))])
def test_functional_norms_equal_torch_layers(layer, shape):
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(*shape, dtype=torch.float64)
    layer = layer.double().train()
    expected = layer(x)
    keys = set(k for k, _ in layer.named_parameters())
    swapped = functional_norms(nn.Sequential(layer))
    assert not isinstance(swapped[0], type(layer))
    assert set(k for k, _ in swapped[0].named_parameters()) == keys
    torch.testing.assert_close(swapped(x), expected)


@pytest.mark.parametrize("target, kwargs, needle", [
    ("protonet.ProtoNet", {"distance": "cosh"}, "algorithm.distance=cosh"),
    ("maml.MAML", {"inner_steps": 0}, "algorithm.inner_steps=0"),
    ("maml.MAML", {"inner_lr": -0.1}, "algorithm.inner_lr=-0.1"),
    ("maml.MAML", {"execution": "gpu"}, "algorithm.execution=gpu"),
    ("anil.ANIL", {"inner_steps_eval": 0}, "algorithm.inner_steps_eval=0"),
    ("metasgd.MetaSGD", {"inner_lr_range": [0.1, 0.0]}, "algorithm.inner_lr_range"),
    ("reptile.Reptile", {"inner_lr": 0}, "algorithm.inner_lr=0"),
    ("finetune.Finetune", {"finetune_epochs": 0}, "algorithm.finetune_epochs=0"),
    ("finetune.Finetune", {"batch_size": 0}, "algorithm.batch_size=0"),
    ("protonet.ProtoNet", {"bn_stats": "layer"}, "algorithm.bn_stats=layer"),
    ("finetune.Finetune", {"finetune_lr": 0}, "algorithm.finetune_lr=0"),
    ("finetune.Finetune", {"head": "mlp"}, "algorithm.head=mlp"),
    ("relation.RelationNet", {"loss": "hinge"}, "algorithm.loss=hinge"),
    ("matching.MatchingNet", {"fce_steps": 0}, "algorithm.fce_steps=0"),
    ("gnn.GNN", {"layers": 0}, "algorithm.layers=0"),
])
def test_bad_options_are_refused(target, kwargs, needle):
    import importlib
    module, cls = target.split(".")
    Algo = getattr(importlib.import_module(f"metamm_cli.algorithms.{module}"), cls)

    class Tiny(nn.Module):
        out_dim = 4

    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")) as err:
        check_arguments(Algo, kwargs, "algorithm")  # the declared ranges and choices, as the CLI checks them
        Algo(Tiny(), 3, num_classes=10, **kwargs)  # what the constructor checks itself
    assert "\n" not in str(err.value)


def test_gnn_graph_per_query_and_edge_mlp_by_hand():
    """One graph per query: the support nodes [z, onehot(y)] then that query's node [z, 1/N]; the
    edge MLP is a learned MLP minus the L1 distance (a soft nearest-neighbour graph at start)."""
    from metamm_cli.algorithms.gnn import EdgeMLP, graph_nodes
    zs, zq = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[5.0], [6.0], [7.0]]])
    x = graph_nodes(zs, torch.tensor([[1, 0]]), zq, 2)
    assert x.shape == (1, 3, 3, 3)
    for q in range(3):
        torch.testing.assert_close(x[0, q], torch.tensor([[1.0, 0, 1], [2.0, 1, 0], [5.0 + q, 0.5, 0.5]]))
    mlp = EdgeMLP(3, 4)
    d = torch.rand(5, 3)
    torch.testing.assert_close(mlp(d), mlp.net(d) - d.sum(-1, keepdim=True))
