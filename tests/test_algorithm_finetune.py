"""The transfer baselines (Chen et al. 2019) against the paper's code
(github.com/wyharveychen/CloserLookFewShot: methods/baselinefinetune.py, methods/baselinetrain.py,
backbone.py distLinear), written out below one task at a time with torch's own SGD and weight
norm, in float64: metamm's batched fit of all tasks at once gives the same heads and logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from metamm_cli import ConfigError
from metamm_cli.config import check_arguments
from metamm_cli.algorithms.finetune import (DistLinear, Finetune, epoch_permutations, fit_head,
                                            head_logits, head_params_logits, init_head, paper_scale)
from metamm_cli.data.episodes import Episode


class PaperDistLinear(nn.Module):
    """backbone.py's distLinear (class_wise_learnable_norm=True), with torch's current WeightNorm."""

    def __init__(self, indim, outdim):
        super().__init__()
        self.L = weight_norm(nn.Linear(indim, outdim, bias=False), "weight", dim=0)
        self.scale_factor = 2 if outdim <= 200 else 10

    def forward(self, x):
        x_norm = torch.norm(x, p=2, dim=1).unsqueeze(1).expand_as(x)
        x_normalized = x.div(x_norm + 0.00001)
        return self.scale_factor * self.L(x_normalized)


def paper_head(head, dim, way, init):
    """The test head of baselinefinetune.py, with the given initial weights."""
    with torch.no_grad():
        if head == "linear":
            clf = nn.Linear(dim, way).double()
            clf.weight.copy_(init["weight"]), clf.bias.copy_(init["bias"])
        else:
            clf = PaperDistLinear(dim, way).double()
            clf.L.parametrizations.weight.original0.copy_(init["weight_g"][:, None])  # g
            clf.L.parametrizations.weight.original1.copy_(init["weight_v"])  # v
    return clf


def paper_fit(clf, z_support, y_support, rand_ids):
    """set_forward_adaptation's loop: 100 epochs (here len(rand_ids)) of batches of 4."""
    set_optimizer = torch.optim.SGD(clf.parameters(), lr=0.01, momentum=0.9, dampening=0.9,
                                    weight_decay=0.001)
    loss_function = nn.CrossEntropyLoss()
    batch_size, support_size = 4, len(y_support)
    for rand_id in rand_ids:
        for i in range(0, support_size, batch_size):
            set_optimizer.zero_grad()
            selected_id = rand_id[i: min(i + batch_size, support_size)]
            loss = loss_function(clf(z_support[selected_id]), y_support[selected_id])
            loss.backward()
            set_optimizer.step()
    return clf


def head_state(head, clf):
    if head == "linear":
        return {"weight": clf.weight, "bias": clf.bias}
    p = clf.L.parametrizations.weight
    return {"weight_g": p.original0[:, 0], "weight_v": p.original1}


class Identity(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.out_dim = dim

    def forward(self, inputs, present):
        return inputs["x"]


def tiny_episode(tasks, way, shot, query, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, way, dim, generator=g, dtype=torch.float64)
    ys = torch.stack([torch.randperm(way * shot, generator=g) % way for _ in range(tasks)])
    yq = torch.arange(way).repeat(query).expand(tasks, -1)

    def samples(labels):  # class centre plus unit noise
        noise = torch.randn(*labels.shape, dim, generator=g, dtype=torch.float64)
        return torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim)) + noise

    def present(n):
        return torch.ones(tasks, n, 1, dtype=torch.bool)
    return Episode({"x": samples(ys)}, present(way * shot), ys, {"x": samples(yq)}, present(way * query),
                   yq, torch.arange(way).expand(tasks, -1).contiguous())


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("way, shot", [(3, 2), (5, 1)])  # support of 6 (batches 4 + 2) and 5 (4 + 1)
def test_batched_fit_equals_paper_loop(head, way, shot):
    """Same initial weights, same per-task orders: metamm's fit of all tasks at once (Finetune in
    eval mode, end to end) gives the heads and query logits of the paper's per-task loop."""
    T, D = 3, 6
    ep = tiny_episode(T, way, shot, 2, D)
    algo = Finetune(Identity(D), way, num_classes=300, head=head).double().eval()
    with torch.no_grad():
        loss, logits = algo(ep)
    g = torch.Generator().manual_seed(0)  # Finetune.finetune's draws, in its order
    init = init_head(T, way, D, head, g, torch.float64, "cpu")
    perms = epoch_permutations(100, T, way * shot, g, "cpu")
    assert perms.shape == (100, T, way * shot)
    assert all(sorted(p.tolist()) == list(range(way * shot)) for p in perms.flatten(0, 1))
    assert not torch.equal(perms[:, 0], perms[:, 1])  # every task its own orders
    fitted = fit_head(init, ep.support["x"], ep.support_labels, perms, head, paper_scale(way))
    for t in range(T):
        clf = paper_fit(paper_head(head, D, way, {k: v[t] for k, v in init.items()}),
                        ep.support["x"][t], ep.support_labels[t], perms[:, t])
        for k, v in head_state(head, clf).items():
            torch.testing.assert_close(fitted[k][t], v.detach(), rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            expected = clf(ep.query["x"][t])
        torch.testing.assert_close(logits[t], expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(fitted[next(iter(fitted))], init[next(iter(init))])  # it trained
    assert loss.dtype == logits.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), ep.query_labels.flatten()))
    with torch.no_grad():  # a fresh generator per call: evaluation is reproducible
        torch.testing.assert_close(algo(ep)[1], logits, rtol=0, atol=0)


