"""The paper-protocol presets (+exp=paper/NAME, configs/exp/paper/) and what they are built from:
evaluation episodes that differ from training episodes (eval.way/shot/query), the group
sampler (classes of one group never share a task), Omniglot's finn/reptile splits and rotation
augmentation, the linear schedule, the strided Conv4, and metamm compare's paper columns.
Real-data parts skip, saying why, without $METAMM_DATA/omniglot."""
from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import compose_cfg, run_dir_of, run_metamm
from omegaconf import OmegaConf

from metamm_cli import ConfigError
from metamm_cli.config import check_ranges, config_dir
from metamm_cli.data.episodes import EpisodeSampler, SplitData, build_sampler, episode_shape

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("METAMM_DATA", REPO.parent / "shared" / "data"))
OMNI = DATA / "omniglot"
need_omniglot = pytest.mark.skipif(not (OMNI / "images_background.zip").is_file(),
                                   reason=f"Omniglot zips absent from {OMNI} (set METAMM_DATA)")
PAPER_DIR = Path(config_dir()) / "exp" / "paper"
PRESETS = sorted(p.stem for p in PAPER_DIR.glob("*.yaml") if not p.stem.startswith("_"))
SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
# The papers' Omniglot test accuracies (%), in the order of SETTINGS.
REPORTED = {"protonet": [98.8, 99.7, 96.0, 98.9], "maml": [98.7, 99.9, 95.8, 98.9],
            "metasgd": [99.53, 99.93, 95.93, 98.97], "relation": [99.6, 99.8, 97.6, 99.1],
            "matching": [98.1, 98.9, 93.8, 98.5], "reptile": [95.39, 98.90, 88.14, 96.65]}
TINY = ["encoder.dim=8", "encoder.image.hidden=8"]


def preset_cfg(name, *extra):
    return compose_cfg([f"+exp=paper/{name}", *extra])


def split_of(name):
    algo, setting = name.split("_")
    way, shot = re.fullmatch(r"(\d+)w(\d+)s", setting).groups()
    return algo, int(way), int(shot)


# -- the presets: complete, and the protocol their YAML says ------------------------------------
def test_there_are_24_presets_and_each_records_its_paper():
    assert PRESETS == sorted(f"{a}_{w}w{k}s" for a in REPORTED for w, k in SETTINGS)
    for name in PRESETS:
        algo, way, shot = split_of(name)
        cfg = preset_cfg(name)
        check_ranges(cfg)  # check_preset included
        assert cfg.preset.name == f"paper/{name}" and list(cfg.preset.datasets) == ["omniglot"]
        assert cfg.preset.paper.accuracy == REPORTED[algo][SETTINGS.index((way, shot))], name
        assert f"{way}-way {shot}-shot" in cfg.preset.paper.source and cfg.task_name == f"paper_{name}"
        test, _ = episode_shape(cfg, "test")
        assert (test["way"], test["shot"]) == (way, shot), name  # evaluated as the paper reports
        assert cfg.trainer.test and cfg.eval.episodes >= 1000, name
        assert cfg.dataset._target_.endswith("Omniglot") and cfg.encoder.dim == 64
        assert cfg.encoder.image.hidden == 64


