"""Shared space across modalities: cross-modal episodes (presence-mask restriction), the
contrastive alignment (InfoNCE), retrieval metrics against hand-computed values, and the CLI
paths: cross-modal training + eval, retrieval eval, one-line errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE, compose_cfg, run_dir_of, run_metamm
from test_errors import assert_one_line_error

from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.crossmodal import Alignment, info_nce, modality_mask, restrict
from metamm_cli.data.episodes import EpisodeSampler, SplitData
from metamm_cli.data.synthetic import SyntheticMultimodal
from metamm_cli.models.fusion import Mean
from metamm_cli.models.net import MultimodalNet
from metamm_cli.retrieval import ranking_metrics, retrieval

MODS = ["image", "audio", "tokens"]


def small_dataset():
    return SyntheticMultimodal(codes={"train": 2, "val": 2, "test": 2}, samples_per_class=6,
                               )


def test_restriction_ands_the_presence_masks():
    split = small_dataset().split("train")
    episode = EpisodeSampler(split, 3, 2, 2, tasks=4).sample()
    keep_s, keep_q = modality_mask(["image"], MODS, "k"), modality_mask(["audio", "tokens"], MODS, "k")
    out = restrict(episode, keep_s, keep_q)
    assert torch.equal(out.support_present, episode.support_present & torch.tensor([True, False, False]))
    assert torch.equal(out.query_present, episode.query_present & torch.tensor([False, True, True]))
    assert not out.support_present[..., 1:].any() and not out.query_present[..., 0].any()
    assert out.support is episode.support and torch.equal(out.query_labels, episode.query_labels)
    assert restrict(episode, None, None) is episode
    with pytest.raises(ConfigError, match=r"episode.support_modalities=\['smell'\]"):
        modality_mask(["smell"], MODS, "episode.support_modalities")


def test_info_nce_matches_its_definition():
    torch.manual_seed(0)
    za, zb = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    valid = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]).bool()
    scale = torch.tensor(3.0)
    total, n = 0.0, 0
    for t in range(2):
        idx = [i for i in range(5) if valid[t, i]]
        a, b = F.normalize(za[t, idx], dim=-1), F.normalize(zb[t, idx], dim=-1)
        sim = scale * a @ b.T
        for k in range(len(idx)):
            l_ab = -math.log(math.exp(sim[k, k]) / sum(math.exp(sim[k, j]) for j in range(len(idx))))
            l_ba = -math.log(math.exp(sim[k, k]) / sum(math.exp(sim[j, k]) for j in range(len(idx))))
            total += (l_ab + l_ba) / 2
            n += 1
    assert abs(info_nce(za, zb, valid, scale).item() - total / n) < 1e-5


def test_alignment_term_is_added_with_its_weight_and_learns_its_temperature():
    torch.manual_seed(0)
    dataset = small_dataset()
    episode = EpisodeSampler(dataset.split("train"), 3, 2, 2, tasks=2).sample()
    base = build_algorithm(compose_cfg([*SMOKE, "fusion=mean", "mapping=linear"]), dataset)
    torch.manual_seed(0)
    algo = build_algorithm(compose_cfg([*SMOKE, "fusion=mean", "mapping=linear", "align.weight=0.5",
                                        "align.temperature=0.1"]), dataset)
    assert isinstance(algo.alignment, Alignment)
    assert abs(algo.alignment.log_scale.item() - math.log(10)) < 1e-6
    assert "alignment.log_scale" in dict(algo.named_parameters())
    algo.load_state_dict(base.state_dict(), strict=False)
    plain, _ = base(episode)
    loss, _ = algo(episode)
    inputs, present = episode.samples()  # the alignment's BatchNorm statistics are per task too
    extra = algo.alignment(algo.encode_modalities(inputs, present), present)
    torch.testing.assert_close(loss, plain + 0.5 * extra)
    loss.backward()
    assert algo.alignment.log_scale.grad is not None and algo.alignment.log_scale.grad != 0


def test_ranking_metrics_by_hand():
    dist = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.2, 0.1, 0.0]])
    rel = torch.tensor([[False, True, False, True], [True, False, False, False]])
    m = ranking_metrics(dist, rel, ks=(1, 2, 3))
    # query 0: ranking 0,2,1,3 -> relevant at ranks 3 and 4: AP = (1/3 + 2/4) / 2
    # query 1: ranking 3,2,1,0 -> relevant at rank 4: AP = 1/4
    torch.testing.assert_close(m["ap"], torch.tensor([(1 / 3 + 2 / 4) / 2, 1 / 4]))
    torch.testing.assert_close(m["recall@1"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(m["recall@3"], torch.tensor([1.0, 0.0]))


def test_retrieval_on_hand_made_embeddings():
    # 4 samples, classes 0,0,1,1; 2-d vectors used as they are (identity encoders, mean fusion)
    image = torch.tensor([[0., 0.], [1., 0.], [10., 0.], [11., 0.]])
    audio = torch.tensor([[1., 0.], [1.2, 0.], [11., 0.], [10.5, 0.]])
    present = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]]).bool()  # sample 3 lacks audio
    split = SplitData({"image": image, "audio": audio}, present, torch.tensor([0, 0, 1, 1]), 2)
    net = MultimodalNet({"image": torch.nn.Identity(), "audio": torch.nn.Identity()}, Mean(["image", "audio"], 2))

    class Algo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = net

    r = retrieval(Algo(), split, "audio", "image")
    assert r["queries"] == 3 and r["gallery"] == 4
    # audio q0=(1,0): image ranking 1,0,2,3; q1=(1.2,0): 1,0,2,3; q2=(11,0): 3,2,1,0
    # by class: every query's first item is of its class -> R@1 = 100; APs: 1, 1, 1
    assert r["class"]["recall@1"] == 100 and r["class"]["mAP"] == 100
    # by instance: q0's own image is 2nd, q1's 1st, q2's 2nd -> R@1 = 1/3, AP = (1/2 + 1 + 1/2) / 3
    assert abs(r["instance"]["recall@1"] - 100 / 3) < 1e-4
    # chance: by class 2 of 4 gallery items are relevant -> R@1 = 1/2, R@5 = 1, mAP = 1/2;
    # by instance 1 of 4 -> R@1 = 1/4
    assert r["class"]["chance recall@1"] == 50 and r["class"]["chance recall@5"] == 100
    assert r["class"]["chance mAP"] == 50 and r["instance"]["chance recall@1"] == 25
    assert abs(r["instance"]["mAP"] - 100 * (0.5 + 1 + 0.5) / 3) < 1e-4
    assert r["instance"]["recall@5"] == 100
    with pytest.raises(ConfigError, match="eval.gallery_modality=smell"):
        retrieval(Algo(), split, "audio", "smell")


@pytest.fixture(scope="module")
def crossmodal_run(tmp_path_factory):
    """Cross-modal training (support image, query audio) with a linear mapping, mean fusion and
    the alignment term."""
    cwd = tmp_path_factory.mktemp("crossmodal")
    proc = run_metamm(["train", *SMOKE, "fusion=mean", "mapping=linear", "align.weight=0.5",
                       "episode.support_modalities=[image]", "episode.query_modalities=[audio]",
                       "trainer.max_steps=4", "trainer.tensorboard=false"], cwd)
    return cwd, cwd / run_dir_of(proc)


def test_crossmodal_eval_and_retrieval_from_a_checkpoint(crossmodal_run):
    cwd, run = crossmodal_run
    proc = run_metamm(["eval", "--ckpt", run, "eval.episodes=20", "eval.tasks_per_batch=10",
                       "episode.support_modalities=[audio]", "episode.query_modalities=[image]"], cwd)
    assert proc.stdout.startswith("accuracy: ")  # the setting in words, with the chance level
    assert "support ['audio'] -> query ['image'], chance 33.33%" in proc.stdout.splitlines()[0]
    report = json.loads(next(cwd.glob("outputs/evals/*/eval.json")).read_text())
    assert report["config"]["episode"]["support_modalities"] == ["audio"] and report["episodes"] == 20
    proc = run_metamm(["eval", "--ckpt", run, "eval.task=retrieval", "eval.query_modality=audio",
                       "eval.gallery_modality=image"], cwd)
    assert "recall@10" in proc.stdout and "instance" in proc.stdout and "chance" in proc.stdout
    report = json.loads(max(cwd.glob("outputs/evals/*/eval.json")).read_text())
    assert report["task"] == "retrieval" and report["queries"] == report["gallery"] > 0
    for kind in ("class", "instance"):
        r = report[kind]
        assert 0 <= r["recall@1"] <= r["recall@5"] <= r["recall@10"] <= 100 and 0 < r["mAP"] <= 100
    proc = run_metamm(["eval", "--ckpt", run, "eval.task=retrieval", "eval.query_modality=audio",
                       "eval.gallery_modality=smell"], cwd, check=False)
    assert_one_line_error(proc, ["eval.gallery_modality=smell", "'image', 'audio', 'tokens'"])


@pytest.mark.parametrize("args,needles", [
    (["episode.support_modalities=[smell]"], ["episode.support_modalities=['smell']", "'image', 'audio', 'tokens'"]),
    (["dataset.modalities=[image,audio]", "fusion=film", "fusion.condition=tokens"],
     ["fusion.condition=tokens", "['image', 'audio']"]),
    (["fusion=late", "algorithm=maml"], ["fusion=late", "protonet"]),
])
def test_bad_keys_fail_in_one_line(tmp_path, args, needles):
    proc = run_metamm(["train", *SMOKE, *args], tmp_path, check=False)
    assert_one_line_error(proc, needles)
