"""Pre-training and its pieces: the minibatch sampler, the classification loss over every base
class by its definition, few-shot validation of the body, encoder.init's partial loading and its
report, finetune.train_batch, and the multistep schedule with Nesterov SGD (MetaOptNet's).
The pre-train -> meta-train path end to end: tests/test_benchmark_presets.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.runs.checkpoint import save_checkpoint
from metamm_cli.data.base import build_dataset
from metamm_cli.data.batches import BatchSampler
from metamm_cli.data.episodes import EpisodeSampler, SplitData
from metamm_cli.runs.pretrained import load_body
from metamm_cli.optim import make_optimizer, make_scheduler
from metamm_cli.runs.state import RunState

SMOKE = ["+exp=smoke", "dataset.modalities=[image]", "encoder.dim=8", "encoder.image.hidden=8"]


def split(n_classes=5, per=4):
    labels = torch.arange(n_classes).repeat_interleave(per)
    return SplitData({"x": torch.arange(len(labels)).float()[:, None]}, torch.ones(len(labels), 1, dtype=torch.bool),
                     labels, n_classes)


def test_minibatches_draw_without_replacement_with_class_ids_as_labels():
    d = split()
    s = BatchSampler(d, batch=6, tasks=2, seed=3)
    ep = s.sample()
    rows = ep.index.flatten()
    assert ep.query["x"].shape == (2, 6, 1) and ep.support["x"].shape == (2, 0, 1)
    assert len(set(rows.tolist())) == 12 and torch.equal(ep.query_labels, d.labels[ep.index])
    assert ep.way == 5 and torch.equal(ep.classes[0], torch.arange(5))
    s.reset()
    assert torch.equal(s.sample().index, ep.index)  # from the sampler's generator
    s.reset()
    assert torch.equal(s.sample(part=(1, 2)).index, ep.index[1:2])  # a rank's share of the same draw
    with pytest.raises(ConfigError, match=r"algorithm.batch_size=11 is out of range: 2 x 11 samples per step"):
        BatchSampler(d, batch=11, tasks=2)


def test_pretrain_trains_by_classification_and_validates_by_episodes():
    cfg = compose_cfg([*SMOKE, "algorithm=pretrain", "algorithm.batch_size=10"])
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    sampler = algo.train_sampler(cfg, dataset, "cpu", 1, 0)
    assert isinstance(sampler, BatchSampler)
    batch = sampler.sample()
    loss, logits = algo(batch)
    z = algo.model({m: x[0] for m, x in batch.query.items()}, batch.query_present[0])
    expected = F.cross_entropy(algo.classifier(z), batch.query_labels[0])
    assert torch.allclose(loss, expected, atol=1e-5) and logits.shape == (1, 10, dataset.num_classes("train"))
    algo.eval()
    episode = EpisodeSampler(dataset.split("val"), 3, 1, 2, tasks=2).sample()
    with torch.no_grad():
        _, eval_logits = algo(episode)
        zs, zq = algo.embed_episode(episode)
    protos = torch.stack([zs[:, episode.support_labels[0] == c].mean(1) for c in range(3)], 1)
    cosine = F.cosine_similarity(zq[:, :, None], protos[:, None], dim=-1)
    assert torch.allclose(eval_logits, algo.temperature * cosine, atol=1e-5)


def test_finetune_can_train_on_minibatches():
    cfg = compose_cfg([*SMOKE, "algorithm=finetune", "algorithm.train_batch=8"])
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    sampler = algo.train_sampler(cfg, dataset, "cpu", 1, 0)
    loss, logits = algo(sampler.sample())
    assert isinstance(sampler, BatchSampler) and torch.isfinite(loss) and logits.shape[1] == 8
    episodic = build_algorithm(compose_cfg([*SMOKE, "algorithm=finetune"]), dataset)
    assert isinstance(episodic.train_sampler(cfg, dataset, "cpu", 1, 0), EpisodeSampler)


def test_encoder_init_loads_what_fits_and_reports_it(tmp_path):
    source = build_algorithm(compose_cfg([*SMOKE, "algorithm=pretrain"]), ds := build_dataset(compose_cfg(SMOKE).dataset))
    state = RunState({"model": source}, EpisodeSampler(ds.split("train"), 3, 1, 1, 1), torch.device("cpu"))
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", state.state_dict({}))
    maml = build_algorithm(compose_cfg([*SMOKE, "algorithm=maml"]), ds)
    line = load_body(maml, str(tmp_path / "run"))
    for k, v in maml.model.encoders.state_dict().items():
        assert torch.equal(v, source.model.encoders.state_dict()[k]), k
    n = len(maml.model.encoders.state_dict())
    assert f"loaded {n} of this model's {n} encoder tensors" in line and "BatchNorm statistics" in line
    wider = build_algorithm(compose_cfg([*SMOKE, "algorithm=protonet", "encoder.image.hidden=4"]), ds)
    partly = load_body(wider, str(tmp_path / "run"))
    assert "of another shape left fresh" in partly
    other = build_algorithm(compose_cfg([*SMOKE, "encoder.dim=4", "encoder.image.hidden=4"]), ds)
    with pytest.raises(ConfigError, match=r"encoder.init=.*: no encoder tensor of .*best\.pt fits this model"):
        load_body(other, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"encoder.init .*nope: no such file"):
        load_body(other, str(tmp_path / "nope"))


def test_multistep_schedule_and_nesterov():
    cfg = compose_cfg(["trainer.optimizer=sgd", "trainer.momentum=0.9", "trainer.nesterov=true", "trainer.lr=0.1",
                       "trainer.scheduler=multistep", "trainer.milestones=[2,4]", "trainer.factors=[0.06,0.012]"])
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], cfg.trainer)
    sched = make_scheduler(opt, cfg.trainer)
    assert opt.param_groups[0]["nesterov"]
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.006, 0.006, 0.0012, 0.0012])
    from metamm_cli.config import check_ranges
    with pytest.raises(ConfigError, match="trainer.milestones=\\[2\\], trainer.factors=\\[\\]"):
        check_ranges(compose_cfg(["trainer.scheduler=multistep", "trainer.milestones=[2]"]))
    with pytest.raises(ConfigError, match="trainer.nesterov=true needs trainer.optimizer=sgd"):
        check_ranges(compose_cfg(["trainer.nesterov=true"]))