def test_a_paper_preset_refuses_another_dataset():
    with pytest.raises(ConfigError, match=r"\+exp=paper/protonet_5w1s is a preset for dataset=omniglot"):
        check_ranges(preset_cfg("protonet_5w1s", "dataset=synthetic"))


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("way", [5, 20])
def test_protonet_protocol(way, shot):
    """jakesnell/prototypical-networks run_train.py + train.py."""
    cfg = preset_cfg(f"protonet_{way}w{shot}s")
    E, V, T = cfg.episode, cfg.eval, cfg.trainer
    assert (E.way, E.shot, E.query) == (60, shot, 5)  # train 60-way, shot as tested, 5 queries
    assert (V.way, V.shot, V.query) == (way, shot, 15)
    assert (T.meta_batch, T.lr, T.optimizer.value, T.scheduler.value, T.step_size, T.gamma) == (1, 1e-3, "adam", "step", 2000, 0.5)
    assert (T.val_every, T.val_episodes, T.patience, T.max_steps) == (100, 100, 200, 1_000_000)
    assert (cfg.dataset.split, cfg.dataset.rotate, cfg.encoder.image.pool) == ("vinyals", "classes", "max")
    assert cfg.algorithm.distance == "sq_euclidean"


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("way", [5, 20])
def test_maml_and_metasgd_protocol(way, shot):
    """cbfinn/maml main.py usage + flags, data_generator.py, utils.py; Meta-SGD follows it."""
    for algo in ("maml", "metasgd"):
        cfg = preset_cfg(f"{algo}_{way}w{shot}s")
        E, T = cfg.episode, cfg.trainer
        assert (E.way, E.shot, E.query) == (way, shot, shot)  # 2K samples per class
        assert cfg.eval.way is None and cfg.eval.query is None  # evaluated like training
        assert T.meta_batch == (32 if way == 5 else 16) and (T.lr, T.optimizer.value, T.max_steps) == (1e-3, "adam", 60000)
        assert (cfg.dataset.split, cfg.dataset.rotate, cfg.encoder.image.pool) == ("finn", "augment", "stride")
        A = cfg.algorithm
        if algo == "maml":
            assert A._target_.endswith("MAML") and A.head == "learned" and not A.first_order
            alpha = 0.4 if way == 5 else 0.1  # --update_lr, on the code's sum CE / K
            assert A.inner_lr == pytest.approx(alpha * way)  # = on the mean CE
            assert (A.inner_steps, A.inner_steps_eval) == ((1, 3) if way == 5 else (5, 5))
        else:
            assert A._target_.endswith("MetaSGD") and (A.inner_steps, A.inner_steps_eval) == (1, 1)
            assert list(A.inner_lr_range) == [0.005, 0.1] and "inner_lr" not in A and "head" not in A


@pytest.mark.parametrize("way,shot,query", [(5, 1, 19), (5, 5, 15), (20, 1, 10), (20, 5, 5)])
def test_relation_protocol(way, shot, query):
    """floodsung/LearningToCompare_FSL README -b flags and omniglot_train_*_shot.py."""
    cfg = preset_cfg(f"relation_{way}w{shot}s")
    E, V, T = cfg.episode, cfg.eval, cfg.trainer
    assert (E.way, E.shot, E.query) == (way, shot, query) and V.query == shot
    assert (T.meta_batch, T.lr, T.scheduler.value, T.step_size, T.gamma, T.max_steps) == (1, 1e-3, "step", 100000, 0.5, 1_000_000)
    assert T.grad_clip == 0.5 and (cfg.algorithm.loss, cfg.algorithm.hidden) == ("mse", 8)
    assert (cfg.dataset.split, cfg.dataset.rotate) == ("finn", "task")


@pytest.mark.parametrize("shot", [1, 5])
@pytest.mark.parametrize("way", [5, 20])
def test_reptile_protocol(way, shot):
    """openai/supervised-reptile README commands for the paper."""
    cfg = preset_cfg(f"reptile_{way}w{shot}s")
    E, V, T, A = cfg.episode, cfg.eval, cfg.trainer, cfg.algorithm
    assert (E.way, E.shot) == (way, 10) and (V.shot, V.query, V.episodes) == (shot, 1, 10000)
    assert (T.optimizer.value, T.momentum, T.lr, T.scheduler.value, T.lr_final) == ("sgd", 0.0, 1.0, "linear", 0.0)
    assert (T.meta_batch, T.max_steps) == (5, 100000 if way == 5 else 200000)
    assert (A.inner_steps, A.inner_steps_eval) == (5 if way == 5 else 10, 50)
    assert (cfg.dataset.split, list(cfg.dataset.rotate_splits), cfg.encoder.image.pool) == ("reptile", ["train"], "stride")


