"""Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 2015): 1623 handwritten characters of 50 alphabets,
20 drawings each, read from the original ``images_background.zip`` / ``images_evaluation.zip``
(or the folders they extract to) under ``root``.

Protocols (``split``):

- ``vinyals`` (Vinyals et al. 2016, "Matching Networks"; Snell et al. 2017): the 1028 / 172 / 423
  character lists shipped in ``metamm_cli/data/splits/`` (torchmeta's copy, MIT), images resized
  to ``image_size`` (28, antialiased), and rotations by 90/180/270 degrees as new classes:
  4112 / 688 / 1692 classes of 20 drawings.
- ``lake`` (Lake et al. 2015): the 30 background alphabets for training, less the
  ``val_alphabets`` held out for validation (default: the 5 alphabets of the Vinyals validation
  split, 172 characters), the 20 evaluation alphabets (659 characters) for test; no rotations.
- ``finn`` (Finn et al. 2017, github cbfinn/maml ``data_generator.py``; also Sung et al. 2018's
  code): all 1623 characters of both archives, sorted by (alphabet, character), shuffled with
  Python's ``random.seed(1); random.shuffle``; the first 1100 train, the next 100 validate, the
  remaining 423 test. MAML's code shuffles ``os.listdir`` order (file-system dependent), so its
  exact characters cannot be recovered; this is the reproducible version of its procedure.
- ``reptile`` (Nichol et al. 2018, github openai/supervised-reptile ``omniglot.py``): the same
  with seed 0, which is that code's own split (sorted listing, ``random.seed(0)``, first 1200
  characters train, the other 423 test: the test characters are exactly its test set); its 1200
  training characters are cut into 1100 train and 100 validation here (the code has no
  validation set).

Rotations (``rotations``, default 0/90/180/270 except for ``lake``) on the splits named in
``rotate_splits`` (null: all three), used as ``rotate``:

- ``classes``: each rotation of a character is a class of its own (Vinyals et al. 2016).
- ``augment``: a character's rotations are one group of classes; a task never holds two
  rotations of one character, and each of its classes is shown at a random rotation (drawn per
  class per task: MAML's ``data_generator.py``, ``rotations = tf.multinomial(..., num_classes)``).
- ``task``: as ``augment``, but one random rotation for the whole task (Sung et al. 2018's
  ``omniglot_train_*.py``: ``degrees = random.choice([0,90,180,270])`` per episode).

Images are held as uint8 (1 byte per pixel, strokes bright on black: ``invert``) and become
float32 in [0, 1] in the sampler's gather. Decoding 32,460 PNGs takes seconds once; the arrays
are cached (:mod:`metamm_cli.data.cache`). ``download=true`` fetches missing zips from the
dataset's home (github brendenlake/omniglot) and checks the original MD5 checksums.

The characters of each split (in label order) are the :meth:`state_dict`; a checkpoint's state
restores them, and a stored character missing from today's archives is an error naming it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset, files_digest, require_path
from metamm_cli.data.cache import cached
from metamm_cli.data.decode import decode_image
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.progress import decoding

log = logging.getLogger("metamm")

ARCHIVES = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
       "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
VINYALS_VAL = ["Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"]
SHUFFLED = {"finn": 1, "reptile": 0}  # split -> the seed of Python's random.shuffle
SHUFFLED_SIZES = (1100, 100)  # train, validation characters; the rest (423) test
SPLIT_NAMES = ("vinyals", "lake", *SHUFFLED)
ROTATE = ("classes", "augment", "task")
_ENTRY = re.compile(r"^(?:.*/)?(?P<top>[^/]+)/(?P<alpha>[^/]+)/(?P<char>character\d+)/(?P<stem>\d{4}_\d{2})\.(?P<ext>png|txt)$")


class Archive:
    """The files ``<top>/<Alphabet>/characterNN/NNNN_DD.<ext>`` of one Omniglot zip or folder:
    ``entries`` maps ``(alphabet, character)`` to sorted ``[(stem, member)]``."""

    def __init__(self, path: Path, top: str, ext: str = "png"):
        self.path, self.top, self.ext = path, top, ext
        self.entries: Dict[Tuple[str, str], List[Tuple[str, str]]] = {}
        if path.is_dir():
            names = [str(p.relative_to(path.parent)) for p in path.rglob(f"*.{ext}")]
            self.zip = None
        else:
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ConfigError(f"{path}: not a readable zip file ({type(e).__name__})") from None
            names = self.zip.namelist()
        for name in names:
            if name.startswith("__MACOSX"):
                continue
            m = _ENTRY.match(name.replace(os.sep, "/"))
            if m and m["ext"] == ext:
                self.entries.setdefault((m["alpha"], m["char"]), []).append((m["stem"], name))
        if not self.entries:
            raise ConfigError(f"{path}: not an Omniglot {top} archive (expected files "
                              f"{top}/<Alphabet>/characterNN/NNNN_DD.{ext})")
        for v in self.entries.values():
            v.sort()

    def read(self, member: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(member)
        return (self.path.parent / member).read_bytes()

    def source_files(self) -> List[Path]:
        if self.zip is not None:
            return [self.path]
        return [self.path.parent / m for v in self.entries.values() for _, m in v]


def find_archive(root: Path, top: str) -> Optional[Path]:
    """``root/<top>`` (extracted folder) or ``root/<top>.zip``, whichever exists."""
    for p in (root / top, root / f"{top}.zip"):
        if p.exists():
            return p
    return None


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_file(url: str, dest: Path, md5: Optional[str]) -> None:
    """``url`` -> ``dest`` (atomic), checked against ``md5`` when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    os.close(fd)
    try:
        log.info(f"downloading {url} -> {dest}")
        try:
            urllib.request.urlretrieve(url, tmp)
        except (OSError, ValueError) as e:
            raise ConfigError(f"dataset.download: could not fetch {url} ({e})") from None
        got = md5sum(Path(tmp))
        if md5 and got != md5:
            raise ConfigError(f"dataset.download: {url} has MD5 {got}, expected {md5}; "
                              f"file discarded")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def vinyals_lists() -> Dict[str, Dict[str, Dict[str, List[str]]]]:
    """The shipped Vinyals split: ``{split: {background|evaluation: {alphabet: [characterNN]}}}``."""
    base = resources.files("metamm_cli.data") / "splits"
    return {s: json.loads((base / f"vinyals_{s}.json").read_text()) for s in ("train", "val", "test")}


