"""Algorithms against their definitions: ProtoNet's prototypes and distances, MAML's inner
SGD and its batched (vmap) meta-gradient against a plain per-task loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, to_double
from hydra.utils import instantiate

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.algorithms.maml import MAML, BatchStatNorm, meta_loss_loop, sgd_adapt
from metamm_cli.algorithms.protonet import prototypes, squared_euclidean
from metamm_cli.data.episodes import EpisodeSampler


def smoke_setup(*overrides, tasks=3, double=False):
    cfg = compose_cfg(["+exp=smoke", *overrides])
    torch.manual_seed(0)
    dataset = instantiate(cfg.dataset, _convert_="all")
    episode = EpisodeSampler(dataset.split("train"), cfg.episode.way, cfg.episode.shot,
                             cfg.episode.query, tasks).sample()
    algo = build_algorithm(cfg, dataset)
    return to_double(algo, episode) if double else (algo, episode)


def test_protonet_matches_definition():
    algo, ep = smoke_setup("episode.shot=2")
    algo.eval()
    loss, logits = algo(ep)
    with torch.no_grad():
        for t in range(ep.num_tasks):
            zs = algo.model({m: x[t] for m, x in ep.support.items()}, ep.support_present[t])
            zq = algo.model({m: x[t] for m, x in ep.query.items()}, ep.query_present[t])
            protos = torch.stack([zs[ep.support_labels[t] == c].mean(0) for c in range(ep.way)])
            expected = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
            torch.testing.assert_close(logits[t], expected, rtol=1e-4, atol=1e-4)
    assert torch.isclose(loss, F.cross_entropy(logits.flatten(0, 1), ep.query_labels.flatten()))


def test_prototype_and_distance_helpers():
    z = torch.randn(2, 6, 3)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    p = prototypes(z, labels, 3)
    torch.testing.assert_close(p[1, 2], z[1, :2].mean(0))
    q = torch.randn(2, 4, 3)
    torch.testing.assert_close(squared_euclidean(q, p), torch.cdist(q, p) ** 2, rtol=1e-4, atol=1e-5)


def test_sgd_adapt_on_a_quadratic():
    """theta - lr * grad, twice, for L = ||theta - c||^2 / 2: (theta - c)(1 - lr)^2 + c."""
    theta, c = torch.randn(5, requires_grad=True), torch.randn(5)
    fast = sgd_adapt(lambda p: 0.5 * ((p["w"] - c) ** 2).sum(), {"w": theta}, lr=0.3, steps=2)
    torch.testing.assert_close(fast["w"], (theta - c) * 0.49 + c)
    (g,) = torch.autograd.grad(fast["w"].sum(), theta)  # second order: d fast / d theta = 0.49
    torch.testing.assert_close(g, torch.full((5,), 0.49))
    fo = sgd_adapt(lambda p: 0.5 * ((p["w"] - c) ** 2).sum(), {"w": theta}, 0.3, 2, first_order=True)
    (g,) = torch.autograd.grad(fo["w"].sum(), theta)  # first order: gradients stopped -> identity
    torch.testing.assert_close(g, torch.ones(5))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("head", ["learned", "zero"])
def test_batched_maml_gradient_equals_per_task_loop(first_order, head):
    algo, ep = smoke_setup("algorithm=maml", f"algorithm.first_order={first_order}",
                           f"algorithm.head={head}", "algorithm.inner_steps=2", double=True)
    params = [p for p in algo.parameters() if p.requires_grad]
    loss, logits = algo(ep)
    batched = torch.autograd.grad(loss, params)
    looped = torch.autograd.grad(meta_loss_loop(algo, ep), params)
    assert logits.shape == (ep.num_tasks, ep.query_labels.shape[1], ep.way)
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in batched)


def test_maml_adapts_and_uses_eval_steps():
    algo, ep = smoke_setup("algorithm=maml", "algorithm.inner_steps=1", "algorithm.inner_steps_eval=5")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in algo.modules())
    assert any(isinstance(m, BatchStatNorm) for m in algo.modules())
    algo.train()
    train_logits = algo(ep)[1]
    algo.eval()
    with torch.no_grad():  # inner-loop gradients still flow under no_grad
        eval_logits = algo(ep)[1]
        algo.inner_steps_eval = 1
        one_step = algo(ep)[1]
    torch.testing.assert_close(one_step, train_logits.detach())
    assert not torch.allclose(eval_logits, one_step)


def test_maml_learned_head_fixes_way():
    algo, ep = smoke_setup("algorithm=maml")
    assert isinstance(algo, MAML)
    algo.way = ep.way + 1
    with pytest.raises(ConfigError, match="algorithm.head=zero"):
        algo(ep)
