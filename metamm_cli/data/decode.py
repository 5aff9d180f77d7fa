"""One decoding function per modality: a file (a path, or bytes read from an archive) -> the
tensor a dataset stores per sample. Used alike by the split builders (omniglot, avdigits, ...),
by the ``folder`` dataset and by fixed-episode evaluation, so a file decodes the same way
everywhere. A file that cannot be decoded, or whose content is unusable (NaN, a 0 Hz header,
no samples, ...), raises :class:`metamm_cli.ConfigError`: one line naming the file and the cause.

- :func:`decode_image`: Pillow; every mode brought to 8-bit greyscale or RGB the way a viewer
  shows it (16-bit scaled, palettes expanded, alpha composited over white, CMYK converted),
  antialiased (Lanczos) resize -> uint8 ``[C, H, W]``.
- :func:`decode_wav`: a RIFF/WAVE reader of its own (Python's ``wave`` reads only plain PCM):
  PCM 8/16/24/32-bit, IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE with a PCM or float subformat;
  channels averaged -> float ``[L]``, rate. :func:`resample`: band-limited (Hann-windowed sinc).
- :func:`log_mel`: ``torch.stft`` power spectrum, HTK-mel triangular filterbank, ``log(x + eps)``,
  cropped/padded to a fixed number of frames -> ``[1, n_mels, frames]``;
  :func:`check_audio_settings` refuses settings it cannot honour, naming the key.
- :func:`decode_strokes`: Omniglot stroke text (``START`` / ``BREAK`` / ``x,y,t`` lines) ->
  ``[length, 3]`` float (x, y, pen) resampled uniformly by arc length, normalised per drawing.
- :func:`load_npy` / :func:`as_float_array`: numeric arrays -> float32 (bool/int converted;
  complex, object and text refused).
"""
from __future__ import annotations

import io
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
import torch

from metamm_cli import ConfigError

log = logging.getLogger("metamm")

Source = Union[str, Path, bytes]
LOG_EPS = 1e-6


def _open(source: Source, name: str | None):
    """(file object, name for errors)."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), name or "<bytes>"
    return open(source, "rb"), name or str(source)


def _read(source: Source, name: str | None, what: str) -> Tuple[bytes, str]:
    """The whole file and its name for errors; an unreadable or empty file is refused."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "<bytes>"
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ConfigError(f"{name}: cannot read the file ({e.strerror or type(e).__name__})") from None
    if not data:
        raise ConfigError(f"{name}: empty file (0 bytes); expected {what}")
    return data, name


