"""Audio-visual digits: each sample is a spoken digit from the Free Spoken Digit Dataset (FSDD,
Jackson et al., doi:10.5281/zenodo.1342401; 6 speakers x 10 digits x 50 recordings, 8 kHz) paired
with an MNIST image (LeCun et al. 1998) of the same digit. The pairing is fixed by ``seed``: per
digit, MNIST images are drawn without replacement, from MNIST's training images for the train
and val splits and from its test images for the test split.

- ``image``: uint8 ``[1, 28, 28]`` (float in [0, 1] in episodes).
- ``audio``: float32 ``[n_mels, frames]``: log-mel spectrogram (``torch.stft``, Hann window
  ``n_fft``, hop ``hop``, HTK mel filters; :func:`metamm_cli.data.decode.log_mel`) of the first
  ``frames`` frames (silence-padded), standardised per recording (zero mean, unit variance).
  Rank 2 (mel bins as channels), so the default ``encoder/audio=conv1d`` reads it.

With only ten classes, the protocols (``protocol``) are:

- ``digits`` (novel classes): meta-train on digits 0-4 with FSDD recordings 10-49, validate on
  digits 0-4 with recordings 5-9 (held-out samples of the training classes), test on digits
  5-9 with FSDD's official test recordings 0-4 and MNIST test images (30 samples per class).
- ``speakers`` (novel speakers, same ten digits): all 50 recordings of george, jackson, lucas
  and nicolas train, theo validates, yweweler tests (with MNIST test images); up to 10-way.

``root`` holds ``mnist/`` (the four IDX ``.gz`` files) and ``fsdd/recordings/``
(``{digit}_{speaker}_{index}.wav``); ``mnist_dir`` and ``fsdd_dir`` override those sub-paths.
Recordings at another rate than ``rate`` are resampled (band-limited,
:func:`metamm_cli.data.decode.resample`).

The digits of each split (in label order) are the :meth:`state_dict`; a checkpoint's state
restores them, and a stored digit without recordings in its split today is an error naming it.
"""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset, files_digest, require_path
from metamm_cli.data.cache import cached
from metamm_cli.data.decode import check_audio_settings, decode_image, decode_wav, log_mel, resample
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.progress import decoding

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SPEAKERS = {"train": ["george", "jackson", "lucas", "nicolas"], "val": ["theo"], "test": ["yweweler"]}
_WAV = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) -> numpy array (uint8 data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError):
        raise ConfigError(f"{path}: not a readable MNIST IDX file (corrupt, cut short or not "
                          f"unsigned bytes)") from None


