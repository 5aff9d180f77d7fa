"""CUB-200-2011 (Wah et al. 2011): 11,788 photographs of 200 bird species, read from the raw
``CUB_200_2011/`` folder (``root`` is that folder or its parent), with its attributes and Reed et
al.'s captions as further modalities (``dataset.modalities``, a subset of):

- ``image``: ``images/<class>/<file>.jpg`` (the ids of ``images.txt``), cropped to
  ``bounding_boxes.txt``'s box when ``crop=true``, resized to ``image_size`` (84);
- ``attributes``: the 312 per-image attribute labels of
  ``attributes/image_attribute_labels.txt``, weighted by their certainty: ``(2 * is_present - 1)
  * c`` with ``c`` = 0, 1/3, 2/3, 1 for "not visible", "guessing", "probably", "definitely"
  (in [-1, 1]; 0 where the annotator could not see it);
- ``text``: Reed et al.'s ten captions per image (``text_c10/<class>/<file>.txt``, from
  ``cvpr2016_cub``; found beside or inside ``root``, or at ``text_dir``), lower-cased words ->
  token ids of a vocabulary learned on the train split (0 pads, 1 is an unknown word), ``[10,
  text_length]`` per image; one caption is drawn per sample and episode from the sampler's
  generator (the first where no generator is at hand, e.g. fixed-episode files);
- ``class_attributes``: class-level side information, the 312 continuous class attribute
  values of ``attributes/class_attribute_labels_continuous.txt`` / 100 (``level=class``: support
  samples only; AM3's semantic input with ``fusion=am3``).

Class splits (``split``):

- ``closer`` (default; Chen et al. 2019's ``write_CUB_filelist.py``): the class folders sorted,
  even indices train, index mod 4 = 1 validation, mod 4 = 3 test: 100 / 50 / 50;
- ``metadataset`` (Triantafillou et al. 2020, the lists learn2learn and easyfsl use): 140 / 30 / 30
  (the validation and test class ids below; the rest train).

Memory at 84 px: 11,788 x 3 x 84 x 84 bytes = 250 MB (attributes 15 MB, captions 30 MB).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.augment import PickView
from metamm_cli.data.benchmark import IMAGENET_MEAN, IMAGENET_STD, ImageBenchmark
from metamm_cli.data.cache import cached
from metamm_cli.data.decode import decode_image, decode_text
from metamm_cli.data.episodes import ModalitySpec
from metamm_cli.data.layouts import Layout, Source, need_file
from metamm_cli.data.progress import decoding

# Meta-Dataset's CUB split (learn2learn cu_birds200.py SPLITS; easyfsl): class ids of images/NNN.*
METADATASET = {
    "val": (44, 51, 52, 55, 57, 61, 64, 66, 68, 72, 76, 80, 84, 96, 113, 121, 127, 136, 140, 145, 150,
            155, 159, 162, 172, 176, 178, 198, 199, 200),
    "test": (8, 9, 15, 20, 28, 30, 35, 39, 45, 46, 82, 85, 94, 101, 103, 112, 118, 122, 128, 133, 134,
             137, 147, 148, 163, 168, 169, 170, 193, 194),
}
COUNTS = {"closer": {"train": 100, "val": 50, "test": 50}, "metadataset": {"train": 140, "val": 30, "test": 30}}
CAPTIONS = 10
ATTRIBUTES = 312
CERTAINTY = {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def cub_folder(root: Path) -> Path:
    """``root`` itself, or its ``CUB_200_2011/`` child, whichever holds ``images.txt``."""
    return root / "CUB_200_2011" if not (root / "images.txt").is_file() and \
        (root / "CUB_200_2011" / "images.txt").is_file() else root


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def numbered_lines(path: Path, what: str, fields: int) -> List[List[str]]:
    """The lines of one of CUB's ``<id> <value> ...`` files, each cut to ``fields`` fields."""
    need_file(path, what)
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < fields:
            raise ConfigError(f"{path}: line {i} has {len(parts)} fields, expected {fields} ({what})")
        out.append(parts[:fields])
    return out


