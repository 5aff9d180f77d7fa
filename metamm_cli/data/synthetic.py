"""Procedural multimodal classes: no download, deterministic by seed, built in about a second.

A class is a triple of latent codes ``(i, j, k)``: the image draws glyph ``i`` (three pen
strokes, randomly rotated, scaled and shifted per sample, plus pixel noise), the audio-like
signal plays chord ``j`` (three enveloped sinusoids, randomly delayed and scaled, plus noise)
and the token sequence spells word ``k`` (random tokens replaced with probability
``noise.tokens``). Missing modalities are drawn per episode by the sampler (``missing.*``).
With ``codes[split]`` codes per factor a split has ``codes**3`` classes, so
any one modality alone sees only one factor and confuses every class that shares it: in a 5-way
task drawn with 10 codes per factor, some two classes share the glyph in ~70% of tasks
(1 - 10*9*8*7*6 / 10**5), whereas the three modalities together name the class. Codes (glyphs, chords, words) are disjoint across
splits, so validation and test classes are made of patterns never seen in training.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from metamm_cli import ConfigError
from metamm_cli.data.base import SPLITS, MultimodalDataset, settings_digest
from metamm_cli.data.episodes import ModalitySpec, SplitData


def glyphs(n: int, size: int, g: torch.Generator, strokes: int = 3) -> torch.Tensor:
    """``n`` glyph templates ``[n, size, size]`` in [0, 1]: quadratic Bezier pen strokes."""
    ctrl = torch.rand(n, strokes, 3, 2, generator=g) * (size - 8) + 4
    t = torch.linspace(0, 1, 24)[:, None]
    pts = ((1 - t) ** 2 * ctrl[:, :, None, 0] + 2 * (1 - t) * t * ctrl[:, :, None, 1]
           + t ** 2 * ctrl[:, :, None, 2]).reshape(n, -1, 2)  # [n, P, 2]
    axis = torch.arange(size, dtype=torch.float32)
    d2 = (axis[None, None, None, :] - pts[..., 0, None, None]) ** 2 \
        + (axis[None, None, :, None] - pts[..., 1, None, None]) ** 2  # [n, P, H, W]
    return torch.exp(-d2 / (2 * (size / 28.0) ** 2)).amax(dim=1)


def chords(n: int, length: int, g: torch.Generator, tones: int = 3) -> torch.Tensor:
    """``n`` signal templates ``[n, length]`` with unit RMS: enveloped sinusoids."""
    t = torch.arange(length, dtype=torch.float32) / length
    freq = torch.randint(2, max(3, length // 6), (n, tones, 1), generator=g).float()
    phase = torch.rand(n, tones, 1, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, tones, 1, generator=g)
    centre = torch.rand(n, tones, 1, generator=g)
    width = 0.1 + 0.3 * torch.rand(n, tones, 1, generator=g)
    wave = (amp * torch.sin(2 * math.pi * freq * t + phase)
            * torch.exp(-((t - centre) ** 2) / (2 * width ** 2))).sum(1)
    return wave / wave.pow(2).mean(-1, keepdim=True).sqrt()


class SyntheticMultimodal(MultimodalDataset):
    name = "synthetic"

    def __init__(self, modalities: Optional[Sequence[str]] = None,
                 codes: Mapping[str, int] = None, samples_per_class: int = 20,
                 image_size: int = 28, audio_length: int = 128, token_length: int = 12,
                 vocab: int = 32, noise: Mapping[str, float] = None,
                 missing: Mapping[str, float] = None, seed: int = 0):
        self.all_modalities = {
            "image": ModalitySpec((1, image_size, image_size), torch.float32, "image"),
            "audio": ModalitySpec((1, audio_length), torch.float32, "audio"),
            "tokens": ModalitySpec((token_length,), torch.int64, "tokens", vocab=vocab),
        }
        super().__init__(modalities)
        self.codes = dict(codes or {"train": 10, "val": 6, "test": 8})
        self.noise = {"image": 0.5, "audio": 0.5, "tokens": 0.2, **(noise or {})}
        if any(missing.values()) if missing else False:  # zeros: a run stored before the change
            raise ConfigError("dataset.missing was replaced by missing.train.<modality> / "
                              "missing.test.<modality> (drawn per episode), e.g. missing.train.image=0.5")
        for key, table in (("codes", self.codes), ("noise", self.noise)):
            allowed = SPLITS if key == "codes" else tuple(self.all_modalities)
            if set(table) - set(allowed):
                raise ConfigError(f"dataset.{key}: keys must be among {list(allowed)}, got {list(table)}")
        if any(self.codes.get(s, 0) < 2 for s in SPLITS):
            raise ConfigError(f"dataset.codes={self.codes}: each of train/val/test needs >= 2")
        if samples_per_class < 2 or image_size < 8 or audio_length < 16 or token_length < 1 or vocab < 2:
            raise ConfigError("dataset: samples_per_class >= 2, image_size >= 8, audio_length >= 16, "
                              "token_length >= 1 and vocab >= 2 are required")
        self.samples_per_class, self.seed = samples_per_class, seed
        self.image_size, self.audio_length, self.token_length, self.vocab = (
            image_size, audio_length, token_length, vocab)
        total = sum(self.codes.values())
        g = torch.Generator().manual_seed(seed)
        self.templates = {"image": glyphs(total, image_size, g), "audio": chords(total, audio_length, g),
                          "tokens": torch.randint(vocab, (total, token_length), generator=g)}

    def num_classes(self, split: str) -> int:
        return self.codes[split] ** 3

    def build_split(self, split: str) -> SplitData:
        n = self.codes[split]
        offset = sum(self.codes[s] for s in SPLITS[: SPLITS.index(split)])
        C, R = n ** 3, self.samples_per_class
        g = torch.Generator().manual_seed(self.seed * 1000 + 17 + SPLITS.index(split))
        labels = torch.arange(C).repeat_interleave(R)
        factor = {"image": labels // (n * n), "audio": labels // n % n, "tokens": labels % n}
        S = C * R
        data: Dict[str, torch.Tensor] = {}

        code = self.templates["image"][factor["image"] + offset][:, None]  # [S, 1, H, W]
        angle = (torch.rand(S, generator=g) - 0.5) * 0.5
        scale = 0.85 + 0.3 * torch.rand(S, generator=g)
        shift = (torch.rand(S, 2, generator=g) - 0.5) * 0.2
        theta = torch.stack([torch.stack([scale * angle.cos(), -scale * angle.sin(), shift[:, 0]], 1),
                             torch.stack([scale * angle.sin(), scale * angle.cos(), shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(code.shape), align_corners=False)
        image = F.grid_sample(code, grid, align_corners=False)
        data["image"] = image + self.noise["image"] * torch.randn(image.shape, generator=g)

        L = self.audio_length
        wave = self.templates["audio"][factor["audio"] + offset]
        delay = torch.randint(-L // 8, L // 8 + 1, (S, 1), generator=g)
        wave = torch.gather(wave, 1, (torch.arange(L) + delay) % L)
        gain = 0.8 + 0.4 * torch.rand(S, 1, generator=g)
        data["audio"] = (gain * wave + self.noise["audio"] * torch.randn(S, L, generator=g))[:, None]

        tokens = self.templates["tokens"][factor["tokens"] + offset]
        flip = torch.rand(tokens.shape, generator=g) < self.noise["tokens"]
        data["tokens"] = torch.where(flip, torch.randint(self.vocab, tokens.shape, generator=g), tokens)
        present = torch.ones(S, len(self.all_modalities), dtype=torch.bool)
        return SplitData(data, present, labels, C)

    def fingerprint(self) -> Dict[str, Dict[str, object]]:
        """Generated data: per split, a digest of the settings it is generated from."""
        common = {"samples_per_class": self.samples_per_class, "image_size": self.image_size,
                  "audio_length": self.audio_length, "token_length": self.token_length,
                  "vocab": self.vocab, "noise": self.noise, "codes": self.codes, "seed": self.seed}
        return {s: settings_digest({"split": s, **common}) for s in SPLITS}

    def decode(self, modality: str, path: str) -> torch.Tensor:
        raise ConfigError(f"dataset synthetic cannot decode files ({path}): it is generated; "
                          f"fixed-episode files need a dataset read from files (folder, omniglot, ...)")
