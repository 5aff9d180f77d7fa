"""BatchNorm statistics of the metric algorithms (``algorithm.bn_stats``) against their definition,
in float64: with ``task`` a meta-batch embedded in one call gives the values, gradients and
running statistics of embedding its tasks one after another with torch's own BatchNorm; with
``batch`` it is torch's BatchNorm over the whole meta-batch (the former behaviour)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_algorithm_gradients import assert_same, chunked_grads, grads_of, setup
from torch import nn

from metamm_cli import ConfigError
from metamm_cli.algorithms import registered
from metamm_cli.algorithms.functional import (TaskBatchNorm1d, TaskBatchNorm2d, sequential_running_stats,
                                              task_groups, task_norms)
from metamm_cli.algorithms.protonet import ProtoNet

# declared on the class; align embeds twice per step (logits and its loss): test_align_embeds_per_task
METRIC = [n for n, c in registered().items() if c.task_batchnorm and c.family != "cross-modal"]
BN_MODALITIES = "dataset.modalities=[image,audio]"  # conv4 (BatchNorm2d) and conv1d (BatchNorm1d)


def running_stats(module):
    return {k: v for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def assert_same_running_stats(a, b, rtol=1e-12, atol=1e-14):
    sa, sb = running_stats(a), running_stats(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def pair(*overrides, tasks=3, double=True, execution="batch"):
    """The algorithm with ``bn_stats=task`` (embedding the meta-batch in one call, or with
    ``execution=loop`` one task at a time) and the same weights under ``bn_stats=batch``."""
    algo, ep = setup(*overrides, BN_MODALITIES, f"algorithm.execution={execution}", tasks=tasks, double=double)
    ref, _ = setup(*overrides, BN_MODALITIES, "algorithm.bn_stats=batch", tasks=tasks, double=double)
    ref.load_state_dict(algo.state_dict())  # same state-dict keys in both modes
    assert algo.bn_stats == "task" and ref.bn_stats == "batch"
    assert any(isinstance(m, (TaskBatchNorm1d, TaskBatchNorm2d)) for m in algo.modules())
    return algo.train(), ref.train(), ep


@pytest.mark.parametrize("execution", ["batch", "loop"])
@pytest.mark.parametrize("algorithm, extra", [(a, ()) for a in METRIC] + [("protonet", ("fusion=am3",))])
def test_task_statistics_equal_one_task_at_a_time(algorithm, extra, execution):
    """One call on T tasks (``execution=batch``), or the loop over tasks (``loop``, what ``auto``
    picks on the CPU) == T calls of torch's BatchNorm, one task each: logits, loss (the mean of
    the per-task losses), gradients of every parameter, running statistics."""
    # am3's episode_logits casts the features to float32 (fusion.py): float32 there
    algo, ref, ep = pair(f"algorithm={algorithm}", *extra, double=not extra, execution=execution)
    loss, logits = algo(ep)
    outs = [ref(ep.tasks(t, t + 1)) for t in range(ep.num_tasks)]
    tol = dict(rtol=1e-5, atol=1e-5) if extra else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, torch.cat([o[1] for o in outs]), **tol)
    ref_loss = torch.stack([o[0] for o in outs]).mean()
    torch.testing.assert_close(loss, ref_loss, **tol)
    mine, theirs = grads_of(algo, loss), grads_of(ref, ref_loss)
    if extra:  # float32: each gradient within 1e-5 of the largest
        scale = max(g.abs().max() for g in theirs if g is not None)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(scale))
    else:
        assert_same(mine, theirs)
    assert_same_running_stats(algo, ref, **tol)
    whole, _ = setup(f"algorithm={algorithm}", *extra, BN_MODALITIES, "algorithm.bn_stats=batch",
                     tasks=3, double=not extra)
    whole.load_state_dict(copy.deepcopy(algo.state_dict()))
    assert not torch.allclose(whole.train()(ep)[1], logits)  # the modes differ while training
    algo.eval(), ref.eval()
    with torch.no_grad():  # eval: running statistics, the same in both modes
        torch.testing.assert_close(algo(ep)[1], ref(ep)[1], **tol)


def test_task_statistics_make_task_chunks_exact():
    """trainer.task_chunk: with per-task statistics a chunked meta-batch has the gradients of the
    whole one (with statistics over the meta-batch it does not)."""
    algo, ref, ep = pair("algorithm=protonet", tasks=4)
    assert_same(chunked_grads(algo, ep, 2), chunked_grads(algo, ep, 4))
    whole, chunked = chunked_grads(ref, ep, 4), chunked_grads(ref, ep, 2)
    assert max((a - b).abs().max() for a, b in zip(whole, chunked)) > 1e-6


def test_align_embeds_per_task():
    algo, ref, ep = pair("algorithm=align", "fusion=mean", "mapping=linear")
    _, logits = algo(ep)
    torch.testing.assert_close(logits, torch.cat([ref(ep.tasks(t, t + 1))[1] for t in range(3)]),
                               rtol=1e-10, atol=1e-12)


def test_batch_mode_is_torch_batchnorm_over_the_meta_batch():
    """bn_stats=batch: the modules stay nn.BatchNorm*d and the meta-batch is one flat batch."""
    algo, ep = setup("algorithm=protonet", BN_MODALITIES, "algorithm.bn_stats=batch")
    bns = [m for m in algo.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in bns)
    plain = copy.deepcopy(algo.model)
    zs, zq = algo.train().embed_episode(ep)
    nk = ep.support_labels.shape[1]
    inputs = {m: torch.cat([ep.support[m], ep.query[m]], 1).flatten(0, 1) for m in ep.support}
    present = torch.cat([ep.support_present, ep.query_present], 1).flatten(0, 1)
    z = plain.train()(inputs, present).view(ep.num_tasks, -1, zs.shape[-1])
    torch.testing.assert_close(zs, z[:, :nk], rtol=0, atol=0)
    torch.testing.assert_close(zq, z[:, nk:], rtol=0, atol=0)
    assert_same_running_stats(algo.model, plain)


LAYERS = [(nn.BatchNorm1d(3), (4, 3)), (nn.BatchNorm1d(3), (4, 3, 6)), (nn.BatchNorm2d(3), (4, 3, 5, 5)),
          (nn.BatchNorm3d(2), (3, 2, 3, 3, 2)), (nn.BatchNorm2d(3, momentum=None), (4, 3, 4, 4)),
          (nn.BatchNorm2d(3, affine=False), (4, 3, 4, 4)),
          (nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 4, 4))]


@pytest.mark.parametrize("one_call", [False, True])  # per-slice calls (CPU) | one call (GPU)
@pytest.mark.parametrize("layer, shape", LAYERS)
def test_task_batchnorm_layer_equals_per_task_layer(layer, shape, one_call):
    """One layer, G = 3 groups: values, input and weight gradients, running statistics (momentum
    0.1 and cumulative), after two calls; eval mode as torch's."""
    torch.manual_seed(0)
    layer = layer.double()
    for p in layer.parameters():
        nn.init.normal_(p)
    G = 3
    ours = task_norms(nn.Sequential(copy.deepcopy(layer)))
    ours[0].one_call = one_call
    assert isinstance(ours[0], type(layer)) and type(ours[0]) is not type(layer)
    assert ours.state_dict().keys() == nn.Sequential(layer).state_dict().keys()
    for call in range(2):
        x = torch.randn(G * shape[0], *shape[1:], dtype=torch.float64, requires_grad=True)
        with task_groups(ours, G):
            y = ours(x)
        w = torch.randn_like(y)
        expected = torch.cat([layer(xg) for xg in x.chunk(G)])
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        params = [x, *layer.parameters()]
        mine = torch.autograd.grad((y * w).sum(), [x, *ours.parameters()])
        theirs = torch.autograd.grad((expected * w).sum(), params)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        if layer.track_running_stats:
            assert_same_running_stats(ours[0], layer)
    assert ours[0].groups == 1  # the context restores the count
    ours.eval(), layer.eval()
    x = torch.randn(G * shape[0], *shape[1:], dtype=torch.float64)
    with task_groups(ours, G):
        y = ours(x)
    expected = layer(x) if layer.track_running_stats else torch.cat([layer(xg) for xg in x.chunk(G)])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    with task_groups(ours, 5), pytest.raises(ValueError, match="5 equal task groups"):
        ours.train()(torch.randn(G * shape[0], *shape[1:], dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_sequential_running_stats_closed_form(momentum):
    running, stats = torch.randn(4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    expected, n = running.clone(), 7
    for s in stats:  # torch's BatchNorm update, one batch at a time
        n += 1
        m = 1 / n if momentum is None else momentum
        expected = (1 - m) * expected + m * s
    torch.testing.assert_close(sequential_running_stats(running, stats, momentum, tracked=7), expected)


def test_bad_bn_stats_are_refused():
    class Tiny(nn.Module):
        out_dim = 4

    with pytest.raises(ConfigError, match="algorithm.bn_stats=layer"):
        ProtoNet(Tiny(), 3, bn_stats="layer")
    sync = nn.Module()
    sync.out_dim, sync.norm = 4, nn.SyncBatchNorm(4)
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        ProtoNet(sync, 3)
    assert ProtoNet(sync, 3, bn_stats="batch").bn_stats == "batch"
