"""The user's own data: the `folder` dataset (both layouts, masked modalities, vocabulary from the
train split, corrupted and unknown files) and the `features` dataset (.npz with/without split),
on tiny files made here; `metamm data` on them through the real CLI (training on a folder
dataset: tests/test_fixed_episodes.py)."""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hydra.utils import instantiate

from conftest import compose_cfg, run_metamm
from metamm_cli.algorithms import build_algorithm
from metamm_cli import ConfigError
from metamm_cli.data.decode import decode_image
from metamm_cli.data import episodes
from metamm_cli.data.episodes import EpisodeSampler
from metamm_cli.data.features import FeaturesDataset
from metamm_cli.data.folder import FolderDataset

# A folder-dataset run small enough for seconds on 2 CPU cores (the smoke preset sets keys of
# the synthetic dataset, so its other settings are spelled out here).
TINY = ["encoder.dim=8", "encoder.image.hidden=8", "encoder.audio.hidden=8", "encoder.tokens.hidden=8",
        "encoder.tokens.embed=4", "encoder.vector.hidden=8", "episode.way=2", "episode.shot=1",
        "episode.query=1", "trainer.max_steps=2", "trainer.meta_batch=2", "trainer.log_every=1",
        "trainer.val_every=2", "trainer.val_episodes=2", "trainer.progress=false",
        "trainer.tensorboard=false", "task_name=folder", "dataset.image.size=8",
        "dataset.audio.n_mels=8", "dataset.audio.frames=8", "dataset.audio.n_fft=64",
        "dataset.audio.hop=32", "dataset.tokens.length=6"]

WORDS = ["red", "green", "blue", "cat", "dog", "sun"]


def write_png(path: Path, value: int) -> None:
    arr = np.full((12, 12), value, dtype=np.uint8)
    arr[2:6, 2:6] = 255 - value
    Image.fromarray(arr).save(path)


