"""Inputs are validated where they are read, and a dataset's preprocessing is self-contained.

- The fault table: one row per faulty input (a file made here, or a setting) -> the one-line
  error naming the culprit (file, row, key) and the cause; the conversion table: inputs that
  are converted (16-bit PNG, palette, alpha, stereo, 24-bit EXTENSIBLE and float WAVs, bool
  .npy, a WAV at another rate) -> the expected tensor.
- The band-limited resampler against its definition.
- ``state_dict`` / ``load_state_dict``: a folder dataset rebuilt from a stored state gives the
  same test split after its train files change; every dataset's state round-trips through
  ``torch.save`` / ``torch.load(weights_only=True)``; fingerprints and ``describe_changes``.
- The base class's last line of defence (non-finite values, dropped samples, empty splits), the
  cache's failures, the decoding progress lines and ``describe_sample``.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import struct
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from metamm_cli import ConfigError
from metamm_cli.data import decode as D
from metamm_cli.data.base import MultimodalDataset, build_dataset, describe_changes
from metamm_cli.data.episodes import ModalitySpec, SplitData
from metamm_cli.data.features import FeaturesDataset
from metamm_cli.data.folder import FolderDataset

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("METAMM_DATA", REPO.parent / "shared" / "data"))
OMNI, FSDD = DATA / "omniglot", DATA / "fsdd" / "recordings"
need_real = pytest.mark.skipif(
    not (OMNI / "strokes_background_small1.zip").is_file() or not FSDD.is_dir(),
    reason=f"Omniglot (with strokes) or FSDD absent from {DATA} (set METAMM_DATA)")
SMALL_AUDIO = {"n_mels": 8, "frames": 8, "n_fft": 64, "hop": 32}


# -- files made here ---------------------------------------------------------------------------
def png_bytes(arr: np.ndarray, mode=None, **info) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    img.save(buf, "PNG", **info)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring ``side x side`` greyscale pixels (the data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def riff_wav(samples: bytes, rate=8000, channels=1, bits=16, tag=1, extensible=False,
             declared=None) -> bytes:
    """A WAV file written by hand: PCM (tag 1) or float (3), optionally as EXTENSIBLE."""
    width = bits // 8
    align = channels * width
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + GUID_TAIL
    elif tag == 3:
        fmt += struct.pack("<H", 0)
    size = len(samples) if declared is None else declared
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"LIST" + struct.pack("<I", 5) + b"INFOx\0"  # an odd-sized chunk before the data (padded)
            + b"data" + struct.pack("<I", size) + samples)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pcm24(values) -> bytes:
    v = np.asarray(values, dtype=np.int64) & 0xFFFFFF
    return np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1).astype(np.uint8).tobytes()


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


def tone(freq: float, rate: int, n: int) -> np.ndarray:
    return 0.5 * np.sin(2 * math.pi * freq * np.arange(n) / rate)


WRITERS = {  # one good file per modality, class c, sample j
    "png": lambda p, c, j: Image.fromarray(np.full((12, 12), (40 * c + j) % 256, np.uint8)).save(p),
    "wav": lambda p, c, j: write_wav(p, tone(300 + 200 * c, 4000, 600), 4000),
    "txt": lambda p, c, j: p.write_text(f"word{c} common"),
    "npy": lambda p, c, j: np.save(p, np.full(4, c + j / 10, np.float32)),
}


def folder(root: Path, exts=("png",), classes=("a", "b"), per_class=2) -> Path:
    """root/<split>/<class>/s<j>.<ext>: the given classes in every split (c0 = a, ...)."""
    for split in ("train", "val", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                for ext in exts:
                    WRITERS[ext](d / f"s{j}.{ext}", c, j)
    return root


def small(root: Path, **kw) -> FolderDataset:
    return FolderDataset(str(root), **{"image": {"size": 8}, "audio": dict(SMALL_AUDIO), "tokens": {"length": 4}, **kw})


def folder_fault(ext: str, write, split="test", stem="s1"):
    """A folder dataset whose file ``<split>/b/<stem>.<ext>`` is replaced by ``write(path)``;
    building every split raises."""
    def make(tmp):
        root = folder(tmp / "d", (ext,))
        write(root / split / "b" / f"{stem}.{ext}")

        def run():
            ds = small(root)
            for s in ("train", "val", "test"):
                ds.split(s)
        return run
    return make


def features_fault(**arrays):
    def make(tmp):
        labels = np.repeat(np.array(["cat", "dog", "emu", "fox", "gnu"]), 4)
        full = {"labels": labels, "split": np.array((["train"] * 8 + ["val"] * 4 + ["test"] * 8)), **arrays}
        np.savez(tmp / "f.npz", **{k: (v(labels) if callable(v) else v) for k, v in full.items()})
        return lambda: FeaturesDataset(str(tmp / "f.npz")).split("train")
    return make


def nan_row(row, count):
    def make(labels):
        x = np.random.default_rng(0).normal(size=(len(labels), 64)).astype(np.float32)
        x[row, :count] = np.nan
        return x
    return make


def decoder(fn, data: bytes, name: str):
    def make(tmp):
        (tmp / name).write_bytes(data)
        return lambda: fn(tmp / name)
    return make


def setting(cls_kwargs):
    def make(tmp):
        root = folder(tmp / "d", ("png", "wav", "txt"))
        return lambda: small(root, **cls_kwargs).state_dict()
    return make


def avdigits_setting(**kw):
    def make(tmp):
        from metamm_cli.data.avdigits import AVDigits
        return lambda: AVDigits(str(tmp / "nowhere"), **kw)
    return make


def _rgb_png():
    return png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


FLOAT_NAN = np.array([0.1, np.nan, 0.2, np.inf], dtype="<f4").tobytes()

FAULTS = [
    # images
    ("empty image", decoder(lambda p: D.decode_image(p, 8), b"", "e.png"), ["e.png", "empty file"]),
    ("truncated image", decoder(lambda p: D.decode_image(p, 8), _rgb_png()[:300], "t.png"),
     ["t.png", "truncated or corrupt"]),
    ("not an image", decoder(lambda p: D.decode_image(p, 8), b"hello, world", "n.png"),
     ["n.png", "not a readable image"]),
    ("decompression bomb", decoder(lambda p: D.decode_image(p, 8), bomb_png(), "bomb.png"),
     ["bomb.png", "900,000,000 pixels", f"{Image.MAX_IMAGE_PIXELS:,}", "decompression bomb"]),
    ("bomb at the size-learning pass", decoder(D.image_size_of, bomb_png(12000), "b.png"),
     ["b.png", "144,000,000 pixels"]),
    # WAV
    ("WAV at 0 Hz", decoder(D.decode_wav, riff_wav(b"\0\0" * 10, rate=0), "z.wav"), ["z.wav", "header says 0 Hz"]),
    ("WAV without samples", decoder(D.decode_wav, riff_wav(b""), "s.wav"), ["s.wav", "holds no samples"]),
    ("WAV without data chunk", decoder(D.decode_wav, riff_wav(b"")[:-8], "d.wav"), ["d.wav", "no data chunk"]),
    ("WAV with NaN floats", decoder(D.decode_wav, riff_wav(FLOAT_NAN, bits=32, tag=3), "f.wav"),
     ["f.wav", "2 of 4 float samples are not finite"]),
    ("mu-law WAV", decoder(D.decode_wav, riff_wav(b"\0" * 8, bits=8, tag=7), "u.wav"),
     ["u.wav", "mu-law", "not supported"]),
    ("empty WAV", decoder(D.decode_wav, b"", "e.wav"), ["e.wav", "empty file"]),
    ("not a WAV", decoder(D.decode_wav, b"RIFF\0\0\0\0AVI LIST", "v.wav"), ["v.wav", "not a WAV file"]),
    ("WAV in a folder", folder_fault("wav", lambda p: p.write_bytes(riff_wav(b"\0\0" * 4, rate=0))),
     ["test/b/s1.wav", "0 Hz"]),
    # .npy in a folder dataset
    ("complex npy", folder_fault("npy", lambda p: np.save(p, np.ones(4, np.complex64))),
     ["s1.npy", "complex values", "real part or the magnitude"]),
    ("object npy", folder_fault("npy", lambda p: np.save(p, np.array([{"a": 1}] * 4, dtype=object))),
     ["s1.npy", "Python objects"]),
    ("text npy", folder_fault("npy", lambda p: np.save(p, np.array(["a", "b", "c", "d"]))), ["s1.npy", "text"]),
    ("partly NaN npy", folder_fault("npy", lambda p: np.save(p, np.array([1, np.nan, np.nan, 2], np.float32))),
     ["test/b/s1.npy", "2 NaN of 4 values"]),
    ("inf npy", folder_fault("npy", lambda p: np.save(p, np.array([1, np.inf, 0, 2]))),
     ["s1.npy", "1 infinite of 4 values"]),
    ("all-NaN npy", folder_fault("npy", lambda p: np.save(p, np.full(4, np.nan))),
     ["test/b/s1.npy", "all 4 values are NaN", "no .npy file"]),
    ("float64 beyond float32", folder_fault("npy", lambda p: np.save(p, np.array([1e300, 0, 0, 0]))),
     ["s1.npy", "beyond float32's range"]),
    ("odd npy shape", folder_fault("npy", lambda p: np.save(p, np.zeros(3, np.float32))),
     ["test/b/s1.npy: shape [3], but 11 of 12 vector files have [4]"]),
    ("empty npy", folder_fault("npy", lambda p: p.write_bytes(b"")), ["s1.npy", "empty file"]),
    # .npz features
    ("partly NaN features row", features_fault(vector=nan_row(17, 3)),
     ["f.npz", "array 'vector' row 17 (label 'gnu') has 3 NaN of 64 values",
      "a row must be all finite, or all NaN to mark the modality absent"]),
    ("inf features row", features_fault(vector=lambda lab: np.where(np.arange(len(lab))[:, None] == 5, np.inf,
                                                                    np.ones((len(lab), 2)))),
     ["array 'vector' row 5 (label 'dog') has 2 infinite of 2 values"]),
    ("all-NaN features", features_fault(vector=lambda lab: np.full((len(lab), 3), np.nan),
                                        clip=lambda lab: np.full((len(lab), 2), np.nan)),
     ["f.npz", "every row of every modality array", "all NaN"]),
    ("complex features", features_fault(vector=lambda lab: np.ones((len(lab), 2), np.complex128)),
     ["array 'vector'", "complex values"]),
    ("object labels", features_fault(labels=lambda lab: np.array(list(lab), dtype=object),
                                     vector=lambda lab: np.ones((len(lab), 2))),
     ["array 'labels' holds Python objects"]),
    # text and strokes
    ("empty text", folder_fault("txt", lambda p: p.write_bytes(b"")), ["test/b/s1.txt", "empty file"]),
    ("blank text", folder_fault("txt", lambda p: p.write_text(" \n\t")), ["s1.txt", "only white space"]),
    ("non-UTF-8 text", folder_fault("txt", lambda p: p.write_bytes(b"caf\xe9 au lait")),
     ["s1.txt", "not UTF-8", "offset 3"]),
    ("strokes without points", decoder(lambda p: D.decode_strokes(p, 8), b"START\nBREAK\nBREAK\n", "k.txt"),
     ["k.txt", "no stroke points"]),
    ("empty strokes", decoder(lambda p: D.decode_strokes(p, 8), b"", "k.txt"), ["k.txt", "empty file"]),
    ("NaN strokes", decoder(lambda p: D.decode_strokes(p, 8), b"START\n1,2,0\nnan,3,4\n", "k.txt"),
     ["k.txt", "line 3", "non-finite"]),
    # settings (folder: dataset.audio.* etc.; avdigits: dataset.*)
    ("hop=0", setting({"audio": {**SMALL_AUDIO, "hop": 0}}), ["dataset.audio.hop=0", ">= 1"]),
    ("n_fft=0", setting({"audio": {**SMALL_AUDIO, "n_fft": 0}}), ["dataset.audio.n_fft=0", ">= 2"]),
    ("n_fft=1", setting({"audio": {**SMALL_AUDIO, "n_fft": 1}}), ["dataset.audio.n_fft=1", ">= 2"]),
    ("frames=0", setting({"audio": {**SMALL_AUDIO, "frames": 0}}), ["dataset.audio.frames=0"]),
    ("n_mels=0", setting({"audio": {**SMALL_AUDIO, "n_mels": 0}}), ["dataset.audio.n_mels=0"]),
    ("n_mels too many", setting({"audio": {**SMALL_AUDIO, "n_mels": 40}}),
     ["dataset.audio.n_mels=40", "dataset.audio.n_fft=64", "holds no FFT bin"]),
    ("fmax above Nyquist", setting({"audio": {**SMALL_AUDIO, "fmax": 3000}}),
     ["dataset.audio.fmax=3000", "2000 Hz", "rate=null: 4000 Hz"]),
    ("fmin >= fmax", setting({"audio": {**SMALL_AUDIO, "fmin": 1500.0, "fmax": 1000.0}}),
     ["dataset.audio.fmin=1500.0", "below fmax"]),
    ("rate=0", setting({"audio": {**SMALL_AUDIO, "rate": 0}}), ["dataset.audio.rate=0"]),
    ("image size 0", setting({"image": {"size": 0}}), ["dataset.image.size=0", ">= 1"]),
    ("image channels 2", setting({"image": {"channels": 2}}), ["dataset.image.channels=2", "1 (greyscale) or 3"]),
    ("tokens length 0", setting({"tokens": {"length": 0}}), ["dataset.tokens.length=0"]),
    ("avdigits n_fft=0", avdigits_setting(n_fft=0), ["dataset.n_fft=0"]),
    ("avdigits hop=0", avdigits_setting(hop=0), ["dataset.hop=0"]),
    ("avdigits n_mels too many", avdigits_setting(n_mels=200), ["dataset.n_mels=200", "dataset.n_fft=256"]),
    ("root null", lambda tmp: lambda: FolderDataset(None), ["dataset.root is not set"]),
    ("root ???", lambda tmp: lambda: FolderDataset("???"), ["dataset.root is not set"]),
    ("features path null", lambda tmp: lambda: FeaturesDataset(None), ["dataset.path is not set"]),
]


@pytest.mark.parametrize("make, needles", [r[1:] for r in FAULTS], ids=[r[0] for r in FAULTS])
def test_fault_is_one_line_naming_the_culprit(tmp_path, make, needles):
    run = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        run()
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


# -- converted inputs --------------------------------------------------------------------------
def conv_16bit(tmp):
    v = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257 + np.tile([0, 128], 128).reshape(16, 16)).astype(np.uint16)
    (tmp / "g16.png").write_bytes(png_bytes(v))
    assert Image.open(tmp / "g16.png").mode.startswith("I;16")
    return D.decode_image(tmp / "g16.png", None, 1)[0], torch.from_numpy(np.round(v / 257.0).astype(np.uint8))


def conv_palette(tmp, transparent: bool):
    idx = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    if transparent:
        img.info["transparency"] = 0  # palette entry 0 (red) is fully transparent
    buf = io.BytesIO()
    img.save(buf, "PNG", **({"transparency": 0} if transparent else {}))
    (tmp / "p.png").write_bytes(buf.getvalue())
    first = [255, 255, 255] if transparent else [255, 0, 0]
    want = torch.tensor([[first, [0, 255, 0]], [[10, 20, 30], first]], dtype=torch.uint8).permute(2, 0, 1)
    return D.decode_image(tmp / "p.png", None, 3), want


def conv_rgba(tmp):
    arr = np.array([[[255, 0, 0, 255], [0, 0, 255, 0]], [[0, 255, 0, 128], [20, 40, 60, 64]]], dtype=np.uint8)
    (tmp / "a.png").write_bytes(png_bytes(arr))
    a = arr[..., 3:].astype(np.float64) / 255
    want = arr[..., :3] * a + 255 * (1 - a)  # over white
    return D.decode_image(tmp / "a.png", None, 3).permute(1, 2, 0).double(), torch.from_numpy(want), 0.5


def conv_la(tmp):
    arr = np.array([[[0, 0], [100, 255]]], dtype=np.uint8)
    (tmp / "la.png").write_bytes(png_bytes(arr, "LA"))
    return D.decode_image(tmp / "la.png", None, 1)[0].double(), torch.tensor([[255.0, 100.0]], dtype=torch.float64)


def conv_1bit_and_cmyk(tmp):
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1").save(tmp / "b.png")
    Image.new("CMYK", (2, 2), (0, 0, 0, 0)).save(tmp / "c.jpg")  # no ink: white
    got = torch.stack([D.decode_image(tmp / "b.png", None, 1)[0].double(),
                       D.decode_image(tmp / "c.jpg", None, 1)[0].double()])
    return got, torch.tensor([[[0.0, 255], [255, 0]], [[255, 255], [255, 255]]], dtype=torch.float64), 1  # JPEG


def conv_exif_rotated_jpeg(tmp):
    img = Image.fromarray(np.full((10, 20, 3), 200, np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp / "r.jpg", exif=exif.tobytes())
    assert D.image_size_of(tmp / "r.jpg") == (20, 10)
    x = D.decode_image(tmp / "r.jpg", None, 1)
    return x.double(), torch.full((1, 20, 10), 200.0, dtype=torch.float64), 2  # JPEG


def conv_stereo(tmp):
    lr = np.array([[1000, 3000], [-2000, 0], [32767, 32767], [-32768, -32768]], dtype="<i2")
    (tmp / "st.wav").write_bytes(riff_wav(lr.tobytes(), channels=2, rate=11025))
    x, rate = D.decode_wav(tmp / "st.wav")
    assert rate == 11025
    return x, torch.tensor(lr.astype(np.float64).mean(1) / 32768, dtype=torch.float32)


def conv_24bit_extensible(tmp):
    v = np.array([0, 1, -1, 2 ** 23 - 1, -2 ** 23, 123456], dtype=np.int64)
    (tmp / "e24.wav").write_bytes(riff_wav(pcm24(v), bits=24, extensible=True, rate=48000))
    x, rate = D.decode_wav(tmp / "e24.wav")
    assert rate == 48000
    return x, torch.tensor(v / 2 ** 23, dtype=torch.float32)


def conv_float_wavs(tmp):
    f = np.array([0.5, -0.25, 1.5, -1.0], dtype=np.float64)
    (tmp / "f32.wav").write_bytes(riff_wav(f.astype("<f4").tobytes(), bits=32, tag=3))
    (tmp / "f64.wav").write_bytes(riff_wav(f.astype("<f8").tobytes(), bits=64, tag=3, extensible=True))
    (tmp / "i32.wav").write_bytes(riff_wav((f[:2] * 2 ** 31).astype("<i4").tobytes(), bits=32))
    (tmp / "u8.wav").write_bytes(riff_wav(np.array([128, 192, 64], np.uint8).tobytes(), bits=8))
    got = torch.cat([D.decode_wav(tmp / n)[0] for n in ("f32.wav", "f64.wav", "i32.wav", "u8.wav")])
    return got, torch.tensor(list(f) * 2 + list(f[:2]) + [0.0, 0.5, -0.5], dtype=torch.float32)


def conv_truncated_wav(tmp):
    v = np.arange(10, dtype="<i2") * 100
    (tmp / "cut.wav").write_bytes(riff_wav(v.tobytes() + b"\x01", declared=400))  # 20 frames + 1 byte of 200
    return D.decode_wav(tmp / "cut.wav")[0], torch.tensor(v / 32768.0, dtype=torch.float32)


def conv_npy_bool_int(tmp):
    root = folder(tmp / "d", ("npy",))
    np.save(root / "test" / "a" / "s0.npy", np.array([True, False, True, True]))
    np.save(root / "test" / "b" / "s0.npy", np.arange(4, dtype=np.int16))
    test = small(root).split("test")
    return test.data["vector"][[0, 2]], torch.tensor([[1.0, 0, 1, 1], [0, 1, 2, 3]])


def conv_features_1d(tmp):
    labels = np.repeat(np.arange(5), 4)
    np.savez(tmp / "f.npz", labels=labels, split=np.array([0] * 8 + [1] * 4 + [2] * 8),
             score=np.arange(20, dtype=np.int32))
    ds = FeaturesDataset(str(tmp / "f.npz"))
    assert ds.modalities["score"].shape == (1,)
    return ds.split("train").data["score"], torch.arange(8, dtype=torch.float32)[:, None]


def conv_odd_rate(tmp):
    root = folder(tmp / "d", ("wav",))
    odd = root / "test" / "b" / "s1.wav"
    write_wav(odd, tone(500, 16000, 2400), 16000)  # the others are at 4000 Hz
    ds = small(root)
    got = ds.split("test").data["audio"][3]
    assert ds.state_dict()["audio_rate"] == 4000
    wave_, rate = D.decode_wav(odd)
    return got, D.log_mel(D.resample(wave_, rate, 4000), 4000, **SMALL_AUDIO)[0], 1e-3  # log of ~1e-6


CONVERSIONS = [
    ("16-bit greyscale PNG", conv_16bit), ("palette PNG", lambda t: conv_palette(t, False)),
    ("palette PNG with transparency", lambda t: conv_palette(t, True)), ("RGBA over white", conv_rgba),
    ("LA over white", conv_la), ("1-bit and CMYK", conv_1bit_and_cmyk),
    ("EXIF-rotated JPEG", conv_exif_rotated_jpeg), ("stereo WAV", conv_stereo),
    ("24-bit EXTENSIBLE WAV", conv_24bit_extensible), ("float, 32-bit and 8-bit WAVs", conv_float_wavs),
    ("truncated WAV data", conv_truncated_wav), ("bool and int .npy", conv_npy_bool_int),
    ("1-D features array", conv_features_1d), ("WAV at another rate", conv_odd_rate),
]


@pytest.mark.parametrize("make", [c[1] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_converted_input(tmp_path, make):
    got, want, *tolerance = make(tmp_path)  # exact (up to float32 rounding) unless a tolerance is given
    assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    atol = tolerance[0] if tolerance else (1e-5 if got.dtype == torch.float32 else 0)
    assert torch.allclose(got.double(), want.double(), atol=atol, rtol=0), (got, want)


def test_truncated_wav_warns_once(tmp_path, caplog):
    (tmp_path / "cut.wav").write_bytes(riff_wav(b"\0\0" * 10, declared=400))
    with caplog.at_level("WARNING", logger="metamm"):
        D.decode_wav(tmp_path / "cut.wav")
    assert "cut.wav: WAV data chunk cut short (20 of the 400 bytes" in caplog.text


# -- the resampler -----------------------------------------------------------------------------
def resample_by_definition(x: np.ndarray, orig: int, new: int, width=6, rolloff=0.99) -> np.ndarray:
    r = rolloff * min(1.0, new / orig)
    out = np.zeros(math.ceil(len(x) * new / orig))
    for n in range(len(out)):
        for k in range(len(x)):
            u = (k - n * orig / new) * r
            if abs(u) <= width:
                out[n] += x[k] * r * np.sinc(u) * math.cos(math.pi * u / (2 * width)) ** 2
    return out


def test_resample_against_its_definition():
    x = np.random.default_rng(0).normal(size=60)
    for orig, new in ((5, 3), (3, 7), (44100, 16000)):
        got = D.resample(torch.tensor(x, dtype=torch.float64), orig, new).numpy()
        assert np.allclose(got, resample_by_definition(x, orig, new), atol=1e-10), (orig, new)
    batch = torch.tensor(np.stack([x, -x]), dtype=torch.float32)
    assert D.resample(batch, 8000, 8000) is batch
    assert D.resample(batch, 8000, 6000).shape == (2, 45)


def test_resample_keeps_a_sine_and_removes_content_above_the_new_nyquist():
    rate, n = 16000, 16000
    t = np.arange(n) / rate
    down = D.resample(torch.tensor(np.sin(2 * np.pi * 440 * t), dtype=torch.float64), rate, 8000).numpy()
    ref = np.sin(2 * np.pi * 440 * np.arange(len(down)) / 8000)
    mid = slice(200, -200)  # away from the zero-padded edges
    assert len(down) == 8000 and np.abs(down[mid] - ref[mid]).max() < 0.02  # same frequency and amplitude
    up = D.resample(torch.tensor(np.sin(2 * np.pi * 440 * t), dtype=torch.float64), rate, 44100).numpy()
    ref_up = np.sin(2 * np.pi * 440 * np.arange(len(up)) / 44100)
    assert np.abs(up[600:-600] - ref_up[600:-600]).max() < 0.02
    alias = D.resample(torch.tensor(np.sin(2 * np.pi * 6000 * t), dtype=torch.float64), rate, 8000).numpy()
    assert np.sqrt(np.mean(alias[mid] ** 2)) < 0.01  # 6 kHz > 4 kHz: removed, not folded to 2 kHz


# -- preprocessing state -----------------------------------------------------------------------
def node_of(root: Path, **extra):
    return OmegaConf.create({"_target_": "metamm_cli.data.folder.FolderDataset", "root": str(root),
                             "image": {"size": 8}, "audio": dict(SMALL_AUDIO), "tokens": {"length": 4},
                             **extra})


def test_state_makes_the_test_split_independent_of_todays_train_files(tmp_path):
    root = folder(tmp_path / "d", ("png", "txt", "npy"), classes=("a", "b", "c"))
    (root / "test" / "b" / "s0.txt").write_text("word2 word1 common unseen")
    first = build_dataset(node_of(root, standardize=True))
    state, before, fp = first.state_dict(), first.split("test"), first.fingerprint()
    assert state["classes"]["train"] == ["a", "b", "c"] and state["vocab"][0] == "common"
    # edit the train split only: a frequent new word, a new class folder, a changed vector
    (root / "train" / "a" / "s0.txt").write_text("brandnew " * 20)
    np.save(root / "train" / "a" / "s1.npy", np.full(4, 50.0, np.float32))
    (root / "train" / "0new").mkdir()
    WRITERS["png"](root / "train" / "0new" / "s0.png", 0, 0)
    stored = torch.load(io.BytesIO(_saved(state)), weights_only=True)
    again = build_dataset(node_of(root, standardize=True), stored)
    after = again.split("test")
    assert again.classes() == first.classes() and again.vocab == first.vocab
    for m in before.data:
        assert torch.equal(before.data[m], after.data[m]), m
    assert torch.equal(before.labels, after.labels) and torch.equal(before.present, after.present)
    assert again.split("train").num_classes == 3  # the new class folder is ignored
    # without the state, today's files give other preprocessing (what the state prevents)
    fresh = build_dataset(node_of(root, standardize=True))
    assert fresh.classes()["train"][0] == "0new" and "brandnew" in fresh.vocab
    assert not torch.equal(fresh.split("test").data["tokens"], before.data["tokens"])
    assert not torch.allclose(fresh.split("test").data["vector"], before.data["vector"])
    # the fingerprint sees the change, in the train split only
    now = again.fingerprint()
    assert now["test"] == fp["test"] and now["train"] != fp["train"]
    change = describe_changes(fp, now)
    assert change == "the train split's files changed since this checkpoint was trained (19 files now, 18 then)"
    assert describe_changes(fp, fp) is None and describe_changes(None, now) is None
    # a stored class whose folder is gone: one line naming it
    for f in (root / "test" / "c").iterdir():
        f.unlink()
    (root / "test" / "c").rmdir()
    with pytest.raises(ConfigError, match=r"class folder 'c' of the test split is gone"):
        build_dataset(node_of(root, standardize=True), stored)


def test_state_keeps_the_seed_split_and_modalities(tmp_path):
    root = tmp_path / "d"
    for c in range(10):
        (root / f"k{c}").mkdir(parents=True)
        for j in range(2):
            WRITERS["png"](root / f"k{c}" / f"s{j}.png", c, j)
    node = OmegaConf.create({"_target_": "metamm_cli.data.folder.FolderDataset", "root": str(root), "seed": 3})
    ds = build_dataset(node)
    state = ds.state_dict()
    for c in range(10, 14):  # new classes reshuffle a fresh seed split ...
        (root / f"k{c}").mkdir()
        WRITERS["png"](root / f"k{c}" / "s0.png", c, 0)
    (root / "k0" / "s0.npy").write_bytes(b"a new modality")
    assert build_dataset(node).classes() != ds.classes()
    again = build_dataset(node, state)  # ... not a stored one; the new .npy modality is ignored
    assert again.classes() == ds.classes() and list(again.modalities) == ["image"]
    assert torch.equal(again.split("val").data["image"], ds.split("val").data["image"])


def _saved(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _roundtrip(make, splits=("train", "val", "test")):
    """``make(state)`` twice: the stored state read back with weights_only gives equal splits."""
    a = make(None)
    state = a.state_dict()
    b = make(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    for s in splits:
        assert a.num_classes(s) == b.num_classes(s)  # known without building the split
        x, y = a.split(s), b.split(s)
        assert x.num_classes == y.num_classes == a.num_classes(s) and torch.equal(x.labels, y.labels)
        for m in x.data:
            assert torch.equal(x.data[m], y.data[m]), (s, m)
    fp = a.fingerprint()
    assert set(fp) == {"train", "val", "test"} and describe_changes(fp, b.fingerprint()) is None
    return a, state


def test_state_roundtrip_synthetic_folder_features(tmp_path):
    from metamm_cli.data.synthetic import SyntheticMultimodal

    _roundtrip(lambda st: _with_state(SyntheticMultimodal(codes={"train": 3, "val": 2, "test": 2},
                                                          samples_per_class=2, image_size=8), st))
    root = folder(tmp_path / "d", ("png", "wav", "txt", "npy"))
    ds, state = _roundtrip(lambda st: _with_state(small(root, standardize=True, image={"size": None}), st))
    assert state["image_size"] == [12, 12] and state["audio_rate"] == 4000 and state["vector_shape"] == [4]
    assert torch.allclose(state["vector_mean"], torch.full((4,), 0.55))
    assert float(ds.split("train").data["vector"].mean()) == pytest.approx(0, abs=1e-6)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", labels=np.repeat(np.arange(10), 3), vector=rng.normal(5, 2, size=(30, 3)))
    _, state = _roundtrip(lambda st: _with_state(FeaturesDataset(str(tmp_path / "f.npz"), seed=1,
                                                                 standardize=True), st))
    assert set(state["classes"]["train"]) | set(state["classes"]["test"]) <= {str(i) for i in range(10)}


def _with_state(ds, state):
    if state is not None:
        ds.load_state_dict(state)
    return ds


def tiny_omniglot_dirs(root: Path, strokes=False) -> Path:
    """Omniglot's layout as extracted folders: alphabets A-C (background), E-F (evaluation),
    2 characters x 3 drawers; with ``strokes``, stroke files for the background drawings."""
    rng = np.random.default_rng(1)
    cid = 0
    for top, alphas in (("images_background", "ABC"), ("images_evaluation", "EF")):
        for a in alphas:
            for c in (1, 2):
                cid += 1
                for d in (1, 2, 3):
                    p = root / top / a / f"character{c:02d}" / f"{cid:04d}_{d:02d}.png"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.where(rng.random((20, 20)) < 0.8, 255, 0).astype(np.uint8)).save(p)
                    if strokes and top == "images_background":
                        s = root / ("strokes_background_small1" if d < 3 else "strokes_background_small2") / a \
                            / f"character{c:02d}" / f"{cid:04d}_{d:02d}.txt"
                        s.parent.mkdir(parents=True, exist_ok=True)
                        s.write_text(f"START\n0,0,0\n{c},{-d},10\nBREAK\n3,3,20\n{cid},1,30\nBREAK\n")
    return root


def tiny_avdigits(root: Path) -> Path:
    rng = np.random.default_rng(2)
    (root / "mnist").mkdir(parents=True)
    for img, lab, n in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 80),
                        ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 60)):
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(root / "mnist" / img, "wb") as fh:
            fh.write(struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + rng.integers(0, 255, (n, 28, 28), np.uint8).tobytes())
        with gzip.open(root / "mnist" / lab, "wb") as fh:
            fh.write(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes())
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for digit in range(10):
        for i in range(11):
            write_wav(rec / f"{digit}_george_{i}.wav", tone(200 + 50 * digit + i, 8000, 400), 8000)
    return root


def test_state_roundtrip_omniglot_strokes_avdigits(tmp_path):
    from metamm_cli.data.avdigits import AVDigits
    from metamm_cli.data.omniglot import Omniglot
    from metamm_cli.data.omniglot_strokes import OmniglotStrokes

    root = tiny_omniglot_dirs(tmp_path / "omni", strokes=True)
    ds, state = _roundtrip(lambda st: _with_state(Omniglot(str(root), split="lake", val_alphabets=["B"],
                                                           rotations=[0, 90], cache=False), st))
    assert state["classes"]["val"] == ["images_background/B/character01", "images_background/B/character02"]
    name = ds.describe_sample("train", 13)  # rows: 12 unturned (A, C), then turned; drawer 2 of A/character01
    assert name.endswith("images_background/A/character01/0001_02.png rotated 90 degrees"), name
    alphabets = {"train": ["A"], "val": ["B"], "test": ["C"]}
    ds, state = _roundtrip(lambda st: _with_state(OmniglotStrokes(str(root), alphabets=alphabets, length=8,
                                                                  cache=False), st))
    assert state["classes"]["test"] == ["C/character01", "C/character02"]
    assert "strokes_background_small2/C/character02/0006_03.txt" in ds.describe_sample("test", 5)
    av = tiny_avdigits(tmp_path / "av")
    ds, state = _roundtrip(lambda st: _with_state(AVDigits(str(av), cache=False, n_mels=8, frames=8), st))
    assert state["classes"] == {"train": [0, 1, 2, 3, 4], "val": [0, 1, 2, 3, 4], "test": [5, 6, 7, 8, 9]}
    assert ds.describe_sample("test", 0).startswith(f"test/5/5_george_0 (audio: {av / 'fsdd/recordings/5_george_0.wav'}")
    for f in (av / "fsdd" / "recordings").glob("7_george_*.wav"):  # a stored digit gone
        f.unlink()
    with pytest.raises(ConfigError, match="digit 7 of the test split has no recordings"):
        AVDigits(str(av), cache=False).load_state_dict(state)
    with pytest.raises(ConfigError, match="for dataset avdigits, not omniglot"):
        Omniglot(str(root), split="lake", val_alphabets=["B"]).load_state_dict(state)


@need_real
def test_state_roundtrip_real_sets(tmp_path):
    from metamm_cli.data.avdigits import AVDigits
    from metamm_cli.data.omniglot_strokes import OmniglotStrokes

    cache = os.environ.get("METAMM_CACHE", str(tmp_path / "cache"))
    ds, state = _roundtrip(lambda st: _with_state(OmniglotStrokes(str(OMNI), cache_dir=cache), st), ("test",))
    assert len(state["classes"]["train"]) == 155
    assert "images_background.zip:images_background/" in ds.describe_sample("test", 0)
    ds, state = _roundtrip(lambda st: _with_state(AVDigits(str(DATA), cache_dir=cache), st), ("test",))
    assert ds.fingerprint()["test"]["files"] == 150 + 2  # recordings + the MNIST test files


def test_describe_changes_lines():
    old = {"train": {"files": 1202, "digest": "a"}, "val": {"files": 5, "digest": "b"},
           "test": {"files": 1, "digest": "c"}}
    assert describe_changes(old, {**old, "train": {"files": 1203, "digest": "z"}}) == (
        "the train split's files changed since this checkpoint was trained (1203 files now, 1202 then)")
    both = describe_changes(old, {**old, "val": {"files": 5, "digest": "x"}, "test": {"files": 1, "digest": "y"}})
    assert both == ("the files of the val split (5 files now, 5 then) and the test split (1 file now, "
                    "1 then) changed since this checkpoint was trained")
    assert describe_changes(old, dict(old)) is None and describe_changes({}, old) is None
    assert "\n" not in describe_changes(old, {"train": {}})


# -- the base class's last line of defence -----------------------------------------------------
class Handmade(MultimodalDataset):
    """Rows given by hand: a NaN or missing modality where asked."""

    name = "handmade"
    all_modalities = {"vector": ModalitySpec((3,)), "image": ModalitySpec((1, 2, 2), kind="image")}

    def __init__(self, nan_rows=(), absent_vector=(), modalities=None, n=6):
        self.nan_rows, self.absent_vector, self.n = nan_rows, absent_vector, n
        super().__init__(modalities)

    def build_split(self, split):
        v = torch.arange(self.n * 3, dtype=torch.float32).reshape(self.n, 3)
        v[list(self.nan_rows), 1] = float("nan")
        present = torch.ones(self.n, 2, dtype=torch.bool)
        present[list(self.absent_vector), 0] = False
        return SplitData({"vector": v, "image": torch.zeros(self.n, 1, 2, 2)}, present,
                         torch.arange(self.n) % 2, 2)


def test_split_refuses_non_finite_naming_samples_and_drops_with_one_warning(caplog):
    with pytest.raises(ConfigError) as err:
        Handmade(nan_rows=(1, 4)).split("train")
    assert str(err.value) == ("dataset handmade: modality 'vector' of 2 samples of the train split holds "
                              "NaN or inf: handmade train sample 1; handmade train sample 4")
    ds = Handmade(absent_vector=(0, 2), nan_rows=(0,), modalities=["vector"])
    with caplog.at_level("WARNING", logger="metamm"):
        train = ds.split("train")  # the NaN row is dropped (no vector), not refused
    assert len(train.labels) == 4 and caplog.text.count("2 of 6 samples of the train split have none of") == 1
    assert ds.describe_sample("train", 1) == "handmade train sample 3"  # rows map back past the dropped
    with pytest.raises(ConfigError, match="no samples left: none of its 6 samples has any of"):
        Handmade(absent_vector=range(6), modalities=["vector"]).split("val")
    with pytest.raises(ConfigError, match="the test split has no samples"):
        Handmade(n=0).split("test")


def test_folder_describe_sample_names_its_files(tmp_path):
    root = folder(tmp_path / "d", ("png", "wav"))
    (root / "val" / "a" / "s0.png").unlink()
    ds = small(root, modalities=["image"])  # val/a/s0 has no image left: dropped
    assert ds.describe_sample("val", 0) == f"val/a/s1 (image: {root / 'val/a/s1.png'}, audio: {root / 'val/a/s1.wav'})"
    labels = np.array(["cat", "dog"] * 5)
    np.savez(tmp_path / "f.npz", labels=labels, split=np.array([0] * 4 + [1] * 2 + [2] * 4), v=np.ones((10, 2)))
    assert FeaturesDataset(str(tmp_path / "f.npz")).describe_sample("test", 1) == \
        f"row 7 (label 'dog') of {tmp_path / 'f.npz'}"


# -- cache and progress ------------------------------------------------------------------------
def test_cache_write_failures_only_warn_and_corrupt_entries_are_rebuilt(tmp_path, caplog):
    from metamm_cli.data.cache import cached, fingerprint

    src = tmp_path / "a.bin"
    src.write_bytes(b"1")
    with caplog.at_level("WARNING", logger="metamm"):
        value = cached("t", [src], {}, lambda: {"f": lambda: 0}, str(tmp_path / "c"))  # torch.save raises
    assert callable(value["f"]) and caplog.text.count("could not write the data cache") == 1
    assert not list((tmp_path / "c").iterdir())  # no temporary file left
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    caplog.clear()
    with caplog.at_level("WARNING", logger="metamm"):
        assert cached("t", [src], {}, lambda: {"x": 1}, str(tmp_path / "blocked" / "c")) == {"x": 1}
    assert "could not write the data cache" in caplog.text and len(caplog.records) == 1
    entry = tmp_path / "c" / f"t-{fingerprint([src], {})}.pt"
    entry.write_bytes(b"not a torch file")
    calls = []
    with caplog.at_level("WARNING", logger="metamm"):
        cached("t", [src], {}, lambda: calls.append(1) or {"x": torch.ones(2)}, str(tmp_path / "c"))
        again = cached("t", [src], {}, lambda: calls.append(1) or {"x": torch.ones(2)}, str(tmp_path / "c"))
    assert "unreadable" in caplog.text and len(calls) == 1 and torch.equal(again["x"], torch.ones(2))


def test_decoding_logs_what_and_how_long(tmp_path, caplog):
    root = folder(tmp_path / "d", ("png",))
    with caplog.at_level("INFO", logger="metamm"):
        small(root).split("train")
    lines = [r.getMessage() for r in caplog.records]
    assert f"decoding 4 files of the train split of {root}" in lines
    assert any(ln.startswith(f"decoded 4 files of the train split of {root} in ") for ln in lines)


def test_cli_data_refuses_a_nan_vector_in_one_line(tmp_path, monkeypatch, capsys):
    from metamm_cli import cli

    root = folder(tmp_path / "d", ("png", "npy"))
    np.save(root / "test" / "b" / "s1.npy", np.full(4, np.nan))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    code = cli.main(["data", "dataset=folder", f"dataset.root={root}", "dataset.image.size=8",
                     "episode.way=2", "episode.shot=1", "episode.query=1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{root / 'test/b/s1.npy'}: all 4 values are NaN" in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main sets it to 1
    code = cli.main(["data", "dataset=folder", f"dataset.root={root}", "dataset.audio.hop=0"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.endswith("dataset.audio.hop=0: must be an integer >= 1") and len(err.splitlines()) == 1
