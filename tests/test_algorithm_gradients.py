"""Optimization-based algorithms: the batched (vmap) and looped meta-gradients equal a plain
per-task loop's (clone, inner SGD with create_graph=True, mean of query losses) in float64, for
every shipped encoder and fusion under MAML, the other algorithms with one fusion (modules are
enumerated from configs/ at test time, so one added later with a bad vmap batching rule fails
here); chunked and unchunked meta-gradients agree; Reptile's
update equals its formula."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, to_double
from hydra.utils import get_class, instantiate

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm, registered
from metamm_cli.algorithms.maml import meta_loss_loop
from metamm_cli.algorithms.reptile import reptile_loss
from metamm_cli.config import config_dir
from metamm_cli.data.base import SPLITS, MultimodalDataset
from metamm_cli.data.episodes import EpisodeSampler, ModalitySpec, SplitData

CONFIGS = Path(config_dir())
ENCODERS = sorted(f"encoder/{p.parent.name}={p.stem}" for p in CONFIGS.glob("encoder/*/*.yaml"))
FUSIONS = sorted(f"fusion={p.stem}" for p in CONFIGS.glob("fusion/*.yaml"))
# whose meta-loss is the adapted model's query loss (the per-task reference loop's): declared on the class
OPTIMIZATION = [n for n, c in registered().items() if c.inner_loop and c.query_meta_loss]
SMALL = ["encoder.dim=8", "encoder.image.hidden=8", "encoder.audio.hidden=8", "encoder.tokens.hidden=8",
         "dataset.image_size=8", "dataset.audio_length=32", "dataset.token_length=6"]


class TinyDataset(MultimodalDataset):
    """Modalities the synthetic set lacks (pen strokes, feature vectors), so every shipped
    encoder is checked; class-dependent random data."""

    name = "tiny"
    all_modalities = {"strokes": ModalitySpec((16, 3), torch.float32, "strokes"),
                      "vector": ModalitySpec((10,), torch.float32, "vector")}

    def build_split(self, split):
        g = torch.Generator().manual_seed(SPLITS.index(split))
        labels = torch.arange(4).repeat_interleave(6)
        data = {m: torch.randn(len(labels), *s.shape, generator=g) + labels.view(-1, *[1] * len(s.shape))
                for m, s in self.all_modalities.items()}
        return SplitData(data, torch.ones(len(labels), 2, dtype=torch.bool), labels, 4)


def setup(*overrides, tasks=3, double=True, seed=0):
    cfg = compose_cfg(["+exp=smoke", *SMALL, *overrides])
    torch.manual_seed(seed)
    modalities = list(cfg.dataset.modalities)
    tiny = set(modalities) <= set(TinyDataset.all_modalities)
    dataset = TinyDataset(modalities) if tiny else instantiate(cfg.dataset, _convert_="all")
    episode = EpisodeSampler(dataset.split("train"), cfg.episode.way, cfg.episode.shot,
                             cfg.episode.query, tasks, seed=seed).sample()
    algo = build_algorithm(cfg, dataset)
    return to_double(algo, episode) if double else (algo, episode)


def grads_of(algo, loss):
    params = [p for p in algo.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_same(a, b, rel=1e-6):
    """Per tensor, ||a - b|| <= rel * ||b||: float64 agrees to ~1e-12 except where a module
    computes in float32 on purpose (masked_softmax in the fusions: ~1e-8 of the largest
    gradient, seen on parameters whose true gradient is 0); the batching-rule
    bugs this guards against are 1e-2 off."""
    scale = max(y.norm() for y in b if y is not None)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert (x if y is None else y) is None or (x if y is None else y).abs().max() == 0
            continue
        assert (x - y).norm() <= rel * y.norm() + 1e-7 * scale, (x - y).norm() / y.norm()


# Every encoder and every fusion under second-order MAML (the strictest: every module is vmap'ed
# and differentiated twice), and every other optimization algorithm once with all modalities
# and the attention fusion: not the full cross product, which costs time and proves no more.
def fusion_level(override: str) -> str:
    """``Fusion.level`` of ``fusion=NAME`` (prototype-level fusions need a metric algorithm)."""
    target = compose_cfg([override]).fusion._target_
    return getattr(get_class(target), "level", "sample")


CASES = [("maml", m) for m in ENCODERS + FUSIONS] + [(a, "fusion=attention") for a in OPTIMIZATION if a != "maml"]


@pytest.mark.parametrize("algorithm,module", CASES)
def test_batched_meta_gradient_equals_per_task_loop(algorithm, module):
    """Two inner steps (second order except fomaml), vmap'ed over tasks, vs the reference loop."""
    extra = ["dataset.modalities=[image,audio,tokens]"]
    if module.startswith("encoder/"):
        modality = module.split("/")[1].split("=")[0]
        extra = [f"dataset.modalities=[{modality}]"]  # the encoder alone: nothing else hides it
        if module == "encoder/image=resnet12":  # at 16 px, narrow, dropout off: the two executions
            # draw different masks (tests/test_resnet12.py checks DropBlock under vmap)
            extra += ["~encoder.image.hidden", "encoder.image.widths=[4,4,4,8]", "dataset.image_size=16",
                      "encoder.image.drop_rate=0"]
    if module.startswith("fusion=") and fusion_level(module) == "prototype":  # am3, late
        with pytest.raises(ConfigError, match="works on prototypes"):
            setup(f"algorithm={algorithm}", module, *extra)
        return
    if module == "fusion=impute":  # its reconstruction loss is a term added to the meta-loss, not part of it
        extra = [*extra, "fusion.weight=0"]
    algo, ep = setup(f"algorithm={algorithm}", module, *extra, "algorithm.inner_steps=2",
                     "algorithm.execution=vmap")
    batched = grads_of(algo, algo(ep)[0])
    looped = grads_of(algo, meta_loss_loop(algo, ep))
    assert any(g is not None and g.abs().sum() > 0 for g in batched)
    assert_same(batched, looped)