def write_wav(path: Path, freq: float, rate: int = 4000, n: int = 400) -> None:
    t = np.arange(n) / rate
    pcm = (0.5 * np.sin(2 * math.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def make_folder(root: Path, split_layout: bool, classes=6, per_class=3, with_text=True,
                drop_audio_of=("s0",)) -> Path:
    """Classes c0..c{n-1}; sample s<j> has image, audio (except the stems in ``drop_audio_of``),
    text and a .npy vector."""
    groups = {s: [f"c{i}" for i in range(i0, classes, 3)] for i0, s in enumerate(("train", "val", "test"))} \
        if split_layout else {"": [f"c{i}" for i in range(classes)]}
    for split, names in groups.items():
        for name in names:
            c = int(name[1:])
            d = root / split / name
            d.mkdir(parents=True)
            for j in range(per_class):
                write_png(d / f"s{j}.png", 20 * c + j)
                if f"s{j}" not in drop_audio_of:
                    write_wav(d / f"s{j}.wav", 200 + 100 * c)
                if with_text:
                    words = [WORDS[c % len(WORDS)]] * 2 + (["only_in_" + (split or "all")] if j == 0 else [])
                    (d / f"s{j}.txt").write_text(" ".join(words))
                np.save(d / f"s{j}.npy", np.full(4, c, dtype=np.float32))
    return root


def tiny_folder(tmp_path, split_layout=True, **kw):
    root = make_folder(tmp_path / "data", split_layout, **kw)
    return FolderDataset(str(root), image={"size": 8}, audio={"n_mels": 8, "frames": 8, "n_fft": 64, "hop": 32},
                         tokens={"length": 6})


def test_folder_split_layout_masks_and_vocab(tmp_path):
    ds = tiny_folder(tmp_path)
    assert list(ds.modalities) == ["image", "audio", "tokens", "vector"]
    assert ds.modalities["image"].shape == (1, 8, 8) and ds.modalities["audio"].shape == (8, 8)
    train, test = ds.split("train"), ds.split("test")
    assert train.num_classes == 2 and len(train.labels) == 6
    assert train.data["image"].dtype == torch.uint8  # held as bytes, floats in the episode
    # s0 has no .wav: audio masked exactly for those samples, and zero there
    audio_col = list(ds.modalities).index("audio")
    assert train.present[:, audio_col].sum() == 4 and train.present[:, [0, 2, 3]].all()
    assert (train.data["audio"][~train.present[:, audio_col]] == 0).all()
    # vocabulary from the train split only: a word seen only in test is unknown (id 1)
    assert "only_in_train" in ds.vocab and "only_in_test" not in ds.vocab
    assert ds.modalities["tokens"].vocab == len(ds.vocab) + 2
    test_tokens = test.data["tokens"][test.present[:, 2]]
    assert (test_tokens == 1).any() and (test_tokens[:, 3:] == 0).all()  # unknown word; padding
    # images decoded with the shared decoder at the configured size
    first = sorted((tmp_path / "data" / "train").iterdir())[0] / "s0.png"
    assert torch.equal(train.data["image"][0], decode_image(first, 8, 1))
    ep = EpisodeSampler(train, 2, 1, 2, tasks=3).sample()
    assert ep.support["image"].dtype == torch.float32 and float(ep.support["image"].max()) <= 1.0


def test_folder_class_layout_is_split_by_seed(tmp_path):
    root = make_folder(tmp_path / "data", split_layout=False, classes=10, with_text=False)
    a = FolderDataset(str(root), seed=0, split_fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    b = FolderDataset(str(root), seed=1, split_fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    assert "tokens" not in a.modalities
    names = {s: [d.name for d in a.class_dirs[s]] for s in ("train", "val", "test")}
    assert [len(v) for v in names.values()] == [6, 2, 2]
    assert len(set(sum(names.values(), []))) == 10  # disjoint, complete
    assert names != {s: [d.name for d in b.class_dirs[s]] for s in ("train", "val", "test")}
    assert a.split("val").num_classes == 2


def test_folder_bad_inputs(tmp_path, caplog):
    with pytest.raises(ConfigError, match="no such folder"):
        FolderDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        FolderDataset(str(tmp_path / "empty"))
    root = make_folder(tmp_path / "d", split_layout=True, with_text=False)
    (root / "train" / "c0" / "notes.md").write_text("x")
    with caplog.at_level("WARNING", logger="metamm"):
        ds = FolderDataset(str(root))
    assert "1 files with extensions ['.md']" in caplog.text
    with pytest.raises(ConfigError, match="notes.md"):
        FolderDataset(str(root), unknown_files="error")
    (root / "train" / "c0" / "notes.md").unlink()
    bad = root / "train" / "c3" / "s1.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="s1.png"):
        FolderDataset(str(root)).split("train")
    write_png(bad, 3)
    (root / "val" / "c1" / "s2.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(ConfigError, match="s2.wav"):
        FolderDataset(str(root)).split("val")
    assert ds.split("test").num_classes == 2


def test_features_with_and_without_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array([f"k{i}" for i in range(10)]), 4)
    emb = rng.normal(size=(40, 5)).astype(np.float32)
    emb[3] = np.nan  # sample 3 lacks this modality
    split = np.array(["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    np.savez(tmp_path / "f.npz", labels=labels, split=split, vector=emb, clip=rng.normal(size=(40, 2, 3)))
    ds = FeaturesDataset(str(tmp_path / "f.npz"))
    assert {m: s.shape for m, s in ds.modalities.items()} == {"vector": (5,), "clip": (2, 3)}
    train = ds.split("train")
    assert train.num_classes == 6 and len(train.labels) == 24 and ds.split("test").num_classes == 2
    assert not train.present[3, 0] and train.present[3, 1] and train.present.sum() == 47
    assert torch.allclose(train.data["vector"][5], torch.from_numpy(emb[5]))
    np.savez(tmp_path / "g.npz", labels=np.repeat(np.arange(10), 4), vector=emb)
    no_split = FeaturesDataset(str(tmp_path / "g.npz"), seed=3)
    assert [no_split.split(s).num_classes for s in ("train", "val", "test")] == [6, 2, 2]
    np.savez(tmp_path / "h.npz", vector=emb)
    with pytest.raises(ConfigError, match="no 'labels' array"):
        FeaturesDataset(str(tmp_path / "h.npz"))
    with pytest.raises(ConfigError, match="cannot decode files"):
        ds.decode("vector", "x.npy")
    # any array name gets an encoder with +encoder/vector@encoder.NAME=mlp
    cfg = compose_cfg(["dataset=features", f"dataset.path={tmp_path / 'f.npz'}",
                       "+encoder/vector@encoder.clip=mlp"])
    model = build_algorithm(cfg, instantiate(cfg.dataset, _convert_="all")).model
    ep = EpisodeSampler(train, way=3, shot=1, query=2, tasks=2).sample()
    z = model({m: x.flatten(0, 1) for m, x in ep.query.items()}, ep.query_present.flatten(0, 1))
    assert z.shape == (12, model.out_dim) and torch.isfinite(z).all()


def test_short_classes_warn_once_and_refuse(tmp_path, caplog):
    root = make_folder(tmp_path / "d", split_layout=True, classes=9, per_class=3, with_text=False)
    for j in (1, 2):  # c0 (train) keeps one sample
        for f in (root / "train" / "c0").glob(f"s{j}.*"):
            f.unlink()
    train = FolderDataset(str(root)).split("train")
    episodes._WARNED.clear()
    with caplog.at_level("WARNING", logger="metamm"):
        EpisodeSampler(train, way=2, shot=1, query=2, tasks=1)
        EpisodeSampler(train, way=2, shot=1, query=2, tasks=5, seed=1)  # e.g. a second sampler
    assert caplog.text.count("1 of 3 classes of the train split have fewer than") == 1
    with pytest.raises(ConfigError, match="episode.shot\\+episode.query=3 is impossible"):
        EpisodeSampler(train, way=3, shot=1, query=2, tasks=1)


def test_folder_cli_train_data_and_errors(tmp_path):
    root = make_folder(tmp_path / "data", split_layout=True)
    proc = run_metamm(["data", "dataset=folder", f"dataset.root={root}", "dataset.image.size=8",
                       "episode.way=2", "episode.query=2"], tmp_path)
    assert "folder: image[1, 8, 8]" in proc.stdout and "fit every split" in proc.stdout
    bad = run_metamm(["data", "dataset=folder", f"dataset.root={tmp_path / 'nope'}"], tmp_path, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "no such folder" in bad.stderr
    np.savez(tmp_path / "h.npz", vector=np.zeros((4, 2)))
    bad = run_metamm(["data", "dataset=features", f"dataset.path={tmp_path / 'h.npz'}"], tmp_path, check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "labels" in bad.stderr