class Omniglot(MultimodalDataset):
    name = "omniglot"

    def __init__(self, root: str, split: str = "vinyals", image_size: int = 28,
                 rotations: Optional[Sequence[int]] = None, val_alphabets: Optional[Sequence[str]] = None,
                 invert: bool = True, download: bool = False, url: str = URL,
                 md5: Optional[Mapping[str, str]] = None, cache: bool = True,
                 cache_dir: Optional[str] = None, modalities: Optional[Sequence[str]] = None,
                 rotate: str = "classes", rotate_splits: Optional[Sequence[str]] = None):
        self.all_modalities = {"image": ModalitySpec((1, image_size, image_size), torch.float32, "image")}
        super().__init__(modalities)
        if split not in SPLIT_NAMES:
            raise ConfigError(f"dataset.split={split}: must be 'vinyals' (Vinyals et al. 2016: "
                              f"1028/172/423 characters x 4 rotations), 'lake' (background/evaluation "
                              f"alphabets), 'finn' or 'reptile' (1100/100/423 characters shuffled with "
                              f"seed 1 or 0, as MAML's and Reptile's code)")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or not 8 <= image_size <= 105:
            raise ConfigError(f"dataset.image_size={image_size}: must be an integer in [8, 105]")
        rotations = list(rotations if rotations is not None else ([0] if split == "lake" else [0, 90, 180, 270]))
        if not rotations or any(r not in (0, 90, 180, 270) for r in rotations) or len(set(rotations)) != len(rotations):
            raise ConfigError(f"dataset.rotations={rotations}: distinct values among 0, 90, 180, 270")
        if rotate not in ROTATE:
            raise ConfigError(f"dataset.rotate={rotate}: must be classes (each rotation a class of its "
                              f"own), augment (a random rotation per class per task) or task (one "
                              f"random rotation per task)")
        rotate_splits = list(SPLITS if rotate_splits is None else rotate_splits)
        if any(s not in SPLITS for s in rotate_splits):
            raise ConfigError(f"dataset.rotate_splits={rotate_splits}: a list of {', '.join(SPLITS)} (null: all)")
        self.root = require_path(root, "dataset.root", "the folder holding images_background.zip and images_evaluation.zip")
        self.split_name, self.image_size = split, image_size
        self.rotations, self.invert = rotations, invert
        self.rotate, self.rotate_splits = rotate, rotate_splits
        self.val_alphabets = list(val_alphabets if val_alphabets is not None else VINYALS_VAL)
        self.cache, self.cache_dir = cache, cache_dir
        self.paths = {}
        for top in ARCHIVES:
            path = find_archive(self.root, top)
            if path is None and download:
                path = self.root / f"{top}.zip"
                download_md5 = dict(MD5, **(md5 or {})).get(top)
                fetch_file(f"{url.rstrip('/')}/{top}.zip", path, download_md5)
            if path is None:
                raise ConfigError(
                    f"dataset.root={root}: {top}.zip (or its extracted folder {top}/) not found; put "
                    f"Omniglot's images_background.zip and images_evaluation.zip (github "
                    f"brendenlake/omniglot, python/) there, or set dataset.download=true")
            self.paths[top] = path
        self._decoded: Dict[str, dict] = {}
        self._archives: Dict[str, Archive] = {}
        self._classes: Optional[Dict[str, List[Tuple[str, str, str]]]] = None
        self._blocks: Dict[str, list] = {}

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality != "image":
            raise ConfigError(f"dataset omniglot has no modality '{modality}' (only image)")
        return decode_image(path, self.image_size, 1, invert=self.invert)

    def index(self, top: str) -> Archive:
        """The file list of one archive (names only; cheap)."""
        if top not in self._archives:
            self._archives[top] = Archive(self.paths[top], top)
        return self._archives[top]

    def archive(self, top: str) -> dict:
        """``{"images": uint8 [n, 1, s, s], "keys": ["alphabet/characterNN/NNNN_DD", ...]}``."""
        if top not in self._decoded:
            arc = self.index(top)
            settings = {"kind": "omniglot-images", "top": top, "size": self.image_size, "invert": self.invert}

            def build():
                members = [(alpha, char, stem, member) for (alpha, char), ms in sorted(arc.entries.items())
                           for stem, member in ms]
                keys, images = [], []
                for alpha, char, stem, member in decoding(members, f"images of {arc.path}"):
                    images.append(decode_image(arc.read(member), self.image_size, 1,
                                               invert=self.invert, name=f"{arc.path}:{member}"))
                    keys.append(f"{alpha}/{char}/{stem}")
                return {"images": torch.stack(images), "keys": keys}

            self._decoded[top] = cached(f"omniglot-{top}", arc.source_files(), settings, build,
                                        self.cache_dir, self.cache)
        return self._decoded[top]

    # -- splits -----------------------------------------------------------------------------
    def characters(self, split: str) -> List[Tuple[str, str, str]]:
        """The ``(archive, alphabet, characterNN)`` of a split, in label order (a checkpoint's
        lists when loaded)."""
        if self._classes is not None:
            return self._classes[split]
        if self.split_name == "vinyals":
            lists = vinyals_lists()[split]
            return [(f"images_{part}", a, c) for part in ("background", "evaluation")
                    for a in sorted(lists.get(part, {})) for c in lists[part][a]]
        if self.split_name in SHUFFLED:
            return self.shuffled_characters()[split]
        if split == "test":
            return sorted(("images_evaluation", a, c) for a, c in self.index("images_evaluation").entries)
        entries = self.index("images_background").entries
        alphabets = sorted({a for a, _ in entries})
        unknown = [a for a in self.val_alphabets if a not in alphabets]
        if unknown:
            raise ConfigError(f"dataset.val_alphabets: {unknown} are not background alphabets; "
                              f"choose among {alphabets}")
        keep = set(self.val_alphabets) if split == "val" else set(alphabets) - set(self.val_alphabets)
        return sorted(("images_background", a, c) for a, c in entries if a in keep)

    def shuffled_characters(self) -> Dict[str, List[Tuple[str, str, str]]]:
        """``split=finn|reptile``: all characters of both archives sorted by (alphabet,
        character), shuffled by ``random.Random(seed).shuffle`` (what ``random.seed(seed);
        random.shuffle(list)`` does), cut 1100 / 100 / rest."""
        chars = sorted(((top, a, c) for top in ARCHIVES for a, c in self.index(top).entries),
                       key=lambda t: (t[1], t[2]))
        random.Random(SHUFFLED[self.split_name]).shuffle(chars)
        n_train, n_val = SHUFFLED_SIZES
        return {"train": chars[:n_train], "val": chars[n_train:n_train + n_val],
                "test": chars[n_train + n_val:]}

    def split_rotations(self, split: str) -> List[int]:
        """The rotations applied to ``split`` (``[0]`` where ``rotate_splits`` leaves it out)."""
        return self.rotations if split in self.rotate_splits else [0]

    def class_groups(self, split: str) -> Optional[torch.Tensor]:
        """``rotate=augment|task``: the character of each class (class ``c * R + r`` is rotation
        ``r`` of character ``c``), the sampler's groups; None for ``rotate=classes``."""
        R = len(self.split_rotations(split))
        if self.rotate == "classes" or R == 1:
            return None
        return torch.arange(len(self.characters(split)) * R) // R

    def num_classes(self, split: str) -> int:
        return len(self.characters(split)) * len(self.split_rotations(split))

    def build_split(self, split: str) -> SplitData:
        chars = self.characters(split)
        index = {}
        for top in sorted({c[0] for c in chars}):
            for i, k in enumerate(self.archive(top)["keys"]):
                index.setdefault((top,) + tuple(k.split("/")[:2]), []).append(i)
        rows: Dict[str, List[int]] = {}
        char_of: Dict[str, List[int]] = {}
        for c, (top, alpha, char) in enumerate(chars):
            found = index.get((top, alpha, char))
            if not found:
                raise ConfigError(f"{self.paths[top]}: character {alpha}/{char} of the "
                                  f"{self.split_name} {split} split is missing: not the full Omniglot")
            rows.setdefault(top, []).extend(found)
            char_of.setdefault(top, []).extend([c] * len(found))
        rotations = self.split_rotations(split)
        R = len(rotations)
        images, labels, blocks = [], [], []
        for top in sorted(rows):
            x = self.archive(top)["images"][torch.tensor(rows[top])]  # one gather per archive
            c = torch.tensor(char_of[top])
            for r, rot in enumerate(rotations):
                images.append(torch.rot90(x, rot // 90, dims=(-2, -1)) if rot else x)
                labels.append(c * R + r)
                blocks.append((top, rot, rows[top]))
        self._blocks[split] = blocks
        images_t, labels_t = torch.cat(images), torch.cat(labels)
        present = torch.ones(len(labels_t), 1, dtype=torch.bool)
        return SplitData({"image": images_t.contiguous()}, present, labels_t, len(chars) * R,
                         self.class_groups(split), self.rotate == "task")

    def describe_row(self, split: str, row: int) -> str:
        for top, rot, idx in self._blocks[split]:
            if row < len(idx):
                alpha, char, stem = self.archive(top)["keys"][idx[row]].split("/")
                member = dict(self.index(top).entries[(alpha, char)])[stem]
                where = f"{self.paths[top]}:{member}" if self.paths[top].is_file() else \
                    str(self.paths[top].parent / member)
                return where + (f" rotated {rot} degrees" if rot else "")
            row -= len(idx)
        raise IndexError(row)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.class_list_state()

    def load_state_dict(self, state: dict) -> None:
        def check(s, c):
            if len(c) != 3 or c[0] not in self.paths:
                raise ConfigError(f"the checkpoint's omniglot class '{'/'.join(c)}' is not "
                                  f"ARCHIVE/Alphabet/characterNN")
            if (c[1], c[2]) not in self.index(c[0]).entries:
                raise ConfigError(f"{self.paths[c[0]]}: character {c[1]}/{c[2]} of the {s} split "
                                  f"is missing; the checkpoint was trained with it")
        self.load_class_lists(state, check)

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """Per split, the archives its characters come from (a zip, or an extracted folder's
        PNGs), by name, size and modification time."""
        out = {}
        for s in SPLITS:
            tops = sorted({c[0] for c in self.characters(s)})
            files = []
            for top in tops:
                path = self.paths[top]
                files += [path] if path.is_file() else sorted(path.rglob("*.png"))
            out[s] = files_digest(files, self.root)
        return out

    def describe(self) -> str:
        where = "" if len(self.rotate_splits) == len(SPLITS) else f" on {'/'.join(self.rotate_splits)}"
        how = {"classes": "as classes", "augment": "per class per task", "task": "per task"}[self.rotate]
        return (f"omniglot ({self.split_name} split, rotations {self.rotations} {how}{where}): "
                f"image{list(self.all_modalities['image'].shape)} stored uint8, float32 in [0, 1] in episodes")