# -- images ------------------------------------------------------------------------------------
_BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over (a viewer's white)


def _open_image(data: bytes, name: str):
    """Pillow's image of ``data`` (header read only), refusing decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        numbers = re.findall(r"\d+", str(e))
        pixels = f"{int(numbers[0]):,} pixels" if numbers else "too many pixels"
        raise ConfigError(f"{name}: {pixels}, more than the limit of {Image.MAX_IMAGE_PIXELS:,} "
                          f"(a guard against decompression bombs); downscale the image") from None
    except UnidentifiedImageError:
        raise ConfigError(f"{name}: not a readable image file (not a format Pillow knows)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        raise ConfigError(f"{name}: not a readable image file (corrupt header)") from None


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size_of(source: Source, name: str | None = None) -> Tuple[int, int]:
    """``(H, W)`` of an image file as :func:`decode_image` sees it (EXIF rotation applied),
    from its header only."""
    data, name = _read(source, name, "an image")
    with _open_image(data, name) as img:
        w, h = img.size
        if "exif" in img.info:
            try:
                if img.getexif().get(0x0112) in _ROTATED:
                    w, h = h, w
            except Exception:  # noqa: BLE001 - an unreadable EXIF block is ignored, as a viewer does
                pass
    return h, w


def _to_8bit(img, name: str):
    """Any Pillow mode -> an ``L`` or ``RGB`` image: 16-bit greyscale (``I;16*``, and ``I`` read
    as 16-bit) scaled by 255/65535 with rounding; palettes expanded; alpha (``RGBA``, ``LA``,
    ``PA``, palette transparency) composited over white; ``1``, ``CMYK``, ``YCbCr``, ... converted
    by Pillow."""
    from PIL import Image

    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ConfigError(f"{name}: 32-bit integer pixels outside 0..65535; save it as an 8- or "
                              f"16-bit image")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F":
        raise ConfigError(f"{name}: 32-bit float pixels (mode F) are not supported; save it as an "
                          f"8- or 16-bit image")
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        out = Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND + (255,)), rgba)
        return out.convert("L" if mode in ("LA", "La") else "RGB")
    return img.convert("L" if mode == "1" else "RGB")


def decode_image(source: Source, size: int | Tuple[int, int] | None = None, channels: int = 1,
                 invert: bool = False, name: str | None = None,
                 box: Tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """An image file -> uint8 ``[channels, H, W]`` (``size``: an int for a square, ``(H, W)``,
    or None to keep the file's size); resized with Pillow's Lanczos filter (antialiased);
    ``invert`` maps ``v -> 255 - v`` (Omniglot: dark strokes on white become bright strokes);
    ``box`` ``(x, y, width, height)`` in pixels (CUB's ``bounding_boxes.txt``) crops the image to
    it first (rounded outwards, clipped to the image; an empty box is refused).

    Pixels are read as a viewer shows them: EXIF orientation applied; 16-bit greyscale scaled
    to 8 bits (``round(v * 255 / 65535)``); palette images expanded; transparent pixels
    composited over a white background; 1-bit, CMYK and other modes converted by Pillow; RGB to
    greyscale with Pillow's ITU-R 601-2 luma. Empty, truncated and corrupt files, and images of
    more pixels than Pillow's decompression-bomb limit, are refused naming the file."""
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ConfigError(f"image channels={channels}: must be 1 (greyscale) or 3 (RGB)")
    data, name = _read(source, name, "an image")
    img = _open_image(data, name)
    try:
        with img:
            img.load()
            if "exif" in img.info:  # a camera's orientation tag (JPEG, PNG eXIf)
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - an unreadable EXIF block is ignored, as a viewer does
                    pass
            img = _to_8bit(img, name).convert("L" if channels == 1 else "RGB")
            if box is not None:
                img = _crop(img, box, name)
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except ConfigError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError):
        raise ConfigError(f"{name}: not a readable image file (truncated or corrupt image data)") from None
    if invert:
        arr = 255 - arr
    x = torch.from_numpy(arr.copy())
    return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()


def _crop(img, box, name: str):
    x, y, w, h = (float(v) for v in box)
    left, top = max(0, math.floor(x)), max(0, math.floor(y))
    right, bottom = min(img.size[0], math.ceil(x + w)), min(img.size[1], math.ceil(y + h))
    if right <= left or bottom <= top:
        raise ConfigError(f"{name}: bounding box (x {x:g}, y {y:g}, width {w:g}, height {h:g}) holds no "
                          f"pixel of the {img.size[0]}x{img.size[1]} image")
    return img.crop((left, top, right, bottom))


# -- WAV ---------------------------------------------------------------------------------------
PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_FORMAT_NAMES = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM",
                 0x0055: "MP3", 0x0050: "MPEG"}
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_*


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says: ``format`` PCM (1) or IEEE float (3) (an EXTENSIBLE file's
    subformat), ``width`` bytes per sample and channel, ``frames`` sample frames present."""

    rate: int
    channels: int
    format: int
    width: int
    frames: int
    offset: int  # of the sample data in the file
    declared: int  # bytes of sample data the header declares (more than present: truncated)


def _wav_header(fh, name: str) -> WavInfo:
    """Walks the RIFF chunks of an open WAV file (seeking, not reading the samples)."""
    fh.seek(0, io.SEEK_END)
    total = fh.tell()
    fh.seek(0)
    if total == 0:
        raise ConfigError(f"{name}: empty file (0 bytes); expected a WAV file")
    head = fh.read(12)
    if head[:4] in (b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        kind = "big-endian RIFX" if head[:4] == b"RIFX" else "RF64 (over 4 GB)"
        raise ConfigError(f"{name}: {kind} WAV files are not supported; convert it to a standard "
                          f"little-endian RIFF WAV")
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ConfigError(f"{name}: not a WAV file (no RIFF/WAVE header)")
    fmt, data = None, None
    pos = 12
    while pos + 8 <= total and (fmt is None or data is None):
        fh.seek(pos)
        cid, size = struct.unpack("<4sI", fh.read(8))
        body = pos + 8
        if cid == b"fmt ":
            raw = fh.read(min(size, 40))
            if size < 16 or len(raw) < 16:
                raise ConfigError(f"{name}: not a readable WAV file (its fmt chunk is cut short)")
            tag, channels, rate, _, align, bits = struct.unpack("<HHIIHH", raw[:16])
            if tag == EXTENSIBLE:
                if len(raw) < 40:
                    raise ConfigError(f"{name}: not a readable WAV file (WAVE_FORMAT_EXTENSIBLE "
                                      f"header cut short)")
                sub = raw[24:40]
                if sub[2:] != _GUID_TAIL:
                    raise ConfigError(f"{name}: WAVE_FORMAT_EXTENSIBLE with an unknown subformat; "
                                      f"only PCM and IEEE float are supported")
                tag = struct.unpack("<H", sub[:2])[0]
            fmt = (tag, channels, rate, align, bits)
        elif cid == b"data":
            data = (body, size)
            if body + size > total:  # truncated (or a streaming writer's 0xFFFFFFFF): stop here
                break
        pos = body + size + (size & 1)  # chunks are word-aligned
    if fmt is None:
        raise ConfigError(f"{name}: not a readable WAV file (no fmt chunk)")
    tag, channels, rate, align, bits = fmt
    if tag not in (PCM, FLOAT):
        what = _FORMAT_NAMES.get(tag, f"format code {tag}")
        raise ConfigError(f"{name}: {what} WAV samples are not supported; convert it to PCM or "
                          f"float (e.g. sox IN -e signed -b 16 OUT.wav)")
    if channels == 0:
        raise ConfigError(f"{name}: WAV header says 0 channels")
    if rate == 0:
        raise ConfigError(f"{name}: WAV header says 0 Hz; the sample rate must be positive")
    width = align // channels if align and align % channels == 0 else (bits + 7) // 8
    if tag == PCM and width not in (1, 2, 3, 4) or tag == FLOAT and width not in (4, 8):
        kind = "PCM" if tag == PCM else "float"
        allowed = "8/16/24/32-bit" if tag == PCM else "32/64-bit"
        raise ConfigError(f"{name}: {8 * width}-bit {kind} WAV samples are not supported ({allowed})")
    if data is None:
        raise ConfigError(f"{name}: WAV file holds no samples (no data chunk)")
    offset, declared = data
    present = min(declared, total - offset)
    return WavInfo(rate, channels, tag, width, present // (width * channels), offset, declared)


def _open_wav(source: Source, name: str | None):
    try:
        return _open(source, name)
    except OSError as e:
        raise ConfigError(f"{name or source}: cannot read the WAV file ({e.strerror or type(e).__name__})") from None


def wav_info(source: Source, name: str | None = None) -> WavInfo:
    """The header of a WAV file (rate, channels, format, ...) without decoding its samples."""
    fh, name = _open_wav(source, name)
    with fh:
        return _wav_header(fh, name)


def decode_wav(source: Source, name: str | None = None) -> Tuple[torch.Tensor, int]:
    """A WAV file -> (float32 mono waveform ``[L]``, sample rate). PCM is scaled to [-1, 1)
    (8-bit is unsigned, 16/24/32-bit signed: the WAV conventions); IEEE float samples are kept
    as they are (they must be finite); channels are averaged. WAVE_FORMAT_EXTENSIBLE files (how
    most 24-bit and multichannel WAVs are written) are read by their subformat. A data chunk cut
    short is decoded as far as it goes (one warning); a 0 Hz header or no samples is refused."""
    fh, name = _open_wav(source, name)
    with fh:
        info = _wav_header(fh, name)
        fh.seek(info.offset)
        frame = info.width * info.channels
        raw = fh.read(info.frames * frame)
    if info.frames == 0:
        raise ConfigError(f"{name}: WAV file holds no samples")
    if info.declared > info.frames * frame + frame - 1 and info.declared != 0xFFFFFFFF:
        log.warning(f"{name}: WAV data chunk cut short ({info.frames * frame} of the "
                    f"{info.declared} bytes its header declares): decoded the {info.frames} "
                    f"frames present")
    w = info.width
    if info.format == FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if w == 4 else "<f8")
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise ConfigError(f"{name}: {bad} of {x.size} float samples are not finite (NaN or "
                              f"inf); a WAV must hold finite samples")
        x = x.astype(np.float32)
    elif w == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif w == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif w == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    x = x.reshape(-1, info.channels).mean(axis=1, dtype=np.float64).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), info.rate


def resample(x: torch.Tensor, orig: int, new: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of ``x`` ``[..., L]`` from ``orig`` Hz to ``new`` Hz ->
    ``[..., ceil(L * new / orig)]``, by the definition torchaudio's default
    (``sinc_interp_hann``) implements with a polyphase kernel:

        y[n] = r * sum_k x[k] * h((k - n * orig / new) * r),   r = rolloff * min(1, new / orig),
        h(u) = sinc(u) * cos(pi * u / (2 * lowpass_filter_width))**2 for |u| <= width, else 0

    (samples outside ``x`` are 0). The cutoff is ``rolloff`` times the lower Nyquist frequency, so
    content above the new Nyquist frequency is removed (not aliased) and a sine below it keeps
    its frequency and amplitude. Computed directly, ``2 * width / r + 2`` taps per output sample."""
    if orig <= 0 or new <= 0:
        raise ConfigError(f"resample: rates must be positive, got {orig} -> {new} Hz")
    if orig == new:
        return x
    shape, L = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, L).double()
    n_out = math.ceil(new * L / orig)
    r = rolloff * min(1.0, new / orig)
    half = math.ceil(lowpass_filter_width / r) + 1
    taps = torch.arange(-half, half + 2, dtype=torch.float64)
    padded = torch.nn.functional.pad(flat, (half + 1, half + 2))
    out = torch.empty(flat.shape[0], n_out, dtype=torch.float64)
    step = max(1, 2 ** 22 // len(taps))
    for start in range(0, n_out, step):
        n = torch.arange(start, min(n_out, start + step), dtype=torch.float64)
        pos = n * orig / new  # output sample n sits at input position pos
        k = torch.floor(pos)[:, None] + taps[None]  # [n, taps]
        u = ((k - pos[:, None]) * r).clamp(-lowpass_filter_width, lowpass_filter_width)
        h = torch.sinc(u) * torch.cos(u * math.pi / (2 * lowpass_filter_width)) ** 2 * r
        idx = (k.long() + half + 1).reshape(-1)
        out[:, start:start + len(n)] = (padded[:, idx].view(flat.shape[0], len(n), -1) * h).sum(-1)
    return out.to(x.dtype).reshape(*shape, n_out)


# -- log-mel -----------------------------------------------------------------------------------
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


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_audio_settings(prefix: str, n_fft, hop, n_mels, frames, rate=None, fmin=0.0,
                         fmax=None, rate_note: str = "") -> None:
    """Refuse log-mel settings that cannot work, naming the key ``{prefix}NAME`` (e.g.
    ``dataset.audio.``): integers ``n_fft >= 2``, ``hop, n_mels, frames >= 1``, and, once the
    sample ``rate`` is known, ``0 <= fmin < fmax <= rate / 2`` and no mel filter without an FFT
    bin (too many mel bands for the FFT's resolution). ``rate_note`` says where the rate came from."""
    for key, value, least in (("n_fft", n_fft, 2), ("hop", hop, 1), ("n_mels", n_mels, 1),
                              ("frames", frames, 1)):
        if not _is_int(value) or value < least:
            raise ConfigError(f"{prefix}{key}={value}: must be an integer >= {least}")
    if rate is not None and (not _is_int(rate) or rate < 1):
        raise ConfigError(f"{prefix}rate={rate}: must be a positive integer (Hz) or null")
    if not _is_number(fmin) or not math.isfinite(fmin) or fmin < 0:
        raise ConfigError(f"{prefix}fmin={fmin}: must be a number >= 0 (Hz)")
    if fmax is not None and (not _is_number(fmax) or not math.isfinite(fmax)):
        raise ConfigError(f"{prefix}fmax={fmax}: must be a number (Hz) or null (half the sample rate)")
    if rate is None:
        return
    nyquist = rate / 2
    top = nyquist if fmax is None else fmax
    if top > nyquist:
        raise ConfigError(f"{prefix}fmax={fmax}: must be <= half the sample rate, {nyquist:g} Hz"
                          f"{rate_note}")
    if fmin >= top:
        raise ConfigError(f"{prefix}fmin={fmin}: must be below fmax={top:g} Hz{rate_note}")
    bank = mel_filterbank(n_mels, n_fft, rate, float(fmin), None if fmax is None else float(fmax))
    empty = torch.nonzero(bank.amax(dim=1) <= 0).flatten()
    if len(empty):
        i = int(empty[0])
        edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(top), n_mels + 2))
        raise ConfigError(f"{prefix}n_mels={n_mels}: too many mel bands for {prefix}n_fft={n_fft} "
                          f"at {rate} Hz: band {i} ({edges[i]:.0f}-{edges[i + 2]:.0f} Hz) holds no "
                          f"FFT bin (bins are {rate / n_fft:g} Hz apart); lower n_mels or raise n_fft")


