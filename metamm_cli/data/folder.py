"""``folder``: your own data as files, one folder per class.

Layouts: ``root/<split>/<class>/<sample>.<ext>`` with ``split`` in train/val/test, or
``root/<class>/<sample>.<ext>``, whose classes are then split by ``seed`` in the proportions
``split_fractions``. The files of one sample share a stem and the extension names the modality:
``.png/.jpg/.jpeg`` image (uint8 ``[channels, size, size]``, Lanczos resize), ``.wav`` audio
(log-mel spectrogram ``[n_mels, frames]`` via ``torch.stft``), ``.txt`` tokens (whitespace words,
ids from a vocabulary built on the train split; 0 pads, 1 is an unknown word; ``[length]``),
``.npy`` vector (float32, one shape for all). The modalities are those found by scanning; a
sample lacking a file has that modality masked (absent). Other files are ignored with one
warning that counts them (``unknown_files=error`` refuses them instead).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset
from metamm_cli.data.decode import decode_image, decode_wav, log_mel
from metamm_cli.data.episodes import ModalitySpec, SplitData

log = logging.getLogger("metamm")

EXTENSIONS = {".png": "image", ".jpg": "image", ".jpeg": "image", ".wav": "audio",
              ".txt": "tokens", ".npy": "vector"}
ORDER = ("image", "audio", "tokens", "vector")


def split_classes(names: Sequence[str], fractions: Mapping[str, float], seed: int,
                  key: str) -> Dict[str, List[str]]:
    """Shuffle ``names`` with ``seed`` and cut them into train/val/test by ``fractions``."""
    if set(fractions) != set(SPLITS) or any(f <= 0 for f in fractions.values()):
        raise ConfigError(f"{key}={dict(fractions)}: needs train, val and test, each > 0")
    names = sorted(names)
    random.Random(seed).shuffle(names)
    total = sum(fractions.values())
    n_train = round(len(names) * fractions["train"] / total)
    n_val = round(len(names) * fractions["val"] / total)
    out = {"train": names[:n_train], "val": names[n_train:n_train + n_val],
           "test": names[n_train + n_val:]}
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise ConfigError(f"{key}: {len(names)} classes leave the {empty[0]} split empty; "
                          f"add classes or change the fractions")
    return out


def read_words(path: Path, lowercase: bool) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable UTF-8 text file ({type(e).__name__})") from None
    return (text.lower() if lowercase else text).split()


def load_vector(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable .npy file ({type(e).__name__})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"{path}: .npy must hold numbers, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


class FolderDataset(MultimodalDataset):
    name = "folder"

    def __init__(self, root: str, modalities: Optional[Sequence[str]] = None,
                 split_fractions: Mapping[str, float] = None, seed: int = 0,
                 image: Mapping = None, audio: Mapping = None, tokens: Mapping = None,
                 unknown_files: str = "warn"):
        self.root = Path(str(root)).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"dataset.root={root}: no such folder")
        if unknown_files not in ("warn", "error"):
            raise ConfigError(f"dataset.unknown_files={unknown_files}: must be warn or error")
        self.image = {"size": 28, "channels": 1, **(image or {})}
        self.audio = {"n_fft": 256, "hop": 128, "n_mels": 40, "frames": 48, "fmin": 0.0,
                      "fmax": None, **(audio or {})}
        self.tokens = {"length": 32, "lowercase": True, "min_count": 1, **(tokens or {})}
        for key, table, allowed in (("image", self.image, {"size", "channels"}),
                                    ("audio", self.audio, {"n_fft", "hop", "n_mels", "frames", "fmin", "fmax"}),
                                    ("tokens", self.tokens, {"length", "lowercase", "min_count"})):
            if set(table) - allowed:
                raise ConfigError(f"dataset.{key}: unknown keys {sorted(set(table) - allowed)}; "
                                  f"allowed: {sorted(allowed)}")
        if self.image["size"] < 1 or self.image["channels"] not in (1, 3) or self.tokens["length"] < 1:
            raise ConfigError("dataset: image.size >= 1, image.channels 1 or 3, tokens.length >= 1 required")
        # class folders per split
        split_dirs = [d for d in SPLITS if (self.root / d).is_dir()]
        if split_dirs:
            if len(split_dirs) < 3:
                absent = [s for s in SPLITS if s not in split_dirs]
                raise ConfigError(f"dataset.root={root}: has {split_dirs} but no {absent[0]}/ folder "
                                  f"(use root/<split>/<class>/ with train, val and test, or root/<class>/)")
            self.class_dirs = {s: sorted(d for d in (self.root / s).iterdir() if _visible_dir(d))
                               for s in SPLITS}
            bare = [s for s in SPLITS if not self.class_dirs[s]]
            if bare:
                raise ConfigError(f"dataset.root={root}: {bare[0]}/ has no class folders "
                                  f"(expected {bare[0]}/<class>/<sample>.<ext>)")
        else:
            classes = {d.name: d for d in self.root.iterdir() if _visible_dir(d)}
            if not classes:
                raise ConfigError(f"dataset.root={root}: no class folders (expected "
                                  f"root/<class>/<sample>.<ext> or root/<split>/<class>/...)")
            parts = split_classes(list(classes), split_fractions or {"train": 0.6, "val": 0.2, "test": 0.2},
                                  seed, "dataset.split_fractions")
            self.class_dirs = {s: [classes[c] for c in sorted(parts[s])] for s in SPLITS}
        # samples: {split: [(class index, {modality: path})]}
        self.samples: Dict[str, list] = {}
        unknown: List[Path] = []
        found = set()
        for s in SPLITS:
            rows = []
            for c, d in enumerate(self.class_dirs[s]):
                stems: Dict[str, Dict[str, Path]] = {}
                for f in sorted(d.iterdir()):
                    if f.name.startswith(".") or not f.is_file():
                        continue
                    m = EXTENSIONS.get(f.suffix.lower())
                    if m is None:
                        unknown.append(f)
                        continue
                    if m in stems.setdefault(f.stem, {}):
                        raise ConfigError(f"{f}: sample '{f.stem}' has two {m} files")
                    stems[f.stem][m] = f
                    found.add(m)
                rows += [(c, files) for _, files in sorted(stems.items())]
            self.samples[s] = rows
        if unknown:
            exts = sorted({f.suffix or f.name for f in unknown})
            msg = (f"dataset.root={root}: {len(unknown)} files with extensions {exts} are not "
                   f"{sorted(EXTENSIONS)}")
            if unknown_files == "error":
                raise ConfigError(msg + f" (first: {unknown[0]}; unknown_files=warn ignores them)")
            log.warning(msg + ": ignored")
        if not found:
            raise ConfigError(f"dataset.root={root}: no sample files ({sorted(EXTENSIONS)}) in its class folders")
        self.vocab = self._build_vocab() if "tokens" in found else {}
        self.all_modalities = {m: self._spec(m) for m in ORDER if m in found}
        super().__init__(modalities)

    def _build_vocab(self) -> Dict[str, int]:
        counts = Counter()
        for _, files in self.samples["train"]:
            if "tokens" in files:
                counts.update(read_words(files["tokens"], self.tokens["lowercase"]))
        words = sorted((w for w, n in counts.items() if n >= self.tokens["min_count"]),
                       key=lambda w: (-counts[w], w))
        return {w: i + 2 for i, w in enumerate(words)}  # 0 pads, 1 is an unknown word

    def _spec(self, m: str) -> ModalitySpec:
        if m == "image":
            size, ch = self.image["size"], self.image["channels"]
            return ModalitySpec((ch, size, size), torch.float32, "image")  # held as uint8
        if m == "audio":
            return ModalitySpec((self.audio["n_mels"], self.audio["frames"]), torch.float32, "audio")
        if m == "tokens":
            return ModalitySpec((self.tokens["length"],), torch.int64, "tokens", vocab=len(self.vocab) + 2)
        first = next(files["vector"] for s in SPLITS for _, files in self.samples[s] if "vector" in files)
        return ModalitySpec(tuple(load_vector(first).shape), torch.float32, "vector")

    def decode(self, modality: str, path: str) -> torch.Tensor:
        path = Path(path)
        if modality == "image":
            return decode_image(path, self.image["size"], self.image["channels"])
        if modality == "audio":
            wave, rate = decode_wav(path)
            a = self.audio
            return log_mel(wave, rate, a["n_fft"], a["hop"], a["n_mels"], a["frames"], a["fmin"], a["fmax"])[0]
        if modality == "tokens":
            ids = [self.vocab.get(w, 1) for w in read_words(path, self.tokens["lowercase"])]
            ids = (ids + [0] * self.tokens["length"])[: self.tokens["length"]]
            return torch.tensor(ids, dtype=torch.int64)
        if modality == "vector":
            x = load_vector(path)
            want = self.all_modalities["vector"].shape
            if tuple(x.shape) != tuple(want):
                raise ConfigError(f"{path}: vector of shape {list(x.shape)}, the others have {list(want)}")
            return x
        raise ConfigError(f"dataset folder: unknown modality '{modality}'; it has {list(self.all_modalities)}")

    def build_split(self, split: str) -> SplitData:
        rows = self.samples[split]
        names = list(self.all_modalities)
        data, present = {}, torch.zeros(len(rows), len(names), dtype=torch.bool)
        for i, m in enumerate(names):
            spec = self.all_modalities[m]
            dtype = torch.uint8 if m == "image" else spec.dtype
            out = torch.zeros((len(rows),) + tuple(spec.shape), dtype=dtype)
            for j, (_, files) in enumerate(rows):
                if m in files:
                    out[j] = self.decode(m, str(files[m]))
                    present[j, i] = True
            data[m] = out
        labels = torch.tensor([c for c, _ in rows], dtype=torch.int64)
        return SplitData(data, present, labels, len(self.class_dirs[split]))


def _visible_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".")
