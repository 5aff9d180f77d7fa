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
"""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from metamm_cli import ConfigError
from metamm_cli.data.base import MultimodalDataset
from metamm_cli.data.cache import cached
from metamm_cli.data.decode import decode_image, decode_wav, log_mel
from metamm_cli.data.episodes import ModalitySpec, SplitData

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
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise ConfigError(f"{path}: not a readable MNIST IDX file ({type(e).__name__}: {e})") from None


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
        if n_fft < 16 or hop < 1 or n_mels < 2 or frames < 4 or rate < 1000:
            raise ConfigError("dataset: n_fft >= 16, hop >= 1, n_mels >= 2, frames >= 4, rate >= 1000 required")
        root_p = Path(str(root)).expanduser()
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

    # -- decoding ---------------------------------------------------------------------------
    def audio_features(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        """A waveform -> ``[n_mels, frames]`` standardised log-mel (resampled linearly to ``rate``)."""
        target = self.mel["rate"]
        if rate != target:
            n = max(1, round(wave.numel() * target / rate))
            wave = F.interpolate(wave[None, None], size=n, mode="linear", align_corners=False)[0, 0]
        m = log_mel(wave, target, self.mel["n_fft"], self.mel["hop"], self.mel["n_mels"], self.mel["frames"])[0]
        return (m - m.mean()) / m.std().clamp_min(1e-5)

    def decode(self, modality: str, path: str) -> torch.Tensor:
        if modality == "image":
            return decode_image(path, 28, 1)
        if modality == "audio":
            return self.audio_features(*decode_wav(path))
        raise ConfigError(f"dataset avdigits has no modality '{modality}' (image, audio)")

    def recordings(self) -> List[Tuple[int, str, int, Path]]:
        out = []
        for p in sorted(self.fsdd.glob("*.wav")):
            m = _WAV.match(p.name)
            if m:
                out.append((int(m[1]), m[2], int(m[3]), p))
        return out

    def load(self) -> dict:
        """Every recording's features plus the MNIST arrays (cached)."""
        if self._data is None:
            recs = self.recordings()
            files = [r[3] for r in recs] + [self.mnist / f for fs in MNIST_FILES.values() for f in fs]

            def build():
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # thousands of tiny STFTs: threading only costs
                try:
                    audio = torch.stack([self.audio_features(*decode_wav(p)) for *_, p in recs])
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

            self._data = cached("avdigits", files, {"kind": "avdigits", **self.mel}, build,
                                self.cache_dir, self.cache)
        return self._data

    def assignment(self) -> Dict[str, List[int]]:
        """Recording rows of each split under the protocol."""
        d = self.load()
        rows: Dict[str, List[int]] = {"train": [], "val": [], "test": []}
        for i, (digit, spk, idx) in enumerate(zip(d["digit"], d["speaker"], d["index"])):
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
        digits = torch.tensor([d["digit"][i] for i in rows[split]])
        classes = sorted(set(digits.tolist()))
        labels = torch.searchsorted(torch.tensor(classes), digits)
        image = d["mnist_test" if split == "test" else "mnist_train"][torch.tensor(picked[split])]
        present = torch.ones(len(r), 2, dtype=torch.bool)
        return SplitData({"image": image, "audio": d["audio"][r]}, present, labels, len(classes))
