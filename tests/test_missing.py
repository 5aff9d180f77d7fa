"""Missing modalities as a train and test axis: per-episode masks drawn at the configured rates,
never a sample's last modality, no data of a dropped modality reaching the model, masks fixed by
the seed; `metamm eval missing.test.<m>=p` and `eval.missing_sweep` through the real CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import compose_cfg, run_dir_of, run_metamm
from metamm_cli import ConfigError
from metamm_cli.config import check_ranges
from metamm_cli.data.episodes import EpisodeSampler, SplitData, drop_modalities, gather_modalities


def test_drop_rates_match_their_definition():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    present = torch.ones(n, 3, dtype=torch.bool)
    rates = torch.tensor([0.3, 0.6, 0.0])
    out = drop_modalities(present, rates, torch.rand(n, 6, generator=g))
    lacking = 1 - out.float().mean(0)
    assert torch.allclose(lacking, rates, atol=0.005)  # the third is never dropped: no rescue
    # P(drop image and audio) = 0.3 * 0.6, independently
    both = (~out[:, 0] & ~out[:, 1]).float().mean()
    assert abs(both - 0.18) < 0.005


def test_never_the_last_modality():
    g = torch.Generator().manual_seed(1)
    n = 50_000
    present = torch.rand(n, 3, generator=g) < 0.7
    present[~present.any(1), 0] = True
    out = drop_modalities(present, torch.tensor([1.0, 1.0, 1.0]), torch.rand(n, 6, generator=g))
    assert (out.sum(1) == 1).all()  # everything dropped but one survivor ...
    assert not (out & ~present).any()  # ... which the sample actually had
    # the survivor is uniform among the sample's own modalities
    full = present.all(1)
    share = out[full].float().mean(0)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)
    half = drop_modalities(present, torch.tensor([0.5, 0.0, 0.0]), torch.rand(n, 6, generator=g))
    alone = present[:, 0] & ~present[:, 1:].any(1)
    assert half[alone, 0].all()  # a sample with only the image keeps it at any rate


def toy_split(n_classes=6, per_class=10):
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    S = len(labels)
    data = {"image": (torch.arange(S, dtype=torch.uint8)[:, None, None, None] + 1).expand(S, 1, 2, 2).clone(),
            "audio": torch.arange(S, dtype=torch.float32)[:, None, None].expand(S, 1, 3) + 1,
            "tokens": torch.arange(S)[:, None].expand(S, 4) + 1}
    return SplitData(data, torch.ones(S, 3, dtype=torch.bool), labels, n_classes)


def test_sampler_masks_per_episode_and_no_leak():
    split = toy_split()
    s = EpisodeSampler(split, way=3, shot=2, query=3, tasks=400, seed=5,
                       missing={"image": 0.5, "tokens": 0.25})
    ep = s.sample()
    sp = torch.cat([ep.support_present, ep.query_present], 1)
    lack = 1 - sp.float().mean((0, 1))
    assert abs(lack[0] - 0.5) < 0.03 and lack[1] < lack[0] and abs(lack[2] - 0.25) < 0.03
    assert sp.any(-1).all()
    for part, pres in ((ep.support, ep.support_present), (ep.query, ep.query_present)):
        assert part["image"].dtype == torch.float32  # uint8 became float in [0, 1]
        for i, m in enumerate(["image", "audio", "tokens"]):
            x = part[m].reshape(*pres.shape[:2], -1)
            assert (x[~pres[..., i]] == 0).all() and (x[pres[..., i]] != 0).all()
    img = ep.support["image"][ep.support_present[..., 0]]
    assert torch.allclose(img * 255, img.mul(255).round())  # x / 255 of the stored bytes
    # fresh masks per episode, identical after a re-seed (eval.seed): same episodes, same masks
    again = s.sample()
    assert not torch.equal(again.query_present, ep.query_present)
    s.reset()
    first = s.sample()
    assert torch.equal(first.query_present, ep.query_present) and torch.equal(first.classes, ep.classes)


def test_rates_do_not_change_the_episodes_and_masks_nest():
    split = toy_split()
    eps = {r: [EpisodeSampler(split, 3, 1, 2, 50, seed=0, missing={"audio": r}).sample() for _ in range(1)]
           for r in (0.0, 0.3, 0.7)}
    assert torch.equal(eps[0.0][0].classes, eps[0.7][0].classes)
    assert torch.equal(eps[0.0][0].query_labels, eps[0.7][0].query_labels)
    kept3, kept7 = eps[0.3][0].query_present[..., 1], eps[0.7][0].query_present[..., 1]
    assert not (kept7 & ~kept3).any()  # missing at 0.3 => missing at 0.7


def test_bad_rates_and_names():
    with pytest.raises(ConfigError, match="missing.test.video: not a modality"):
        EpisodeSampler(toy_split(), 3, 1, 2, 1, split_name="val", missing={"video": 0.5})
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\]"):
        EpisodeSampler(toy_split(), 3, 1, 2, 1, missing={"audio": 1.5})
    out = gather_modalities({"a": torch.tensor([[3], [4]], dtype=torch.uint8)}, torch.tensor([1]))
    assert out["a"].dtype == torch.float32 and out["a"].item() == pytest.approx(4 / 255)


def test_eval_missing_rate_and_sweep_cli(smoke_run, tmp_path):
    run = smoke_run["run_dir"]
    common = ["--ckpt", run, "eval.episodes=20", "eval.tasks_per_batch=10"]
    proc = run_metamm(["eval", *common, "missing.test.audio=0.5", "eval.missing_sweep=[0,0.5,1]"],
                      tmp_path)
    assert "accuracy with modalities missing at each rate (all: every modality at once" in proc.stdout
    report = json.loads(next((tmp_path / "outputs" / "evals").glob("*/eval.json")).read_text())
    curves = report["missing_sweep"]
    assert list(curves) == ["all", "image", "audio", "tokens"]
    assert [pt["rate"] for pt in curves["audio"]] == [0.0, 0.5, 1.0]
    assert all({"accuracy", "ci95", "episodes"} <= set(pt) for c in curves.values() for pt in c)
    # every curve starts from the same episodes with nothing missing ...
    assert len({c[0]["accuracy"] for c in curves.values()}) == 1
    # ... and missing.test.audio=0.5 (the main result) is the sweep's audio point at 0.5
    assert report["accuracy"] == curves["audio"][1]["accuracy"]
    assert report["config"]["missing"]["test"] == {"audio": 0.5}
    assert f"{report['accuracy']:.2f} +- {report['ci95']:.2f}" in proc.stdout
    bad = run_metamm(["eval", *common, "missing.test.video=0.5"], tmp_path, check=False)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "metamm eval: error: missing.test.video: not a modality of the dataset; "
        "choose among ['image', 'audio', 'tokens'] (or all: every modality)")


def test_range_checks():
    for bad, says in (("missing.test.audio=2", "missing.test.audio=2.0 is out of range"),
                      ("missing.train.image=-0.1", "missing.train.image=-0.1 is out of range"),
                      ("eval.missing_sweep=[0,3]", "eval.missing_sweep: 3.0 is out of range")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            check_ranges(compose_cfg([bad]))
    check_ranges(compose_cfg(["missing.train.image=1", "eval.missing_sweep=[0,1]"]))


def test_train_with_modality_dropout_cli(tmp_path):
    proc = run_metamm(["train", "+exp=smoke", "missing.train.image=0.5", "missing.test.tokens=0.3",
                       "trainer.max_steps=2", "trainer.val_every=2"], tmp_path)
    assert "final validation accuracy" in proc.stdout
    cfg = (run_dir_of(proc) if run_dir_of(proc).is_absolute() else tmp_path / run_dir_of(proc)) / "config.yaml"
    assert "image: 0.5" in cfg.read_text()
