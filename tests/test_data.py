"""The synthetic dataset and the on-device episode sampler."""
from __future__ import annotations

import pytest
import torch

from metamm_cli import ConfigError
from metamm_cli.data.episodes import EpisodeSampler, SplitData
from metamm_cli.data.synthetic import SyntheticMultimodal


@pytest.fixture(scope="module")
def default_data():
    return SyntheticMultimodal()


def test_default_has_1000_plus_disjoint_classes(default_data):
    splits = {s: default_data.split(s) for s in ("train", "val", "test")}
    assert sum(d.num_classes for d in splits.values()) >= 1000
    assert [d.num_classes for d in splits.values()] == [1000, 216, 512]
    # codes are disjoint across splits: no val/test image equals a train glyph template
    t = default_data.templates["image"]
    assert t.shape[0] == 10 + 6 + 8
    assert len({tuple(row.flatten().round(decimals=4).tolist()) for row in t}) == 24


def test_deterministic_by_seed():
    a, b, c = (SyntheticMultimodal(codes={"train": 3, "val": 2, "test": 2}, seed=s, samples_per_class=4)
               for s in (1, 1, 2))
    for m in ("image", "audio", "tokens"):
        assert torch.equal(a.split("val").data[m], b.split("val").data[m])
        assert not torch.equal(a.split("val").data[m], c.split("val").data[m])


def test_each_modality_shows_one_latent_factor():
    """Class c = (image code, audio code, token code) = (c // 100, c // 10 % 10, c % 10): without
    noise, classes sharing a code look the same in that modality and differ where it differs."""
    d = SyntheticMultimodal(noise={"image": 0, "audio": 0, "tokens": 0}).split("train")
    first = {m: x[d.labels.unsqueeze(-1).eq(torch.arange(1000)).float().argmax(0)]
             for m, x in d.data.items()}  # the first sample of every class
    tokens = first["tokens"]
    assert torch.equal(tokens[0], tokens[10]) and torch.equal(tokens[0], tokens[990])
    assert not torch.equal(tokens[0], tokens[1])

    def xcorr(a, b):  # max normalised circular cross-correlation: blind to delay and gain
        a, b = a.flatten(), b.flatten()
        c = torch.fft.irfft(torch.fft.rfft(a) * torch.fft.rfft(b).conj(), n=a.numel())
        return (c.max() / (a.norm() * b.norm())).item()
    audio = first["audio"]
    assert xcorr(audio[0], audio[1]) > 0.999 and xcorr(audio[0], audio[901]) > 0.999
    assert max(xcorr(audio[0], audio[c]) for c in (10, 20, 555)) < 0.99

    x, labels = d.data["image"], d.labels
    mean = {c: x[labels == c].mean(0) for c in (0, 1, 99, 100, 555)}
    same = max((mean[0] - mean[c]).abs().mean() for c in (1, 99))
    assert same < min((mean[0] - mean[c]).abs().mean() for c in (100, 555))


def test_modality_subset_and_missing():
    ds = SyntheticMultimodal(modalities=["audio", "image"], samples_per_class=4,
                             codes={"train": 3, "val": 2, "test": 2})
    d = ds.split("train")
    assert list(d.data) == ["audio", "image"] and d.present.shape == (len(d.labels), 2)
    assert d.present.all()  # missing modalities are drawn per episode (tests/test_missing.py)
    with pytest.raises(ConfigError, match="missing.train.<modality>"):
        SyntheticMultimodal(missing={"image": 0.5})
    with pytest.raises(ConfigError, match="dataset.modalities"):
        SyntheticMultimodal(modalities=["image", "image"])


def test_sampler_episode_contract():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (300,), generator=g)  # unequal class sizes
    split = SplitData({"x": torch.arange(300.0)[:, None], "t": torch.arange(300)},
                      torch.ones(300, 1, dtype=torch.bool), labels, 12)
    sampler = EpisodeSampler(split, way=5, shot=2, query=3, tasks=7, seed=0)
    ep = sampler.sample()
    assert ep.support["x"].shape == (7, 10, 1) and ep.query["t"].shape == (7, 15)
    assert ep.support_present.shape == (7, 10, 1) and ep.classes.shape == (7, 5)
    assert ep.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for t in range(7):
        assert len(set(ep.classes[t].tolist())) == 5
        s, q = ep.support["t"][t], ep.query["t"][t]
        assert not set(s.tolist()) & set(q.tolist())  # support and query disjoint
        assert torch.equal(labels[s], ep.classes[t][ep.support_labels[t]])
        assert torch.equal(labels[q], ep.classes[t][ep.query_labels[t]])
        assert len(set(s.tolist()) | set(q.tolist())) == 25  # no sample drawn twice
    sampler.reset()
    assert torch.equal(sampler.sample().support["t"], ep.support["t"])  # re-seeded: same episodes
    assert ep.tasks(2, 4).num_tasks == 2


def test_sampler_rejects_impossible_episodes():
    split = SplitData({"x": torch.zeros(20, 1)}, torch.ones(20, 1, dtype=torch.bool),
                      torch.arange(4).repeat_interleave(5), 4)
    with pytest.raises(ConfigError, match="episode.way=5 .* 4 classes"):
        EpisodeSampler(split, way=5, shot=1, query=1, tasks=1)
    with pytest.raises(ConfigError, match="episode.shot\\+episode.query=6"):
        EpisodeSampler(split, way=2, shot=3, query=3, tasks=1)