def log_mel(wave_: torch.Tensor, rate: int, n_fft: int = 256, hop: int = 128, n_mels: int = 40,
            frames: int = 48, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """Log-mel spectrogram ``[1, n_mels, frames]``: ``log(M @ |STFT|^2 + 1e-6)`` with a Hann
    window of ``n_fft`` samples, hop ``hop``, centred frames (``torch.stft(center=True)``,
    reflect padding); longer signals are cropped to the first ``frames`` frames, shorter ones
    padded with ``log(1e-6)`` (silence). Settings are checked by :func:`check_audio_settings`."""
    check_audio_settings("", n_fft, hop, n_mels, frames, rate, fmin, fmax)
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


# -- text and strokes --------------------------------------------------------------------------
def decode_text(source: Source, name: str | None = None, what: str = "a UTF-8 text file") -> str:
    """A UTF-8 text file (a byte-order mark is dropped) -> its text; empty files and other
    encodings are refused naming the file."""
    data, name = _read(source, name, what)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{name}: holds only white space; expected {what}")
    return text


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
        if not all(math.isfinite(v) for v in vals):
            raise ConfigError(f"{name}: line {i} has a non-finite coordinate: {line[:40]!r}")
        cur.append(vals[:3] + [0.0] * (3 - len(vals[:3])))
    if cur:
        strokes.append(np.asarray(cur, dtype=np.float64))
    if not strokes:
        raise ConfigError(f"{name}: no stroke points found (only START/BREAK lines)")
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
    if not _is_int(length) or length < 2:
        raise ConfigError(f"strokes length={length}: must be an integer >= 2")
    text = decode_text(source, name, "a stroke text file (START / BREAK / x,y,t lines)")
    name = name or str(source)
    return torch.from_numpy(resample_strokes(parse_strokes(text, name), length))


# -- numeric arrays ----------------------------------------------------------------------------
def as_float_array(arr: np.ndarray, what: str) -> np.ndarray:
    """A numeric array -> float32 (bool and integers converted); complex, object, text and
    structured arrays refused, ``what`` naming the culprit (``x.npy``, ``f.npz: array 'v'``).
    Finite values beyond float32's range are refused too (they would become inf)."""
    kind = arr.dtype.kind
    if kind == "c":
        raise ConfigError(f"{what}: complex values; save the real part or the magnitude "
                          f"(np.real(x) or np.abs(x))")
    if kind not in "biuf":
        described = {"O": "Python objects", "U": "text", "S": "bytes", "V": "structured records",
                     "M": "dates", "m": "time spans"}.get(kind, str(arr.dtype))
        raise ConfigError(f"{what}: holds {described} (dtype {arr.dtype}); it must hold numbers")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if kind == "f" and arr.dtype.itemsize > 4:
        over = np.isinf(out) & np.isfinite(arr)
        if over.any():
            raise ConfigError(f"{what}: {int(over.sum())} values beyond float32's range "
                              f"(|x| > 3.4e38); rescale them")
    return out


def load_npy(source: Source, name: str | None = None) -> np.ndarray:
    """A ``.npy`` file -> its array as saved (pickled object arrays refused, never unpickled)."""
    data, name = _read(source, name, "a .npy file")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ConfigError(f"{name}: holds Python objects (dtype object); it must hold numbers") from None
        raise ConfigError(f"{name}: not a readable .npy file (corrupt or cut short)") from None
    except (OSError, EOFError):
        raise ConfigError(f"{name}: not a readable .npy file (corrupt or cut short)") from None


def npy_header(path: Path) -> Tuple[Tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a ``.npy`` file from its header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(fh)
        return tuple(shape), dtype
    except (OSError, ValueError, EOFError, SyntaxError, struct.error):
        arr = load_npy(path)  # names the file with the cause
        return tuple(arr.shape), arr.dtype