def test_init_head_is_default_linear_and_weight_norm():
    g = torch.Generator().manual_seed(1)
    lin = init_head(200, 5, 16, "linear", g, torch.float64, "cpu")
    bound = 16 ** -0.5  # nn.Linear: kaiming_uniform(a=sqrt(5)) and bias, both U(-1/sqrt(fan_in), +)
    for k in ("weight", "bias"):
        assert lin[k].abs().max() <= bound and lin[k].abs().max() > 0.95 * bound
        assert abs(lin[k].mean()) < 0.02
    cos = init_head(2, 5, 16, "cosine", g, torch.float64, "cpu")
    assert set(cos) == {"weight_g", "weight_v"} and cos["weight_v"].abs().max() <= bound
    lin16 = nn.Linear(16, 5, bias=False).double()
    with torch.no_grad():
        lin16.weight.copy_(cos["weight_v"][0])
    ref = weight_norm(lin16, "weight", dim=0)  # WeightNorm's initial g: each row's norm
    torch.testing.assert_close(cos["weight_g"][0], ref.parametrizations.weight.original0[:, 0])
    eye = torch.eye(16, dtype=torch.float64)  # unit inputs: the logits are v / (1 + 1e-5)
    first = {k: v[:1] for k, v in cos.items()}
    torch.testing.assert_close(head_params_logits(first, eye[None], "cosine", 1.0)[0],
                               eye @ cos["weight_v"][0].T / (1 + 1e-5))


def test_distlinear_equals_paper_and_scales():
    """The training head: distLinear's forward and gradients; the scale of each head from its own
    number of classes (4112 Omniglot classes: 10; a fresh 5-way test head: 2)."""
    torch.manual_seed(0)
    ours, ref = DistLinear(8, 250).double(), PaperDistLinear(8, 250).double()
    with torch.no_grad():
        ref.L.parametrizations.weight.original1.copy_(ours.weight_v)
        ref.L.parametrizations.weight.original0.copy_(ours.weight_v.norm(dim=1, keepdim=True))
    torch.testing.assert_close(ours.weight_g, ref.L.parametrizations.weight.original0)  # g = ||v|| at init
    with torch.no_grad():
        ours.weight_g.mul_(torch.rand(250, 1, dtype=torch.float64) + 0.5)
        ref.L.parametrizations.weight.original0.copy_(ours.weight_g)
    x = torch.randn(7, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(ours(x).sin().sum(), [ours.weight_g, ours.weight_v])
    g2 = torch.autograd.grad(ref(x).sin().sum(), [ref.L.parametrizations.weight.original0,
                                                  ref.L.parametrizations.weight.original1])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ours.scale == 10 and DistLinear(8, 200).scale == 2 and DistLinear(8, 5, scale=3.0).scale == 3
    assert (paper_scale(5), paper_scale(200), paper_scale(201), paper_scale(4112)) == (2, 2, 10, 10)
    algo = Finetune(Identity(4), 5, num_classes=4112, head="cosine")
    assert algo.classifier.scale == 10 and algo.test_scale(5) == 2 and algo.test_scale(300) == 10
    algo = Finetune(Identity(4), 5, num_classes=4112, head="cosine", scale=4.0)
    assert algo.classifier.scale == 4 and algo.test_scale(5) == 4
    lin = Finetune(Identity(4), 5, num_classes=64, head="linear").classifier
    assert isinstance(lin, nn.Linear) and lin.bias is not None and lin.bias.abs().max() == 0


def test_training_step_float64_and_global_classes():
    """Training: classification over all base classes by global id; float64 end to end."""
    ep = tiny_episode(2, 3, 2, 2, 4)
    ep.classes = torch.tensor([[7, 2, 9], [0, 5, 3]])
    for head in ("linear", "cosine"):
        algo = Finetune(Identity(4), 3, num_classes=10, head=head).double().train()
        loss, logits = algo(ep)
        z = torch.cat([ep.support["x"], ep.query["x"]], 1)
        full = algo.classifier(z)
        glob = torch.gather(ep.classes, 1, torch.cat([ep.support_labels, ep.query_labels], 1))
        torch.testing.assert_close(loss, F.cross_entropy(full.flatten(0, 1), glob.flatten()))
        torch.testing.assert_close(logits, torch.gather(full[:, 6:], 2, ep.classes[:, None].expand(-1, 6, -1)))
        loss.backward()
        assert loss.dtype == logits.dtype == torch.float64
        assert all(p.grad.dtype == torch.float64 for p in algo.classifier.parameters())


def test_cosine_checkpoint_without_learned_norm_loads_as_plain_cosine():
    algo = Finetune(Identity(3), 2, num_classes=4, head="cosine")
    old = {"classifier.weight": torch.randn(4, 3)}  # before the learned norm: keys of nn.Linear(bias=False)
    algo.load_state_dict(old)
    z = torch.randn(2, 5, 3)
    torch.testing.assert_close(algo.classifier(z), head_logits(z, old["classifier.weight"], None, "cosine", 2.0))
    assert set(algo.state_dict()) == {"classifier.weight_v", "classifier.weight_g"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"finetune_epochs": 0}, "algorithm.finetune_epochs=0"), ({"batch_size": 0}, "algorithm.batch_size=0"),
    ({"dampening": 1.5}, "algorithm.dampening=1.5"), ({"momentum": 1.0}, "algorithm.momentum=1.0"),
    ({"weight_decay": -1}, "algorithm.weight_decay=-1"), ({"scale": 0}, "algorithm.scale=0")])
def test_bad_finetune_options_are_refused(kwargs, needle):
    """Declared ranges on the constructor, checked by the one mechanism instantiate_checked uses."""
    with pytest.raises(ConfigError, match=needle):
        check_arguments(Finetune, kwargs, "algorithm")