class RawCUB(Layout):
    """The raw ``CUB_200_2011/`` folder: ``images.txt`` + ``images/``, split by ``protocol``."""

    name = "raw"
    doc = "CUB_200_2011/ (images.txt, images/<class>/*.jpg, bounding_boxes.txt, attributes/)"

    def __init__(self, protocol: str, crop: bool):
        self.protocol, self.crop = protocol, crop

    def detect(self, root):
        return (cub_folder(root) / "images.txt").is_file()

    def images(self, root: Path) -> List[Tuple[int, str]]:
        """``(image id, "class/file.jpg")`` of images.txt."""
        base = cub_folder(root)
        rows = []
        for image_id, rel in numbered_lines(base / "images.txt", "CUB's image list: <id> <class>/<file>", 2):
            if "/" not in rel or not image_id.isdigit():
                raise ConfigError(f"{base / 'images.txt'}: '{image_id} {rel}' is not '<id> <class>/<file>'")
            rows.append((int(image_id), rel))
        return rows

    def classes(self, root: Path, split: str) -> List[str]:
        base = cub_folder(root)
        folder = base / "images"
        if not folder.is_dir():
            raise ConfigError(f"{folder}: missing (CUB's images/<class>/ folders)")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.protocol == "closer":
            rule = {"train": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "test": lambda i: i % 4 == 3}[split]
            return [n for i, n in enumerate(names) if rule(i)]
        held = {int(v) for s in ("val", "test") for v in METADATASET[s]}
        ids = {n: int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1 for n in names}
        if split == "train":
            return [n for n in names if ids[n] not in held]
        return [n for n in names if ids[n] in METADATASET[split]]

    def rows(self, root: Path, split: str) -> List[Tuple[int, str, str]]:
        """``(image id, relative path, class)`` of the split's images, by path."""
        keep = set(self.classes(root, split))
        return sorted(((i, rel, rel.split("/")[0]) for i, rel in self.images(root) if rel.split("/")[0] in keep),
                      key=lambda r: r[1])

    def split_files(self, root, split):
        base = cub_folder(root)
        rows = self.rows(root, split)
        files = [base / "images" / rel for _, rel, _ in rows]
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{base / 'images.txt'}: {f} not found")
        extra = [base / "bounding_boxes.txt"] if self.crop else []
        return [base / "images.txt"] + extra + files

    def boxes(self, root: Path) -> Dict[int, Tuple[float, ...]]:
        path = cub_folder(root) / "bounding_boxes.txt"
        out = {}
        for parts in numbered_lines(path, "CUB's boxes: <id> <x> <y> <width> <height> (dataset.crop=true)", 5):
            try:
                out[int(parts[0])] = tuple(float(v) for v in parts[1:5])
            except ValueError:
                raise ConfigError(f"{path}: '{' '.join(parts)}' is not '<id> <x> <y> <width> <height>'") from None
        return out

    def read(self, root, split):
        base = cub_folder(root)
        rows = self.rows(root, split)
        names = sorted({c for _, _, c in rows})
        at = {n: i for i, n in enumerate(names)}
        labels = np.array([at[c] for _, _, c in rows], dtype=np.int64)
        paths = [base / "images" / rel for _, rel, _ in rows]
        extra: Dict[str, object] = {"ids": [i for i, _, _ in rows]}
        if self.crop:
            boxes = self.boxes(root)
            missing = [rel for i, rel, _ in rows if i not in boxes]
            if missing:
                raise ConfigError(f"{base / 'bounding_boxes.txt'}: no box for {missing[0]} (dataset.crop=true)")
            extra["boxes"] = [boxes[i] for i, _, _ in rows]
        return Source(names, labels, {"paths": [str(p) for p in paths]},
                      items=[(str(p), p) for p in paths], extra=extra)


