"""``folder``: your own data as files, one folder per class.

Layouts: ``root/<split>/<class>/<sample>.<ext>`` with ``split`` in train/val/test, or
``root/<class>/<sample>.<ext>``, whose classes are then split by ``seed`` in the proportions
``split_fractions``. The files of one sample share a stem and the extension names the modality:
``.png/.jpg/.jpeg`` image (uint8 ``[channels, H, W]``, Lanczos resize to ``image.size``, or to
the train split's most common size when null), ``.wav`` audio (log-mel spectrogram
``[n_mels, frames]`` via ``torch.stft``, at ``audio.rate``: null = the train split's most common
rate; other rates are resampled, band-limited), ``.txt`` tokens (whitespace words, ids from a
vocabulary built on the train split; 0 pads, 1 is an unknown word; ``[length]``), ``.npy``
vector (float32, one shape for all; ``standardize``: per-feature mean/std of the train split).
The modalities are those found by scanning; a sample lacking a file has that modality masked
(absent). Other files are ignored with one warning that counts them (``unknown_files=error``
refuses them instead).

What is learned from the files (class lists per split, modalities found, vocabulary, image size,
audio rate, vector shape and statistics) is learned lazily, when first needed, and is the
dataset's :meth:`state_dict`; a checkpoint's state restores it, so evaluation reads today's files
with the preprocessing the run was trained with (new classes and new files of other modalities
are ignored; a stored class whose folder is gone is an error naming it).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import (SPLITS, MultimodalDataset, files_digest, most_common,
                                  require_path)
from metamm_cli.data.decode import (as_float_array, check_audio_settings, decode_image,
                                    decode_text, decode_wav, image_size_of, load_npy, log_mel,
                                    npy_header, resample, wav_info)
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.progress import decoding

log = logging.getLogger("metamm")

EXTENSIONS = {".png": "image", ".jpg": "image", ".jpeg": "image", ".wav": "audio",
              ".txt": "tokens", ".npy": "vector"}
ORDER = ("image", "audio", "tokens", "vector")
FORMAT = 1  # of state_dict()


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
    """The whitespace-separated words of a UTF-8 text file (empty files refused)."""
    text = decode_text(path, what="UTF-8 text (the sample's words; a sample without text has no .txt file)")
    return (text.lower() if lowercase else text).split()


def load_vector(path: Path) -> torch.Tensor:
    """A ``.npy`` file -> float32 tensor, every value finite (bool/int converted; complex,
    object, all-NaN and partly non-finite files refused naming the file)."""
    x = as_float_array(load_npy(path), str(path))
    if x.size == 0:
        raise ConfigError(f"{path}: holds no values (shape {list(x.shape)})")
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    if nan == x.size:
        raise ConfigError(f"{path}: all {x.size} values are NaN; a sample lacking the vector "
                          f"modality simply has no .npy file")
    if nan or inf:
        what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if p)
        raise ConfigError(f"{path}: {what} of {x.size} values; a vector file must hold finite values")
    return torch.from_numpy(x)


def _visible_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".")


def _subdirs(d: Path) -> List[str]:
    return sorted(p.name for p in d.iterdir() if _visible_dir(p))


def _int_pair(value, key: str) -> Optional[Tuple[int, int]]:
    """``image.size``: null, an int (square) or ``[H, W]``, each >= 1."""
    if value is None:
        return None
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ConfigError(f"{key}={value}: must be an integer >= 1 (a square), [H, W], or null "
                          f"(the train split's most common image size)")
    return int(pair[0]), int(pair[1])


class FolderDataset(MultimodalDataset):
    name = "folder"

    def __init__(self, root: str, modalities: Optional[Sequence[str]] = None,
                 split_fractions: Mapping[str, float] = None, seed: int = 0,
                 image: Mapping = None, audio: Mapping = None, tokens: Mapping = None,
                 standardize: bool = False, unknown_files: str = "warn"):
        self.root = require_path(root, "dataset.root", "the folder of class folders")
        if not self.root.is_dir():
            raise ConfigError(f"dataset.root={root}: " + ("a file, not a folder" if self.root.exists()
                                                          else "no such folder"))
        self.root = self.root.resolve()
        if unknown_files not in ("warn", "error"):
            raise ConfigError(f"dataset.unknown_files={unknown_files}: must be warn or error")
        if not isinstance(standardize, bool):
            raise ConfigError(f"dataset.standardize={standardize}: must be true or false")
        self.image = {"size": 28, "channels": 1, **(image or {})}
        self.audio = {"n_fft": 256, "hop": 128, "n_mels": 40, "frames": 48, "fmin": 0.0,
                      "fmax": None, "rate": None, **(audio or {})}
        self.tokens = {"length": 32, "lowercase": True, "min_count": 1, **(tokens or {})}
        for key, table, allowed in (("image", self.image, {"size", "channels"}),
                                    ("audio", self.audio, {"n_fft", "hop", "n_mels", "frames", "fmin", "fmax", "rate"}),
                                    ("tokens", self.tokens, {"length", "lowercase", "min_count"})):
            if set(table) - allowed:
                raise ConfigError(f"dataset.{key}: unknown keys {sorted(set(table) - allowed)}; "
                                  f"allowed: {sorted(allowed)}")
        _int_pair(self.image["size"], "dataset.image.size")
        if self.image["channels"] not in (1, 3) or isinstance(self.image["channels"], bool):
            raise ConfigError(f"dataset.image.channels={self.image['channels']}: must be 1 (greyscale) or 3 (RGB)")
        a = self.audio
        check_audio_settings("dataset.audio.", a["n_fft"], a["hop"], a["n_mels"], a["frames"],
                             a["rate"], a["fmin"], a["fmax"])
        for key, least in (("length", 1), ("min_count", 1)):
            v = self.tokens[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ConfigError(f"dataset.tokens.{key}={v}: must be an integer >= {least}")
        self.standardize, self.seed = standardize, seed
        self.split_fractions = dict(split_fractions or {"train": 0.6, "val": 0.2, "test": 0.2})
        # class folders: root/<split>/<class>/ or root/<class>/
        split_dirs = [d for d in SPLITS if (self.root / d).is_dir()]
        if split_dirs:
            if len(split_dirs) < 3:
                absent = [s for s in SPLITS if s not in split_dirs]
                raise ConfigError(f"dataset.root={root}: has {split_dirs} but no {absent[0]}/ folder "
                                  f"(use root/<split>/<class>/ with train, val and test, or root/<class>/)")
            self.layout = "split"
            today = {s: _subdirs(self.root / s) for s in SPLITS}
            bare = [s for s in SPLITS if not today[s]]
            if bare:
                raise ConfigError(f"dataset.root={root}: {bare[0]}/ has no class folders "
                                  f"(expected {bare[0]}/<class>/<sample>.<ext>)")
            self._classes: Optional[Dict[str, List[str]]] = today
            dirs = [self.root / s / c for s in SPLITS for c in today[s]]
        else:
            self.layout = "class"
            names = _subdirs(self.root)
            if not names:
                raise ConfigError(f"dataset.root={root}: no class folders (expected "
                                  f"root/<class>/<sample>.<ext> or root/<split>/<class>/...)")
            self._classes = None  # split by seed when first needed
            self._today_names = names
            dirs = [self.root / c for c in names]
        # scan every class folder once (names only): the modalities found, unknown files
        self._listing: Dict[Path, Dict[str, Dict[str, Path]]] = {}
        unknown: List[Path] = []
        found = set()
        for d in dirs:
            stems, extra = self._list(d)
            unknown += extra
            found |= {m for files in stems.values() for m in files}
        if unknown:
            exts = sorted({f.suffix or f.name for f in unknown})
            msg = (f"dataset.root={root}: {len(unknown)} files with extensions {exts} are not "
                   f"{sorted(EXTENSIONS)}")
            if unknown_files == "error":
                raise ConfigError(msg + f" (first: {unknown[0]}; unknown_files=warn ignores them)")
            log.warning(msg + ": ignored")
        if not found:
            raise ConfigError(f"dataset.root={root}: no sample files ({sorted(EXTENSIONS)}) in its class folders")
        self._found = [m for m in ORDER if m in found]
        self._samples: Dict[str, list] = {}
        self._learned: Dict[str, object] = {}
        super().__init__(modalities)

    # -- files -----------------------------------------------------------------------------
    def _list(self, d: Path) -> Tuple[Dict[str, Dict[str, Path]], List[Path]]:
        """``{stem: {modality: path}}`` of one class folder (cached), and its unknown files."""
        unknown: List[Path] = []
        if d not in self._listing:
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
            self._listing[d] = stems
        return self._listing[d], unknown

    def _class_dir(self, split: str, name: str) -> Path:
        return self.root / split / name if self.layout == "split" else self.root / name

    def classes(self) -> Dict[str, List[str]]:
        """Class names per split, in label order (the seed split of the root/<class>/ layout
        is made on first use, unless a checkpoint's state gave the lists)."""
        if self._classes is None:
            self._classes = split_classes(self._today_names, self.split_fractions, self.seed,
                                          "dataset.split_fractions")
        return self._classes

    def num_classes(self, split: str) -> int:
        return len(self.classes()[split])

    @property
    def class_dirs(self) -> Dict[str, List[Path]]:
        return {s: [self._class_dir(s, c) for c in names] for s, names in self.classes().items()}

    @property
    def samples(self) -> Dict[str, list]:
        """``{split: [(class index, {modality: path})]}``, samples sorted by stem per class."""
        for s in SPLITS:
            if s not in self._samples:
                rows = []
                for c, name in enumerate(self.classes()[s]):
                    stems, _ = self._list(self._class_dir(s, name))
                    for _, files in sorted(stems.items()):
                        kept = {m: p for m, p in files.items() if m in self._found}
                        if kept:
                            rows.append((c, kept))
                self._samples[s] = rows
        return self._samples

    def _files(self, modality: str, split: Optional[str] = "train") -> List[Path]:
        """The files of ``modality`` in ``split`` (None: every split)."""
        splits = SPLITS if split is None else (split,)
        return [files[modality] for s in splits for _, files in self.samples[s] if modality in files]

    # -- what is learned from the files (lazily) --------------------------------------------------
    def _get(self, key: str):
        if key not in self._learned:
            self._learned[key] = getattr(self, f"_learn_{key}")()
        return self._learned[key]

    def _learn_vocab(self) -> List[str]:
        files = self._files("tokens")
        counts = Counter()
        for f in decoding(files, "text files of the train split (vocabulary)") if files else []:
            counts.update(read_words(f, self.tokens["lowercase"]))
        return sorted((w for w, n in counts.items() if n >= self.tokens["min_count"]),
                      key=lambda w: (-counts[w], w))

    def _learn_image_size(self) -> List[int]:
        size = _int_pair(self.image["size"], "dataset.image.size")
        if size is not None:
            return list(size)
        files = self._files("image") or self._files("image", None)
        if not files:
            raise ConfigError(f"dataset.image.size=null: no image files in {self.root} to learn the size from")
        best, _ = most_common([image_size_of(f) for f in files])
        return list(best)

    def _learn_audio_rate(self) -> int:
        a = self.audio
        if a["rate"] is not None:
            return int(a["rate"])
        files, where = self._files("audio"), "the train split's"
        if not files:
            files, where = self._files("audio", None), "all"
        if not files:
            raise ConfigError(f"dataset.audio.rate=null: no .wav files in {self.root} to learn the rate from")
        rate, n = most_common([wav_info(f).rate for f in files])
        check_audio_settings("dataset.audio.", a["n_fft"], a["hop"], a["n_mels"], a["frames"], rate,
                             a["fmin"], a["fmax"], rate_note=f" (dataset.audio.rate=null: {rate} Hz, "
                             f"the rate of {n} of {where} {len(files)} WAV files)")
        return int(rate)

    def _learn_vector_shape(self) -> List[int]:
        files = self._files("vector", None)
        if not files:
            raise ConfigError(f"dataset.root={self.root}: no .npy files to learn the vector shape from")
        headers = [npy_header(f) for f in files]
        for f, (shape, dtype) in zip(files, headers):
            as_float_array(np.zeros(0, dtype=dtype), str(f))  # refuses complex/object/text by dtype
        shape, n = most_common([shape for shape, _ in headers])
        for f, (s, _) in zip(files, headers):
            if s != shape:
                raise ConfigError(f"{f}: shape {list(s)}, but {n} of {len(files)} vector files have "
                                  f"{list(shape)}; every .npy must have the same shape")
        if int(np.prod(shape)) == 0:
            raise ConfigError(f"{files[0]}: holds no values (shape {list(shape)})")
        return list(shape)

    def _learn_vector_stats(self) -> Optional[Dict[str, torch.Tensor]]:
        if not self.standardize:
            return None
        files = self._files("vector")
        if not files:
            raise ConfigError(f"dataset.standardize=true: the train split of {self.root} has no "
                              f".npy files to learn the mean and std from")
        x = torch.stack([self._vector(f) for f in decoding(files, "vector files of the train split "
                                                                  "(mean and std)")]).double()
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))  # a constant feature stays put
        return {"mean": mean.float(), "std": std.float()}

    @property
    def vocab(self) -> Dict[str, int]:
        """Word -> id (0 pads, 1 is an unknown word)."""
        if "tokens" not in self._found:
            return {}
        words = self._get("vocab")
        if getattr(self, "_vocab_of", None) is not words:
            self._vocab_index = {w: i + 2 for i, w in enumerate(words)}
            self._vocab_of = words
        return self._vocab_index

    # -- modalities --------------------------------------------------------------------------
    def modality_names(self) -> List[str]:
        return list(self._found)

    @property
    def all_modalities(self) -> Dict[str, ModalitySpec]:  # type: ignore[override]
        return {m: self.spec(m) for m in self._found}

    def spec(self, m: str) -> ModalitySpec:
        if m == "image":
            h, w = self._get("image_size")
            return ModalitySpec((self.image["channels"], h, w), torch.float32, "image")  # held as uint8
        if m == "audio":
            return ModalitySpec((self.audio["n_mels"], self.audio["frames"]), torch.float32, "audio")
        if m == "tokens":
            return ModalitySpec((self.tokens["length"],), torch.int64, "tokens",
                                vocab=len(self._get("vocab")) + 2)
        return ModalitySpec(tuple(self._get("vector_shape")), torch.float32, "vector")

    # -- decoding ----------------------------------------------------------------------------
    def _vector(self, path: Path) -> torch.Tensor:
        x = load_vector(path)
        want = tuple(self._get("vector_shape"))
        if tuple(x.shape) != want:
            raise ConfigError(f"{path}: shape {list(x.shape)}, but this dataset's vector files "
                              f"have {list(want)}")
        return x

    def decode(self, modality: str, path: str) -> torch.Tensor:
        path = Path(path)
        if modality not in self._found:
            raise ConfigError(f"dataset folder: unknown modality '{modality}'; it has {self._found}")
        if modality == "image":
            return decode_image(path, tuple(self._get("image_size")), self.image["channels"])
        if modality == "audio":
            wave, rate = decode_wav(path)
            target = self._get("audio_rate")
            if rate != target:
                wave = resample(wave, rate, target)
            a = self.audio
            return log_mel(wave, target, a["n_fft"], a["hop"], a["n_mels"], a["frames"], a["fmin"], a["fmax"])[0]
        if modality == "tokens":
            vocab = self.vocab
            ids = [vocab.get(w, 1) for w in read_words(path, self.tokens["lowercase"])]
            ids = (ids + [0] * self.tokens["length"])[: self.tokens["length"]]
            return torch.tensor(ids, dtype=torch.int64)
        x = self._vector(path)
        stats = self._get("vector_stats")
        return (x - stats["mean"]) / stats["std"] if stats is not None else x

    def build_split(self, split: str) -> SplitData:
        rows = self.samples[split]
        names = self.modality_names()
        specs = {m: self.spec(m) for m in self._wanted}
        present = torch.zeros(len(rows), len(names), dtype=torch.bool)
        data = {m: torch.zeros((len(rows),) + tuple(s.shape), dtype=torch.uint8 if m == "image" else s.dtype)
                for m, s in specs.items()}
        jobs = []
        for j, (_, files) in enumerate(rows):
            for m, path in files.items():
                present[j, names.index(m)] = True
                if m in data:
                    jobs.append((j, m, path))
        for m, key in (("audio", "audio_rate"), ("vector", "vector_stats")):
            if m in data:
                self._get(key)  # learned before decoding (its own pass over the train files)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # many tiny STFTs: threading only costs
        try:
            for j, m, path in decoding(jobs, f"files of the {split} split of {self.root}"):
                data[m][j] = self.decode(m, str(path))
        finally:
            torch.set_num_threads(threads)
        labels = torch.tensor([c for c, _ in rows], dtype=torch.int64)
        return SplitData(data, present, labels, len(self.classes()[split]))

    def describe_row(self, split: str, row: int) -> str:
        c, files = self.samples[split][row]
        stem = next(iter(files.values())).stem
        listed = ", ".join(f"{m}: {files[m]}" for m in ORDER if m in files)
        return f"{split}/{self.classes()[split][c]}/{stem} ({listed})"

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        found = self._found
        stats = self._get("vector_stats") if "vector" in found else None
        return {
            "dataset": self.name, "format": FORMAT,
            "classes": {s: list(v) for s, v in self.classes().items()},
            "modalities": list(found),
            "vocab": list(self._get("vocab")) if "tokens" in found else None,
            "image_size": list(self._get("image_size")) if "image" in found else None,
            "image_channels": int(self.image["channels"]),
            "audio_rate": int(self._get("audio_rate")) if "audio" in found else None,
            "vector_shape": list(self._get("vector_shape")) if "vector" in found else None,
            "vector_mean": stats["mean"].clone() if stats is not None else None,
            "vector_std": stats["std"].clone() if stats is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not self._check_state(state):
            return
        classes = state.get("classes")
        if classes is not None:
            if not isinstance(classes, dict) or set(classes) != set(SPLITS):
                raise ConfigError("the checkpoint's folder data state has no class list per split")
            for s in SPLITS:
                for name in classes[s]:
                    d = self._class_dir(s, name)
                    if not d.is_dir():
                        raise ConfigError(f"dataset.root={self.root}: class folder '{name}' of the {s} "
                                          f"split is gone ({d} not found); the checkpoint was trained with it")
            self._classes = {s: [str(c) for c in classes[s]] for s in SPLITS}
        if state.get("modalities") is not None:
            self._found = [m for m in ORDER if m in state["modalities"]]
        if state.get("image_channels") is not None:
            self.image["channels"] = int(state["image_channels"])
        for key in ("vocab", "image_size", "audio_rate", "vector_shape"):
            if state.get(key) is not None:
                value = state[key]
                self._learned[key] = int(value) if key == "audio_rate" else [v for v in value]
        if "vector_mean" in state:
            mean, std = state.get("vector_mean"), state.get("vector_std")
            self._learned["vector_stats"] = None if mean is None else {"mean": mean.float(), "std": std.float()}
        if "audio_rate" in self._learned:
            a = self.audio
            check_audio_settings("dataset.audio.", a["n_fft"], a["hop"], a["n_mels"], a["frames"],
                                 self._learned["audio_rate"], a["fmin"], a["fmax"],
                                 rate_note=" (the checkpoint's audio rate)")
        self._samples.clear()
        self._cache.clear()
        self._kept.clear()
        self._select_modalities()

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """Per split, the sample files (known extensions) of its class folders today: every
        class folder of ``root/<split>/``, or, in the root/<class>/ layout, the split's classes
        plus the names of all class folders (the seed split depends on them)."""
        out = {}
        names = _subdirs(self.root) if self.layout == "class" else None
        for s in SPLITS:
            if self.layout == "split":
                dirs = [self.root / s / c for c in _subdirs(self.root / s)]
            else:
                dirs = [self.root / c for c in self.classes()[s]]
            files = [f for d in dirs if d.is_dir() for f in d.iterdir()
                     if not f.name.startswith(".") and f.suffix.lower() in EXTENSIONS and f.is_file()]
            out[s] = files_digest(files, self.root, names)
        return out
