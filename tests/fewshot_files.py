"""Tiny copies of the few-shot benchmarks in each real on-disk layout (real file names, pickle
keys, CSV headers and JSON keys), written by the tests into a temporary folder: a few pixels and
a few images per class, but the documented class counts (64/16/20, 351/97/160, 60/20/20, 200)."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from metamm_cli.data.cifar import FINE

MINI = {"train": 64, "val": 16, "test": 20}
TIERED = {"train": 351, "val": 97, "test": 160}
CIFAR_FS = {"train": 64, "val": 16, "test": 20}
FC100 = {"train": 60, "val": 20, "test": 20}
SIZE = 12  # pixels of the written images


def image(cls: int, j: int, size: int = SIZE) -> np.ndarray:
    """A class-coloured ``[size, size, 3]`` uint8 image with a little per-image noise."""
    rng = np.random.default_rng(cls * 1000 + j)
    base = np.array([(cls * 37) % 256, (cls * 91) % 256, (cls * 53) % 256], dtype=np.int64)
    return np.clip(base + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def class_ranges(counts):
    """``{split: range of global class ids}``, splits in train, val, test order."""
    out, start = {}, 0
    for s in ("train", "val", "test"):
        out[s] = range(start, start + counts[s])
        start += counts[s]
    return out


def wnid(c: int) -> str:
    return f"n{1000000 + c:08d}"


def write_mini(root: Path, layout: str, per_class: int = 2, counts=MINI) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ranges = class_ranges(counts)
    if layout == "l2l":
        for s, name in (("train", "train"), ("val", "validation"), ("test", "test")):
            data = np.stack([image(c, j) for c in ranges[s] for j in range(per_class)])
            class_dict = {wnid(c): list(range(i * per_class, (i + 1) * per_class)) for i, c in enumerate(ranges[s])}
            with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    elif layout == "csv":
        (root / "images").mkdir()
        for s in ("train", "val", "test"):
            rows = ["filename,label"]
            for c in ranges[s]:
                for j in range(per_class):
                    name = f"{wnid(c)}{j + 1:08d}.jpg"
                    Image.fromarray(image(c, j)).save(root / "images" / name, quality=95)
                    rows.append(f"{name},{wnid(c)}")
            (root / f"{s}.csv").write_text("\n".join(rows) + "\n")
    elif layout == "metaoptnet":
        files = {"train": "train_phase_train", "val": "val", "test": "test"}
        for s, part in files.items():
            data = np.stack([image(c, j) for c in ranges[s] for j in range(per_class)])
            labels = [c for c in ranges[s] for _ in range(per_class)]
            with open(root / f"miniImageNet_category_split_{part}.pickle", "wb") as f:
                pickle.dump({"data": data, "labels": labels,
                             "catname2label": {wnid(c): c for c in ranges[s]}}, f, protocol=2)
    elif layout == "closer":
        every = [wnid(c) for c in range(sum(counts.values()))]
        for s, name in (("train", "base"), ("val", "val"), ("test", "novel")):
            names, labels = [], []
            for c in ranges[s]:
                d = root / "images" / wnid(c)
                d.mkdir(parents=True, exist_ok=True)
                for j in range(per_class):
                    p = d / f"{wnid(c)}_{j}.JPEG"
                    Image.fromarray(image(c, j)).save(p, format="JPEG", quality=95)
                    # absolute paths of another machine, as CloserLook's script writes them
                    names.append(f"/home/someone/ILSVRC2015/Data/CLS-LOC/train/{wnid(c)}/{p.name}")
                    labels.append(c)
            (root / f"{name}.json").write_text(json.dumps({"label_names": every, "image_names": names,
                                                           "image_labels": labels}))
    else:
        raise ValueError(layout)
    return root


def write_tiered(root: Path, layout: str, per_class: int = 2, counts=TIERED) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ranges = class_ranges(counts)
    for s in ("train", "val", "test"):
        arrays = [image(c, j) for c in ranges[s] for j in range(per_class)]
        local = np.array([i for i in range(len(ranges[s])) for _ in range(per_class)])
        labels = {"label_specific": local, "label_general": local // 10,
                  "label_specific_str": [wnid(c) for c in ranges[s]],
                  "label_general_str": [f"category{i}" for i in range(len(ranges[s]) // 10 + 1)]}
        with open(root / f"{s}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
        if layout == "l2l":
            with open(root / f"{s}_images_png.pkl", "wb") as f:
                pickle.dump([np.frombuffer(png_bytes(a), dtype=np.uint8) for a in arrays], f, protocol=2)
        elif layout == "metaoptnet":
            np.savez(root / f"{s}_images.npz", images=np.stack(arrays))
        else:
            raise ValueError(layout)
    return root


def write_cifar(root: Path, name: str, layout: str, per_class: int = 2) -> Path:
    """``name``: CIFAR_FS or FC100."""
    counts = CIFAR_FS if name == "CIFAR_FS" else FC100
    root.mkdir(parents=True, exist_ok=True)
    ranges = class_ranges(counts)
    order = list(range(100)) if name == "CIFAR_FS" else list(range(99, -1, -1))
    for s in ("train", "val", "test"):
        ids = [order[c] for c in ranges[s]]
        if layout == "metaoptnet":
            data = np.stack([image(c, j, 32) for c in ids for j in range(per_class)])
            with open(root / f"{name}_{s}.pickle", "wb") as f:
                pickle.dump({"data": data, "labels": [c for c in ids for _ in range(per_class)]}, f, protocol=2)
        elif layout == "folders":
            lists = root / "splits" / ("bertinetto" if name == "CIFAR_FS" else "fc100")
            lists.mkdir(parents=True, exist_ok=True)
            (lists / f"{s}.txt").write_text("\n".join(FINE[c] for c in ids) + "\n")
            for c in ids:
                d = root / "data" / FINE[c]
                d.mkdir(parents=True)
                for j in range(per_class):
                    Image.fromarray(image(c, j, 32)).save(d / f"{FINE[c]}_s_{j:06d}.png")
        else:
            raise ValueError(layout)
    return root


def write_cub(root: Path, per_class: int = 2, captions: bool = True) -> Path:
    """``root/CUB_200_2011`` (images.txt, images/, bounding_boxes.txt, attributes/) and
    ``root/cvpr2016_cub/text_c10``."""
    base = root / "CUB_200_2011"
    (base / "attributes").mkdir(parents=True)
    images, boxes, attrs, classes = [], [], [], []
    image_id = 0
    words = ["red", "blue", "yellow", "wing", "beak", "crown", "tail", "small", "large", "striped"]
    for c in range(1, 201):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        (base / "images" / folder).mkdir(parents=True)
        for j in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{j + 1:04d}_{image_id}.jpg"
            Image.fromarray(image(c, j, 16)).save(base / "images" / rel, quality=95)
            images.append(f"{image_id} {rel}")
            boxes.append(f"{image_id} 2.0 3.0 10.0 9.0")
            for a in range(1, 313):
                present = int((a + c) % 3 == 0)
                attrs.append(f"{image_id} {a} {present} {1 + (a + j) % 4} 1.5")
            if captions:
                t = root / "cvpr2016_cub" / "text_c10" / folder
                t.mkdir(parents=True, exist_ok=True)
                lines = [f"this bird has a {words[c % 10]} {words[(c + k) % 10]} and a {words[k]} beak." for k in range(10)]
                (t / Path(rel).with_suffix(".txt").name).write_text("\n".join(lines) + "\n")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    (base / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (base / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attrs) + "\n")
    cont = "\n".join(" ".join(f"{(c * a) % 100:.6f}" for a in range(1, 313)) for c in range(1, 201))
    (base / "attributes" / "class_attribute_labels_continuous.txt").write_text(cont + "\n")
    return root