def test_matching_protocol():
    for way, shot in SETTINGS:
        cfg = preset_cfg(f"matching_{way}w{shot}s")
        assert (cfg.episode.way, cfg.episode.shot, cfg.episode.query) == (way, shot, 15)
        assert cfg.algorithm._target_.endswith("MatchingNet") and cfg.algorithm.fce is False
        assert cfg.dataset.split == "vinyals" and cfg.trainer.patience == 200


@pytest.fixture(scope="module")
def omni_cache(tmp_path_factory):
    """A cache folder for this module: the Omniglot archives are decoded once."""
    return tmp_path_factory.mktemp("paper-cache")


@pytest.fixture(scope="module")
def datasets(omni_cache):
    """One dataset per distinct dataset config."""
    cache = omni_cache
    built = {}

    def get(cfg):
        from metamm_cli.data.base import build_dataset

        node = OmegaConf.merge(cfg.dataset, {"cache_dir": str(cache)})
        key = json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True)
        if key not in built:
            built[key] = build_dataset(node)
        return built[key]
    return get


@need_omniglot
@pytest.mark.parametrize("name", PRESETS)
def test_every_paper_preset_builds_and_runs_an_episode(name, datasets):
    """Model at tiny width + one training episode (loss, backward) and one evaluation episode
    of the shapes the preset says."""
    from metamm_cli.algorithms import build_algorithm

    torch.manual_seed(0)
    cfg = preset_cfg(name, *TINY)
    if "inner_steps" in cfg.algorithm:  # the shapes, not the papers' 5 to 50 inner steps, are tested here
        cfg = preset_cfg(name, *TINY, "algorithm.inner_steps=1", "algorithm.inner_steps_eval=1")
    dataset = datasets(cfg)
    algo = build_algorithm(cfg, dataset)
    train = build_sampler(cfg, dataset, "train", "cpu", 2, 0)
    test = build_sampler(cfg, dataset, "test", "cpu", 2, 0)
    loss, logits = algo(train.sample())
    loss.backward()
    E = cfg.episode
    assert torch.isfinite(loss) and logits.shape == (2, E.way * E.query, E.way)
    shape, _ = episode_shape(cfg, "test")
    algo.eval()
    with torch.no_grad():
        _, logits = algo(test.sample())
    assert logits.shape == (2, shape["way"] * shape["query"], shape["way"]) and torch.isfinite(logits).all()


# -- eval.way / eval.shot / eval.query ------------------------------------------------------------
def test_eval_episodes_drive_validation_and_test_samplers():
    from metamm_cli.data.base import build_dataset

    cfg = compose_cfg(["+exp=smoke", "episode.way=4", "eval.way=2", "eval.shot=2", "eval.query=3"])
    check_ranges(cfg)
    dataset = build_dataset(cfg.dataset)
    train = build_sampler(cfg, dataset, "train", "cpu", 2, 0)
    assert (train.way, train.shot, train.query) == (4, 1, 3)  # episode.*
    for split in ("val", "test"):
        s = build_sampler(cfg, dataset, split, "cpu", 2, 0)
        assert (s.way, s.shot, s.query) == (2, 2, 3)
        ep = s.sample()
        assert ep.support_labels.shape == (2, 4) and ep.query_labels.shape == (2, 6)
    only_way = compose_cfg(["+exp=smoke", "eval.way=2"])  # the others fall back to episode.*
    assert episode_shape(only_way, "val") == ({"way": 2, "shot": 1, "query": 3},
                                              {"way": "eval.way", "shot": "episode.shot", "query": "episode.query"})
    with pytest.raises(ConfigError, match=r"^eval\.way=500 is impossible: the val split has \d+ classes$"):
        build_sampler(compose_cfg(["+exp=smoke", "eval.way=500"]), dataset, "val", "cpu", 2, 0)
    with pytest.raises(ConfigError, match=r"^eval\.shot\+eval\.query=30 is impossible"):
        build_sampler(compose_cfg(["+exp=smoke", "eval.shot=20", "eval.query=10"]), dataset, "test", "cpu", 2, 0)
    for key, bad in (("eval.way", 1), ("eval.shot", 0), ("eval.query", 0)):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}={bad} is out of range"):
            check_ranges(compose_cfg(["+exp=smoke", f"{key}={bad}"]))


