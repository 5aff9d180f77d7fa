"""Layout of the embedding network (``trainer.memory_format``, ``trainer.embed_chunk``) against
its definition, in float64: channels-last weights and inputs, and batches run in pieces with
BatchNorm over the whole batch, give the losses, gradients and running statistics of the plain
contiguous whole-batch network (ProtoNet with ``bn_stats=task`` and ``batch``, second-order
MAML, finetune); the start-up measurement is cached; the trainer applies, records and keeps it."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SMOKE, run_dir_of, run_metamm
from test_algorithm_bn_stats import BN_MODALITIES, assert_same_running_stats
from test_algorithm_gradients import assert_same, grads_of, setup
from torch import nn

from metamm_cli.models import memory_format
from metamm_cli.models.chunked import ChunkedSequential, make_chunkable, set_chunk
from metamm_cli.models.encoders import _block
from metamm_cli.models.memory_format import apply_layout, choose, match_state_layout


def conv_net(bn=nn.BatchNorm2d, conv=nn.Conv2d, pool=nn.MaxPool2d):
    return nn.Sequential(_block(conv, pool, bn, 1, 4, 3), _block(conv, pool, bn, 4, 5, 3)).double()


@pytest.mark.parametrize("dims", [2, 1])
@pytest.mark.parametrize("twice", [False, True])
def test_pieces_equal_one_call(dims, twice):
    """A ChunkedSequential in pieces of 7 (uneven: 50 = 7 x 7 + 1) == one call of the same layers:
    outputs, gradients (and, with ``twice``, gradients of gradients: the plain-op path), running
    statistics (two training calls), and eval mode."""
    kinds = (nn.BatchNorm2d, nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.BatchNorm1d, nn.Conv1d, nn.MaxPool1d)
    torch.manual_seed(0)
    ref = conv_net(*kinds)
    mine = make_chunkable(copy.deepcopy(ref))
    assert isinstance(mine, ChunkedSequential)
    set_chunk(mine, 7, twice)
    x = torch.randn(50, 1, *([12, 12] if dims == 2 else [24]), dtype=torch.double)
    for _ in range(2):
        out, want = mine(x), ref(x)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        loss, ref_loss = out.pow(2).sum(), want.pow(2).sum()
        g = torch.autograd.grad(loss, list(mine.parameters()), create_graph=twice)
        h = torch.autograd.grad(ref_loss, list(ref.parameters()), create_graph=twice)
        assert_same(g, h, rel=1e-9)
        if twice:
            assert_same(torch.autograd.grad(sum(t.pow(2).sum() for t in g), list(mine.parameters())),
                        torch.autograd.grad(sum(t.pow(2).sum() for t in h), list(ref.parameters())), rel=1e-8)
    assert_same_running_stats(mine, ref)
    mine.eval(), ref.eval()
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-10, atol=1e-12)


def test_papers_block_order_is_the_same_function():
    """conv-BN-pool-ReLU (metamm's block) == conv-BN-ReLU-pool (the papers'): values and
    gradients bit for bit, the same state-dict keys."""
    torch.manual_seed(0)
    mine = conv_net()
    papers = copy.deepcopy(mine)
    for block in papers:
        block[2], block[3] = block[3], block[2]
    assert isinstance(papers[0][2], nn.ReLU) and isinstance(mine[0][2], nn.MaxPool2d)
    assert mine.state_dict().keys() == papers.state_dict().keys()
    x = torch.randn(9, 1, 12, 12, dtype=torch.double)
    a, b = mine(x), papers(x)
    assert torch.equal(a, b)
    for u, v in zip(torch.autograd.grad(a.sum(), list(mine.parameters())),
                    torch.autograd.grad(b.sum(), list(papers.parameters()))):
        assert torch.equal(u, v)


CASES = [("algorithm=protonet", "algorithm.execution=loop"), ("algorithm=protonet", "algorithm.execution=batch"),
         ("algorithm=protonet", "algorithm.bn_stats=batch"), ("algorithm=maml",),
         ("algorithm=finetune",)]


@pytest.mark.parametrize("fmt, chunk", [("channels_last", 0), ("contiguous", 5), ("channels_last", 5)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(o.split("=")[1] for o in c))
def test_layout_keeps_the_maths(case, fmt, chunk):
    """The algorithm with a layout == without: loss, logits, gradients of every parameter and
    running statistics (float64; MAML second order, whose pieces use the plain-op statistics)."""
    algo, ep = setup(*case, BN_MODALITIES, tasks=3)
    ref = copy.deepcopy(algo)
    apply_layout(algo, fmt, chunk, algo.differentiates_twice)
    if fmt == "channels_last":
        conv = next(m for m in algo.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    algo.train(), ref.train()
    loss, logits = algo(ep)
    ref_loss, ref_logits = ref(ep)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_same(grads_of(algo, loss), grads_of(ref, ref_loss), rel=1e-9)
    if any(k.endswith("running_mean") for k in ref.state_dict()):
        assert_same_running_stats(algo, ref, rtol=1e-10, atol=1e-12)


def test_optimizer_state_takes_the_parameters_layout():
    """Adam's state saved with channels-last weights, loaded beside contiguous ones (a resume on
    another machine): each moment takes its parameter's layout and the step runs."""
    cl = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(cl.parameters())
    cl(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    plain = nn.Conv2d(3, 4, 3)
    plain.load_state_dict(cl.state_dict())
    opt2 = torch.optim.Adam(plain.parameters())
    opt2.load_state_dict(opt.state_dict())
    match_state_layout(opt2)
    for p in plain.parameters():
        for v in opt2.state[p].values():
            if v.shape == p.shape:
                assert v.stride() == p.stride()
    torch.testing.assert_close(opt2.state[plain.weight]["exp_avg"], opt.state[cl.weight]["exp_avg"])
    plain(torch.randn(2, 3, 5, 5)).sum().backward()
    opt2.step()


def test_measurement_is_cached(tmp_path, monkeypatch):
    """auto measures once per network and call size, writes the cache, then reads it; set values
    are taken as they are; the measured copy leaves the model and the random state alone."""
    monkeypatch.setenv("METAMM_LAYOUT_CACHE", str(tmp_path / "layout.json"))
    algo, ep = setup("algorithm=protonet", BN_MODALITIES, tasks=1, double=False)
    cfg = setup.__globals__["compose_cfg"](["+exp=smoke"])
    before = copy.deepcopy(algo.state_dict())
    rng = torch.get_rng_state()
    found = choose(cfg, algo.model, {m: s for m, s in algo_specs(ep).items()}, 12, torch.device("cpu"), False)
    assert found["memory_format"] in ("contiguous", "channels_last") and found["embed_chunk"] in (0, 16, 32, 64)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in algo.state_dict().items():
        assert torch.equal(v, before[k]), k
    cached = json.loads((tmp_path / "layout.json").read_text())
    assert len(cached) == 1 and "ms" in next(iter(cached.values()))
    monkeypatch.setattr(memory_format, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert choose(cfg, algo.model, algo_specs(ep), 12, torch.device("cpu"), False) == found
    set_cfg = setup.__globals__["compose_cfg"](["+exp=smoke", "trainer.memory_format=channels_last",
                                                "trainer.embed_chunk=4"])
    assert choose(set_cfg, algo.model, algo_specs(ep), 12, torch.device("cpu"), False) == \
        {"memory_format": "channels_last", "embed_chunk": 4}


def algo_specs(ep):
    from metamm_cli.data.episodes import ModalitySpec

    return {m: ModalitySpec(tuple(x.shape[2:]), x.dtype, m, vocab=32 if not x.is_floating_point() else None)
            for m, x in ep.support.items()}


def test_cli_applies_records_and_resumes_the_layout(tmp_path):
    """The trainer applies a set layout (said on the start-up line), records it in the checkpoint,
    and a resumed run with auto keeps it; a bad value is one line naming the key."""
    proc = run_metamm(["train", *SMOKE, "trainer.memory_format=channels_last", "trainer.embed_chunk=5"], tmp_path)
    assert "channels_last, pieces of 5" in proc.stderr + proc.stdout
    run = tmp_path / run_dir_of(proc)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["layout"] == {"memory_format": "channels_last", "embed_chunk": 5}
    again = run_metamm(["train", *SMOKE, "trainer.max_steps=12", f"trainer.resume={run}"], tmp_path)
    assert "channels_last, pieces of 5" in again.stderr + again.stdout
    bad = run_metamm(["train", *SMOKE, "trainer.memory_format=nhwc"], tmp_path, check=False)
    assert bad.returncode != 0 and "trainer.memory_format" in bad.stderr and "Traceback" not in bad.stderr
    assert "channels_last" in bad.stderr