class AVDigits(MultimodalDataset):
    name = "avdigits"

    def __init__(self, root: str, protocol: str = "digits", mnist_dir: str = "mnist",
                 fsdd_dir: str = "fsdd/recordings", rate: int = 8000, n_fft: int = 256,
                 hop: int = 128, n_mels: int = 40, frames: int = 48, seed: int = 0,
                 cache: bool = True, cache_dir: Optional[str] = None,
                 modalities: Optional[Sequence[str]] = None):
        self.all_modalities = {
            "image": ModalitySpec((1, 28, 28), torch.float32, "image"),
            "audio": ModalitySpec((n_mels, frames), torch.float32, "audio"),
        }
        super().__init__(modalities)
        if protocol not in ("digits", "speakers"):
            raise ConfigError(f"dataset.protocol={protocol}: must be 'digits' (train 0-4, test 5-9) "
                              f"or 'speakers' (unseen speakers at test)")
        check_audio_settings("dataset.", n_fft, hop, n_mels, frames, rate)
        root_p = require_path(root, "dataset.root", "the folder holding mnist/ and fsdd/recordings/")
        self.root = root_p
        self.mnist = root_p / mnist_dir
        self.fsdd = root_p / fsdd_dir
        missing = [str(self.mnist / f) for fs in MNIST_FILES.values() for f in fs if not (self.mnist / f).is_file()]
        if missing:
            raise ConfigError(f"dataset.root={root}: MNIST file {missing[0]} not found; put the four "
                              f"MNIST IDX .gz files in {self.mnist} (or set dataset.mnist_dir)")
        if not self.fsdd.is_dir() or not any(self.fsdd.glob("*.wav")):
            raise ConfigError(f"dataset.root={root}: no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav) "
                              f"in {self.fsdd}; put FSDD's recordings/ there (or set dataset.fsdd_dir)")
        self.protocol, self.seed = protocol, seed
        self.mel = dict(rate=rate, n_fft=n_fft, hop=hop, n_mels=n_mels, frames=frames)
        self.cache, self.cache_dir = cache, cache_dir
        self._data: Optional[dict] = None
        self._recs: Optional[List[Tuple[int, str, int, Path]]] = None
        self._classes: Optional[Dict[str, List[int]]] = None
        self._picked: Dict[str, Tuple[List[int], List[int]]] = {}

    # -- decoding ---------------------------------------------------------------------------
    def audio_features(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        """A waveform -> ``[n_mels, frames]`` standardised log-mel (resampled, band-limited, to ``rate``)."""
        target = self.mel["rate"]
        if rate != target:
            wave = resample(wave, rate, target)
        m = log_mel(wave, target, self.mel["n_fft"], self.mel["hop"], self.mel["n_mels"], self.mel["frames"])[0]
        return (m - m.mean()) / m.std().clamp_min(1e-5)

    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality == "image":
            return decode_image(path, 28, 1)
        if modality == "audio":
            return self.audio_features(*decode_wav(path))
        raise ConfigError(f"dataset avdigits has no modality '{modality}' (image, audio)")

    def recordings(self) -> List[Tuple[int, str, int, Path]]:
        """``(digit, speaker, index, path)`` of every FSDD file, sorted by name (cached)."""
        if self._recs is None:
            out = []
            for p in sorted(self.fsdd.glob("*.wav")):
                m = _WAV.match(p.name)
                if m:
                    out.append((int(m[1]), m[2], int(m[3]), p))
            self._recs = out
        return self._recs

    def load(self) -> dict:
        """Every recording's features plus the MNIST arrays (cached)."""
        if self._data is None:
            recs = self.recordings()
            files = [r[3] for r in recs] + [self.mnist / f for fs in MNIST_FILES.values() for f in fs]

            def build():
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # thousands of tiny STFTs: threading only costs
                try:
                    audio = torch.stack([self.audio_features(*decode_wav(p))
                                         for *_, p in decoding(recs, f"recordings of {self.fsdd}")])
                finally:
                    torch.set_num_threads(threads)
                out = {"audio": audio, "digit": [r[0] for r in recs], "speaker": [r[1] for r in recs],
                       "index": [r[2] for r in recs]}
                for part, (img, lab) in MNIST_FILES.items():
                    images, labels = read_idx(self.mnist / img), read_idx(self.mnist / lab)
                    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                        raise ConfigError(f"{self.mnist / img}: MNIST images and labels do not match")
                    out[f"mnist_{part}"] = torch.from_numpy(images.copy())[:, None]
                    out[f"mnist_{part}_labels"] = torch.from_numpy(labels.astype(np.int64))
                return out

            self._data = cached("avdigits", files, {"kind": "avdigits", "resampler": "sinc", **self.mel}, build,
                                self.cache_dir, self.cache)
        return self._data

    def _protocol_rows(self) -> Dict[str, List[int]]:
        """Recording rows (of :meth:`recordings`, the order of the decoded arrays) of each split
        under the protocol; from the file names only."""
        rows: Dict[str, List[int]] = {"train": [], "val": [], "test": []}
        for i, (digit, spk, idx, _) in enumerate(self.recordings()):
            if self.protocol == "digits":
                if digit >= 5:
                    split = "test" if idx <= 4 else None
                else:
                    split = "train" if idx >= 10 else "val" if idx >= 5 else None
            else:
                split = next((s for s, v in SPEAKERS.items() if spk in v), None)
            if split:
                rows[split].append(i)
        return rows

    def classes(self) -> Dict[str, List[int]]:
        """The digits of each split, in label order: those with recordings under the protocol,
        or a checkpoint's lists."""
        if self._classes is None:
            recs = self.recordings()
            self._classes = {s: sorted({recs[i][0] for i in r}) for s, r in self._protocol_rows().items()}
        return self._classes

    def num_classes(self, split: str) -> int:
        return len(self.classes()[split])

    def assignment(self) -> Dict[str, List[int]]:
        """The recording rows of each split: the protocol's, of the split's digits."""
        recs, classes = self.recordings(), self.classes()
        return {s: [i for i in r if recs[i][0] in classes[s]] for s, r in self._protocol_rows().items()}

    def build_split(self, split: str) -> SplitData:
        d, rows = self.load(), self.assignment()
        g = torch.Generator().manual_seed(self.seed)
        # per digit, one permutation of MNIST's training images shared by train then val (disjoint)
        pools, used = {}, {}
        for part in ("train", "test"):
            labels = d[f"mnist_{part}_labels"]
            for digit in range(10):
                idx = torch.nonzero(labels == digit).flatten()
                pools[part, digit] = idx[torch.randperm(len(idx), generator=g)]
                used[part, digit] = 0
        picked: Dict[str, List[int]] = {}
        for s in ("train", "val", "test"):
            part = "test" if s == "test" else "train"
            picked[s] = []
            for r in rows[s]:
                digit = d["digit"][r]
                k = used[part, digit]
                if k >= len(pools[part, digit]):
                    raise ConfigError(f"avdigits: not enough MNIST {part} images of digit {digit} to pair")
                picked[s].append(int(pools[part, digit][k]))
                used[part, digit] = k + 1
        r = torch.tensor(rows[split], dtype=torch.long)
        if len(r) == 0:
            raise ConfigError(f"avdigits: the {split} split of protocol {self.protocol} is empty "
                              f"(recordings in {self.fsdd} incomplete?)")
        classes = self.classes()[split]
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[d["digit"][i]] for i in rows[split]], dtype=torch.long)
        image = d["mnist_test" if split == "test" else "mnist_train"][torch.tensor(picked[split])]
        present = torch.ones(len(r), 2, dtype=torch.bool)
        self._picked[split] = (rows[split], picked[split])
        return SplitData({"image": image, "audio": d["audio"][r]}, present, labels, len(classes))

    def describe_row(self, split: str, row: int) -> str:
        recs, picked = self._picked[split]
        digit, _, _, path = self.recordings()[recs[row]]
        part = "test" if split == "test" else "train"
        return (f"{split}/{digit}/{path.stem} (audio: {path}, image: #{picked[row]} of "
                f"{self.mnist / MNIST_FILES[part][0]})")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"dataset": self.name, "format": 1,
                "classes": {s: [int(c) for c in v] for s, v in self.classes().items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self._check_state(state) or state.get("classes") is None:
            return
        self._classes = {s: [int(c) for c in state["classes"][s]] for s in SPLITS}
        rows = self.assignment()
        for s in SPLITS:
            have = {self.recordings()[i][0] for i in rows[s]}  # (cached list)
            gone = [c for c in self._classes[s] if c not in have]
            if gone:
                raise ConfigError(f"dataset.root={self.root}: digit {gone[0]} of the {s} split has no recordings "
                                  f"in {self.fsdd} any more; the checkpoint was trained with it")
        self._cache.clear()
        self._kept.clear()

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """Per split, its recordings and the MNIST files its images come from, by name, size and
        modification time."""
        rows, recs = self.assignment(), self.recordings()
        out = {}
        for s in SPLITS:
            part = "test" if s == "test" else "train"
            files = [recs[i][3] for i in rows[s]] + [self.mnist / f for f in MNIST_FILES[part]]
            out[s] = files_digest(files, self.root)
        return out