def test_a_way_sized_head_refuses_another_eval_way_at_start_up():
    from metamm_cli.algorithms import build_algorithm
    from metamm_cli.data.base import build_dataset

    cfg = compose_cfg(["+exp=smoke", "algorithm=maml", "eval.way=2"])
    dataset = build_dataset(cfg.dataset)
    with pytest.raises(ConfigError, match=r"^eval\.way=2 is impossible: MAML with algorithm\.head=learned "
                                          r"learns a 3-way head .*eval\.way=null or 3$"):
        build_algorithm(cfg, dataset)
    for ok in (["algorithm.head=zero"], ["eval.way=3"]):  # any way; the training way
        build_algorithm(compose_cfg(["+exp=smoke", "algorithm=maml", "eval.way=2", *ok]), dataset)
    for algo, needle in (("metasgd", "MetaSGD learns a 3-way head"), ("gnn", "GNN's label features are 3-way"),
                         ("reptile", "Reptile with algorithm.head=learned")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            build_algorithm(compose_cfg(["+exp=smoke", f"algorithm={algo}", "eval.way=2"]), dataset)
    build_algorithm(compose_cfg(["+exp=smoke", "algorithm=protonet", "eval.way=2"]), dataset)
    build_sampler(cfg, dataset, "val", "cpu", 2, 0)  # the sampler itself draws any way


def test_eval_overrides_episode_keys_set_the_eval_episodes():
    from metamm_cli.evaluate import apply_overrides, setting

    stored = OmegaConf.to_container(preset_cfg("protonet_5w1s"), resolve=True, enum_to_str=True)
    assert setting(OmegaConf.create(stored)) == "5-way 1-shot 15-query, chance 20.00%"  # eval.*, not 60-way
    for overrides, want in ((["episode.way=20"], (20, 1, 15)),  # "evaluate 20-way" though eval.way was stored
                            (["episode.shot=5", "episode.query=2"], (5, 5, 2)),
                            (["episode.way=20", "eval.way=10"], (10, 1, 15)),  # an explicit eval.X wins
                            ([], (5, 1, 15))):
        cfg = compose_cfg(["+exp=paper/protonet_5w1s", *overrides, "+ckpt=x.pt"], name="eval")
        merged = apply_overrides(stored, cfg, overrides)
        assert (merged.eval.way, merged.eval.shot, merged.eval.query) == want, overrides
        assert setting(merged).startswith(f"{want[0]}-way {want[1]}-shot {want[2]}-query")


def test_eval_episodes_through_the_cli(tmp_path):
    """Training validates at eval.way/shot/query (history with time_s), trainer.test evaluates
    best.pt with them, and `metamm eval episode.way=K` evaluates K-way."""
    proc = run_metamm(["train", "+exp=smoke", "episode.way=4", "eval.way=2", "eval.shot=2", "eval.query=2",
                       "trainer.test=true", "trainer.tensorboard=false"], tmp_path)
    run = tmp_path / run_dir_of(proc)
    metrics = json.loads((run / "metrics.json").read_text())
    times = [h["time_s"] for h in metrics["history"]]
    assert [h["step"] for h in metrics["history"]] == [4, 8] and 0 < times[0] <= times[1] <= metrics["wall_time_s"]
    report = json.loads((run / "eval.json").read_text())
    assert report["setting"] == "2-way 2-shot 2-query, chance 50.00%" and report["step"] == metrics["best_step"]
    assert "4-way 1-shot 3-query" in proc.stdout  # training episodes
    run_metamm(["eval", "--ckpt", run, "episode.way=3"], tmp_path)
    (evaluated,) = (tmp_path / "outputs" / "evals").glob("*/eval.json")
    again = json.loads(evaluated.read_text())
    assert again["setting"] == "3-way 2-shot 2-query, chance 33.33%" and again["config"]["eval"]["way"] == 3


# -- the group sampler against its definition ----------------------------------------------------
def grouped_split(sizes, per_class=4, short=(), same_member=False):
    """Groups of ``sizes[g]`` classes (consecutive ids), ``per_class`` samples each (2 for the
    classes in ``short``)."""
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    C = len(groups)
    counts = [2 if c in short else per_class for c in range(C)]
    labels = torch.repeat_interleave(torch.arange(C), torch.tensor(counts))
    x = torch.arange(len(labels), dtype=torch.float32)[:, None]
    return SplitData({"x": x}, torch.ones(len(labels), 1, dtype=torch.bool), labels, C, groups, same_member)


def test_group_sampler_draws_distinct_groups_and_uniform_members():
    split = grouped_split([4] * 6 + [2, 1], short={25})  # class 25 (group 6's second) too small
    sampler = EpisodeSampler(split, 5, 1, 2, 4000, seed=3)
    ep = sampler.sample()
    classes = ep.classes
    groups = split.groups[classes]
    assert all(len(set(row)) == 5 for row in groups.tolist())  # never two classes of one group
    assert not bool((classes == 25).any())  # an ineligible member is never drawn
    # each group drawn alike (5 of 8 groups per task), and its members uniformly
    assert torch.bincount(groups.flatten(), minlength=8).float().div(4000).sub(5 / 8).abs().max() < 0.03
    for g, members in ((0, [0, 1, 2, 3]), (5, [20, 21, 22, 23]), (6, [24])):
        drawn = classes[groups == g]
        freq = torch.stack([(drawn == m).float().mean() for m in members])
        assert freq.sub(1 / len(members)).abs().max() < 0.04, (g, freq)
    # a task's samples are its classes' samples, labels 0..N-1 in class order
    rows = ep.index[:, :5]
    assert torch.equal(split.labels[rows], classes)


def test_group_sampler_same_member_and_reproducibility():
    split = grouped_split([4] * 10, same_member=True)
    sampler = EpisodeSampler(split, 5, 1, 1, 2000, seed=7)
    ep = sampler.sample()
    rank = ep.classes % 4  # the member of each class within its group
    assert bool((rank == rank[:, :1]).all())  # one member for the whole task
    assert torch.bincount(rank[:, 0], minlength=4).float().div(2000).sub(0.25).abs().max() < 0.04
    again = EpisodeSampler(split, 5, 1, 1, 2000, seed=7).sample()
    assert torch.equal(ep.index, again.index)  # a fixed seed reproduces the episodes
    sampler.reset()
    assert torch.equal(sampler.sample().index, ep.index)
    assert not torch.equal(EpisodeSampler(split, 5, 1, 1, 2000, seed=8).sample().index, ep.index)
    moved = split.to("cpu")
    assert torch.equal(moved.groups, split.groups) and moved.same_member and moved.num_groups == 10


def test_group_sampler_refuses_too_few_groups_and_unequal_members():
    with pytest.raises(ConfigError, match=r"^eval\.way=4 is impossible: the val split has 3 groups of classes"):
        EpisodeSampler(grouped_split([4, 4, 4]), 4, 1, 1, 1, split_name="val", keys={"way": "eval.way"})
    with pytest.raises(ConfigError, match="one member for the whole task needs equally many"):
        EpisodeSampler(grouped_split([4, 4, 3], same_member=True), 2, 1, 1, 1)


def test_ungrouped_sampler_is_unchanged():
    """Without groups, the classes are those of the original draw: top-N of one uniform score per
    eligible class, from the sampler's generator."""
    labels = torch.arange(12).repeat_interleave(3)
    split = SplitData({"x": torch.zeros(36, 1)}, torch.ones(36, 1, dtype=torch.bool), labels, 12)
    ep = EpisodeSampler(split, 4, 1, 1, 50, seed=11).sample()
    g = torch.Generator().manual_seed(11)
    expected = torch.rand(50, 12, generator=g).topk(4, dim=1).indices
    assert torch.equal(ep.classes, expected) and split.num_groups == 12


# -- Omniglot: the finn and reptile splits, rotation groups ----------------------------------------
def shuffled_as_the_code(characters, seed):
    """``random.seed(seed); random.shuffle(list)`` (MAML's data_generator.py, Reptile's
    run_omniglot.py) on the characters sorted by (alphabet, character)."""
    every = sorted(characters, key=lambda t: (t[1], t[2]))
    state = random.getstate()
    try:
        random.seed(seed)
        random.shuffle(every)
    finally:
        random.setstate(state)
    return every


@need_omniglot
def test_finn_split_counts_groups_and_seed(omni_cache):
    from metamm_cli.data.omniglot import Omniglot

    d = Omniglot(str(OMNI), split="finn", rotate="augment", cache_dir=str(omni_cache))
    chars = {s: d.characters(s) for s in ("train", "val", "test")}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert len(set().union(*map(set, chars.values()))) == 1623  # disjoint, all characters
    every = shuffled_as_the_code([c for cs in chars.values() for c in cs], 1)
    assert chars["train"] + chars["val"] + chars["test"] == every
    for s, n in (("train", 1100), ("val", 100), ("test", 423)):
        split = d.split(s)
        assert split.num_classes == 4 * n and split.num_groups == n and not split.same_member
        assert torch.equal(split.groups, torch.arange(4 * n) // 4)
        assert torch.equal(split.class_counts(), torch.full((4 * n,), 20))
    # class 4c + r is character c rotated by 90 r degrees
    val = d.split("val")
    first = val.data["image"][val.labels == 0][0, 0]
    assert torch.equal(val.data["image"][val.labels == 1][0, 0], torch.rot90(first, 1))
    ep = EpisodeSampler(val, 20, 1, 1, 200, seed=0).sample()
    assert all(len(set(row)) == 20 for row in val.groups[ep.classes].tolist())
    task = Omniglot(str(OMNI), split="finn", rotate="task", cache_dir=str(omni_cache)).split("test")
    assert task.same_member
    ep = EpisodeSampler(task, 5, 1, 1, 200, seed=0).sample()
    assert bool(((ep.classes % 4) == (ep.classes[:, :1] % 4)).all())  # one rotation per task


@need_omniglot
def test_reptile_split_is_the_codes_and_rotates_the_train_split_only(omni_cache):
    from metamm_cli.data.omniglot import Omniglot

    d = Omniglot(str(OMNI), split="reptile", rotate_splits=["train"], cache_dir=str(omni_cache))
    every = shuffled_as_the_code([c for s in ("train", "val", "test") for c in d.characters(s)], 0)
    assert d.characters("test") == every[1200:] and d.characters("train") + d.characters("val") == every[:1200]
    assert [d.num_classes(s) for s in ("train", "val", "test")] == [4400, 100, 423]
    assert d.split("test").groups is None and d.split("train").groups is None  # rotate=classes
    with pytest.raises(ConfigError, match="dataset.rotate=sideways"):
        Omniglot(str(OMNI), rotate="sideways")
    with pytest.raises(ConfigError, match=r"dataset.rotate_splits=\['dev'\]"):
        Omniglot(str(OMNI), rotate_splits=["dev"])


# -- the linear schedule and the strided Conv4 ----------------------------------------------------
def test_linear_schedule_anneals_to_lr_final():
    from metamm_cli.optim import make_scheduler

    for final in (0.0, 0.25):
        T = SimpleNamespace(scheduler="linear", max_steps=100, lr=1.0, lr_final=final, gamma=0.5, step_size=10)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=T.lr)
        sched = make_scheduler(opt, T)
        seen = []
        for _ in range(120):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        for i in (0, 1, 37, 99, 100, 119):  # supervised-reptile train.py: frac * final + (1 - frac) * start
            frac = min(i, 100) / 100
            assert seen[i] == pytest.approx(frac * final + (1 - frac) * 1.0), (final, i)
    cfg = compose_cfg(["trainer.scheduler=linear", "trainer.lr_final=-1"])
    with pytest.raises(ConfigError, match=r"trainer\.lr_final=-1.0 is out of range"):
        check_ranges(cfg)


def test_strided_conv4():
    from metamm_cli.data.episodes import ModalitySpec
    from metamm_cli.models.encoders import Conv4

    spec = ModalitySpec((1, 28, 28), torch.float32, "image")
    strided, pooled = Conv4(spec, dim=16, hidden=8, pool="stride"), Conv4(spec, dim=16, hidden=8)
    x = torch.rand(3, 1, 28, 28)
    sizes, h = [], x
    for block in strided.net:
        h = block(h)
        sizes.append(h.shape[-1])
    assert sizes == [14, 7, 4, 2] and strided(x).shape == (3, 16)  # TF 'SAME' sizes, then the mean
    convs = [m for m in strided.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in strided.modules())
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in pooled.modules()) == 4 and pooled.pool == "max"
    assert torch.allclose(strided(x), strided.net(x).mean(dim=(-2, -1)))
    with pytest.raises(ConfigError, match="encoder.image.pool=avg"):
        Conv4(spec, pool="avg")
    assert compose_cfg().encoder.image.pool == "max"


