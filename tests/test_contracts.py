"""The contracts every shipped config keeps, parametrised over every ``configs/dataset/*.yaml``
and every ``configs/algorithm/*.yaml`` (a new one is checked by adding its YAML, nothing else).

A dataset: built from its YAML (tiny files in its real layout where it reads files; the real data
where only that exists, skipped with the reason otherwise) yields, per split, per-modality tensors
``[S, *shape]`` matching its specs, a boolean presence mask ``[S, M]``, labels ``0..C-1`` that
agree with ``num_classes``; its learned state restores into a fresh object with the same classes;
it names its samples and fingerprints its files; an episode can be drawn from every split.

An algorithm: built from its YAML on the small synthetic set, it declares what it is (family,
capabilities), trains (a finite loss whose gradients reach the model), and scores a query episode
in eval mode with logits ``[T, N*Q, N]``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOKE, compose_cfg
from test_datasets_user import make_folder

import fewshot_files as F
from metamm_cli.algorithms import build_algorithm, registered
from metamm_cli.config import config_dir
from metamm_cli.data.base import SPLITS, MultimodalDataset, build_dataset
from metamm_cli.data.episodes import EpisodeSampler, ModalitySpec, SplitData

DATASETS = sorted(p.stem for p in Path(config_dir(), "dataset").glob("*.yaml"))
DATA = Path(os.environ.get("METAMM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_features(root: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(9), 4)
    path = root / "f.npz"
    root.mkdir(parents=True)
    np.savez(path, labels=labels, split=np.repeat(["train", "val", "test"], 12),
             vector=rng.normal(size=(36, 5)).astype(np.float32) + labels[:, None])
    return path


# Where each dataset's files come from: tiny copies in their real layouts, or the real data.
SOURCES = {
    "synthetic": lambda tmp: [],
    "synthetic_small": lambda tmp: [],
    "folder": lambda tmp: [f"dataset.root={make_folder(tmp / 'folder', split_layout=True)}"],
    "features": lambda tmp: [f"dataset.path={write_features(tmp / 'features')}"],
    "mini_imagenet": lambda tmp: [f"dataset.root={F.write_mini(tmp / 'mini', 'l2l')}", "dataset.image_size=12"],
    "tiered_imagenet": lambda tmp: [f"dataset.root={F.write_tiered(tmp / 'tiered', 'metaoptnet')}", "dataset.image_size=12"],
    "cifar_fs": lambda tmp: [f"dataset.root={F.write_cifar(tmp / 'cifar', 'CIFAR_FS', 'metaoptnet')}"],
    "fc100": lambda tmp: [f"dataset.root={F.write_cifar(tmp / 'fc100', 'FC100', 'metaoptnet')}"],
    "cub": lambda tmp: [f"dataset.root={F.write_cub(tmp / 'cub')}", "dataset.image_size=16"],
}
REAL = {"omniglot": DATA / "omniglot" / "images_background.zip",
        "omniglot_strokes": DATA / "omniglot" / "strokes_background_small1.zip",
        "avdigits": DATA / "fsdd" / "recordings"}


def test_every_dataset_has_a_source_here():
    assert set(SOURCES) | set(REAL) == set(DATASETS), "a new dataset YAML: add how its contract test gets files"


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_contract(name, tmp_path):
    if name in REAL and not REAL[name].exists():
        pytest.skip(f"{name}: its real files are absent from {DATA} (set METAMM_DATA)")
    extra = SOURCES[name](tmp_path) if name in SOURCES else []
    cached = "cache" in compose_cfg([f"dataset={name}"]).dataset  # datasets that cache decoded files
    cfg = compose_cfg([f"dataset={name}", *(["dataset.cache=false"] if cached else []), *extra])
    dataset = build_dataset(cfg.dataset)
    assert isinstance(dataset, MultimodalDataset) and dataset.name
    specs = dataset.modalities
    assert specs and all(isinstance(s, ModalitySpec) for s in specs.values())
    for split in SPLITS:
        d = dataset.split(split)
        assert isinstance(d, SplitData)
        S = len(d.labels)
        assert S > 0 and d.present.shape == (S, len(specs)) and d.present.dtype == torch.bool
        assert bool(d.present.any(1).all()), f"{split}: a sample with no modality"
        for m, spec in specs.items():
            assert d.data[m].shape == (S, *spec.shape), (split, m, d.data[m].shape, spec.shape)
        assert d.labels.dtype == torch.long and int(d.labels.min()) == 0
        assert int(d.labels.max()) == d.num_classes - 1 == dataset.num_classes(split) - 1
        counts = d.class_counts()
        assert bool((counts > 0).all())
        assert isinstance(dataset.describe_sample(split, 0), str)
        shot = 1
        query = max(1, min(2, int(counts.max()) - shot))
        way = min(2, int((counts >= shot + query).sum()))
        if way >= 2:
            episode = EpisodeSampler(d, way, shot, query, tasks=2).sample()
            assert episode.support_labels.shape == (2, way * shot)
    state = dataset.state_dict()
    again = build_dataset(cfg.dataset, state)
    for split in SPLITS:
        assert again.num_classes(split) == dataset.num_classes(split)
    assert isinstance(dataset.fingerprint(), dict) and isinstance(dataset.describe(), str)


FAMILIES = {"metric", "optimization", "model-based", "transfer", "cross-modal"}


@pytest.mark.parametrize("name", sorted(registered()))
def test_algorithm_contract(name):
    cls = registered()[name]
    assert cls.family in FAMILIES and cls.__doc__, f"{name}: declare family and a docstring"
    assert not cls.inner_loop or cls.family == "optimization"
    torch.manual_seed(0)
    cfg = compose_cfg([*SMOKE, f"algorithm={name}", "dataset.modalities=[image,audio]"])
    dataset = build_dataset(cfg.dataset)
    algo = build_algorithm(cfg, dataset)
    reason = algo.fixed_way()
    assert reason is None or isinstance(reason, str)
    sampler = algo.train_sampler(cfg, dataset, torch.device("cpu"), 2, 0)  # episodes, or minibatches (pretrain)
    loss, _ = algo.train()(sampler.sample())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in algo.model.parameters())
    episode = EpisodeSampler(dataset.split("test"), cfg.episode.way, cfg.episode.shot, cfg.episode.query, tasks=2).sample()
    with torch.no_grad():
        _, logits = algo.eval()(episode)
    assert logits.shape == (2, cfg.episode.way * cfg.episode.query, cfg.episode.way)
    assert bool(torch.isfinite(logits).all())
