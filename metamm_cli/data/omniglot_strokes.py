"""Multimodal Omniglot: each drawing as an image and as the pen trajectory that drew it
(Lake, Salakhutdinov & Tenenbaum, Science 2015).

Only the "small" stroke subsets survive intact: ``strokes_background_small1.zip`` and
``strokes_background_small2.zip`` hold the trajectories of 4,840 drawings of 242 background
characters in 8 alphabets; each is paired with the PNG of the same ``NNNN_DD`` name in
``images_background.zip`` (all under ``root``, zips or extracted folders).

- ``image``: uint8 ``[1, s, s]`` as in :mod:`metamm_cli.data.omniglot` (float in episodes).
- ``strokes``: float32 ``[length, 3]``: (x, y, pen) with points equally spaced by arc length
  along the pen path, x/y centred and scaled per drawing into [-1, 1], pen = 1 on the first
  point of each stroke (:func:`metamm_cli.data.decode.decode_strokes`).

Classes are the 242 characters, split by alphabet (fixed; ``alphabets`` overrides):
train = Japanese_(katakana), Korean, Latin, Sanskrit (155 characters); val = Balinese, Tagalog
(41); test = Early_Aramaic, Greek (46). No rotations.

The characters of each split (in label order) are the :meth:`state_dict`; a checkpoint's state
restores them, and a stored character without stroke files today is an error naming it.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset, files_digest, require_path
from metamm_cli.data.cache import cached
from metamm_cli.data.decode import decode_image, decode_strokes
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.omniglot import Archive, find_archive
from metamm_cli.data.progress import decoding

ALPHABETS = {"train": ["Japanese_(katakana)", "Korean", "Latin", "Sanskrit"],
             "val": ["Balinese", "Tagalog"],
             "test": ["Early_Aramaic", "Greek"]}
STROKE_ARCHIVES = ("strokes_background_small1", "strokes_background_small2")


class OmniglotStrokes(MultimodalDataset):
    name = "omniglot_strokes"

    def __init__(self, root: str, image_size: int = 28, length: int = 64, invert: bool = True,
                 alphabets: Optional[Mapping[str, Sequence[str]]] = None, cache: bool = True,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None):
        self.all_modalities = {
            "image": ModalitySpec((1, image_size, image_size), torch.float32, "image"),
            "strokes": ModalitySpec((length, 3), torch.float32, "strokes"),
        }
        super().__init__(modalities)
        if (not isinstance(image_size, int) or not isinstance(length, int) or not 8 <= image_size <= 105
                or length < 8):
            raise ConfigError(f"dataset: image_size in [8, 105] and length >= 8 are required "
                              f"(got {image_size}, {length})")
        self.alphabets = {s: list(v) for s, v in (alphabets or ALPHABETS).items()}
        if set(self.alphabets) != set(SPLITS):
            raise ConfigError(f"dataset.alphabets: needs exactly the keys {list(SPLITS)}")
        self.root = require_path(root, "dataset.root", "the folder holding images_background.zip and "
                                 "strokes_background_small{1,2}.zip")
        self.image_size, self.length, self.invert = image_size, length, invert
        self.cache, self.cache_dir = cache, cache_dir
        self.paths = {}
        for top in ("images_background",) + STROKE_ARCHIVES:
            path = find_archive(self.root, top)
            if path is None:
                raise ConfigError(
                    f"dataset.root={root}: {top}.zip (or its folder {top}/) not found; put Omniglot's "
                    f"images_background.zip, strokes_background_small1.zip and "
                    f"strokes_background_small2.zip (github brendenlake/omniglot, python/) there")
            self.paths[top] = path
        self._data: Optional[dict] = None
        self._archives: Optional[tuple] = None
        self._classes: Optional[Dict[str, List[Tuple[str, str]]]] = None
        self._rows: Dict[str, List[int]] = {}

    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality == "image":
            return decode_image(path, self.image_size, 1, invert=self.invert)
        if modality == "strokes":
            return decode_strokes(path, self.length)
        raise ConfigError(f"dataset omniglot_strokes has no modality '{modality}' (image, strokes)")

    def archives(self) -> Tuple[Archive, List[Archive]]:
        """The image archive and the stroke archives (file lists only; cheap)."""
        if self._archives is None:
            self._archives = (Archive(self.paths["images_background"], "images_background", "png"),
                              [Archive(self.paths[t], t, "txt") for t in STROKE_ARCHIVES])
        return self._archives

    def load(self) -> dict:
        """``{"image": uint8 [n, 1, s, s], "strokes": [n, L, 3], "alphabet": [...], "character": [...],
        "png": [member], "stroke": [archive:member]}`` for every drawing that has both a PNG and a
        stroke file."""
        if self._data is None:
            images, strokes = self.archives()
            settings = {"kind": "omniglot-strokes", "dedup": 1, "names": 1, "size": self.image_size,
                        "length": self.length, "invert": self.invert}
            files = images.source_files() + [f for a in strokes for f in a.source_files()]

            def build():
                png = {(a, c, stem): m for (a, c), v in images.entries.items() for stem, m in v}
                todo, seen = [], set()  # the two zips overlap: 5,840 files, 4,840 distinct drawings
                for arc in strokes:
                    for (alpha, char), members in sorted(arc.entries.items()):
                        for stem, member in members:
                            if (alpha, char, stem) in seen:
                                continue
                            seen.add((alpha, char, stem))
                            if (alpha, char, stem) not in png:
                                raise ConfigError(f"{arc.path}:{member}: no PNG {alpha}/{char}/{stem}.png "
                                                  f"in {images.path} to pair it with")
                            todo.append((arc, alpha, char, stem, member))
                out = {"image": [], "strokes": [], "alphabet": [], "character": [], "png": [], "stroke": []}
                for arc, alpha, char, stem, member in decoding(todo, f"drawings (PNG + strokes) of {self.root}"):
                    out["image"].append(decode_image(
                        images.read(png[alpha, char, stem]), self.image_size, 1,
                        invert=self.invert, name=f"{images.path}:{png[alpha, char, stem]}"))
                    out["strokes"].append(decode_strokes(arc.read(member), self.length,
                                                         name=f"{arc.path}:{member}"))
                    out["alphabet"].append(alpha)
                    out["character"].append(char)
                    out["png"].append(f"{images.path}:{png[alpha, char, stem]}")
                    out["stroke"].append(f"{arc.path}:{member}")
                out["image"], out["strokes"] = torch.stack(out["image"]), torch.stack(out["strokes"])
                return out

            self._data = cached("omniglot-strokes", files, settings, build, self.cache_dir, self.cache)
        return self._data

    def characters(self, split: str) -> List[Tuple[str, str]]:
        """The ``(alphabet, characterNN)`` of a split, in label order (a checkpoint's lists when
        loaded): the characters with stroke files of the split's alphabets."""
        if self._classes is not None:
            return self._classes[split]
        _, strokes = self.archives()
        have = {k for arc in strokes for k in arc.entries}
        known = sorted({a for a, _ in have})
        wanted = self.alphabets[split]
        unknown = [a for a in wanted if a not in known]
        if unknown:
            raise ConfigError(f"dataset.alphabets.{split}: {unknown} have no stroke files; choose among {known}")
        return sorted(k for k in have if k[0] in wanted)

    def num_classes(self, split: str) -> int:
        return len(self.characters(split))

    def build_split(self, split: str) -> SplitData:
        chars = self.characters(split)
        d = self.load()
        cls = {k: i for i, k in enumerate(chars)}
        rows = [i for i, k in enumerate(zip(d["alphabet"], d["character"])) if k in cls]
        self._rows[split] = rows
        idx = torch.tensor(rows, dtype=torch.long)
        labels = torch.tensor([cls[d["alphabet"][i], d["character"][i]] for i in rows], dtype=torch.long)
        present = torch.ones(len(rows), 2, dtype=torch.bool)
        return SplitData({"image": d["image"][idx], "strokes": d["strokes"][idx]}, present, labels, len(chars))

    def describe_row(self, split: str, row: int) -> str:
        d, i = self.load(), self._rows[split][row]
        return f"{d['png'][i]} (strokes: {d['stroke'][i]})"

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.class_list_state()

    def load_state_dict(self, state: dict) -> None:
        images, strokes = self.archives()
        have = {k for arc in strokes for k in arc.entries}

        def check(s, c):
            if c not in have or c not in images.entries:
                where = "stroke files" if c not in have else f"PNGs in {images.path}"
                raise ConfigError(f"dataset.root={self.root}: character {'/'.join(c)} of the {s} "
                                  f"split has no {where} any more; the checkpoint was trained with it")
        self.load_class_lists(state, check)

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """The image and stroke archives (zips, or extracted folders' files), by name, size and
        modification time; every split is read from all of them."""
        images, strokes = self.archives()
        files = images.source_files() + [f for a in strokes for f in a.source_files()]
        fp = files_digest(files, self.root)
        return {s: dict(fp) for s in SPLITS}
