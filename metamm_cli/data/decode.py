"""One decoding function per modality: a file (a path, or bytes read from an archive) -> the
tensor a dataset stores per sample. Used alike by the split builders (omniglot, avdigits, ...),
by the ``folder`` dataset and by fixed-episode evaluation, so a file decodes the same way
everywhere. A file that cannot be decoded raises :class:`metamm_cli.ConfigError` naming it.

- :func:`decode_image`: Pillow, greyscale or RGB, antialiased (Lanczos) resize -> uint8 ``[C, H, W]``.
- :func:`decode_wav`: Python's ``wave`` module, 8/16/24/32-bit PCM, mixed to mono -> float ``[L]``, rate.
- :func:`log_mel`: ``torch.stft`` power spectrum, HTK-mel triangular filterbank, ``log(x + eps)``,
  cropped/padded to a fixed number of frames -> ``[1, n_mels, frames]``.
- :func:`decode_strokes`: Omniglot stroke text (``START`` / ``BREAK`` / ``x,y,t`` lines) ->
  ``[length, 3]`` float (x, y, pen) resampled uniformly by arc length, normalised per drawing.
"""
from __future__ import annotations

import io
import math
import wave
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch

from metamm_cli import ConfigError

Source = Union[str, Path, bytes]
LOG_EPS = 1e-6


def _open(source: Source, name: str | None):
    """(file object, name for errors)."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), name or "<bytes>"
    return open(source, "rb"), name or str(source)


def decode_image(source: Source, size: int | Tuple[int, int] | None = None, channels: int = 1,
                 invert: bool = False, name: str | None = None) -> torch.Tensor:
    """An image file -> uint8 ``[channels, H, W]`` (``size``: an int for a square, ``(H, W)``,
    or None to keep the file's size); resized with Pillow's Lanczos filter (antialiased);
    ``invert`` maps ``v -> 255 - v`` (Omniglot: dark strokes on white become bright strokes)."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ConfigError(f"image channels={channels}: must be 1 (greyscale) or 3 (RGB)")
    fh, name = _open(source, name)
    try:
        with fh, Image.open(fh) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"{name}: not a readable image file ({type(e).__name__})") from None
    if invert:
        arr = 255 - arr
    x = torch.from_numpy(arr.copy())
    return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()


def decode_wav(source: Source, name: str | None = None) -> Tuple[torch.Tensor, int]:
    """A PCM WAV file -> (float32 mono waveform ``[L]`` in [-1, 1], sample rate). 8-bit is
    unsigned, 16/24/32-bit signed (the WAV conventions); channels are averaged."""
    fh, name = _open(source, name)
    try:
        with fh, wave.open(fh, "rb") as w:
            width, nch, rate, n = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"{name}: not a readable PCM WAV file ({type(e).__name__}: {e or 'truncated'})") from None
    usable = len(raw) // (width * nch) * (width * nch)
    if usable == 0:
        raise ConfigError(f"{name}: WAV file holds no samples")
    raw = raw[:usable]
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ConfigError(f"{name}: {8 * width}-bit WAV samples are not supported (8/16/24/32-bit PCM)")
    x = x.reshape(-1, nch).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(x)), rate


def hz_to_mel(f):
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(n_mels: int, n_fft: int, rate: int, fmin: float = 0.0,
                   fmax: float | None = None) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, centres equally spaced on the HTK mel
    scale between ``fmin`` and ``fmax`` (default ``rate / 2``), peak 1 (no area normalisation)."""
    fmax = rate / 2 if fmax is None else fmax
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down))).float()


def log_mel(wave_: torch.Tensor, rate: int, n_fft: int = 256, hop: int = 128, n_mels: int = 40,
            frames: int = 48, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """Log-mel spectrogram ``[1, n_mels, frames]``: ``log(M @ |STFT|^2 + 1e-6)`` with a Hann
    window of ``n_fft`` samples, hop ``hop``, centred frames (``torch.stft(center=True)``,
    reflect padding); longer signals are cropped to the first ``frames`` frames, shorter ones
    padded with ``log(1e-6)`` (silence)."""
    x = wave_.float().flatten()
    if x.numel() <= n_fft // 2:  # reflect padding needs more than n_fft / 2 samples
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.numel()))
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft),
                      center=True, pad_mode="reflect", return_complex=True).abs().pow(2)
    mel = torch.log(mel_filterbank(n_mels, n_fft, rate, fmin, fmax) @ spec + LOG_EPS)  # cached: do not modify
    mel = mel[:, :frames]
    if mel.shape[1] < frames:
        mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[1]), value=math.log(LOG_EPS))
    return mel[None].contiguous()


def parse_strokes(text: str, name: str = "<strokes>") -> List[np.ndarray]:
    """Omniglot stroke text -> list of ``[P, 3]`` arrays (x, y, t), one per stroke."""
    strokes, cur = [], []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line in ("START", "BREAK"):
            if cur:
                strokes.append(np.asarray(cur, dtype=np.float64))
            cur = []
            continue
        try:
            vals = [float(v) for v in line.split(",")]
        except ValueError:
            vals = []
        if len(vals) < 2:
            raise ConfigError(f"{name}: line {i} is not 'x,y,t', 'START' or 'BREAK': {line[:40]!r}")
        cur.append(vals[:3] + [0.0] * (3 - len(vals[:3])))
    if cur:
        strokes.append(np.asarray(cur, dtype=np.float64))
    if not strokes:
        raise ConfigError(f"{name}: no stroke points found")
    return strokes


def resample_strokes(strokes: List[np.ndarray], length: int) -> np.ndarray:
    """Strokes -> ``[length, 3]`` float32: points equally spaced by arc length along the pen
    path (strokes concatenated; the pen-up jump between strokes is not drawn and has length 0),
    column 2 is the pen state (1 on the first point of each stroke, 0 elsewhere; a point-only
    stroke still gets a pen-down mark). x, y are centred on the drawing's mean point and divided
    by its largest absolute coordinate (the drawing fits [-1, 1], aspect kept)."""
    xy, seg, starts = [], [], []
    offset = 0.0
    for s in strokes:
        p = s[:, :2]
        d = np.r_[0.0, np.sqrt((np.diff(p, axis=0) ** 2).sum(1))]
        starts.append(offset)
        xy.append(p)
        seg.append(offset + np.cumsum(d))
        offset = seg[-1][-1] + 1e-9  # strokes abut in arc length
    pos, pts = np.concatenate(seg), np.concatenate(xy)
    total = pos[-1]
    t = np.linspace(0.0, total, length) if total > 0 else np.zeros(length)
    out = np.zeros((length, 3), dtype=np.float64)
    out[:, 0] = np.interp(t, pos, pts[:, 0])
    out[:, 1] = np.interp(t, pos, pts[:, 1])
    for st in starts:  # pen down: the resampled point nearest each stroke start
        out[int(np.argmin(np.abs(t - st))), 2] = 1.0
    out[:, :2] -= out[:, :2].mean(0)
    scale = np.abs(out[:, :2]).max()
    if scale > 0:
        out[:, :2] /= scale
    return out.astype(np.float32)


def decode_strokes(source: Source, length: int = 64, name: str | None = None) -> torch.Tensor:
    """An Omniglot stroke file -> float32 ``[length, 3]`` (see :func:`resample_strokes`)."""
    if length < 2:
        raise ConfigError(f"strokes length={length}: must be >= 2")
    fh, name = _open(source, name)
    try:
        with fh:
            text = fh.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: not a readable stroke text file ({type(e).__name__})") from None
    return torch.from_numpy(resample_strokes(parse_strokes(text, name), length))