# -- metamm compare: the paper's number and the time to reach it ----------------------------------
def fake_run(folder, preset, paper, history, seed=0, test=None):
    """A run folder as metamm writes it: config.yaml, metrics.json (history with time_s),
    checkpoints/, and eval.json when ``test``."""
    folder.mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    config = {"seed": seed, "trainer": {"max_steps": history[-1][0]},
              "preset": {"name": preset, "datasets": ["omniglot"],
                         "paper": None if paper is None else {"accuracy": paper, "source": "somewhere"}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+exp={preset}", f"seed={seed}"]))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"exp": preset}}}}))
    hist = [{"step": s, "val_acc": a, "val_acc_ci95": 1.0, "time_s": t} for s, a, t in history]
    best = max(hist, key=lambda h: h["val_acc"])
    (folder / "metrics.json").write_text(json.dumps({
        "step": hist[-1]["step"], "val_acc": hist[-1]["val_acc"], "val_acc_ci95": 1.0,
        "best_val_acc": best["val_acc"], "best_step": best["step"], "wall_time_s": hist[-1]["time_s"] + 5,
        "episodes_per_s": 100.0, "history": hist}))
    if test is not None:
        (folder / "eval.json").write_text(json.dumps({"accuracy": test, "ci95": 0.2, "episodes": 1000,
                                                      "split": "test", "setting": preset, "step": best["step"]}))


def test_compare_shows_the_paper_and_the_time_to_reach_it(tmp_path, capsys):
    from metamm_cli.compare.command import main

    root = tmp_path / "sweep"
    fake_run(root / "0000", "paper/protonet_5w1s", 98.8, [(100, 90.0, 10.0), (200, 98.9, 21.5), (300, 99.2, 33.0)], test=98.5)
    fake_run(root / "0001", "paper/maml_5w1s", 98.7, [(500, 90.0, 60.0), (1000, 97.0, 125.0)], test=96.9)
    for seed, hist in ((0, [(10, 80.0, 1.0), (20, 96.5, 2.0)]), (1, [(10, 97.0, 4.0), (20, 97.5, 8.0)]),
                       (2, [(10, 50.0, 1.0), (20, 60.0, 2.0)])):
        fake_run(root / f"000{2 + seed}", "paper/reptile_5w1s", 95.39, hist, seed=seed)
    capsys.readouterr()
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    head, rule, *rows = [ln for ln in out.splitlines() if ln.startswith("|")]
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:1] == ["exp"] and cols.index("paper") == cols.index("test ± 95% CI") + 1
    assert cols.index("time to paper") == cols.index("paper") + 1
    cell = {r.split("|")[1].strip(): dict(zip(cols, (c.strip() for c in r.strip("|").split("|")))) for r in rows}
    assert cell["paper/protonet_5w1s"]["paper"] == "98.80" and cell["paper/protonet_5w1s"]["time to paper"] == "21.5 s"
    assert cell["paper/maml_5w1s"]["time to paper"] == "not reached"
    assert cell["paper/reptile_5w1s"]["time to paper"] == "3.0 s [2/3]"  # mean of the seeds that reached it
    assert cell["paper/reptile_5w1s"]["paper"] == "95.39" and cell["paper/reptile_5w1s"]["n"] == "3"
    assert "time to paper: wall time of the first validation at or above it" in out
    assert main([str(root), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metrics"][3:5] == ["paper", "time_to_paper_s"]
    rows = {r["settings"]["exp"]: r for r in data["rows"]}
    proto = rows["paper/protonet_5w1s"]
    assert proto["metrics"]["time_to_paper_s"]["mean"] == 21.5 and proto["metrics"]["test"]["mean"] == 98.5
    run = proto["runs"][0]
    assert (run["paper"], run["paper_reached"], run["time_to_paper_step"], run["paper_source"]) == (98.8, True, 200, "somewhere")
    maml = rows["paper/maml_5w1s"]["metrics"]["time_to_paper_s"]
    assert maml["n"] == 0 and maml["not_reached"] == 1
    assert main([str(root), "--sort", "time_to_paper", "--format", "json"]) == 0
    order = [r["settings"]["exp"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert order == ["paper/reptile_5w1s", "paper/protonet_5w1s", "paper/maml_5w1s"]  # fastest first, never last


def test_compare_without_paper_numbers_has_no_paper_columns(tmp_path, capsys):
    from metamm_cli.compare.command import main

    fake_run(tmp_path / "a", "smoke", None, [(4, 50.0, 1.0)])
    fake_run(tmp_path / "b", "smoke", None, [(4, 60.0, 1.0)], seed=1)
    capsys.readouterr()
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "paper" not in out and "| best val ± 95% CI |" in out


# -- toy-scale learning through the real CLI ------------------------------------------------------
@need_omniglot
@pytest.mark.parametrize("name,extra", [
    ("protonet_5w1s", ["trainer.max_steps=40"]),
    ("maml_5w1s", ["trainer.max_steps=40", "trainer.meta_batch=4"]),
])
def test_paper_presets_learn_at_toy_scale(name, extra, tmp_path):
    """A few dozen steps at width 16, the protocol otherwise kept: clearly above chance (20%)."""
    steps = extra[0].split("=")[1]
    proc = run_metamm(["train", f"+exp=paper/{name}", *extra, "encoder.dim=16", "encoder.image.hidden=16",
                       f"trainer.val_every={steps}", "trainer.val_episodes=50", "eval.episodes=100",
                       "trainer.threads=1", "trainer.progress=false", "trainer.tensorboard=false"], tmp_path)
    run = tmp_path / run_dir_of(proc)
    metrics = json.loads((run / "metrics.json").read_text())
    report = json.loads((run / "eval.json").read_text())
    assert report["setting"].startswith("5-way 1-shot") and report["episodes"] == 100
    assert metrics["best_val_acc"] > 35 and report["accuracy"] > 35, (metrics, report["accuracy"])
    assert math.isfinite(metrics["history"][-1]["time_s"])
