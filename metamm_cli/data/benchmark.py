"""What the image benchmarks of few-shot learning share (miniImageNet, tieredImageNet, CIFAR-FS,
FC100, CUB): read the layout the user has (:mod:`metamm_cli.data.layouts`), found by looking at
``root`` or named by ``layout``; check the documented class counts; decode once into the cache as
uint8 at ``image_size``; attach the field's image pipeline (:mod:`metamm_cli.data.augment`).

- **Decoding.** Arrays already decoded (pickles, ``.npz``) are converted (greyscale to RGB;
  another size resized with Lanczos, as :func:`decode_image` does); image files and encoded bytes
  go through :func:`decode_image` (CMYK, greyscale, 16-bit, palette and transparent images
  converted; truncated or corrupt files refused naming the file). A split is decoded whole before
  its cache entry is written (an error or an interrupt leaves none).
- **Memory.** ``storage=auto``: a split in memory, except for sets that declare themselves too
  large (``MAPPED``: tieredImageNet, 16.5 GB at 84 px), which are memory-mapped from the cache
  (``storage=mapped`` forces it, ``memory`` forbids it); on a GPU a split's images move to the
  device only where they fit in its free memory (half of it), else episodes are gathered on the
  host and their images moved.
- **Classes.** Numbered by their names in sorted order, whatever the layout. The counts are
  checked against ``CLASSES`` (``check_classes=false``: a warning instead, for subsets).
- **Side information.** ``class_embeddings=FILE.npy`` (rows: every class of the set, in sorted
  name order across the three splits) adds the class-level modality ``class_embedding``: the
  support samples carry their class's vector (AM3's semantic input, ``fusion=am3``); queries never
  do (:attr:`ModalitySpec.level` ``class``).
- **Pipeline.** ``augment`` (train split: random crop, jitter, flip, drawn from the sampler's
  generator) and ``normalize`` (the set's mean/std, ``MEAN``/``STD``); the test splits get the
  resize-by-1.15 and centre crop.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.augment import ImagePipeline, Transforms
from metamm_cli.data.base import SPLITS, MultimodalDataset, files_digest, require_path
from metamm_cli.data.cache import cached, mapped
from metamm_cli.data.decode import decode_image, load_npy, as_float_array
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.layouts import Layout, Source, describe_origin
from metamm_cli.data.progress import decoding, say

log = logging.getLogger("metamm")

FORMAT = 1  # of state_dict()
STORAGE = ("auto", "memory", "mapped")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AUGMENT = {"train": True, "crop": "resized", "pad": 8, "jitter": 0.4, "flip": True, "test_resize": 1.15}


def resize_array(img: np.ndarray, size: int) -> np.ndarray:
    """One ``[H, W, 3]`` uint8 image -> ``[size, size, 3]`` (Pillow's Lanczos, as decode_image)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def array_chunk(x: np.ndarray, size: int) -> torch.Tensor:
    """Decoded images ``[n, H, W(, 1|3)]`` uint8 -> ``[n, 3, size, size]`` uint8."""
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = np.stack([resize_array(np.ascontiguousarray(im), size) for im in x])
    return torch.from_numpy(np.require(x, requirements=["C", "W"])).permute(0, 3, 1, 2)  # (a copy if read-only)


class ImageBenchmark(MultimodalDataset):
    """Subclasses set ``name``, ``TITLE``, ``LAYOUTS`` (name -> :class:`Layout`, in detection
    order), ``CLASSES`` (documented counts per split, or a mapping of alternatives),
    ``MEAN``/``STD``, ``HOME`` (where the files come from) and ``MAPPED``."""

    name = "benchmark"
    TITLE = "benchmark"
    HOME = ""
    LAYOUTS: Dict[str, Layout] = {}
    CLASSES: Dict[str, int] = {}
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    MAPPED = False

    def __init__(self, root: str, layout: str = "auto", image_size: int = 84, check_classes: bool = True,
                 augment: Optional[Mapping] = None, normalize: bool = True,
                 class_embeddings: Optional[str] = None, storage: str = "auto", cache: bool = True,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None):
        self.root = require_path(root, "dataset.root", f"the folder holding your {self.TITLE} files")
        if not self.root.is_dir():
            raise ConfigError(f"dataset.root={root}: no such folder; it should hold {self.TITLE} in one of "
                              f"the layouts {self.layout_docs()}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 512:
            raise ConfigError(f"dataset.image_size={image_size}: must be an integer in [8, 512]")
        if storage not in STORAGE:
            raise ConfigError(f"dataset.storage={storage}: must be one of {', '.join(STORAGE)}")
        self.augment = {**AUGMENT, **(augment or {})}
        unknown = sorted(set(self.augment) - set(AUGMENT))
        if unknown:
            raise ConfigError(f"dataset.augment.{unknown[0]}: not a setting; allowed: {sorted(AUGMENT)}")
        self.image_size, self.check_classes, self.normalize = image_size, check_classes, normalize
        self.storage, self.cache, self.cache_dir = storage, cache, cache_dir
        self.layout = self.find_layout(layout)
        self.class_embeddings = None if class_embeddings in (None, "") else Path(str(class_embeddings)).expanduser()
        self._entries: Dict[str, dict] = {}
        self._expected: Optional[Dict[str, List[str]]] = None
        self._side: Optional[torch.Tensor] = None
        super().__init__(modalities)

    # -- layout ----------------------------------------------------------------------------
    @classmethod
    def layout_docs(cls) -> str:
        return "; ".join(f"{k}: {v.doc}" for k, v in cls.LAYOUTS.items())

    def find_layout(self, layout: str) -> Layout:
        if layout != "auto":
            if layout not in self.LAYOUTS:
                raise ConfigError(f"dataset.layout={layout}: must be auto or one of {', '.join(self.LAYOUTS)}")
            return self.LAYOUTS[layout]
        found = [v for v in self.LAYOUTS.values() if v.detect(self.root)]
        if not found:
            raise ConfigError(f"dataset.root={self.root}: no {self.TITLE} files found; expected one of the "
                              f"layouts {self.layout_docs()}{f' ({self.HOME})' if self.HOME else ''}")
        if len(found) > 1:
            log.info(f"dataset.root={self.root} holds the {', '.join(v.name for v in found)} layouts of "
                     f"{self.TITLE}: reading {found[0].name} (dataset.layout=NAME picks another)")
        return found[0]

    # -- modalities ------------------------------------------------------------------------
    def modality_names(self) -> List[str]:
        return ["image"] + (["class_embedding"] if self.class_embeddings is not None else [])

    @property
    def all_modalities(self) -> Dict[str, ModalitySpec]:  # type: ignore[override]
        return {m: self.spec(m) for m in self.modality_names()}

    def spec(self, m: str) -> ModalitySpec:
        if m == "image":
            return ModalitySpec((3, self.image_size, self.image_size), torch.float32, "image")  # held as uint8
        if m == "class_embedding":
            return ModalitySpec((self.side_info().shape[1],), torch.float32, "vector", level="class")
        raise KeyError(m)

    def side_info(self) -> torch.Tensor:
        """``class_embeddings``: ``[classes, D]`` float32, rows in sorted class-name order."""
        if self._side is None:
            path = self.class_embeddings
            if not path.is_file():
                raise ConfigError(f"dataset.class_embeddings={path}: no such file (a .npy of one row per class)")
            x = as_float_array(load_npy(path), str(path))
            if x.ndim != 2 or not np.isfinite(x).all():
                raise ConfigError(f"{path}: expected a finite [classes, D] array (one row per class of "
                                  f"{self.TITLE}, in sorted class-name order), got shape {list(x.shape)}")
            self._side = torch.from_numpy(x)
        return self._side

    def class_rows(self, split: str) -> torch.Tensor:
        """The row of each class of ``split`` in the set's sorted list of all class names."""
        every = sorted({n for s in SPLITS for n in self.class_names(s)})
        at = {n: i for i, n in enumerate(every)}
        return torch.tensor([at[n] for n in self.class_names(split)])

    # -- splits -------------------------------------------------------------------------------
    def expected_classes(self, split: str) -> Sequence[int]:
        """The documented class counts of ``split`` (one, or the alternatives of several splits)."""
        return [self.CLASSES[split]]

    def check_count(self, split: str, names: List[str], where: str) -> None:
        allowed = self.expected_classes(split)
        if len(names) in allowed:
            return
        what = " or ".join(str(n) for n in allowed)
        line = (f"{where}: {len(names)} classes in the {split} split, {self.TITLE} has {what} "
                f"({self.documented()}); a partial or different copy?")
        if self.check_classes:
            raise ConfigError(line + " (dataset.check_classes=false accepts it)")
        log.warning(line + " (accepted: dataset.check_classes=false)")

    def documented(self) -> str:
        return "/".join(str(self.CLASSES[s]) for s in SPLITS) + " train/val/test"

    def settings(self, split: str) -> dict:
        """What the cached arrays depend on besides the files (a new value: a new entry)."""
        return {"kind": f"{self.name}-{self.layout.name}", "split": split, "size": self.image_size}

    def read(self, split: str) -> Source:
        return self.layout.read(self.root, split)

    def entry(self, split: str) -> dict:
        """``{"images": uint8 [N, 3, s, s], "labels": int64 [N], "names": [...], "origin": {...}}``
        of ``split``, from the cache or decoded now (its class count checked first)."""
        if split not in self._entries:
            files = self.layout.split_files(self.root, split)
            for f in files:
                if not f.is_file():
                    raise ConfigError(f"{f}: missing (a file of the {split} split in the {self.layout.name} "
                                      f"layout: {self.layout.doc})")

            def build(alloc=None):
                src = self.read(split)
                self.check_count(split, src.names, str(files[0]))
                return {**self.decode_source(src, split, alloc), "labels": torch.from_numpy(src.labels),
                        "names": list(src.names), "origin": src.origin}

            name = f"{self.name}-{self.layout.name}-{split}"
            if self.mapped():
                e = mapped(name, files, self.settings(split), build, self.cache_dir, self.cache)
            else:
                e = cached(name, files, self.settings(split), build, self.cache_dir, self.cache)
            self.check_count(split, e["names"], str(files[0]))
            if self._expected is not None and list(e["names"]) != self._expected[split]:
                gone = [n for n in self._expected[split] if n not in e["names"]]
                what = f"class {gone[0]}" if gone else "its class list"
                raise ConfigError(f"{files[0]}: {what} of the {split} split differs from the checkpoint's "
                                  f"(it was trained with {len(self._expected[split])} classes); other files?")
            self._entries[split] = e
        return self._entries[split]

    def mapped(self) -> bool:
        return self.storage == "mapped" or (self.storage == "auto" and self.MAPPED)

    def decode_source(self, src: Source, split: str, alloc=None) -> dict:
        """The images of ``src`` as uint8 ``[N, 3, s, s]`` (into ``alloc(shape)`` when given) plus
        any per-row extras a subclass decodes (``extra_rows``)."""
        s, n = self.image_size, len(src)
        shape = (n, 3, s, s)
        out = alloc(shape) if alloc is not None else None
        images = torch.from_numpy(out) if out is not None else torch.empty(shape, dtype=torch.uint8)
        what = f"images of the {split} split ({self.layout.name} layout, {self.root})"
        if src.arrays is not None:
            say(f"converting {n} {what}")
            done = 0
            for chunk in src.arrays():
                images[done:done + len(chunk)] = array_chunk(chunk, s)
                done += len(chunk)
            if done != n:
                raise ConfigError(f"{describe_origin(src.origin, 0)}: {done} images for {n} labels")
        else:
            boxes = src.extra.get("boxes")
            for i, (label, item) in enumerate(decoding(src.items, what)):
                box = boxes[i] if boxes is not None else None
                images[i] = decode_image(item, s, 3, name=label, box=box)
        return {"images": out if out is not None else images, **self.extra_rows(src, split)}

    def extra_rows(self, src: Source, split: str) -> dict:
        """Per-row tensors of other modalities a subclass decodes with the images (cached with them)."""
        return {}

    def build_split(self, split: str) -> SplitData:
        e = self.entry(split)
        labels = e["labels"].long()
        data = {"image": e["images"]}
        if "class_embedding" in self._wanted:
            side = self.side_info()
            rows = self.class_rows(split)
            if len(side) != len(self.all_class_names()):
                raise ConfigError(f"{self.class_embeddings}: {len(side)} rows, but {self.TITLE} has "
                                  f"{len(self.all_class_names())} classes (one row each, sorted by name)")
            data["class_embedding"] = side[rows][labels]
        data.update(self.split_modalities(split, e, labels))
        names = self.modality_names()
        present = torch.ones(len(labels), len(names), dtype=torch.bool)
        return SplitData({m: data[m] for m in names if m in data}, present, labels, len(e["names"]))

    def split_modalities(self, split: str, entry: dict, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The other modalities of a split that ``dataset.modalities`` asks for (a subclass's)."""
        return {}

    def all_class_names(self) -> List[str]:
        return sorted({n for s in SPLITS for n in self.class_names(s)})

    def class_names(self, split: str) -> List[str]:
        return list(self.entry(split)["names"])

    def num_classes(self, split: str) -> int:
        return len(self.entry(split)["names"])

    def split(self, split: str, device="cpu") -> SplitData:
        """As the base's, but on a GPU a split's images stay on the host when they do not fit in
        half of the device's free memory (episodes then gather there)."""
        key = (split, str(device))
        dev = torch.device(device)
        if dev.type == "cuda" and key not in self._cache:
            cpu = super().split(split, "cpu")
            images = cpu.data["image"]
            free, _ = torch.cuda.mem_get_info(dev)
            if images.numel() > free // 2:
                log.info(f"{self.TITLE} {split} images ({images.numel() / 2**30:.1f} GiB) stay on the host "
                         f"({free / 2**30:.1f} GiB free on {dev}); episodes gather them there")
                moved = replace(cpu, data={}).to(dev)
                self._cache[key] = replace(moved, data={m: x if m == "image" else x.to(dev)
                                                        for m, x in cpu.data.items()})
        return super().split(split, device)

    def transform(self, split: str):
        a = self.augment
        mean, std = (self.MEAN, self.STD) if self.normalize else ((0.0,) * 3, (1.0,) * 3)
        pipeline = ImagePipeline(mean, std, random=bool(a["train"]) and split == "train", crop=a["crop"],
                                 pad=a["pad"], jitter=a["jitter"], flip=a["flip"], test_resize=a["test_resize"])
        return Transforms({"image": pipeline, **self.transforms(split)})

    def transforms(self, split: str) -> dict:
        """Per-modality transforms of other modalities (a subclass's)."""
        return {}

    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality != "image":
            raise ConfigError(f"dataset {self.name}: fixed-episode files of modality '{modality}' are "
                              f"not read (only image)")
        return decode_image(path, self.image_size, 3)

    def describe_row(self, split: str, row: int) -> str:
        return describe_origin(self.entry(split)["origin"], row)

    def describe(self) -> str:
        mods = ", ".join(f"{m}{list(s.shape)}" for m, s in self.modalities.items())
        aug = "augmented" if self.augment["train"] else "not augmented"
        return (f"{self.name} ({self.layout.name} layout, {self.image_size} px, stored uint8, train {aug}, "
                f"{'normalised' if self.normalize else '[0, 1]'}): {mods}")

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dataset": self.name, "format": FORMAT, "layout": self.layout.name,
                "classes": {s: self.class_names(s) for s in SPLITS}}

    def load_state_dict(self, state: dict) -> None:
        if not self._check_state(state):
            return
        classes = state.get("classes")
        if classes is not None:
            self._expected = {s: [str(c) for c in classes[s]] for s in SPLITS}
        self._entries.clear()
        self._cache.clear()
        self._kept.clear()

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        return {s: files_digest(self.layout.split_files(self.root, s), self.root, self.settings(s)) for s in SPLITS}
