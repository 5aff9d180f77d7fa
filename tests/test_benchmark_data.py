"""The benchmark datasets (mini_imagenet, tiered_imagenet, cifar_fs, fc100, cub) on tiny copies
written here in every real layout (tests/fewshot_files.py): `metamm data` through the real
executable on each; the layouts agree; class counts are checked; images in unusual modes are
converted; bad inputs are one line naming the file, key, row, split or class, and leave no cache
entry; tieredImageNet is memory-mapped from the cache; CUB's attributes, captions, boxes and
splits; class-level side information never reaches a query."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import compose_cfg, run_metamm

import fewshot_files as F
from metamm_cli import ConfigError
from metamm_cli.algorithms import build_algorithm
from metamm_cli.data.cifar import CifarFS
from metamm_cli.data.cub import CUB, METADATASET
from metamm_cli.data.episodes import EpisodeSampler, build_sampler
from metamm_cli.data.mini_imagenet import MiniImageNet
from metamm_cli.data.tiered_imagenet import TieredImageNet

WRITERS = {
    ("mini_imagenet", "l2l"): lambda r: F.write_mini(r, "l2l"), ("mini_imagenet", "csv"): lambda r: F.write_mini(r, "csv"),
    ("mini_imagenet", "metaoptnet"): lambda r: F.write_mini(r, "metaoptnet"),
    ("mini_imagenet", "closer"): lambda r: F.write_mini(r, "closer"),
    ("tiered_imagenet", "l2l"): lambda r: F.write_tiered(r, "l2l"),
    ("tiered_imagenet", "metaoptnet"): lambda r: F.write_tiered(r, "metaoptnet"),
    ("cifar_fs", "metaoptnet"): lambda r: F.write_cifar(r, "CIFAR_FS", "metaoptnet"),
    ("cifar_fs", "folders"): lambda r: F.write_cifar(r, "CIFAR_FS", "folders"),
    ("fc100", "metaoptnet"): lambda r: F.write_cifar(r, "FC100", "metaoptnet"),
    ("fc100", "folders"): lambda r: F.write_cifar(r, "FC100", "folders"),
    ("cub", "raw"): lambda r: F.write_cub(r),
}
COUNTS = {"mini_imagenet": (64, 16, 20), "tiered_imagenet": (351, 97, 160), "cifar_fs": (64, 16, 20),
          "fc100": (60, 20, 20), "cub": (100, 50, 50)}


@pytest.mark.parametrize("dataset,layout", sorted(WRITERS))
def test_metamm_data_reads_every_layout(dataset, layout, tmp_path):
    root = WRITERS[(dataset, layout)](tmp_path / "d")
    proc = run_metamm(["data", f"dataset={dataset}", f"dataset.root={root}", "dataset.image_size=16",
                       "episode.query=1", "eval.query=1"], tmp_path, env={"METAMM_CACHE": str(tmp_path / "c")})
    assert f"({layout} layout, 16 px" in proc.stdout
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines() if ln.split()[:1] in (["train"], ["val"], ["test"])}
    assert tuple(int(rows[s][1]) for s in ("train", "val", "test")) == COUNTS[dataset]
    assert "fit every split" in proc.stdout


def test_layouts_of_a_set_agree(tmp_path):
    """Classes are numbered by sorted name in every layout; decoded arrays (pickles) are equal
    bit for bit, JPEG layouts within compression noise; the CloserLook lists' absolute paths of
    another machine are found under root."""
    sets = {k: MiniImageNet(str(F.write_mini(tmp_path / k, k)), image_size=12, cache=False)
            for k in ("l2l", "metaoptnet", "csv", "closer")}
    ref = sets["l2l"].split("test")
    for k, ds in sets.items():
        d = ds.split("test")
        assert ds.class_names("test") == sets["l2l"].class_names("test") and torch.equal(d.labels, ref.labels), k
        diff = (d.data["image"].float() - ref.data["image"].float()).abs().mean()
        assert (diff == 0) if k == "metaoptnet" else (diff < 12), k  # JPEG of noisy 12 px images
    assert sets["l2l"].split("train").data["image"][0].permute(1, 2, 0).numpy().tolist() == F.image(0, 0).tolist()
    cifar = [CifarFS(str(F.write_cifar(tmp_path / f"c{k}", "CIFAR_FS", k)), cache=False) for k in ("metaoptnet", "folders")]
    assert cifar[0].class_names("val") == cifar[1].class_names("val") == sorted(F.FINE[c] for c in range(64, 80))
    assert torch.equal(cifar[0].split("val").data["image"], cifar[1].split("val").data["image"])  # PNG: lossless
    tiered = [TieredImageNet(str(F.write_tiered(tmp_path / f"t{k}", k)), image_size=12, cache=False)
              for k in ("l2l", "metaoptnet")]
    assert torch.equal(tiered[0].split("val").data["image"], tiered[1].split("val").data["image"])


def test_class_counts_are_checked(tmp_path, caplog):
    root = F.write_mini(tmp_path / "d", "l2l", counts={"train": 63, "val": 16, "test": 20})
    with pytest.raises(ConfigError, match=r"mini-imagenet-cache-train\.pkl: 63 classes in the train split, "
                                          r"miniImageNet has 64 \(64/16/20 train/val/test\).*check_classes=false"):
        MiniImageNet(str(root), image_size=12, cache=False).split("train")
    ds = MiniImageNet(str(root), image_size=12, cache=False, check_classes=False)
    assert ds.split("train").num_classes == 63 and "accepted" in caplog.text
    fc = F.write_cifar(tmp_path / "fc", "FC100", "metaoptnet")
    with pytest.raises(ConfigError, match="no CIFAR-FS files found"):
        CifarFS(str(fc), cache=False)
    for s in ("train", "val", "test"):  # FC100's pickles under CIFAR-FS's names
        (fc / f"FC100_{s}.pickle").rename(fc / f"CIFAR_FS_{s}.pickle")
    with pytest.raises(ConfigError, match="CIFAR_FS_train.pickle: 60 classes in the train split, CIFAR-FS has 64"):
        CifarFS(str(fc), cache=False).split("train")


def test_unusual_images_are_converted(tmp_path):
    """CMYK and greyscale JPEGs, a 16-bit greyscale PNG and a palette PNG all decode to RGB."""
    root = F.write_mini(tmp_path / "d", "csv")
    files = sorted((root / "images").glob(f"{F.wnid(80)}*"))
    rgb = F.image(80, 0)
    Image.fromarray(rgb).convert("CMYK").save(files[0], format="JPEG", quality=95)
    grey = Image.fromarray(rgb).convert("L")
    grey.save(files[1], format="JPEG", quality=95)
    ds = MiniImageNet(str(root), image_size=12, cache=False)
    test = ds.split("test")
    x = test.data["image"][:2]
    assert x.shape == (2, 3, 12, 12) and (x[0].float().mean(dim=(1, 2)) - torch.tensor(rgb).float().mean(dim=(0, 1))).abs().max() < 12
    assert torch.equal(x[1][0], x[1][1]) and torch.equal(x[1][1], x[1][2])  # grey: three equal channels
    png16 = tmp_path / "p16.png"
    Image.fromarray((np.asarray(grey, dtype=np.uint16) * 257)).save(png16)
    assert Image.open(png16).mode.startswith("I")
    out = ds.decode("image", str(png16))
    assert out.shape == (3, 12, 12) and (out[0].float() - torch.tensor(np.asarray(grey)).float()).abs().max() <= 1


def test_bad_inputs_are_one_line_and_leave_no_cache(tmp_path):
    cache = tmp_path / "cache"
    l2l = F.write_mini(tmp_path / "l2l", "l2l")
    (l2l / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(ConfigError, match=r"mini-imagenet-cache-test\.pkl: missing \(a file of the test split in the l2l layout"):
        MiniImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("test")
    with open(l2l / "mini-imagenet-cache-test.pkl", "wb") as f:  # MetaOptNet's keys in learn2learn's file
        pickle.dump({"data": np.zeros((2, 4, 4, 3), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match=r"test\.pkl: no key 'image_data' \(it holds \['data', 'labels'\]\); "
                                          r"learn2learn's layout has \['image_data', 'class_dict'\]: a pickle of another layout"):
        MiniImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("test")
    data = (l2l / "mini-imagenet-cache-validation.pkl").read_bytes()
    (l2l / "mini-imagenet-cache-validation.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"validation\.pkl: not a readable pickle \(corrupt or cut short"):
        MiniImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("val")
    (l2l / "mini-imagenet-cache-validation.pkl").write_bytes(pickle.dumps(Path("x")))  # code a pickle would run
    with pytest.raises(ConfigError, match=r"not a pickle of arrays \(refused class pathlib"):
        MiniImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("val")
    with open(l2l / "mini-imagenet-cache-validation.pkl", "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 4, 4, 3), np.uint16), "class_dict": {"a": [0, 1]}}, f)
    with pytest.raises(ConfigError, match=r"'image_data' holds uint16 pixels; expected uint8"):
        MiniImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("val")
    assert not any(p.name.startswith(("mini_imagenet-l2l-val", "mini_imagenet-l2l-test")) for p in cache.glob("*"))

    csv = F.write_mini(tmp_path / "csv", "csv")
    victim = sorted((csv / "images").glob(f"{F.wnid(3)}*"))[0]
    victim.write_bytes(victim.read_bytes()[:60])  # a truncated JPEG
    with pytest.raises(ConfigError, match=re.escape(str(victim)) + r": not a readable image file"):
        MiniImageNet(str(csv), image_size=12, cache_dir=str(cache)).split("train")
    assert not list(cache.glob("mini_imagenet-csv-train*")) and not list(cache.glob("*.tmp"))
    victim.unlink()
    with pytest.raises(ConfigError, match=r"train\.csv: row 8: .*" + victim.name + " not found"):
        MiniImageNet(str(csv), image_size=12, cache_dir=str(cache)).split("train")
    (csv / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(ConfigError, match=r"val\.csv: header \['file', 'class'\], expected filename,label"):
        MiniImageNet(str(csv), image_size=12, cache_dir=str(cache)).split("val")

    closer = F.write_mini(tmp_path / "closer", "closer")
    gone = sorted((closer / "images" / F.wnid(90)).iterdir())[1]
    gone.unlink()
    with pytest.raises(ConfigError, match=r"novel\.json: image_names\[21\] = /home/someone/.*" + gone.name + " not found"):
        MiniImageNet(str(closer), image_size=12, cache_dir=str(cache)).split("test")

    folders = F.write_cifar(tmp_path / "bert", "CIFAR_FS", "folders")
    (folders / "splits" / "bertinetto" / "val.txt").write_text("possum\nno_such_class\n")
    with pytest.raises(ConfigError, match=r"val\.txt: class 'no_such_class' of the val split has no folder"):
        CifarFS(str(folders), cache=False).split("val")


def test_a_class_too_small_for_the_episode_is_named(tmp_path):
    ds = MiniImageNet(str(F.write_mini(tmp_path / "d", "l2l")), image_size=12, cache=False)
    cfg = compose_cfg(["dataset=mini_imagenet", "episode.shot=1", "episode.query=2"])
    with pytest.raises(ConfigError, match=r"episode.shot\+episode.query=3 is impossible: class n01000000 of "
                                          r"the train split has 2 images \(and 63 more classes\)"):
        build_sampler(cfg, ds, "train", "cpu", 1, 0)


def test_tiered_is_memory_mapped_from_the_cache(tmp_path):
    root = F.write_tiered(tmp_path / "d", "metaoptnet")
    cache = tmp_path / "cache"
    first = TieredImageNet(str(root), image_size=12, cache_dir=str(cache)).split("val")
    raw = list(cache.glob("tiered_imagenet-metaoptnet-val-*.u8"))
    assert len(raw) == 1 and raw[0].stat().st_size == first.data["image"].numel()
    again = TieredImageNet(str(root), image_size=12, cache_dir=str(cache)).split("val").data["image"]
    assert torch.equal(again, first.data["image"])
    assert again.untyped_storage().data_ptr() != first.data["image"].untyped_storage().data_ptr()
    ep = EpisodeSampler(TieredImageNet(str(root), image_size=12, cache_dir=str(cache)).split("val"), 5, 1, 1, 2).sample()
    assert ep.query["image"].shape == (2, 5, 3, 12, 12)
    # a PNG that does not decode: an error naming the pickle and item, and no entry for that split
    l2l = F.write_tiered(tmp_path / "l2l", "l2l")
    with open(l2l / "test_images_png.pkl", "rb") as f:
        pngs = pickle.load(f)
    pngs[7] = pngs[7][:30]
    with open(l2l / "test_images_png.pkl", "wb") as f:
        pickle.dump(pngs, f)
    with pytest.raises(ConfigError, match=r"test_images_png\.pkl: \[7\]: not a readable image file"):
        TieredImageNet(str(l2l), image_size=12, cache_dir=str(cache)).split("test")
    assert not list(cache.glob("tiered_imagenet-l2l-test*")) and not list(cache.glob("*.tmp"))


def test_cub_splits_modalities_and_crop(tmp_path):
    root = F.write_cub(tmp_path / "c", per_class=2)
    cache = str(tmp_path / "cache")
    ds = CUB(str(root), image_size=16, cache_dir=cache, modalities=["image", "attributes", "text", "class_attributes"])
    names = {s: ds.class_names(s) for s in ("train", "val", "test")}
    folders = sorted(f"{c:03d}.Bird_{c}" for c in range(1, 201))
    assert names["train"] == folders[0::2] and names["val"] == folders[1::4] and names["test"] == folders[3::4]
    meta = CUB(str(root / "CUB_200_2011"), split="metadataset", image_size=16, cache_dir=cache)
    assert [int(n[:3]) for n in meta.class_names("test")] == list(METADATASET["test"])
    assert len(meta.class_names("train")) == 140
    train = ds.split("train")
    # attributes: (2 * present - 1) * certainty weight, by definition for image 1 (class 1, first image)
    a = 1 + np.arange(312)
    present, certainty = ((a + 1) % 3 == 0).astype(np.float32), 1 + a % 4
    expected = (2 * present - 1) * np.array([0, 0, 1 / 3, 2 / 3, 1], np.float32)[certainty]
    assert np.allclose(train.data["attributes"][0].numpy(), expected)
    assert np.allclose(train.data["class_attributes"][0].numpy(), ((1 * a) % 100) / 100)
    # captions: ten per image, ids from the train split's vocabulary (0 pads)
    assert train.data["text"].shape == (200, 10, 32) and (train.data["text"][:, :, 12:] == 0).all()
    assert ds.spec("text").vocab == len(ds.vocab()) + 2 and "beak" in ds.vocab()
    picks = {tuple(EpisodeSampler(train, 5, 1, 1, 4, seed=s).sample().support["text"][0, 0].tolist()) for s in range(8)}
    assert len(picks) > 1  # one caption drawn per sample and episode
    # crop=true: the box (x 2, y 3, 10 x 9 px of a 16 px image) is cut out before the resize
    crop = CUB(str(root), image_size=16, cache_dir=cache, crop=True)
    full, boxed = ds.split("test").data["image"][0], crop.split("test").data["image"][0]
    assert not torch.equal(full, boxed)
    (root / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(ConfigError, match=r"bounding_boxes\.txt: missing \(a file of the val split"):
        CUB(str(root), image_size=16, cache=False, crop=True).split("val")


def test_class_level_side_information_never_reaches_a_query(tmp_path):
    root = F.write_cub(tmp_path / "c", per_class=2, captions=False)
    cfg = compose_cfg(["+exp=smoke", "dataset=cub", f"dataset.root={root}", "dataset.image_size=16",
                       "dataset.modalities=[image,class_attributes]", "fusion=am3", "encoder.dim=8",
                       "encoder.image.hidden=8", "encoder.vector.hidden=8", "episode.query=1"])
    ds = CUB(str(root), image_size=16, cache=False, modalities=["image", "class_attributes"])
    algo = build_algorithm(cfg, ds)
    seen = []
    algo.register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # after the hiding hook
    episode = EpisodeSampler(ds.split("val"), 3, 1, 1, 2).sample()
    assert episode.query_present[..., 1].all()  # the sampler draws it ...
    algo(episode)
    assert seen[0].support_present[..., 1].all() and not seen[0].query_present[..., 1].any()  # ... queries never see it
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32))
    fs = F.write_cifar(tmp_path / "fs", "CIFAR_FS", "metaoptnet")
    ds = CifarFS(str(fs), cache=False, class_embeddings=str(emb), modalities=["image", "class_embedding"])
    d = ds.split("test")
    assert ds.modalities["class_embedding"].level == "class"
    row = sorted(F.FINE).index(ds.class_names("test")[int(d.labels[0])])
    assert torch.allclose(d.data["class_embedding"][0], torch.from_numpy(np.load(emb)[row]))
    np.save(emb, np.zeros((99, 4), np.float32))
    with pytest.raises(ConfigError, match=r"emb\.npy: 99 rows, but CIFAR-FS has 100 classes"):
        CifarFS(str(fs), cache=False, class_embeddings=str(emb), modalities=["image", "class_embedding"]).split("test")
    with pytest.raises(ConfigError, match="class-level side information alone"):
        only = CUB(str(root), image_size=16, cache=False, modalities=["class_attributes"])
        build_algorithm(compose_cfg(["+exp=smoke", "dataset=cub", f"dataset.root={root}", "encoder.dim=8"]), only)