class CUB(ImageBenchmark):
    name = "cub"
    TITLE = "CUB-200-2011"
    HOME = "the raw CUB_200_2011 folder (Caltech), plus cvpr2016_cub/text_c10 for captions"
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, root: str, split: str = "closer", crop: bool = False, text_dir: Optional[str] = None,
                 text_length: int = 32, min_count: int = 1, layout: str = "auto", image_size: int = 84,
                 check_classes: bool = True, augment: Optional[Mapping] = None, normalize: bool = True,
                 class_embeddings: Optional[str] = None, storage: str = "auto", cache: bool = True,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None):
        if split not in COUNTS:
            raise ConfigError(f"dataset.split={split}: must be closer (CloserLook's 100/50/50) or "
                              f"metadataset (Meta-Dataset's 140/30/30)")
        if not isinstance(text_length, int) or text_length < 1:
            raise ConfigError(f"dataset.text_length={text_length}: must be an integer >= 1")
        self.protocol, self.crop = split, bool(crop)
        self.text_dir, self.text_length, self.min_count = text_dir, text_length, int(min_count)
        self.LAYOUTS = {"raw": RawCUB(split, self.crop)}
        self.CLASSES = COUNTS[split]
        self._vocab: Optional[List[str]] = None
        self._captions: Optional[dict] = None
        self._attributes: Optional[dict] = None
        super().__init__(root, layout, image_size, check_classes, augment, normalize, class_embeddings,
                         storage, cache, cache_dir, modalities)

    def expected_classes(self, split: str) -> Sequence[int]:
        return [COUNTS[self.protocol][split]]

    def settings(self, split: str) -> dict:
        return {**super().settings(split), "protocol": self.protocol, "crop": self.crop}

    @property
    def base(self) -> Path:
        return cub_folder(self.root)

    # -- modalities ----------------------------------------------------------------------------
    def modality_names(self) -> List[str]:
        return ["image", "attributes", "text", "class_attributes"] + super().modality_names()[1:]

    def spec(self, m: str) -> ModalitySpec:
        if m in ("attributes", "class_attributes"):
            return ModalitySpec((ATTRIBUTES,), torch.float32, "vector", level="class" if m == "class_attributes" else "sample")
        if m == "text":
            return ModalitySpec((self.text_length,), torch.int64, "tokens", vocab=len(self.vocab()) + 2)
        return super().spec(m)

    def transforms(self, split: str) -> dict:
        return {"text": PickView(rank=1)}

    # -- attributes ------------------------------------------------------------------------------
    def attributes(self) -> dict:
        """``{"ids": [n], "values": [n, 312]}`` for every image, certainty-weighted (cached)."""
        if self._attributes is None:
            path = self.base / "attributes" / "image_attribute_labels.txt"
            need_file(path, "CUB's per-image attributes (dataset.modalities has attributes)")

            def build():
                rows = numbered_lines(path, "<image id> <attribute id> <is_present> <certainty id> ...", 4)
                try:
                    a = np.array(rows, dtype=np.int64)
                except ValueError:
                    raise ConfigError(f"{path}: a line holds a non-integer id, flag or certainty") from None
                bad = (a[:, 1] < 1) | (a[:, 1] > ATTRIBUTES) | ~np.isin(a[:, 2], (0, 1)) | ~np.isin(a[:, 3], (1, 2, 3, 4))
                if bad.any():
                    raise ConfigError(f"{path}: line {int(np.argmax(bad)) + 1} '{' '.join(rows[int(np.argmax(bad))])}': "
                                      f"attribute ids are 1-{ATTRIBUTES}, is_present 0/1, certainty 1-4")
                ids = np.unique(a[:, 0])
                at = np.searchsorted(ids, a[:, 0])
                weight = np.array([0.0] + [CERTAINTY[c] for c in (1, 2, 3, 4)], dtype=np.float32)
                values = np.zeros((len(ids), ATTRIBUTES), dtype=np.float32)
                values[at, a[:, 1] - 1] = (2 * a[:, 2] - 1) * weight[a[:, 3]]
                return {"ids": torch.from_numpy(ids), "values": torch.from_numpy(values)}

            self._attributes = cached("cub-attributes", [path], {"kind": "cub-attributes"}, build,
                                      self.cache_dir, self.cache)
        return self._attributes

    def class_attributes(self) -> torch.Tensor:
        """``[200, 312]``: class_attribute_labels_continuous.txt / 100, rows by class id."""
        path = self.base / "attributes" / "class_attribute_labels_continuous.txt"
        need_file(path, "CUB's class attributes (dataset.modalities has class_attributes)")
        try:
            x = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except ValueError:
            raise ConfigError(f"{path}: not a table of numbers (one line of {ATTRIBUTES} values per class)") from None
        if x.shape[1] != ATTRIBUTES or not np.isfinite(x).all():
            raise ConfigError(f"{path}: {x.shape[1]} finite values per line expected {ATTRIBUTES}")
        return torch.from_numpy(x / 100)

    # -- captions --------------------------------------------------------------------------------
    def caption_folder(self) -> Path:
        if self.text_dir:
            folder = Path(str(self.text_dir)).expanduser()
        else:
            places = [p / "text_c10" for p in (self.base, self.base.parent, self.base / "cvpr2016_cub",
                                               self.base.parent / "cvpr2016_cub", self.root)]
            folder = next((p for p in places if p.is_dir()), places[0])
        if not folder.is_dir():
            raise ConfigError(f"dataset.text_dir: Reed et al.'s text_c10/ folder not found ({folder}); "
                              f"put cvpr2016_cub/text_c10 beside CUB_200_2011 or set dataset.text_dir=PATH")
        return folder

    def captions(self) -> dict:
        """``{"paths": [rel], "words": [[[str]] x 10]}``, every image's ten captions (cached)."""
        if self._captions is None:
            folder = self.caption_folder()
            rels = [rel for _, rel in self.layout.images(self.root)]
            files = [folder / Path(rel).with_suffix(".txt") for rel in rels]

            def build():
                out = []
                for f in decoding(files, f"caption files of {folder}"):
                    if not f.is_file():
                        raise ConfigError(f"{f}: missing (Reed et al.'s captions of {f.parent.name}/{f.stem}.jpg)")
                    lines = [words(ln) for ln in decode_text(f, what="ten captions, one per line").splitlines()]
                    lines = [w for w in lines if w]
                    if not lines:
                        raise ConfigError(f"{f}: no caption (expected {CAPTIONS} lines of words)")
                    out.append([lines[i % len(lines)] for i in range(CAPTIONS)])  # fewer: cycled
                return {"paths": rels, "words": out}

            self._captions = cached("cub-captions", files, {"kind": "cub-captions"}, build, self.cache_dir, self.cache)
        return self._captions

    def vocab(self) -> List[str]:
        """The words of the train split's captions seen at least ``min_count`` times, most frequent first."""
        if self._vocab is None:
            caps = self.captions()
            at = {rel: i for i, rel in enumerate(caps["paths"])}
            counts: Counter = Counter()
            for _, rel, _ in self.layout.rows(self.root, "train"):
                for line in caps["words"][at[rel]]:
                    counts.update(line)
            self._vocab = sorted((w for w, n in counts.items() if n >= self.min_count), key=lambda w: (-counts[w], w))
        return self._vocab

    def tokens(self, lines: Sequence[Sequence[str]]) -> torch.Tensor:
        index = {w: i + 2 for i, w in enumerate(self.vocab())}
        L = self.text_length
        out = torch.zeros(len(lines), L, dtype=torch.int64)
        for j, line in enumerate(lines):
            ids = [index.get(w, 1) for w in line[:L]]
            out[j, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    # -- splits ----------------------------------------------------------------------------------
    def split_modalities(self, split, entry, labels):
        out = {}
        rows = self.layout.rows(self.root, split)
        if "attributes" in self._wanted:
            a = self.attributes()
            ids = torch.tensor([i for i, _, _ in rows])
            at = torch.searchsorted(a["ids"], ids).clamp(max=len(a["ids"]) - 1)
            missing = a["ids"][at] != ids
            if bool(missing.any()):
                raise ConfigError(f"{self.base / 'attributes' / 'image_attribute_labels.txt'}: no attributes for "
                                  f"image {int(ids[missing][0])} ({rows[int(torch.nonzero(missing)[0])][1]})")
            out["attributes"] = a["values"][at]
        if "class_attributes" in self._wanted:
            table = self.class_attributes()
            class_ids = [int(n.split(".")[0]) - 1 for n in entry["names"]]
            if any(not 0 <= c < len(table) for c in class_ids):
                raise ConfigError(f"{self.base / 'attributes' / 'class_attribute_labels_continuous.txt'}: "
                                  f"{len(table)} lines, fewer than CUB's class ids {max(class_ids) + 1}")
            out["class_attributes"] = table[torch.tensor(class_ids)][labels]
        if "text" in self._wanted:
            caps = self.captions()
            at = {rel: i for i, rel in enumerate(caps["paths"])}
            out["text"] = torch.stack([self.tokens(caps["words"][at[rel]]) for _, rel, _ in rows])
        return out

    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality == "text":
            first = decode_text(path, what="captions, one per line").splitlines()[0]
            return self.tokens([words(first)])[0]
        if modality == "image" and self.crop:
            rel = "/".join(Path(path).parts[-2:])
            found = {r: i for i, r in self.layout.images(self.root)}.get(rel)
            box = self.layout.boxes(self.root).get(found) if found is not None else None
            return decode_image(path, self.image_size, 3, box=box)
        return super().decode(modality, path)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {**super().state_dict(), "protocol": self.protocol}
        if "text" in self._wanted:
            state["vocab"] = list(self.vocab())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state and state.get("vocab") is not None:
            self._vocab = [str(w) for w in state["vocab"]]