@pytest.mark.parametrize("algorithm", OPTIMIZATION)
def test_loop_execution_equals_reference(algorithm):
    algo, ep = setup(f"algorithm={algorithm}", "fusion=attention", "algorithm.inner_steps=2",
                     "algorithm.execution=loop")
    assert_same(grads_of(algo, algo(ep)[0]), grads_of(algo, meta_loss_loop(algo, ep)))


def chunked_grads(algo, ep, chunk):
    """The trainer's rule: each chunk's mean loss weighted by its share of the meta-batch."""
    params = [p for p in algo.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, ep.num_tasks, chunk):
        part = ep.tasks(start, start + chunk)
        loss = algo(part)[0] * (part.num_tasks / ep.num_tasks)
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g
    return total


@pytest.mark.parametrize("algorithm", [n for n, c in registered().items() if c.inner_loop])
def test_chunked_equals_unchunked(algorithm):
    algo, ep = setup(f"algorithm={algorithm}", "algorithm.inner_steps=2", tasks=5)
    full = chunked_grads(algo, ep, 5)
    assert any(g.abs().sum() > 0 for g in full)
    assert_same(chunked_grads(algo, ep, 2), full)


def test_reptile_update_equals_formula():
    """grad of the meta-loss = theta - mean_t phi_t, phi_t = k SGD steps on task t's support."""
    algo, ep = setup("algorithm=reptile", "algorithm.inner_steps=3", "algorithm.inner_lr=0.05")
    loss, _ = algo(ep)
    names = [k for k, p in algo.net.named_parameters()]
    params = [p for p in algo.net.parameters()]
    grads = torch.autograd.grad(loss, params)
    phis = []
    for t in range(ep.num_tasks):  # plain autograd SGD, one task at a time
        clone = {k: p.detach().clone().requires_grad_() for k, p in zip(names, params)}
        for _ in range(3):
            out = torch.func.functional_call(algo.net, clone, ({m: x[t] for m, x in ep.support.items()},
                                                               ep.support_present[t]))
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(out, ep.support_labels[t]),
                                    list(clone.values()))
            clone = {k: (p - 0.05 * gi).detach().requires_grad_() for (k, p), gi in zip(clone.items(), g)}
        phis.append(clone)
    for k, p, g in zip(names, params, grads):
        phi_bar = torch.stack([phi[k] for phi in phis]).mean(0)
        torch.testing.assert_close(g, p.detach() - phi_bar.detach(), rtol=1e-9, atol=1e-12)
    theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    loss = reptile_loss(theta, {"w": torch.tensor([[0.0, 0.0], [2.0, 0.0]])})
    assert loss.item() == pytest.approx(0.5 * ((1 + 4) + (1 + 4)) / 2)
    (g,) = torch.autograd.grad(loss, theta["w"])
    torch.testing.assert_close(g, torch.tensor([0.0, 2.0]))  # theta - mean(phi) = [1,2] - [1,0]


ALGORITHMS = sorted(p.stem for p in CONFIGS.glob("algorithm/*.yaml"))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_in_float64(algorithm):
    """Forward and backward of a float64 model on a float64 episode stay float64 (no float32
    cast where ``upcast`` is meant), in training and in evaluation."""
    algo, ep = setup(f"algorithm={algorithm}", "dataset.modalities=[image,audio]", tasks=2)
    loss, logits = algo(ep)
    loss.backward()
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    grads = [p.grad for p in algo.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    if hasattr(algo, "inner_steps_eval"):
        algo.inner_steps_eval = 2  # Reptile's 50 test-time steps: slow on CPU
    algo.eval()
    with torch.no_grad():
        eval_loss, eval_logits = algo(ep)
    assert eval_logits.dtype == torch.float64
    assert loss.dtype == eval_loss.dtype == torch.float64


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_under_bf16_autocast(algorithm):
    algo, ep = setup(f"algorithm={algorithm}", "fusion=attention", tasks=2, double=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = algo(ep)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (2, ep.query_labels.shape[1], ep.way)
    if hasattr(algo, "inner_steps_eval"):
        algo.inner_steps_eval = 2  # Reptile's 50 test-time steps: slow on CPU
    algo.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(algo(ep)[1]).all()
